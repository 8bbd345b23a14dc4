"""Synthetic data: determinism, structure, chunked h5ad writing, streaming reads."""
import anndata as ad
import numpy as np
import pandas as pd

from masksc.data import iter_chunks, read, synthetic, write_synthetic_h5ad


def test_deterministic_per_seed():
    a = synthetic(300, 200, n_types=4, seed=5)
    b = synthetic(300, 200, n_types=4, seed=5)
    c = synthetic(300, 200, n_types=4, seed=6)
    assert (a.X != b.X).nnz == 0 and (a.obs["label"] == b.obs["label"]).all()
    assert (a.X != c.X).nnz > 0


def test_structure():
    a = synthetic(2000, 500, n_types=5, seed=0)
    X = a.X
    assert X.format == "csr" and X.dtype == np.float32
    assert np.all(X.data == np.round(X.data)) and X.data.min() > 0
    assert isinstance(a.obs["label"].dtype, pd.CategoricalDtype) and a.obs["label"].nunique() == 5
    zeros = 1 - X.nnz / np.prod(X.shape)
    assert 0.8 < zeros < 0.97
    lib = np.asarray(X.sum(axis=1)).ravel()
    assert lib.std() / lib.mean() > 0.3  # library-size variation
    # each type has its own up-regulated programme: type means differ more than chance
    means = np.stack([np.asarray(X[(a.obs["label"] == t).to_numpy()].mean(axis=0)).ravel()
                      for t in a.obs["label"].cat.categories])
    top = [set(np.argsort(-(m / (means.mean(0) + 1e-9)))[:10]) for m in means]
    assert all(len(top[i] & top[j]) < 5 for i in range(5) for j in range(i))


def test_prefix_property():
    a = synthetic(1500, 100, seed=2)
    b = synthetic(700, 100, seed=2)
    assert (a.X[:700] != b.X).nnz == 0


def test_write_h5ad_independent_of_chunk_size(tmp_path):
    write_synthetic_h5ad(tmp_path / "a.h5ad", 2100, 120, n_types=3, seed=7, chunk_size=1024)
    write_synthetic_h5ad(tmp_path / "b.h5ad", 2100, 120, n_types=3, seed=7, chunk_size=5000)
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    mem = synthetic(2100, 120, n_types=3, seed=7)
    assert (a.X != mem.X).nnz == 0 and (b.X != mem.X).nnz == 0
    assert a.X.indices.dtype == a.X.indptr.dtype
    assert (read(tmp_path / "a.h5ad").X != mem.X).nnz == 0
    assert list(a.obs["label"]) == list(mem.obs["label"]) and list(a.var_names) == list(mem.var_names)
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    np.testing.assert_array_equal(backed.X[100:110].toarray(), mem.X[100:110].toarray())
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_iter_chunks_sources_agree(tmp_path):
    path = tmp_path / "a.h5ad"
    write_synthetic_h5ad(path, 1100, 50, seed=1)
    mem = ad.read_h5ad(path)
    for src in (path, mem, ad.read_h5ad(path, backed="r")):
        chunks = list(iter_chunks(src, chunk_size=300))
        assert [s for s, _ in chunks] == [0, 300, 600, 900]
        assert all(c.format == "csr" and c.dtype == np.float32 for _, c in chunks)
        np.testing.assert_array_equal(np.vstack([c.toarray() for _, c in chunks]), mem.X.toarray())


def test_sizes_that_are_not_positive_whole_numbers_are_refused_by_name(tmp_path):
    """chunk_size 0 or 2.5 was taken silently (rounded up to a block) and 1e5 failed in range()."""
    import pytest

    from masksc.errors import DataError
    for kwargs, name in (({"chunk_size": 0}, "chunk_size"), ({"chunk_size": 2.5}, "chunk_size"),
                         ({"chunk_size": 1e5}, "chunk_size"), ({"n_genes": "10"}, "n_genes")):
        with pytest.raises(DataError, match=rf"^{name}={kwargs[name]!r}; fix: pass a positive whole number of"):
            write_synthetic_h5ad(tmp_path / "s.h5ad", 30, **{"n_genes": 10, **kwargs})
    with pytest.raises(DataError, match=r"^n_cells=0; fix: pass a positive whole number of cells\.$"):
        synthetic(0)
    assert not list(tmp_path.iterdir())
    write_synthetic_h5ad(tmp_path / "s.h5ad", np.int64(30), n_genes=np.int16(10), chunk_size=np.int32(8))
    assert read(tmp_path / "s.h5ad").shape == (30, 10)


def test_model_settings_are_checked_and_a_misspelled_one_is_refused(tmp_path):
    """write_synthetic_h5ad read its model settings from **kwargs by name, so drop_out=0.9 wrote
    the defaults without a word; NaN dropout acted as 0, mean_library=0 gave no counts, a bad
    seed was numpy's error."""
    import pytest

    from masksc.errors import DataError
    with pytest.raises(TypeError, match="drop_out"):
        write_synthetic_h5ad(tmp_path / "s.h5ad", 30, n_genes=10, drop_out=0.9)
    write_synthetic_h5ad(tmp_path / "s.h5ad", 30, n_genes=40, seed=3, dropout=0.9, mean_library=50.0)
    mem = synthetic(30, n_genes=40, seed=3, dropout=0.9, mean_library=50.0)
    np.testing.assert_array_equal(read(tmp_path / "s.h5ad").X.toarray(), mem.X.toarray())
    assert mem.X.nnz < synthetic(30, n_genes=40, seed=3, mean_library=50.0).X.nnz  # the setting is used
    for kwargs, message in (({"dropout": float("nan")}, r"dropout must be a number in \[0, 1\] \(a probability\), "
                                                        r"got nan"),
                            ({"dropout": 2}, r"dropout must be a number in \[0, 1\]"),
                            ({"mean_library": 0}, r"mean_library must be a number > 0 \(counts per cell\), got 0"),
                            ({"library_sigma": -1}, r"library_sigma must be a number >= 0, got -1"),
                            ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63 - 1\], got -1"),
                            ({"seed": None}, r"seed must be an integer")):
        with pytest.raises(DataError, match=message):
            synthetic(30, n_genes=10, **kwargs)
    import fractions
    same = synthetic(30, n_genes=40, seed=3, mean_library=fractions.Fraction(50), library_sigma=-0.0)
    np.testing.assert_array_equal(same.X.toarray(), synthetic(30, n_genes=40, seed=3, mean_library=50.0,
                                                             library_sigma=0.0).X.toarray())
    with pytest.raises(TypeError):  # chunk_size was the 6th positional argument: now it cannot be taken for another
        write_synthetic_h5ad(tmp_path / "p.h5ad", 30, 10, 2, 0, 2048)
