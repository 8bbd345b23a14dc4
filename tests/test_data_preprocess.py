"""Preprocessor against scanpy, its serialisation, new-data handling and streaming fit."""
import fractions
import json
import re
import types
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from masksc.data import Preprocessor, load_demo, synthetic, write_synthetic_h5ad
from masksc.errors import DataError, UncheckedGenesWarning


@pytest.fixture(scope="module")
def counts():
    return synthetic(1200, 600, n_types=5, seed=1)


def _lognorm(a):
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def test_seurat_v3_equals_scanpy(counts):
    before = counts.X.copy()
    p = Preprocessor(n_top_genes=150).fit(counts)
    ref = sc.pp.highly_variable_genes(counts.copy(), flavor="seurat_v3", n_top_genes=150, inplace=False)
    assert p.input_kind_ == "counts" and p.flavor_ == "seurat_v3"
    assert set(p.genes_) == set(ref.index[ref["highly_variable"]])
    # HVG rank order = scanpy's normalised variance, descending (exact ties: lower index first)
    assert np.all(np.diff(ref.loc[p.genes_, "variances_norm"].to_numpy()) <= 1e-12)
    out = p.transform(counts)
    assert out.X.format == "csr" and out.X.dtype == np.float32
    assert list(out.var_names) == p.genes_
    np.testing.assert_allclose(out.X.toarray(), _lognorm(counts)[:, p.genes_].X.toarray(), rtol=1e-6, atol=1e-6)
    assert (counts.X != before).nnz == 0


def test_dispersion_equals_scanpy(counts):
    p = Preprocessor(n_top_genes=150, hvg_flavor="dispersion").fit(counts)
    ref = sc.pp.highly_variable_genes(_lognorm(counts), flavor="seurat", n_top_genes=150, inplace=False)
    assert set(p.genes_) == set(ref.index[ref["highly_variable"]])
    # rank order = scanpy's normalised dispersion, descending (ties may be ordered either way)
    assert np.all(np.diff(ref.loc[p.genes_, "dispersions_norm"].to_numpy()) <= 1e-9)


def test_dispersion_leaves_out_genes_that_do_not_vary_as_scanpy_does():
    """Genes without dispersion (never detected, or alike in every cell) filled n_top_genes;
    scanpy's seurat flavour never selects them and keeps fewer genes."""
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(200, 50)).astype(np.float32)
    X[:, :5] = 0  # never detected
    adata = ad.AnnData(X, var=pd.DataFrame(index=[f"g{i}" for i in range(50)]))
    for n_top in (10, 48):
        p = Preprocessor(n_top_genes=n_top, hvg_flavor="dispersion").fit(adata)
        ref = sc.pp.highly_variable_genes(_lognorm(adata), flavor="seurat", n_top_genes=n_top, inplace=False)
        assert set(p.genes_) == set(ref.index[ref["highly_variable"]])
        assert not {"g0", "g1", "g2", "g3", "g4"} & set(p.genes_)
    assert len(p.genes_) < 48
    alike = ad.AnnData(np.ones((20, 8), np.float32))
    with pytest.raises(DataError, match=r"none of the 8 genes has a dispersion score to rank it by: none varies "
                                        r"across the 20 cells, or .*fix: .* \(n_top_genes=None\)"):
        Preprocessor(n_top_genes=4, hvg_flavor="dispersion").fit(alike)


def test_scale_equals_scanpy(counts):
    p = Preprocessor(n_top_genes=100, scale=True, max_value=3.0).fit(counts)
    ref = _lognorm(counts)[:, p.genes_].copy()
    sc.pp.scale(ref, max_value=3.0)
    np.testing.assert_allclose(p.transform(counts).X.toarray(), ref.X, rtol=1e-4, atol=1e-5)


def test_target_sum_and_no_log1p_equal_scanpy(counts):
    p = Preprocessor(n_top_genes=100, target_sum=1e3).fit(counts)
    ref = counts.copy()
    sc.pp.normalize_total(ref, target_sum=1e3)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(p.transform(counts).X.toarray(), ref[:, p.genes_].X.toarray(), rtol=1e-6, atol=1e-6)
    q = Preprocessor(n_top_genes=100, log1p=False).fit(counts)
    ref = counts.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    np.testing.assert_allclose(q.transform(counts).X.toarray(), ref[:, q.genes_].X.toarray(), rtol=1e-6, atol=1e-4)
    assert ref[:, q.genes_].X.max() > 100  # normalised counts, not their log


def test_unclipped_scale_equals_scanpy(counts):
    p = Preprocessor(n_top_genes=100, scale=True, max_value=None).fit(counts)
    ref = _lognorm(counts)[:, p.genes_].copy()
    sc.pp.scale(ref)
    assert np.abs(ref.X).max() > 10  # beyond the default max_value=10: only unclipped scaling keeps these
    np.testing.assert_allclose(p.transform(counts).X.toarray(), ref.X, rtol=1e-4, atol=1e-5)


def test_scale_refused_for_many_genes():
    with pytest.raises(DataError, match="densifies"):
        Preprocessor(n_top_genes=4096, scale=True)


def test_qc_filters_equal_scanpy(counts):
    X = counts.X.toarray()
    X[:5] = 0  # empty cells
    X[5:10] = np.floor(X[5:10] / 10)  # small libraries
    a = ad.AnnData(sp.csr_matrix(X), obs=counts.obs.copy(), var=counts.var.copy())
    p = Preprocessor(n_top_genes=100, min_counts=60, min_cells=30)
    with pytest.warns(UserWarning, match="dropped"):
        p.fit(a)
    b = a.copy()
    sc.pp.filter_cells(b, min_counts=60)
    sc.pp.filter_genes(b, min_cells=30)
    ref = sc.pp.highly_variable_genes(b, flavor="seurat_v3", n_top_genes=100, inplace=False)
    assert p.n_cells_fit_ == b.n_obs
    assert set(p.genes_) == set(ref.index[ref["highly_variable"]])
    assert np.all(np.diff(ref.loc[p.genes_, "variances_norm"].to_numpy()) <= 1e-12)
    with pytest.warns(UserWarning, match="dropped"):
        out = p.transform(a)
    assert list(out.obs_names) == list(b.obs_names)


