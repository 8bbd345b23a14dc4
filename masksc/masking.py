"""MAE-style random masking of token sequences: the C++/CUDA op (``torch.ops.masksc``) and
its pure-torch reference.

Per sample ``b`` every token ``j`` gets a 64-bit key from a counter-based hash of
``(seed, b, j)`` (a splitmix64 mix; ``csrc/hash_rng.h``); the sample keeps the ``n_keep``
tokens with the smallest keys. The keys depend on nothing else, so the same seed gives the
same masks on CPU, CUDA and in the torch reference here, which computes the identical hash
in int64 tensor arithmetic (int64 add/multiply wrap modulo 2**64, which the tests check)
and is the oracle of the tests. The low 20 bits of a key hold the token index, so keys are
unique: ties are broken by index and at most 2**20 tokens per sample are supported.

Importing this module loads ``masksc._C`` only when a ``*_cpp`` function is first called,
so the torch reference works without the compiled extension.
"""
from __future__ import annotations

import operator

import torch

from masksc.errors import DataError

__all__ = ["random_masking_cpp", "unmask_cpp", "random_masking_torch", "unmask_torch", "load_extension",
           "MAX_TOKENS"]

_U64 = 1 << 64
_GAMMA_SAMPLE = 0x9E3779B97F4A7C15
_GAMMA_TOKEN = 0xD1B54A32D192ED03
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INDEX_BITS = 20
MAX_TOKENS = 1 << _INDEX_BITS
_HASH_MASK = 0x7FFFFFFFFFFFFFFF & ~(MAX_TOKENS - 1)

_registered = False


