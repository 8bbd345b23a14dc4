"""validate_counts: every bad input gives a DataError naming the problem; input never modified."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from masksc.data import validate_counts
from masksc.errors import DataError


def _X():
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, size=(20, 8)).astype(np.float32)
    X[:, 0] += 1
    return X


def test_valid_summary_and_input_unchanged():
    X = sp.csr_matrix(_X())
    before = X.copy()
    s = validate_counts(X)
    assert s["n_cells"] == 20 and s["n_genes"] == 8 and s["integer"] and s["n_zero_cells"] == 0
    assert s["max"] == X.max()
    assert (X != before).nnz == 0


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 5)), "empty matrix"),
    (np.zeros(5), "2-D"),
])
def test_shape_errors(bad, match):
    with pytest.raises(DataError, match=match):
        validate_counts(bad)


def test_nan_and_inf():
    X = _X()
    X[1, 1], X[2, 2] = np.nan, np.inf
    with pytest.raises(DataError, match="1 NaN and 1 infinite"):
        validate_counts(sp.csr_matrix(X))


def test_negative():
    X = _X()
    X[3, 3] = -2
    with pytest.raises(DataError, match="negative values"):
        validate_counts(X)


def test_non_integer_only_when_required():
    X = _X()
    X[0, 1] = 0.5
    with pytest.raises(DataError, match="non-integer"):
        validate_counts(X)
    assert validate_counts(X, require_integer=False)["integer"] is False


def test_zero_count_cells_counted():
    X = _X()
    X[[4, 9, 11]] = 0
    with pytest.raises(DataError, match=r"3 cells have zero counts.*min_counts=1"):
        validate_counts(sp.csr_matrix(X))
    assert validate_counts(X, allow_zero_cells=True)["n_zero_cells"] == 3


def test_duplicate_genes():
    a = ad.AnnData(X=_X(), var=pd.DataFrame(index=["g0", "g1", "g1"] + [f"h{i}" for i in range(5)]))
    with pytest.raises(DataError, match=r"duplicated.*var_names_make_unique"):
        validate_counts(a)


def test_empty_gene_names_are_refused():
    """An empty name was taken, and matched to another dataset's empty name, whatever gene that is."""
    a = ad.AnnData(X=_X(), var=pd.DataFrame(index=["g0", "", "g2", " "] + [f"h{i}" for i in range(4)]))
    with pytest.raises(DataError, match=r"^2 gene names are empty \(columns \[1, 3\]\): .*fix: name them"):
        validate_counts(a)
    from masksc.data import Preprocessor
    named = ad.AnnData(X=_X(), var=pd.DataFrame(index=[f"g{i}" for i in range(8)]))
    p = Preprocessor(n_top_genes=None, hvg_flavor="dispersion").fit(named)
    with pytest.raises(DataError, match=r"^1 gene name is empty \(column \[8\]\)"):
        Preprocessor(n_top_genes=None, hvg_flavor="dispersion").fit(ad.concat([named, a[:, 1:2]], axis=1))
    # new data may carry such a column: no model fitted since holds an empty name to match it to
    extra = ad.concat([named, a[:, 1:2]], axis=1)
    assert (p.transform(extra).X != p.transform(named).X).nnz == 0


def test_labels_wrong_length():
    with pytest.raises(DataError, match="labels have length 19 but the matrix has 20 cells"):
        validate_counts(_X(), labels=np.zeros(19))


def test_non_numeric():
    with pytest.raises(DataError, match="non-numeric"):
        validate_counts(np.array([["a", "b"], ["c", "d"]]))


def test_values_beyond_float32_are_named_apart_from_nan_and_inf():
    """masksc computes in float32: a finite float64 value it cannot hold is 'too large', not inf."""
    X = _X().astype(np.float64)
    X[1, 1], X[2, 2] = 1e39, -2e39
    for M in (X, sp.csr_matrix(X)):
        with pytest.raises(DataError, match=r"X holds 2 values too large for float32 \(max 3.4e38; largest "
                                            r"magnitude 2e\+39\); fix: pass raw counts") as exc:
            validate_counts(M)
        assert "NaN" not in str(exc.value) and "infinite" not in str(exc.value)
    X[3, 3] = np.nan  # NaN / inf are named first
    with pytest.raises(DataError, match="1 NaN and 0 infinite"):
        validate_counts(X)
    fits = _X().astype(np.float64)
    fits[1, 1] = float(np.finfo(np.float32).max)
    assert validate_counts(fits)["max"] == fits[1, 1]


def test_float32_range_checks_allocate_nothing_the_size_of_the_data():
    """A float64 matrix within float32's range is checked from its max and min alone: no
    temporary such as np.abs(X) (as large as X) or a mask; the mask is built only when a value is over."""
    import tracemalloc

    from masksc.data.validate import beyond_float32, check_float32_range
    X = np.random.default_rng(0).normal(size=(1000, 1000))  # 8 MB of float64
    X[0, 0] = np.nan                                       # skipped, as np.nanmax skips it
    sparse = sp.csr_matrix(X)
    tracemalloc.start()
    try:
        check_float32_range(X)
        check_float32_range(sparse)
        _, checked = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        mask = beyond_float32(X)
        _, masked = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert checked < 100_000, checked
    assert masked < X.size + 100_000, masked  # the bool mask it returns, nothing float-sized
    assert not mask.any() and mask.shape == X.shape
    X[5, 5], X[6, 6] = 1e39, -np.inf  # inf is not beyond float32 (check_values names it)
    np.testing.assert_array_equal(np.flatnonzero(beyond_float32(X)), [5 * 1000 + 5])
    with pytest.raises(DataError, match="X holds 1 values too large for float32"):
        check_float32_range(X)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "dense", "fortran"])
def test_the_first_bad_cell_is_named_whatever_the_storage_order(fmt):
    """check_values(cell=) names the lowest row holding a bad value, also where values are stored
    column by column (CSC, a COO built so, a Fortran-ordered array)."""
    from masksc.data.validate import check_values
    X = _X()
    X[5, 0], X[2, 6] = np.nan, np.nan  # row 5 comes first in column order, row 2 in row order
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "coo": lambda a: sp.csc_matrix(a).tocoo(),
              "dense": np.ascontiguousarray, "fortran": np.asfortranarray}[fmt](X)
    with pytest.raises(DataError, match=r"2 NaN and 0 infinite values, the first in cell row-2;"):
        check_values(matrix, cell=lambda i: f"row-{i}")
