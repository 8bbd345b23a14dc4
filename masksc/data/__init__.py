"""Data layer: read, validate, preprocess, grid layout, sparse batching, streaming, synthetic data."""
from masksc.data.batching import CellBatches, CSRBatch
from masksc.data.demo import load_demo
from masksc.data.grid import GridLayout
from masksc.data.io import FORMATS, read
from masksc.data.preprocess import Preprocessor
from masksc.data.stream import ChunkSource, iter_chunks, open_source, with_layer
from masksc.data.synthetic import synthetic, write_synthetic_h5ad
from masksc.data.validate import naming_matrix, validate_counts

__all__ = ["read", "FORMATS", "validate_counts", "Preprocessor", "GridLayout", "CSRBatch", "CellBatches",
           "iter_chunks", "open_source", "with_layer", "naming_matrix", "ChunkSource", "synthetic",
           "write_synthetic_h5ad", "load_demo"]
