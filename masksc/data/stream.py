"""Out-of-core access: CSR row chunks of a dataset whose memory is bounded by the chunk.

:class:`ChunkSource` reads any row range ``[a, b)`` (:meth:`ChunkSource.rows`); its chunks are
consecutive such ranges.

Sources (:func:`open_source`):

* an in-memory AnnData: row slices of ``X`` (converted to CSR float32 per chunk);
* an ``.h5ad`` path or an AnnData opened with ``backed="r"``: ``X`` is read from the file with
  h5py. A CSR ``X`` (the usual layout, and what :func:`write_synthetic_h5ad` writes) is read as
  slices ``indptr[a:b+1]`` then ``data/indices[indptr[a]:indptr[b]]``, so a chunk costs only its
  own non-zeros; a dense ``X`` is read by row blocks; a CSC ``X`` cannot be streamed (a cell's
  values are scattered over the whole file): it is read into memory as CSR, with a log line
  saying so and how to avoid it;
* a 10x Genomics HDF5 path (Cell Ranger v3): the matrix is stored CSC *genes x cells*, i.e. its
  ``indptr`` runs over cells, so a block of cells is one contiguous column block of the stored
  matrix and is read exactly like a CSR row block (no transposition, no full pass);
* any other path (and a Cell Ranger v2 ``.h5``): read into memory with :func:`masksc.data.read`,
  with a log line saying so, then sliced.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from masksc.checks import check_flags
from masksc.data.io import (_CORRUPT_FIX, _decode, _gene_expression, as_float32, canonical_csr32, check_compressed,
                             detect_format, read, set_labels, to_csr32, unique_gene_names)
from masksc.data.validate import check_count, no_x_matrix
from masksc.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ChunkSource:
    """A dataset readable by row ranges: ``n_obs`` cells, ``var_names`` genes, ``obs`` table.

    ``path``: the HDF5 file rows are read from (None when they come from memory). A source holds
    no open file, so it pickles (to DataLoader workers or other processes) as it is."""

    n_obs: int
    var_names: pd.Index
    obs: pd.DataFrame
    _read: Callable = field(repr=False)  # (h5py.File | None, a, b) -> CSR float32 [b - a, n_vars]
    path: Path | None = None

    @property
    def n_vars(self) -> int:
        """Genes (columns) of the source."""
        return len(self.var_names)

    def _open(self):
        return h5py.File(self.path, "r") if self.path is not None else contextlib.nullcontext()

    def rows(self, a: int, b: int, h5: h5py.File | None = None) -> sp.csr_matrix:
        """Cells ``a .. b-1``: CSR float32 [b - a, n_vars], a fresh matrix the caller owns.
        ``h5``: an open handle on ``path`` to reuse across calls; without it the file is opened
        for this call only."""
        if not 0 <= a <= b <= self.n_obs:
            raise IndexError(f"rows {a}..{b} out of range for {self.n_obs} cells")
        if h5 is not None:
            return self._read(h5, a, b)
        with self._open() as f:
            return self._read(f, a, b)

    def chunks(self, chunk_size: int = 10_000) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield ``(start, X_chunk)``: CSR float32 [<=chunk_size, n_vars] for cells start..,
        reading through one file handle for the whole pass."""
        return self._chunks(check_count("chunk_size", chunk_size))

    def _chunks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        with self._open() as f:
            for a in range(0, self.n_obs, chunk_size):
                yield a, self.rows(a, min(a + chunk_size, self.n_obs), f)


def _cells(a: int, b: int) -> str:
    """Where rows ``a .. b-1`` lie, for error messages."""
    return f" in cells {a}..{b - 1}"


def _memory_rows(X, _f, a, b) -> sp.csr_matrix:
    return to_csr32(X[a:b], copy=False, where=_cells(a, b))  # the slice is a copy already


