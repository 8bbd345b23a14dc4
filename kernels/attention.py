"""Softmax attention: a fused Triton kernel (forward + backward) and its torch references.

Three implementations of ``softmax(Q K^T / sqrt(Dh)) V`` with an optional key-padding mask:

- ``flash_attention``: Triton, flash-attention-2 style. The forward pass streams key/value
  blocks through an online softmax and saves the per-row log-sum-exp; the backward pass
  recomputes the probabilities from it (one kernel for dK/dV, one for dQ, no atomics) after a
  small kernel computes ``delta = rowsum(dO * O)``.
- ``attention_torch``: ``torch.nn.functional.scaled_dot_product_attention`` (the torch path), and
- ``attention_reference``: eager math, the test oracle, both in ``attention_ref.py``, which
  imports without Triton.

Fully padded rows. When every key of a sample is padding, softmax over the empty set is
undefined; all three implementations define the output of such a sample as 0 (and its
gradients as 0) instead of NaN.
"""
from __future__ import annotations

import math
import os

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from masksc.errors import MaskscError
from masksc.kernels.attention_ref import _check_inputs

_LOG2E = 1.4426950408889634
MAX_GRID_Y = 65_535  # CUDA's limit on a launch grid's second axis, which runs over B * H
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------

def _autotune_enabled() -> bool:
    """Autotuning needs real GPU timings; under the interpreter (or MASKSC_TRITON_AUTOTUNE=0)
    only the first admissible config is used."""
    flag = os.environ.get("MASKSC_TRITON_AUTOTUNE")
    if flag is not None:
        return flag.strip().lower() not in ("0", "false", "no", "")
    return os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _mm(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with ACC accumulation. UPCAST (interpreter + bfloat16 only) feeds the dot float32
    copies of the bfloat16 operands: the interpreter's bfloat16 dot is wrong, and the upcast
    values are exact, so the result equals the GPU's bf16 x bf16 -> fp32 product."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# Short sequences (this model runs L = 65, 145, 257): small blocks keep enough programs alive to
# fill the GPU. Long sequences (L >= 1024): big blocks for reuse. The first entry of each list is
# the one used when autotuning is off.
_SHORT = _configs([(16, 16, 4, 2), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2),
                   (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2)])
_LONG = _configs([(64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
                  (128, 128, 8, 2), (128, 32, 4, 3)])
_SHORT_MAX_L = 512
_SHORT_IDS = {id(c) for c in _SHORT}


def _prune(configs, named_args, **kwargs):
    L = named_args["L"]
    head = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    short = L <= _SHORT_MAX_L
    pool = [c for c in configs if (id(c) in _SHORT_IDS) == short]
    # A 128 x 128 tile with Dh = 128 exceeds shared memory on most GPUs with pipelining.
    pool = [c for c in pool if not (head >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)] or pool
    return pool if _autotune_enabled() else pool[:1]


_ALL = _SHORT + _LONG
_TUNE = dict(configs=_ALL, key=["L", "BLOCK_D"], prune_configs_by={"early_config_prune": _prune})


@triton.autotune(**_TUNE)
@triton.jit
def _fwd_kernel(Q, K, V, PAD, O, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, som, sod, spb, spn,
                H, L, HEAD_DIM, qk_scale,
                HAS_PAD: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*L*Dh may exceed 2**31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < L
        if HAS_PAD:
            pad = tl.load(PAD + b * spb + offs_n * spn, mask=key_ok, other=1)
            key_ok = key_ok & (pad == 0)
        kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < L) & d_ok[:, None], other=0.0)
        s = _mm(q, kt, ACC, PRECISION, UPCAST) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no valid key so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=(offs_n[:, None] < L) & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, ACC, PRECISION, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    # lse = +inf on empty rows makes the backward's exp2(s - lse) exactly 0 there.
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=m_ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, L, HEAD_DIM,
                  ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*L*Dh may exceed 2**31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=msk, other=0.0)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(DELTA + pid_bh * L + offs_m, delta, mask=offs_m < L)


