"""Synthetic scRNA-seq counts with known cell types, in memory or written to ``.h5ad`` in chunks.

Model (all parameters drawn from ``seed``): gene abundances are log-normal; each cell type
up-regulates its own random gene set (its expression program, ~3% of genes, fold 2-10x) and
type proportions are uneven (Dirichlet); a cell's library size is log-normal around
``mean_library`` counts (default 900 per 4096 genes, scaled with ``n_genes``); counts are negative binomial (gamma-Poisson, per-gene inverse
dispersion 0.5..5) on the cell's mean; dropout zeroes an entry with probability
``dropout * exp(-mean / 2)`` (weakly expressed genes drop out more). Typical output is ~90%
zeros for 4096 genes.

Cells are generated in fixed blocks of ``BLOCK`` cells, each from a generator seeded by
``(seed, block index)``, so the data depends only on ``seed`` and the shape: never on the
``chunk_size`` a file is written with (chunks are whole numbers of blocks), and the first
``n`` cells of a larger dataset equal a dataset of ``n`` cells.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from masksc.checks import check_seed, is_number
from masksc.data.io import gene_names
from masksc.data.validate import check_count
from masksc.errors import DataError
from masksc.io_utils import atomic_write
from masksc.progress import progress_bar

log = logging.getLogger(__name__)

BLOCK = 1024


@dataclass
class _Model:
    probs: np.ndarray  # float32 [T, G] gene probabilities per type (rows sum to 1)
    type_p: np.ndarray  # float64 [T]
    theta: np.ndarray  # float32 [G] NB inverse dispersion
    mean_library: float
    library_sigma: float
    dropout: float


def _model(n_genes, n_types, seed, mean_library, library_sigma, dropout) -> _Model:
    n_genes, n_types = check_count("n_genes", n_genes, "genes"), check_count("n_types", n_types, "cell types")
    seed = check_seed(seed)
    if mean_library is None:
        mean_library = 900.0 * n_genes / 4096
    settings = []
    for name, value, ok, rule in (("mean_library", mean_library, lambda v: v > 0, "> 0 (counts per cell)"),
                                  ("library_sigma", library_sigma, lambda v: v >= 0, ">= 0"),
                                  ("dropout", dropout, lambda v: 0 <= v <= 1, "in [0, 1] (a probability)")):
        if not is_number(value) or not math.isfinite(value) or not ok(value):
            raise DataError(f"{name} must be a number {rule}, got {value!r}.")
        settings.append(float(value) + 0.0)  # a Fraction or -0.0 as numpy's draws take them
    mean_library, library_sigma, dropout = settings
    rng = np.random.default_rng([seed, 0])
    base = rng.lognormal(0.0, 1.5, n_genes)
    fold = np.ones((n_types, n_genes))
    n_prog = max(1, int(round(0.03 * n_genes)))
    for t in range(n_types):
        genes = rng.choice(n_genes, n_prog, replace=False)
        fold[t, genes] = rng.uniform(2.0, 10.0, n_prog)
    probs = base * fold
    probs /= probs.sum(axis=1, keepdims=True)
    return _Model(probs.astype(np.float32), rng.dirichlet(np.full(n_types, 5.0)),
                  rng.uniform(0.5, 5.0, n_genes).astype(np.float32), mean_library, library_sigma, dropout)


def _block(m: _Model, seed: int, b: int, n_rows: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Cells ``b*BLOCK .. b*BLOCK+n_rows-1``: a full block is always drawn (then truncated) so
    a cell's values do not depend on how many cells follow it."""
    rng = np.random.default_rng([seed, 1, b])
    n_rows, keep = BLOCK, n_rows
    labels = rng.choice(len(m.type_p), size=n_rows, p=m.type_p)
    lib = rng.lognormal(np.log(m.mean_library), m.library_sigma, n_rows).astype(np.float32)
    mu = m.probs[labels] * lib[:, None]
    G = mu.shape[1]
    lam = rng.standard_gamma(np.broadcast_to(m.theta, (n_rows, G)), dtype=np.float32) * (mu / m.theta)
    counts = rng.poisson(lam).astype(np.float32)
    counts[rng.random((n_rows, G), dtype=np.float32) < m.dropout * np.exp(-mu / 2)] = 0
    return sp.csr_matrix(counts[:keep]), labels[:keep]