def _check_one_matrix(layer: str | None, use_raw: bool) -> None:
    """Refuse a layer and .raw named together: each names the matrix to read."""
    check_flags(use_raw=use_raw)
    if use_raw and layer is not None:
        raise DataError("use_raw=True (--use-raw) and layer= (--layer) both name the matrix to read; fix: pass one "
                        "of them.")


def _check_raw(adata: ad.AnnData) -> None:
    """Refuse use_raw on an AnnData without ``.raw``."""
    if adata.raw is None:
        raise DataError("use_raw=True but adata.raw is None; fix: drop use_raw, or pass layer= the matrix to read.")


def with_layer(adata: ad.AnnData, layer: str | None, use_raw: bool = False) -> ad.AnnData:
    """The expression matrix to read as an AnnData: ``adata`` itself when ``layer`` is None, else
    one whose X is ``adata.layers[layer]``, or with ``use_raw`` one of ``adata.raw`` (log values
    beside scaled ``X`` in the usual scanpy layout, with the raw genes): the same matrices, not
    copies, obs alike. DataError naming the layers there are when ``layer`` is not one of them, and
    for ``use_raw`` without ``.raw`` or beside a layer."""
    _check_one_matrix(layer, use_raw)
    if use_raw:
        _check_raw(adata)
        return ad.AnnData(X=adata.raw.X, obs=adata.obs, var=adata.raw.var)
    if layer is None:
        return adata
    if layer not in adata.layers:
        if not adata.layers:
            raise DataError(f"the AnnData has no layer {layer!r} (its layers: none); fix: drop layer= (--layer) to "
                            "read adata.X (all that a csv, mtx or 10x file holds), or store the matrix first: "
                            f"adata.layers[{layer!r}] = counts.")
        raise DataError(f"the AnnData has no layer {layer!r}; fix: pass one of {list(adata.layers)}, or "
                        "layer=None (no --layer) for adata.X.")
    return ad.AnnData(X=adata.layers[layer], obs=adata.obs, var=adata.var)


SCALED_SAMPLE_CELLS = 1000  # cells read to tell a scaled X beside .raw (negative in almost every cell) at once


class ScaledBesideRawError(DataError):
    """``X`` holds scaled values and ``.raw`` is set (scanpy's usual layout)."""


def check_not_scaled_beside_raw(first_cells, fix: str) -> None:
    """Raise ScaledBesideRawError (a DataError), naming ``fix``, when ``X`` (its first cells: any
    matrix) of data that has a ``.raw`` holds negative values: scanpy's usual file, whose
    log-normalised values are in ``.raw``. Call it only for data with a ``.raw``."""
    if first_cells.size and first_cells.min() < 0:
        raise ScaledBesideRawError(f"X holds negative (scaled) values and .raw is set: scanpy's layout keeps the "
                        f"log-normalised values there; fix: {fix}.")


_RAW_FIX = "use_raw=True (--use-raw) to read .raw, or layer= (--layer) a counts layer"


def _memory_source(adata: ad.AnnData) -> ChunkSource:
    X = adata.X
    if X is None:
        raise no_x_matrix(adata)
    if sp.issparse(X) and X.format != "csr":
        X = X.tocsr()  # a copy: slicing rows of CSC is quadratic
    if adata.raw is not None:
        check_not_scaled_beside_raw(X[:SCALED_SAMPLE_CELLS], _RAW_FIX)
    return ChunkSource(adata.n_obs, adata.var_names.copy(), adata.obs.copy(), partial(_memory_rows, X))


