"""The one place that chooses a backend for each hot op.

Every op has three implementations: a Triton kernel (CUDA tensors), the C++/CUDA op in
``masksc._C`` and a plain-torch reference (the test oracle and CPU fallback). The model
calls only the functions in this module.

``MASKSC_BACKEND`` forces a backend: ``auto`` (default), ``triton``, ``cpp`` or ``torch``.
Under ``auto`` a kernel is used only where ``benchmarks/`` shows it beating the best torch
alternative on that device; the table of defaults is ``AUTO_DEFAULTS`` below.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")

# Which backend `auto` picks, per op and device type. Each entry is justified by a
# benchmark in benchmarks/ (see README, "Kernels"); anything unmeasured stays on torch.
AUTO_DEFAULTS: dict[str, dict[str, str]] = {
    # Triton on CUDA: the paper-preset training step 1.30x and embedding 1.28x the torch model
    # (H200, bf16, B=256; end_to_end_gpu.json), where SDPA gets the key-padding mask and cannot
    # take its flash kernel; the patch embedding, also Triton there, times equal to torch at B=256.
    "attention": {"cpu": "torch", "cuda": "triton"},
    # Triton on CUDA: no faster than patch_embed_torch at B=256, 2-2.5x slower at B=4096
    # (patch_embed_gpu.json).
    "patch_embed": {"cpu": "torch", "cuda": "torch"},
    # C++ op on CPU: 2.6x (masking) and 3.1x (unmask) the torch reference fwd+bwd at B=256,
    # G=144, D=128 (benchmarks/results/masking_cpu.json). CUDA (H200, bf16, B=256): 3.3-3.9x
    # (masking) and 1.0-2.3x (unmask, D >= 128) the torch reference fwd+bwd (masking_cuda.json).
    "random_masking": {"cpu": "cpp", "cuda": "cpp"},
    "unmask": {"cpu": "cpp", "cuda": "cpp"},
}


def _cpp_available(device: torch.device) -> bool:
    """Whether masksc._C loads with kernels for ``device`` (a source checkout that was never
    built, or built without nvcc, falls back to torch)."""
    from masksc import masking
    try:
        masking.load_extension()
    except ImportError:
        return False
    return device.type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key(
        "masksc::random_masking", device.type.upper())


def backend_for(op: str, device: torch.device) -> str:
    """Resolve the backend for ``op`` on ``device`` under ``MASKSC_BACKEND``."""
    forced = (os.environ.get("MASKSC_BACKEND") or "auto").lower()  # set but empty: as unset
    if forced not in BACKENDS:
        raise ValueError(f"MASKSC_BACKEND={forced!r} is not one of {BACKENDS}; unset it or pick one of those.")
    if forced == "auto":
        choice = AUTO_DEFAULTS[op].get(device.type, "torch")
        return "torch" if choice == "cpp" and not _cpp_available(device) else choice
    if forced == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton needs a GPU, or the interpreter for tests; fall back rather than crash.
        return "torch"
    if forced == "cpp" and op in ("attention", "patch_embed"):
        return "torch"
    if forced == "triton" and op in ("random_masking", "unmask"):
        return "cpp"
    return forced


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention. q, k, v: [B, H, L, Dh] (fp32/fp16/bf16); key_padding_mask: bool
    [B, L], True where a key is padding and must be ignored. Returns [B, H, L, Dh]."""
    backend = backend_for("attention", q.device)
    if backend == "triton":
        from masksc.kernels.attention import flash_attention, kernel_refusal
        if kernel_refusal(q) is None:  # e.g. head dims > 128 and float64 on a GPU take torch
            return flash_attention(q, k, v, key_padding_mask)
    from masksc.kernels.attention import attention_torch
    return attention_torch(q, k, v, key_padding_mask)


def patch_embed(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor, grid_shape: tuple[int, int],
                patch: int) -> torch.Tensor:
    """Embed the P x P patches of a CSR batch of cells laid out on a g x s grid.

    crow_indices int64 [B+1], col_indices int64 [nnz] (row-major grid position
    r * s + c), values [nnz]; weight [D, P*P] (a Conv2d(1, D, P, P) kernel flattened
    row-major), bias [D]. Returns tokens [B, G, D] with G = (g/P) * (s/P), patches in
    row-major order. Equal to Conv2d(kernel=P, stride=P) on the densified grid.
    """
    backend = backend_for("patch_embed", values.device)
    if backend == "triton":
        from masksc.kernels.patch_embed import patch_embed_csr
        return patch_embed_csr(crow_indices, col_indices, values, weight, bias, grid_shape, patch)
    from masksc.kernels.patch_embed import patch_embed_torch
    return patch_embed_torch(crow_indices, col_indices, values, weight, bias, grid_shape, patch)


def random_masking(tokens: torch.Tensor, n_keep: int, seed: int):
    """MAE-style random masking: per sample keep a uniformly random subset of ``n_keep``
    of the G tokens, reproducibly from ``seed`` and independently across samples.

    tokens [B, G, D]. Returns (kept [B, U, D], ids_keep int64 [B, U] ascending,
    ids_restore int64 [B, G], mask bool [B, G] True where a token was masked).
    """
    from masksc import masking
    if backend_for("random_masking", tokens.device) == "cpp":
        return masking.random_masking_cpp(tokens, n_keep, seed)
    return masking.random_masking_torch(tokens, n_keep, seed)


def unmask(kept: torch.Tensor, mask_token: torch.Tensor, ids_keep: torch.Tensor,
           n_tokens: int) -> torch.Tensor:
    """Inverse of ``random_masking``'s gather: kept [B, U, D] scattered to their positions
    ``ids_keep`` [B, U] in a [B, n_tokens, D] sequence, ``mask_token`` [D] elsewhere. Each row
    of ``ids_keep`` must hold distinct positions in [0, n_tokens), as ``random_masking`` returns
    them (not checked, which would cost a device sync per call)."""
    from masksc import masking
    if backend_for("unmask", kept.device) == "cpp":
        return masking.unmask_cpp(kept, mask_token, ids_keep, n_tokens)
    return masking.unmask_torch(kept, mask_token, ids_keep, n_tokens)
