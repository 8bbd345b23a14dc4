"""Out-of-core training batches and embedding for datasets larger than memory.

Everything here reads the dataset in row blocks from disk (an ``.h5ad`` whose ``X`` is CSR or
dense, or a Cell Ranger v3 10x ``.h5``), applies the fitted ``Preprocessor`` and ``GridLayout``
block by block, and never holds more than a few blocks: peak memory is bounded by
``chunk_size`` (and ``buffer_chunks``), not by the number of cells.

* :class:`RowReader`: random access to row blocks ``[a, b)`` as CSR float32.
* :class:`StreamBatches`: training batches streamed from disk, chunk-shuffled: per epoch a
  permutation of the chunks drawn from ``(seed, epoch)``; cells shuffled inside a buffer of
  ``buffer_chunks`` chunks (from ``(seed, epoch, rank)``). Deterministic per (seed, epoch), so
  a resumed run sees the same batches as an uninterrupted one. With one process every cell is
  seen exactly once per epoch; with ``world_size`` ranks each rank reads a disjoint set of
  chunks and all ranks take the same number of steps (see :class:`StreamBatches`).
* :func:`subsample_genes`: a seeded subsample of at most ``n_max`` cells in memory (the
  contrastive-sc teacher and the correlation grid layout are fitted on it).
* :func:`embed_file`: embeddings written chunk by chunk into a ``.npy`` memmap beside the
  output (each rank of a distributed run fills its contiguous shard), then moved into place
  atomically as ``.npy`` or converted block-wise to an ``.h5ad`` holding ``obs`` +
  ``obsm["X_masksc"]`` (``X`` is omitted: the input file has it).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from masksc.checks import check_flags, check_seed, is_integer
from masksc.data import ChunkSource, CSRBatch, GridLayout, Preprocessor, open_source
from masksc.data.io import detect_format
from masksc.data.preprocess import LIBRARY_GENES_MISSING, PROFILE_SAMPLE_CELLS
from masksc.data.validate import check_count
from masksc.errors import CheckpointError, DataError, MaskscError, warn
from masksc.io_utils import (check_output, default_mode, fsync_file, make_folders, publish, remove_empty_folders,
                             reserve)
from masksc.progress import progress_bar

log = logging.getLogger(__name__)

EMBEDDING_KEY = "X_masksc"
EMBED_SUFFIXES = (".h5ad", ".npy")  # what embed_file writes: obs + obsm, or the bare float32 matrix


class RowReader:
    """Random access to the cells of a dataset in row blocks.

    ``source``: an ``.h5ad`` path (X stored CSR or dense), a 10x HDF5 path (Cell Ranger v3), an
    AnnData opened ``backed="r"`` (read like its file), an in-memory AnnData, or any other path
    :func:`masksc.data.read` accepts; what cannot be streamed (those other formats, a Cell Ranger
    v2 ``.h5``, an ``.h5ad`` whose X is stored CSC) is read into memory, with a log line saying why.
    ``layer``: read that layer instead of ``X``; ``use_raw``: read ``.raw`` (AnnData and ``.h5ad``).
    Attributes: ``n_obs``, ``var_names`` (pd.Index), ``obs`` (pd.DataFrame), ``streamed``
    (True when rows come from disk), ``chunks`` (the :class:`~masksc.data.ChunkSource`, for
    whole passes such as fitting the preprocessor). Rows are read by :func:`masksc.data.open_source`'s
    :class:`~masksc.data.ChunkSource` through a handle this reader opens on first use; it
    pickles without the handle (each process opens its own).
    """

    def __init__(self, source, layer: str | None = None, use_raw: bool = False):
        if isinstance(source, RowReader):  # share its metadata (and in-memory matrix); own file handle
            self.__dict__.update(source.__getstate__())
            return
        self._file: h5py.File | None = None
        self.path = None
        if not isinstance(source, ad.AnnData) or source.isbacked:
            self.path = Path(source.filename if isinstance(source, ad.AnnData) else source)
        self._src = open_source(source, layer, use_raw)
        self.n_obs, self.var_names, self.obs = self._src.n_obs, self._src.var_names, self._src.obs

    @property
    def chunks(self) -> ChunkSource:
        """The dataset as a ChunkSource (of the layer read, if one was named)."""
        return self._src

    @property
    def streamed(self) -> bool:
        """True when rows are read from a file (.h5ad or 10x .h5), False when held in memory."""
        return self._src.path is not None

    def close(self) -> None:
        """Close the HDF5 handle (reopened on the next read)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self):  # h5py handles don't pickle; reopen in the child
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def rows(self, a: int, b: int) -> sp.csr_matrix:
        """Cells ``a .. b-1``: CSR float32 [b - a, n_vars] (a fresh matrix the caller owns)."""
        if self._file is None and self.streamed:
            self._file = h5py.File(self._src.path, "r")
        return self._src.rows(a, b, self._file)