def test_zero_cells_without_min_counts(counts):
    X = counts.X[:400].toarray()
    X[[3, 7]] = 0
    a = ad.AnnData(sp.csr_matrix(X), obs=counts.obs[:400].copy(), var=counts.var.copy())
    with pytest.raises(DataError, match=r"2 of 400 cells have zero counts.*min_counts=1"):
        Preprocessor(n_top_genes=50).fit(a)
    p = Preprocessor(n_top_genes=50).fit(counts)
    with pytest.raises(DataError, match=rf"^2 cells \(rows 3 \({a.obs_names[3]}\), 7 \({a.obs_names[7]}\)\) have "
                                        "zero counts; fix: remove them first"):
        p.transform(a)


def test_cells_with_counts_only_in_genes_the_model_never_saw_are_named_as_such(counts):
    """Not "zero counts" with a filter_cells fix that would keep them: they have counts, in other genes."""
    p = Preprocessor(n_top_genes=50).fit(counts[:, :500])
    X = counts.X[:100].toarray()
    X[5, :500] = 0
    X[5, 550] = 3
    a = ad.AnnData(sp.csr_matrix(X), obs=counts.obs[:100].copy(), var=counts.var.copy())
    with pytest.raises(DataError, match=rf"^1 cell \(row 5 \({a.obs_names[5]}\)\) has no counts in the 500 genes of "
                                        r"the training data present here \(only in other genes\).*fix: remove them "
                                        "first") as exc:
        p.transform(a)
    assert "filter_cells" not in str(exc.value)
    # with training genes missing too (allowed, with a warning), the fix the message gives works
    dropped = [g for g in a.var_names[:500] if g not in p.genes_][:5]  # not among the model's HVGs
    fewer = a[:, ~a.var_names.isin(dropped)].copy()
    with pytest.warns(UserWarning, match="5 of the 500 genes"), pytest.raises(DataError) as exc:
        p.transform(fewer)
    code = str(exc.value).split("in Python: ", 1)[1].rstrip(".")
    scope = {"adata": fewer, "np": np, "model": types.SimpleNamespace(preprocessor=p)}
    exec(code, scope)
    assert scope["adata"].n_obs == 99 and fewer.obs_names[5] not in scope["adata"].obs_names
    with pytest.warns(UserWarning, match="5 of the 500 genes"):
        assert p.transform(scope["adata"]).n_obs == 99


def test_non_integer_where_counts_required(counts):
    p = Preprocessor(n_top_genes=50).fit(counts)
    b = counts[:50].copy()
    b.X = b.X * 1.5
    with pytest.raises(DataError, match="non-integer"):
        p.transform(b)


