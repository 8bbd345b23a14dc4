"""Fused Triton attention (run on CPU by the Triton interpreter) against the eager oracle."""
import os

import pytest  # noqa: E402
import torch  # noqa: E402

from masksc import ops  # noqa: E402
from masksc.errors import MaskscError  # noqa: E402
from masksc.kernels import attention as attn  # noqa: E402
from masksc.kernels.attention import flash_attention  # noqa: E402
from masksc.kernels.attention_ref import attention_reference, attention_torch  # noqa: E402
from conftest import compile_for_sm90  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1 set before triton is imported")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _qkv(B, H, L, Dh, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, Dh, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def _fwd_bwd(fn, q, k, v, mask, grad):
    out = fn(q, k, v, mask)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _compare(q, k, v, mask=None, atol=1e-5, rtol=1e-4):
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    got = _fwd_bwd(flash_attention, q, k, v, mask, grad)
    want = _fwd_bwd(attention_reference, q, k, v, mask, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == q.dtype and a.shape == q.shape
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("B,H,L,Dh", [
    (1, 1, 1, 32),     # a single token
    (2, 2, 17, 32),    # L not a multiple of the block (16 under the interpreter)
    (1, 2, 37, 64),    # three blocks with a ragged tail
    (1, 1, 20, 128),
    (1, 1, 9, 24),     # head dim below the padded block width
])
def test_matches_reference_fp32(B, H, L, Dh):
    _compare(*_qkv(B, H, L, Dh))


def test_key_padding_with_fully_padded_sample():
    q, k, v = _qkv(3, 2, 19, 32)
    mask = torch.zeros(3, 19, dtype=torch.bool, device=DEVICE)
    mask[0, 5:] = True          # a short sample
    mask[1, ::3] = True         # scattered padding
    mask[2] = True              # all keys padding: defined as output 0, gradient 0
    out, dq, dk, dv = _compare(q, k, v, mask)
    assert torch.all(out[2] == 0)
    assert torch.all(dq[2] == 0) and torch.all(dk[2] == 0) and torch.all(dv[2] == 0)
    assert torch.isfinite(out).all()
    # padded keys get no gradient: they take no part in attention
    assert torch.all(dk[0, :, 5:] == 0) and torch.all(dv[0, :, 5:] == 0)


def test_padding_equals_truncation():
    # queries are not masked; each query attends only to the 13 real keys
    q, k, v = _qkv(1, 2, 21, 32)
    mask = torch.zeros(1, 21, dtype=torch.bool, device=DEVICE)
    mask[0, 13:] = True
    probs = torch.softmax((q @ k[:, :, :13].transpose(-1, -2)) / 32 ** 0.5, dim=-1)
    torch.testing.assert_close(flash_attention(q, k, v, mask), probs @ v[:, :, :13], atol=1e-5, rtol=1e-4)


def test_non_contiguous_inputs():
    # [B, L, H, Dh] projections viewed as [B, H, L, Dh], as a transformer block produces them
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(2, 18, 2, 32, generator=gen).to(DEVICE) for _ in range(3)]
    q, k, v = [t.transpose(1, 2).requires_grad_() for t in base]
    assert not q.is_contiguous()
    _compare(q, k, v)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    q, k, v = _qkv(1, 2, 33, 64, dtype=dtype)
    mask = torch.zeros(1, 33, dtype=torch.bool, device=DEVICE)
    mask[0, 30:] = True
    _compare(q, k, v, mask, atol=tol, rtol=tol)


@pytest.mark.skipif(DEVICE == "cuda", reason="float64 runs under the interpreter only (refusal tested below)")
def test_gradcheck_float64():
    q, k, v = _qkv(1, 2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[False, True, False, False, True]], device=DEVICE)
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, mask), (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c), (q, k, v), fast_mode=True)


