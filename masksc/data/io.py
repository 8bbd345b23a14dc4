"""Readers: one entry point, :func:`read`, auto-detecting the format of a file or folder.

Every reader returns an AnnData with ``X`` a CSR float32 matrix (cells x genes) and, where the
file holds labels, ``obs["label"]`` as a categorical of strings. Files are opened read-only.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import logging
import re
import zlib
from array import array
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from masksc.checks import check_flags
from masksc.data.validate import (blank_gene_names, check_float32_range, check_labels, check_not_empty,
                                  check_values, genes_are_empty)
from masksc.errors import DataError, warn

log = logging.getLogger(__name__)

FORMATS = ("h5ad", "10x_h5", "10x_mtx", "csv", "tsv", "scdeepcluster")
_SYNTHESISED = re.compile(r"gene_\d{4,}")
_BLOCK_ELEMENTS = 1 << 24  # entries converted at a time when densely stored matrices are made sparse


def gene_names(n: int) -> list[str]:
    """Synthesised gene names ``gene_0000`` .. for files that store none."""
    width = max(4, len(str(n - 1)))
    return [f"gene_{i:0{width}d}" for i in range(n)]


def has_synthesised_names(names) -> bool:
    """True when every name is one :func:`gene_names` makes up: such genes carry no identity, only
    a column position."""
    return all(_SYNTHESISED.fullmatch(str(g)) for g in names)


def set_labels(adata: ad.AnnData, labels) -> None:
    """Store ``labels`` (one per cell) in ``adata.obs["label"]`` as a categorical of strings.

    Whole-number floats (e.g. ``2.0`` from HDF5) become ``"2"``; missing labels (NaN, None)
    stay missing rather than becoming a type called "nan".
    """
    check_labels(labels, adata.n_obs)
    arr = np.asarray(labels)
    missing = np.asarray(pd.isna(arr), dtype=bool)
    present = arr[~missing]
    if present.dtype.kind == "f" and np.all(np.isfinite(present)) and np.all(present == np.round(present)):
        present = present.astype(np.int64)
    if present.dtype.kind == "S":
        present = present.astype(str)
    text = np.full(len(arr), None, dtype=object)
    text[~missing] = present.astype(str)
    adata.obs["label"] = pd.Categorical(text)


_10X_COMPANIONS = {"barcodes.tsv": "barcodes (cell names)", "features.tsv": "features (gene names)",
                   "genes.tsv": "genes (gene names)"}


def _refuse_10x_companion(path: Path, stem: str) -> None:
    """DataError when ``path`` (lower-case name without .gz: ``stem``) is the barcodes or features
    file beside a 10x ``[prefix]matrix.mtx[.gz]``: the matrix is what to pass, not a table of names."""
    for companion, holds in _10X_COMPANIONS.items():
        if stem.endswith(companion):
            prefix = path.name[:len(stem) - len(companion)]
            matrix = [m for m in (path.parent / f"{prefix}matrix.mtx", path.parent / f"{prefix}matrix.mtx.gz")
                      if m.exists()]
            if matrix:
                raise DataError(f"{path} is the {holds} file of a 10x matrix, not a matrix; fix: pass "
                                f"{matrix[0]}" + (f" or its folder {path.parent}" if not prefix else "")
                                + " (masksc reads the names beside it).")


def check_compression(path: Path) -> None:
    """DataError when the file ``path``'s name and content disagree on gzip: text and mtx readers
    pick the decompression by the name, so a misnamed file failed as if damaged. HDF5 files
    (.h5ad, .h5), read by content whatever their name, are refused gzip-compressed: they
    compress inside."""
    try:
        with open(path, "rb") as fh:
            packed = fh.read(2) == b"\x1f\x8b"
    except OSError:  # missing, a folder, unreadable: the reader names these
        return
    if path.stat().st_size == 0:  # named as empty by the reader
        return
    named = path.name.lower().endswith(".gz")
    stem = path.name.lower()[:-3] if named else path.name.lower()
    if stem.endswith((".h5ad", ".h5", ".hdf5", ".hdf")):
        if packed:
            plain = path.with_name(path.name[:-3]) if named else path.with_name(f"unpacked_{path.name}")
            raise DataError(f"{path} is gzip-compressed; HDF5 files (.h5ad, .h5) are read uncompressed (they "
                            f"compress inside); fix: gunzip -c {path} > {plain}, then pass {plain}.")
        return
    if packed and not named:
        raise DataError(f"{path} is gzip-compressed, but its name does not end in .gz, which is how masksc (and "
                        f"pandas, scanpy) know to decompress it; fix: rename it {path.name}.gz.")
    if named and not packed:
        raise DataError(f"{path} is named .gz but is not gzip-compressed (a download tool may have decompressed it "
                        f"and kept the name); fix: rename it {path.name[:-3]}.")


def _float16_sparse(path: Path) -> list[str]:
    """The sparse matrices (HDF5 groups holding data / indices / indptr) stored as float16 in ``path``."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and {"data", "indices", "indptr"} <= set(obj) and \
                obj["data"].dtype == np.float16:
            found.append(name)
    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