def _transform_block(preprocessor: Preprocessor, X: sp.csr_matrix, var_names, obs_names,
                     rows: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
    """``preprocessor.transform_chunks`` on a block of raw cells read from a dataset, as one chunk.

    X: CSR [m, n_genes] over ``var_names``; ``obs_names``, ``rows`` (int [m]): the cells' names and
    rows in the dataset, which a DataError names. The dataset's gene profile is checked once, on its
    first cells (:func:`check_first_cells`), not per block. Returns (keep bool [m] — False for cells the
    preprocessor drops (``min_counts``) — and CSR float32 [kept, len(preprocessor.genes_)])."""
    with warnings.catch_warnings():  # a file's repeated cell names are the user's to keep
        warnings.filterwarnings("ignore", "Observation names are not unique", UserWarning)
        # said once for the file by check_first_cells, not once a block
        warnings.filterwarnings("ignore", f".*{LIBRARY_GENES_MISSING}", UserWarning)
        block = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(obs_names, dtype=str)),
                           var=pd.DataFrame(index=pd.Index(var_names)))
        (_, keep, L), = preprocessor.transform_chunks(block, chunk_size=max(1, X.shape[0]), rows=rows,
                                                      check_profile=False)
    return keep, L


def grid_rows(preprocessor: Preprocessor, grid: GridLayout, X: sp.csr_matrix, reader: RowReader,
              start: int = 0) -> tuple[np.ndarray, sp.csr_matrix]:
    """Preprocess a block of raw cells of ``reader``, cells ``start .. start+m-1``, and lay it on the grid.

    X: CSR [m, reader.n_vars]. Returns (keep bool [m] — False for cells the
    preprocessor drops (``min_counts``) — and CSR float32 [kept, g*s] in grid order). A DataError
    names the bad cells by their dataset rows and names."""
    stop = start + X.shape[0]
    keep, L = _transform_block(preprocessor, X, reader.var_names, reader.obs.index[start:stop], np.arange(start, stop))
    genes = pd.DataFrame(index=pd.Index(preprocessor.genes_))  # L's columns, which the grid matches by name
    return keep, grid.to_grid(ad.AnnData(X=L, var=genes))


