"""Patch embedding of a CSR batch in plain torch: ``patch_embed_torch`` (the torch path of
``masksc.ops``) and ``patch_embed_reference`` (densify + ``F.conv2d``, the oracle of the Triton
kernel in ``patch_embed.py``), with the input checks both paths share. This module needs no
Triton, so the torch path runs where Triton is not installed. See ``patch_embed.py`` for the
grid-position arithmetic.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from masksc.errors import MaskscError


def _check(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor, grid_shape, patch: int) -> tuple[int, int, int, int, int]:
    """Validate shapes and, for CPU tensors (where the check costs no device sync), the CSR
    structure; return (B, g, s, P, D)."""
    if len(grid_shape) != 2:
        raise MaskscError(f"patch embedding needs grid_shape (rows, columns); got {tuple(grid_shape)}.")
    g, s, P = (_whole(name, v) for name, v in (("grid rows", grid_shape[0]), ("grid columns", grid_shape[1]),
                                                ("patch", patch)))
    if P < 1 or g < P or s < P:
        raise MaskscError(f"patch embedding needs 1 <= patch <= both grid sides; got grid {(g, s)}, patch {P}. "
                          "Use a smaller patch or a larger grid.")
    if crow.dim() != 1 or crow.numel() < 1 or col.dim() != 1 or val.shape != col.shape:
        raise MaskscError(f"expected CSR arrays crow [B+1], col [nnz], values [nnz]; got {tuple(crow.shape)}, "
                          f"{tuple(col.shape)}, {tuple(val.shape)}. Pass a CSRBatch's fields.")
    if weight.dim() != 2 or weight.shape[1] != P * P or bias.shape != (weight.shape[0],):
        raise MaskscError(f"weight must be [D, P*P] = [D, {P * P}] and bias [D]; got {tuple(weight.shape)} and "
                          f"{tuple(bias.shape)}. Flatten a Conv2d kernel [D, 1, P, P] with .view(D, -1).")
    if not weight.is_floating_point() or bias.dtype != weight.dtype:
        raise MaskscError(f"weight and bias must share a floating dtype; got {weight.dtype} and {bias.dtype}.")
    if crow.device.type == "cpu" and col.device.type == "cpu":
        check_csr(crow, col, g * s)
    return crow.numel() - 1, g, s, P, weight.shape[0]


def _whole(name: str, value) -> int:
    """``value`` as an int; MaskscError for a fractional number rather than truncating it."""
    try:
        if isinstance(value, bool):  # operator.index(True) is 1
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise MaskscError(f"patch embedding needs whole numbers for the grid and patch sizes; got {name} "
                          f"{value!r}. Pass ints.") from None


def check_csr(crow: torch.Tensor, col: torch.Tensor, n_cols: int) -> None:
    """Refuse a CSR structure the kernels would read out of bounds or misattribute."""
    nnz = col.numel()
    bad = None
    if int(crow[0]) != 0 or int(crow[-1]) != nnz:
        bad = f"crow must run from 0 to nnz = {nnz}, got {int(crow[0])} .. {int(crow[-1])}"
    elif crow.numel() > 1 and bool((crow.diff() < 0).any()):
        bad = "crow must be non-decreasing"
    elif nnz and (int(col.min()) < 0 or int(col.max()) >= n_cols):
        bad = f"col must index grid positions 0 .. {n_cols - 1}, got {int(col.min())} .. {int(col.max())}"
    if bad:
        raise MaskscError(f"not a valid CSR batch: {bad}; pass a CSRBatch's fields (GridLayout.to_grid output).")


def _row_ids(crow: torch.Tensor, nnz: int) -> torch.Tensor:
    """The cell (CSR row) of every nonzero, int64 [nnz]."""
    B = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(B, device=crow.device), crow.diff(), output_size=nnz)


def patch_embed_reference(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, grid_shape: tuple[int, int], patch: int) -> torch.Tensor:
    """Densify the CSR batch and apply ``F.conv2d`` (the oracle).

    crow int64 [B+1], col int64 [nnz] (row-major grid positions), val [nnz]; weight [D, P*P],
    bias [D] (one floating dtype). Returns [B, G, D] in weight's dtype; differentiable in weight,
    bias and val. Memory O(B * g * s).
    """
    B, g, s, P, D = _check(crow, col, val, weight, bias, grid_shape, patch)
    rows = _row_ids(crow, col.numel())
    dense = torch.zeros(B, g * s, dtype=weight.dtype, device=weight.device)
    dense = dense.index_put((rows, col), val.to(weight.dtype), accumulate=True)
    out = F.conv2d(dense.view(B, 1, g, s), weight.view(D, 1, P, P), bias, stride=P)
    return out.flatten(2).transpose(1, 2)


def _patch_coords(col: torch.Tensor, s: int, P: int, n_band: int, n_per_band: int):
    """(patch id, in-patch offset, inside) of each grid position; ``inside`` is False for the
    positions past the last whole patch row / column."""
    r = torch.div(col, s, rounding_mode="floor")
    c = col - r * s
    pr = torch.div(r, P, rounding_mode="floor")
    pc = torch.div(c, P, rounding_mode="floor")
    inside = (pr < n_band) & (pc < n_per_band)
    return pr * n_per_band + pc, (r - pr * P) * P + (c - pc * P), inside


def patch_embed_torch(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, grid_shape: tuple[int, int], patch: int) -> torch.Tensor:
    """Plain-torch patch embedding: scatter the nonzeros straight into patch-major rows
    [B * G, P*P] and multiply by weight^T with one ``addmm``.

    Chosen by ``benchmarks/bench_patch_embed.py`` on CPU (64 x 64 grid, P = 4, D = 128, one
    thread) against densify + Conv2d, densify + unfold + matmul, ``torch.sparse.mm`` (patch-major
    COO, and the CSR batch times an expanded [g*s, G*D] weight) and ``index_add``: it ties
    densify + unfold + matmul for the fastest path (forward 1.0-2.4x Conv2d; forward+backward
    1.6-2.9x at B = 256, on par at B = 4096 where writing the [B, G, D] output dominates) while
    skipping that path's permute copy (half its memory) and handling grids that are not a
    multiple of P without slicing. ``sparse.mm`` and ``index_add`` were slower at 5-10 % density.
    Its memory is O(B * g * s) for the patch matrix, the size of the dense grid.

    Same arguments and result as ``patch_embed_reference``; differentiable in weight, bias and val.
    """
    B, g, s, P, D = _check(crow, col, val, weight, bias, grid_shape, patch)
    n_band, n_per_band = g // P, s // P
    G = n_band * n_per_band
    rows = _row_ids(crow, col.numel())
    p, o, inside = _patch_coords(col, s, P, n_band, n_per_band)
    n = B * G * P * P
    flat = torch.where(inside, (rows * G + p) * (P * P) + o, n)  # positions past the last whole patch: a sink
    x = torch.zeros(n + 1, dtype=weight.dtype, device=weight.device)
    x = x.index_put((flat,), val.to(weight.dtype), accumulate=True)[:n]
    return torch.addmm(bias, x.view(B * G, P * P), weight.t()).view(B, G, D)
