"""Checks on expression matrices; each failure is a DataError naming the problem and the fix.

Nothing here modifies its input.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from masksc.checks import check_flags, is_integer
from masksc.errors import DataError

FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4e38: masksc computes in float32


def _values(X) -> np.ndarray:
    """The stored values of ``X`` (sparse: the non-zeros; dense: every entry), flat, no copy."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def no_x_matrix(adata) -> DataError:
    """The error for an AnnData without ``X``: naming its layers, and ``layer=``, when it has some."""
    layers = list(getattr(adata, "layers", None) or [])
    if layers:
        return DataError(f"the AnnData has no X matrix, only the layers {layers}; fix: pass layer={layers[0]!r} "
                         "(masksc.tl.fit / embed take it), or set adata.X to the counts matrix (cells x genes).")
    return DataError("the AnnData has no X matrix; fix: set adata.X to the counts matrix (cells x genes).")


def _as_matrix(adata_or_X):
    X = getattr(adata_or_X, "X", adata_or_X)
    if X is None:
        raise no_x_matrix(adata_or_X)
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        try:
            X = np.asarray(X)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is the same user error
            raise DataError(f"X of type {type(X).__name__} is not a matrix; fix: pass a numpy array, "
                            "a scipy sparse matrix or an AnnData.") from exc
    return X


def check_not_empty(X) -> None:
    """Raise DataError if ``X`` has no cells, no genes, or is not 2-D."""
    if X.ndim != 2:
        raise DataError(f"expected a 2-D cells x genes matrix, got {X.ndim} dimensions; "
                        "fix: reshape to (n_cells, n_genes).")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"empty matrix: {X.shape[0]} cells x {X.shape[1]} genes; "
                        "fix: check the file or the filters applied before (every cell or gene was removed?).")


def _wider_than_float32(dtype: np.dtype) -> bool:
    """Whether ``dtype`` holds finite values float32 cannot (float64, longdouble; every integer fits)."""
    return dtype.kind == "f" and dtype.itemsize > 4


def _may_exceed_float32(values: np.ndarray) -> bool:
    """Whether ``values`` (an array) may hold a magnitude above :data:`FLOAT32_MAX` (inf counts), found
    from its largest and smallest value alone: no temporary array the size of ``values``."""
    if not _wider_than_float32(values.dtype) or values.size == 0:
        return False
    # fmax / fmin skip NaN as np.nanmax / np.nanmin do, without their warning on an all-NaN array
    return bool(np.fmax.reduce(values, axis=None) > FLOAT32_MAX or np.fmin.reduce(values, axis=None) < -FLOAT32_MAX)


def beyond_float32(values) -> np.ndarray:
    """Boolean mask, shaped as ``values`` (an array), of the finite entries whose magnitude exceeds
    :data:`FLOAT32_MAX`: casting them to float32 would make them infinite. All False for float32,
    float16 and integer arrays (every one of their values fits)."""
    values = np.asarray(values)
    if not _may_exceed_float32(values):
        return np.zeros(values.shape, dtype=bool)
    big = np.abs(values) > FLOAT32_MAX
    if big.any():
        big &= np.isfinite(values)
    return big


def check_float32_range(X, where: str = "") -> None:
    """Raise DataError when a finite value of ``X`` (matrix or array) is too large for float32,
    which masksc converts every expression matrix to (it would become infinite). NaN and inf are
    :func:`check_values`' to report. ``where`` is appended to the message."""
    v = np.asarray(X.data) if sp.issparse(X) else np.asarray(X)  # not flattened: a strided block is not copied
    if not _may_exceed_float32(v):
        return
    big = beyond_float32(v)
    if big.any():
        raise DataError(f"X holds {int(big.sum())} values too large for float32 (max 3.4e38; largest magnitude "
                        f"{np.abs(v[big]).max():.3g}){where}; fix: pass raw counts or log-normalised expression "
                        "(values this large point to a corrupt or wrongly scaled matrix), or rescale it into "
                        "float32's range.")


COUNTS_LAYER_HINT = " (scanpy keeps them in a layer: layer='counts' in masksc.tl, --layer counts on the command line)"
"""Where raw counts usually are, told in messages about X; ``naming_matrix`` drops it when a layer or
``.raw`` was read instead."""


def first_flagged_cell(X, flagged: np.ndarray, cell: Callable[[int], str] | None) -> str:
    """", the first in cell ..." naming (by ``cell``, given a row of ``X``) the first row holding a
    stored value ``flagged`` (a bool mask over the stored values: a sparse matrix's ``data``, a
    dense one's entries in C order); "" without ``cell``."""
    if cell is None:
        return ""
    if sp.issparse(X):  # stored in row order only when CSR
        row = int(X.tocoo().row[flagged].min())
    else:
        row = int(np.argmax(flagged)) // max(1, np.asarray(X).shape[-1])
    return f", the first in cell {cell(row)}"


