"""The one place that chooses a backend for each hot op.

Every op has three implementations: a Triton kernel (CUDA tensors), the C++/CUDA op in
``masksc._C`` and a plain-torch reference (the test oracle and CPU fallback). The model
calls only the functions in this module.

``MASKSC_BACKEND`` forces a backend: ``auto`` (default), ``triton``, ``cpp`` or ``torch``.
Under ``auto`` a kernel is used only where ``benchmarks/`` shows it beating the best torch
alternative on that device; the table of defaults is ``AUTO_DEFAULTS`` below.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from masksc import masking

BACKENDS = ("auto", "triton", "cpp", "torch")

# Which backend `auto` picks, per op and device type. Each entry is justified by a
# benchmark in benchmarks/ (see README, "Kernels"); anything unmeasured stays on torch.
AUTO_DEFAULTS: dict[str, dict[str, str]] = {
    # Triton on CUDA: the paper-preset training step 1.29x and embedding 1.28x the torch model
    # (H200, bf16, B=256; end_to_end_gpu.json), where SDPA gets the key-padding mask and cannot
    # take its flash kernel; the patch embedding, also Triton there, times equal to torch at B=256.
    "attention": {"cpu": "torch", "cuda": "triton"},
    # Without a key-padding mask SDPA takes its flash kernel, and Triton is 0.19-0.82x the best
    # SDPA backend at L = 65-1024 (attention_gpu.json): torch.
    "attention_unmasked": {"cpu": "torch", "cuda": "torch"},
    # Triton on CUDA: no faster than patch_embed_torch at B=256, its forward 2-2.5x slower at B=4096
    # (patch_embed_gpu.json).
    "patch_embed": {"cpu": "torch", "cuda": "torch"},
    # C++ op on CPU: 2.6x (masking) and 3.1x (unmask) the torch reference fwd+bwd at B=256,
    # G=144, D=128 (benchmarks/results/masking_cpu.json). CUDA (H200, bf16, B=256, D >= 128):
    # 3.3-4.05x (masking) and 1.0-2.3x (unmask) the torch reference fwd+bwd (masking_cuda.json).
    "random_masking": {"cpu": "cpp", "cuda": "cpp"},
    "unmask": {"cpu": "cpp", "cuda": "cpp"},
    # Below D = 128 on CUDA the C++ op was 0.58-0.96x the reference at D = 1 and not measured
    # between: torch. On CPU it is 0.54-0.79x at D = 1 but 3.1x at D = 128 (masking_cpu.json), and
    # unmask fwd+bwd 1.3x at D = 16, 2.4x at D = 32 and 64 (G=144, masking_cpu_narrow.json): the
    # models' widths are 32 and up.
    "unmask_narrow": {"cpu": "cpp", "cuda": "torch"},
}
UNMASK_WIDE = 128  # the feature size from which unmask counts as "unmask" rather than "unmask_narrow"


@functools.cache
def _triton_available() -> bool:
    """Whether Triton imports (it is installed on Linux only); without it the torch paths run."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _load_cpp() -> bool:
    """Whether masksc._C loads (a source checkout that was never built falls back to torch)."""
    try:
        masking.load_extension()
    except ImportError:
        return False
    return True


# Loaded with this module, not at the first op: torch.compile(fullgraph=True) cannot trace the
# registration of the ops' fake kernels that a compiled step's first call would make.
_CPP_LOADED = _load_cpp()


def _cpp_available(device: torch.device) -> bool:
    """Whether masksc._C is loaded with kernels for ``device`` (one built without nvcc has none
    for CUDA: torch runs)."""
    if not _CPP_LOADED:
        return False
    if device.type in ("cpu", "meta"):  # meta: the fake kernels registered with the op
        return True
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("masksc::random_masking", device.type.upper())
    except RuntimeError:  # a device type with no dispatch key of that name
        return False


def forced_backend() -> str:
    """``MASKSC_BACKEND`` lower-cased (unset or empty: ``auto``); ValueError naming the choices for any
    other value. Checked where work starts (``fit``, the CLI), not only at the first op, which in a
    fit comes after the teacher has trained."""
    forced = (os.environ.get("MASKSC_BACKEND") or "auto").lower()
    if forced not in BACKENDS:
        raise ValueError(f"MASKSC_BACKEND={forced!r} is not one of {BACKENDS}; unset it or pick one of those.")
    return forced


