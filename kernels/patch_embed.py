"""Patch embedding of a CSR batch of cells laid out on a g x s grid.

Equal to ``Conv2d(1, D, kernel=P, stride=P)`` on the densified grid, flattened to tokens
[B, G, D] with G = (g // P) * (s // P) patches in row-major order (grid rows / columns past the
last whole patch are ignored, as the convolution does). Three implementations:

- ``patch_embed_csr``: Triton, never builds the dense grid. One program owns one band of P grid
  rows of one cell (whose nonzeros are contiguous in row-major CSR) and a block of D; it
  accumulates the band's s // P output tokens in registers and writes each output once.
- ``patch_embed_torch``: the plain-torch production path (CPU); see its docstring for why, and
- ``patch_embed_reference``: densify + ``F.conv2d``, the test oracle, both in
  ``patch_embed_ref.py``, which imports without Triton.

Grid position of column index j: row r = j // s, column c = j % s; its patch is
(r // P) * (s // P) + c // P and its offset inside the patch (r % P) * P + c % P, which is the
column of ``weight`` [D, P * P] (a Conv2d kernel [D, 1, P, P] flattened row-major) it meets.
"""
from __future__ import annotations

import os

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from masksc.errors import MaskscError
from masksc.kernels.patch_embed_ref import _check, _row_ids