# Counts through float arithmetic (a float32 product, a format conversion) come back off a whole
# number by a few units in the last place; log-normalised values are this near one by chance only
# (a 2e-5 share of them). The gap allowed stops at ROUNDING_MAX_GAP: relative alone, it would call
# any value from 5e4 on whole (CPM values never logged among them).
ROUNDING_TOLERANCE = 1e-5
ROUNDING_MAX_GAP = 0.01
ROUNDING_FIX = ("round them, e.g. adata.X = np.round(adata.X) (for a sparse X: adata.X.data = "
                "np.round(adata.X.data)), and write the result to a new file for the command line.")


def near_whole(values: np.ndarray) -> np.ndarray:
    """bool per value: within ROUNDING_TOLERANCE (relative, at least absolute, at most
    ROUNDING_MAX_GAP) of a whole number, or within two float32 steps of it (from 131072 on, a
    float32 step exceeds ROUNDING_MAX_GAP), at most 1/32: wider, a sixteenth of any values would pass
    (normalised values never logged among them: counts over 2.6e5 in one gene of one cell are not met)."""
    steps = np.minimum(2 * np.spacing(np.abs(values).astype(np.float32)).astype(np.float64), 1 / 32)
    gap = np.maximum(np.minimum(ROUNDING_TOLERANCE * np.maximum(1.0, np.abs(values)), ROUNDING_MAX_GAP), steps)
    return np.abs(values - np.round(values)) <= gap


def check_values(X, require_integer: bool = False, where: str = "", cell: Callable[[int], str] | None = None) -> bool:
    """Raise DataError on NaN/inf, finite values too large for float32, negative values, or
    (``require_integer``) non-integer values.

    Returns True when every value is a whole number (useful for detecting raw counts).
    ``where`` is appended to messages (e.g. " in cells 1000..1999"); ``cell``, given a row of
    ``X``, names that cell (e.g. "1042 (AAACCTG-1)"), and the message names the first bad one.
    """
    v = _values(X)
    if v.dtype.kind not in "biuf":
        raise DataError(f"X has non-numeric dtype {v.dtype}{where}; fix: convert the expression values to numbers.")
    if v.dtype.kind == "f":
        bad = ~np.isfinite(v)
        if bad.any():
            n_nan = int(np.isnan(v).sum())
            raise DataError(f"X contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values{where}"
                            f"{first_flagged_cell(X, bad, cell)}; fix: replace or remove them (e.g. np.nan_to_num) "
                            "before using masksc.")
        check_float32_range(v, where)
    if v.size and v.min() < 0:
        raise DataError(f"X contains {int((v < 0).sum())} negative values (min {v.min():g}){where}"
                        f"{first_flagged_cell(X, v < 0, cell)}; fix: pass raw counts or log-normalised expression, "
                        "not scaled/centred data.")
    fractional = v != np.round(v) if v.dtype.kind == "f" else np.zeros(v.shape, dtype=bool)
    integer = not fractional.any()
    if require_integer and not integer:
        frac = v[fractional]
        if near_whole(frac).all():
            raise DataError(f"X holds whole numbers with rounding error ({frac.size} entries off one by under "
                            f"{ROUNDING_TOLERANCE:g} of it, e.g. {float(frac[0]):.9g}){where}"
                            f"{first_flagged_cell(X, fractional, cell)} where raw counts are required; "
                            f"fix: {ROUNDING_FIX}")
        raise DataError(f"X holds non-integer values ({frac.size} entries, e.g. {float(frac[0]):.9g}){where}"
                        f"{first_flagged_cell(X, fractional, cell)} where raw counts are required; fix: pass the raw "
                        f"count matrix{COUNTS_LAYER_HINT}; log-normalised data needs a model fitted on "
                        "log-normalised data.")
    return integer


def zero_count_cells(X) -> np.ndarray:
    """Boolean mask [n_cells] of cells whose expression sums to zero."""
    if sp.issparse(X):
        sums = np.asarray(X.sum(axis=1)).ravel()
    else:
        sums = np.asarray(X).sum(axis=1)
    return sums == 0


def check_zero_cells(X, where: str = "") -> None:
    """Raise DataError naming how many cells have zero total counts."""
    n = int(zero_count_cells(X).sum())
    if n:
        raise DataError(f"{n} cells have zero counts{where}; fix: filter them, e.g. Preprocessor(min_counts=1) "
                        "drops them with a warning, or sc.pp.filter_cells(adata, min_counts=1).")


def check_count(name: str, value, unit: str = "cells") -> int:
    """``value`` as an int when it is a whole number >= 1 of any Python or numpy integer type
    (a bool is not one), else a DataError naming ``name`` and the fix: sizes such as
    ``chunk_size`` and ``batch_size`` (2.5 or 1e5 would fail later, inside range())."""
    if not is_integer(value) or value < 1:
        raise DataError(f"{name}={value!r}; fix: pass a positive whole number of {unit}.")
    return int(value)