def backend_for(op: str, device: torch.device) -> str:
    """Resolve the backend for ``op`` (a key of ``AUTO_DEFAULTS``) on ``device`` under
    ``MASKSC_BACKEND``. A backend chosen for the user that cannot run here falls back to torch:
    ``auto``'s C++ op without a built ``masksc._C`` (or its kernels for ``device``), Triton
    without Triton installed or, outside its interpreter, without a GPU, and the C++ op that
    stands in for Triton's missing masking kernels; ``cpp`` forced is run as asked."""
    forced = forced_backend()
    masking_op = op in ("random_masking", "unmask", "unmask_narrow")
    if forced == "cpp":
        return "cpp" if masking_op else "torch"  # no C++ attention or patch embedding
    choice = AUTO_DEFAULTS[op].get(device.type, "torch") if forced == "auto" else forced
    if choice == "triton" and masking_op:  # no Triton masking kernel: the C++ op is the nearest
        choice = "cpp"
    if choice == "cpp" and not _cpp_available(device):
        return "torch"
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if choice == "triton" and (not _triton_available() or not (device.type == "cuda" or interpreted)):
        return "torch"  # Triton needs a GPU, or the interpreter (tests) on CPU tensors: not meta or fake ones
    return choice


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention. q, k, v: [B, H, L, Dh] (fp32/fp16/bf16); key_padding_mask: bool
    [B, L], True where a key is padding and must be ignored. Returns [B, H, L, Dh]."""
    backend = backend_for("attention" if key_padding_mask is not None else "attention_unmasked", q.device)
    if backend == "triton":
        from masksc.kernels.attention import flash_attention, kernel_refusal
        if kernel_refusal(q) is None:  # e.g. head dims > 128 and float64 on a GPU take torch
            return flash_attention(q, k, v, key_padding_mask)
    from masksc.kernels.attention_ref import attention_torch
    return attention_torch(q, k, v, key_padding_mask)


def patch_embed(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor, grid_shape: tuple[int, int],
                patch: int) -> torch.Tensor:
    """Embed the P x P patches of a CSR batch of cells laid out on a g x s grid.

    crow_indices int64 [B+1], col_indices int64 [nnz] (row-major grid position
    r * s + c), values [nnz] (any floating dtype, cast to weight's); weight [D, P*P] (a
    Conv2d(1, D, P, P) kernel flattened row-major) and bias [D], one floating dtype. Returns
    tokens [B, G, D] in weight's dtype with G = (g/P) * (s/P), patches in row-major order. Equal
    to Conv2d(kernel=P, stride=P) on the densified grid. Differentiable in weight and bias, and
    in values on the torch path (the Triton kernel treats them as data and refuses
    ``values.requires_grad``).
    """
    backend = backend_for("patch_embed", values.device)
    if backend == "triton":
        from masksc.kernels.patch_embed import patch_embed_csr
        return patch_embed_csr(crow_indices, col_indices, values, weight, bias, grid_shape, patch)
    from masksc.kernels.patch_embed_ref import patch_embed_torch
    return patch_embed_torch(crow_indices, col_indices, values, weight, bias, grid_shape, patch)


def random_masking(tokens: torch.Tensor, n_keep: int, seed: int):
    """MAE-style random masking: per sample keep a uniformly random subset of ``n_keep``
    of the G tokens, reproducibly from ``seed`` and independently across samples.

    tokens [B, G, D] (float32 / float16 / bfloat16 / float64); ``n_keep`` and ``seed`` ints.
    Returns (kept [B, U, D] in tokens' dtype, ids_keep int64 [B, U] ascending, ids_restore
    int64 [B, G], mask bool [B, G] True where a token was masked). Differentiable in tokens.
    """
    if backend_for("random_masking", tokens.device) == "cpp":
        return masking.random_masking_cpp(tokens, n_keep, seed)
    return masking.random_masking_torch(tokens, n_keep, seed)


def unmask(kept: torch.Tensor, mask_token: torch.Tensor, ids_keep: torch.Tensor,
           n_tokens: int) -> torch.Tensor:
    """Inverse of ``random_masking``'s gather: kept [B, U, D] (a floating dtype) scattered to
    their positions ``ids_keep`` (int64 [B, U]) in a [B, n_tokens, D] sequence of kept's dtype,
    ``mask_token`` [D] elsewhere. Each row of ``ids_keep`` must hold distinct positions in
    [0, n_tokens), as ``random_masking`` returns them (not checked, which would cost a device
    sync per call). Differentiable in kept and mask_token."""
    wide = kept.dim() > 0 and kept.shape[-1] >= UNMASK_WIDE  # a 0-d kept is refused by either path's checks
    if backend_for("unmask" if wide else "unmask_narrow", kept.device) == "cpp":
        return masking.unmask_cpp(kept, mask_token, ids_keep, n_tokens)
    return masking.unmask_torch(kept, mask_token, ids_keep, n_tokens)