def check_first_cells(preprocessor: Preprocessor, reader: RowReader, start: int, stop: int,
                      log_input: bool = True) -> None:
    """Blocks are transformed one at a time, without the gene-profile check (each may be too
    small for it) or the log-input check; check the first ``PROFILE_SAMPLE_CELLS`` cells of
    ``start .. stop-1`` at once, before them, then warn once when the data lacks genes of the
    training data (the blocks do not repeat it; after the check, which refuses data missing grid
    genes, as the warning says none are). ``log_input=False`` leaves out the log-input check, for
    the data the preprocessor was just fitted on (fitting made it). Reads nothing for named genes
    and counts input; leaves no file handle open (readers fork into workers)."""
    b = min(stop, start + PROFILE_SAMPLE_CELLS)
    log_input = log_input and preprocessor.input_kind_ == "log"
    if b > start and (preprocessor.needs_profile_check() or log_input):
        try:
            X = reader.rows(start, b)
            preprocessor.check_gene_profile(X, reader.var_names, f" in cells {start}..{b - 1}")
            if log_input:
                preprocessor.check_log_input(X)
        finally:
            reader.close()
    preprocessor.library_columns(reader.var_names)


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] row ranges of ``chunk_size`` cells covering ``0..n``."""
    chunk_size = check_count("chunk_size", chunk_size)
    return [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]


def rank_chunk_bounds(n: int, chunk_size: int, world_size: int) -> list[tuple[int, int]]:
    """[(start, stop)] row ranges covering ``0..n`` in a multiple of ``world_size`` chunks of near-equal
    size (one apart at most), about ``chunk_size`` cells each: dealt out ``world_size`` at a time,
    every rank gets as many chunks and, whichever it gets, within a cell a chunk of the others'
    counts (fixed-size chunks and a short last one made ranks top up by repeating many cells: 181
    of 203 cells, in 64-cell chunks on 3 ranks; a rank could get no chunk at all). Needs
    ``n >= world_size``."""
    chunk_size = check_count("chunk_size", chunk_size)
    rounds = min(math.ceil(math.ceil(n / chunk_size) / world_size), n // world_size)
    edges = np.linspace(0, n, rounds * world_size + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class StreamBatches(torch.utils.data.IterableDataset):
    """Training batches (:class:`CSRBatch`, cells in grid order) streamed from disk.

    Per epoch: the chunks (``chunk_size`` consecutive cells; under several processes a multiple of
    ``world_size`` chunks of near-equal size, :func:`rank_chunk_bounds`) are permuted with
    ``default_rng([seed, epoch])``; rank ``r`` of ``world_size`` takes chunks ``perm[r::W]``
    (disjoint shards); it reads ``buffer_chunks`` of them at a time and shuffles their cells
    (``default_rng([seed, epoch, r])``); batches carry over across buffers, so all are full but
    the last. ``cell_index`` holds each cell's row in the dataset. ``log_input=False`` leaves out
    the log-input check of the first cells (``check_first_cells``), for the data the preprocessor
    was just fitted on.

    Every rank takes ``len(self)`` steps per epoch (DDP needs equal step counts): it yields its
    own cells once and, when its shard is smaller than the largest possible shard (by a cell a
    chunk at most) or cells were dropped by ``min_counts``, tops up with repeats of its first
    chunks. With one process and no dropped cells this is exactly one pass: every cell once per
    epoch.
    Memory: ``buffer_chunks * chunk_size`` cells in grid order.

    In a ``DataLoader(batch_size=None, num_workers=k)`` worker ``w`` yields batches ``w, w+k, ...``
    of the same stream, so the loader returns exactly the batches of ``num_workers=0`` in the same
    order (and resume stays exact). Every worker reads and transforms the whole shard: workers
    overlap batch building with training, they do not divide the reading.
    """

    def __init__(self, source, preprocessor: Preprocessor, grid: GridLayout, batch_size: int = 256,
                 chunk_size: int = 4096, buffer_chunks: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 log_input: bool = True):
        batch_size, chunk_size = check_count("batch_size", batch_size), check_count("chunk_size", chunk_size)
        buffer_chunks = check_count("buffer_chunks", buffer_chunks, "chunks")
        world_size = check_count("world_size", world_size, "processes")
        if not is_integer(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank!r} is not in 0..{world_size - 1}")
        seed = check_seed(seed)
        self.reader = RowReader(source)
        self.preprocessor, self.grid = preprocessor, grid
        check_first_cells(preprocessor, self.reader, 0, self.reader.n_obs, log_input)
        self.batch_size, self.buffer_chunks, self.seed = batch_size, buffer_chunks, seed
        self.rank, self.world_size = rank, world_size
        n = self.reader.n_obs
        if n < world_size:
            raise DataError(f"{n} cells cannot be split over {world_size} ranks; fix: use fewer processes.")
        self.bounds = chunk_bounds(n, chunk_size) if world_size == 1 else rank_chunk_bounds(n, chunk_size, world_size)
        sizes = sorted((b - a for a, b in self.bounds), reverse=True)
        self.cells_per_rank = sum(sizes[:len(sizes) // world_size])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose chunk permutation and shuffles the next iteration uses (a whole
        number >= 0)."""
        if not is_integer(epoch) or epoch < 0:
            raise DataError(f"epoch={epoch!r}; fix: pass a whole number >= 0.")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.cells_per_rank / self.batch_size)

    def chunks_of_rank(self) -> np.ndarray:
        """Chunk ids this rank reads in the current epoch, in reading order."""
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.bounds))
        return perm[self.rank::self.world_size]

    def _load(self, c: int) -> tuple[sp.csr_matrix, np.ndarray]:
        a, b = self.bounds[c]
        keep, X = grid_rows(self.preprocessor, self.grid, self.reader.rows(a, b), self.reader, a)
        return X, np.arange(a, b, dtype=np.int64)[keep]

    def _buffers(self, rng):
        chunks = self.chunks_of_rank()
        first = True
        while True:  # pass 1: each cell once; later passes only top up to the common step count
            got = 0
            for g in range(0, len(chunks), self.buffer_chunks):
                parts = [self._load(c) for c in chunks[g:g + self.buffer_chunks]]
                X = sp.vstack([p[0] for p in parts], format="csr")
                idx = np.concatenate([p[1] for p in parts])
                perm = rng.permutation(len(idx))
                got += len(idx)
                yield X[perm], idx[perm]
            if got == 0:
                raise DataError("no cells left to train on after preprocessing; fix: check min_counts.")
            if first:
                first = False
                log.debug("rank %d read its %d cells; topping up to %d", self.rank, got, self.cells_per_rank)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, batch in enumerate(self._stream()):
            if i % n_workers == worker:
                yield batch

    def _stream(self):
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        target, emitted = self.cells_per_rank, 0
        left_X, left_idx = None, np.zeros(0, dtype=np.int64)
        try:
            for X, idx in self._buffers(rng):
                if left_X is not None and left_X.shape[0]:
                    X, idx = sp.vstack([left_X, X], format="csr"), np.concatenate([left_idx, idx])
                pos = 0
                while emitted < target:
                    need = min(self.batch_size, target - emitted)
                    if X.shape[0] - pos < need:
                        break
                    yield CSRBatch.from_csr(X[pos:pos + need], idx[pos:pos + need])
                    pos += need
                    emitted += need
                if emitted >= target:
                    return
                left_X, left_idx = X[pos:], idx[pos:]
        finally:
            self.reader.close()


