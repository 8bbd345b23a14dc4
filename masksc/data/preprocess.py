"""Preprocessing as a fitted, serialisable transform: QC, library-size normalisation, log1p,
highly-variable genes, optional scaling. Stays sparse (except scaling, see below).

Fit reads its input in row chunks (:mod:`masksc.data.stream`), so the same code fits an
in-memory AnnData, a backed ``.h5ad`` or a 10x HDF5 file with memory bounded by the chunk:

* pass 1: validation, per-cell library sizes, cell filter, per-gene detection counts, per-gene
  sums/sums of squares of the raw counts (seurat_v3), of the normalised values (dispersion)
  and of the log-normalised values (scaling statistics);
* pass 2 (seurat_v3 only): per-gene sums of counts clipped at the loess-regularised bound,
  which is only known after pass 1 (as in Seurat v3 / scanpy).

Choices, documented because they matter for new data: the library size of a cell is its sum
over *all* genes of the input (before gene selection), computed the same way at transform
time; ``min_cells`` restricts HVG candidates only; ``min_counts`` drops cells (with a warning)
at fit and at transform (for log-normalised input, whose counts are not known, any
``min_counts`` drops the cells without values). Input that is already log-normalised (non-integer values, max <=
``LOG_MAX``) skips normalise/log1p and uses the dispersion flavour. Scaling centres the data,
which densifies it: it is allowed only for at most ``SCALE_MAX_GENES`` genes (e.g. the 500
genes contrastive-sc uses) and the output CSR then stores every non-zero entry, nearly all of
them (a value at its gene's mean, or a gene without variance, is 0).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from masksc.checks import check_flags, is_finite_number, is_integer, is_number, plain_number
from masksc.data import hvg
from masksc.data.io import has_synthesised_names
from masksc.data.stream import ChunkSource, open_source
from masksc.data.validate import (COUNTS_LAYER_HINT, ROUNDING_FIX, ROUNDING_TOLERANCE, check_gene_names,
                                  check_unique_genes, check_values, first_flagged_cell, near_whole)
from masksc.errors import DataError, UncheckedGenesWarning, warn
from masksc.progress import progress_bar

log = logging.getLogger(__name__)

LOG_MAX = 30.0  # log1p of 1e13: larger non-integer values cannot be log-normalised expression
SCALE_MAX_GENES = 2048
PROGRESS_MIN_CELLS = 200_000  # fitting passes over this many cells show a bar (~4 s a pass at 300k on 2 cores)
LIBRARY_GENES_MISSING = "genes of the training data are missing from the data"  # a warning's words, filtered by them
# Above this fraction of whole non-zero values, non-integer input is counts with stray values, not
# log-normalised data (log1p of normalised counts is almost never a whole number).
COUNTS_WHOLE_FRACTION = 0.5
ROUNDED_WHOLE_FRACTION = 0.9  # counts through float arithmetic: nearly all off whole by rounding only
# Files without gene names (scDeepCluster .h5) are matched by column position; below this Spearman
# correlation between new cells' and the training cells' per-gene detection rates the columns are
# not the same genes (same genes: r >= 0.83 even for a single PBMC type; other genes: r ~ 0).
PROFILE_MIN_SPEARMAN = 0.5
PROFILE_SAMPLE_CELLS = 1000  # the first cells the detection profile is checked on (at least PROFILE_MIN_CELLS)
PROFILE_MIN_CELLS = 50
DETECT_CELLS = 2000  # the first cells the input's kind is judged on, whatever chunk_size is
ZERO_CELLS_FIX = ("fix: remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1), and for the command "
                  "line write the result to a new .h5ad (a Preprocessor(min_counts=1) of your own drops them "
                  "with a warning).")
_PARAMS = ("n_top_genes", "target_sum", "log1p", "scale", "max_value", "hvg_flavor", "min_counts",
           "min_cells", "input", "span", "n_bins", "chunk_size")


def _mostly_whole(X: sp.csr_matrix) -> bool:
    """Whether more than COUNTS_WHOLE_FRACTION of the non-zero values are whole numbers, or more
    than ROUNDED_WHOLE_FRACTION whole up to rounding: counts, even when not all are (log1p of
    normalised counts is almost never whole). Up to rounding, half is not enough: float32
    normalised values of cells of a few counts come back near whole too (999.99994)."""
    return bool(X.nnz) and (float(np.mean(X.data == np.round(X.data))) > COUNTS_WHOLE_FRACTION or
                            float(np.mean(near_whole(X.data))) > ROUNDED_WHOLE_FRACTION)


def _judged_sums(X: sp.csr_matrix) -> np.ndarray | None:
    """float64 sums of the cells of ``X`` with values, when there are enough to judge them (at
    least 10 cells, 100 values); else None."""
    sums = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    sums = sums[sums > 0]
    return sums if X.nnz >= 100 and sums.size >= 10 else None


def _one_total(sums: np.ndarray | None) -> float | None:
    """The total every cell sums to (``sums``: :func:`_judged_sums`), as normalised values give;
    None when their sums differ or there are too few to judge."""
    return float(sums.mean()) if sums is not None and sums.std() <= 1e-3 * sums.mean() else None


def _check_log_normalised(X: sp.csr_matrix, fitted: bool = False) -> None:
    """For non-integer values under LOG_MAX, taken as log-normalised: raise DataError when they
    are normalised values never logged (every cell sums to the same total), and warn when expm1
    gives back whole numbers, as of log1p of raw counts never normalised. Only a warning: counts
    downsampled to one depth, or depth-corrected and rounded (Seurat's SCTransform data), give
    whole numbers too, and no spread of their sums tells them apart once genes are subset.
    Judged on the first cells (``DETECT_CELLS`` when fitting, ``PROFILE_SAMPLE_CELLS`` of new data),
    of at least 100 values of at least 10 cells. ``fitted``: the
    values are new data for a preprocessor fitted on log-normalised values, which raw counts
    would not suit."""
    sums = _judged_sums(X)
    if sums is None:
        return
    total = _one_total(sums)
    if total is not None:
        fix = ("sc.pp.log1p it first, as the training data was" if fitted else
               f"sc.pp.log1p it first, or pass the raw counts{COUNTS_LAYER_HINT}")
        raise DataError(f"X looks normalised but not log-transformed (every cell sums to {total:.6g}); fix: {fix}.")
    values = np.expm1(X.data.astype(np.float64))
    if np.mean(np.abs(values - np.round(values)) <= 1e-3 + 1e-5 * values) > 0.9:  # log-normalised: ~0.1%
        fix = ("sc.pp.normalize_total before sc.pp.log1p, as for the training data" if fitted else
               f"pass the raw counts{COUNTS_LAYER_HINT} (np.expm1 of these values), or sc.pp.normalize_total before "
               "sc.pp.log1p")
        warn("X is taken as log-normalised, but expm1 of its values gives whole numbers, as log1p of raw counts does: "
             f"if they were never normalised, cells of larger libraries look more expressed; fix: then {fix} (counts "
             "downsampled to one depth are fine as they are).")


def _cells_named(a: int, b: int, rows: np.ndarray | None) -> str:
    """" in cells a..b-1" for cells ``a..b-1`` of the data, by their dataset ``rows`` when given:
    a range when those are consecutive, else how many and their rows (the first 8)."""
    if rows is None:
        return f" in cells {a}..{b - 1}"
    picked = [int(r) for r in rows[a:b]]
    if picked == list(range(picked[0], picked[0] + len(picked))):
        return f" in cells {picked[0]}..{picked[-1]}"
    return f" in {len(picked)} cells (rows {', '.join(map(str, picked[:8]))}{', ...' if len(picked) > 8 else ''})"


def _cell_namer(src: ChunkSource, a: int, rows: np.ndarray | None = None) -> Callable[[int], str]:
    """Names row i of the chunk of ``src`` starting at cell ``a``: its row in the dataset
    (``rows[a + i]``, default ``a + i``) and its obs name, as errors give it."""
    return lambda i: f"{a + i if rows is None else int(rows[a + i])} ({src.obs.index[a + i]})"


def _check_rows(rows, n_obs: int) -> np.ndarray:
    """``rows`` (the dataset rows of ``n_obs`` cells, named in errors) as int64, or a DataError."""
    rows = np.asarray(rows)
    if rows.shape != (n_obs,) or (rows.size and rows.dtype.kind not in "iu"):
        raise DataError(f"rows must be the {n_obs} cells' integer rows in their dataset (1-D, one per cell), got "
                        f"{rows.dtype} of shape {rows.shape}.")
    return rows.astype(np.int64, copy=False)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two 1-D arrays (ties take their mean rank, as in
    ``scipy.stats.spearmanr``); NaN when either is constant. numpy and pandas alone: importing
    ``scipy.stats`` costs a one-off command about half a second."""
    ra, rb = (pd.Series(v, dtype=np.float64).rank().to_numpy() for v in (a, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(ra, rb)[0, 1])


class Preprocessor:
    """Fitted preprocessing transform (scanpy conventions).

    Parameters: ``n_top_genes`` genes to keep (None: all, ranked); ``target_sum`` library size
    after normalisation; ``log1p``; ``scale`` (z-score per gene, clipped at ``max_value``);
    ``hvg_flavor`` "seurat_v3" (raw counts), "dispersion" (scanpy flavor "seurat", on log
    data) or "auto" (seurat_v3 for counts, dispersion for log input); ``min_counts`` per cell
    (cells below are dropped with a warning); ``min_cells`` per gene (HVG candidates must be
    detected in that many cells); ``input`` "auto" | "counts" | "log"; ``span`` loess span
    (seurat_v3); ``n_bins`` mean bins (dispersion); ``chunk_size`` cells per streamed chunk.

    Fitted attributes: ``genes_`` (selected genes, HVG rank order), ``input_kind_``,
    ``flavor_``, ``scale_mean_``/``scale_std_`` (when scaling), ``n_cells_fit_``,
    ``input_genes_`` (every gene of the fitted data: a cell's library size is summed over these,
    whatever other genes new data holds) and ``detection_`` (fraction of fitted cells detecting
    each of ``genes_``; new data without gene names must resemble it, see ``transform_chunks``).
    """

    def __init__(self, n_top_genes: int | None = 4096, target_sum: float = 1e4, log1p: bool = True,
                 scale: bool = False, max_value: float | None = 10.0, hvg_flavor: str = "auto",
                 min_counts: float | None = None, min_cells: int | None = None, input: str = "auto",
                 span: float = hvg.SEURAT_SPAN, n_bins: int = 20, chunk_size: int = 10_000):
        if hvg_flavor not in ("auto", "seurat_v3", "dispersion"):
            raise DataError(f"hvg_flavor={hvg_flavor!r}; fix: use 'auto', 'seurat_v3' or 'dispersion'.")
        if input not in ("auto", "counts", "log"):
            raise DataError(f"input={input!r}; fix: use 'auto', 'counts' or 'log'.")
        check_flags(log1p=log1p, scale=scale)
        log1p, scale = bool(log1p), bool(scale)  # np.bool_ is not JSON
        n_top_genes, target_sum, max_value, min_counts, min_cells, span, n_bins, chunk_size = _check_params(
            n_top_genes=n_top_genes, target_sum=target_sum, max_value=max_value, min_counts=min_counts,
            min_cells=min_cells, span=span, n_bins=n_bins, chunk_size=chunk_size)
        if scale and (n_top_genes is None or n_top_genes > SCALE_MAX_GENES):
            raise DataError(f"scale=True densifies the data and is allowed for at most {SCALE_MAX_GENES} genes "
                            f"(n_top_genes={n_top_genes}); fix: lower n_top_genes or use scale=False.")
        self.n_top_genes, self.target_sum, self.log1p, self.scale = n_top_genes, target_sum, log1p, scale
        self.max_value, self.hvg_flavor, self.min_counts, self.min_cells = max_value, hvg_flavor, min_counts, min_cells
        self.input, self.span, self.n_bins, self.chunk_size = input, span, n_bins, chunk_size
        self.genes_: list[str] | None = None
        self.input_kind_: str | None = None
        self.flavor_: str | None = None
        self.scale_mean_: np.ndarray | None = None
        self.scale_std_: np.ndarray | None = None
        self.n_cells_fit_: int | None = None
        self.input_genes_: list[str] | None = None
        self.detection_: np.ndarray | None = None

    # ---------------------------------------------------------------- helpers
    def _detect(self, X: sp.csr_matrix, cell: Callable[[int], str]) -> str:
        first = _cells_named(0, X.shape[0], None)
        integer = check_values(X, require_integer=False, where=first, cell=cell)
        if self.input != "auto":
            return self.input
        if integer:
            return "counts"
        if _mostly_whole(X):
            # normalised values of shallow cells come back near whole too: with one total, either may be
            total = _one_total(_judged_sums(X))
            if total is not None:
                raise DataError(f"X looks normalised but not log-transformed, or like raw counts of one depth with "
                                f"rounding error: its values are nearly whole and every cell sums to {total:.6g}; "
                                f"fix: if normalised, sc.pp.log1p it first (or pass the raw counts"
                                f"{COUNTS_LAYER_HINT}); if raw counts, {ROUNDING_FIX}")
            fractional = X.data != np.round(X.data)
            odd = X.data[fractional]
            example = f"e.g. {float(odd[0]):.9g}{first_flagged_cell(X, fractional, cell)}"
            if near_whole(odd).all():
                raise DataError(f"X looks like raw counts with rounding error: {odd.size} of its {X.nnz} non-zero "
                                f"values{first} are off a whole number by under {ROUNDING_TOLERANCE:g} "
                                f"of it ({example}); fix: {ROUNDING_FIX}")
            raise DataError(f"X looks like raw counts, but {odd.size} of its {X.nnz} non-zero values{first} are "
                            f"not whole numbers ({example}); fix: pass integer raw counts "
                            "(round corrected counts, e.g. after ambient-RNA removal); for log-normalised data "
                            "whose whole-number values are real, a Preprocessor(input='log') of your own.")
        vmax = float(X.data.max()) if X.nnz else 0.0
        if vmax <= LOG_MAX:
            _check_log_normalised(X)
            sums = np.asarray(X.expm1().sum(axis=1)).ravel()
            cv = float(sums.std() / sums.mean()) if sums.mean() > 0 else float("nan")
            log.info("input looks log-normalised (non-integer, max %.3g; expm1 row-sum CV %.3g)", vmax, cv)
            return "log"
        raise DataError(f"X is neither raw counts (non-integer values) nor log-normalised (max {vmax:g} > "
                        f"{LOG_MAX:g}), e.g. normalised without log1p; fix: pass raw counts{COUNTS_LAYER_HINT}, or log1p "
                        "the data first (sc.pp.log1p); a Preprocessor of your own also takes input='counts' or "
                        "'log'.")

    def _keep_cells(self, X: sp.csr_matrix, kind: str, where: str, cell: Callable[[int], str],
                    library_cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(library sizes float64 [n], keep mask [n]) after validation of the chunk (``where`` and
        ``cell`` name its cells in errors, as in ``check_values``); library sizes sum the columns
        ``library_cols`` (default all)."""
        check_values(X, require_integer=kind == "counts", where=where, cell=cell)
        if kind == "log" and X.nnz:
            looks_like = None
            if X.data.max() > LOG_MAX:
                looks_like = f"values up to {X.data.max():g}"
            elif self.input == "auto" and _mostly_whole(X):
                # shallow counts stay under LOG_MAX; log1p of normalised counts is almost never whole
                looks_like = "whole-number values"
            if looks_like and self.genes_ is None:  # fitting
                given = "input='log' was given" if self.input == "log" else "the first cells are log-normalised"
                raise DataError(f"{looks_like}{where} look like raw counts, but {given}; fix: pass one kind of values "
                                "for every cell: raw counts (input='auto' or 'counts') or log-normalised values.")
            if looks_like:
                raise DataError(f"{looks_like}{where} look like raw counts or normalised values never logged, but "
                                "the preprocessor was fitted on log-normalised data; fix: pass log-normalised values "
                                "(sc.pp.normalize_total, then sc.pp.log1p), as in fitting (the same layer or "
                                "use_raw), or fit a model on raw counts.")
        return self._library_sizes(X, kind, library_cols)

    def _library_sizes(self, X: sp.csr_matrix, kind: str, library_cols: np.ndarray | None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(library sizes float64 [n], keep mask [n]) of a chunk, without validating its values."""
        sums = np.asarray((X if library_cols is None else X[:, library_cols]).sum(axis=1, dtype=np.float64)).ravel()
        if self.min_counts:
            keep = sums >= self.min_counts if kind == "counts" else sums > 0
        else:
            keep = np.ones(len(sums), dtype=bool)
        return sums, keep

    def _lognorm(self, X: sp.csr_matrix, sums: np.ndarray, kind: str) -> sp.csr_matrix:
        """Normalise each row to ``target_sum`` and log1p (counts input); identity for log input."""
        if kind == "log":
            return X
        lib = np.where(sums > 0, sums, 1.0)
        out = X.copy()
        out.data = (out.data * np.repeat(self.target_sum / lib, np.diff(out.indptr))).astype(np.float32)
        if self.log1p:
            np.log1p(out.data, out=out.data)
        return out

    def _check_zero(self, n_zero: int, n_drop: int, n_total: int, kind: str) -> None:
        if n_zero and not self.min_counts:
            raise DataError(f"{n_zero} of {n_total} cells have zero counts; {ZERO_CELLS_FIX}")
        if n_drop:
            why = f"fewer than {self.min_counts} counts" if kind == "counts" else \
                "no values (log-normalised input: min_counts drops only those)"
            warn(f"dropped {n_drop} of {n_total} cells with {why}")

    # ---------------------------------------------------------------- fit
    def fit(self, data, progress: bool = True) -> Preprocessor:
        """Fit on an AnnData (in memory or backed), an ``.h5ad``/10x ``.h5`` path (streamed) or
        any path :func:`masksc.data.read` accepts. Never modifies the input. ``progress``: a bar
        for each pass over the cells, from ``PROGRESS_MIN_CELLS`` cells (False: none)."""
        src = open_source(data)
        check_gene_names(src.var_names)
        first = []  # the first DETECT_CELLS cells, read in chunks of chunk_size (memory is bounded by it)
        for a, X in src.chunks(min(self.chunk_size, DETECT_CELLS)):
            first.append(X[:DETECT_CELLS - a])
            if a + X.shape[0] >= DETECT_CELLS:
                break
        if not first or src.n_vars == 0:
            raise DataError(f"empty matrix: {src.n_obs} cells x {src.n_vars} genes; fix: check the input.")
        kind = self._detect(sp.vstack(first, format="csr"), _cell_namer(src, 0))
        flavor = self.hvg_flavor if self.hvg_flavor != "auto" else ("seurat_v3" if kind == "counts" else "dispersion")
        if flavor == "seurat_v3" and kind == "log":
            raise DataError("hvg_flavor='seurat_v3' needs raw counts but the input is log-normalised; "
                            "fix: use hvg_flavor='dispersion' (or 'auto'), or pass raw counts.")
        G = src.n_vars
        acc = {k: np.zeros(G) for k in ("raw_s", "raw_ss", "norm_s", "norm_ss", "log_s", "log_ss", "detected")}
        n, n_zero, n_drop = 0, 0, 0
        for a, X in self._pass(src, "gene statistics", progress):
            sums, keep = self._keep_cells(X, kind, _cells_named(a, a + X.shape[0], None), _cell_namer(src, a))
            n_zero += int((sums == 0).sum())
            n_drop += int((~keep).sum())
            X, sums = X[keep], sums[keep]
            n += X.shape[0]
            acc["detected"] += np.bincount(X.indices, minlength=G)
            if kind == "counts":
                _add(acc, "raw", X.indices, X.data.astype(np.float64), G)
            L = self._lognorm(X, sums, kind)
            _add(acc, "log", L.indices, L.data.astype(np.float64), G)
            if flavor == "dispersion":
                norm = np.expm1(L.data) if (kind == "log" or self.log1p) else L.data
                _add(acc, "norm", L.indices, norm.astype(np.float64), G)
        self._check_zero(n_zero, n_drop, src.n_obs, kind)
        if n < 2:
            raise DataError(f"{n} cells left after filtering; fix: lower min_counts or pass more cells.")
        cand = np.flatnonzero(acc["detected"] >= (self.min_cells or 0))
        if cand.size == 0:
            raise DataError(f"no gene is detected in >= {self.min_cells} cells; fix: lower min_cells.")
        if flavor == "seurat_v3":
            mean, var = hvg.mean_var(acc["raw_s"][cand], acc["raw_ss"][cand], n)
            try:
                reg_std, clip = hvg.seurat_v3_clip(mean, var, n, self.span)
            except hvg.TrendFitError as exc:
                raise DataError(f"{exc}; fix: {self._trend_fix(exc.n_varying, n, G)}.") from exc
            cs, css = self._clipped_sums(src, kind, cand, clip, progress)
            score = hvg.seurat_v3_score(mean, reg_std, cs, css, n)
        else:
            mean, var = hvg.mean_var(acc["norm_s"][cand], acc["norm_ss"][cand], n)
            score = hvg.dispersion_score(mean, var, self.n_bins)
        sel = cand[hvg.rank_genes(score, self.n_top_genes)]
        if sel.size == 0:
            raise DataError(f"none of the {cand.size} genes has a dispersion score to rank it by: none varies "
                            f"across the {n} cells, or the dispersions of each mean bin tie exactly (scanpy's seurat "
                            "flavour leaves such genes out); fix: check the data (every cell alike?), or keep every "
                            "gene (n_top_genes=None).")
        if self.n_top_genes is not None and sel.size < self.n_top_genes:
            log.info("only %d genes can be ranked for n_top_genes=%d (detected in min_cells cells%s): keeping all",
                     sel.size, self.n_top_genes, ", with a dispersion" if flavor == "dispersion" else "")
        self.genes_ = [str(g) for g in src.var_names[sel]]
        self.input_kind_, self.flavor_, self.n_cells_fit_ = kind, flavor, n
        self.input_genes_ = [str(g) for g in src.var_names]
        self.detection_ = acc["detected"][sel] / n
        if self.scale:
            m, v = hvg.mean_var(acc["log_s"][sel], acc["log_ss"][sel], n)
            std = np.sqrt(v)
            std[std == 0] = 1.0
            self.scale_mean_, self.scale_std_ = m, std
        return self

    def _trend_fix(self, n_varying: int, n_cells: int, n_genes: int) -> str:
        """What to change when the seurat_v3 trend fit failed with ``n_varying`` genes varying."""
        if self.span < hvg.SEURAT_SPAN:  # smaller spans fail where it fits; sparse genes fail it too
            return (f"first Seurat's span {hvg.SEURAT_SPAN:g}, the default (span={self.span:g} gives each local fit "
                    f"{self.span * n_varying:.0f} of the {n_varying} genes; smaller spans fail where it fits); if "
                    f"that fails too: {self._trend_fix_at_default_span(n_varying, n_cells, n_genes)}")
        return self._trend_fix_at_default_span(n_varying, n_cells, n_genes)

    def _trend_fix_at_default_span(self, n_varying: int, n_cells: int, n_genes: int) -> str:
        """:meth:`_trend_fix` for a fit that failed at Seurat's span: the genes or cells are the cause."""
        if n_varying >= hvg.MIN_TREND_GENES:  # genes enough, but too sparse for a smooth trend
            return (f"keep only genes detected in more cells: raise min_cells (now {self.min_cells or 0}; tl.fit and "
                    "masksc fit use 3, scanpy's usual filter, which very sparse data such as worm_neuron_cell "
                    "needs; with few cells more, e.g. tl.fit(min_cells=5) or masksc fit --min-cells 5), or "
                    "preprocess with a Preprocessor(hvg_flavor='dispersion') of your own")
        if n_genes < 2 * hvg.MIN_TREND_GENES:
            return f"pass the full gene set of the experiment, not a selection of it ({n_genes} genes were given)"
        fewer = f" or lower min_cells (now {self.min_cells})" if self.min_cells else ""
        return f"pass more cells{fewer}: in {n_cells} cells only {n_varying} of the {n_genes} genes vary"

    def _pass(self, src: ChunkSource, desc: str, progress: bool):
        """``src.chunks(chunk_size)``, with a progress bar (in cells) from ``PROGRESS_MIN_CELLS`` cells."""
        with progress_bar(total=src.n_obs, desc=desc, unit="cell", leave=False,
                          disable=not progress or src.n_obs < PROGRESS_MIN_CELLS) as bar:
            for a, X in src.chunks(self.chunk_size):
                yield a, X
                bar.update(X.shape[0])

    def _clipped_sums(self, src: ChunkSource, kind, cand, clip, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        G = src.n_vars
        full_clip = np.full(G, np.inf)
        full_clip[cand] = clip
        acc = {"c_s": np.zeros(G), "c_ss": np.zeros(G)}
        for a, X in self._pass(src, "clipped gene statistics", progress):
            _, keep = self._keep_cells(X, kind, _cells_named(a, a + X.shape[0], None), _cell_namer(src, a))
            X = X[keep]
            _add(acc, "c", X.indices, np.minimum(X.data.astype(np.float64), full_clip[X.indices]), G)
        return acc["c_s"][cand], acc["c_ss"][cand]

    def fit_transform(self, data) -> ad.AnnData:
        """``fit(data)`` then ``transform(data)``."""
        return self.fit(data).transform(data)

    # ---------------------------------------------------------------- transform
    def _check_fitted(self):
        if self.genes_ is None:
            raise DataError("this Preprocessor is not fitted; fix: call .fit(adata) first (or from_dict).")

    def _gene_index(self, var_names: pd.Index) -> np.ndarray:
        # library sizes sum the training data's genes (counts input): their names must be unique too
        summed = self.input_genes_ if self.input_genes_ is not None and self.input_kind_ != "log" else ()
        read = set(self.genes_) | set(summed)
        check_unique_genes(var_names, read)
        idx = _columns(pd.Index(var_names), self.genes_)
        missing = [g for g, i in zip(self.genes_, idx) if i < 0]
        if missing:
            raise DataError(f"{len(missing)} of the {len(self.genes_)} genes the preprocessor was fitted on are "
                            f"missing from the data (e.g. {missing[:5]}); fix: use data measured on the same "
                            "genes with the same gene names (or add them as zero columns).")
        return idx

    def library_columns(self, var_names: pd.Index) -> np.ndarray | None:
        """Columns of data with genes ``var_names`` whose sum is a cell's library size: None (all)
        when they are the fitted data's genes, else those of ``input_genes_`` present, with a
        warning when some are missing (library sizes, and so the embedding, then shift). Log-
        normalised input is not normalised: its sums only tell empty cells, over every column."""
        if self.input_genes_ is None or self.input_kind_ == "log" or set(var_names) == set(self.input_genes_):
            return None
        cols = _columns(pd.Index(var_names), self.input_genes_)
        n_missing = int((cols < 0).sum())
        if n_missing:
            warn(f"{n_missing} of the {len(cols)} {LIBRARY_GENES_MISSING} (none on "
                 "the model's grid); library sizes are summed over the rest, so cells normalise differently than "
                 "in training and their embedding shifts; fix: pass every gene of the training data (a gene not "
                 "measured can be a zero column)")
        return np.sort(cols[cols >= 0])

    def needs_profile_check(self) -> bool:
        """Whether data must pass the detection-profile check: genes matched by position only
        (a preprocessor saved without detection rates warns that it cannot check them)."""
        return has_synthesised_names(self.genes_)

    def check_log_input(self, X: sp.csr_matrix) -> None:
        """For a preprocessor fitted on log-normalised values, the checks fitting made of them, on the
        first cells of new data ``X`` (CSR, its own genes): normalised values never logged are
        refused and log1p of counts never normalised is warned about; a no-op for counts and for
        ``input="log"`` (the user's word, which fitting took too)."""
        self._check_fitted()
        if self.input_kind_ == "log" and self.input == "auto":  # input="log" given: not checked, as in fitting
            _check_log_normalised(X, fitted=True)

    def check_gene_profile(self, X: sp.csr_matrix, var_names, where: str = "") -> None:
        """The check :meth:`transform_chunks` makes, on one block of raw cells (CSR [m,
        len(var_names)]) for callers that transform a dataset block by block: when the fitted
        genes have no names (``gene_0000``..), the block's per-gene detection rates must
        correlate with the fitted data's, else a DataError; a no-op for named genes, a warning
        for fewer than ``PROFILE_MIN_CELLS`` kept cells. ``where`` names the cells in the error. Values are
        not validated here: the transform of each block does that and names the bad cells."""
        self._check_fitted()
        if not self.needs_profile_check():
            return
        idx = self._gene_index(pd.Index(var_names))
        with warnings.catch_warnings():  # missing library genes: the transform that follows warns once
            warnings.simplefilter("ignore", UserWarning)
            library_cols = self.library_columns(pd.Index(var_names))
        _, keep = self._library_sizes(X, self.input_kind_, library_cols)
        self._check_profile(X[keep][:, idx], where)

    def _check_profile(self, X: sp.csr_matrix, where: str) -> None:
        """Refuse cells (CSR [n, len(genes_)], raw values in ``genes_`` order) whose per-gene
        detection rates do not resemble the fitted data's: with synthesised gene names, columns
        are matched by position and this is the only sign that they are other genes. Fewer than
        ``PROFILE_MIN_CELLS`` cells are too few to tell: a warning says they go unchecked."""
        if self.detection_ is None:
            warn("the data's genes are named gene_0000.. (a file without gene names: the names give column "
                 "positions, not genes), and the model was saved by a masksc release that did not keep its training "
                 "data's per-gene detection rates, so nothing can check that these columns are the genes it was "
                 "trained on; they are used unchecked: pass cells measured on the training file's genes in its "
                 "column order (a model trained by this release checks them).", UncheckedGenesWarning)
            return
        if X.shape[0] < PROFILE_MIN_CELLS:
            warn(f"the data's genes are named gene_0000.. (a file without gene names: the names give column "
                 f"positions, not genes), and {X.shape[0]} cells are too few to check that these columns are the "
                 f"genes it was trained on (it takes {PROFILE_MIN_CELLS}); they are used unchecked: pass cells "
                 "measured on the training file's genes in its column order.", UncheckedGenesWarning)
            return
        detection = np.bincount(X.indices[X.data != 0], minlength=X.shape[1]) / X.shape[0]
        r = spearman(detection, self.detection_)
        if not r >= PROFILE_MIN_SPEARMAN:  # also catches NaN (a constant profile)
            raise DataError(f"the data's genes are named gene_0000.. (the names masksc.read gives a file without "
                            f"gene names: column positions, not genes), and these columns "
                            f"are not the genes it was trained on: their per-gene detection rates{where} correlate "
                            f"with the training data's at Spearman r = {r:.2f} (the same genes give r above 0.8); "
                            "fix: pass cells "
                            "measured on the training file's genes in its column order, or train a new model on this "
                            "data.")

    def transform_chunks(self, data, chunk_size: int | None = None, rows: np.ndarray | None = None,
                         check_profile: bool = True) -> Iterator[tuple[int, np.ndarray, sp.csr_matrix]]:
        """Stream the transform: yield ``(start, keep, X)`` per chunk, ``keep`` bool [chunk cells]
        (cells dropped by ``min_counts`` are False) and ``X`` CSR float32 [kept cells, len(genes_)].
        ``rows``: int [n_cells], the rows of a larger dataset that ``data``'s cells are, named
        in errors (default: 0 ..), for a block of cells read from a file; ``check_profile=False``
        leaves out the detection-profile check below, for such a block of a dataset whose first
        cells :meth:`check_gene_profile` has checked.

        Library sizes are summed over ``input_genes_`` (see ``library_columns``). Genes without
        names (``gene_0000``.., as :func:`masksc.data.read` names an scDeepCluster file's) are
        matched by position, so the per-gene detection rates of the first chunk with at least
        ``PROFILE_MIN_CELLS`` cells must correlate with ``detection_`` (Spearman r >= 0.5 over
        ``genes_``), else a DataError; fewer cells than that are used with a warning. The first chunks are
        gathered up to ``PROFILE_SAMPLE_CELLS`` cells (or all there are), so small chunks do not skip
        the check and every path checks the same sample."""
        self._check_fitted()
        src = open_source(data)
        idx = self._gene_index(src.var_names)
        library_cols = self.library_columns(src.var_names)
        # the dataset's first cells are here: its log input is checked as fitting did, its profile where needed
        check_first, check_profile = check_profile, check_profile and self.needs_profile_check()
        rows = None if rows is None else _check_rows(rows, src.n_obs)
        first, first_kept, end = [], [], 0  # the first PROFILE_SAMPLE_CELLS cells: small chunks do not skip them
        for a, X in src.chunks(self.chunk_size if chunk_size is None else chunk_size):
            end = a + X.shape[0]
            cell = _cell_namer(src, a, rows)
            sums, keep = self._keep_cells(X, self.input_kind_, _cells_named(a, end, rows), cell, library_cols)
            if check_first:
                take = min(X.shape[0], PROFILE_SAMPLE_CELLS - a)
                first.append(X[:take])
                first_kept.append(keep[:take])
                if end >= PROFILE_SAMPLE_CELLS or end == src.n_obs:
                    cells = sp.vstack(first, format="csr")
                    self.check_log_input(cells)
                    if check_profile:
                        self._check_profile(cells[np.concatenate(first_kept)][:, idx],
                                            _cells_named(0, min(end, PROFILE_SAMPLE_CELLS), rows))
                    check_first, first, first_kept = False, [], []
            if not self.min_counts and (sums == 0).any():
                raise DataError(self._zero_library_message(X, sums, cell, library_cols))
            # the model's genes first: normalising every gene of a wide chunk took several times its memory
            L = self._lognorm((X if keep.all() else X[keep])[:, idx], sums[keep], self.input_kind_)
            yield a, keep, self._scale(L)

    def _zero_library_message(self, X: sp.csr_matrix, sums: np.ndarray, cell: Callable[[int], str],
                              library_cols: np.ndarray | None) -> str:
        """Why cells of a chunk with library size 0 cannot be transformed, naming them (``cell``:
        as in ``check_values``)."""
        rows = np.flatnonzero(sums == 0)
        shown = ", ".join(cell(r) for r in rows[:5])
        cells = (f"{rows.size} cells (rows {shown}{', ...' if rows.size > 5 else ''}) have" if rows.size > 1
                 else f"1 cell (row {shown}) has")
        if library_cols is not None and X[rows].nnz:
            return (f"{cells} no counts in the {len(library_cols)} genes of the training data present here (only "
                    "in other genes), so they cannot be normalised as in training; fix: remove them first, e.g. "
                    "in Python: seen = adata.var_names.isin(model.preprocessor.input_genes_); adata = "
                    "adata[np.asarray(adata[:, seen].X.sum(axis=1)).ravel() > 0].copy().")
        return f"{cells} zero counts; {ZERO_CELLS_FIX}"

    def _scale(self, L: sp.csr_matrix) -> sp.csr_matrix:
        if not self.scale:
            L = L.astype(np.float32)
            L.sort_indices()
            return L
        D = (L.toarray() - self.scale_mean_) / self.scale_std_
        lo = -self.max_value if self.max_value is not None else None
        if self.max_value is not None:
            np.clip(D, lo, self.max_value, out=D)
        out = sp.csr_matrix(D.astype(np.float32))
        return out

    def transform(self, data, check_profile: bool = True, rows: np.ndarray | None = None) -> ad.AnnData:
        """Apply the fitted transform: AnnData [kept cells, len(genes_)], ``X`` CSR float32 with
        columns in ``genes_`` order (the data's genes are matched by name), ``obs`` copied.
        Raises DataError if genes are missing, values are invalid or zero-count cells are present
        without ``min_counts``. Never modifies the input. ``check_profile``: as in
        :meth:`transform_chunks` (False for the cells the transform was fitted on, or cells of a
        dataset already checked); ``rows``: as there, the dataset rows errors name."""
        self._check_fitted()
        src = open_source(data)
        keep, X = self.transform_kept(src, check_profile=check_profile, rows=rows)
        self._check_zero(0, int((~keep).sum()), src.n_obs, self.input_kind_)
        return ad.AnnData(X=X, obs=src.obs[keep].copy(), var=pd.DataFrame(index=pd.Index(self.genes_)))

    def transform_kept(self, data, check_profile: bool = True,
                       rows: np.ndarray | None = None) -> tuple[np.ndarray, sp.csr_matrix]:
        """:meth:`transform`'s matrix, without its warning about dropped cells, for callers that
        keep a row per cell: (keep bool [n_cells], False for the cells ``min_counts`` drops; X CSR
        float32 [kept cells, len(genes_)] in ``genes_`` order). Arguments as in :meth:`transform`."""
        blocks, keeps = [], []
        for _, keep, X in self.transform_chunks(data, check_profile=check_profile, rows=rows):
            blocks.append(X)
            keeps.append(keep)
        keep = np.concatenate(keeps) if keeps else np.zeros(0, dtype=bool)
        X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.genes_)), dtype=np.float32)
        return keep, X

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """JSON-able dict of parameters and fitted state. ``from_dict`` restores it exactly but for
        the genes' detection rates (only the gene-profile check reads them), kept to 6 decimals."""
        self._check_fitted()
        d = {"params": {k: getattr(self, k) for k in _PARAMS}, "genes": list(self.genes_),
             "input_kind": self.input_kind_, "flavor": self.flavor_, "n_cells_fit": self.n_cells_fit_}
        if self.input_genes_ is not None:  # None when loaded from a checkpoint written before they were kept
            d["input_genes"] = list(self.input_genes_)
        if self.detection_ is not None:
            d["detection"] = [round(float(v), 6) for v in self.detection_]
        if self.scale:
            d["scale_mean"] = [float(v) for v in self.scale_mean_]
            d["scale_std"] = [float(v) for v in self.scale_std_]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessor:
        """Rebuild a fitted Preprocessor from :meth:`to_dict` output."""
        try:
            # earlier releases saved the switches as given (log1p=1, None): read as they acted, by truth
            params = {k: bool(v) if k in ("log1p", "scale") else v for k, v in d["params"].items()}
            p = cls(**params)
            p.genes_, p.input_kind_, p.flavor_ = list(d["genes"]), d["input_kind"], d["flavor"]
            p.n_cells_fit_ = d.get("n_cells_fit")
            p.input_genes_ = d.get("input_genes")  # absent from earlier checkpoints: sum every gene, as they did
            for name, genes in (("genes", d["genes"]), ("input_genes", p.input_genes_)):
                if genes is not None and (not isinstance(genes, list) or not all(isinstance(g, str) for g in genes)
                                          or len(set(genes)) != len(genes)):
                    raise ValueError(f"{name} is not a list of distinct gene names")
            p.detection_ = np.asarray(d["detection"], dtype=np.float64) if "detection" in d else None
            if p.scale:
                p.scale_mean_ = np.asarray(d["scale_mean"], dtype=np.float64)
                p.scale_std_ = np.asarray(d["scale_std"], dtype=np.float64)
            for name in ("detection_", "scale_mean_", "scale_std_"):
                values = getattr(p, name)
                if values is not None and values.shape != (len(p.genes_),):
                    raise ValueError(f"{name.rstrip('_')} holds {values.size} values for {len(p.genes_)} genes")
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a Preprocessor dict ({exc}); fix: pass the output of Preprocessor.to_dict().") from exc
        return p


def _columns(names: pd.Index, genes) -> np.ndarray:
    """The column of each of ``genes`` among ``names`` (-1: absent), where ``names`` may repeat
    names other than ``genes``."""
    return names.get_indexer(genes) if names.is_unique else names.get_indexer_non_unique(genes)[0]


def _check_params(**params) -> list:
    """The Preprocessor settings ``params``, in the order given, as plain Python ints (integers of
    any type) and floats (other numbers: ``np.float32``, ``Fraction``), None kept where it means
    "off". DataError naming the parameter and the fix for one out of its range (a negative
    n_top_genes kept all genes but the last, a negative target_sum made every value NaN, a
    negative max_value every scaled value -1)."""
    whole = {"n_top_genes": 1, "min_cells": 0, "n_bins": 1, "chunk_size": 1}  # integers, with their least value
    checked = []
    for name, value in params.items():
        if value is None and name in ("n_top_genes", "max_value", "min_counts", "min_cells"):
            checked.append(None)
            continue
        if name in whole:
            ok = is_integer(value) and value >= whole[name]
            need = f"an integer >= {whole[name]}"
        elif name == "span":
            ok = is_number(value) and 0 < value <= 1
            need = "a number in (0, 1]"
        else:
            ok = is_finite_number(value) and (value >= 0 if name == "min_counts" else value > 0)
            need = "a finite number >= 0" if name == "min_counts" else "a finite number > 0"
        if not ok:
            default = {"n_top_genes": "None (all genes)", "max_value": "None (no clipping)",
                       "min_counts": "None", "min_cells": "None"}.get(name)
            raise DataError(f"{name}={value!r}; fix: pass {need}{f' or {default}' if default else ''}.")
        checked.append(plain_number(value))
    return checked


def _add(acc: dict, key: str, indices: np.ndarray, values: np.ndarray, G: int) -> None:
    acc[f"{key}_s"] += np.bincount(indices, weights=values, minlength=G)
    acc[f"{key}_ss"] += np.bincount(indices, weights=values * values, minlength=G)