def check_unique_genes(var_names, read: set | None = None) -> None:
    """Raise DataError for gene names that are not strings (an integer 1 and the text "1" would
    be one gene once written to a file) or that are duplicated, listing them. ``read``: the genes
    a fitted model reads; a name repeated outside them is an extra gene, ignored as extra genes are."""
    names = pd.Index(var_names)
    other = [g for g in names if not isinstance(g, str)]
    if other:
        raise DataError(f"{len(other)} gene names are not strings (e.g. {other[:5]}, of type "
                        f"{type(other[0]).__name__}); fix: adata.var_names = adata.var_names.astype(str) first "
                        "(then check they are unique).")
    dups = [] if names.is_unique else [g for g, c in Counter(names).items() if c > 1 and (read is None or g in read)]
    if dups:
        among = "" if read is None else " among the genes the model reads (on its grid, or summed into library sizes)"
        raise DataError(f"{len(dups)} gene names are duplicated (e.g. {dups[:5]}){among}; "
                        "fix: call adata.var_names_make_unique() first (for a file: read it with anndata, do so, "
                        "and write a new .h5ad with adata.write_h5ad).")


def check_gene_names(var_names) -> None:
    """:func:`check_unique_genes`, and a DataError for empty names, for data a model is fitted
    on: a model holding an empty name would match it to another dataset's, whatever gene that
    is. (New data may hold such columns: no model fitted since has them to match.)"""
    check_unique_genes(var_names)
    blank = blank_gene_names(var_names)
    if blank.size:
        raise DataError(f"{genes_are_empty(blank)}: such genes would be matched to another dataset's empty names, "
                        "whatever gene that is; fix: name them, e.g. by their gene IDs (adata.var_names = "
                        "adata.var['gene_ids'] where they are empty), or remove them.")


def genes_are_empty(blank: np.ndarray) -> str:
    """"N gene names are empty (columns ..)" for the positions ``blank``."""
    more = ", ..." if blank.size > 5 else ""
    verb = "name is" if blank.size == 1 else "names are"
    return f"{blank.size} gene {verb} empty (column{'s' if blank.size > 1 else ''} {blank[:5].tolist()}{more})"


def blank_gene_names(names) -> np.ndarray:
    """int64 positions of the names in ``names`` that are empty or only whitespace."""
    return np.flatnonzero([isinstance(g, str) and not g.strip() for g in names]).astype(np.int64)


def check_labels(labels, n_cells: int) -> None:
    """Raise DataError if ``labels`` does not have one entry per cell."""
    n = len(labels)
    if n != n_cells:
        raise DataError(f"labels have length {n} but the matrix has {n_cells} cells; "
                        "fix: pass exactly one label per cell, in the same order as the cells.")


def validate_counts(adata_or_X, require_integer: bool = True, allow_zero_cells: bool = False,
                    labels=None) -> dict:
    """Validate an expression matrix (or AnnData) without modifying it.

    Checks, each raising :class:`masksc.errors.DataError` naming the problem and fix: empty or
    non-2-D matrix, non-numeric values, NaN/inf, values too large for float32, negative values, non-integer values (when
    ``require_integer``), cells with zero counts (unless ``allow_zero_cells``), duplicate gene
    names (AnnData input), and ``labels`` (or ``obs["label"]``) whose length differs from the
    number of cells.

    Returns a summary dict: ``n_cells``, ``n_genes``, ``integer`` (all values whole numbers),
    ``max`` (largest value), ``n_zero_cells``.
    """
    check_flags(require_integer=require_integer, allow_zero_cells=allow_zero_cells)
    X = _as_matrix(adata_or_X)
    check_not_empty(X)
    integer = check_values(X, require_integer=require_integer)
    zero = zero_count_cells(X)
    if not allow_zero_cells:
        check_zero_cells(X)
    if hasattr(adata_or_X, "var_names"):
        check_gene_names(adata_or_X.var_names)
    if labels is None and hasattr(adata_or_X, "obs") and "label" in adata_or_X.obs:
        labels = adata_or_X.obs["label"]
    if labels is not None:
        check_labels(labels, X.shape[0])
    v = _values(X)
    return {"n_cells": int(X.shape[0]), "n_genes": int(X.shape[1]), "integer": integer,
            "max": float(v.max()) if v.size else 0.0, "n_zero_cells": int(zero.sum())}


@contextlib.contextmanager
def naming_matrix(layer: str | None, use_raw: bool = False):
    """Wrap the reading of ``layers[layer]`` (or, with ``use_raw``, ``.raw``): a DataError about
    "X" raised inside names that matrix instead (the checks see whichever matrix they get as X),
    without the hint that raw counts may be kept in a layer."""
    try:
        yield
    except DataError as exc:
        message = str(exc)
        if (layer is None and not use_raw) or not message.startswith("X "):
            raise
        name = "adata.raw.X" if use_raw else f"adata.layers[{layer!r}]"
        raise DataError(name + message[1:].replace(COUNTS_LAYER_HINT, "")) from exc