# ---------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(COL, VAL, BAND_PTR, WT, BIAS, OUT,
                S, D, N_BAND, N_BAND_ALL, N_PER_BAND,
                P: tl.constexpr, ACC: tl.constexpr, BLOCK_PB: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Program (cell * N_BAND + band, d block): out[cell, band patches, d block]."""
    pid = tl.program_id(0)
    cell = (pid // N_BAND).to(tl.int64)  # 64-bit offsets: B*G*D may exceed 2**31
    band = pid % N_BAND
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_pb = tl.arange(0, BLOCK_PB)
    ptr = cell * N_BAND_ALL + band
    start = tl.load(BAND_PTR + ptr)
    end = tl.load(BAND_PTR + ptr + 1)
    bias = tl.load(BIAS + offs_d, mask=d_ok, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_PB, BLOCK_D], ACC) + bias[None, :]
    for j0 in range(start, end, BLOCK_K):
        offs_k = j0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < end
        col = tl.load(COL + offs_k, mask=k_ok, other=0)
        val = tl.load(VAL + offs_k, mask=k_ok, other=0.0).to(ACC)
        r = col // S
        c = col - r * S
        pc = c // P
        o = (r - band * P) * P + (c - pc * P)
        # One-hot (patch in band) x value, times the gathered weight rows: a small dense dot.
        a = tl.where((offs_pb[:, None] == pc[None, :]) & k_ok[None, :], val[None, :], 0.0)
        w = tl.load(WT + o[:, None] * D + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc += tl.dot(a, w, input_precision="ieee", out_dtype=ACC)
    patch = band * N_PER_BAND + offs_pb
    out_ptr = OUT + (cell * N_BAND * N_PER_BAND + patch[:, None]) * D + offs_d[None, :]
    tl.store(out_ptr, acc.to(OUT.dtype.element_ty), mask=(offs_pb[:, None] < N_PER_BAND) & d_ok[None, :])


@triton.jit
def _grad_weight_kernel(COL, VAL, ROW, GOUT, PART, NNZ, PER_PROG,
                        S, D, G, N_BAND, N_PER_BAND,
                        P: tl.constexpr, ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Program (nnz chunk, d block): PART[chunk, o, d] = sum over its nonzeros at offset o of
    val * grad_out[cell, patch, d]. Partials are summed by the caller (deterministic, no atomics)."""
    chunk = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_o = tl.arange(0, BLOCK_O)
    acc = tl.zeros([BLOCK_O, BLOCK_D], ACC)
    lo = chunk * PER_PROG
    hi = tl.minimum(lo + PER_PROG, NNZ)
    for j0 in range(lo, hi, BLOCK_K):
        offs_k = j0 + tl.arange(0, BLOCK_K)
        col = tl.load(COL + offs_k, mask=offs_k < hi, other=0)
        r = col // S
        c = col - r * S
        pr = r // P
        pc = c // P
        k_ok = (offs_k < hi) & (pr < N_BAND) & (pc < N_PER_BAND)
        val = tl.load(VAL + offs_k, mask=k_ok, other=0.0).to(ACC)
        cell = tl.load(ROW + offs_k, mask=k_ok, other=0)
        o = (r - pr * P) * P + (c - pc * P)
        patch = pr * N_PER_BAND + pc
        gout = tl.load(GOUT + (cell[:, None] * G + patch[:, None]) * D + offs_d[None, :],
                       mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        a = tl.where((offs_o[:, None] == o[None, :]) & k_ok[None, :], val[None, :], 0.0)
        acc += tl.dot(a, gout, input_precision="ieee", out_dtype=ACC)
    tl.store(PART + (chunk * BLOCK_O + offs_o[:, None]) * D + offs_d[None, :], acc,
             mask=(offs_o[:, None] < P * P) & d_ok[None, :])


_BLOCK_K = 32
_MAX_GRAD_CHUNKS = 512  # bounds the partial-sum buffer at 512 * P*P * D accumulators


def _acc_dtypes(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _band_order(rows: torch.Tensor, col: torch.Tensor, s: int, P: int, n_band_all: int):
    """Global band id (cell * n_band_all + r // P) of each nonzero, and a permutation grouping
    the nonzeros by band (None when the CSR is already in row-major order, the usual case)."""
    band_id = rows * n_band_all + torch.div(col, P * s, rounding_mode="floor")
    if band_id.numel() > 1 and not bool((band_id[1:] >= band_id[:-1]).all()):
        perm = torch.argsort(band_id, stable=True)
        return band_id[perm], perm
    return band_id, None


class _PatchEmbedCSR(torch.autograd.Function):
    @staticmethod
    def forward(ctx, crow, col, val, weight, bias, g, s, P):
        B, D = crow.numel() - 1, weight.shape[0]
        n_band, n_per_band = g // P, s // P
        n_band_all = -(-g // P)
        acc_tl, acc_torch = _acc_dtypes(weight.dtype)
        col, val = col.contiguous(), val.contiguous()  # the kernels index them as flat arrays
        rows = _row_ids(crow, col.numel())
        band_id, perm = _band_order(rows, col, s, P, n_band_all)
        col_k, val_k, rows_k = (col, val, rows) if perm is None else (col[perm], val[perm], rows[perm])
        bounds = torch.arange(B * n_band_all + 1, device=col.device)
        band_ptr = torch.searchsorted(band_id, bounds)
        out = torch.empty((B, n_band * n_per_band, D), device=weight.device, dtype=weight.dtype)
        wt = weight.detach().t().contiguous()
        block_d = min(128, max(16, triton.next_power_of_2(D)))
        grid = (B * n_band, triton.cdiv(D, block_d))
        if out.numel():
            _fwd_kernel[grid](col_k, val_k, band_ptr, wt, bias.detach().contiguous(), out,
                              s, D, n_band, n_band_all, n_per_band,
                              P=P, ACC=acc_tl, BLOCK_PB=max(16, triton.next_power_of_2(n_per_band)),
                              BLOCK_D=block_d, BLOCK_K=_BLOCK_K)
        ctx.save_for_backward(col_k, val_k, rows_k)
        ctx.dims = (g, s, P, D, acc_tl, acc_torch)
        return out

    @staticmethod
    @once_differentiable  # the backward kernel is not differentiable: refuse double backward, never drop it
    def backward(ctx, grad_out):
        col, val, rows = ctx.saved_tensors
        g, s, P, D, acc_tl, acc_torch = ctx.dims
        G = grad_out.shape[1]
        grad_w = grad_b = None
        if ctx.needs_input_grad[3]:
            nnz = col.numel()
            n_chunks = max(1, min(_MAX_GRAD_CHUNKS, triton.cdiv(nnz, _BLOCK_K)))
            per_prog = triton.cdiv(triton.cdiv(max(nnz, 1), n_chunks), _BLOCK_K) * _BLOCK_K
            n_chunks = triton.cdiv(max(nnz, 1), per_prog)
            block_o = max(16, triton.next_power_of_2(P * P))
            block_d = min(128, max(16, triton.next_power_of_2(D)))
            part = torch.zeros((n_chunks, block_o, D), device=grad_out.device, dtype=acc_torch)
            if nnz:
                _grad_weight_kernel[(n_chunks, triton.cdiv(D, block_d))](
                    col, val, rows, grad_out.contiguous(), part, nnz, per_prog,
                    s, D, G, g // P, s // P,
                    P=P, ACC=acc_tl, BLOCK_O=block_o, BLOCK_D=block_d, BLOCK_K=_BLOCK_K)
            grad_w = part.sum(0)[: P * P].t().to(grad_out.dtype)
        if ctx.needs_input_grad[4]:
            grad_b = grad_out.sum(dim=(0, 1), dtype=acc_torch).to(grad_out.dtype)
        return None, None, None, grad_w, grad_b, None, None, None


def patch_embed_csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, grid_shape: tuple[int, int], patch: int) -> torch.Tensor:
    """Sparse-aware Triton patch embedding; never materialises the dense grid.

    crow int64 [B+1], col int64 [nnz] (row-major grid positions r * s + c; within a cell the
    usual ascending order lets the kernel use the CSR as is, any other order costs one sort),
    val float [nnz] (data: no gradient flows to it; passing values that require grad raises);
    weight [D, P*P] and bias [D], one dtype of float16 / bfloat16 / float32 / float64.
    Returns tokens [B, G, D] in weight's dtype, G = (g // P) * (s // P), accumulated in float32
    (float64 for float64 weights). Differentiable in weight and bias. Extra memory O(nnz) plus a
    bounded partial-sum buffer in the backward. CUDA tensors, or CPU with TRITON_INTERPRET=1.
    """
    B, g, s, P, D = _check(crow, col, val, weight, bias, grid_shape, patch)
    if val.requires_grad:
        raise MaskscError("patch_embed_csr treats the CSR values as data and gives them no gradient; "
                          "pass values.detach(), or use masksc.kernels.patch_embed_ref.patch_embed_torch if you "
                          "need d(out)/d(values).")
    if weight.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise MaskscError("patch_embed_csr runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
                          f"got a {weight.device.type} tensor. Use "
                          "masksc.kernels.patch_embed_ref.patch_embed_torch on CPU.")
    if crow.dtype != torch.int64 or col.dtype != torch.int64:
        raise MaskscError(f"crow and col must be int64; got {crow.dtype}, {col.dtype}. Cast them with .long().")
    return _PatchEmbedCSR.apply(crow, col, val, weight, bias, g, s, P)
