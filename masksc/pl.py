"""Plots as PNG files: 2-D embedding maps (paper Fig. 4), attention over the gene grid
(Fig. 6) and training loss. Each function writes its file atomically and returns the path, or,
given no path, returns the ``matplotlib.figure.Figure`` (a notebook shows it inline); a
single-panel plot also draws into a caller's ``ax`` (returned) for a figure of one's own.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never pyplot, so
plotting works headless and leaves the caller's pyplot state alone.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from natsort import natsorted

from masksc.checks import check_flags, is_map_seed
from masksc.cluster import check_embedding
from masksc.data.validate import check_count
from masksc.errors import DataError, warn
from masksc.io_utils import atomic_write

logger = logging.getLogger(__name__)

MAX_LEGEND = 30  # categories beyond this are drawn without a legend entry each
PANELS_PER_ROW = 4
UMAP_MIN_CELLS = 16  # below this umap-learn's spectral initialisation fails (and a map says little)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _check_png(path, overwrite: bool) -> None:
    """Refuse a path that is not a .png, one that cannot be written, or an existing file when not
    ``overwrite``, before any work (a UMAP can take minutes)."""
    check_flags(overwrite=overwrite)
    if path is not None and Path(path).suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a path ending in .png (or None for the Figure), "
                         f"got {str(path)!r}.")
    if path is not None:
        from masksc.io_utils import check_output
        check_output(path, overwrite=overwrite)


def _panels(ax, path, n: int, width: float, height: float):
    """(figure, [n axes]) to draw into: a new figure of n panels side by side, or the caller's
    ``ax`` for a single panel (the caller then owns saving, so no path)."""
    if ax is None:  # at most PANELS_PER_ROW a row, as scanpy wraps its panels
        cols, rows = min(n, PANELS_PER_ROW), -(-n // PANELS_PER_ROW)
        fig = _figure(width * cols, height * rows)
        axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
        for spare in axes[n:]:
            spare.remove()
        return fig, axes[:n]
    if path is not None:
        raise ValueError("ax= draws into your own figure, which you save; pass path=None with it.")
    if n != 1:
        raise ValueError(f"ax= takes one panel, but there are {n} colourings; pass a single color, or no ax "
                         "for a figure of one panel per colouring.")
    return ax.figure, [ax]


def _save(fig, path, overwrite: bool):
    """Write ``fig`` to ``path`` atomically and return the path; with no path, return ``fig``.
    Not ``overwrite``: a file another command wrote at ``path`` meanwhile is kept (MaskscError)."""
    if path is None:
        return fig
    path = Path(path)
    with atomic_write(path, suffix=".png", replace=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    if sp.issparse(x):  # an obsm entry may be sparse, as the tl functions accept
        x = x.toarray()
    return np.asarray(x)


def _coords_2d(Z: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """(coordinates float32 [n, 2], the method that made them: t-SNE when UMAP is unavailable)."""
    if method == "precomputed":
        if Z.shape[1] != 2:
            raise DataError(f"method='precomputed' needs 2-D coordinates [n, 2], got shape {Z.shape}.")
        return Z.astype(np.float32), method
    if Z.shape[0] > 1 and not np.ptp(Z, axis=0).any():  # t-SNE starts from NaN there and crashes the process
        raise DataError(f"every one of the {Z.shape[0]} cells has the same embedding, so there is no map to draw; "
                        "fix: check the model (an untrained or collapsed one embeds every cell alike) or the "
                        "embedding passed.")
    if method == "umap" and Z.shape[0] < UMAP_MIN_CELLS:
        warn(f"{Z.shape[0]} cells are too few for UMAP's spectral layout (it needs {UMAP_MIN_CELLS}); drawing them "
             "with t-SNE")
        method = "tsne"
    if method == "umap":
        try:
            with warnings.catch_warnings():  # its own import-time notes (no TensorFlow: no ParametricUMAP) are not ours
                warnings.simplefilter("ignore")
                import umap
        except Exception as exc:  # numba/llvmlite failures surface as non-ImportError exceptions too
            warn(f"umap-learn is unavailable ({exc}); falling back to t-SNE.")
            method = "tsne"
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*n_jobs.*")
                reducer = umap.UMAP(n_components=2, n_neighbors=min(15, Z.shape[0] - 1), random_state=seed, n_jobs=1)
                logger.info("UMAP of %d cells (about a minute for 50,000 on 2 cores)", Z.shape[0])
                return reducer.fit_transform(Z).astype(np.float32), method
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (Z.shape[0] - 1) / 3)))
    init = "pca" if Z.shape[1] >= 2 else "random"  # PCA to 2-D needs 2 dimensions
    tsne = TSNE(n_components=2, init=init, perplexity=perplexity, random_state=seed)
    logger.info("t-SNE of %d cells", Z.shape[0])
    return tsne.fit_transform(Z).astype(np.float32), "tsne"


GENE_READ_ROWS = 65_536  # cells of a backed CSR matrix read at once for one gene's column (anndata reads it whole)


def _gene_values(expression, gene: str) -> np.ndarray:
    """float64 [n_cells]: the values of ``gene`` in ``expression.X`` (an AnnData from
    ``with_layer``), NaN kept; a DataError naming the fix when there is no matrix or the name
    repeats."""
    if expression.X is None:
        raise DataError(f"{gene!r} is a gene, but this AnnData holds no expression matrix (a `masksc embed` output "
                        "stores only obs and the embedding); fix: colour by obs columns, or pass an AnnData with "
                        "the expression (e.g. copy obsm['X_masksc'] into the counts' AnnData).")
    where = np.flatnonzero(expression.var_names == gene)
    if where.size > 1:
        raise DataError(f"gene {gene!r} names {where.size} columns of var_names, so its colour is ambiguous; fix: "
                        "adata.var_names_make_unique() first.")
    X, j = expression.X, int(where[0])
    if getattr(X, "format", None) == "csr" and not sp.issparse(X):  # a backed CSR: a column is read by row blocks
        blocks = (X[start:start + GENE_READ_ROWS][:, j] for start in range(0, X.shape[0], GENE_READ_ROWS))
        return np.concatenate([block.toarray().ravel() for block in blocks]).astype(np.float64)
    column = X[:, j]
    column = column.toarray() if sp.issparse(column) else np.asarray(column)
    return column.ravel().astype(np.float64)


def _color_sets(data, color, basis: str, layer: str | None = None, use_raw: bool | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list], set[str], bool]:
    """(Z, {panel name: labels}, {panel name: colours per category}, names of the panels drawn
    as continuous values, whether nothing colours the cells: one uniform panel without a
    legend) from an array or an AnnData plus ``color``; a categorical column stays a
    ``pd.Categorical`` (its categories' order is the legend's) and brings scanpy's
    ``uns[f"{column}_colors"]`` when that has one per category; a gene's panel holds its values."""
    palettes, continuous = {}, set()
    if hasattr(data, "obsm") and hasattr(data, "obs"):
        if basis not in data.obsm and f"X_{basis}" in data.obsm:  # scanpy's basis="umap" for obsm["X_umap"]
            basis = f"X_{basis}"
        if basis not in data.obsm:
            raise DataError(f"adata.obsm has no {basis!r} (has {list(data.obsm)}); embed first or pass basis=.")
        Z, where = _to_numpy(data.obsm[basis]), f"adata.obsm[{basis!r}]"
        if color is None:
            cluster_key = data.uns.get("masksc", {}).get("cluster", {}).get("key", "masksc_cluster")
            color = [c for c in (cluster_key, "label") if c in data.obs]
        if isinstance(color, str):
            color = [color]
        if isinstance(color, (np.ndarray, pd.Index, pd.Series)):  # e.g. adata.var_names[:4]
            color = color.tolist()
        if isinstance(color, (list, tuple)):
            from masksc.data import with_layer
            if use_raw is None:  # scanpy's rule: genes from .raw when there is one and no layer is named
                use_raw = layer is None and data.raw is not None
            expression = with_layer(data, layer, use_raw)  # a bad layer= or use_raw= is refused here
            genes = expression.var_names
            both = [c for c in color if c in data.obs and c in genes]
            if both:  # as scanpy: neither is the obvious reading
                raise DataError(f"{both} name both an obs column and a gene, so the colour is ambiguous; fix: "
                                "rename the obs column (adata.obs.rename(columns=...)).")
            missing = [c for c in color if c not in data.obs and c not in genes]
            if missing:
                no_genes = " (it has no genes: a `masksc embed` output stores only obs and the embedding)" \
                    if len(genes) == 0 else ""
                per_cell = (f"; color looks like one value per cell ({len(color)} of them): pass it as "
                            "color={'title': values}" if len(color) == data.n_obs and len(missing) > 5 else "")
                raise DataError(f"{missing[:5]}{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} are "
                                f"neither obs columns nor genes of {'adata.raw' if use_raw else 'var_names'}"
                                f"{no_genes}{per_cell}; obs columns: {list(data.obs.columns)[:20]}.")
            colorings = {}
            for c in color:
                if c not in data.obs:
                    name = c if layer is None and not use_raw else f"{c} ({'raw' if use_raw else layer})"
                    colorings[name] = _gene_values(expression, c)
                    continuous.add(name)
                    continue
                stored = data.uns.get(f"{c}_colors")
                column = data.obs[c]
                if stored is not None and (column.dtype == bool or pd.api.types.infer_dtype(column) == "string"):
                    # as anndata makes it categorical for scanpy, whose colours follow these categories
                    column = column.astype(pd.CategoricalDtype(natsorted(sorted(column.dropna().unique()))))
                categorical = isinstance(column.dtype, pd.CategoricalDtype)
                if categorical and stored is not None and len(stored) >= len(column.cat.categories):
                    from matplotlib.colors import is_color_like
                    if all(is_color_like(colour) for colour in stored):
                        palettes[c] = list(stored)[:len(column.cat.categories)]  # as scanpy, the first n
                    else:  # as scanpy: its own palette instead
                        warn(f"uns[{c + '_colors'!r}] holds values that are not colours (e.g. "
                             f"{str(next(colour for colour in stored if not is_color_like(colour)))!r}); drawing "
                             f"{c!r} "
                             "in the default palette")
                colorings[c] = column.array if categorical else column.to_numpy()
            color = colorings
        elif layer is not None or use_raw:
            raise ValueError("layer= and use_raw= say where the genes named in color are read; a dict of labels "
                             "reads none, so drop them.")
    else:
        if layer is not None or use_raw:
            raise ValueError("layer= and use_raw= read genes of an AnnData; with an array, drop them and pass "
                             "color={title: values per cell}.")
        Z, where = _to_numpy(data), "embedding"
    if Z.ndim != 2 or Z.shape[0] < 2:
        raise DataError(f"{where} must be 2-D [n_cells >= 2, n_dims], got shape {Z.shape}.")
    Z = check_embedding(Z, where)  # NaN / inf, and values float32 cannot hold, named apart
    uncoloured = color is None or isinstance(color, (dict, list, tuple)) and not color
    if not uncoloured and not isinstance(color, dict):
        raise DataError(f"color must be a dict {{panel title: labels per cell}} (or, for AnnData, obs column or gene "
                        f"names), got a {type(color).__name__}; fix: e.g. color={{'label': values}}.")
    if uncoloured:
        color = {"cells": np.zeros(Z.shape[0], dtype=np.int64)}
    out = {}
    obs_names = data.obs_names if hasattr(data, "obs_names") else None
    for name, labels in color.items():
        if isinstance(labels, pd.Series) and obs_names is not None and not labels.index.equals(obs_names) \
                and labels.index.isin(obs_names).any():  # a column of another AnnData: matched by cell name
            held = obs_names.isin(labels.index)
            if not labels.index.is_unique or not obs_names.is_unique or not held.all():
                why = (f"{int((~held).sum())} of these cells are not in its index" if not held.all()
                       else "cell names repeat in its index or in adata.obs_names")
                raise DataError(f"color[{name!r}] is a Series indexed by cell names, but {why}; fix: pass one value "
                                "per cell of this AnnData, e.g. series.reindex(adata.obs_names) (NaN is drawn as NA).")
            labels = labels.reindex(obs_names)
        if isinstance(labels, pd.Series) and isinstance(labels.dtype, pd.CategoricalDtype):
            labels = labels.array  # an obs column passed as a Series: its categories too
        labels = labels if isinstance(labels, pd.Categorical) else _to_numpy(labels)
        if labels.ndim != 1 or labels.shape[0] != Z.shape[0]:
            raise DataError(f"color[{name!r}] must have one label per cell ({Z.shape[0]}), "
                            f"got shape {labels.shape}.")
        out[str(name)] = labels
    return (Z, out, {str(name): colors for name, colors in palettes.items()}, {str(name) for name in continuous},
            uncoloured)