def subsample_rows(n: int, n_max: int | None, seed: int = 0) -> np.ndarray:
    """Sorted int64 rows of a seeded uniform subsample of at most ``n_max`` of ``n`` cells (all when None)."""
    if n_max is None or n <= n_max:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 0x5EED]).choice(n, size=n_max, replace=False)).astype(np.int64)


def subsample_genes(source, preprocessor: Preprocessor, n_max: int | None = 50_000, seed: int = 0,
                    chunk_size: int = 16_384, progress: bool = False) -> tuple[sp.csr_matrix, np.ndarray]:
    """One streaming pass keeping a seeded subsample of at most ``n_max`` cells, preprocessed.

    Returns (CSR float32 [m, len(preprocessor.genes_)] over the selected genes, int64 [m] rows
    of those cells in the dataset). Memory: the subsample plus one chunk."""
    reader = RowReader(source)
    check_first_cells(preprocessor, reader, 0, reader.n_obs, log_input=False)  # the data it was fitted on
    rows = subsample_rows(reader.n_obs, n_max, seed)
    blocks, kept = [], []
    try:
        for a, b in progress_bar(chunk_bounds(reader.n_obs, chunk_size), desc="subsample", disable=not progress,
                                 leave=False):
            lo, hi = np.searchsorted(rows, [a, b])
            if hi == lo:
                continue
            X = reader.rows(a, b)[rows[lo:hi] - a]
            keep, L = _transform_block(preprocessor, X, reader.var_names, reader.obs.index[rows[lo:hi]], rows[lo:hi])
            blocks.append(L)
            kept.append(rows[lo:hi][keep])
    finally:
        reader.close()
    if not blocks:
        raise DataError("the subsample holds no cells; fix: check the input and min_counts.")
    return sp.vstack(blocks, format="csr"), np.concatenate(kept)


