"""masksc.ops.backend_for: the per-op, per-device defaults under MASKSC_BACKEND=auto, what each
forced backend resolves to, and that the dispatching functions call the backend it names."""
import re

import pytest
import torch

from masksc import masking, ops

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
MASKING_OPS = ("random_masking", "unmask", "unmask_narrow")
KERNEL_OPS = ("attention", "attention_unmasked", "patch_embed")


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.delenv("MASKSC_BACKEND", raising=False)
    return monkeypatch


def test_auto_follows_the_table_and_runs_masking_in_cpp(auto):
    masking.load_extension()  # masksc._C is built (test_extension.py fails otherwise)
    assert set(ops.AUTO_DEFAULTS) == set(MASKING_OPS + KERNEL_OPS)
    cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("masksc::random_masking", "CUDA")
    for op in MASKING_OPS:
        assert ops.backend_for(op, CPU) == "cpp"
    for op in ("random_masking", "unmask"):
        # the CUDA kernels of masksc._C where they were built (nvcc), else the torch reference
        assert ops.backend_for(op, CUDA) == ("cpp" if cuda_kernels else "torch")
    assert ops.backend_for("unmask_narrow", CUDA) == "torch"  # measured slower below D = 128 on a GPU
    for op in KERNEL_OPS:
        assert ops.backend_for(op, CPU) == "torch"
    assert ops.backend_for("attention", CUDA) == "triton"
    assert ops.backend_for("attention_unmasked", CUDA) == "torch"  # SDPA's flash kernel is faster without a mask
    assert ops.backend_for("patch_embed", CUDA) == "torch"
    auto.setenv("MASKSC_BACKEND", "Auto")  # case does not matter
    assert ops.backend_for("random_masking", CPU) == "cpp"


def test_auto_falls_back_to_torch_without_the_extension(auto):
    auto.setattr(ops, "_cpp_available", lambda device: False)
    for op in MASKING_OPS:
        assert ops.backend_for(op, CPU) == ops.backend_for(op, CUDA) == "torch"
    assert ops.backend_for("attention", CUDA) == "triton"  # needs no extension


def test_dispatch_calls_the_op_backend_for_names(auto):
    calls = []
    for name in ("random_masking_cpp", "random_masking_torch", "unmask_cpp", "unmask_torch"):
        auto.setattr(masking, name, lambda *a, _name=name: calls.append(_name))
    tokens, kept = torch.zeros(2, 16, 4), torch.zeros(2, 4, 4)
    ids_keep = torch.arange(4).repeat(2, 1)
    ops.random_masking(tokens, 4, 0)
    ops.unmask(kept, torch.zeros(4), ids_keep, 16)
    auto.setenv("MASKSC_BACKEND", "torch")
    ops.random_masking(tokens, 4, 0)
    ops.unmask(kept, torch.zeros(4), ids_keep, 16)
    assert calls == ["random_masking_cpp", "unmask_cpp", "random_masking_torch", "unmask_torch"]


@pytest.mark.parametrize("name", ["cuda", "c++", "flash"])
def test_unknown_backend_is_refused(auto, name):
    auto.setenv("MASKSC_BACKEND", name)
    for op in MASKING_OPS + KERNEL_OPS:
        with pytest.raises(ValueError, match=re.escape(f"MASKSC_BACKEND='{name}' is not one of {ops.BACKENDS}")):
            ops.backend_for(op, CPU)


def test_empty_backend_is_auto(auto):
    auto.setenv("MASKSC_BACKEND", "")
    assert [ops.backend_for(op, CPU) for op in MASKING_OPS + KERNEL_OPS] == \
        [ops.AUTO_DEFAULTS[op]["cpu"] for op in MASKING_OPS + KERNEL_OPS]


def test_forced_torch_and_cpp(auto):
    auto.setenv("MASKSC_BACKEND", "torch")
    for op in MASKING_OPS + KERNEL_OPS:
        assert ops.backend_for(op, CPU) == ops.backend_for(op, CUDA) == "torch"
    auto.setenv("MASKSC_BACKEND", "CPP")
    for op in MASKING_OPS:
        assert ops.backend_for(op, CPU) == ops.backend_for(op, CUDA) == "cpp"
    for op in KERNEL_OPS:  # no C++ attention / patch embedding: torch
        assert ops.backend_for(op, CPU) == ops.backend_for(op, CUDA) == "torch"


def test_forced_triton(auto):
    auto.setenv("MASKSC_BACKEND", "triton")
    for device, interpret in ((CUDA, None), (CPU, "1"), (CUDA, "1")):
        if interpret is None:
            auto.delenv("TRITON_INTERPRET", raising=False)
        else:
            auto.setenv("TRITON_INTERPRET", interpret)
        for op in KERNEL_OPS:
            assert ops.backend_for(op, device) == "triton", (op, device, interpret)
        for op in MASKING_OPS:  # no Triton masking kernel: the C++ op where it has kernels for the device
            assert ops.backend_for(op, device) == ("cpp" if ops._cpp_available(device) else "torch"), (op, device)
    for interpret in (None, "0"):  # on the CPU without the interpreter Triton cannot run: torch
        if interpret is None:
            auto.delenv("TRITON_INTERPRET", raising=False)
        else:
            auto.setenv("TRITON_INTERPRET", interpret)
        for op in KERNEL_OPS:
            assert ops.backend_for(op, CPU) == "torch", (op, interpret)
        for op in MASKING_OPS:  # the C++ op stands in for Triton there too
            assert ops.backend_for(op, CPU) == "cpp", (op, interpret)