@triton.autotune(**_TUNE)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, PAD, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sdb, sdh, sdm, sdd, spb, spn,
                     H, L, HEAD_DIM, qk_scale, sm_scale,
                     HAS_PAD: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program owns a block of keys and loops over all query blocks (no atomics).
    DK and DV are contiguous [B, H, L, Dh]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*L*Dh may exceed 2**31
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < L
    d_ok = offs_d < HEAD_DIM
    key_ok = n_ok
    if HAS_PAD:
        pad = tl.load(PAD + b * spb + offs_n * spn, mask=n_ok, other=1)
        key_ok = key_ok & (pad == 0)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        qt = tl.load(Q + b * sqb + h * sqh + offs_m[None, :] * sqm + offs_d[:, None] * sqd,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + pid_bh * L + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * L + offs_m, mask=m_ok, other=0.0)
        st = _mm(k, qt, ACC, PRECISION, UPCAST) * qk_scale
        pt = tl.where(key_ok[:, None], tl.math.exp2(st - lse[None, :]), 0.0)
        dv += _mm(pt.to(do.dtype), do, ACC, PRECISION, UPCAST)
        dpt = _mm(v, tl.trans(do), ACC, PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(qt.dtype), tl.trans(qt), ACC, PRECISION, UPCAST)
    dk = dk * sm_scale
    out_off = pid_bh.to(tl.int64) * L * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(**_TUNE)
@triton.jit
def _bwd_dq_kernel(Q, K, V, PAD, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdb, sdh, sdm, sdd, spb, spn,
                   H, L, HEAD_DIM, qk_scale, sm_scale,
                   HAS_PAD: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program owns a block of queries and loops over all key blocks. DQ is contiguous."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B*H*L*Dh may exceed 2**31
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * L + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        key_ok = n_ok
        if HAS_PAD:
            pad = tl.load(PAD + b * spb + offs_n * spn, mask=n_ok, other=1)
            key_ok = key_ok & (pad == 0)
        t_mask = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=t_mask, other=0.0)
        vt = tl.load(V + b * svb + h * svh + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=t_mask, other=0.0)
        s = _mm(q, kt, ACC, PRECISION, UPCAST) * qk_scale
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _mm(do, vt, ACC, PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(kt.dtype), tl.trans(kt), ACC, PRECISION, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + pid_bh.to(tl.int64) * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------
# autograd wrapper
# ---------------------------------------------------------------------------------------

def _kernel_meta(dtype: torch.dtype) -> dict:
    """Accumulator dtype, tl.dot input precision and the interpreter's bf16 upcast for an input dtype."""
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    if dtype == torch.float64:
        return dict(ACC=tl.float64, PRECISION="ieee", UPCAST=False)
    # fp32 inputs use exact fp32 products (not TF32) so they match the torch path closely.
    return dict(ACC=tl.float32, PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=upcast)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask):
        B, H, L, Dh = q.shape
        kmeta = _kernel_meta(q.dtype)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        o = torch.empty((B, H, L, Dh), device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, L), device=q.device, dtype=lse_dtype)
        pad, pad_strides = _pad_arg(key_padding_mask, q)
        block_d = max(16, triton.next_power_of_2(Dh))
        sm_scale = 1.0 / math.sqrt(Dh)
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
        _fwd_kernel[grid](q, k, v, pad, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                          *pad_strides, H, L, Dh, sm_scale * _LOG2E,
                          HAS_PAD=key_padding_mask is not None, BLOCK_D=block_d, **kmeta)
        ctx.save_for_backward(q, k, v, o, lse, pad)
        ctx.has_pad = key_padding_mask is not None
        ctx.pad_strides = pad_strides
        return o

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable: refuse double backward, never drop it
    def backward(ctx, do):
        q, k, v, o, lse, pad = ctx.saved_tensors
        B, H, L, Dh = q.shape
        kmeta = _kernel_meta(q.dtype)
        block_d = max(16, triton.next_power_of_2(Dh))
        sm_scale = 1.0 / math.sqrt(Dh)
        delta = torch.empty_like(lse)
        _delta_kernel[(triton.cdiv(L, 32), B * H)](o, do, delta, *_strides(o), *_strides(do), H, L, Dh,
                                                   ACC=kmeta["ACC"], BLOCK_D=block_d, BLOCK_M=32)
        dq = torch.empty((B, H, L, Dh), device=q.device, dtype=q.dtype)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
        common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *ctx.pad_strides,
                  H, L, Dh, sm_scale * _LOG2E, sm_scale)
        meta = dict(HAS_PAD=ctx.has_pad, BLOCK_D=block_d, **kmeta)
        _bwd_dkdv_kernel[lambda m: (triton.cdiv(L, m["BLOCK_N"]), B * H)](
            q, k, v, pad, do, lse, delta, dk, dv, *common, **meta)
        _bwd_dq_kernel[lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H)](
            q, k, v, pad, do, lse, delta, dq, *common, **meta)
        return dq, dk, dv, None


