"""Sparse patch embedding (Triton under the interpreter, and the torch path) against densify + Conv2d."""
import os

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from masksc import ops  # noqa: E402
from masksc.errors import MaskscError  # noqa: E402
from masksc.kernels import patch_embed as pe  # noqa: E402
from masksc.kernels.patch_embed import patch_embed_csr  # noqa: E402
from masksc.kernels.patch_embed_ref import patch_embed_reference, patch_embed_torch  # noqa: E402
from conftest import compile_for_sm90  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
triton_ok = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                               reason="Triton needs a GPU or TRITON_INTERPRET=1 set before triton is imported")


def _batch(B, g, s, density, seed=0, empty_rows=(), padding_cols=None):
    """A CSR batch from a random dense grid; ``empty_rows`` get no nonzeros, ``padding_cols``
    (grid positions) never hold values, like the padding of a GridLayout."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(B, g * s, generator=gen) * (torch.rand(B, g * s, generator=gen) < density)
    for r in empty_rows:
        dense[r] = 0
    if padding_cols is not None:
        dense[:, padding_cols] = 0
    csr = dense.to_sparse_csr()
    return (csr.crow_indices().to(DEVICE), csr.col_indices().to(DEVICE), csr.values().to(DEVICE), dense.to(DEVICE))


def _params(D, P, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, P * P, generator=gen).to(DEVICE, dtype).requires_grad_()
    b = torch.randn(D, generator=gen).to(DEVICE, dtype).requires_grad_()
    return w, b


def _conv(dense, w, b, g, s, P):
    """Conv2d on the dense grid: the definition the embedding must equal."""
    out = F.conv2d(dense.view(-1, 1, g, s).to(w.dtype), w.view(-1, 1, P, P), b, stride=P)
    return out.flatten(2).transpose(1, 2)


def _fwd_bwd(fn, crow, col, val, w, b, g, s, P, grad):
    out = fn(crow, col, val, w, b, (g, s), P)
    return (out, *torch.autograd.grad(out, (w, b), grad))


SHAPES = [  # (B, g, s, P, D)
    (3, 8, 8, 4, 16),
    (2, 12, 8, 2, 24),    # rectangular grid, small patch
    (2, 9, 10, 3, 8),     # a partial last patch row / column that Conv2d ignores
    (4, 16, 16, 4, 40),   # D not a multiple of the block width
]


@pytest.mark.parametrize("fn", [patch_embed_reference, patch_embed_torch,
                                pytest.param(patch_embed_csr, marks=triton_ok)],
                         ids=["reference", "torch", "triton"])
@pytest.mark.parametrize("B,g,s,P,D", SHAPES)
def test_equals_conv2d_forward_and_grads(fn, B, g, s, P, D):
    crow, col, val, dense = _batch(B, g, s, 0.3, empty_rows=(1,))
    w, b = _params(D, P)
    grad = torch.randn(B, (g // P) * (s // P), D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = _fwd_bwd(fn, crow, col, val, w, b, g, s, P, grad)
    want = (_conv(dense, w, b, g, s, P), *torch.autograd.grad(_conv(dense, w, b, g, s, P), (w, b), grad))
    for name, a, e in zip(("out", "grad_weight", "grad_bias"), got, want):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert torch.allclose(got[0][1], b.detach().expand(got[0].shape[1], D))  # the empty cell is all bias


@triton_ok
def test_triton_edge_batches():
    g = s = 8
    P, D = 4, 16
    w, b = _params(D, P)
    # all-zero patches: values only in the top-left patch; the last 10 positions are padding
    dense = torch.zeros(4, g, s)
    dense[:, :4, :4] = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(5)) + 0.1
    dense = dense.view(4, g * s).to(DEVICE)
    dense[:, -10:] = 0
    csr = dense.to_sparse_csr()
    out = patch_embed_csr(csr.crow_indices(), csr.col_indices(), csr.values(), w, b, (g, s), P)
    torch.testing.assert_close(out, _conv(dense, w, b, g, s, P), atol=1e-5, rtol=1e-5)
    assert torch.allclose(out[:, 1:], b.detach().expand(4, 3, D))
    # a batch with no nonzeros at all, and a batch of zero cells
    none = patch_embed_csr(torch.zeros(3, dtype=torch.int64, device=DEVICE), torch.zeros(0, dtype=torch.int64,
                           device=DEVICE), torch.zeros(0, device=DEVICE), w, b, (g, s), P)
    torch.testing.assert_close(none, b.detach().expand(2, 4, D))
    gw, gb = torch.autograd.grad(none.sum(), (w, b))
    assert torch.all(gw == 0) and torch.allclose(gb, torch.full((D,), 8.0, device=DEVICE))
    zero_cells = patch_embed_csr(torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(0, dtype=torch.int64,
                                 device=DEVICE), torch.zeros(0, device=DEVICE), w, b, (g, s), P)
    assert zero_cells.shape == (0, 4, D)


@triton_ok
def test_triton_unsorted_columns():
    g = s = 8
    P, D = 2, 16
    crow, col, val, dense = _batch(3, g, s, 0.4)
    w, b = _params(D, P)
    perm = torch.cat([torch.randperm(int(hi - lo), generator=torch.Generator().manual_seed(i)) + int(lo)
                      for i, (lo, hi) in enumerate(zip(crow[:-1].tolist(), crow[1:].tolist()))]).to(DEVICE)
    out = patch_embed_csr(crow, col[perm], val[perm], w, b, (g, s), P)
    torch.testing.assert_close(out, _conv(dense, w, b, g, s, P), atol=1e-5, rtol=1e-5)


@triton_ok
def test_triton_takes_strided_inputs():
    """Columns, values and bias that are views with a stride (not laid out flat) give the same
    tokens as contiguous ones: the kernel indexes them as flat arrays."""
    g, s, P, D = 8, 8, 2, 16
    crow, col, val, dense = _batch(3, g, s, 0.4)
    w, b = _params(D, P)
    strided = (torch.stack([col, col.flip(0)], 1)[:, 0], torch.stack([val, val * 7], 1)[:, 0],
               torch.stack([b, b + 100], 1)[:, 0])
    assert not any(t.is_contiguous() for t in strided)
    out = patch_embed_csr(crow, strided[0], strided[1], w, strided[2], (g, s), P)
    torch.testing.assert_close(out, _conv(dense, w, b, g, s, P), atol=1e-5, rtol=1e-5)


def test_malformed_csr_is_refused_on_every_path():
    crow, col, val, _ = _batch(2, 8, 8, 0.3)
    w, b = _params(16, 4)
    too_far, negative, short = col.clone(), col.clone(), crow.clone()
    too_far[-1], negative[0], short[-1] = 64, -1, short[-1] - 1
    cases = [(crow, too_far, r"col must index grid positions 0 \.\. 63, got \d+ \.\. 64"),
             (crow, negative, r"col must index grid positions 0 \.\. 63, got -1"),
             (short, col, r"crow must run from 0 to nnz"),
             (crow.flip(0), col, r"crow must run from 0 to nnz")]
    for fn in (patch_embed_reference, patch_embed_torch):
        for c, k, message in cases:
            with pytest.raises(MaskscError, match=message):
                fn(c.cpu(), k.cpu(), val.cpu(), w.cpu(), b.cpu(), (8, 8), 4)


def test_torch_path_runs_on_meta_tensors():
    """No host sync in the torch path: it traces on the meta device (shapes only)."""
    crow, col, val, _ = _batch(2, 9, 10, 0.3)
    w, b = _params(8, 3)
    out = patch_embed_torch(*(t.detach().to("meta") for t in (crow, col, val, w, b)), (9, 10), 3)
    assert out.device.type == "meta" and out.shape == (2, 9, 8)


@triton_ok
def test_triton_gradcheck_float64():
    g, s, P, D = 6, 6, 3, 5
    crow, col, val, _ = _batch(2, g, s, 0.5)
    w, b = _params(D, P, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w_, b_: patch_embed_csr(crow, col, val, w_, b_, (g, s), P), (w, b))


@triton_ok
def test_triton_second_derivative_is_refused_not_dropped():
    """The weight-gradient kernel is not differentiable: double backward raises rather than
    silently treating the gradient as a constant."""
    g, s, P, D = 6, 6, 3, 5
    crow, col, val, _ = _batch(2, g, s, 0.5)
    w, b = _params(D, P)
    loss = patch_embed_csr(crow, col, val, w, b, (g, s), P).square().sum() + w.pow(3).sum()
    gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (gw.sum() + gb.sum()).backward()  # before: ran, with only w**3's second derivative


@triton_ok
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_triton_half_precision(dtype, tol):
    g = s = 8
    P, D = 4, 32
    crow, col, val, dense = _batch(3, g, s, 0.3)
    w, b = _params(D, P, dtype=dtype)
    grad = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    got = _fwd_bwd(patch_embed_csr, crow, col, val, w, b, g, s, P, grad)
    w32, b32 = w.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    want = _fwd_bwd(patch_embed_reference, crow, col, val, w32, b32, g, s, P, grad.float())
    for a, e in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e, atol=tol, rtol=tol)


def test_torch_path_gradcheck_float64():
    g, s, P, D = 6, 6, 3, 5
    crow, col, val, _ = _batch(2, g, s, 0.5)
    w, b = _params(D, P, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda w_, b_: patch_embed_torch(crow, col, val, w_, b_, (g, s), P), (w, b))


def test_bad_inputs_raise():
    crow, col, val, _ = _batch(2, 8, 8, 0.3)
    w, b = _params(16, 4)
    with pytest.raises(MaskscError, match=r"weight must be \[D, P\*P\]"):
        patch_embed_torch(crow, col, val, w[:, :9], b, (8, 8), 4)
    with pytest.raises(MaskscError, match="patch"):
        patch_embed_reference(crow, col, val, w, b, (8, 8), 16)
    for grid, patch in (((8, 8), 4.5), ((8.5, 8), 4), ((8, 8), True)):  # never truncated; True was taken as 1
        with pytest.raises(MaskscError, match=r"whole numbers for the grid and patch sizes; got (patch 4\.5|grid rows "
                                              r"8\.5|patch True)"):
            patch_embed_torch(crow, col, val, w, b, grid, patch)
    with pytest.raises(MaskscError, match=r"needs grid_shape \(rows, columns\); got \(8,\)"):  # was an IndexError
        patch_embed_torch(crow, col, val, w, b, (8,), 4)
    with pytest.raises(MaskscError, match="no gradient"):
        patch_embed_csr(crow, col, val.clone().requires_grad_(), w, b, (8, 8), 4)
    with pytest.raises(MaskscError, match="int64"):
        patch_embed_csr(crow.int(), col.int(), val, w, b, (8, 8), 4)


@triton_ok
def test_ops_routes_triton_backend_to_kernel(monkeypatch):
    g = s = 8
    crow, col, val, _ = _batch(3, g, s, 0.3)
    w, b = _params(16, 4)
    calls = []

    def spy(*args):
        calls.append(1)
        return patch_embed_csr(*args)

    monkeypatch.setattr(pe, "patch_embed_csr", spy)
    monkeypatch.setenv("MASKSC_BACKEND", "triton")
    got = ops.patch_embed(crow, col, val, w, b, (g, s), 4)
    assert calls == [1]
    monkeypatch.setenv("MASKSC_BACKEND", "torch")
    want = ops.patch_embed(crow, col, val, w, b, (g, s), 4)
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


_COMPILE_SM90 = r'''
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from masksc.kernels import patch_embed as PE

n = 0
for wdt, acc in [("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32)]:
    for jit, block in [(PE._fwd_kernel, "BLOCK_PB"), (PE._grad_weight_kernel, "BLOCK_O")]:
        pointers = {"COL": "*i64", "VAL": "*fp32", "BAND_PTR": "*i64", "ROW": "*i64", "WT": "*" + wdt,
                    "BIAS": "*" + wdt, "OUT": "*" + wdt, "GOUT": "*" + wdt, "PART": "*fp32"}
        consts = {"P": 4, "ACC": acc, block: 16, "BLOCK_D": 128, "BLOCK_K": 32}
        sig = {a: "constexpr" if a in consts else pointers.get(a, "i32") for a in jit.arg_names}
        src = ASTSource(jit, sig, constexprs={(jit.arg_names.index(a),): v for a, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        assert k.asm["cubin"], jit.__name__
        n += 1
print("compiled", n)
'''


def test_kernels_compile_for_sm90():
    """The interpreter skips Triton's GPU lowering; compile the kernels to H100 (sm_90) machine
    code here, without a GPU, so type or layout errors surface before a GPU run."""
    assert "compiled 6" in compile_for_sm90(_COMPILE_SM90)