def test_each_call_asks_for_the_key_of_its_case(auto):
    """attention with and without a key-padding mask, and unmask below and from D = 128, are
    separate rows of AUTO_DEFAULTS; a 0-d kept reaches the checks' DataError, not an IndexError."""
    from masksc.errors import DataError
    asked = []
    real = ops.backend_for
    auto.setattr(ops, "backend_for", lambda op, device: asked.append(op) or real(op, device))
    q = torch.zeros(1, 1, 3, 8)
    ops.attention(q, q, q)
    ops.attention(q, q, q, torch.zeros(1, 3, dtype=torch.bool))
    ids_keep = torch.arange(2)[None]
    for width in (8, 128):
        ops.unmask(torch.zeros(1, 2, width), torch.zeros(width), ids_keep, 4)
    assert asked == ["attention_unmasked", "attention", "unmask_narrow", "unmask"]
    with pytest.raises(DataError, match="kept must be 3-D"):
        ops.unmask(torch.tensor(1.0), torch.zeros(1), ids_keep, 4)


def test_forced_triton_resolves_meta_tensors(auto):
    """The stand-in C++ op's availability was asked of a dispatch key 'META', which does not exist."""
    auto.setenv("MASKSC_BACKEND", "triton")
    meta = torch.device("meta")
    for op in MASKING_OPS:
        assert ops.backend_for(op, meta) == "cpp"  # the op's fake kernels serve meta tensors
    kept, ids, _, mask = ops.random_masking(torch.zeros(2, 8, 4, device="meta"), 3, 0)
    assert kept.shape == (2, 3, 4) and mask.shape == (2, 8)
    auto.setenv("TRITON_INTERPRET", "1")  # the interpreter runs Triton on CPU tensors only: meta ones take torch
    for op in KERNEL_OPS:
        assert ops.backend_for(op, meta) == "torch", op
    q = torch.zeros(1, 2, 5, 8, device="meta")
    assert ops.attention(q, q, q, torch.zeros(1, 5, dtype=torch.bool, device="meta")).shape == (1, 2, 5, 8)


def test_without_triton_or_the_extension_every_op_runs_in_torch(auto):
    """Where Triton is not installed (it is Linux-only), attention and patch embedding ran into its
    import even on their torch path, and MASKSC_BACKEND=triton's stand-in C++ op was used
    without being built."""
    import builtins
    import sys
    auto.setattr(ops, "_cpp_available", lambda device: False)
    ops._triton_available.cache_clear()
    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "masksc.kernels"))]:
        auto.delitem(sys.modules, name)
    auto.setattr(builtins, "__import__", no_triton)
    auto.setattr("importlib.import_module", lambda name, *a: no_triton(name))
    try:
        for forced in ("auto", "triton"):
            auto.setenv("MASKSC_BACKEND", forced)
            for op in MASKING_OPS + KERNEL_OPS:
                assert ops.backend_for(op, CUDA) == ops.backend_for(op, CPU) == "torch", (forced, op)
        q = torch.randn(2, 2, 5, 8)
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[0, 3:] = True
        out = ops.attention(q, q, q, pad)
        csr = (torch.tensor([0, 1, 3]), torch.tensor([0, 5, 15]), torch.tensor([1.0, 2.0, 3.0]))
        weight, bias = torch.randn(6, 4), torch.randn(6)
        tokens = ops.patch_embed(*csr, weight, bias, (4, 4), 2)
        from masksc.kernels.patch_embed_ref import patch_embed_reference  # imports without Triton
        expected = patch_embed_reference(*csr, weight, bias, (4, 4), 2)
    finally:
        ops._triton_available.cache_clear()
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        q, q, q, attn_mask=~pad[:, None, None, :]))
    torch.testing.assert_close(tokens, expected)


def test_attention_shapes_the_kernel_does_not_take_go_to_torch(auto):
    from masksc.kernels import attention as kernels
    from masksc.kernels import attention_ref
    calls = []
    auto.setattr(kernels, "flash_attention", lambda *a: calls.append("triton"))
    auto.setattr(attention_ref, "attention_torch", lambda *a: calls.append("torch"))
    auto.setenv("MASKSC_BACKEND", "triton")
    auto.setenv("TRITON_INTERPRET", "1")
    for dh, dtype in ((64, torch.float32), (129, torch.float32), (64, torch.float64), (0, torch.float32)):
        q = torch.zeros(1, 1, 3, dh, dtype=dtype)
        ops.attention(q, q, q)
    assert calls == ["triton", "torch", "triton", "torch"]  # float64 runs under the interpreter (gradcheck)
    auto.delenv("TRITON_INTERPRET")  # outside the interpreter only CUDA tensors are taken (float64 on a GPU
    q = torch.zeros(1, 1, 3, 64, device="meta")  # is refused too: test_attention, on a GPU)
    assert "runs on CUDA tensors" in kernels.kernel_refusal(q)
