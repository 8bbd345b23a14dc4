"""GridLayout: exact positions, padding, patch ids, to_grid against a dense numpy construction."""
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from masksc.data import GridLayout
from masksc.errors import DataError


def _data(n=50, n_genes=14, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(0.5, size=(n, n_genes)).astype(np.float32)
    return sp.csr_matrix(X), [f"g{i}" for i in range(n_genes)]


def _dense_grid(X, genes, layout):
    """Oracle: place each gene's column at its grid position in a dense [n, g*s] array."""
    D = np.zeros((X.shape[0], layout.shape[0] * layout.shape[1]), dtype=np.float32)
    col = {g: i for i, g in enumerate(genes)}
    for j, g in enumerate(layout.genes):
        if g:
            D[:, j] = X[:, col[g]].toarray().ravel()
    return D


def test_hvg_positions_padding_patches():
    X, genes = _data()
    with pytest.warns(UserWarning, match="padding the last 2 positions"):
        lay = GridLayout.fit(X, genes, shape=(4, 4), patch=2, order="hvg")
    assert lay.genes == genes + ["", ""]
    np.testing.assert_array_equal(lay.is_padding, [False] * 14 + [True] * 2)
    np.testing.assert_array_equal(lay.patch_ids, [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
    assert lay.n_patches == 4
    G = lay.to_grid(X)
    assert G.format == "csr" and G.dtype == np.float32 and G.shape == (50, 16)
    np.testing.assert_array_equal(G.toarray(), _dense_grid(X, genes, lay))
    assert G[:, lay.is_padding].nnz == 0


def test_strict_refuses_padding():
    X, genes = _data()
    with pytest.raises(DataError, match="14 genes for a 4x4 grid"):
        GridLayout.fit(X, genes, shape=(4, 4), patch=2, strict=True)


def test_extra_genes_dropped_in_rank_order():
    X, genes = _data(n_genes=14)
    lay = GridLayout.fit(X, genes, shape=(2, 6), patch=2)
    assert lay.genes == genes[:12] and not lay.is_padding.any()
    np.testing.assert_array_equal(lay.to_grid(X).toarray(), X.toarray()[:, :12])


def test_bad_patch_and_order():
    X, genes = _data()
    with pytest.raises(DataError, match="not divisible"):
        GridLayout.fit(X, genes, shape=(4, 5), patch=2)
    with pytest.raises(DataError, match="order="):
        GridLayout.fit(X, genes, shape=(4, 4), patch=2, order="random")


def test_correlation_puts_modules_in_patches():
    # 4 modules of 4 genes, each driven by its own latent factor; genes interleaved in rank order
    rng = np.random.default_rng(1)
    z = rng.gamma(1.0, 2.0, size=(400, 4))
    module = np.arange(16) % 4
    X = sp.csr_matrix(rng.poisson(z[:, module] * rng.uniform(0.5, 1.5, 16)).astype(np.float32))
    genes = [f"m{m}_{i}" for i, m in enumerate(module)]
    lay = GridLayout.fit(X, genes, shape=(4, 4), patch=2, order="correlation")
    assert sorted(lay.genes) == sorted(genes)
    for p in range(4):
        mods = {module[genes.index(g)] for g, pid in zip(lay.genes, lay.patch_ids) if pid == p}
        assert len(mods) == 1, f"patch {p} mixes modules {mods}"
    np.testing.assert_array_equal(lay.to_grid(X).toarray(), _dense_grid(X, genes, lay))


def test_correlation_padding_fills_last_patches():
    X, genes = _data(n_genes=12)
    with pytest.warns(UserWarning):
        lay = GridLayout.fit(X, genes, shape=(4, 4), patch=2, order="correlation")
    assert set(lay.patch_ids[lay.is_padding]) == {3}
    np.testing.assert_array_equal(lay.to_grid(X).toarray(), _dense_grid(X, genes, lay))


def test_dict_roundtrip_and_anndata_input():
    X, genes = _data()
    with pytest.warns(UserWarning):
        lay = GridLayout.fit(X, genes, shape=(4, 4), patch=2)
    lay2 = GridLayout.from_dict(json.loads(json.dumps(lay.to_dict())))
    assert lay2.genes == lay.genes and (lay2.patch_ids == lay.patch_ids).all()
    perm = np.random.default_rng(0).permutation(len(genes))
    a = ad.AnnData(X=X[:, perm], var=pd.DataFrame(index=[genes[i] for i in perm]))
    np.testing.assert_array_equal(lay2.to_grid(a).toarray(), lay.to_grid(X).toarray())
    with pytest.raises(DataError, match="columns"):
        lay.to_grid(X[:, :5])
    with pytest.raises(DataError, match="missing"):
        lay.to_grid(a[:, 2:])


def test_corrupt_layout_dict_refused():
    X, genes = _data()
    with pytest.warns(UserWarning):
        d = GridLayout.fit(X, genes, shape=(4, 4), patch=2).to_dict()
    corrupt = r"^the layout is corrupt \({}\), e\.g\. an edited checkpoint config\.json; fix: restore it or retrain"
    with pytest.raises(DataError, match=corrupt.format(r"it lists 15 grid genes for a 4x4 grid \(16 positions\)")):
        GridLayout.from_dict({**d, "genes": d["genes"][:-1]})
    with pytest.raises(DataError, match=corrupt.format("1 grid genes are not among its source genes")):
        GridLayout.from_dict({**d, "genes": ["nope"] + d["genes"][1:]})
    # these were taken: wrong patch ids, an order no code knows, a gene read twice
    with pytest.raises(DataError, match=corrupt.format("a 4x4 grid is not divisible into 3x3 patches")):
        GridLayout.from_dict({**d, "patch": 3})
    with pytest.raises(DataError, match=corrupt.format(r"order 'bogus' is not one of \('hvg', 'correlation'\)")):
        GridLayout.from_dict({**d, "order": "bogus"})
    with pytest.raises(DataError, match=corrupt.format("a grid gene sits at two positions")):
        GridLayout.from_dict({**d, "genes": [d["genes"][1]] + d["genes"][1:]})
    with pytest.raises(DataError, match=corrupt.format("its source genes repeat")):
        GridLayout.from_dict({**d, "source_genes": d["source_genes"][:-1] + d["source_genes"][:1]})
    # a fractional patch or side was cut to a whole one (2.5 -> 2) and taken
    with pytest.raises(DataError, match=corrupt.format(r"its shape \[4, 4\] or patch 2\.5 is not whole")):
        GridLayout.from_dict({**d, "patch": 2.5})
    with pytest.raises(DataError, match=corrupt.format(r"its shape \[4\.5, 4\] or patch 2 is not whole")):
        GridLayout.from_dict({**d, "shape": [4.5, 4]})
    with pytest.raises(DataError, match=r"grid shape \(16\.5, 16\) or patch 4 is not whole"):  # fit cut it too
        GridLayout.fit(X, genes, shape=(16.5, 16), patch=4)
    for shape, patch in (((8, 8), float("nan")), ((8, 8), float("inf")), ((float("nan"), 8), 4)):  # a ValueError
        with pytest.raises(DataError, match=r"is not whole .*; fix: pass whole numbers"):  # and an OverflowError
            GridLayout.fit(X, genes, shape=shape, patch=patch)
    with pytest.raises(DataError, match=r"patch 0 must be >= 1 .*; fix: e\.g\. patch=4"):  # "into 0x0 patches"
        GridLayout.fit(X, genes, shape=(16, 16), patch=0)
    # a shape not of two values: an IndexError (one), the third dropped silently (three), a TypeError (none)
    for shape in ((16,), (16, 16, 1), 16):
        with pytest.raises(DataError, match=r"is not whole \(the shape is two numbers, g and s\)"):
            GridLayout.fit(X, genes, shape=shape, patch=4)
        if isinstance(shape, tuple):
            with pytest.raises(DataError, match=corrupt.format(r"its shape \[.*\] is not two numbers")):
                GridLayout.from_dict({**d, "shape": list(shape)})


def test_repeated_gene_names_and_non_finite_values_are_named():
    """Both failed inside pandas / scipy."""
    X, genes = _data()
    with pytest.warns(UserWarning):
        lay = GridLayout.fit(X, genes, shape=(4, 4), patch=2)
    a = ad.AnnData(X=X, var=pd.DataFrame(index=[genes[0]] + genes[:-1]))
    with pytest.raises(DataError, match=rf"gene names repeat \(e\.g\. \['{genes[0]}'\]\).*var_names_make_unique"):
        lay.to_grid(a)
    bad = X.toarray()
    bad[1, 2] = np.nan
    with pytest.raises(DataError, match="NaN or infinite values, which have no correlation"):
        with pytest.warns(UserWarning):
            GridLayout.fit(bad, genes, shape=(4, 4), patch=2, order="correlation")