def _blocks(m, seed, n_cells):
    for b in range(-(-n_cells // BLOCK)):
        yield _block(m, seed, b, min(BLOCK, n_cells - b * BLOCK))


def _frames(n_cells, n_genes, labels):
    width = max(4, len(str(n_cells - 1)))
    obs = pd.DataFrame({"label": pd.Categorical([f"type_{t}" for t in labels])},
                       index=pd.Index([f"cell_{i:0{width}d}" for i in range(n_cells)]))
    return obs, pd.DataFrame(index=pd.Index(gene_names(n_genes)))


def synthetic(n_cells: int, n_genes: int = 4096, n_types: int = 10, seed: int = 0, mean_library: float | None = None,
              library_sigma: float = 0.5, dropout: float = 0.3) -> ad.AnnData:
    """Synthetic counts: AnnData [n_cells, n_genes], ``X`` CSR float32 whole numbers,
    ``obs["label"]`` categorical ``type_0..``. Deterministic per ``seed`` (see module doc)."""
    n_cells = check_count("n_cells", n_cells)
    m = _model(n_genes, n_types, seed, mean_library, library_sigma, dropout)
    mats, labels = zip(*_blocks(m, seed, n_cells))
    obs, var = _frames(n_cells, n_genes, np.concatenate(labels))
    return ad.AnnData(X=sp.vstack(mats, format="csr"), obs=obs, var=var)


def write_synthetic_h5ad(path, n_cells: int, n_genes: int = 4096, n_types: int = 10, seed: int = 0, *,
                         mean_library: float | None = None, library_sigma: float = 0.5, dropout: float = 0.3,
                         chunk_size: int = 16 * BLOCK) -> None:
    """Write :func:`synthetic` data to ``path`` (.h5ad, X as CSR) chunk by chunk.

    Memory is bounded by one chunk (``chunk_size`` cells, rounded up to a multiple of BLOCK)
    plus the labels: the anndata on-disk CSR layout (``X/data``, ``X/indices``, ``X/indptr``)
    is appended to with h5py. The file is written under a temporary name and moved into place
    at the end, so ``path`` is never half-written. Readable by ``anndata.read_h5ad`` (also
    ``backed="r"``) and :func:`masksc.data.iter_chunks`.
    """
    n_cells, chunk_size = check_count("n_cells", n_cells), check_count("chunk_size", chunk_size)
    m = _model(n_genes, n_types, seed, mean_library, library_sigma, dropout)
    per_chunk = max(1, -(-chunk_size // BLOCK))
    labels = np.empty(n_cells, dtype=np.int64)
    with atomic_write(path, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        X = f.create_group("X")
        X.attrs["encoding-type"], X.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        X.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = X.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        nnz, row = 0, 0
        n_blocks = -(-n_cells // BLOCK)
        for b0 in progress_bar(range(0, n_blocks, per_chunk), desc="synthetic", unit="chunk", leave=False):
            parts = [_block(m, seed, b, min(BLOCK, n_cells - b * BLOCK))
                     for b in range(b0, min(b0 + per_chunk, n_blocks))]
            C = sp.vstack([p[0] for p in parts], format="csr")
            labels[row:row + C.shape[0]] = np.concatenate([p[1] for p in parts])
            data.resize((nnz + C.nnz,))
            indices.resize((nnz + C.nnz,))
            data[nnz:] = C.data
            indices[nnz:] = C.indices
            indptr[row + 1:row + C.shape[0] + 1] = C.indptr[1:] + nnz
            nnz += C.nnz
            row += C.shape[0]
        if nnz < 2**31:  # scipy wants indices and indptr of one dtype: int32 when nnz allows
            ptr = indptr[()]
            del X["indptr"]
            X.create_dataset("indptr", data=ptr.astype(np.int32))
        obs, var = _frames(n_cells, n_genes, labels)
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for key in ("uns", "obsm", "varm", "layers", "obsp", "varp"):
            ad.io.write_elem(f, key, {})
    log.info("wrote %s: %d cells x %d genes, %.1f%% zeros", path, n_cells, n_genes,
             100 * (1 - nnz / (n_cells * n_genes)))