@torch.no_grad()
def embed_rows(network: torch.nn.Module, reader: RowReader, preprocessor: Preprocessor, grid: GridLayout,
               out: np.ndarray, start: int, stop: int, batch_size: int = 1024, chunk_size: int = 16_384,
               device: str | torch.device | None = None, amp: bool = True, progress: bool = True,
               checked: tuple[int, int] | None = None) -> None:
    """Embed cells ``start .. stop-1`` of ``reader`` into ``out[start:stop]`` (float32 [n, D],
    e.g. a memmap), chunk by chunk; cells dropped by the preprocessor (``min_counts``) get NaN,
    with one warning counting them. ``checked``: the cells whose first ones
    :func:`check_first_cells` judges (default ``(start, stop)``; a rank embedding its shard
    passes the whole dataset's, so that every rank judges the cells one process would).
    The next chunk is read and preprocessed in a background thread while the model embeds the
    current one (h5py, scipy and torch release the GIL for their heavy work). ``amp``: bf16
    autocast on CUDA (ignored on CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    from masksc.embed import embed_matrix

    def load(a, b):
        return grid_rows(preprocessor, grid, reader.rows(a, b), reader, a)

    bounds = [(start + a, start + b) for a, b in chunk_bounds(stop - start, chunk_size)]
    bar = progress_bar(total=stop - start, desc="embed", unit="cell", disable=not progress, leave=False)
    n_dropped = 0
    try:
        check_first_cells(preprocessor, reader, *(checked or (start, stop)))
        with ThreadPoolExecutor(max_workers=1) as pool:
            nxt = pool.submit(load, *bounds[0]) if bounds else None
            for i, (a, b) in enumerate(bounds):
                keep, X = nxt.result()
                nxt = pool.submit(load, *bounds[i + 1]) if i + 1 < len(bounds) else None
                Z = embed_matrix(network, X, batch_size=batch_size, device=device, progress=False,
                                 amp=amp) if X.shape[0] else None
                if keep.all():
                    out[a:b] = Z
                else:
                    n_dropped += int((~keep).sum())
                    block = np.full((b - a, out.shape[1]), np.nan, dtype=np.float32)
                    if Z is not None:
                        block[keep] = Z
                    out[a:b] = block
                bar.update(b - a)
    finally:
        bar.close()
        reader.close()
    warn_nan_rows(n_dropped, stop - start, preprocessor.min_counts)


def warn_nan_rows(n_dropped: int, n_cells: int, min_counts) -> None:
    """Warn, when ``n_dropped`` > 0, that that many of ``n_cells`` embedding rows are NaN because
    the model's preprocessor drops those cells (``min_counts``), and how to leave them out."""
    if n_dropped:
        warn(f"{n_dropped} of {n_cells} cells have NaN embeddings: the model's preprocessor drops them (min_counts="
             f"{min_counts}); fix: leave those cells out before clustering (the rows where "
             "np.isfinite(embedding).all(axis=1))")


