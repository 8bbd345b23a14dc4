"""Patch embedding of a CSR batch: Triton kernel vs dense Conv2d vs torch.sparse.mm vs other torch paths.

Every path takes the same CSR batch (cells on a g x s grid, row-major) and returns tokens
[B, G, D]; the dense paths pay for densifying the batch, as a model fed CSR batches must.
Times are medians (and minima, also kept) over ``--reps`` of forward and forward+backward
(gradients for weight and bias); speedups are ratios of medians, as every benchmark's (files
written before this release computed them from the minima).

Memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` above the inputs during
forward+backward (measured). On CPU no allocator statistics exist, so the column is the analytic
size of each path's main intermediates (excluding the [B, G, D] output every path writes);
it is labelled ``extra_MB_analytic``.

  python benchmarks/bench_patch_embed.py                  # CPU: torch paths; CUDA: all incl. Triton
  python benchmarks/bench_patch_embed.py --smoke          # tiny shapes, all paths; Triton via the
                                                          # interpreter on CPU (not a speed figure)
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
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; runs the Triton path under the interpreter on CPU")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.10])
    ap.add_argument("--grid", type=int, nargs=2, default=[64, 64])
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=None, help="D (default 768 on CUDA, 128 on CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on CUDA, 3 on CPU)")
    ap.add_argument("--paths", nargs="+", default=None, help="subset of paths to run")
    ap.add_argument("--name", default=None, help="result file name (default patch_embed / patch_embed_smoke)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None

from _common import device_info, interpret_triton_without_cuda, print_table, write_result  # noqa: E402

interpret_triton_without_cuda(ARGS is not None and ARGS.smoke)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.patch_embed import patch_embed_csr  # noqa: E402
from kernels.patch_embed_ref import _patch_coords, _row_ids, patch_embed_torch  # noqa: E402


# --- candidate torch paths ------------------------------------------------------------------

def densify(crow, col, val, dtype, n_cols):
    dense = torch.zeros(crow.numel() - 1, n_cols, dtype=dtype, device=val.device)
    return dense.index_put((_row_ids(crow, col.numel()), col), val.to(dtype), accumulate=True)


def conv2d_dense(crow, col, val, w, b, g, s, P):
    """Densify the batch, then Conv2d(kernel=P, stride=P): the baseline."""
    B, D = crow.numel() - 1, w.shape[0]
    x = densify(crow, col, val, w.dtype, g * s).view(B, 1, g, s)
    return F.conv2d(x, w.view(D, 1, P, P), b, stride=P).flatten(2).transpose(1, 2)


def unfold_matmul(crow, col, val, w, b, g, s, P):
    """Densify, cut into patches with view/permute, one matmul."""
    B, D = crow.numel() - 1, w.shape[0]
    x = densify(crow, col, val, w.dtype, g * s).view(B, g // P, P, s // P, P)
    x = x.permute(0, 1, 3, 2, 4).reshape(B * (g // P) * (s // P), P * P)
    return torch.addmm(b, x, w.t()).view(B, -1, D)


def sparse_mm_expanded(crow, col, val, w, b, g, s, P):
    """torch.sparse.mm of the CSR batch [B, g*s] with the weight expanded to [g*s, G*D]
    (the convolution as one sparse x dense product; the expansion is rebuilt each call)."""
    B, D = crow.numel() - 1, w.shape[0]
    G = (g // P) * (s // P)
    pos = torch.arange(g * s, device=val.device)
    p, o, inside = _patch_coords(pos, s, P, g // P, s // P)
    wexp = torch.zeros(g * s, G, D, dtype=w.dtype, device=w.device)
    wexp = wexp.index_put((pos[inside], p[inside]), w.t()[o[inside]])
    x = torch.sparse_csr_tensor(crow, col, val.to(w.dtype), (B, g * s))
    return (torch.sparse.mm(x, wexp.view(g * s, G * D)).view(B, G, D) + b)


def sparse_mm_patch(crow, col, val, w, b, g, s, P):
    """torch.sparse.mm of a COO [B*G, P*P] patch-major matrix with weight^T [P*P, D]."""
    B, D = crow.numel() - 1, w.shape[0]
    G = (g // P) * (s // P)
    p, o, inside = _patch_coords(col, s, P, g // P, s // P)
    rows = _row_ids(crow, col.numel()) * G + p
    idx = torch.stack([rows[inside], o[inside]])
    x = torch.sparse_coo_tensor(idx, val[inside].to(w.dtype), (B * G, P * P))
    return (torch.sparse.mm(x, w.t()) + b).view(B, G, D)


def index_add(crow, col, val, w, b, g, s, P):
    """index_add of val * weight[:, o] rows into the output (an [nnz, D] intermediate)."""
    B, D = crow.numel() - 1, w.shape[0]
    G = (g // P) * (s // P)
    p, o, inside = _patch_coords(col, s, P, g // P, s // P)
    rows = (_row_ids(crow, col.numel()) * G + p)[inside]
    contrib = val[inside].to(w.dtype)[:, None] * w.t()[o[inside]]
    return b.expand(B * G, D).index_add(0, rows, contrib).view(B, G, D)


def production_torch(crow, col, val, w, b, g, s, P):
    return patch_embed_torch(crow, col, val, w, b, (g, s), P)


def triton_csr(crow, col, val, w, b, g, s, P):
    return patch_embed_csr(crow, col, val, w, b, (g, s), P)


def analytic_extra_bytes(name, B, g, s, P, D, nnz, item):
    """Bytes of the main intermediates (beyond the inputs and the [B, G, D] output), forward."""
    G = (g // P) * (s // P)
    idx = 8 * nnz  # int64 index arrays of length nnz (row ids etc.), counted once
    return {
        "conv2d_dense": B * g * s * item + idx,
        "unfold_matmul": 2 * B * g * s * item + idx,
        "sparse_mm_expanded": g * s * G * D * item + idx,
        "sparse_mm_patch": nnz * (item + 16) + 3 * idx,
        "index_add": nnz * D * item + 2 * idx,
        "patch_embed_torch": B * G * P * P * item + 3 * idx,
        "triton_csr": 3 * idx + (B * ((g + P - 1) // P) + 1) * 8,
    }[name]


PATHS = {
    "conv2d_dense": conv2d_dense,
    "unfold_matmul": unfold_matmul,
    "sparse_mm_expanded": sparse_mm_expanded,
    "sparse_mm_patch": sparse_mm_patch,
    "index_add": index_add,
    "patch_embed_torch": production_torch,
    "triton_csr": triton_csr,
}


def make_batch(B, g, s, density, device, seed=0):
    """A random CSR batch (float32 values in (0, 1], each grid position nonzero with ``density``)."""
    gen = torch.Generator().manual_seed(seed)
    crow = [0]
    cols = []
    n = g * s
    k = max(1, round(density * n))
    for _ in range(B):
        c = torch.randperm(n, generator=gen)[:k].sort().values
        cols.append(c)
        crow.append(crow[-1] + k)
    col = torch.cat(cols)
    val = torch.rand(col.numel(), generator=gen) + 1e-3
    return (torch.tensor(crow, dtype=torch.int64).to(device), col.to(device), val.to(device))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, args, device, backward, grad):
    w, b = args[3], args[4]
    w.grad = b.grad = None
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    if backward:
        out.backward(grad)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def time_paths(names, args, device, reps, grad):
    """{name: (fwd median, fwd min, fwd+bwd median, fwd+bwd min)} in ms. The paths take turns
    within each repetition, so load from other processes hits all of them alike; one untimed
    round first warms up (Triton compile / autotune, allocator)."""
    times = {n: ([], []) for n in names}
    for rep in range(reps + 1):
        for n in names:
            t_f = _time_once(PATHS[n], args, device, False, grad)
            t_fb = _time_once(PATHS[n], args, device, True, grad)
            if rep:
                times[n][0].append(t_f)
                times[n][1].append(t_fb)
    return {n: (statistics.median(f), min(f), statistics.median(fb), min(fb)) for n, (f, fb) in times.items()}


def peak_cuda_mb(fn, args, device):
    w, b = args[3], args[4]
    w.grad = b.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(*args)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def main(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    g, s = args.grid
    P = args.patch
    D = args.dim or (768 if device.type == "cuda" else 128)
    reps = args.reps or (20 if device.type == "cuda" else 3)
    sizes = args.batch_sizes
    densities = args.densities
    if args.smoke:
        g, s, P, D, reps, sizes, densities = 16, 16, 4, 32, 1, [4], [0.1]
    names = args.paths or list(PATHS)
    if device.type != "cuda" and not interp and "triton_csr" in names:
        print("triton_csr: skipped (needs a CUDA GPU; on CPU run --smoke to check it under TRITON_INTERPRET=1)")
        names = [n for n in names if n != "triton_csr"]
    torch.manual_seed(0)
    rows = []
    for B in sizes:
        for dens in densities:
            crow, col, val = make_batch(B, g, s, dens, device)
            w = (torch.randn(D, P * P, device=device) / P).requires_grad_()
            b = torch.randn(D, device=device).requires_grad_()
            args_ = (crow, col, val, w, b, g, s, P)
            with torch.no_grad():
                ref = conv2d_dense(*args_)
            grad = torch.ones_like(ref)
            errs = {}
            for name in names:
                with torch.no_grad():
                    errs[name] = (PATHS[name](*args_).float() - ref.float()).abs().max().item()
            timed = time_paths(names, args_, device, reps, grad)
            base = timed.get("conv2d_dense")
            for name in names:
                t_f, min_f, t_fb, min_fb = timed[name]
                row = {"B": B, "density": dens, "path": name, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                       "fwd_min_ms": min_f, "fwd_bwd_min_ms": min_fb, "max_abs_err": errs[name]}
                if base:
                    row["speedup_fwd_vs_conv"] = base[0] / t_f
                    row["speedup_fwd_bwd_vs_conv"] = base[2] / t_fb
                if device.type == "cuda":
                    row["peak_MB"] = peak_cuda_mb(PATHS[name], args_, device)
                else:
                    row["extra_MB_analytic"] = analytic_extra_bytes(name, B, g, s, P, D, col.numel(), 4) / 2**20
                if name == "triton_csr" and device.type != "cuda":
                    row["note"] = "interpreter: not a speed figure"
                rows.append(row)
                print(f"  B={B} density={dens} {name}: fwd {t_f:.3g} ms, fwd+bwd {t_fb:.3g} ms, "
                      f"err {errs[name]:.2g}", flush=True)
            del crow, col, val, ref, grad
    mem_col = "peak_MB" if device.type == "cuda" else "extra_MB_analytic"
    cols = ["B", "density", "path", "fwd_ms", "fwd_bwd_ms", "fwd_min_ms", "fwd_bwd_min_ms", "speedup_fwd_vs_conv",
            "speedup_fwd_bwd_vs_conv", mem_col, "max_abs_err"]
    print_table(rows, cols)
    payload = {**device_info(device), "dtype": "float32", "grid": [g, s], "patch": P, "D": D, "reps": reps,
               "cpu_threads": torch.get_num_threads(), "smoke": bool(args.smoke), "triton_interpreter": interp,
               "memory_note": ("peak torch.cuda.max_memory_allocated above inputs, fwd+bwd" if device.type == "cuda"
                               else "analytic bytes of main forward intermediates, output excluded (not measured)"),
               "rows": rows}
    path = write_result(args.name or ("patch_embed_smoke" if args.smoke else "patch_embed"), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(ARGS)