def detect_format(path: Path) -> str:
    """Return one of :data:`FORMATS` for ``path`` or raise DataError."""
    if path.is_dir():
        if any((path / n).exists() for n in ("matrix.mtx", "matrix.mtx.gz")):
            return "10x_mtx"
        prefixed = sorted(p.name for p in path.glob("*matrix.mtx*"))
        raise DataError(f"{path} is a folder without matrix.mtx[.gz]; fix: point to a 10x mtx folder "
                        "(matrix.mtx[.gz], features.tsv[.gz] or genes.tsv, barcodes.tsv[.gz]) or to a file"
                        + (f", e.g. {path / prefixed[0]} (its prefix names its features and barcodes files)."
                           if prefixed else "."))
    name = path.name.lower()
    stem = name[:-3] if name.endswith(".gz") else name
    _refuse_10x_companion(path, stem)
    check_compression(path)
    if stem.endswith(".h5ad"):
        try:
            renamed_10x = _hdf5_layout(path) == "10x_h5"
        except OSError:  # not HDF5: the reader says what is wrong with it
            renamed_10x = False
        if renamed_10x:  # a Cell Ranger file renamed: anndata would fail on its 'matrix'
            log.info("%s: named .h5ad, but it holds a 10x Cell Ranger matrix; reading it as one", path)
            return "10x_h5"
        return "h5ad"
    if stem.endswith(".csv"):
        return "csv"
    if stem.endswith((".tsv", ".txt")):
        return "tsv"
    if stem.endswith(".mtx"):
        return "10x_mtx"
    if stem.endswith((".h5", ".hdf5", ".hdf")):
        try:
            layout = _hdf5_layout(path)
            if layout is not None:
                return layout
            with h5py.File(path, "r") as f:
                keys = list(f)
        except OSError as exc:
            raise DataError(f"cannot open {path} as HDF5 ({exc}); fix: check the file is complete "
                            "and not corrupted (re-download or re-export it).") from exc
        if _LOOM_KEYS <= set(keys):
            raise DataError(_loom_refused(path))
        raise DataError(f"{path}: HDF5 file with keys {keys} matches no known layout (10x 'matrix' group, "
                        "AnnData, or scDeepCluster 'X'/'Y'); fix: convert it to .h5ad with the tool that wrote it.")
    if stem.endswith(".loom"):
        raise DataError(_loom_refused(path))
    raise DataError(f"unknown format for {path}; fix: use one of .h5ad, .h5 (10x or scDeepCluster), a 10x "
                    f"mtx folder, .csv or .tsv, or pass format= one of {FORMATS}.")


_LOOM_KEYS = {"matrix", "row_attrs", "col_attrs"}  # a loom file's HDF5 layout


def _loom_refused(path: Path) -> str:
    return (f"{path} is a loom file, which masksc does not read; fix: convert it to .h5ad, e.g. (after pip install "
            f"loompy) anndata.read_loom({str(path)!r}).write_h5ad('data.h5ad'), and pass that.")


def _hdf5_layout(path: Path) -> str | None:
    """The format an HDF5 file's layout says it is ("10x_h5", "h5ad", "scdeepcluster"), None for
    another layout; OSError when it is not HDF5. An anndata < 0.7 file is "h5ad" by its obs and var
    tables (compound datasets), which an scDeepCluster X / Y pair lacks."""
    with h5py.File(path, "r") as f:
        if "matrix" in f and isinstance(f["matrix"], h5py.Group):
            return "10x_h5"
        if f.attrs.get("encoding-type") == "anndata" or isinstance(f.get("X"), h5py.Group):
            return "h5ad"
        if all(isinstance(f.get(name), h5py.Dataset) and f[name].dtype.names for name in ("obs", "var")):
            return "h5ad"  # anndata < 0.7: obs and var tables as compound datasets (X dense)
        if isinstance(f.get("X"), h5py.Dataset):
            return "scdeepcluster"
        groups = [k for k in f if isinstance(f[k], h5py.Group)]
        if groups and all({"data", "indices", "indptr", "shape"} <= set(f[g]) for g in groups):
            return "10x_h5"  # Cell Ranger v2: one group per genome
    return None


def _check_given_format(path: Path, fmt: str) -> None:
    """Refuse a ``format=`` that an HDF5 file's layout contradicts, naming the format it holds: a
    10x or AnnData file read as another format, an scDeepCluster pair read as 10x or AnnData,
    or any HDF5 file read as a text format."""
    if path.is_dir() or not h5py.is_hdf5(path):
        return  # not HDF5 (or missing): the reader says what is wrong with it
    layout = _hdf5_layout(path)
    if layout == fmt:
        return
    with h5py.File(path, "r") as f:
        if layout is None and _LOOM_KEYS <= set(f):
            raise DataError(_loom_refused(path))
    holds = {"10x_h5": "a 10x Cell Ranger matrix", "h5ad": "an AnnData", "scdeepcluster": "an scDeepCluster "
             "X / Y pair", None: "an HDF5 layout masksc does not read"}[layout]
    fix = f"format={layout!r} (--format {layout}), or drop format=" if layout else "check the file"
    raise DataError(f"format={fmt!r} (--format), but {path} holds {holds}; fix: {fix}.")