def _s64(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned integer ``x mod 2**64``."""
    x %= _U64
    return x - _U64 if x >= 1 << 63 else x


def _mix64_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (exact, mod 2**64)."""
    z %= _U64
    z = ((z ^ (z >> 30)) * _MIX1) % _U64
    z = ((z ^ (z >> 27)) * _MIX2) % _U64
    return z ^ (z >> 31)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser, in place on an int64 tensor holding 64-bit patterns.

    ``>>`` on int64 is arithmetic, so the logical shift masks off the copied sign bits.
    """
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        t = z >> shift
        t &= (1 << (64 - shift)) - 1
        z ^= t
        if mult is not None:
            z *= _s64(mult)
    return z


def token_keys(batch: int, n_tokens: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The masking keys: int64 [batch, n_tokens], unique per row, non-negative; a sample
    keeps the tokens with the smallest keys. Identical to ``token_key`` in csrc/hash_rng.h."""
    seed_st = _mix64_int(seed + _GAMMA_SAMPLE)
    b = torch.arange(1, batch + 1, dtype=torch.int64, device=device)
    b *= _s64(_GAMMA_SAMPLE)
    b += _s64(seed_st)
    sample_st = _mix64_(b)
    idx = torch.arange(n_tokens, dtype=torch.int64, device=device)
    keys = sample_st[:, None] + (idx + 1).mul_(_s64(_GAMMA_TOKEN))[None, :]
    _mix64_(keys)
    keys &= _HASH_MASK
    keys |= idx
    return keys


def _check_masking(tokens: torch.Tensor, n_keep: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise DataError(f"random_masking: tokens must be a 3-D tensor [B, G, D], got {shape}; "
                        "reshape your tokens to [batch, tokens, dim].")
    G = tokens.shape[1]
    if not 0 <= n_keep <= G:
        raise DataError(f"random_masking: n_keep must be in [0, G] = [0, {G}], got {n_keep}; "
                        "compute it as round(G * (1 - mask_ratio)).")
    if G > MAX_TOKENS:
        raise DataError(f"random_masking: at most {MAX_TOKENS} tokens per sample are supported, "
                        f"got G = {G}; use larger patches.")


def _count(name: str, value, example: str = "") -> int:
    """``value`` as an int; DataError for a bool or a fractional number rather than truncating it
    (``example``: how to make one, for the fix)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise DataError(f"{name} must be an integer, got {value!r}; fix: pass an int{example}.") from None


def _check_unmask(kept: torch.Tensor, mask_token: torch.Tensor, ids_keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Validate unmask's arguments; return mask_token as a 1-D [D] tensor of kept's dtype."""
    if kept.dim() != 3:
        raise DataError(f"unmask: kept must be 3-D [B, U, D], got shape {tuple(kept.shape)}.")
    B, U, D = kept.shape
    if ids_keep.dtype != torch.int64 or tuple(ids_keep.shape) != (B, U):
        raise DataError(f"unmask: ids_keep must be int64 [B, U] = [{B}, {U}], got {ids_keep.dtype} "
                        f"{tuple(ids_keep.shape)}; pass the ids_keep that produced kept.")
    if mask_token.numel() != D or (mask_token.dim() > 1 and any(s != 1 for s in mask_token.shape[:-1])):
        raise DataError(f"unmask: mask_token must hold D = {D} values ([D] or [1, 1, D]), "
                        f"got shape {tuple(mask_token.shape)}.")
    if not U <= n_tokens <= MAX_TOKENS:
        raise DataError(f"unmask: n_tokens must be in [U, {MAX_TOKENS}] = [{U}, {MAX_TOKENS}], got {n_tokens}.")
    _check_same_device("unmask", kept=kept, mask_token=mask_token, ids_keep=ids_keep)
    return mask_token.reshape(D).to(kept.dtype)


def _check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """One device for every tensor argument (a meta tensor among CPU ones would otherwise send the
    call to the shape-only fake kernel, which returns uninitialised memory)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise DataError(f"{op}: all tensors must be on one device, got {listed}; fix: move them with .to(device).")


def random_masking_torch(tokens: torch.Tensor, n_keep: int, seed: int):
    """Pure-torch reference of ``random_masking`` (and the CPU fallback); vectorised over samples.

    tokens [B, G, D] (any dtype). Returns (kept [B, U, D] tokens.dtype, ids_keep int64 [B, U]
    ascending, ids_restore int64 [B, G], mask bool [B, G] True where masked), U = n_keep;
    ``ids_restore = argsort(cat(ids_keep, masked ids ascending))``. Differentiable w.r.t. tokens.
    """
    n_keep, seed = _count("n_keep", n_keep, ", e.g. round(G * (1 - mask_ratio))"), _count("seed", seed)
    _check_masking(tokens, n_keep)
    B, G, D = tokens.shape
    dev = tokens.device
    if n_keep in (0, G):
        keep = torch.full((B, G), n_keep == G, dtype=torch.bool, device=dev)
    else:
        keys = token_keys(B, G, seed, dev)
        keep = keys <= keys.kthvalue(n_keep, dim=1, keepdim=True).values
    kept_before = keep.cumsum(1)  # kept tokens at or before j
    positions = torch.arange(G, device=dev)
    ids_restore = torch.where(keep, kept_before - 1, n_keep + positions - kept_before)
    order = torch.empty_like(ids_restore).scatter_(1, ids_restore, positions.expand(B, G))
    ids_keep = order[:, :n_keep].contiguous()
    # advanced indexing: several times faster than gather with an expanded index on CPU
    kept = tokens[torch.arange(B, device=dev)[:, None], ids_keep]
    return kept, ids_keep, ids_restore, ~keep


def unmask_torch(kept: torch.Tensor, mask_token: torch.Tensor, ids_keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Pure-torch reference of ``unmask``: [B, n_tokens, D] holding ``mask_token`` ([D] or
    [1, 1, D], cast to kept.dtype) everywhere except at ``ids_keep`` [B, U] (int64), where
    the rows of ``kept`` [B, U, D] go. Differentiable w.r.t. kept and mask_token."""
    n_tokens = _count("n_tokens", n_tokens)
    token = _check_unmask(kept, mask_token, ids_keep, n_tokens)
    B, U, D = kept.shape
    out = token.expand(B, n_tokens, D).clone()
    # index_put_ into a clone: several times faster than scatter with an expanded index on CPU
    return out.index_put_((torch.arange(B, device=kept.device)[:, None], ids_keep), kept)


def load_extension() -> None:
    """Import ``masksc._C`` (registering ``torch.ops.masksc.*``) and its fake kernels and
    autograd formulas; idempotent. Raises ImportError naming the build command if missing."""
    global _registered
    if _registered:
        return
    try:
        from masksc import _C  # noqa: F401  (import registers the ops)
    except ImportError as exc:
        raise ImportError(
            "masksc._C, the compiled C++/CUDA masking op, is not built. Build it with "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
            "from the repository root, after installing torch; or set MASKSC_BACKEND=torch."
        ) from exc
    _register_python_parts()
    _registered = True


def _register_python_parts() -> None:
    """Fake kernels (for torch.compile / meta tensors) and autograd of the three ops."""

    @torch.library.register_fake("masksc::random_masking")
    def _(tokens, n_keep, seed):
        _check_masking(tokens, n_keep)
        B, G, D = tokens.shape
        return (tokens.new_empty(B, n_keep, D), tokens.new_empty(B, n_keep, dtype=torch.int64),
                tokens.new_empty(B, G, dtype=torch.int64), tokens.new_empty(B, G, dtype=torch.bool))

    @torch.library.register_fake("masksc::unmask")
    def _(kept, mask_token, ids_keep, n_tokens):
        torch._check(mask_token.dim() == 1 and mask_token.dtype == kept.dtype,
                     lambda: "unmask: mask_token must be 1-D with kept's dtype")
        _check_same_device("unmask", kept=kept, mask_token=mask_token, ids_keep=ids_keep)
        B, U, D = kept.shape
        return kept.new_empty(B, n_tokens, D)

    @torch.library.register_fake("masksc::unmask_backward")
    def _(grad_out, ids_keep):
        _check_same_device("unmask_backward", grad_out=grad_out, ids_keep=ids_keep)
        B, G, D = grad_out.shape
        return grad_out.new_empty(B, ids_keep.shape[1], D), grad_out.new_empty(D)

    def masking_setup(ctx, inputs, output):
        ctx.n_tokens = inputs[0].shape[1]
        ctx.save_for_backward(output[1])

    def masking_backward(ctx, grad_kept, *_):
        (ids_keep,) = ctx.saved_tensors
        zero = grad_kept.new_zeros(grad_kept.shape[-1])
        return torch.ops.masksc.unmask(grad_kept, zero, ids_keep, ctx.n_tokens), None, None

    def unmask_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    def unmask_backward(ctx, grad_out):
        (ids_keep,) = ctx.saved_tensors
        grad_kept, grad_token = torch.ops.masksc.unmask_backward(grad_out, ids_keep)
        return grad_kept, grad_token, None, None

    # unmask_backward is the adjoint of unmask (both linear), so its backward is unmask again.
    def unmask_bwd_setup(ctx, inputs, output):
        ctx.n_tokens = inputs[0].shape[1]
        ctx.save_for_backward(inputs[1])

    def unmask_bwd_backward(ctx, gg_kept, gg_token):
        (ids_keep,) = ctx.saved_tensors
        return torch.ops.masksc.unmask(gg_kept, gg_token, ids_keep, ctx.n_tokens), None

    torch.library.register_autograd("masksc::random_masking", masking_backward, setup_context=masking_setup)
    torch.library.register_autograd("masksc::unmask", unmask_backward, setup_context=unmask_setup)
    torch.library.register_autograd("masksc::unmask_backward", unmask_bwd_backward, setup_context=unmask_bwd_setup)


def random_masking_cpp(tokens: torch.Tensor, n_keep: int, seed: int):
    """``torch.ops.masksc.random_masking`` (C++ on CPU, CUDA kernels on GPU); same contract
    and, for the same seed, the same ids as ``random_masking_torch``.

    tokens [B, G, D] (float32/float16/bfloat16/float64). Returns (kept [B, U, D], ids_keep
    int64 [B, U] ascending, ids_restore int64 [B, G], mask bool [B, G] True = masked).
    ``seed`` is any Python int (taken mod 2**64). Differentiable w.r.t. tokens.
    """
    load_extension()
    n_keep = _count("n_keep", n_keep, ", e.g. round(G * (1 - mask_ratio))")
    _check_masking(tokens, n_keep)
    return torch.ops.masksc.random_masking(tokens, n_keep, _s64(_count("seed", seed)))


def unmask_cpp(kept: torch.Tensor, mask_token: torch.Tensor, ids_keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``torch.ops.masksc.unmask``: kept [B, U, D] scattered to ``ids_keep`` [B, U] (int64) in a
    [B, n_tokens, D] output that holds ``mask_token`` ([D] or [1, 1, D], cast to kept.dtype)
    elsewhere. Differentiable w.r.t. kept and mask_token (twice, via unmask_backward)."""
    load_extension()
    n_tokens = _count("n_tokens", n_tokens)
    token = _check_unmask(kept, mask_token, ids_keep, n_tokens)
    return torch.ops.masksc.unmask(kept, token, ids_keep, n_tokens)
