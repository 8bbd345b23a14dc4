"""Out-of-core access: CSR row chunks of a dataset whose memory is bounded by the chunk.

Sources (:func:`open_source`):

* an in-memory AnnData: row slices of ``X`` (converted to CSR float32 per chunk);
* an ``.h5ad`` path or an AnnData opened with ``backed="r"``: ``X`` is read from the file with
  h5py. A CSR ``X`` (the usual layout, and what :func:`write_synthetic_h5ad` writes) is read as
  slices ``indptr[a:b+1]`` then ``data/indices[indptr[a]:indptr[b]]``, so a chunk costs only its
  own non-zeros; a dense ``X`` is read by row blocks; a CSC ``X`` is refused (rows are scattered
  over the whole file) with the fix;
* a 10x Genomics HDF5 path (Cell Ranger v3): the matrix is stored CSC *genes x cells*, i.e. its
  ``indptr`` runs over cells, so a block of cells is one contiguous column block of the stored
  matrix and is read exactly like a CSR row block (no transposition, no full pass);
* any other path: read in memory with :func:`masksc.data.read`, then sliced.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from masksc.data.io import _decode, detect_format, read, set_labels, to_csr32
from masksc.errors import DataError


@dataclass
class ChunkSource:
    """A dataset readable in row chunks: ``n_obs`` cells, ``var_names`` genes, ``obs`` table."""

    n_obs: int
    var_names: pd.Index
    obs: pd.DataFrame
    _chunks: object = field(repr=False)  # callable(chunk_size) -> Iterator[(start, csr)]

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    def chunks(self, chunk_size: int = 10_000) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(start, X_chunk)``: CSR float32 [<=chunk_size, n_vars] for cells start.."""
        if chunk_size < 1:
            raise DataError(f"chunk_size must be >= 1, got {chunk_size}; fix: pass a positive number of cells.")
        return self._chunks(chunk_size)


def _memory_source(adata: ad.AnnData) -> ChunkSource:
    X = adata.X
    if sp.issparse(X) and X.format != "csr":
        X = X.tocsr()  # a copy: slicing rows of CSC is quadratic

    def gen(cs):
        for a in range(0, adata.n_obs, cs):
            yield a, to_csr32(X[a:a + cs], copy=False)  # the slice is a copy already

    return ChunkSource(adata.n_obs, adata.var_names.copy(), adata.obs.copy(), gen)


def _csr_block(f_data, f_indices, f_indptr, a, b, n_cols) -> sp.csr_matrix:
    indptr = np.asarray(f_indptr[a:b + 1], dtype=np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    data = np.asarray(f_data[lo:hi], dtype=np.float32)
    indices = np.asarray(f_indices[lo:hi])
    return to_csr32(sp.csr_matrix((data, indices, indptr - lo), shape=(b - a, n_cols)), copy=False)


def _h5ad_source(path: Path) -> ChunkSource:
    with h5py.File(path, "r") as f:
        obs = ad.io.read_elem(f["obs"])
        var_names = pd.Index(ad.io.read_elem(f["var"]).index)
        X = f["X"]
        kind = X.attrs.get("encoding-type", "array") if isinstance(X, h5py.Group) else "array"
        shape = tuple(int(v) for v in (X.attrs["shape"] if isinstance(X, h5py.Group) else X.shape))
    if kind == "csc_matrix":
        raise DataError(f"{path}: X is stored CSC, which cannot be streamed by cells; fix: rewrite it as CSR "
                        "(adata.X = adata.X.tocsr(); adata.write_h5ad(...)) or read it in memory.")
    if kind not in ("csr_matrix", "array"):
        raise DataError(f"{path}: X has unsupported encoding {kind!r}; fix: store X as CSR or a dense array.")
    if "label" in obs:
        tmp = ad.AnnData(obs=obs)
        set_labels(tmp, obs["label"].to_numpy())
        obs = tmp.obs

    def gen(cs):
        with h5py.File(path, "r") as f:
            X = f["X"]
            for a in range(0, shape[0], cs):
                b = min(a + cs, shape[0])
                if kind == "csr_matrix":
                    yield a, _csr_block(X["data"], X["indices"], X["indptr"], a, b, shape[1])
                else:
                    yield a, to_csr32(np.asarray(X[a:b], dtype=np.float32), copy=False)

    return ChunkSource(shape[0], var_names, obs, gen)


def _10x_h5_source(path: Path) -> ChunkSource:
    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise DataError(f"{path}: only Cell Ranger v3 files (group 'matrix') can be streamed; fix: read it "
                            "in memory with masksc.data.read, or convert it to .h5ad.")
        m = f["matrix"]
        n_genes, n_cells = (int(v) for v in m["shape"][()])
        feats = m["features"]
        names = _decode(feats["name"][()] if "name" in feats else feats["id"][()])
        ftype = _decode(feats["feature_type"][()]) if "feature_type" in feats else None
        barcodes = _decode(m["barcodes"][()])
    keep = None
    if ftype is not None:
        gex = ftype == "Gene Expression"
        if gex.any() and not gex.all():
            keep = np.flatnonzero(gex)
            names = names[keep]
    var_names = ad.utils.make_index_unique(pd.Index(names))

    def gen(cs):
        with h5py.File(path, "r") as f:
            m = f["matrix"]
            for a in range(0, n_cells, cs):
                X = _csr_block(m["data"], m["indices"], m["indptr"], a, min(a + cs, n_cells), n_genes)
                yield a, (X[:, keep] if keep is not None else X)

    return ChunkSource(n_cells, var_names, pd.DataFrame(index=pd.Index(barcodes)), gen)


def open_source(source) -> ChunkSource:
    """Wrap an AnnData (in memory or backed), an ``.h5ad`` path, a 10x HDF5 path (or any path
    :func:`read` accepts, read in memory) as a :class:`ChunkSource`."""
    if isinstance(source, ChunkSource):
        return source
    if isinstance(source, ad.AnnData):
        if source.isbacked:
            return _h5ad_source(Path(source.filename))
        return _memory_source(source)
    path = Path(source)
    if not path.exists():
        raise DataError(f"file not found: {path}; fix: check the path.")
    fmt = detect_format(path)
    try:
        if fmt == "h5ad":
            return _h5ad_source(path)
        if fmt == "10x_h5":
            return _10x_h5_source(path)
    except (OSError, KeyError) as exc:
        raise DataError(f"cannot stream {path} as {fmt} ({exc}); fix: check the file is complete.") from exc
    return _memory_source(read(path, format=fmt))


def iter_chunks(source, chunk_size: int = 10_000) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, X_chunk)`` over the cells of ``source``: X_chunk is CSR float32
    [<= chunk_size, n_genes] holding cells ``start .. start+len``; peak memory is one chunk
    for backed/on-disk sources (see module doc)."""
    src = open_source(source)
    yield from src.chunks(chunk_size)