def write_embedding_h5ad(path: Path, Z: np.ndarray, obs: pd.DataFrame, uns: dict | None = None,
                         block: int = 65_536) -> None:
    """Write an ``.h5ad`` holding ``obs``, ``obsm["X_masksc"] = Z`` (copied ``block`` rows at a
    time, so ``Z`` may be a memmap) and ``uns``; ``X`` is omitted (anndata reads it as None)."""
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        ad.io.write_elem(f, "obs", _writable_obs(obs))
        ad.io.write_elem(f, "var", pd.DataFrame(index=pd.Index([], dtype=str)))
        for key in ("varm", "layers", "obsp", "varp"):
            ad.io.write_elem(f, key, {})
        ad.io.write_elem(f, "uns", uns or {})
        obsm = f.create_group("obsm")
        obsm.attrs["encoding-type"], obsm.attrs["encoding-version"] = "dict", "0.1.0"
        ds = obsm.create_dataset(EMBEDDING_KEY, shape=Z.shape, dtype=np.float32,
                                 chunks=(min(max(1, Z.shape[0]), 16_384), Z.shape[1]))
        ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"
        for a in range(0, Z.shape[0], block):
            ds[a:a + block] = np.asarray(Z[a:a + block], dtype=np.float32)


def _obs_colours(source, reader: RowReader) -> dict:
    """scanpy's colours of the source's categorical obs columns (``uns["<column>_colors"]`` of an
    AnnData or ``.h5ad``, one per category in the source's order), each given to its category in
    the order of ``reader.obs``, which the embedding's ``.h5ad`` stores (a ``label`` column's
    categories are sorted there), so its maps are drawn in the same colours."""
    wanted = [name for name in reader.obs.columns if isinstance(name, str)]
    if isinstance(source, ad.AnnData):
        given = {name: (source.obs[name], source.uns[f"{name}_colors"]) for name in wanted
                 if f"{name}_colors" in source.uns and name in source.obs}
    elif reader.path is not None and detect_format(reader.path) == "h5ad":
        with h5py.File(reader.path, "r") as f:  # the coloured columns alone, not the whole obs again
            uns, obs = f.get("uns", {}), f.get("obs")
            coloured = [name for name in wanted if f"{name}_colors" in uns]
            # anndata >= 0.8 stores a categorical column as a group; older layouts are left to anndata
            current = isinstance(obs, h5py.Group) and all(isinstance(obs.get(name), h5py.Group) for name in coloured)
            if current:
                given = {name: (pd.Series(ad.io.read_elem(obs[name])), ad.io.read_elem(uns[f"{name}_colors"]))
                         for name in coloured}
        if not current:
            old = ad.read_h5ad(reader.path, backed="r")
            try:
                given = {name: (old.obs[name], old.uns[f"{name}_colors"]) for name in coloured if name in old.obs}
            finally:
                old.file.close()
    else:
        return {}
    colours = {}
    for name, (stored, palette) in given.items():
        column = reader.obs[name]
        if not isinstance(stored.dtype, pd.CategoricalDtype) or not isinstance(column.dtype, pd.CategoricalDtype):
            continue
        by_category = dict(zip(stored.cat.categories.astype(str), np.asarray(palette)))
        order = column.cat.categories.astype(str)
        if len(by_category) == len(stored.cat.categories) and len(order) and all(c in by_category for c in order):
            colours[f"{name}_colors"] = np.array([by_category[c] for c in order], dtype=object)
    return colours


def check_obs_writable(obs: pd.DataFrame) -> None:
    """Raise DataError, naming what anndata refused, when ``obs`` cannot be written to an
    ``.h5ad`` as :func:`write_embedding_h5ad` writes it (a datetime column, a column name that is
    not text, an index named like a column): tried in memory, before any cell is embedded."""
    try:
        with h5py.File(io.BytesIO(), "w") as f:
            ad.io.write_elem(f, "obs", _writable_obs(obs))
    except Exception as exc:  # anndata raises several types (IORegistryError, TypeError, ValueError) for these
        raise DataError(f"obs cannot be written to an .h5ad ({type(exc).__name__}: {str(exc).splitlines()[0]}); fix: "
                        "convert or drop the column anndata cannot store (e.g. adata.obs[name] = "
                        "adata.obs[name].astype(str), adata.obs.columns = adata.obs.columns.astype(str)), or write the "
                        "embedding to a .npy.") from exc


