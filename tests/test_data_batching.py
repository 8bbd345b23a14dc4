"""CSRBatch / CellBatches: coverage, seeded determinism, epochs, DataLoader workers."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from masksc.data import CellBatches, CSRBatch
from masksc.errors import DataError


@pytest.fixture
def X():
    rng = np.random.default_rng(0)
    D = rng.poisson(0.3, size=(103, 16)).astype(np.float32)
    D[5] = 0  # an empty cell
    return sp.csr_matrix(D)


def _cells(batches):
    return np.concatenate([b.cell_index.numpy() for b in batches])


def test_every_cell_once_and_values_match(X):
    cb = CellBatches(X, batch_size=10, seed=3)
    batches = list(cb)
    assert len(batches) == len(cb) == 11
    cells = _cells(batches)
    assert sorted(cells) == list(range(103))
    dense = X.toarray()
    for b in batches:
        assert b.crow_indices.dtype == torch.int64 and b.col_indices.dtype == torch.int64
        assert b.values.dtype == torch.float32 and b.n_rows == len(b.cell_index)
        np.testing.assert_array_equal(b.to_dense(16).numpy(), dense[b.cell_index.numpy()])


def test_seeded_and_epochs_differ(X):
    a = CellBatches(X, batch_size=10, seed=3)
    b = CellBatches(X, batch_size=10, seed=3)
    e0 = _cells(a)
    np.testing.assert_array_equal(e0, _cells(b))
    a.set_epoch(1)
    e1 = _cells(a)
    assert not np.array_equal(e0, e1) and sorted(e1) == list(range(103))
    b.set_epoch(1)
    np.testing.assert_array_equal(e1, _cells(b))
    assert not np.array_equal(e0, _cells(CellBatches(X, batch_size=10, seed=4)))


def test_no_shuffle_and_drop_last(X):
    cb = CellBatches(X, batch_size=10, shuffle=False, drop_last=True)
    assert len(cb) == 10
    np.testing.assert_array_equal(_cells(cb), np.arange(100))


def test_dataloader_workers_keep_order(X):
    cb = CellBatches(X, batch_size=8, seed=1)
    loader = torch.utils.data.DataLoader(cb, batch_size=None, num_workers=2)
    np.testing.assert_array_equal(_cells(loader), _cells(cb))


def test_csrbatch_to_and_from_csr(X):
    b = CSRBatch.from_csr(X[:4], np.array([7, 8, 9, 10]))
    c = b.to("cpu")
    assert torch.equal(c.values, b.values) and c.cell_index.tolist() == [7, 8, 9, 10]
    np.testing.assert_array_equal(b.to_dense(16).numpy(), X[:4].toarray())


def test_bad_inputs(X):
    with pytest.raises(DataError, match="sparse"):
        CellBatches(X.toarray())
    for bad in (0, 2.5, None):  # 2.5 and None failed later, as TypeErrors of their own
        with pytest.raises(DataError, match=rf"^batch_size={bad!r}; fix: pass a positive whole number of cells"):
            CellBatches(X, batch_size=bad)
    assert len(CellBatches(X, batch_size=np.int16(7), shuffle=False)) == -(-X.shape[0] // 7)  # numpy ints are taken
    for seed in (-1, None, 2.5):  # failed at the first iteration, in numpy
        with pytest.raises(DataError, match=rf"seed must be an integer in \[0, 2\*\*63 - 1\], got {seed!r}"):
            CellBatches(X, seed=seed)
    batches = CellBatches(X)
    for epoch in (-1, 2.7):  # -1 failed at the next iteration, 2.7 was cut to 2
        with pytest.raises(DataError, match=rf"^epoch={epoch!r}; fix: pass a whole number >= 0"):
            batches.set_epoch(epoch)


def test_repeated_entries_of_a_cell_are_summed_as_scipy_reads_them_and_the_input_is_kept():
    """to_dense, the tests' reference, kept the last of repeated entries."""
    dup = sp.csr_matrix((np.array([1.0, 2.0, 4.0], np.float32), np.array([5, 5, 3]), np.array([0, 3])), shape=(1, 8))
    before = (dup.data.copy(), dup.indices.copy())
    for batch in (next(iter(CellBatches(dup, 1, shuffle=False))), CSRBatch.from_csr(dup)):
        np.testing.assert_array_equal(batch.to_dense(8).numpy(), dup.toarray())
        assert batch.col_indices.tolist() == [3, 5]
    assert np.array_equal(dup.data, before[0]) and np.array_equal(dup.indices, before[1])  # from_csr sorted in place
    small = sp.csr_matrix((np.array([200, 100], np.uint8), np.array([1, 1]), np.array([0, 2])), shape=(1, 3))
    for batch in (next(iter(CellBatches(small, 1, shuffle=False))), CSRBatch.from_csr(small)):
        assert batch.to_dense(3).tolist() == [[0.0, 300.0, 0.0]]  # from_csr summed in uint8: 44


def test_input_not_modified():
    X = sp.csr_matrix(np.array([[0, 2.0], [1.0, 0]], dtype=np.float64))
    CellBatches(X, batch_size=1)
    assert X.dtype == np.float64