def _csr_block(grp, a, b, n_cols) -> sp.csr_matrix:
    indptr = np.asarray(grp["indptr"][a:b + 1], dtype=np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    data = as_float32(grp["data"][lo:hi], _cells(a, b))
    indices = np.asarray(grp["indices"][lo:hi])
    check_compressed(data, indices, indptr - lo, (b - a, n_cols), where=_cells(a, b))
    return canonical_csr32(sp.csr_matrix((data, indices, indptr - lo), shape=(b - a, n_cols)), copy=False)


def _check_stored_compressed(grp, n_major: int, where: str, major: str = "cells") -> None:
    """Raise DataError unless the HDF5 group ``grp`` holds a compressed sparse matrix of ``n_major``
    ``major`` (its pointers' axis: cells for CSR, genes for CSC) whose arrays agree in length: what
    streaming it by rows relies on, checked before the first row is read (each block's own
    structure is checked as it is read)."""
    arrays = [k for k in ("data", "indices", "indptr") if isinstance(grp.get(k), h5py.Dataset) and grp[k].ndim == 1]
    if len(arrays) < 3:
        missing = "/".join(k for k in ("data", "indices", "indptr") if k not in arrays)
        raise DataError(f"X is a corrupt sparse matrix{where}: it lacks a 1-D {missing} array; {_CORRUPT_FIX}")
    indptr, n_values, n_indices = grp["indptr"], len(grp["data"]), len(grp["indices"])
    if len(indptr) != n_major + 1:
        raise DataError(f"X is a corrupt sparse matrix{where}: it has {len(indptr)} pointers (indptr) for "
                        f"{n_major} {major}, not {n_major + 1}; {_CORRUPT_FIX}")
    if n_values != n_indices or int(indptr[0]) != 0 or int(indptr[-1]) > n_indices:
        raise DataError(f"X is a corrupt sparse matrix{where}: it stores {n_values} values and {n_indices} "
                        f"indices, its pointers (indptr) running from {int(indptr[0])} to {int(indptr[-1])}; "
                        f"{_CORRUPT_FIX}")


def _stored_shape(X, kind: str, n_obs: int, n_vars: int, where: str) -> tuple[int, int]:
    """The (cells, genes) shape of an ``.h5ad``'s matrix ``X`` (HDF5 group or dataset of encoding
    ``kind``), after checking that it is 2-D, agrees with the file's ``n_obs`` cells and ``n_vars``
    genes and, when sparse, that its arrays can be streamed (:func:`_check_stored_compressed`): a
    file that breaks this would lose cells, or write an unreadable output, without a word."""
    stored = X.attrs.get("shape") if isinstance(X, h5py.Group) else X.shape
    if stored is None or len(stored) != 2:
        what = "no shape attribute" if stored is None else f"shape {tuple(stored)}"
        raise DataError(f"X has {what}{where}, not a 2-D cells x genes matrix; {_CORRUPT_FIX}")
    shape = (int(stored[0]), int(stored[1]))
    if shape != (n_obs, n_vars):
        raise DataError(f"X is {shape[0]} x {shape[1]}{where} but the file names {n_obs} cells (obs) and {n_vars} "
                        f"genes (var); {_CORRUPT_FIX}")
    if kind != "array":
        csr = kind == "csr_matrix"
        _check_stored_compressed(X, shape[0] if csr else shape[1], where, "cells" if csr else "genes")
    return shape


def _h5ad_rows(key: str, dense: bool, n_vars: int, f, a, b) -> sp.csr_matrix:
    if dense:
        return to_csr32(f[key][a:b], copy=False, where=_cells(a, b))
    return _csr_block(f[key], a, b, n_vars)


def _legacy_h5ad(f: h5py.File, key: str) -> bool:
    """Whether ``f`` was written by anndata < 0.7 (obs a compound dataset, sparse matrices
    without ``encoding-type``): anndata still reads such a file whole, but not by rows."""
    X = f.get(key)
    return isinstance(f.get("obs"), h5py.Dataset) or (isinstance(X, h5py.Group) and "encoding-type" not in X.attrs)


def _h5ad_source(path: Path, layer: str | None = None, use_raw: bool = False) -> ChunkSource:
    _check_one_matrix(layer, use_raw)
    key = "raw/X" if use_raw else "X" if layer is None else f"layers/{layer}"
    with h5py.File(path, "r") as f:
        legacy = _legacy_h5ad(f, key)
        has_raw = "raw" in f or "raw.X" in f  # anndata < 0.7 wrote raw.X beside X
        if use_raw and not legacy and key not in f:
            raise DataError(f"{path} has no .raw to read with use_raw (--use-raw); fix: drop it, or pass --layer "
                            "(layer=) the matrix to read.")
    if legacy:
        log.info("%s was written by anndata < 0.7, whose layout cannot be streamed: reading it into memory (to "
                 "stream it, rewrite it: anndata.read_h5ad(path).write_h5ad(new_path))", path)
        adata = ad.read_h5ad(path)
        if "label" in adata.obs:
            set_labels(adata, adata.obs["label"].to_numpy())
        return _memory_source(with_layer(adata, layer, use_raw))
    with h5py.File(path, "r") as f:
        obs = ad.io.read_elem(f["obs"])
        var_names = pd.Index(ad.io.read_elem(f["raw/var" if use_raw else "var"]).index)
        if layer is not None and key not in f:
            layers = list(f["layers"]) if "layers" in f else []
            raise DataError(f"{path} has no layer {layer!r}; fix: pass one of {layers}, or no layer for X.")
        if key not in f and "layers" in f and len(f["layers"]):
            raise DataError(f"{path} has no X matrix, only the layers {list(f['layers'])}; fix: --layer "
                            f"{list(f['layers'])[0]} (layer=) to read one.")
        if key not in f:
            raise DataError(f"{path} has no X matrix (a `masksc embed` output holds only obs and the embedding); "
                            "fix: pass the file that holds the expression counts.")
        X = f[key]
        kind = X.attrs.get("encoding-type", "array") if isinstance(X, h5py.Group) else "array"
        if kind not in ("csr_matrix", "csc_matrix", "array"):
            raise DataError(f"{path}: {key} has unsupported encoding {kind!r}; fix: store it as CSR or a dense "
                            "array.")
        shape = _stored_shape(X, kind, len(obs), len(var_names), f" in {path.name}")
        if kind == "csc_matrix":
            log.info("%s: %s is stored CSC, whose cells cannot be streamed (each is scattered over the file): "
                     "reading it into memory as CSR; to stream it, rewrite it as CSR (adata.X = adata.X.tocsr(); "
                     "adata.write_h5ad(...))", path, key)
            rows, streamed_from = partial(_memory_rows, to_csr32(ad.io.read_elem(X), copy=False,
                                                                 where=f" in {path.name}")), None
        else:
            rows, streamed_from = partial(_h5ad_rows, key, kind == "array", shape[1]), path
    if "label" in obs:
        tmp = ad.AnnData(obs=obs)
        set_labels(tmp, obs["label"].to_numpy())
        obs = tmp.obs
    source = ChunkSource(shape[0], var_names, obs, rows, streamed_from)
    if key == "X" and has_raw:
        check_not_scaled_beside_raw(source.rows(0, min(source.n_obs, SCALED_SAMPLE_CELLS)), _RAW_FIX)
    return source


def _10x_rows(n_genes: int, keep, f, a, b) -> sp.csr_matrix:
    X = _csr_block(f["matrix"], a, b, n_genes)
    return X[:, keep] if keep is not None else X


def _10x_h5_source(path: Path) -> ChunkSource | None:
    """A Cell Ranger v3 file (group ``matrix``) streamed by cells; None for the v2 layout (one
    group per genome, stored genes x cells), which is read in memory instead."""
    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            return None
        m = f["matrix"]
        n_genes, n_cells = (int(v) for v in m["shape"][()])
        feats = m["features"]
        names = _decode(feats["name"][()] if "name" in feats else feats["id"][()])
        ftype = _decode(feats["feature_type"][()]) if "feature_type" in feats else None
        barcodes = _decode(m["barcodes"][()])
        where = f" in {path.name}"
        if (len(names), len(barcodes)) != (n_genes, n_cells):
            raise DataError(f"the matrix is {n_genes} genes x {n_cells} cells{where} but the file names "
                            f"{len(names)} features and {len(barcodes)} barcodes; {_CORRUPT_FIX}")
        _check_stored_compressed(m, n_cells, where)
    keep = None
    if ftype is not None:
        gex = _gene_expression(ftype, path)
        if not gex.all():
            keep = np.flatnonzero(gex)
            names = names[keep]
    var_names = unique_gene_names(pd.Index(names), path)
    return ChunkSource(n_cells, var_names, pd.DataFrame(index=pd.Index(barcodes)),
                       partial(_10x_rows, n_genes, keep), path)


def open_source(source, layer: str | None = None, use_raw: bool = False) -> ChunkSource:
    """Wrap an AnnData (in memory or backed), an ``.h5ad`` path, a 10x HDF5 path (or any path
    :func:`read` accepts, read in memory) as a :class:`ChunkSource` of its ``X``, of the layer
    ``layer``, or with ``use_raw`` of its ``.raw`` (AnnData and ``.h5ad`` only; a backed one's
    layer or ``.raw`` is streamed from the file)."""
    check_flags(use_raw=use_raw)
    if isinstance(source, ChunkSource):
        if layer is not None or use_raw:
            raise DataError("a ChunkSource is already one matrix; fix: pass layer= / use_raw= where it is opened.")
        return source
    if isinstance(source, ad.AnnData):
        if source.isbacked:
            check_not_backed_view(source)
            _check_one_matrix(layer, use_raw)
            if use_raw:  # .raw may have been removed since it was opened
                _check_raw(source)
            src = _h5ad_source(Path(source.filename), layer, use_raw)
            # a backed AnnData holds obs and var in memory, where they may have been edited since it was opened
            var_names = source.raw.var_names if use_raw else source.var_names
            return replace(src, var_names=var_names.copy(), obs=source.obs.copy())
        return _memory_source(with_layer(source, layer, use_raw))
    path = Path(source)
    if not path.exists():
        raise DataError(f"file not found: {path}; fix: check the path.")
    fmt = detect_format(path)
    if (layer is not None or use_raw) and fmt != "h5ad":
        raise DataError(f"{path} is a {fmt} file, which has no layers or .raw; fix: drop "
                        f"{'the layer' if layer is not None else 'use_raw'}, or pass an .h5ad.")
    try:
        if fmt == "h5ad":
            return _h5ad_source(path, layer, use_raw)
        if fmt == "10x_h5":
            src = _10x_h5_source(path)
            if src is not None:
                return src
            log.info("%s is a Cell Ranger v2 file, which is stored genes x cells: reading it into memory", path)
        else:
            log.info("%s is a %s file, which cannot be streamed: reading it into memory", path, fmt)
    except (OSError, KeyError) as exc:
        raise DataError(f"cannot stream {path} as {fmt} ({exc}); fix: check the file is complete.") from exc
    return _memory_source(read(path, format=fmt))


def check_not_backed_view(adata: ad.AnnData) -> None:
    """Refuse a view of a backed AnnData (``adata[mask]`` of ``read_h5ad(..., backed="r")``): it is
    streamed from its file, which holds every cell and gene, not the selection."""
    if adata.isbacked and adata.is_view:
        raise DataError(f"this is a view ({adata.n_obs} cells x {adata.n_vars} genes) of the backed file "
                        f"{adata.filename}, whose cells are streamed from the file as a whole; fix: "
                        "adata[mask].to_memory() to load the selection, or write it to its own .h5ad "
                        "(adata[mask].copy(filename=...)).")


def iter_chunks(source, chunk_size: int = 10_000) -> Iterator[tuple[int, sp.csr_matrix]]:
    """Yield ``(start, X_chunk)`` over the cells of ``source``: X_chunk is CSR float32
    [<= chunk_size, n_genes] holding cells ``start .. start+len``; peak memory is one chunk
    for backed/on-disk sources (see module doc)."""
    src = open_source(source)
    yield from src.chunks(chunk_size)