def _category_colors(n: int) -> list:
    """scanpy's default palettes for n categories (tab10's up to 10, its default_20, default_28
    and default_102 beyond, which keep neighbouring categories apart), then gist_ncar."""
    from matplotlib import colormaps
    from scanpy.plotting.palettes import default_20, default_28, default_102

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return list(default_20[:n])
    if n <= 28:
        return list(default_28[:n])
    if n <= 102:
        return list(default_102[:n])
    return [colormaps["gist_ncar"](x) for x in np.linspace(0.02, 0.95, n)]


def _natural_key(text: str) -> list:
    """Sort key putting "type_2" before "type_10" and "2" before "10"."""
    return [(0, int(t), "") if t.isdecimal() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def _label_text(value) -> str:
    """A label as the legend writes it: a whole float of ordinary size as an integer (an Int64
    column read as 1.0 beside NA is label 1; 1e300 stays 1e+300)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _label_order(texts) -> list[str]:
    """Label texts in legend order: numbers by value (-2 before 0.05 before 0.5) when every one
    reads as a number, a text reading as NaN ("nan" from ``astype(str)``) last, else naturally
    ("type_2" before "type_10")."""
    texts = set(texts)
    try:
        value = {text: float(text) for text in texts}
    except ValueError:
        return sorted(texts, key=_natural_key)
    return sorted(texts, key=lambda text: (math.isnan(value[text]), 0.0 if math.isnan(value[text]) else value[text],
                                           text))


def _legend_codes(labels) -> tuple[np.ndarray, list[str]]:
    """The legend of one label per cell: (int64 [n] each cell's entry, -1 for a missing label;
    the entries' texts in order, those present only). A categorical keeps its categories' order,
    other labels follow :func:`_label_order`; labels written alike (categories 1 and "1") are one
    entry, while object labels True and 1, which pandas takes for one value, stay two."""
    if isinstance(getattr(labels, "dtype", None), pd.CategoricalDtype):
        categorical = pd.Categorical(labels)
        codes, texts = categorical.codes, [_label_text(c) for c in categorical.categories]
        order = list(dict.fromkeys(texts))
    else:
        values = np.asarray(labels)
        if values.ndim != 1:
            raise DataError(f"labels must be 1-D (one label per cell), got shape {values.shape}; fix: pass a "
                            "column such as adata.obs['label'].")
        if values.dtype == object:  # by their texts, one pass
            missing = np.asarray(pd.isna(values), dtype=bool)
            values = values.copy()
            values[~missing] = [_label_text(v) for v in values[~missing]]
            values[missing] = None
        codes, uniques = pd.factorize(values)  # missing -> -1
        texts = [_label_text(u) for u in uniques]
        order = _label_order(texts)
    if not texts:
        return np.full(len(codes), -1, dtype=np.int64), []
    rank = {text: i for i, text in enumerate(order)}
    codes = np.where(codes >= 0, np.array([rank[t] for t in texts], dtype=np.int64)[codes], -1)
    present = np.unique(codes[codes >= 0])  # the entries drawn: a sample may lack a category
    compact = np.full(len(order), -1, dtype=np.int64)
    compact[present] = np.arange(present.size)
    return np.where(codes >= 0, compact[codes], -1), [order[i] for i in present]


def _draw_panel(ax, xy: np.ndarray, labels, title: str, size: float, palette: list | None = None,
                continuous: bool = False, legend: bool = True) -> None:
    """One scatter of ``xy`` coloured by ``labels`` (an array, or a pd.Categorical whose categories
    give the legend's order and ``palette`` its colours, one per category); ``continuous`` draws
    numbers on a colour map whatever their count (a gene's values); ``legend=False`` leaves
    the categories' legend out."""
    categorical = isinstance(labels, pd.Categorical)
    numeric_many = not categorical and labels.dtype.kind in "fiu" and len(np.unique(labels)) > MAX_LEGEND
    if continuous or numeric_many:  # a continuous value (a gene, a count per cell): colour map and colour bar
        missing = ~np.isfinite(labels) if labels.dtype.kind == "f" else np.zeros(len(labels), dtype=bool)
        if missing.any():  # NaN, inf: grey underneath, as unlabelled cells are drawn (matplotlib would drop them)
            what = "NA" if np.isnan(labels[missing]).all() else "NA / inf"
            ax.scatter(xy[missing, 0], xy[missing, 1], s=size, color="lightgrey", linewidths=0, rasterized=True,
                       label=f"{what} ({int(missing.sum())})")
            ax.legend(loc="upper left", frameon=False, fontsize=8, markerscale=max(1.0, 6.0 / math.sqrt(size)))
        shown = np.flatnonzero(~missing)
        shown = shown[np.argsort(labels[shown], kind="stable")]  # high values on top, as scanpy draws them
        sc = ax.scatter(xy[shown, 0], xy[shown, 1], c=labels[shown], s=size, cmap="viridis", linewidths=0,
                        rasterized=True)
        if shown.size:  # a colour bar of no values would show 0..1
            ax.figure.colorbar(sc, ax=ax, shrink=0.8)
    else:
        from matplotlib.colors import to_rgba
        from matplotlib.lines import Line2D
        all_codes, cats = _legend_codes(labels)
        missing = all_codes < 0
        if categorical:  # the column's own colours, kept when a sample lacks a category
            named = [_label_text(c) for c in labels.categories]
            every = palette if palette is not None else _category_colors(len(named))
            colors = [every[named.index(c)] for c in cats]
        else:
            colors = _category_colors(len(cats))
        handles = []
        if missing.any():  # unlabelled cells: grey, underneath the labelled ones
            ax.scatter(xy[missing, 0], xy[missing, 1], s=size, color="lightgrey", linewidths=0, rasterized=True)
            handles.append(("lightgrey", f"NA ({int(missing.sum())})"))
        # every labelled cell in one scatter, in data order as scanpy draws them: one scatter per
        # category would lay the last ones over the first
        codes = all_codes[~missing]
        rgba = np.array([to_rgba(c) for c in colors]).reshape(-1, 4)
        ax.scatter(xy[~missing, 0], xy[~missing, 1], s=size, c=rgba[codes], linewidths=0, rasterized=True)
        handles += [(color, f"{cat} ({int((codes == k).sum())})") for k, (cat, color) in enumerate(zip(cats, colors))]
        if legend and len(cats) <= MAX_LEGEND:
            marker = math.sqrt(size) * max(1.0, 6.0 / math.sqrt(size))
            ax.legend([Line2D([], [], linestyle="", marker="o", markersize=marker, markeredgewidth=0, color=color)
                       for color, _ in handles], [text for _, text in handles], loc="center left",
                      bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8, ncol=1 if len(cats) <= 15 else 2)
        elif legend:
            title = f"{title} ({len(cats)} categories, no legend)"
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def embedding(data, color=None, path: str | os.PathLike | None = None, method: str = "umap",
              basis: str = "X_masksc", seed: int = 0, max_cells: int | None = 50_000,
              point_size: float | None = None, ax=None, layer: str | None = None, use_raw: bool | None = None, *,
              overwrite: bool = True, color_by=None):
    """2-D map (UMAP or t-SNE) of a cell embedding, one panel per colouring (paper Fig. 4).

    Args:
        data: embedding array [n, d] (numpy or torch) or an AnnData whose ``obsm[basis]`` holds it.
        color: dict {panel title: labels [n]} (categories, missing ones drawn grey as "NA",
            or, for numbers with more than 30 distinct values, e.g. counts per cell, a continuous
            colour, highest values drawn on top, NaN grey underneath; a ``pd.Categorical`` is
            drawn in its categories' order); for AnnData also, as in scanpy, an obs column or gene
            name or a list of them (a categorical column keeps its order and takes scanpy's
            ``uns[f"{column}_colors"]``; a gene is drawn by its values (see ``layer``,
            ``use_raw``) on a continuous colour, titled with the layer or "raw" it came from), or
            None for the clusters of the last ``tl.cluster`` and the ``label`` column, those that
            exist. A name that is both a column and a gene is refused.
        path: output .png path (written atomically; parent folders created); None returns the
            Figure instead. ``overwrite=False`` refuses an existing ``path``, also one another
            command writes while the map is drawn (MaskscError).
        method: "umap" (umap-learn; falls back to t-SNE with a warning when it cannot be
            imported or for fewer than 16 cells), "tsne" (sklearn; PCA init, random for a
            one-column embedding) or "precomputed" (data already [n, 2]). An embedding where
            every cell is alike has no map: a DataError.
        basis: the ``obsm`` key of an AnnData's embedding (``"umap"`` finds ``X_umap`` as in
            scanpy); a 2-D one is drawn as it is, whatever ``method``.
        max_cells: above this many cells (>= 2) a uniform random sample (``seed``) is mapped
            and drawn; None maps all cells.
        point_size: marker area; default scales with the number of cells.
        ax: a matplotlib Axes to draw one colouring into (with ``path=None``); the legend sits
            right of the panel, so save that figure with ``bbox_inches="tight"``.
        layer, use_raw: the matrix genes in ``color`` are read from: ``layers[layer]``, ``.raw``
            (``use_raw=True``) or X; ``use_raw=None`` is scanpy's rule, ``.raw`` when the AnnData
            has one and no layer is named, else X.
        color_by: the earlier name of ``color``; still taken, with a FutureWarning.

    Returns: the path written; with no path the ``matplotlib.figure.Figure``, or ``ax`` when given.
    """
    if color_by is not None:
        if color is not None:
            raise TypeError("pass color= alone (color_by= is its earlier name).")
        warn("pl.embedding's color_by= is now color=, scanpy's name; color_by= will be removed", FutureWarning)
        color = color_by
    _check_png(path, overwrite)
    check_flags(("use_raw",), use_raw=use_raw)
    if method not in ("umap", "tsne", "precomputed"):
        raise ValueError(f"method must be 'umap', 'tsne' or 'precomputed', got {method!r}.")
    if point_size is not None and not point_size > 0:
        raise ValueError(f"point_size is a marker area and must be > 0, got {point_size!r}.")
    if not is_map_seed(seed):
        raise DataError(f"seed must be an integer in [0, 2**32 - 1] (what UMAP and t-SNE take), got {seed!r}; fix: "
                        "e.g. seed=0.")
    if max_cells is not None and (isinstance(max_cells, bool) or not isinstance(max_cells, (int, np.integer))
                                  or max_cells < 2):
        raise DataError(f"max_cells must be an integer >= 2 (a map needs two cells) or None for all cells, got "
                        f"{max_cells!r}.")
    Z, colorings, palettes, continuous, uncoloured = _color_sets(data, color, basis, layer, use_raw)
    fig, axes = _panels(ax, path, len(colorings), 6.5, 5.0)  # before the map: a bad ax= fails at once
    if Z.shape[1] == 2:  # already a map (e.g. scanpy's X_umap): mapping it again would distort it
        method = "precomputed"
    n = Z.shape[0]
    idx = np.arange(n)
    if max_cells is not None and n > max_cells:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
        logger.info("embedding plot: mapping a random sample of %d of %d cells", max_cells, n)
    xy, method = _coords_2d(Z[idx], method, seed)
    size = point_size if point_size is not None else float(np.clip(3000.0 / len(idx), 0.5, 30.0))
    for panel, (name, labels) in zip(axes, colorings.items()):
        _draw_panel(panel, xy, labels[idx], name, size, palettes.get(name), name in continuous,
                    legend=not uncoloured)
        panel.set_xlabel(f"{method.upper()} 1" if method != "precomputed" else "")
        panel.set_ylabel(f"{method.upper()} 2" if method != "precomputed" else "")
    if len(idx) < n:  # the legend's counts are the sample's: say so on the figure
        sample = f"a random sample of {len(idx)} of {n} cells (seed {seed})"
        if ax is not None:
            ax.set_title(f"{ax.get_title()}\n{sample}")
        else:
            fig.suptitle(sample)
    if ax is not None:
        return ax
    fig.tight_layout()
    return _save(fig, path, overwrite)


def one_cell_per_label(labels, seed: int = 0, n: int | None = None) -> np.ndarray:
    """Row indices of one random cell (drawn with ``seed``) of each distinct label, e.g. the cells
    :func:`attention_grid` draws (paper Fig. 6).

    Args:
        labels: one label per cell (array, list or pandas Series); missing ones (NaN, None) get
            no cell.
        seed: seed of the draw; the same seed picks the same cells.
        n: return at most this many (the first labels in order); None for all.

    Returns: int64 row indices, one per label, in the order :func:`embedding`'s legend lists the
    labels: a categorical's own categories, else numbers by value and text naturally ("type_2"
    before "type_10"). Linear in the number of cells, so a per-cell column of millions is fine.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0):
        raise ValueError(f"n must be a non-negative integer or None (all labels), got {n!r}.")
    codes, _ = _legend_codes(labels)
    order = np.random.default_rng(seed).permutation(codes.size)
    present, first = np.unique(codes[order], return_index=True)
    return order[first[present >= 0]][:n].astype(np.int64)


def attention_to_grid(attn, grid_shape: tuple[int, int], patch: int, ime: bool = True, n_prefix: int = 1,
                      query: int = 0) -> np.ndarray:
    """Attention of one query token (default the global token at position 0) to the gene
    tokens, averaged over heads and laid out on the gene grid: every gene gets the weight of
    the token that holds it (a 2-D ``P x P`` patch with IME, a run of ``P*P`` consecutive
    grid positions without).

    Args:
        attn: [B, heads, L, L] attention probabilities (e.g. ``MaskSC.last_attention``),
            numpy or torch, with L = n_prefix + (g // P) * (s // P).
        grid_shape: the gene grid (g, s). patch: P. ime: the model's ``config.ime``.
        n_prefix: tokens before the gene tokens. query: the attending token.

    Returns: float32 [B, g, s].
    """
    from masksc.models.targets import token_columns

    a = _to_numpy(attn).astype(np.float32)
    g, s = grid_shape
    cols = token_columns((g, s), patch, ime)  # [G, P*P] grid positions of each token
    if a.ndim != 4 or a.shape[2] != a.shape[3] or a.shape[3] != n_prefix + len(cols):
        raise DataError(f"attn must be [B, heads, L, L] with L = n_prefix + (g/P)*(s/P) = {n_prefix + len(cols)}, "
                        f"got shape {a.shape}.")
    if not 0 <= query < a.shape[2]:
        raise ValueError(f"query must index a token in [0, {a.shape[2]}), got {query}.")
    per_token = a[:, :, query, n_prefix:].mean(axis=1)  # [B, G]
    out = np.zeros((a.shape[0], g * s), np.float32)
    out[:, cols] = per_token[:, :, None]
    return out.reshape(a.shape[0], g, s)


def attention_grid(attn_maps, titles=None, path: str | os.PathLike | None = None, ncols: int = 4,
                   cmap: str = "magma", *, overwrite: bool = True):
    """Heatmaps of attention over the gene grid for sample cells (paper Fig. 6).

    Args:
        attn_maps: [n_cells, h, w] non-negative weights per grid position: per gene ([n, g, s],
            e.g. from ``MaskSCModel.attention_maps`` or :func:`attention_to_grid`) or per patch
            ([n, g/P, s/P]). NaN marks a position without a gene (grid padding), drawn grey.
            Attention probabilities are never negative, so negative values raise DataError.
        titles: one title per cell, or None for "cell 0", "cell 1", ...
        path: output .png path; None returns the Figure. ncols: panels per row. cmap: matplotlib
            colour map. overwrite: as in :func:`embedding`.

    Returns: the path written, or the Figure.
    """
    _check_png(path, overwrite)
    maps = _to_numpy(attn_maps)
    if maps.ndim != 3 or 0 in maps.shape:
        raise DataError(f"attn_maps must be [n_cells, h, w] (one grid per cell), got shape {maps.shape}.")
    if not np.issubdtype(maps.dtype, np.number) or np.isinf(maps).any():
        raise DataError("attn_maps must be finite numbers (NaN only where a grid position holds no gene).")
    no_gene = np.isnan(maps)
    if no_gene.all(axis=(1, 2)).any():
        raise DataError(f"attn_maps {np.flatnonzero(no_gene.all(axis=(1, 2))).tolist()} are NaN everywhere, so there "
                        "is nothing to draw; fix: pass attention weights (NaN only at grid padding).")
    if (maps < 0).any():
        raise DataError(f"attn_maps has {int((maps < 0).sum())} negative values (min {np.nanmin(maps):g}), but "
                        "attention weights are probabilities; fix: pass the softmax attention (e.g. via "
                        "attention_to_grid), not logits or centred scores.")
    n = maps.shape[0]
    titles = [f"cell {i}" for i in range(n)] if titles is None else [str(t) for t in titles]
    if len(titles) != n:
        raise DataError(f"got {len(titles)} titles for {n} attention maps; pass one per cell or None.")
    ncols = min(check_count("ncols", ncols, "columns"), n)
    nrows = math.ceil(n / ncols)
    fig = _figure(3.6 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    from matplotlib import colormaps
    colors = colormaps.get_cmap(cmap).with_extremes(bad="lightgrey")  # a name or a Colormap
    for ax, m, t in zip(axes, maps, titles):
        im = ax.imshow(m, cmap=colors, interpolation="nearest", aspect="equal")
        ax.set_title(t, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(f"last-layer attention over the {maps.shape[1]}x{maps.shape[2]} grid"
                 + (" (grey: no gene)" if no_gene.any() else ""))
    fig.tight_layout()
    return _save(fig, path, overwrite)


def loss_curve(losses, path: str | os.PathLike | None = None, xlabel: str = "epoch", logy: bool | None = None,
               ax=None, *, overwrite: bool = True):
    """Training loss per epoch (or step).

    Args:
        losses: list of floats, or dict {curve name: list of floats}; NaN points are skipped; or
            the directory ``fit`` wrote (its recorded per-epoch losses).
        path: output .png path; None returns the Figure. logy: log y-axis; None = when all values
            are positive and span more than two decades. ax: a matplotlib Axes to draw into (with
            ``path=None``). overwrite: as in :func:`embedding`.

    Returns: the path written; with no path the Figure, or ``ax`` when given.
    """
    _check_png(path, overwrite)
    check_flags(("logy",), logy=logy)
    if isinstance(losses, (str, os.PathLike)):
        from masksc.checkpoint import read_losses
        losses = read_losses(losses)
    curves = losses if isinstance(losses, dict) else {"loss": losses}
    if not curves:
        raise DataError("losses is empty; pass a list of floats or a dict name -> list.")
    arrays = {}
    for name, vals in curves.items():
        try:
            v = np.asarray(_to_numpy(vals), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"loss curve {name!r} must be numbers, got a {type(vals).__name__}; fix: pass the losses "
                            "(e.g. adata.uns['masksc']['fit']['losses']) or the directory fit wrote.") from exc
        if v.ndim != 1 or v.size == 0:
            raise DataError(f"loss curve {name!r} must be a non-empty 1-D list of numbers, got shape {v.shape}.")
        arrays[str(name)] = v
    finite = np.concatenate([v[np.isfinite(v)] for v in arrays.values()])
    if finite.size == 0:
        raise DataError("every loss value is NaN or infinite; nothing to plot (did training diverge?).")
    if logy is None:
        logy = bool((finite > 0).all() and finite.max() / finite.min() > 100)
    fig, (panel,) = _panels(ax, path, 1, 6.0, 4.0)
    from matplotlib.ticker import MaxNLocator
    for name, v in arrays.items():
        at = np.flatnonzero(np.isfinite(v))  # NaN skipped, not breaking the line (a curve of gaps drew nothing)
        panel.plot(at + 1, v[at], marker="o" if at.size <= 30 else None, markersize=3, label=name)
    panel.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs or steps: no 1.5
    if max(v.size for v in arrays.values()) == 1:  # the locator falls back to fractions on a range under one
        panel.set_xticks([1])
    if logy:
        panel.set_yscale("log")
    panel.set_xlabel(xlabel)
    panel.set_ylabel("loss")
    panel.grid(alpha=0.3)
    if len(arrays) > 1:
        panel.legend(frameon=False)
    if ax is not None:
        return ax
    fig.tight_layout()
    return _save(fig, path, overwrite)