def read(path, format: str | None = None, transpose: bool = False, backed: bool = False,
         genome: str | None = None) -> ad.AnnData:
    """Read an expression matrix into an AnnData (cells x genes, CSR float32 ``X``).

    ``format``: one of :data:`FORMATS`, auto-detected when None (suffix, then HDF5 layout).
    ``transpose``: csv/tsv files store genes x cells (rows genes, columns cells).
    ``backed``: h5ad only; open read-only without loading ``X`` (``X`` then stays in the file
    in its stored layout; stream it with :func:`masksc.data.iter_chunks`).
    ``genome``: 10x .h5 only; read that genome's genes of a file holding several (a Cell Ranger v2
    file with two genomes must name one; a v3 file is read whole without it, as Cell Ranger's
    matrix is).

    Raises DataError for a missing/unreadable file, unknown format, empty matrix, NaN/inf
    values, or labels whose length differs from the number of cells.
    """
    check_flags(transpose=transpose, backed=backed)
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}; fix: check the path (relative paths resolve from {Path.cwd()}).")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; fix: use one of {FORMATS} or format=None to auto-detect.")
    if format is not None:  # detect_format checked it otherwise
        check_compression(path)
        _check_given_format(path, fmt)
    if transpose and fmt not in ("csv", "tsv"):
        raise DataError(f"transpose=True (--transpose) applies to csv/tsv tables only, not format {fmt!r}, whose "
                        "cells x genes orientation is part of the format; fix: drop it.")
    if genome is not None and fmt != "10x_h5":
        raise DataError(f"genome={genome!r} (--genome) picks a genome of a 10x .h5 file, not of format {fmt!r}; "
                        "fix: drop it.")
    if backed and fmt != "h5ad":
        raise DataError(f"backed=True needs an .h5ad file, got format {fmt!r}; fix: read it in memory, "
                        "stream it with masksc.data.iter_chunks (10x .h5 works), or convert it to .h5ad.")
    reader = {"h5ad": _read_h5ad, "10x_h5": _read_10x_h5, "10x_mtx": _read_10x_mtx, "csv": _read_table,
              "tsv": _read_table, "scdeepcluster": _read_scdeepcluster}[fmt]
    where = f" in {path.name}"
    try:
        adata = reader(path, fmt=fmt, transpose=transpose, backed=backed, where=where, genome=genome)
    except DataError:
        raise
    except UnicodeDecodeError as exc:  # names in an encoding the reader does not take: the file itself is whole
        raise DataError(f"cannot read {path} as {fmt}: its names are not text the reader decodes ({exc}); fix: write "
                        "the file again with UTF-8 (for a Cell Ranger v2 .h5, ASCII) names, or read it yourself "
                        "and pass the AnnData.") from exc
    except (OSError, EOFError, zlib.error, KeyError, ValueError, TypeError, AttributeError, RuntimeError,
            pd.errors.ParserError) as exc:  # what a damaged or misnamed file raises
        half = _float16_sparse(path) if isinstance(exc, ValueError) and fmt == "h5ad" else []
        if half:  # scipy.sparse holds no float16
            rewrite = "; ".join(f"d = f['{g}/data'][()]; del f['{g}/data']; f['{g}/data'] = d.astype('float32')"
                                for g in half)
            raise DataError(f"cannot read {path}: its sparse matrices {half} are stored as float16, which scipy.sparse "
                            "(so anndata too) cannot hold; fix: store them as float32, e.g. on a copy with h5py: "
                            f"with h5py.File(path, 'r+') as f: {rewrite}.") from exc
        raise DataError(f"cannot read {path} as {fmt} ({type(exc).__name__}: {exc}); fix: check the file "
                        "is complete and in that format, or pass the right format=.") from exc
    if not backed:
        check_not_empty(adata.X)
        if adata.raw is None:  # beside .raw, X is often scaled (negative): fit / embed check what they read
            check_values(adata.X, require_integer=False, where=where)
    return adata


def as_float32(a, where: str = "") -> np.ndarray:
    """``a`` as a float32 ndarray (``a`` itself when it is one). A DataError instead when a finite
    value is too large for float32, which the cast would make infinite (``where`` is appended to
    the message, e.g. " in cells 0..999")."""
    a = np.asarray(a)
    check_float32_range(a, where)
    return a.astype(np.float32, copy=False)


_CORRUPT_FIX = "fix: write the matrix again from its source (a file may be cut short or written by a faulty exporter)."


def check_compressed(data, indices, indptr, shape: tuple[int, int], rows: bool = True, where: str = "") -> None:
    """Raise DataError unless ``data``, ``indices`` and ``indptr`` (arrays) form a valid CSR matrix of
    ``shape`` (``rows=False``: CSC, ``indptr`` over columns): one pointer per row plus one,
    starting at 0 and never decreasing, as many values as indices, the last pointer within them,
    every index inside the matrix. scipy's conversions assume all of it and read out of bounds,
    or crash the process, on a matrix that breaks it."""
    n_major, n_minor = shape if rows else shape[::-1]
    axis, other = ("rows (cells)", "genes") if rows else ("columns (genes)", "cells")
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    problem = None
    if indptr.ndim != 1 or indices.ndim != 1 or np.ndim(data) != 1:
        problem = "its data, indices and indptr arrays are not all 1-D"
    elif indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        problem = f"its indptr / indices are of dtype {indptr.dtype} / {indices.dtype}, not integers"
    elif len(indptr) != n_major + 1:
        problem = f"it has {len(indptr)} pointers (indptr) for {n_major} {axis}, not {n_major + 1}"
    elif len(data) != len(indices):
        problem = f"it stores {len(data)} values but {len(indices)} indices"
    elif indptr[0] != 0 or indptr[-1] > len(indices):
        problem = f"its pointers (indptr) run from {indptr[0]} to {indptr[-1]}, not from 0 to at most {len(indices)}"
    elif n_major and np.diff(indptr).min() < 0:
        problem = "its pointers (indptr) decrease"
    elif len(indices) and (indices.min() < 0 or indices.max() >= n_minor):
        problem = (f"it holds {other[:-1]} indices from {indices.min()} to {indices.max()}, outside 0..{n_minor - 1} "
                   f"for its {n_minor} {other}")
    if problem is not None:
        raise DataError(f"X is a corrupt sparse matrix{where}: {problem}; {_CORRUPT_FIX}")


def check_sparse_structure(X, where: str = "") -> None:
    """:func:`check_compressed` for a scipy CSR or CSC matrix, the same bounds for COO (other
    formats keep their entries in Python structures that cannot disagree)."""
    if X.format in ("csr", "csc"):
        check_compressed(X.data, X.indices, X.indptr, X.shape, rows=X.format == "csr", where=where)
    elif X.format == "coo":
        row, col = np.asarray(X.row), np.asarray(X.col)
        if not len(row) == len(col) == len(X.data):
            raise DataError(f"X is a corrupt sparse matrix{where}: {len(X.data)} values, {len(row)} rows and "
                            f"{len(col)} columns; {_CORRUPT_FIX}")
        if len(row) and (min(row.min(), col.min()) < 0 or row.max() >= X.shape[0] or col.max() >= X.shape[1]):
            raise DataError(f"X is a corrupt sparse matrix{where}: an entry lies outside its {X.shape[0]} x "
                            f"{X.shape[1]} shape; {_CORRUPT_FIX}")