def test_negative_and_nan_refused(counts):
    b = counts[:50].copy()
    b.X = b.X.copy()
    b.X.data[0] = -1
    with pytest.raises(DataError, match="negative"):
        Preprocessor(n_top_genes=50).fit(b)
    b.X.data[0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        Preprocessor(n_top_genes=50).fit(b)


def test_bad_values_name_the_first_cell_holding_one(counts, tmp_path):
    """NaN, negative and fractional counts are named by the first cell holding one (its dataset row
    and name), in fit, in transform, in a later chunk, streamed from a file and, with rows=, by the
    rows of a larger dataset; a dense matrix alike. Every bad cell after it is counted, not named."""
    p = Preprocessor(n_top_genes=50, chunk_size=500).fit(counts)
    for value, what, fit_says in [(np.nan, "1 NaN and 0 infinite values", None),
                                  (-1.0, "2 negative values", None),
                                  (0.5, "non-integer values (2 entries", "looks like raw counts, but 2 of its")]:
        b = ad.AnnData(counts.X.toarray(), obs=counts.obs.copy(), var=counts.var.copy())
        b.X[[700, 900], 3] = value
        if value != value:
            b.X[900, 3] = 0.0  # one NaN
        expected = rf"{re.escape(what)}.* in cells 500\.\.999, the first in cell 700 \({b.obs_names[700]}\)"
        for data in (b, ad.AnnData(sp.csr_matrix(b.X), obs=b.obs, var=b.var)):
            with pytest.raises(DataError, match=expected):
                p.transform(data)
            # fitting judges the first 2000 cells (all 1200 here) before its chunks
            fitting = (rf"{re.escape(fit_says or what)}.* in cells 0\.\.1199.*the first in cell 700 "
                       rf"\({b.obs_names[700]}\)")
            with pytest.raises(DataError, match=fitting):
                Preprocessor(n_top_genes=50, chunk_size=500).fit(data)
        ad.AnnData(sp.csr_matrix(b.X), obs=b.obs, var=b.var).write_h5ad(tmp_path / "bad.h5ad")
        with pytest.raises(DataError, match=expected):
            p.transform(tmp_path / "bad.h5ad")
        cells = b[[5, 700, 12]].copy()
        with pytest.raises(DataError, match=rf"in 3 cells \(rows 40, 7000, 9\), the first in cell 7000 "
                                            rf"\({b.obs_names[700]}\)"):
            p.transform(cells, rows=np.array([40, 7000, 9]))
    with pytest.raises(DataError, match=r"the first in cell 0 \(cell_0000\)"):  # fit's first chunk, its detection
        bad = counts.X.toarray()
        bad[0, 1] = np.inf
        Preprocessor(n_top_genes=50).fit(ad.AnnData(bad, obs=counts.obs, var=counts.var))


def test_counts_with_a_stray_fraction_name_its_cell_when_the_input_kind_is_detected(counts):
    """The detection step's "looks like raw counts, but ... not whole numbers" names the first cell."""
    b = counts.copy()
    b.X = b.X.toarray()
    b.X[7, np.flatnonzero(b.X[7])[0]] = 0.5
    with pytest.raises(DataError, match=rf"not whole numbers \(e\.g\. 0\.5, the first in cell 7 \({b.obs_names[7]}\)\)"):
        Preprocessor(n_top_genes=50).fit(b)


@pytest.mark.parametrize("rows", [np.arange(3), np.zeros((4, 1), dtype=int), np.arange(4) + 0.5])
def test_rows_must_be_one_integer_row_per_cell(counts, rows):
    p = Preprocessor(n_top_genes=50).fit(counts)
    with pytest.raises(DataError, match=r"rows must be the 4 cells' integer rows in their dataset \(1-D, one per "
                                        r"cell\), got"):
        p.transform(counts[:4], rows=rows)


def test_duplicate_genes_refused(counts):
    b = counts[:50].copy()
    b.var_names = ["dup"] * 2 + list(b.var_names[2:])
    with pytest.raises(DataError, match="var_names_make_unique"):
        Preprocessor(n_top_genes=50).fit(b)


def test_a_repeated_extra_gene_is_ignored_and_a_repeated_gene_read_is_refused(counts):
    p = Preprocessor(n_top_genes=50).fit(counts[:, :500])  # genes 500.. are extra to it
    b = counts[:100].copy()
    b.var_names = list(b.var_names[:500]) + ["extra"] * 100  # anndata warns; 10x symbols often repeat
    np.testing.assert_array_equal(p.transform(b).X.toarray(), p.transform(counts[:100, :500]).X.toarray())
    on_grid, library_only = p.genes_[0], next(g for g in p.input_genes_ if g not in set(p.genes_))
    for read in (on_grid, library_only):  # library sizes sum the training data's genes: those are read too
        c = counts[:100].copy()
        c.var_names = [read if g == counts.var_names[550] else g for g in c.var_names]
        with pytest.raises(DataError, match=rf"1 gene names are duplicated \(e.g. \['{read}'\]\) among the genes "
                                            "the model reads.*var_names_make_unique"):
            p.transform(c)
    log = _lognorm(counts[:, :500])
    q = Preprocessor(n_top_genes=50).fit(log)  # log input: library sizes are not summed, so only the grid is read
    d = _lognorm(counts[:100, :500])
    first, second = [g for g in d.var_names if g not in set(q.genes_)][:2]  # training genes, off the grid
    expected = q.transform(d).X.toarray()
    d.var_names = [first if g == second else g for g in d.var_names]
    np.testing.assert_array_equal(q.transform(d).X.toarray(), expected)


def test_roundtrip_dict_and_gene_reordering(counts):
    p = Preprocessor(n_top_genes=80, scale=True).fit(counts)
    q = Preprocessor.from_dict(json.loads(json.dumps(p.to_dict())))
    rng = np.random.default_rng(0)
    shuffled = counts[:200, rng.permutation(counts.n_vars)].copy()
    np.testing.assert_array_equal(q.transform(shuffled).X.toarray(), p.transform(counts[:200]).X.toarray())


@pytest.mark.parametrize("field, value", [("genes", "dup"), ("input_genes", "dup"), ("input_genes", "abc"),
                                          ("genes", [1, 2])])
def test_a_damaged_gene_list_is_named_as_the_dicts(counts, field, value):
    """A repeated gene in a saved transform blamed the user's data (var_names_make_unique); a
    string where the list goes was pandas' TypeError."""
    d = Preprocessor(n_top_genes=80).fit(counts).to_dict()
    d[field] = [d[field][0]] + d[field][:-1] if value == "dup" else value
    with pytest.raises(DataError, match=rf"not a Preprocessor dict \({field} is not a list of distinct gene names\)"):
        Preprocessor.from_dict(d)


def test_missing_genes_named(counts):
    p = Preprocessor(n_top_genes=80).fit(counts)
    missing = p.genes_[:3]
    b = counts[:, [g for g in counts.var_names if g not in missing]].copy()
    with pytest.raises(DataError, match=r"3 of the 80 genes .* missing") as e:
        p.transform(b)
    assert missing[0] in str(e.value)


def test_fewer_genes_than_requested_keeps_all(counts):
    few = counts[:, :40].copy()
    n_empty = int((np.asarray(few.X.sum(axis=1)).ravel() < 1).sum())  # below min_counts=1
    assert n_empty > 0
    with pytest.warns(UserWarning, match=f"dropped {n_empty} of 1200 cells with fewer than 1 counts"):
        p = Preprocessor(n_top_genes=10_000, min_counts=1).fit(few)
    assert sorted(p.genes_) == sorted(counts.var_names[:40])


def test_demo_detected_as_log_normalised():
    demo = load_demo()
    assert demo.shape == (700, 765) and demo.X.format == "csr" and demo.X.dtype == np.float32
    assert demo.obs["label"].nunique() == 10
    p = Preprocessor(n_top_genes=300).fit(demo)
    assert p.input_kind_ == "log" and p.flavor_ == "dispersion"
    ref = sc.pp.highly_variable_genes(demo.copy(), flavor="seurat", n_top_genes=300, inplace=False)
    assert set(p.genes_) == set(ref.index[ref["highly_variable"]])
    np.testing.assert_array_equal(p.transform(demo).X.toarray(), demo[:, p.genes_].X.toarray())
    with pytest.raises(DataError, match="seurat_v3"):
        Preprocessor(hvg_flavor="seurat_v3").fit(demo)


def test_counts_given_to_a_log_fitted_preprocessor_are_refused(counts):
    """Fitted on log values, the transform refuses raw counts, deep ones by their size and
    shallow ones (all under the log ceiling) by being whole numbers."""
    p = Preprocessor(n_top_genes=80).fit(_lognorm(counts))
    assert p.input_kind_ == "log"
    with pytest.raises(DataError, match=r"values up to \d+ in cells 0\.\.\d+ look like raw counts"):
        p.transform(counts)  # counts up to 77
    shallow = counts[:200].copy()
    shallow.X = shallow.X.minimum(20.0).tocsr()
    with pytest.raises(DataError, match=r"whole-number values in cells 0\.\.199 look like raw counts.*fix: pass "
                                        "log-normalised"):
        p.transform(shallow)
    told = Preprocessor(n_top_genes=80, input="log").fit(_lognorm(counts))  # the user vouches for whole log values
    told.transform(shallow)


def test_streaming_fit_equals_in_memory(tmp_path):
    path = tmp_path / "s.h5ad"
    write_synthetic_h5ad(path, 2500, 300, n_types=4, seed=3, chunk_size=1024)
    mem = ad.read_h5ad(path)
    for kw in ({"n_top_genes": 120}, {"n_top_genes": 120, "hvg_flavor": "dispersion", "scale": True}):
        a = Preprocessor(**kw).fit(mem)
        b = Preprocessor(**kw, chunk_size=700).fit(path)
        c = Preprocessor(**kw, chunk_size=512).fit(ad.read_h5ad(path, backed="r"))
        assert a.genes_ == b.genes_ == c.genes_
        da, db = a.to_dict(), b.to_dict()
        da["params"].pop("chunk_size"), db["params"].pop("chunk_size")
        if "scale_mean" in da:
            np.testing.assert_allclose(da.pop("scale_mean"), db.pop("scale_mean"), rtol=1e-10)
            np.testing.assert_allclose(da.pop("scale_std"), db.pop("scale_std"), rtol=1e-10)
        assert da == db
        np.testing.assert_allclose(b.transform(path).X.toarray(), a.transform(mem).X.toarray(), rtol=1e-6)


def test_input_with_unsorted_indices_and_explicit_zeros_untouched(counts):
    X = counts.X[:300].copy()
    X.data[::7] = 0  # explicit zeros
    X.has_sorted_indices = False
    X.indices[:2], X.data[:2] = X.indices[:2][::-1].copy(), X.data[:2][::-1].copy()  # unsorted row 0
    a = ad.AnnData(X=X, obs=counts.obs[:300].copy(), var=counts.var.copy())
    data, indices = X.data.copy(), X.indices.copy()
    p = Preprocessor(n_top_genes=50, min_counts=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        p.fit(a)
        p.transform(a)
    np.testing.assert_array_equal(a.X.data, data)
    np.testing.assert_array_equal(a.X.indices, indices)


def _split_entries(X: sp.csr_matrix) -> sp.csr_matrix:
    """The same matrix with every count stored as two entries of one (cell, gene), as another
    tool may write it (scipy reads the entries of one position as their sum)."""
    coo = X.tocoo()
    rows, cols = np.r_[coo.row, coo.row], np.r_[coo.col, coo.col]
    half = np.floor(coo.data / 2)
    values = np.r_[half, coo.data - half]
    order = np.lexsort((cols, rows))
    indptr = np.searchsorted(rows[order], np.arange(X.shape[0] + 1))
    return sp.csr_matrix((values[order], cols[order], indptr), shape=X.shape)


def test_a_matrix_storing_a_count_as_several_entries_is_read_as_their_sum(counts, tmp_path):
    """HVGs, normalisation and the streamed path see the summed counts, as scipy defines them
    (per-entry log1p and library sizes gave other genes and values), and the user's matrix keeps
    its own entries."""
    a = counts[:400].copy()
    split = _split_entries(a.X)
    assert not split.has_canonical_format and (split != a.X).nnz == 0
    b = ad.AnnData(X=split, obs=a.obs.copy(), var=a.var.copy())
    stored = (split.data.copy(), split.indices.copy(), split.indptr.copy())
    p, q = Preprocessor(n_top_genes=100).fit(a), Preprocessor(n_top_genes=100).fit(b)
    assert p.genes_ == q.genes_
    np.testing.assert_allclose(q.transform(b).X.toarray(), p.transform(a).X.toarray(), rtol=1e-6)
    for kept, now in zip(stored, (b.X.data, b.X.indices, b.X.indptr)):
        np.testing.assert_array_equal(now, kept)
    path = tmp_path / "split.h5ad"
    b.write_h5ad(path)  # anndata writes the entries as they are
    assert Preprocessor(n_top_genes=100, chunk_size=150).fit(path).genes_ == p.genes_
    np.testing.assert_allclose(p.transform(path).X.toarray(), p.transform(a).X.toarray(), rtol=1e-6)


def test_counts_with_stray_non_integer_values_refused(counts):
    b = counts[:300].copy()
    b.X = b.X.copy()
    b.X.data[[5, 9]] = 2.5  # corrected counts left unrounded: everything else is whole
    with pytest.raises(DataError,
                       match=r"raw counts, but 2 of its \d+ non-zero values .* not whole numbers \(e\.g\. 2\.5, the "
                             r"first in cell 0 \(cell_0000\)\)"):
        Preprocessor(n_top_genes=50).fit(b)
    assert Preprocessor(n_top_genes=50).fit(_lognorm(counts)).input_kind_ == "log"  # log data: no whole values


def test_unnamed_genes_must_match_the_training_profile(counts):
    """Synthesised names (gene_0000.. as read from an scDeepCluster file) match by position only:
    other genes under the same names are refused, the same genes (other cells) accepted."""
    p = Preprocessor(n_top_genes=80).fit(counts)
    p.transform(counts[:100])
    other = counts[:300].copy()
    other.var_names = np.random.default_rng(0).permutation(counts.var_names)
    with pytest.raises(DataError, match=r"named gene_0000.* Spearman r = -?0\.\d\d .* train a new model on this data"):
        p.transform(other)
    with pytest.raises(DataError, match=r"named gene_0000.* in cells 0\.\.299"):  # small chunks still add up
        for _ in p.transform_chunks(other, chunk_size=10):
            pass
    with pytest.raises(DataError, match=r"named gene_0000\.\. .* in cells 3\.\.302"):
        p.check_gene_profile(other.X[3:303], other.var_names, " in cells 3..302")
    p.check_gene_profile(counts.X[:300], counts.var_names)  # the same genes pass
    # a preprocessor saved before detection rates were kept cannot check: it said nothing before
    old = Preprocessor.from_dict({k: v for k, v in p.to_dict().items() if k != "detection"})
    with pytest.warns(UncheckedGenesWarning, match=r"saved by a masksc release that did not keep its training data's "
                                                   r"per-gene detection rates"):
        old.transform(other)
    named = counts[:300].copy()
    named.var_names = [f"G{i}" for i in range(counts.n_vars)]
    q = Preprocessor(n_top_genes=80).fit(named)
    shuffled = named.copy()
    shuffled.var_names = np.random.default_rng(0).permutation(named.var_names)
    q.transform(shuffled)  # real names are trusted: no profile check
    old = {k: v for k, v in p.to_dict().items() if k not in ("detection", "input_genes")}  # an earlier checkpoint
    Preprocessor.from_dict(old).transform(other)
    assert Preprocessor.from_dict(old).to_dict() == old  # and it saves again as it was


def test_library_size_summed_over_the_training_genes(counts):
    p = Preprocessor(n_top_genes=80).fit(counts)
    ref = p.transform(counts[:200]).X.toarray()
    extra = ad.AnnData(sp.hstack([counts.X[:200], sp.csr_matrix(np.full((200, 3), 9.0, np.float32))]).tocsr(),
                       var=ad.AnnData(var=None).var.reindex(list(counts.var_names) + ["x0", "x1", "x2"]))
    np.testing.assert_array_equal(p.transform(extra).X.toarray(), ref)  # genes unseen in training don't count
    unused = [g for g in counts.var_names if g not in p.genes_][:10]
    fewer = counts[:200, [g for g in counts.var_names if g not in unused]].copy()
    with pytest.warns(UserWarning, match=r"10 of the 600 genes of the training data are missing from the data "
                                         r"\(none on the model's grid\)"):
        out = p.transform(fewer).X.toarray()
    lib = np.asarray(fewer.X.sum(1)).ravel()  # oracle: normalised over the genes present
    expect = np.log1p(fewer[:, p.genes_].X.toarray() * (1e4 / lib)[:, None])
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    old = {k: v for k, v in p.to_dict().items() if k != "input_genes"}
    np.testing.assert_allclose(Preprocessor.from_dict(old).transform(extra).X.toarray(),
                               np.log1p(counts[:200, p.genes_].X.toarray() * (1e4 / np.asarray(
                                   extra.X.sum(1)).ravel())[:, None]), rtol=1e-5, atol=1e-6)


def test_too_few_genes_named_as_the_cause():
    with pytest.raises(DataError, match=r"on the 8 genes that vary across the \d+ cells .*fix: pass the full "
                                        r"gene set of the experiment, not a selection of it \(8 genes were given\)"):
        Preprocessor(n_top_genes=50, min_counts=1).fit(synthetic(300, 8, n_types=3, seed=0))
    # 500 genes given, but 20 cells: the cells are the cause
    with pytest.raises(DataError, match=r"on the \d+ genes that vary across the 20 cells .*fix: pass more cells or "
                                        r"lower min_cells \(now 3\): in 20 cells only \d+ of the 500 genes vary\.$"):
        Preprocessor(n_top_genes=50, min_cells=3).fit(synthetic(20, 500, n_types=3, seed=0))


def test_a_trend_fit_on_under_one_gene_a_local_fit_is_refused_not_a_segfault():
    """skmisc's loess crashes the process when span x points < 1: 3 varying genes at span 0.3 did
    (exit 139, scanpy's seurat_v3 too), as did a small span over many genes. Each run here in a
    child process, so that a crash fails the test instead of ending the run."""
    import subprocess
    import sys
    code = """
import numpy as np, anndata as ad
from masksc.data import Preprocessor, synthetic
from masksc.errors import DataError
X = np.ones((50, 100), np.float32)
X[:, :3] = np.random.default_rng(0).poisson(3, (50, 3)) + 1
three = ad.AnnData(X)
three.var_names = [f"g{i}" for i in range(100)]
for data, span in ((three, 0.3), (synthetic(200, 300, n_types=3, seed=0), 0.001)):
    try:
        Preprocessor(n_top_genes=10, span=span).fit(data)
    except DataError as exc:
        print(exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    three, small_span = proc.stdout.strip().split("\n")
    assert re.match(r"only 3 genes vary across the 50 cells, too few for the seurat_v3 HVG trend fit; fix: ", three)
    assert re.match(r"span=0.001 is too small for the seurat_v3 HVG trend fit over the \d+ genes that vary across "
                    r"the 200 cells: each local fit would take under one gene; fix: a larger span, e\.g\. Seurat's "
                    r"0\.3 \(Preprocessor\(span=0\.3\)\)", small_span)
    Preprocessor(n_top_genes=10, span=0.3).fit(synthetic(200, 300, n_types=3, seed=0))  # the span named fits


def test_counts_with_rounding_error_are_named_as_such_not_taken_as_log_values():
    """Counts a float product left off whole numbers by 1e-7 (max 26, under the log bound) were
    taken as log-normalised without a word: no normalisation, no log1p, other HVG."""
    rng = np.random.default_rng(0)
    C = rng.poisson(np.outer(rng.lognormal(0, .3, 500), rng.gamma(0.3, 1.5, 800))).astype(np.float64)
    assert 0 < C.max() <= 30
    off = ad.AnnData(sp.csr_matrix(C * (1 + 1e-7)))
    off.var_names = [f"g{i}" for i in range(800)]
    rounding = (r"X looks like raw counts with rounding error: \d+ of its \d+ non-zero values in cells 0\.\.499 are "
                r"off a whole number by under 1e-05 of it \(e\.g\. \d+\.\d{5,}, the first in cell .*\); "
                r"fix: round them, "
                r"e\.g\. adata\.X = np\.round\(adata\.X\)")
    before = off.X.copy()
    with pytest.raises(DataError, match=rounding):
        Preprocessor(n_top_genes=100).fit(off)
    with pytest.raises(DataError, match=rounding):  # deeper counts were "neither raw counts nor log-normalised"
        Preprocessor(n_top_genes=100).fit(ad.AnnData(off.X * 5, var=off.var))
    assert (off.X != before).nnz == 0
    # past the first 2000 cells, and in new data, the same values were "non-integer values" with the
    # fix to pass raw counts
    exact = ad.AnnData(sp.csr_matrix(C), var=off.var)
    fitted = Preprocessor(n_top_genes=100).fit(exact)
    later = (r"X holds whole numbers with rounding error \(\d+ entries off one by under 1e-05 of it, e\.g\. "
             r"\d+\.\d{5,}\) in cells .* where raw counts are required; fix: round them")
    with pytest.raises(DataError, match=later):
        fitted.transform(off)
    with pytest.raises(DataError, match=later):
        Preprocessor(n_top_genes=100).fit(ad.concat([ad.AnnData(sp.csr_matrix(np.vstack([C] * 5)), var=off.var),
                                                      off]))
    off.X.data = np.round(off.X.data)  # the fix given
    assert Preprocessor(n_top_genes=100).fit(off).genes_ == fitted.genes_
    # large counts: from 131072 on, a float32 step (1/64) is over the 0.01 gap, and was "non-integer values"
    C = rng.poisson(1.0, (300, 200)).astype(np.float32)
    C[:, 0] = rng.integers(140_000, 200_000, 300)
    s = rng.uniform(0.5, 2, (300, 1)).astype(np.float32)
    large = ad.AnnData(sp.csr_matrix(C * s / s))
    assert (large.X != sp.csr_matrix(C)).nnz and (sp.csr_matrix(np.round(large.X.toarray())) != sp.csr_matrix(C)).nnz == 0
    with pytest.raises(DataError, match=r"X looks like raw counts with rounding error"):
        Preprocessor(n_top_genes=50).fit(large)


def test_values_never_logged_of_shallow_cells_are_not_taken_for_counts_with_rounding_error():
    """A relative gap alone called every value from 5e4 on whole: CPM of shallow cells, never
    logged, was named counts with rounding error, and rounding it (the fix given) fitted it as counts."""
    rng = np.random.default_rng(5)
    X = rng.poisson(rng.gamma(0.5, 0.1, size=120), size=(300, 120)).astype(float)
    X[:, 0] += 1
    rng = np.random.default_rng(0)  # float32, cells of 1-10 counts: 999.99994 and the like are near whole, and
    p = rng.dirichlet(np.full(2000, 0.1))  # were over half of the values: "raw counts, but N not whole", and
    C = np.array([rng.multinomial(rng.integers(1, 11), p) for _ in range(500)], np.float32)  # rounding them
    few = ad.AnnData(sp.csr_matrix(C))  # fitted them as counts
    few.var_names = [f"g{i}" for i in range(2000)]
    sc.pp.normalize_total(few, target_sum=1e4)
    with pytest.raises(DataError, match=r"X is neither raw counts \(non-integer values\) nor log-normalised"):
        Preprocessor(hvg_flavor="dispersion").fit(few, progress=False)
    # the same in float64, and counts downsampled to one depth then normalised (float32), were "raw counts, but
    # N not whole" / "with rounding error", whose fix (round them) fitted normalised values as counts. Nearly
    # whole values whose cells all sum to one total may be either: the message names both, with both fixes
    few64 = ad.AnnData(sp.csr_matrix(C.astype(np.float64)), var=few.var)
    sc.pp.normalize_total(few64, target_sum=1e4)
    one_depth = ad.AnnData(sp.csr_matrix(np.array([rng.multinomial(500, p) for _ in range(300)], np.float32)))
    sc.pp.normalize_total(one_depth, target_sum=1e6)
    panel = rng.multinomial(2000, np.full(20, 1 / 20), size=50).astype(np.float32)  # deep in few genes
    panel_cpm = ad.AnnData(sp.csr_matrix(panel))
    sc.pp.normalize_total(panel_cpm, target_sum=1e6)
    either = (r"X looks normalised but not log-transformed, or like raw counts of one depth with rounding error: "
              r"its values are nearly whole and every cell sums to [\d.e+]+; fix: if normalised, sc\.pp\.log1p it "
              r"first .*; if raw counts, round them, e\.g\. adata\.X = np\.round\(adata\.X\)")
    depth = np.array([rng.multinomial(1000, p) for _ in range(300)], np.float32)
    rounded = ad.AnnData(sp.csr_matrix(depth * np.float32(1 / 3) * np.float32(3)))  # counts of one depth, rounding
    for nearly_whole in (few64, one_depth, panel_cpm, rounded, ad.AnnData(sp.csr_matrix(panel * np.float32(1 / 3) *
                                                                                       np.float32(3)))):
        with pytest.raises(DataError, match=either):
            Preprocessor(n_top_genes=None, hvg_flavor="dispersion").fit(nearly_whole, progress=False)
    # whole counts are counts, whatever their sums: one depth, deep in few genes, all even
    for counts in (depth, panel, 2 * panel):
        assert Preprocessor(n_top_genes=None, hvg_flavor="dispersion").fit(
            ad.AnnData(sp.csr_matrix(counts))).input_kind_ == "counts"
    for target in (1e6, 1e7):  # two float32 steps from 2**21 on are >= 0.5: every value passed, capped at 1/8
        cpm = ad.AnnData(sp.csr_matrix(X))
        sc.pp.normalize_total(cpm, target_sum=target)
        with pytest.raises(DataError, match=r"X is neither raw counts \(non-integer values\) nor log-normalised"):
            Preprocessor(n_top_genes=50).fit(cpm, progress=False)


def test_a_small_span_that_fails_the_trend_fit_is_named_as_the_cause():
    """span=0.02 over 290 genes (6 a local fit) failed with "raise min_cells", which did not help."""
    rng = np.random.default_rng(0)
    X = rng.poisson(rng.gamma(0.5, 2, size=300), size=(400, 300)).astype(np.float32)
    X[:, 0] += 1
    data = ad.AnnData(sp.csr_matrix(X))
    data.var_names = [f"g{i}" for i in range(300)]
    with pytest.raises(DataError, match=r"trend fit failed .*; fix: first Seurat's span 0\.3, the default \(span=0\.02 "
                                        r"gives each local fit \d+ of the \d+ genes"):
        Preprocessor(n_top_genes=100, hvg_flavor="seurat_v3", span=0.02).fit(data, progress=False)
    Preprocessor(n_top_genes=100, hvg_flavor="seurat_v3").fit(data, progress=False)


def test_the_input_kind_is_judged_on_the_same_cells_whatever_the_chunk_size():
    """fit judged the first min(chunk_size, 2000) cells, and the normalised-never-logged check
    needs 10: chunk_size=9 took such values as log-normalised."""
    never_logged = synthetic(300, n_genes=500, seed=0)
    sc.pp.normalize_total(never_logged, target_sum=20)
    for chunk_size in (10_000, 9, 1):
        with pytest.raises(DataError, match="looks normalised but not log-transformed"):
            Preprocessor(n_top_genes=50, chunk_size=chunk_size).fit(never_logged)


def test_a_failed_hvg_trend_fit_names_the_min_cells_a_pipeline_user_can_raise():
    """50 cells x 2000 genes: the fix names min_cells as tl.fit / masksc fit take it, with its
    present value (3 already), and that value raised is a fix indeed."""
    from masksc import tl
    cells = synthetic(50, n_genes=2000, n_types=3, seed=1)
    with pytest.raises(DataError, match=r"trend fit failed on the \d+ genes that vary across the 50 cells .*"
                                        r"raise min_cells \(now 3; .*"
                                        r"tl\.fit\(min_cells=5\) or masksc fit --min-cells 5"):
        tl.fit(cells, "demo", epochs=1, progress=False)
    Preprocessor(n_top_genes=256, min_cells=5).fit(cells)
    with pytest.raises(DataError, match=r"fix: first Seurat's span 0\.3, the default \(span=0\.25 gives each local "
                                        r"fit 241 of the 963 genes; .*\); if that fails too: keep only genes detected "
                                        r"in more cells: raise min_cells"):  # the span, then the genes
        Preprocessor(n_top_genes=256, min_cells=3, span=0.25).fit(cells)


def test_normalised_unlogged_input_names_fixes_the_pipeline_accepts():
    """CP10k without log1p: the fix is raw counts or log1p, not a Preprocessor option tl.fit lacks."""
    from masksc import tl
    cells = synthetic(300, n_genes=500, seed=0)
    sc.pp.normalize_total(cells, target_sum=1e4)
    with pytest.raises(DataError, match=r"e\.g\. normalised without log1p; fix: pass raw counts \(scanpy keeps them in "
                                        r"a layer: layer='counts'.*sc\.pp\.log1p") as exc:
        tl.fit(cells, "demo", epochs=1, progress=False)
    assert "set input=" not in str(exc.value)
    cells.layers["counts"] = cells.X.copy()  # read from that layer, the hint to read it is dropped
    with pytest.raises(DataError, match=r"^adata\.layers\['counts'\] is neither raw counts .* fix: pass raw counts, "
                                        r"or log1p") as exc:
        tl.fit(cells, "demo", layer="counts", epochs=1, progress=False)
    assert "layer='counts'" not in str(exc.value)


# ---------------------------------------------------------------- settings and names refused, log input
def test_gene_names_that_are_not_strings_are_refused_naming_the_fix():
    """Integer names were fitted as text and then not found in the same data; 1 and "1" became one
    name twice. Both are refused, by fit and by transform, with the astype(str) fix."""
    a = synthetic(200, 300, n_types=2, seed=0)
    ints = a.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's own note on a non-string index
        ints.var_names = pd.Index(np.arange(300))
    mixed = a[:, :60].copy()
    mixed.var_names = pd.Index([1, "1"] + [f"x{i}" for i in range(58)], dtype=object)
    fix = r"fix: adata.var_names = adata.var_names.astype\(str\) first"
    for data, shown in ((ints, r"300 gene names are not strings \(e\.g\. \[0, 1, 2, 3, 4\], of type int\)"),
                        (mixed, r"1 gene names are not strings \(e\.g\. \[1\], of type int\)")):
        with pytest.raises(DataError, match=shown + "; " + fix):
            Preprocessor(n_top_genes=50).fit(data)
    fitted = Preprocessor(n_top_genes=50).fit(a)
    with pytest.raises(DataError, match=fix):
        fitted.transform(ints)
    named = ints.copy()
    named.var_names = named.var_names.astype(str)
    assert Preprocessor(n_top_genes=50).fit_transform(named).shape == (200, 50)


@pytest.mark.parametrize("settings, message", [
    ({"n_top_genes": -1}, r"n_top_genes=-1; fix: pass an integer >= 1 or None \(all genes\)"),
    ({"n_top_genes": 0}, r"n_top_genes=0; fix"),
    ({"n_top_genes": 100.0}, r"n_top_genes=100\.0; fix: pass an integer"),
    ({"target_sum": -1e4}, r"target_sum=-10000\.0; fix: pass a finite number > 0\."),
    ({"target_sum": None}, r"target_sum=None; fix: pass a finite number > 0\."),
    ({"scale": True, "n_top_genes": 50, "max_value": -1}, r"max_value=-1; fix: pass a finite number > 0 or None"),
    ({"min_counts": -1}, r"min_counts=-1; fix: pass a finite number >= 0 or None"),
    ({"min_cells": 1.5}, r"min_cells=1\.5; fix: pass an integer >= 0"),
    ({"span": 0}, r"span=0; fix: pass a number in \(0, 1\]"),
    ({"span": True}, r"span=True; fix: pass a number in \(0, 1\]"),
    ({"chunk_size": 0}, r"chunk_size=0; fix: pass an integer >= 1"),
])
def test_settings_out_of_range_are_refused_when_the_preprocessor_is_made(settings, message):
    """A negative n_top_genes kept every gene but the last, a negative target_sum made every value
    NaN and a negative max_value every scaled value -1; they are refused before any data is read."""
    with pytest.raises(DataError, match=message):
        Preprocessor(**settings)


def test_numpy_integer_settings_are_kept_as_python_integers():
    """np.int16(20000) passed the checks and then overflowed in chunk arithmetic (40000)."""
    p = Preprocessor(n_top_genes=np.int64(50), chunk_size=np.int16(20_000), min_cells=np.int8(3))
    assert (p.n_top_genes, p.chunk_size, p.min_cells) == (50, 20_000, 3)
    assert all(type(v) is int for v in (p.n_top_genes, p.chunk_size, p.min_cells))
    assert p.fit(synthetic(100, 200, n_types=2, seed=0)).transform(synthetic(100, 200, n_types=2, seed=0)).n_vars == 50


def test_numpy_and_fraction_number_settings_are_kept_as_python_numbers():
    """Number settings are stored as plain Python numbers, so a fitted transform with an np.float32 target_sum is
    written to JSON like any other; the normalised values are those of the plain float."""
    data = synthetic(300, 200, n_types=2, seed=0)
    p = Preprocessor(n_top_genes=50, target_sum=np.float32(1e4), span=fractions.Fraction(3, 10),
                     min_counts=np.int64(0), max_value=np.float16(10))
    assert [type(getattr(p, k)) for k in ("target_sum", "span", "min_counts", "max_value")] == [float, float, int,
                                                                                                  float]
    assert (p.target_sum, p.span, p.min_counts, p.max_value) == (1e4, 0.3, 0, 10.0)
    json.dumps(p.fit(data).to_dict())
    plain = Preprocessor(n_top_genes=50, target_sum=1e4).fit(data)
    np.testing.assert_array_equal(p.transform(data).X.toarray(), plain.transform(data).X.toarray())
    with pytest.raises(DataError, match=r"target_sum=1000+; fix: pass a finite number > 0\."):
        Preprocessor(target_sum=10 ** 400)


def test_counts_among_log_values_while_fitting_say_what_was_given():
    lognorm = _lognorm(synthetic(2100, 300, n_types=2, seed=0))
    values = lognorm.X.toarray()
    values[2050, 3] = 40.5  # beyond the first 2000 cells, which the input's kind is judged on
    lognorm.X = sp.csr_matrix(values)
    with pytest.raises(DataError, match=r"values up to 40\.5 in cells .* look like raw counts, but input='log' was "
                                        r"given; fix: pass one kind of values for every cell"):
        Preprocessor(n_top_genes=50, input="log").fit(lognorm)
    with pytest.raises(DataError, match=r"look like raw counts, but the first cells are log-normalised; fix"):
        Preprocessor(n_top_genes=50, chunk_size=100).fit(lognorm)


def test_log_input_sums_no_library_and_min_counts_drops_only_empty_cells():
    """Log values are not normalised: a transform missing some of the fitted genes gives the same
    values without the library-size warning counts get, and min_counts drops only cells without
    values, saying so."""
    lognorm = _lognorm(synthetic(300, 400, n_types=3, seed=2))
    p = Preprocessor(n_top_genes=50).fit(lognorm)
    kept = [g for g in lognorm.var_names if g in p.genes_ or g not in lognorm.var_names[:40]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fewer = p.transform(lognorm[:, kept].copy())
    assert (fewer.X != p.transform(lognorm).X).nnz == 0
    empty = lognorm.copy()
    values = empty.X.toarray()
    values[7] = 0
    empty.X = sp.csr_matrix(values)
    with pytest.warns(UserWarning, match=r"dropped 1 of 300 cells with no values \(log-normalised input: min_counts "
                                         r"drops only those\)"):
        assert Preprocessor(n_top_genes=50, min_counts=500).fit(empty).n_cells_fit_ == 299


def test_transform_chunks_refuses_a_chunk_size_that_is_not_a_positive_whole_number(counts):
    """chunk_size=0 silently meant the default chunk size."""
    p = Preprocessor(n_top_genes=50).fit(counts)
    for bad in (0, -5, 2.5):
        with pytest.raises(DataError, match=rf"^chunk_size={bad!r}; fix: pass a positive whole number of cells"):
            next(p.transform_chunks(counts, chunk_size=bad))
    starts = [a for a, _, _ in p.transform_chunks(counts, chunk_size=np.int64(150))]
    assert starts == list(range(0, counts.n_obs, 150))


def test_fitting_a_large_dataset_shows_a_bar_per_pass_over_the_cells(counts, monkeypatch, capsys):
    """Both passes of a seurat_v3 fit (gene statistics, then clipped ones) show their progress in
    cells from PROGRESS_MIN_CELLS cells on (about 20 s of silence at 1M cells before); fewer show none."""
    from masksc.data import preprocess
    Preprocessor(n_top_genes=50, chunk_size=100).fit(counts)
    assert "gene statistics" not in capsys.readouterr().err
    monkeypatch.setattr(preprocess, "PROGRESS_MIN_CELLS", counts.n_obs)
    fitted = Preprocessor(n_top_genes=50, chunk_size=100).fit(counts)
    err = capsys.readouterr().err
    assert f"\rgene statistics:   0%|          | 0/{counts.n_obs} [" in err
    assert f"\rclipped gene statistics:   0%|          | 0/{counts.n_obs} [" in err
    assert fitted.genes_ == Preprocessor(n_top_genes=50, chunk_size=100).fit(counts).genes_  # the bar changes nothing
    capsys.readouterr()
    Preprocessor(n_top_genes=50, chunk_size=100).fit(counts, progress=False)
    from masksc.models import get_preset
    from masksc.pipeline import preprocess_to_grid
    preprocess_to_grid(counts, get_preset("demo"), seed=0, progress=False)  # what fit(progress=False) runs
    assert "gene statistics" not in capsys.readouterr().err


def test_log1p_of_unnormalised_counts_is_flagged_and_unlogged_normalised_values_refused(counts):
    """Non-integer values under 30 were all called log-normalised, silently: log1p of raw counts
    (library size never corrected, or counts downsampled to one depth: a warning, as the two
    cannot be told apart) and normalised proportions (never logged: refused)."""
    logged = sc.pp.log1p(counts.copy(), copy=True)
    with pytest.warns(UserWarning, match=r"expm1 of its values gives whole numbers, as log1p of raw counts does: if "
                                         r"they were never normalised.* fix: then pass the raw counts"):
        Preprocessor(n_top_genes=50).fit(logged, progress=False)
    proportions = sc.pp.normalize_total(counts.copy(), target_sum=1, copy=True)
    with pytest.raises(DataError, match=r"X looks normalised but not log-transformed \(every cell sums to 1\); fix: "
                                        r"sc.pp.log1p it first"):
        Preprocessor(n_top_genes=50).fit(proportions, progress=False)
    lognorm = sc.pp.log1p(sc.pp.normalize_total(counts.copy(), target_sum=1e4, copy=True), copy=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert Preprocessor(n_top_genes=50).fit(lognorm, progress=False).input_kind_ == "log"
    assert not [w for w in seen if "expm1" in str(w.message)]
    deep = counts[np.asarray(counts.X.sum(axis=1)).ravel() >= 300].copy()
    sc.pp.downsample_counts(deep, counts_per_cell=300, random_state=0)  # one depth: log1p of it is log-normalised
    with pytest.warns(UserWarning, match=r"counts downsampled to one depth are fine as they are"):
        assert Preprocessor(n_top_genes=50).fit(sc.pp.log1p(deep, copy=True), progress=False).input_kind_ == "log"



def test_spearman_equals_scipys_with_ties_and_is_nan_for_a_constant_profile():
    """The gene-profile check ranks with pandas: importing scipy.stats cost a one-off command ~0.5 s."""
    from scipy.stats import spearmanr

    from masksc.data.preprocess import spearman
    rng = np.random.default_rng(0)
    for a, b in ((rng.random(300), rng.random(300)), (rng.integers(0, 5, 300) / 300, rng.integers(0, 3, 300) / 300)):
        assert spearman(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(spearman(np.zeros(10), rng.random(10)))