def test_a_second_derivative_is_refused_not_dropped():
    """The backward kernels are not differentiable: a Hessian-vector product through them lost the
    attention's second-order term without a word (off by 359 against a magnitude of 570)."""
    q, k, v = _qkv(1, 2, 5, 8)
    loss = flash_attention(q, k, v).square().sum() + q.pow(3).sum()  # another path keeps gq in the graph
    (gq,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()  # before: ran, with only q**3's second derivative


def test_more_samples_times_heads_than_a_cuda_grid_axis_holds_go_to_torch(monkeypatch):
    """B * H runs over the launch grid's second axis, which CUDA caps at 65,535 (an embed batch of
    8192 cells with 12 heads failed to launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attn.kernel_refusal(torch.zeros(5461, 12, 1, 8)) is None  # 65,532
    assert "B * H = 65544 exceeds CUDA's 65535" in attn.kernel_refusal(torch.zeros(5462, 12, 1, 8))


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter takes float64 (gradcheck above)")
def test_float64_on_a_gpu_is_refused_with_the_fix():
    q, k, v = _qkv(1, 2, 5, 8, dtype=torch.float64)
    with pytest.raises(MaskscError, match="float64 only under TRITON_INTERPRET=1.*cast q, k, v"):
        flash_attention(q, k, v)


def test_attention_torch_matches_reference_with_padding():
    q, k, v = _qkv(2, 2, 11, 32)
    mask = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    mask[0, 7:] = True
    mask[1] = True
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)
    got = _fwd_bwd(attention_torch, q, k, v, mask, grad)
    want = _fwd_bwd(attention_reference, q, k, v, mask, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert torch.all(got[0][1] == 0)


def test_bad_inputs_raise():
    q, k, v = _qkv(1, 1, 4, 16)
    with pytest.raises(MaskscError, match="key_padding_mask"):
        flash_attention(q, k, v, torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(MaskscError, match="one shape"):
        flash_attention(q, k[:, :, :3], v)
    with pytest.raises(MaskscError, match="one dtype"):
        attention_torch(q, k.double(), v)
    with pytest.raises(MaskscError, match="Dh <= 128"):
        flash_attention(*_qkv(1, 1, 2, 160))
    with pytest.raises(MaskscError, match="1 <= Dh <= 128"):
        flash_attention(*_qkv(1, 1, 2, 0))
    with pytest.raises(MaskscError, match=r"on one device, got \['.*', 'meta'\]; fix: move them"):
        attention_torch(q, k, v, torch.zeros(1, 4, dtype=torch.bool, device="meta"))


def test_autotune_configs_follow_sequence_length(monkeypatch):
    monkeypatch.setenv("MASKSC_TRITON_AUTOTUNE", "1")
    short = attn._prune(attn._ALL, {"L": 65}, BLOCK_D=64)
    long = attn._prune(attn._ALL, {"L": 1024}, BLOCK_D=64)
    assert {id(c) for c in short} == {id(c) for c in attn._SHORT}
    assert {id(c) for c in long} == {id(c) for c in attn._LONG}
    assert any(c.kwargs["BLOCK_M"] <= 32 for c in short)
    big = attn._prune(attn._ALL, {"L": 2048}, BLOCK_D=128)
    assert big and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in big)
    monkeypatch.setenv("MASKSC_TRITON_AUTOTUNE", "0")
    assert len(attn._prune(attn._ALL, {"L": 65}, BLOCK_D=64)) == 1


def test_ops_routes_triton_backend_to_kernel(monkeypatch):
    q, k, v = _qkv(2, 2, 10, 32)
    mask = torch.zeros(2, 10, dtype=torch.bool, device=DEVICE)
    mask[1, 6:] = True
    calls = []

    def spy(*args):
        calls.append(1)
        return flash_attention(*args)

    monkeypatch.setattr(attn, "flash_attention", spy)
    monkeypatch.setenv("MASKSC_BACKEND", "triton")
    got = ops.attention(q, k, v, mask)
    assert calls == [1]
    monkeypatch.setenv("MASKSC_BACKEND", "torch")
    want = ops.attention(q, k, v, mask)
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


_COMPILE_SM90 = r'''
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from masksc.kernels import attention as A

POINTER = {"Q": "{dt}", "K": "{dt}", "V": "{dt}", "O": "{dt}", "DO": "{dt}", "DQ": "{dt}", "DK": "{dt}",
           "DV": "{dt}", "LSE": "fp32", "DELTA": "fp32", "PAD": "i8"}
n = 0
for dt, prec, (bm, bn, warps, stages), d in [("bf16", "tf32", (64, 64, 4, 3), 64), ("fp16", "tf32", (128, 64, 8, 3), 128),
                                             ("bf16", "tf32", (16, 16, 4, 2), 32), ("fp32", "ieee", (16, 16, 4, 2), 64)]:
    for kern in (A._fwd_kernel, A._bwd_dkdv_kernel, A._bwd_dq_kernel):
        jit = kern.fn
        consts = dict(HAS_PAD=True, ACC=tl.float32, PRECISION=prec, UPCAST=False, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=bn)
        sig = {a: "constexpr" if a in consts else "*" + POINTER[a].format(dt=dt) if a in POINTER
               else "fp32" if a.endswith("scale") else "i32" for a in jit.arg_names}
        src = ASTSource(jit, sig, constexprs={(jit.arg_names.index(a),): v for a, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        assert k.asm["cubin"] and k.metadata.shared <= 227 * 1024, (jit.__name__, k.metadata.shared)
        n += 1
print("compiled", n)
'''


def test_kernels_compile_for_sm90():
    """The interpreter skips Triton's GPU lowering; compile the kernels to H100 (sm_90) machine
    code here, without a GPU, so type or layout errors surface before a GPU run."""
    assert "compiled 12" in compile_for_sm90(_COMPILE_SM90)