def to_csr32(X, copy: bool = True, where: str = "") -> sp.csr_matrix:
    """``X`` as CSR float32 in canonical form: one entry per (cell, gene), the values a matrix
    stores more than once for the same position summed (scipy's meaning of such a matrix, which
    per-entry arithmetic would otherwise get wrong), sorted indices, no explicit zeros. With ``copy`` (default)
    the result is a new matrix and the input is never modified; ``copy=False`` is for matrices
    the caller owns (it may tidy them in place instead of copying). A DataError names values too
    large for float32 (``where`` as in :func:`as_float32`), and a sparse matrix whose structure is
    corrupt (:func:`check_sparse_structure`)."""
    if not sp.issparse(X):
        X = np.asarray(X)
        if X.dtype.kind not in "biuf":
            raise DataError(f"X has dtype {X.dtype}, not numbers; fix: convert the expression values to numbers.")
        X = sp.csr_matrix(as_float32(X, where))  # scipy has no float16 matrices
    else:
        check_sparse_structure(X, where)
    return canonical_csr32(X, copy, where)


def canonical_csr32(X, copy: bool = True, where: str = "") -> sp.csr_matrix:
    """:func:`to_csr32` of a scipy sparse matrix whose structure is already checked (a block whose
    arrays :func:`check_compressed` passed), without checking it again."""
    X = X.tocsr(copy=False)
    check_float32_range(X, where)
    X = X.astype(np.float32, copy=copy)
    if X.indices.dtype != X.indptr.dtype:  # e.g. int32 indices + int64 indptr from h5ad files
        X = sp.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape)  # scipy unifies (int32 when it fits)
    X.sum_duplicates()  # also sorts the indices
    X.eliminate_zeros()
    return X


def _dense_rows_to_csr(ds, where: str) -> sp.csr_matrix:
    """Convert a dense (in-file or in-memory) 2-D array to CSR float32 block-wise, never holding it
    whole (``where``: as in :func:`as_float32`)."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, ds.shape[1]))
    chunk_rows = (getattr(ds, "chunks", None) or (0,))[0]
    if chunk_rows:  # HDF5 decompresses whole chunks: read whole chunk rows at a time
        rows = -(-rows // chunk_rows) * chunk_rows
    blocks = [sp.csr_matrix(as_float32(ds[i:i + rows], where)) for i in range(0, ds.shape[0], rows)]
    if not blocks:
        return sp.csr_matrix(ds.shape, dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def _finish(adata: ad.AnnData, where: str) -> ad.AnnData:
    if adata.X is None and len(adata.layers):
        layers = list(adata.layers)
        raise DataError(f"the file has no X matrix, only the layers {layers}; fix: read a layer with --layer "
                        f"{layers[0]} (masksc fit / embed stream it), or in Python adata = anndata.read_h5ad(path) "
                        f"then tl.fit(adata, layer={layers[0]!r}).")
    if adata.X is None:
        raise DataError("the file has no X matrix (a `masksc embed` output holds only obs and the embedding: "
                        "open it with anndata.read_h5ad); fix: pass the file that holds the expression counts.")
    adata.X = to_csr32(adata.X, copy=False, where=where)  # freshly read: ours to tidy in place
    if "label" in adata.obs:
        set_labels(adata, adata.obs["label"].to_numpy())
    return adata


def _read_h5ad(path, where, backed=False, **_):
    if backed:
        adata = ad.read_h5ad(path, backed="r")  # obs is in memory: its labels are tidied as when read whole
        if "label" in adata.obs:
            set_labels(adata, adata.obs["label"].to_numpy())
        return adata
    return _finish(ad.read_h5ad(path), where)


def _decode(a) -> np.ndarray:
    """Names stored in HDF5 as text: UTF-8 bytes, as Cell Ranger writes them; a name that is not
    UTF-8 is read as Latin-1 (which any bytes are), with a warning naming it."""
    a = np.asarray(a)
    if a.dtype.kind not in "SO":
        return a
    if a.dtype.kind == "S":
        try:  # ASCII, the usual case, in one numpy cast (4x faster than the loop below)
            return a.astype(str)
        except UnicodeDecodeError:
            pass
    latin = []

    def text(v) -> str:
        if not isinstance(v, bytes):
            return str(v)
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            latin.append(v.decode("latin-1"))
            return latin[-1]

    out = np.array([text(v) for v in a.ravel()], dtype=str)
    if latin:
        warn(f"{len(latin)} names are not UTF-8 text, read as Latin-1 (e.g. {latin[0]!r}); if they read wrong, "
             "write the file again with UTF-8 names")
    return out


def _read_10x_h5(path, where, genome=None, **_):
    """Cell Ranger HDF5. v3: group ``matrix`` holding a CSC genes x cells matrix, i.e. a CSR
    cells x genes matrix (indptr over cells), plus ``features``/``barcodes`` (``genome``: keep the
    features of that genome); its "Gene Expression" features are kept (see
    :func:`_gene_expression`), with ``var`` columns ``gene_ids``, ``feature_types`` and
    ``genome`` as scanpy's; v2 (one group per genome, which ``genome`` picks; needed when
    there are several) goes through scanpy's reader."""
    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            genomes = [name for name in f if isinstance(f[name], h5py.Group)]
            _check_genome(path, genome, genomes, needed=len(genomes) > 1)
            import scanpy as sc
            return _finish(_unique_genes(sc.read_10x_h5(path, genome=genome), path), where)
        m = f["matrix"]
        n_genes, n_cells = (int(v) for v in m["shape"][()])
        data, indices, indptr = as_float32(m["data"][()], where), m["indices"][()], m["indptr"][()]
        # before any scipy operation: slicing out features on a corrupt matrix crashed the process
        check_compressed(data, indices, indptr, (n_cells, n_genes), where=where)
        X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
        feats = m["features"]
        names = _decode(feats["name"][()]) if "name" in feats else _decode(feats["id"][()])
        var = pd.DataFrame(index=pd.Index(names, name=None))
        if "id" in feats:
            var["gene_ids"] = _decode(feats["id"][()])
        ftype = _decode(feats["feature_type"][()]) if "feature_type" in feats else None
        genomes = _decode(feats["genome"][()]) if "genome" in feats else None
        obs = pd.DataFrame(index=pd.Index(_decode(m["barcodes"][()])))
    keep = np.ones(len(names), dtype=bool)
    if genome is not None:
        held = [] if genomes is None else [g for g in dict.fromkeys(genomes.tolist()) if g]  # antibodies: ""
        _check_genome(path, genome, held, needed=False)
        keep &= genomes == genome
    if ftype is not None:
        var["feature_types"] = ftype
        keep &= _gene_expression(ftype, path)
    if genomes is not None:
        var["genome"] = genomes
    adata = ad.AnnData(X=X, obs=obs, var=var)
    return _finish(_unique_genes(adata if keep.all() else adata[:, keep].copy(), path), where)