def _pad_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor):
    """The key-padding mask as an int8 [B, L] tensor (a plain byte pointer for the kernels) and its strides;
    a 1-element dummy when there is no mask."""
    if key_padding_mask is None:
        return torch.zeros(1, dtype=torch.int8, device=q.device), (0, 0)
    pad = key_padding_mask.to(torch.int8)
    return pad, tuple(pad.stride())


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused Triton attention ``softmax(Q K^T / sqrt(Dh)) V``, differentiable in q, k, v.

    q, k, v: [B, H, L, Dh], one dtype of float16 / bfloat16 / float32 (float64 too, under
    the interpreter, for gradcheck), any strides; Dh <= 128 (tuned for 32, 64, 128); any L >= 1.
    key_padding_mask: bool [B, L], True where a key is padding. Products accumulate in float32
    (float64 for float64 input); float32 inputs use IEEE (not TF32) products.
    Returns [B, H, L, Dh] contiguous in the input dtype; 0 for a sample whose keys are all padding.
    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    """
    _check_inputs(q, k, v, key_padding_mask)
    if q.dtype not in _DTYPES:
        raise MaskscError(f"flash_attention supports {_DTYPES}; got {q.dtype}. Cast q, k, v first.")
    refusal = kernel_refusal(q)
    if refusal is not None:
        raise MaskscError(refusal)
    return _FlashAttention.apply(q, k, v, key_padding_mask)


def kernel_refusal(q: torch.Tensor) -> str | None:
    """Why the kernel cannot run queries ``q`` [B, H, L, Dh] here (shape, device, more than
    ``MAX_GRID_Y`` samples x heads, float64 on a GPU), naming the fix; None when it can.
    ``masksc.ops`` sends what it refuses to torch."""
    if not 1 <= q.shape[-1] <= 128 or q.shape[2] == 0:
        return (f"flash_attention needs 1 <= L and 1 <= Dh <= 128; got shape {tuple(q.shape)}. "
                "Use masksc.kernels.attention_ref.attention_torch for other shapes.")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if q.device.type != "cuda" and not interpreted:
        return ("flash_attention runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); "
                f"got a {q.device.type} tensor. Use masksc.kernels.attention_ref.attention_torch on CPU.")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        return (f"flash_attention launches one program row per (sample, head): B * H = {q.shape[0] * q.shape[1]} "
                f"exceeds CUDA's {MAX_GRID_Y} on that grid axis; use smaller batches, or "
                "masksc.kernels.attention_ref.attention_torch.")
    if q.dtype == torch.float64 and not interpreted:
        # Triton 3.6 fails to lower float64 dots for sm_90 (seen on an H200); float64 is for gradcheck.
        return ("flash_attention takes float64 only under TRITON_INTERPRET=1 (gradcheck); on a GPU "
                "cast q, k, v to float32 / bfloat16 / float16, or use "
                "masksc.kernels.attention_ref.attention_torch.")
    return None
