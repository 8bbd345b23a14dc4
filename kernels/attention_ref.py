"""Softmax attention in plain torch: ``attention_torch`` (the torch path of ``masksc.ops``) and
``attention_reference`` (eager math, the oracle of the Triton kernel in ``attention.py``). This
module needs no Triton, so the torch path runs where Triton is not installed.

Fully padded rows. When every key of a sample is padding, softmax over the empty set is
undefined; every implementation defines the output of such a sample as 0 (and its gradients as
0) instead of NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from masksc.errors import MaskscError


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_padding_mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise MaskscError(f"attention expects q, k, v of one shape [B, H, L, Dh]; got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}. Reshape them to [B, H, L, Dh].")
    if not (q.dtype == k.dtype == v.dtype):
        raise MaskscError(f"attention expects q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}. "
                          "Cast them to a common dtype.")
    devices = {t.device for t in (q, k, v, key_padding_mask) if t is not None}
    if len(devices) > 1:
        raise MaskscError("attention: q, k, v and key_padding_mask must be on one device, got "
                          f"{sorted(map(str, devices))}; fix: move them with .to(q.device).")
    if key_padding_mask is not None:
        B, _, L, _ = q.shape
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, L):
            raise MaskscError(f"key_padding_mask must be bool [B, L] = [{B}, {L}]; got "
                              f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}. "
                              "Pass a bool tensor, True where a key is padding.")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager ``softmax(Q K^T / sqrt(Dh)) V`` computed in float32 (float64 for float64 input);
    the oracle of the tests.

    q, k, v: [B, H, L, Dh], one floating dtype. key_padding_mask: bool [B, L], True where a key
    is ignored. Returns [B, H, L, Dh] in the input dtype; 0 for a sample whose keys are all padding.
    """
    _check_inputs(q, k, v, key_padding_mask)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    empty = None
    if key_padding_mask is not None:
        empty = key_padding_mask.all(dim=1)
        # An all-padding row would be softmax over nothing (NaN); unmask it, then zero its output.
        ignore = key_padding_mask & ~empty[:, None]
        scores = scores.masked_fill(ignore[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v.to(work)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.to(q.dtype)


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention through ``F.scaled_dot_product_attention`` (the torch path of ``masksc.ops``).

    q, k, v: [B, H, L, Dh], one floating dtype; key_padding_mask: bool [B, L], True = ignore
    the key; it becomes a boolean ``attn_mask`` [B, 1, 1, L] (True = attend). Returns
    [B, H, L, Dh] in the input dtype; 0 for a sample whose keys are all padding.
    """
    _check_inputs(q, k, v, key_padding_mask)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    empty = key_padding_mask.all(dim=1)
    attend = ~(key_padding_mask & ~empty[:, None])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
    return out.masked_fill(empty[:, None, None, None], 0.0)
