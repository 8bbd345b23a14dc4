"""Fused Triton attention vs scaled_dot_product_attention (flash and memory-efficient backends) vs eager.

Shapes B x H x L x 64 with L = 65 / 145 / 257 (the sequence lengths mask-sc runs) and 1024,
bfloat16, no mask; forward and forward+backward (gradients for q, k, v). On CUDA times are
``triton.testing.do_bench`` medians and memory is ``torch.cuda.max_memory_allocated`` above the
inputs during forward+backward. On CPU only eager and SDPA's CPU kernels run (medians of a
perf_counter loop, CPU figures); the GPU-only paths are skipped with a message.

  python benchmarks/bench_attention.py            # CUDA: everything; CPU: the torch paths
  python benchmarks/bench_attention.py --smoke    # tiny shapes; Triton via the interpreter on CPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; Triton under the interpreter on CPU")
    ap.add_argument("--lengths", type=int, nargs="+", default=[65, 145, 257, 1024])
    ap.add_argument("--batch", type=int, default=None, help="B (default 64 on CUDA, 4 on CPU)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    ap.add_argument("--name", default=None, help="result file name (default attention / attention_smoke)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None

from _common import device_info, interpret_triton_without_cuda, print_table, write_result  # noqa: E402

interpret_triton_without_cuda(ARGS is not None and ARGS.smoke)

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.attention import flash_attention  # noqa: E402
from kernels.attention_ref import attention_reference  # noqa: E402


def eager(q, k, v):
    """softmax(Q K^T / sqrt(d)) V in the input dtype, as a plain transformer writes it."""
    return torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1) @ v


def _sdpa(backend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def triton_flash(q, k, v):
    return flash_attention(q, k, v)


def paths_for(device: torch.device, interp: bool) -> tuple[dict, list[str]]:
    """The runnable paths on this device and a message for each skipped one."""
    paths = {"eager": eager, "sdpa_default": F.scaled_dot_product_attention}  # default = attention_torch's
    skipped = []
    if device.type == "cuda":
        paths["sdpa_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        paths["sdpa_mem_efficient"] = _sdpa(SDPBackend.EFFICIENT_ATTENTION)
        paths["triton"] = triton_flash
    else:
        paths["sdpa_cpu_flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        paths["sdpa_math"] = _sdpa(SDPBackend.MATH)
        skipped.append("sdpa_flash / sdpa_mem_efficient: CUDA-only SDPA backends, skipped on CPU")
        if interp:
            paths["triton"] = triton_flash
        else:
            skipped.append("triton: needs a CUDA GPU (run --smoke to check it under TRITON_INTERPRET=1)")
    return paths, skipped


def _bench_cuda(fn):
    import triton.testing
    fn()  # compile + autotune outside the timed region
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _bench_cpu(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _peak_mb(fn, device):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dtype = getattr(torch, args.dtype)
    B = args.batch or (64 if device.type == "cuda" else 4)
    H, Dh, lengths, reps = args.heads, args.head_dim, args.lengths, args.reps
    if args.smoke:
        B, H, Dh, lengths, reps = 1, 2, 32, [17, 40], 1
    paths, skipped = paths_for(device, interp)
    for msg in skipped:
        print(msg)
    rows = []
    for L in lengths:
        gen = torch.Generator().manual_seed(L)
        q, k, v = [torch.randn(B, H, L, Dh, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
        grad = torch.randn(B, H, L, Dh, generator=gen).to(device, dtype)
        with torch.no_grad():
            ref = attention_reference(q, k, v).float()
        for name, fn in paths.items():
            try:
                with torch.no_grad():
                    err = (fn(q, k, v).float() - ref).abs().max().item()
            except RuntimeError as exc:  # e.g. SDPA flash refuses float32
                print(f"  L={L} {name}: skipped ({str(exc).splitlines()[0][:120]})")
                continue
            fwd = lambda fn=fn: fn(q, k, v)
            fwd_bwd = lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
            if device.type == "cuda":
                with torch.no_grad():
                    t_f = _bench_cuda(fwd)
                t_fb = _bench_cuda(fwd_bwd)
                mem = _peak_mb(fwd_bwd, device)
            else:
                with torch.no_grad():
                    t_f = _bench_cpu(fwd, reps)
                t_fb = _bench_cpu(fwd_bwd, reps)
                mem = None
            row = {"L": L, "path": name, "fwd_ms": t_f, "fwd_bwd_ms": t_fb, "max_abs_err": err}
            if mem is not None:
                row["peak_MB"] = mem
            if name == "triton" and device.type != "cuda":
                row["note"] = "interpreter: not a speed figure"
            rows.append(row)
            print(f"  L={L} {name}: fwd {t_f:.3g} ms, fwd+bwd {t_fb:.3g} ms, err {err:.2g}", flush=True)
        by = {r["path"]: r for r in rows if r["L"] == L}
        for base in ("sdpa_flash", "eager"):
            if base in by:
                for r in by.values():
                    r[f"fwd_speedup_vs_{base}"] = by[base]["fwd_ms"] / r["fwd_ms"]
                    r[f"fwd_bwd_speedup_vs_{base}"] = by[base]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    cols = ["L", "path", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_sdpa_flash", "fwd_bwd_speedup_vs_sdpa_flash",
            "fwd_speedup_vs_eager", "fwd_bwd_speedup_vs_eager", "peak_MB", "max_abs_err"]
    print_table(rows, [c for c in cols if any(c in r for r in rows)])
    payload = {**device_info(device), "dtype": args.dtype, "B": B, "H": H, "head_dim": Dh, "lengths": lengths,
               "smoke": bool(args.smoke), "triton_interpreter": interp, "cpu_threads": torch.get_num_threads(),
               "skipped": skipped, "timing": "triton.testing.do_bench median" if device.type == "cuda"
               else f"median of {reps} perf_counter runs", "rows": rows}
    path = write_result(args.name or ("attention_smoke" if args.smoke else "attention"), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(ARGS)