def _gene_expression(feature_types: np.ndarray, path) -> np.ndarray:
    """Which features of a 10x file to keep (bool [features]): its "Gene Expression" ones, as
    scanpy's ``gex_only``; every feature, with a warning, when it holds none of them (scanpy
    would return no genes)."""
    gex = np.asarray(feature_types) == "Gene Expression"
    if not gex.any():
        kinds = sorted(set(np.asarray(feature_types).tolist()))
        warn(f"{path} holds no 'Gene Expression' features (only {kinds}); reading all {gex.size} of them, though "
             "masksc models gene expression")
        return np.ones(gex.size, dtype=bool)
    if not gex.all():
        log.info("%s: keeping %d 'Gene Expression' features of %d", path, gex.sum(), gex.size)
    return gex


def _check_genome(path, genome: str | None, genomes: list[str], needed: bool) -> None:
    """Refuse a ``genome`` the 10x file ``path`` does not hold (``genomes``), or none where the
    file's several genomes (``needed``) leave the genes to read undecided."""
    if genome is None and needed:
        raise DataError(f"{path} holds {len(genomes)} genomes {genomes} (a Cell Ranger v2 file of a mixed-species "
                        f"sample); fix: read one, e.g. masksc.read(path, genome={genomes[0]!r}) (--genome "
                        f"{genomes[0]} on the command line).")
    if genome is not None and genome not in genomes:
        held = f"holds the genomes {genomes}" if genomes else "records no genome"
        raise DataError(f"genome={genome!r} (--genome): {path} {held}; fix: "
                        + ("pass one of them." if genomes else "drop genome."))


def unique_gene_names(names: pd.Index, path) -> pd.Index:
    """A file's gene ``names`` with duplicates (10x symbols often repeat) made unique as scanpy does
    (``G``, ``G-1``, ..), with a warning; an AnnData the user built is refused instead (see
    :func:`masksc.data.validate.check_unique_genes`), since it is theirs to rename. Empty names
    are refused, naming the file: made unique they would be "", "-1", .., matching another file's
    empty names whatever genes those are."""
    blank = blank_gene_names(names)
    if blank.size:
        raise DataError(f"{path}: {genes_are_empty(blank)}; fix: fill them in the file's gene list (e.g. with "
                        "their gene IDs), or read it with scanpy (sc.read_10x_h5 / sc.read_10x_mtx / sc.read_csv), "
                        "name or remove them, and write an .h5ad.")
    dups = names[names.duplicated()].unique()
    if not len(dups):
        return names
    log.warning("%s: %d duplicated gene names made unique as scanpy's var_names_make_unique does (e.g. %s)",
                path, len(dups), list(dups[:3]))
    return ad.utils.make_index_unique(names)


def _unique_genes(adata: ad.AnnData, path) -> ad.AnnData:
    """``adata`` read from ``path`` with its gene names made unique (:func:`unique_gene_names`)."""
    adata.var_names = unique_gene_names(adata.var_names, path)
    return adata


def _open_text(p: Path, encoding: str | None = None, newline: str | None = None):
    return (gzip.open(p, "rt", encoding=encoding, newline=newline) if p.suffix.lower() == ".gz" else
            open(p, encoding=encoding, newline=newline))


def _read_part(part: Path, read):
    """``read(part)`` for one file of a 10x mtx folder; a DataError naming that file when it is
    empty or damaged (the folder alone would leave the user to guess which of three)."""
    check_compression(part)
    try:
        return read(part)
    except pd.errors.EmptyDataError:
        raise DataError(f"{part} is empty; fix: copy it again from the 10x output folder.") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{part} is not UTF-8 text ({exc}); fix: save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 "
                        "FILE > NEW, gzip-compressed again if it was).") from exc
    except (OSError, EOFError, zlib.error, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {part} ({type(exc).__name__}: {exc}); fix: check the file is complete (copy "
                        "or download it again).") from exc


def _first(folder: Path, names) -> Path:
    for n in names:
        if (folder / n).exists():
            return folder / n
    raise DataError(f"{folder} lacks {' or '.join(names)}; fix: a 10x mtx folder needs matrix.mtx[.gz], "
                    "features.tsv[.gz] (or genes.tsv[.gz]) and barcodes.tsv[.gz]; files named with a common "
                    "prefix (GEO's GSM..._matrix.mtx.gz) are read by passing the path of the matrix file.")


def _read_10x_mtx(path, where, **_):
    """10x mtx folder: the Matrix Market file is genes x cells; features/genes.tsv columns are
    id, name[, type]; var_names are the names (made unique), ids in ``var["gene_ids"]``, types in
    ``var["feature_types"]``, of which "Gene Expression" is kept (see :func:`_gene_expression`).
    A path to the matrix file reads that file, its name ``PREFIXmatrix.mtx[.gz]`` naming its
    siblings ``PREFIXfeatures.tsv[.gz]`` (or ``genes.tsv``) and ``PREFIXbarcodes.tsv[.gz]``."""
    folder = path if path.is_dir() else path.parent
    # GEO names a sample's three files with a common prefix (GSM123_sample_matrix.mtx.gz, ...): a path to
    # such a matrix file names the prefix of its two siblings
    named = None if path.is_dir() else re.fullmatch(r"(.*)matrix\.mtx(?:\.gz)?", path.name, flags=re.IGNORECASE)
    if not path.is_dir() and named is None:
        raise DataError(f"{path}: a 10x matrix file's name ends in matrix.mtx[.gz], which names its features and "
                        "barcodes files (PREFIXmatrix.mtx.gz beside PREFIXfeatures.tsv.gz and PREFIXbarcodes.tsv.gz); "
                        "fix: rename the three files so, or read the matrix with scipy.io.mmread and build the "
                        "AnnData yourself.")
    prefix = named.group(1) if named else ""
    mtx = path if named else _first(folder, ["matrix.mtx.gz", "matrix.mtx"])
    feats = _first(folder, [f"{prefix}{n}" for n in ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")])
    barcodes = _first(folder, [f"{prefix}barcodes.tsv.gz", f"{prefix}barcodes.tsv"])
    X = sp.csr_matrix(_read_part(mtx, lambda p: scipy.io.mmread(str(p)))).T.tocsr()  # mmread opens .gz itself

    def names_table(part: Path) -> pd.DataFrame:
        with _open_text(part) as fh:  # names as written: a gene called "NA" is not a missing value
            return pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False)

    ftab = _read_part(feats, names_table)
    bc = _read_part(barcodes, names_table)[0].to_numpy()
    if X.shape == (len(ftab), len(bc)) and len(bc) != len(ftab):  # written cells x genes, not 10x's genes x cells
        log.info("%s: the matrix is stored cells x genes (10x writes genes x cells); reading it as stored", mtx)
        X = X.T.tocsr()
    if X.shape != (len(bc), len(ftab)):
        extra = [f"{name} has one line more than the matrix has {what} (a header line? fix: remove it)"
                 for name, rows, n, what in ((barcodes.name, len(bc), X.shape[0], "cells"),
                                             (feats.name, len(ftab), X.shape[1], "genes")) if rows == n + 1]
        raise DataError(f"{folder}: matrix is {X.shape[1]} genes x {X.shape[0]} cells but there are "
                        f"{len(ftab)} features and {len(bc)} barcodes; "
                        + ("; ".join(extra) + "." if extra else "fix: the three files must come from the same 10x "
                           "output folder."))
    names = ftab[1] if ftab.shape[1] > 1 else ftab[0]
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(bc)),
                       var=pd.DataFrame({"gene_ids": ftab[0].to_numpy()}, index=pd.Index(names.to_numpy())))
    if ftab.shape[1] > 2:
        adata.var["feature_types"] = ftab[2].to_numpy()
        keep = _gene_expression(ftab[2].to_numpy(), folder)
        if not keep.all():
            adata = adata[:, keep].copy()
    return _finish(_unique_genes(adata, folder), where)


