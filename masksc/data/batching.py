"""Seeded, shuffled CSR minibatches of cells in grid order; nothing densifies the dataset.

``CellBatches`` is a ``torch.utils.data.IterableDataset`` yielding whole batches, so it is used
either directly (``for b in CellBatches(...)``) or through ``DataLoader(cb, batch_size=None,
num_workers=k, pin_memory=...)``. With ``num_workers=k`` worker ``w`` builds batches
``w, w+k, w+2k, ...`` of the epoch and the DataLoader's round-robin over workers returns them in
the original order, so every cell still appears exactly once per epoch. Each worker holds a
copy of the CSR matrix (fork shares it copy-on-write on Linux). Call ``set_epoch`` before the
DataLoader starts its workers each epoch, and leave ``persistent_workers`` off: persistent
workers keep the copy made at the first epoch, and would repeat its order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from masksc.checks import check_flags, check_seed, is_integer
from masksc.data.validate import check_count
from masksc.errors import DataError


@dataclass
class CSRBatch:
    """A batch of cells as CSR tensors: ``crow_indices`` int64 [B+1], ``col_indices`` int64
    [nnz] (grid positions, sorted within a row), ``values`` float32 [nnz], ``cell_index``
    int64 [B] (row of each cell in the full dataset)."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    cell_index: torch.Tensor

    @property
    def n_rows(self) -> int:
        """Cells in the batch."""
        return int(self.crow_indices.numel() - 1)

    def to(self, device, non_blocking: bool = False) -> CSRBatch:
        """A copy with every tensor on ``device``."""
        return CSRBatch(*(t.to(device, non_blocking=non_blocking) for t in
                          (self.crow_indices, self.col_indices, self.values, self.cell_index)))

    def pin_memory(self) -> CSRBatch:
        """Pinned-memory copy (called by DataLoader(pin_memory=True))."""
        return CSRBatch(*(t.pin_memory() for t in
                          (self.crow_indices, self.col_indices, self.values, self.cell_index)))

    def to_dense(self, n_cols: int) -> torch.Tensor:
        """Dense float32 [B, n_cols] (for tests and references; the model stays sparse)."""
        out = torch.zeros(self.n_rows, n_cols, dtype=self.values.dtype, device=self.values.device)
        rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.values.device),
                                       self.crow_indices.diff())
        out[rows, self.col_indices] = self.values
        return out

    @classmethod
    def from_csr(cls, X: sp.csr_matrix, cell_index=None) -> CSRBatch:
        """Wrap a scipy CSR matrix (rows = cells) as a CSRBatch (``cell_index`` default 0..B-1);
        repeated entries of a cell's column are summed, as scipy reads them."""
        X = _canonical(X.tocsr().astype(np.float32, copy=False))  # summed in float32, as CellBatches sums them
        idx = np.arange(X.shape[0]) if cell_index is None else np.asarray(cell_index)
        return cls(torch.from_numpy(X.indptr.astype(np.int64)), torch.from_numpy(X.indices.astype(np.int64)),
                   torch.from_numpy(X.data.copy()), torch.from_numpy(idx.astype(np.int64)))


def _canonical(X: sp.csr_matrix) -> sp.csr_matrix:
    """``X`` with sorted column indices and repeated entries summed: itself when it has them, else a
    copy (the caller's matrix is left as it is)."""
    if X.has_canonical_format:
        return X
    X = X.copy()
    X.sum_duplicates()
    return X


class CellBatches(torch.utils.data.IterableDataset):
    """Iterable of :class:`CSRBatch` over the rows of ``X_grid_csr`` (cells x g*s, grid order).

    Each epoch visits every cell exactly once (``drop_last`` drops the final short batch).
    The order is a permutation drawn from ``(seed, epoch)``; ``set_epoch(e)`` selects the epoch
    (as with DistributedSampler), so runs are reproducible and epochs differ.
    ``shuffle=False`` yields cells in row order.
    """

    def __init__(self, X_grid_csr, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if not sp.issparse(X_grid_csr):
            raise DataError(f"CellBatches needs a scipy sparse matrix, got {type(X_grid_csr).__name__}; "
                            "fix: pass GridLayout.to_grid(...) output.")
        batch_size = check_count("batch_size", batch_size)
        check_flags(shuffle=shuffle, drop_last=drop_last)
        X = _canonical(X_grid_csr.tocsr().astype(np.float32, copy=False))
        if X.shape[0] == 0:
            raise DataError("no cells to batch; fix: check filtering upstream.")
        self.X, self.batch_size, self.shuffle, self.drop_last = X, batch_size, shuffle, drop_last
        self.seed, self.epoch = check_seed(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses (a whole number >= 0)."""
        if not is_integer(epoch) or epoch < 0:
            raise DataError(f"epoch={epoch!r}; fix: pass a whole number >= 0.")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.X.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> np.ndarray:
        """The cell order of the current epoch, int64 [n]."""
        n = self.X.shape[0]
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n).astype(np.int64)

    def __iter__(self):
        order = self.order()
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(worker, len(self), n_workers):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield CSRBatch.from_csr(self.X[idx], idx)
