"""Random masking (and its inverse, unmask): the C++/CUDA op vs MAE's torch path
(``rand + argsort + gather``; decoder side ``cat + gather`` by ids_restore) vs our vectorised
torch reference (same hash RNG as the op).

Times are medians over ``--reps`` runs of the forward pass and of forward+backward (gradient
to the tokens for masking; to kept and the mask token for unmask). ``speedup_vs_mae`` is the
MAE path's time over this row's time, in the same run and on the same device.

  python benchmarks/bench_masking.py                 # CPU, then CUDA if a GPU is present
  python benchmarks/bench_masking.py --devices cuda  # CUDA only (prints a message without a GPU)
  python benchmarks/bench_masking.py --threads 1     # CPU figures on a shared, oversubscribed machine

On CPU the D = 768 shapes are bound by writing fresh multi-100 MB tensors (page faults
included), which every implementation pays alike; the index work is what differs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import device_info, print_table, write_result  # noqa: E402
from masksc.masking import random_masking_cpp, random_masking_torch, unmask_cpp, unmask_torch  # noqa: E402


def mae_masking(tokens: torch.Tensor, n_keep: int, seed: int):
    """MAE's random_masking (He et al. 2022): noise, argsort, argsort, gather."""
    B, G, D = tokens.shape
    gen = torch.Generator(device=tokens.device).manual_seed(seed)
    noise = torch.rand(B, G, device=tokens.device, generator=gen)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    kept = torch.gather(tokens, 1, ids_keep[:, :, None].expand(-1, -1, D))
    mask = torch.ones(B, G, device=tokens.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, ids_keep, ids_restore, mask


def mae_unmask(kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, n_tokens: int):
    """MAE's decoder unshuffle: append mask tokens, gather by ids_restore."""
    B, U, D = kept.shape
    seq = torch.cat([kept, mask_token.to(kept.dtype).expand(B, n_tokens - U, D)], dim=1)
    return torch.gather(seq, 1, ids_restore[:, :, None].expand(-1, -1, D))


MASKING = {"mae_torch": mae_masking, "torch_ref": random_masking_torch, "cpp": random_masking_cpp}


def timed(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds (CUDA: synchronised around each call)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(device, dtype, B, G, D, ratio, reps):
    """Time every implementation of masking and unmasking on one shape; one row per
    (op, pass, impl) with the median ms and the speed-up over the MAE path."""
    n_keep = round(G * (1 - ratio))
    tokens = torch.randn(B, G, D, device=device, dtype=dtype)
    tokens_g = tokens.clone().requires_grad_()
    token = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
    grad_kept = torch.randn(B, n_keep, D, device=device, dtype=dtype)
    grad_full = torch.randn(B, G, D, device=device, dtype=dtype)
    rows = []
    for impl, fn in MASKING.items():
        kept, ids_keep, ids_restore, _ = fn(tokens, n_keep, 0)
        kept_g = kept.clone().requires_grad_()

        def mask_fwd_bwd():
            tokens_g.grad = None
            fn(tokens_g, n_keep, 0)[0].backward(grad_kept)

        if impl == "mae_torch":
            unmask_fwd = lambda: mae_unmask(kept, token, ids_restore, G)  # noqa: E731
        elif impl == "cpp":
            unmask_fwd = lambda: unmask_cpp(kept, token, ids_keep, G)  # noqa: E731
        else:
            unmask_fwd = lambda: unmask_torch(kept, token, ids_keep, G)  # noqa: E731

        def unmask_fwd_bwd():
            kept_g.grad = token.grad = None
            if impl == "mae_torch":
                out = mae_unmask(kept_g, token, ids_restore, G)
            elif impl == "cpp":
                out = unmask_cpp(kept_g, token, ids_keep, G)
            else:
                out = unmask_torch(kept_g, token, ids_keep, G)
            out.backward(grad_full)

        with torch.no_grad():
            t_mask = timed(lambda: fn(tokens, n_keep, 0), device, reps)
            t_unmask = timed(unmask_fwd, device, reps)
        times = {("random_masking", "fwd"): t_mask, ("random_masking", "fwd+bwd"): timed(mask_fwd_bwd, device, reps),
                 ("unmask", "fwd"): t_unmask, ("unmask", "fwd+bwd"): timed(unmask_fwd_bwd, device, reps)}
        for (op, pass_), ms in times.items():
            rows.append({"op": op, "pass": pass_, "B": B, "G": G, "D": D, "U": n_keep, "impl": impl, "ms": ms})
    for r in rows:  # ratios within this run and device
        base = next(x["ms"] for x in rows if x["op"] == r["op"] and x["pass"] == r["pass"] and x["impl"] == "mae_torch")
        r["speedup_vs_mae"] = base / r["ms"]
    return rows


def main() -> None:
    """Parse the command line, run every device and shape, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, nargs="+", default=[144, 256, 625])
    ap.add_argument("--dims", type=int, nargs="+", default=[1, 128, 768],
                    help="token widths D; D = 1 isolates the index work (selection, ids)")
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7 on CPU, 50 on CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); use 1 on a shared, oversubscribed machine")
    ap.add_argument("--cuda-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--name", default=None,
                    help="results file name without .json (default masking_<device type>); a partial run under "
                         "its own name leaves the committed figures alone")
    args = ap.parse_args()
    if args.name and len(args.devices) > 1:
        ap.error("--name names one results file: pass one device with it")
    if args.threads:
        torch.set_num_threads(args.threads)

    for dev_name in args.devices:
        if dev_name == "cuda" and not torch.cuda.is_available():
            print("CUDA benchmark skipped: no CUDA GPU visible to torch (torch.cuda.is_available() is False).")
            continue
        device = torch.device(dev_name)
        dtype = torch.float32 if device.type == "cpu" else getattr(torch, args.cuda_dtype)
        reps = args.reps or (7 if device.type == "cpu" else 50)
        rows = []
        for G in args.tokens:
            for D in args.dims:
                rows += bench_shape(device, dtype, args.batch, G, D, args.mask_ratio, reps)
        print(f"\n== masking on {device_info(device)['device']}, {dtype}, torch threads {torch.get_num_threads()} ==")
        print_table(rows, ["op", "pass", "B", "G", "D", "U", "impl", "ms", "speedup_vs_mae"])
        path = write_result(args.name or f"masking_{device.type}", {**device_info(device), "dtype": str(dtype), "reps": reps,
                                                       "threads": torch.get_num_threads(),
                                                       "mask_ratio": args.mask_ratio, "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