def _writable_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """``obs`` as ``AnnData.write_h5ad`` stores it (its ``strings_to_categoricals`` rule): a text
    column whose values repeat becomes a categorical, its categories in natural order, and one
    of distinct values stays as it is; beyond anndata, other object columns, which it may not
    write (mixed types), become categoricals of their text, missing values staying missing."""
    from natsort import natsorted  # anndata's own dependency, and its order
    out = obs.copy()
    for name in out.columns:
        col = out[name]
        kind = pd.api.types.infer_dtype(col)
        if kind == "string" and not isinstance(col.dtype, pd.CategoricalDtype):
            categories = pd.Categorical(col)
            if len(categories.categories) < len(categories):
                out[name] = categories.reorder_categories(natsorted(categories.categories))
        elif col.dtype == object and kind not in ("string", "bytes", "empty"):
            out[name] = pd.Categorical(col.astype(str).where(col.notna()))
    return out


def _gene_annotations(source, reader: RowReader, use_raw: bool) -> pd.DataFrame:
    """The ``var`` table (of ``.raw`` with ``use_raw``) of an AnnData or ``.h5ad`` source, whose
    columns may name genes otherwise than its index; an empty one for other sources or a var
    that cannot be read."""
    if isinstance(source, ad.AnnData):
        return source.raw.var if use_raw else source.var
    if reader.path is not None and detect_format(reader.path) == "h5ad":
        try:
            with h5py.File(reader.path, "r") as f:
                return ad.io.read_elem(f["raw/var" if use_raw else "var"])
        except (OSError, KeyError, ValueError, TypeError):
            pass
    return pd.DataFrame(index=reader.var_names)


