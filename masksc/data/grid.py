"""The gene grid: which gene sits at each of the ``g x s`` positions, and which patch it is in.

Grid position ``j`` (0 .. g*s-1) is row ``j // s``, column ``j % s`` (row-major). Patches are
``P x P`` blocks numbered row-major: position (r, c) is in patch ``(r // P) * (s // P) + c // P``.

Orders:

* ``"hvg"``: genes in the given (HVG rank) order, filling the grid row-major (the paper's
  implicit layout);
* ``"correlation"``: co-expressed genes adjacent. Genes are ordered by the leaves of an
  average-linkage hierarchical clustering on ``1 - corr`` (Pearson correlation between genes,
  computed on a seeded subsample of at most ``n_sample`` cells, densified only for that
  subsample), and the grid is filled *patch-major* (patch 0's P*P positions row-major within
  the patch, then patch 1, ...), so that each patch holds P*P consecutive genes of the
  ordering, i.e. one co-expression module, rather than spreading a module along a grid row.

Padding (fewer genes than g*s) takes the last positions of the fill order: the last
row-major positions for "hvg", the last patches for "correlation". Padding columns never hold
values; ``genes`` has ``""`` there and ``is_padding`` is True.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import scipy.sparse as sp

from masksc.checks import check_flags, check_seed
from masksc.data.validate import check_count
from masksc.errors import DataError, warn

ORDERS = ("hvg", "correlation")


def correlation_order(X: sp.csr_matrix, n_sample: int = 2000, seed: int = 0) -> np.ndarray:
    """Permutation of the columns of ``X`` (cells x genes) placing correlated genes next to each
    other: leaf order of average-linkage clustering on 1 - Pearson correlation over at most
    ``n_sample`` randomly chosen cells. Genes constant on the sample get correlation 0."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n_sample, seed = check_count("n_sample", n_sample), check_seed(seed)  # numpy's own errors named neither
    n = X.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, n_sample), replace=False))
    D = np.asarray(X[rows].toarray(), dtype=np.float64)
    if not np.isfinite(D).all():
        raise DataError("the expression matrix holds NaN or infinite values, which have no correlation; fix: "
                        "remove or replace them (masksc.data.validate_counts names the cells).")
    D -= D.mean(axis=0)
    norm = np.linalg.norm(D, axis=0)
    norm[norm == 0] = np.inf
    D /= norm
    corr = D.T @ D
    dist = np.clip(1.0 - corr, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    if dist.shape[0] < 2:
        return np.arange(dist.shape[0])
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def _fill_positions(shape, patch, order):
    """Grid positions in fill order: row-major ('hvg') or patch-major ('correlation')."""
    g, s = shape
    pos = np.arange(g * s)
    if order == "hvg":
        return pos
    r, c = pos // s, pos % s
    key = ((r // patch) * (s // patch) + c // patch) * patch * patch + (r % patch) * patch + (c % patch)
    return np.argsort(key, kind="stable")


class GridLayout:
    """Maps selected genes to a ``g x s`` grid of ``P x P`` patches (see module doc).

    Attributes: ``shape`` (g, s); ``patch`` P; ``order``; ``n_patches`` G = (g//P)*(s//P);
    ``genes`` list[str] [g*s] ("" = padding); ``is_padding`` bool [g*s]; ``patch_ids`` int64
    [g*s]; ``source_genes`` the gene list (column order) of matrices passed to ``to_grid``.
    """

    def __init__(self, shape, patch, order, genes, source_genes):
        shape = list(shape)
        self.shape = (int(shape[0]), int(shape[1])) if len(shape) == 2 else (0, 0)
        self.patch = int(patch)
        self.order = order
        self.genes = list(genes)
        self.source_genes = list(source_genes)
        g, s = self.shape
        P = self.patch
        real_genes = [x for x in self.genes if x != ""]
        bad = (f"its shape {shape} is not two numbers" if len(shape) != 2 else
               f"its shape {shape} or patch {patch!r} is not whole" if [g, s, P] != [*shape, patch] else
               f"it lists {len(self.genes)} grid genes for a {g}x{s} grid ({g * s} positions)"
               if len(self.genes) != g * s else
               f"a {g}x{s} grid is not divisible into {P}x{P} patches" if P < 1 or g % P or s % P else
               f"order {order!r} is not one of {ORDERS}" if order not in ORDERS else
               "a grid gene sits at two positions" if len(set(real_genes)) != len(real_genes) else
               "its source genes repeat" if len(set(self.source_genes)) != len(self.source_genes) else None)
        if bad:
            raise DataError(f"the layout is corrupt ({bad}), e.g. an edited checkpoint config.json; fix: restore it "
                            "or retrain.")
        self.is_padding = np.array([x == "" for x in self.genes], dtype=np.bool_)
        pos = np.arange(g * s)
        self.patch_ids = ((pos // s // P) * (s // P) + (pos % s) // P).astype(np.int64)
        src = pd.Index(self.source_genes)
        real = np.flatnonzero(~self.is_padding)
        cols = src.get_indexer([self.genes[j] for j in real])
        if (cols < 0).any():
            raise DataError(f"the layout is corrupt ({int((cols < 0).sum())} grid genes are not among its source "
                            "genes), e.g. an edited checkpoint config.json; fix: restore it or retrain.")
        # to_grid: take source columns `_src_cols` and write them to grid positions `_grid_pos`
        self._src_cols, self._grid_pos = cols.astype(np.int64), real.astype(np.int64)

    @property
    def n_patches(self) -> int:
        """Gene tokens per cell: (g / P) * (s / P)."""
        return (self.shape[0] // self.patch) * (self.shape[1] // self.patch)

    @classmethod
    def fit(cls, X_csr, genes, shape=(64, 64), patch: int = 4, order: str = "hvg", strict: bool = False,
            n_sample: int = 2000, seed: int = 0) -> GridLayout:
        """Lay out ``genes`` (the columns of ``X_csr``, in HVG rank order) on a ``shape`` grid.

        Keeps the first g*s genes; with fewer, pads the end of the grid with a warning (a
        DataError under ``strict``). ``order="correlation"`` uses ``X_csr`` (cells x genes,
        any sparse/dense matrix) on a subsample of ``n_sample`` cells drawn with ``seed``.
        """
        check_flags(strict=strict)
        try:
            g, s = shape
            # True is 1 to int(): patch=True built 1 x 1 patches without a word
            whole = [int(g), int(s), int(patch)] == [g, s, patch] and not any(
                isinstance(v, (bool, np.bool_)) for v in (g, s, patch))
        except (TypeError, ValueError, OverflowError):  # not two values, NaN, inf, text
            whole = False
        if not whole:
            raise DataError(f"grid shape {shape!r} or patch {patch!r} is not whole (the shape is two numbers, g and "
                            "s); fix: pass whole numbers, e.g. shape=(64, 64), patch=4.")
        g, s, patch = int(g), int(s), int(patch)
        if patch < 1:
            raise DataError(f"patch {patch} must be >= 1 (the side of a patch, in grid positions); fix: e.g. patch=4.")
        if g < 1 or s < 1 or g % patch or s % patch:
            raise DataError(f"grid {g}x{s} is not divisible into {patch}x{patch} patches; fix: choose g and s "
                            "multiples of the patch size.")
        if order not in ORDERS:
            raise DataError(f"order={order!r}; fix: use one of {ORDERS}.")
        genes = [str(x) for x in genes]
        if len(set(genes)) != len(genes) or "" in genes:
            raise DataError("gene names must be unique and non-empty; fix: adata.var_names_make_unique().")
        if X_csr is not None and X_csr.shape[1] != len(genes):
            raise DataError(f"X has {X_csr.shape[1]} columns but {len(genes)} genes were given; fix: pass the "
                            "gene names of X's columns.")
        n = g * s
        if len(genes) < n:
            msg = f"{len(genes)} genes for a {g}x{s} grid ({n} positions)"
            if strict:
                raise DataError(f"{msg}; fix: select more genes (n_top_genes >= {n}), a smaller grid, or "
                                "strict=False to pad with zeros.")
            warn(f"{msg}: padding the last {n - len(genes)} positions with zeros")
        chosen = np.arange(min(n, len(genes)))
        if order == "correlation":
            if X_csr is None:
                raise DataError("order='correlation' needs the expression matrix; fix: pass X_csr.")
            X = X_csr if sp.issparse(X_csr) else sp.csr_matrix(X_csr)
            chosen = chosen[correlation_order(sp.csr_matrix(X)[:, chosen], n_sample, seed)]
        grid = [""] * n
        for p, gi in zip(_fill_positions((g, s), patch, order), chosen):
            grid[p] = genes[gi]
        return cls((g, s), patch, order, grid, genes)

    def to_grid(self, X) -> sp.csr_matrix:
        """Cells in grid order: CSR float32 [n, g*s]; column j = grid position j. ``X`` is a
        matrix whose columns are ``source_genes``, or an AnnData (genes matched by name)."""
        if hasattr(X, "var_names"):
            names = pd.Index(X.var_names)
            if not names.is_unique:
                repeated = names[names.duplicated()].unique().tolist()
                raise DataError(f"the data's gene names repeat (e.g. {repeated[:5]}), so they cannot be matched to the "
                                "grid's; fix: adata.var_names_make_unique(), or preprocess the data with the same "
                                "Preprocessor first.")
            idx = names.get_indexer([self.genes[j] for j in self._grid_pos])
            if (idx < 0).any():
                miss = [self.genes[j] for j, i in zip(self._grid_pos, idx) if i < 0]
                raise DataError(f"{len(miss)} grid genes are missing from the data (e.g. {miss[:5]}); "
                                "fix: preprocess the data with the same Preprocessor first.")
            X, cols = X.X, idx
        else:
            if X.shape[1] != len(self.source_genes):
                raise DataError(f"X has {X.shape[1]} columns but the layout was fitted on "
                                f"{len(self.source_genes)} genes; fix: pass the preprocessed matrix "
                                "(columns = Preprocessor.genes_) or an AnnData.")
            cols = self._src_cols
        X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)
        sub = X[:, cols].tocoo()
        out = sp.csr_matrix((sub.data.astype(np.float32), (sub.row, self._grid_pos[sub.col])),
                            shape=(X.shape[0], self.shape[0] * self.shape[1]))
        out.sort_indices()
        out.eliminate_zeros()
        return out

    def to_dict(self) -> dict:
        """JSON-able description (``from_dict`` restores an identical layout)."""
        return {"shape": list(self.shape), "patch": self.patch, "order": self.order, "genes": self.genes,
                "source_genes": self.source_genes}

    @classmethod
    def from_dict(cls, d: dict) -> GridLayout:
        """Rebuild from :meth:`to_dict` output."""
        try:
            return cls(d["shape"], d["patch"], d["order"], d["genes"], d["source_genes"])
        except DataError:  # a layout's own corruption, named
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a GridLayout dict ({type(exc).__name__}: {exc}); fix: pass GridLayout.to_dict() "
                            "output.") from exc
