"""The compiled op masksc._C (torch.ops.masksc.*): built, registered correctly (opcheck),
equal to the torch reference, differentiable. Fails (never skips) when _C was not built."""
import importlib
import os
import sys

import pytest
import torch

from masksc import masking
from masksc.errors import DataError
from masksc.masking import random_masking_cpp, random_masking_torch, unmask_cpp, unmask_torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def test_extension_is_built():
    module = importlib.import_module("masksc._C")
    assert module.__file__.endswith(".so"), module.__file__
    masking.load_extension()
    for name in ("random_masking", "unmask", "unmask_backward"):
        assert hasattr(torch.ops.masksc, name)


def test_missing_extension_names_the_fix(monkeypatch):
    monkeypatch.setattr(masking, "_registered", False)
    monkeypatch.setitem(sys.modules, "masksc._C", None)  # makes `from masksc import _C` fail
    monkeypatch.delattr(importlib.import_module("masksc"), "_C", raising=False)
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \."):
        masking.load_extension()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,G,D,U", [(4, 144, 16, 36), (3, 256, 8, 64), (2, 625, 4, 156), (5, 10, 3, 9),
                                     (2, 33, 5, 1)])
def test_cpp_ids_equal_torch_reference(device, B, G, D, U):
    tokens = torch.randn(B, G, D, device=device)
    for seed in (0, 1, 12345, -7, 2**63 + 5):
        got = random_masking_cpp(tokens, U, seed)
        want = random_masking_torch(tokens, U, seed)
        for name, x, y in zip(("kept", "ids_keep", "ids_restore", "mask"), got, want):
            assert x.dtype == y.dtype and torch.equal(x, y), (name, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(device, dtype):
    tokens = torch.randn(3, 20, 5, device=device).to(dtype)
    token = torch.randn(5, device=device).to(dtype)
    got, want = random_masking_cpp(tokens, 7, 4), random_masking_torch(tokens, 7, 4)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert torch.equal(unmask_cpp(got[0], token, got[1], 20), unmask_torch(want[0], token, want[1], 20))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,G,U", [(3, 7, 0), (3, 7, 7), (1, 5, 2), (4, 1, 0), (4, 1, 1), (0, 6, 2)])
def test_edge_sizes_match_torch(device, B, G, U):
    tokens = torch.randn(B, G, 3, device=device)
    token = torch.randn(3, device=device)
    got, want = random_masking_cpp(tokens, U, 2), random_masking_torch(tokens, U, 2)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert torch.equal(unmask_cpp(got[0], token, got[1], G), unmask_torch(got[0], token, got[1], G))


def test_non_contiguous_inputs():
    base = torch.randn(6, 4, 12)
    tokens = base.transpose(0, 1)  # [4, 6, 12], non-contiguous
    got, want = random_masking_cpp(tokens, 2, 3), random_masking_torch(tokens.contiguous(), 2, 3)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    kept = torch.randn(12, 2, 4).transpose(0, 2)  # [4, 2, 12]
    ids = want[1]
    token = torch.randn(24)[::2]
    assert torch.equal(unmask_cpp(kept, token, ids, 6), unmask_torch(kept, token, ids, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_unmask_inverse_of_gather(device):
    tokens, token = torch.randn(3, 12, 4, device=device), torch.randn(4, device=device)
    kept, ids_keep, _, mask = random_masking_cpp(tokens, 5, 6)
    full = unmask_cpp(kept, token, ids_keep, 12)
    assert torch.equal(full[~mask], tokens[~mask])
    assert torch.equal(full[mask], token.expand(int(mask.sum()), 4))
    # and the gather of the unmasked sequence gives kept back
    assert torch.equal(random_masking_cpp(full, 5, 6)[0], kept)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_torch_reference(device, dtype):
    tokens = torch.randn(3, 16, 8, device=device).to(dtype)
    token = torch.randn(8, device=device).to(dtype)
    upstream = torch.randn(3, 16, 8, device=device).to(dtype)
    grads = []
    for rm, um in ((random_masking_cpp, unmask_cpp), (random_masking_torch, unmask_torch)):
        t, m = tokens.clone().requires_grad_(), token.clone().requires_grad_()
        kept, ids_keep, _, _ = rm(t, 5, 1)
        (um(kept * 3, m, ids_keep, 16) * upstream).sum().backward()
        grads.append((t.grad, m.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grads[0][1].float(), grads[1][1].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    tokens = torch.randn(2, 7, 3, dtype=torch.float64, device=device, requires_grad=True)
    token = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    ids = random_masking_cpp(tokens.detach(), 3, 0)[1]
    assert torch.autograd.gradcheck(lambda t: random_masking_cpp(t, 3, 0)[0], (tokens,))
    kept = torch.randn(2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, m: unmask_cpp(k, m, ids, 7), (kept, token))
    assert torch.autograd.gradgradcheck(lambda k, m: unmask_cpp(k, m, ids, 7), (kept, token))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    masking.load_extension()
    tokens = torch.randn(3, 10, 4, device=device, requires_grad=True)
    ids = random_masking_cpp(tokens.detach(), 4, 2)[1]
    kept = torch.randn(3, 4, 4, device=device, requires_grad=True)
    token = torch.randn(4, device=device, requires_grad=True)
    grad_out = torch.randn(3, 10, 4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.masksc.random_masking, (tokens, 4, 2))
    torch.library.opcheck(torch.ops.masksc.random_masking, (tokens.detach(), 0, 5))
    torch.library.opcheck(torch.ops.masksc.unmask, (kept, token, ids, 10))
    torch.library.opcheck(torch.ops.masksc.unmask_backward, (grad_out, ids))


def test_torch_compile_fullgraph():
    masking.load_extension()

    def step(tokens, token):
        kept, ids_keep, _, mask = torch.ops.masksc.random_masking(tokens, 3, 4)
        full = torch.ops.masksc.unmask(kept * 2, token, ids_keep, tokens.shape[1])
        return full.sum() + mask.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    tokens, token = torch.randn(2, 8, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    out = compiled(tokens, token)
    out.backward()
    ref_t, ref_m = tokens.detach().clone().requires_grad_(), token.detach().clone().requires_grad_()
    ref = step(ref_t, ref_m)
    ref.backward()
    assert torch.equal(out, ref)
    assert torch.equal(tokens.grad, ref_t.grad) and torch.equal(token.grad, ref_m.grad)


def test_a_compiled_step_may_make_the_first_masking_call_of_the_process():
    """ops loads the extension when imported: a first call inside torch.compile(fullgraph=True)
    used to register the fake kernels there, which Dynamo refuses."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("import torch\n"
              "from masksc import masking, ops\n"
              "def step(tokens):\n"
              "    kept, ids_keep, _, mask = ops.random_masking(tokens, 3, 4)\n"
              "    return ops.unmask(kept * 2, torch.zeros(4), ids_keep, 8).sum() + mask.sum()\n"
              "tokens = torch.randn(2, 8, 4)\n"
              "out = torch.compile(step, backend='eager', fullgraph=True)(tokens)\n"
              "ref = masking.unmask_torch(masking.random_masking_torch(tokens, 3, 4)[0] * 2, torch.zeros(4),\n"
              "                           masking.random_masking_torch(tokens, 3, 4)[1], 8).sum() + 10\n"
              "assert ops.backend_for('random_masking', tokens.device) == 'cpp'\n"
              "assert torch.allclose(out, ref), (out, ref)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.pop("MASKSC_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_op_level_errors_are_clear():
    masking.load_extension()
    ops = torch.ops.masksc
    with pytest.raises(ValueError, match=r"n_keep must be in \[0, G\]"):
        ops.random_masking(torch.randn(2, 5, 3), 6, 0)
    with pytest.raises(ValueError, match="3-D"):
        ops.random_masking(torch.randn(5, 3), 1, 0)
    kept, token = torch.randn(2, 2, 3), torch.randn(3)
    with pytest.raises(IndexError, match="outside"):
        ops.unmask(kept, token, torch.tensor([[0, 9], [1, 2]]), 5)
    with pytest.raises(TypeError, match="dtype"):
        ops.unmask(kept, token.double(), torch.tensor([[0, 1], [1, 2]]), 5)
    with pytest.raises(IndexError, match="outside"):
        ops.unmask_backward(torch.randn(2, 5, 3), torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(DataError, match="n_keep"):
        random_masking_cpp(torch.randn(2, 5, 3), 9, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA kernels of masksc._C)")
@pytest.mark.parametrize("G", [1, 31, 625, 1024, 4096, 5000])
def test_cuda_equals_cpu(G):
    tokens = torch.randn(6, G, 8)
    U = G // 4
    cpu = random_masking_cpp(tokens, U, 99)
    gpu = random_masking_cpp(tokens.cuda(), U, 99)
    for x, y in zip(cpu, gpu):
        assert torch.equal(x, y.cpu())
    token = torch.randn(8)
    assert torch.equal(unmask_cpp(cpu[0], token, cpu[1], G), unmask_cpp(gpu[0], token.cuda(), gpu[1], G).cpu())