def _read_table(path, where, fmt="csv", transpose=False, **_):
    """csv/tsv: header row of gene names, first column of cell names (transpose: genes x cells).
    The header may name the first column or not (R's write.table leaves it out). Names are kept
    as written: "001" stays "001", a gene called "NA" stays "NA" (pandas would parse either)."""
    sep = "," if fmt == "csv" else "\t"

    @contextlib.contextmanager
    def past_header():  # pandas' skiprows does not count empty lines ended by a bare CR, as Python's lines do
        with _open_text(Path(path), encoding="utf-8-sig", newline="") as fh:  # a CR inside quotes kept
            for _ in range(header_end):
                fh.readline()
            yield fh

    header, header_end = _header_row(path, sep)
    if header is None:
        raise DataError(f"{path} is empty; fix: check the path, or write the table again.")
    _refuse_comment_lines(Path(path), sep)
    marks = {",": "comma", "\t": "tab", ";": "semicolon", " ": "space"}
    seen = [mark for mark in marks if mark != sep and mark in header[0].strip()]
    if len(header) == 1 and seen:  # one column of one gene is a table too; one holding another separator is not
        fix = {",": "format='csv' (--format csv)", "\t": "format='tsv' (--format tsv)"}.get(
            seen[0], f"write the table again with a {marks[sep]} between values, e.g. pandas.read_csv(path, "
                     f"sep={seen[0]!r}, index_col=0).to_csv(new_path, sep={sep!r})")
        raise DataError(f"{path}: its first line holds one column: no {marks[sep]} separates its values (a "
                        f"{marks[seen[0]]} does); fix: {fix}.")
    try:
        with past_header() as fh:
            body = pd.read_csv(fh, sep=sep, header=None)
    except pd.errors.EmptyDataError:  # a header and no rows
        raise DataError(f"{path} holds a header row and no rows of values: 0 {'genes' if transpose else 'cells'}; "
                        "fix: check the path, or write the table again with its rows.") from None
    except pd.errors.ParserError:  # a line longer than the first: named, with its number
        _check_line_lengths(path, sep, header_end, len(header), not str(header[-1]).strip())
        raise
    # pandas pads a short line with NaN, and reads blank fields as text: only then is the file read again line
    # by line, to name the fault
    if body.isna().to_numpy().any() or not all(map(pd.api.types.is_numeric_dtype, body.dtypes.iloc[1:])):
        _check_line_lengths(path, sep, header_end, len(header), not str(header[-1]).strip())
    first = body.iloc[:, 0]
    # a numeric first column under a gene's name is the first gene's counts: the table was written
    # without cell names (pandas' index=False, R's row.names=FALSE), unless it holds names
    unnamed = len(header) == body.shape[1] and header[0] != "" and pd.api.types.is_numeric_dtype(first) and (
        body.shape[1] == 1 or not _holds_names(path, header[0], first, transpose))
    if unnamed:  # a blank first header cell (pandas, R's write.csv) always marks a name column
        rows, values = ("gene", "cell") if transpose else ("cell", "gene")
        log.info("%s: its first column holds numbers, not %s names (header %r): read as the first %s, the %ss named "
                 "0..%d", path, rows, header[0], values, rows, len(body) - 1)
    n_values = max(body.shape[1] - (0 if unnamed else 1), 0)
    check_not_empty(np.broadcast_to(np.float32(0), (len(body), n_values)))  # shape only
    if len(header) not in (n_values, n_values + 1):
        hashed = " If the first line is a comment ('#'), delete it: comments are not skipped." if \
            str(header[0]).lstrip().startswith("#") else ""
        raise DataError(f"{path}: the header names {len(header)} columns but the rows hold a name and {n_values} "
                        "values; fix: write one header name per value column (a first name for the cell column "
                        f"is optional).{hashed}")
    df = body if unnamed else body.iloc[:, 1:]
    if unnamed:
        df.index = pd.Index([str(i) for i in range(len(body))])
    else:
        with past_header() as fh:
            df.index = pd.read_csv(fh, sep=sep, header=None, dtype=str, keep_default_na=False,
                                   usecols=[0]).iloc[:, 0].to_numpy()
    df.columns = header[len(header) - n_values:]
    if transpose:
        df = df.T
    elif _GENE_TITLE.fullmatch(str(header[0]).strip()) and not unnamed:
        raise DataError(f"{path}: its first column is titled {header[0]!r}, so its rows are genes and its columns "
                        "cells; fix: transpose=True (--transpose) to read it genes x cells.")
    elif _mostly_matching(_BARCODE, df.columns):
        raise DataError(f"{path}: its header row looks like cell barcodes (e.g. {df.columns[0]!r}), so its rows are "
                        "genes and its columns cells; fix: transpose=True (--transpose) to read it genes x cells.")
    elif _mostly_matching(_ENSEMBL_GENE, df.index):
        raise DataError(f"{path}: its first column looks like Ensembl gene IDs (e.g. {df.index[0]!r}), so its rows "
                        "are genes and its columns cells; fix: transpose=True (--transpose) to read it genes x cells.")
    non_numeric = [c for c, t in zip(df.columns, df.dtypes) if not pd.api.types.is_numeric_dtype(t)]
    if non_numeric:
        raise DataError(f"{path}: columns {non_numeric[:5]} are not numeric; fix: the file must be cells x "
                        "genes with a header row of gene names and a first column of cell names "
                        "(transpose=True if rows are genes); remove annotation columns.")
    values = df.to_numpy()  # whole numbers: a view of pandas' int64 block, no float64 copy
    if values.dtype == object:  # numbers of several kinds (int and bool)
        values = df.to_numpy(dtype=np.float64)
    adata = ad.AnnData(X=_dense_rows_to_csr(values, where),
                       obs=pd.DataFrame(index=df.index.astype(str)),
                       var=pd.DataFrame(index=df.columns.astype(str)))
    return _finish(_unique_genes(adata, path), where)