def embed_file(model, source, output: str | os.PathLike, *, batch_size: int = 1024, chunk_size: int = 16_384,
               device: str | torch.device | None = None, amp: bool = True, dist=None,
               progress: bool = True, layer: str | None = None, use_raw: bool = False,
               source_path: str | os.PathLike | None = None, overwrite: bool = True) -> Path | None:
    """Embed every cell of ``source`` (path or AnnData; see :class:`RowReader`; its ``X`` or the
    layer ``layer``, or with ``use_raw`` its ``.raw``) with ``model`` (a ``masksc.pipeline.MaskSCModel``)
    into ``output``.
    ``source_path``: the file an in-memory ``source`` was read from (default: the path of a path
    or backed source); the ``.h5ad`` output records it as its source ("AnnData" without one), and
    ``output`` may not be it. ``overwrite=False`` refuses an existing ``output``, also one another
    command writes while this one runs (the command line's default).

    ``output`` ends in ``.npy`` (float32 [n_cells, D] in row order) or ``.h5ad`` (``obs`` of the
    input + ``obsm["X_masksc"]`` + ``uns["masksc"]``, with scanpy's ``uns["<column>_colors"]`` of
    the input; no ``X``). A path's ``obs`` is as :func:`masksc.read` reads it: a ``"label"``
    column becomes a categorical of strings; an AnnData's is written as it is. Rows are written chunk by chunk
    into a hidden ``.npy`` memmap beside ``output``; in a distributed run (``dist``, default:
    the current process group, see :mod:`masksc.distributed`) rank ``r`` fills its contiguous
    shard of rows and rank 0 publishes the file (across nodes, ``output``'s folder must be on a
    filesystem every node sees). The output appears atomically at the end (an
    interrupted run leaves at most a hidden temp file, never a partial ``output``). Cells the
    preprocessor drops (``min_counts``) get NaN rows. ``amp``: bf16 autocast on CUDA. Returns the
    path on rank 0, None on other ranks.
    Raises CheckpointError when the data lacks genes the model needs.
    """
    from masksc import checkpoint as ckpt
    from masksc import distributed

    chunk_size, batch_size = check_count("chunk_size", chunk_size), check_count("batch_size", batch_size)
    check_flags(amp=amp, progress=progress, use_raw=use_raw, overwrite=overwrite)
    ctx = dist or distributed.context()
    output = Path(output)
    if output.suffix.lower() not in EMBED_SUFFIXES:
        raise MaskscError(f"output {output} must end in {' or '.join(EMBED_SUFFIXES)}; fix: e.g. "
                          f"-o {output.with_suffix(EMBED_SUFFIXES[0])}.")
    with ctx.together():  # a file, output or genes one rank finds wrong stops every rank here
        with model.noting_fitted_input(layer, use_raw):
            reader = RowReader(source, layer, use_raw)
        if source_path is not None and reader.path is not None and \
                Path(source_path).resolve() != Path(reader.path).resolve():
            raise MaskscError(f"source_path={str(source_path)!r} names the file an in-memory source was read from, "
                              f"but the source is the file {reader.path} itself; fix: drop source_path.")
        origin = Path(source_path) if source_path is not None else reader.path
        check_output(output, origin, overwrite=overwrite)
        try:
            ckpt.check_genes(model.grid.to_dict(), reader.var_names)
        except CheckpointError as exc:  # a var column may name the genes (symbols beside Ensembl IDs)
            model._refuse_missing_genes(exc, _gene_annotations(source, reader, use_raw), layer, use_raw)
        n, dim = reader.n_obs, model.network.cfg.embedding_dim
        if n == 0:
            raise DataError(f"{origin or 'the data'} holds no cells; fix: pass a dataset with cells.")
        if output.suffix.lower() == ".h5ad":
            check_obs_writable(reader.obs)
    created, tmp, done = [], None, False
    if ctx.is_main:
        created = make_folders(output.parent)
        fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".npy.tmp", dir=output.parent)
        os.close(fd)
        os.chmod(name, default_mode())  # mkstemp's 0600 would become the .npy's mode
        tmp = Path(name)
    tmp = Path(ctx.broadcast_object(str(tmp) if tmp else None))
    try:
        with ctx.together():  # a full disk stops every rank here, not as a SIGBUS in the memory map's writes
            if ctx.is_main:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
                with open(tmp, "r+b") as fh:
                    reserve(fh.fileno(), os.fstat(fh.fileno()).st_size)
        with ctx.together():  # bad cells in one rank's shard (or no shared folder) stop every rank with a message
            Z = np.lib.format.open_memmap(tmp, mode="r+")
            a, b = distributed.shard_range(n, ctx.rank, ctx.world_size)
            with model.noting_fitted_input(layer, use_raw):
                embed_rows(model.network, reader, model.preprocessor, model.grid, Z, a, b, batch_size=batch_size,
                           chunk_size=chunk_size, device=device if device is not None else ctx.device, amp=amp,
                           progress=progress and ctx.is_main, checked=(0, n))
            Z.flush()
            del Z
        if not ctx.is_main:
            return None
        fsync_file(tmp)
        if output.suffix.lower() == ".npy":
            publish(tmp, output, replace=overwrite)
        else:
            from masksc.io_utils import atomic_write, frame_bytes
            uns = {**_obs_colours(source, reader),
                   "masksc": {"embed": {"model": str(model.path), "key": EMBEDDING_KEY,
                                        "source": str(origin.resolve()) if origin else "AnnData", "n_cells": int(n),
                                        "layer": layer, "use_raw": use_raw, "config": model.config.to_dict()}}}
            Z = np.lib.format.open_memmap(tmp, mode="r")
            with atomic_write(output, suffix=".h5ad", min_bytes=Z.nbytes + frame_bytes(reader.obs),
                              replace=overwrite) as out_tmp:
                write_embedding_h5ad(out_tmp, Z, reader.obs, uns)
            del Z
        done = True
        return output
    finally:
        if ctx.is_main:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if not done:
                remove_empty_folders(created)
