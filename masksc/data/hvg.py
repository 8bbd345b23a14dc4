"""Highly-variable-gene ranking from per-gene statistics (so it can be fed by a streaming pass).

The formulas follow scanpy's ``highly_variable_genes`` (flavours ``seurat_v3`` and ``seurat``,
single batch); tests check equality with scanpy on the same data. Genes whose scores tie exactly
at the cut are taken in gene order (``rank_genes``), where scanpy's sort may take another: on the
paper's datasets 0-2 of 500-3000 selected genes differ for that reason alone.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from masksc.errors import DataError


def mean_var(s: np.ndarray, ss: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance (ddof=1) from float64 sums ``s`` and sums of squares ``ss``."""
    mean = s / n
    var = np.maximum(ss / n - mean**2, 0.0)
    if n > 1:
        var *= n / (n - 1)
    return mean, var


SEURAT_SPAN = 0.3  # the loess span of Seurat's (and scanpy's) seurat_v3 flavour
MIN_TREND_GENES = 200  # below this many varying genes a failed loess fit is put down to too few, not sparse, genes


class TrendFitError(DataError):
    """The seurat_v3 loess trend could not be fitted on the genes given; ``n_varying`` genes varied.
    The caller, which knows what the genes were selected from, names the fix."""

    def __init__(self, message: str, n_varying: int):
        super().__init__(message)
        self.n_varying = n_varying


def seurat_v3_clip(mean: np.ndarray, var: np.ndarray, n: int, span: float = SEURAT_SPAN) -> tuple[np.ndarray, np.ndarray]:
    """Seurat v3 step 1: loess fit of log10 variance on log10 mean over non-constant genes.

    Returns ``(reg_std, clip_val)``: the regularised std per gene and the value each count is
    clipped to (``reg_std * sqrt(n) + mean``) before the standardised variance is taken.
    """
    try:
        from skmisc.loess import loess
    except ImportError as exc:
        raise DataError("hvg_flavor='seurat_v3' needs the scikit-misc package; fix: pip install scikit-misc, "
                        "or use Preprocessor(hvg_flavor='dispersion').") from exc
    not_const = var > 0
    n_varying = int(not_const.sum())
    if n_varying < 4:  # skmisc's loess crashes the process (a segfault) on 3 points at the default span
        raise TrendFitError(f"only {n_varying} genes vary across the {n} cells, too few for the seurat_v3 HVG trend "
                            "fit", n_varying)
    if span * n_varying < 1:  # and whenever a local fit would take under one point
        raise DataError(f"span={span:g} is too small for the seurat_v3 HVG trend fit over the {n_varying} genes that "
                        f"vary across the {n} cells: each local fit would take under one gene; fix: a larger span, "
                        f"e.g. Seurat's {SEURAT_SPAN:g} (Preprocessor(span={SEURAT_SPAN:g})); spans much under it "
                        "often fail the fit too.")
    est = np.zeros_like(mean)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    try:
        model.fit()
    except ValueError as exc:  # skmisc reports a singular local fit this way
        raise TrendFitError(f"seurat_v3 HVG trend fit failed on the {int(not_const.sum())} genes that vary across "
                            f"the {n} cells ({exc})", int(not_const.sum())) from exc
    est[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10**est)
    return reg_std, reg_std * np.sqrt(n) + mean


def seurat_v3_score(mean, reg_std, clipped_sum, clipped_sumsq, n: int) -> np.ndarray:
    """Seurat v3 step 2: variance of the clipped, standardised counts per gene (higher = more variable)."""
    return (n * mean**2 + clipped_sumsq - 2 * clipped_sum * mean) / ((n - 1) * reg_std**2)


def dispersion_score(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Seurat (dispersion) score: log dispersion of expm1(log data), z-scored within ``n_bins``
    bins of log1p mean; NaN for genes with zero dispersion (never ranked above others)."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    df = pd.DataFrame({"means": np.log1p(mean), "disp": np.log(disp)})
    df["bin"] = pd.cut(df["means"], bins=n_bins)
    stats = df.groupby("bin", observed=True)["disp"].agg(avg="mean", dev="std")
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[df["bin"]].set_index(df.index)
    return ((df["disp"] - per_gene["avg"]) / per_gene["dev"]).to_numpy(dtype=np.float64)


def rank_genes(score: np.ndarray, n_top: int | None) -> np.ndarray:
    """Indices of the ``n_top`` highest scores, best first, leaving out NaN scores (genes without
    dispersion: scanpy's ``seurat`` flavour never selects them, so fewer than ``n_top`` may be
    returned); all genes when None, NaN last.

    Scores are compared at 10 significant digits and ties go to the lower gene index, so the
    ranking does not depend on floating-point summation order (chunk size of a streamed fit):
    the dispersion flavour produces exact ties (e.g. +-1/sqrt(2) in two-gene bins).
    """
    s = np.array([float(f"{v:.10g}") for v in np.where(np.isnan(score), -np.inf, score)])
    order = np.argsort(-s, kind="stable")
    return order if n_top is None else order[~np.isnan(score[order])][:n_top]