# the title of a genes x cells table's name column: gene, gene_id, Gene Symbol, feature_name, ...
_GENE_TITLE = re.compile(r"(?i)(genes?|features?)([ _.]?(ids?|names?|symbols?))?")
# a name column's title: cell_id, index, barcode, gene_id, ..., R's "X" (read.csv's name for a blank one),
# pandas' "Unnamed: 0"
_ID_TITLE = re.compile(r"(?i)(cells?|obs|rows?|samples?|barcodes?|genes?|features?)?[ _.]?"
                       r"(ids?|idx|index|names?|barcodes?|symbols?)?|x|unnamed: ?\d+")


def _holds_names(path, title: str, column: pd.Series, transpose: bool) -> bool:
    """Whether a table's numeric first column, headed ``title``, holds the rows' names (cell IDs;
    gene IDs when ``transpose``) rather than the first column of values: under a name column's
    title (``cell_id``, ``index``, ``X``, ...; repeated IDs too, two samples' cells numbered
    alike), or numbering three or more rows 0.. or 1.. in order (not under a cell barcode, when
    ``transpose``). Distinct whole numbers under any other title are read as values, with a
    warning."""
    values = column.to_numpy(dtype=np.float64)
    n = len(values)
    value, names, title_for = ("cell", "gene IDs", "gene_id") if transpose else ("gene", "cell IDs", "cell_id")
    if _ID_TITLE.fullmatch(title.strip()):
        return True
    if transpose and _BARCODE.fullmatch(title.strip()):  # a cell: its column holds that cell's counts
        return False
    if n >= 3 and (np.array_equal(values, np.arange(n)) or np.array_equal(values, np.arange(1, n + 1))):
        return True
    if n >= 3 and column.is_unique and np.all(np.mod(values, 1) == 0):
        warn(f"{path}: its first column {title!r} holds distinct whole numbers, read as the first {value}'s counts; "
             f"if they are {names}, title that column {title_for}")
    return False


def _refuse_comment_lines(path: Path, sep: str) -> None:
    """DataError naming comment lines ("# exported by ...") above a table's header, which the
    reader would take for the header. A first line starting with '#' is taken for a comment when
    another '#' line follows it, or when it holds one field or '#' and a space and the line after
    it holds another number of fields: '#cell,g1,g2' or '#,g1,g2' over rows of as many fields is a
    header, and its table's other faults keep their own messages."""
    comments, after = [], None
    try:
        with _open_text(path, encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, 1):
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue  # blank lines before the header are skipped
                if not text.lstrip().startswith("#"):
                    after = text
                    break
                comments.append((number, text))
    except (OSError, EOFError, UnicodeDecodeError, zlib.error):  # the reader names what is wrong with the file
        return
    if not comments:
        return
    (number, first), fields = comments[0], len(comments[0][1].split(sep))
    if len(comments) == 1 and (fields > 1 and not first.lstrip().startswith("# ") or
                               after is not None and fields == len(after.split(sep))):
        return  # '#cell,g1,g2': a header (alone, a header without rows, which the reader names)
    shown = repr(first[:60] + ("..." if len(first) > 60 else ""))
    what = (f"line {number} ({shown}) is a comment ('#'), which is not skipped: it" if len(comments) == 1 else
            f"lines {number}-{comments[-1][0]} ({shown}, ...) are comments ('#'), which are not skipped: the first")
    cmd = f"zcat {path.name} | grep -v '^#' > new{''.join(path.suffixes[-2:-1])}" if path.suffix.lower() == ".gz" \
        else f"grep -v '^#' {path.name} > new{path.suffix}"
    raise DataError(f"{path}: {what} would be read as the header; fix: delete the comment lines above the header row, "
                    f"e.g. {cmd}.")


def _header_row(path, sep: str) -> tuple[np.ndarray | None, int]:
    """(the table's header row, names as written, or None for a file of blank lines; the line it
    ends on: blank lines before it are skipped, as pandas skips them). Read with the csv module,
    in a fraction of pandas' time on wide tables (one Series a column); a row the csv module
    refuses (a quote never closed or followed by text; a field past its limit: a wide header read
    with the wrong separator) is read by pandas, as before."""
    blank = 0
    try:
        with _open_text(Path(path), encoding="utf-8-sig", newline="") as fh:  # a CR inside quotes kept
            rows = csv.reader(fh, delimiter=sep, strict=True)  # strict: a quote never closed is a csv.Error
            for fields in rows:
                if len(fields) > 1 or fields and fields[0].strip():
                    return np.array(fields, dtype=object), rows.line_num
                blank += 1
            return None, 0
    except csv.Error:
        pass
    try:  # the rows start after its last line: a quoted name may hold line breaks
        row = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].to_numpy()
        return row, blank + 1 + sum(len(re.findall(r"\r\n|\r|\n", str(name))) for name in row)
    except pd.errors.EmptyDataError:
        return None, 0


def _check_line_lengths(path: Path, sep: str, header_end: int, header_fields: int, header_ends_empty: bool) -> None:
    """Raise DataError when the table's rows (after the header, which ends on line ``header_end``)
    do not all hold the same number of fields: a last line short of them is a file cut short (an
    interrupted download or copy), which pandas would pad with NaN, not missing values to be
    cleaned; any other odd line is named with its number. Empty fields (``1,,2`` or a trailing
    ``,``) still count as fields. Also named: rows of separators alone (a spreadsheet's empty
    rows) and a separator ending every line (every row's last field empty, under an empty last
    header field or one field past the header's: a last column the header names, empty
    throughout, is a gene of missing values)."""
    # the fields and the line it ends on of each row with values: 8 bytes a row (a million-row table: 8 MB)
    lengths, numbers = array("i"), array("l")
    ends_empty, blank = True, None
    with _open_text(Path(path)) as fh:
        rows = csv.reader(fh, delimiter=sep)
        for _ in rows:  # up to the header's end
            if rows.line_num >= header_end:
                break
        for fields in rows:
            if any(field.strip() for field in fields):
                lengths.append(len(fields))
                numbers.append(rows.line_num)  # a name holding a line break spans lines: counted as they are
                ends_empty = ends_empty and not fields[-1].strip()
            elif len(fields) > 1 and blank is None:
                blank = rows.line_num
    if blank is not None:  # pandas reads it as a cell of NaN (an empty line it skips)
        raise DataError(f"{path}: line {blank} holds separators and no values (a spreadsheet's empty row); fix: "
                        "delete such lines and read it again.")
    lengths, numbers = np.array(lengths, dtype=np.int32), np.array(numbers, dtype=np.int64)
    if not lengths.size:
        return
    if ends_empty and lengths.min() > 1 and (header_ends_empty or lengths.min() == header_fields + 1):
        raise DataError(f"{path}: every row ends in an empty field (a separator {sep!r} at the end of each line); "
                        "fix: remove the trailing separators and read it again.")
    values, tally = np.unique(lengths, return_counts=True)
    # rows hold as many fields as the header, or one more (a name column it leaves untitled): on a tie, those,
    # and the longer (a line cut short is likelier than a stray separator)
    usual = int(min(values[tally == tally.max()], key=lambda n: (n not in (header_fields, header_fields + 1), -n)))
    odd = np.flatnonzero(lengths != usual)
    if odd.tolist() == [lengths.size - 1] and lengths[-1] < usual:
        raise DataError(f"{path}: its last line holds {lengths[-1]} of the {usual} fields of the lines before it: "
                        "the file looks cut short (an interrupted download or copy); fix: copy or write it again "
                        "whole.")
    if odd.size:
        number, n = numbers[odd[0]], lengths[odd[0]]
        raise DataError(f"{path}: line {number} holds {n} fields where the other rows hold {usual}"
                        f"{f' ({odd.size} lines differ)' if odd.size > 1 else ''}; fix: correct that line (a "
                        f"{'missing' if n < usual else 'stray'} separator or value?) and read it again.")


# 10x's AAACCTGAGAAACCAT-1, optionally prefixed by a sample, with R make.names' ".1" or a "_1" suffix
_BARCODE = re.compile(r"(?:.*[_:.-])?[ACGTN]{8,}(?:[-._]\d+)?")
_ENSEMBL_GENE = re.compile(r"ENS[A-Z]*G\d{11}(?:\.\d+)?")  # ENSG00000141510, ENSMUSG..., with a version


def _mostly_matching(pattern: re.Pattern, names) -> bool:
    """Whether most of ``names`` (the first 200) match ``pattern`` whole."""
    sample = [str(n) for n in list(names)[:200]]
    return len(sample) > 0 and sum(bool(pattern.fullmatch(n)) for n in sample) > len(sample) / 2


def _read_scdeepcluster(path, where, **_):
    """scDeepCluster HDF5: dataset ``X`` dense counts cells x genes, optional ``Y`` labels;
    no gene names are stored, so they are synthesised (``gene_0000`` ..)."""
    with h5py.File(path, "r") as f:
        ds = f["X"]  # a dataset: format= of another layout is refused before (_check_given_format)
        if ds.ndim != 2:
            raise DataError(f"{path}: dataset X has shape {ds.shape}, expected cells x genes; "
                            "fix: store a 2-D matrix.")
        X = _dense_rows_to_csr(ds, where)
        labels = f["Y"][()] if "Y" in f else None
    n_cells, n_genes = X.shape
    width = max(4, len(str(n_cells - 1)))
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"cell_{i:0{width}d}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=gene_names(n_genes)))
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if len(labels) != n_cells:  # set_labels' message is for labels a user passes
            stored = ("X looks stored genes x cells; fix: write it cells x genes (with h5py: X = f['X'][()]; "
                      "del f['X']; f['X'] = X.T, on a copy)" if len(labels) == n_genes else
                      "fix: store one label per row (cell) of X")
            raise DataError(f"{path}: Y holds {len(labels)} labels, but X has {n_cells} rows (cells) and {n_genes} "
                            f"columns (genes); {stored}.")
        set_labels(adata, labels)
    return _finish(adata, where)
