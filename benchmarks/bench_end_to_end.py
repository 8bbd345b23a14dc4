"""End to end: mask-sc training step and embedding throughput, kernels on vs pure torch.

"kernels on" is ``MASKSC_BACKEND=auto`` (the defaults in ``masksc.ops.AUTO_DEFAULTS``: the
C++ masking op on the CPU; on a GPU whatever the kernel benchmarks made the default) and,
on a GPU, also ``MASKSC_BACKEND=triton`` (every Triton kernel forced on). "pure torch" is
``MASKSC_BACKEND=torch``. Synthetic cells at realistic sparsity, the preset's grid and model.

    python benchmarks/bench_end_to_end.py --preset cpu --batch 256 --steps 10
    python benchmarks/bench_end_to_end.py --preset paper --batch 256      # on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import device_info, positive_int, print_table, write_result  # noqa: E402
from masksc.data import CSRBatch, GridLayout, Preprocessor, synthetic  # noqa: E402
from masksc.models import ContrastiveConfig, ContrastiveSC, MaskSC  # noqa: E402
from masksc.models.presets import PRESETS, get_preset  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


FIT_CELLS = 512  # the HVG trend fit fails on a few dozen cells, so a small batch's genes are chosen on more


def _grid_batch(cfg, n_cells: int, seed: int) -> CSRBatch:
    adata = synthetic(max(n_cells, FIT_CELLS), n_genes=cfg.n_genes, n_types=8, seed=seed)
    pre = Preprocessor(n_top_genes=cfg.n_genes).fit(adata)
    X = pre.transform(adata[:n_cells]).X
    grid = GridLayout.fit(X, pre.genes_, shape=cfg.grid_shape, patch=cfg.patch)
    return CSRBatch.from_csr(grid.to_grid(X))


def _time(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up (compilation, autotuning, allocator)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(preset: str, batch_size: int, steps: int, device: torch.device, backends: list[str]) -> list[dict]:
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = MaskSC(cfg)
    if cfg.med:
        model.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=cfg.n_genes)))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = _grid_batch(cfg, batch_size, seed=0).to(device)
    amp = device.type == "cuda"
    rows = []
    for backend in backends:
        os.environ["MASKSC_BACKEND"] = backend

        def train_step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model.training_loss(batch, seed=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        @torch.no_grad()
        def embed_step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model.embed(batch)

        model.train()
        t_train = _time(train_step, steps, device)
        model.eval()
        t_embed = _time(embed_step, steps, device)
        rows.append({"backend": backend, "train_step_ms": 1e3 * t_train, "train_cells_s": batch_size / t_train,
                     "embed_ms": 1e3 * t_embed, "embed_cells_s": batch_size / t_embed})
    base = next(r for r in rows if r["backend"] == "torch")
    for r in rows:
        r["train_speedup"] = base["train_step_ms"] / r["train_step_ms"]
        r["embed_speedup"] = base["embed_ms"] / r["embed_ms"]
    os.environ.pop("MASKSC_BACKEND", None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: paper on a GPU, cpu otherwise")
    ap.add_argument("--batch", type=positive_int, default=256)
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("paper" if device.type == "cuda" else "cpu")
    backends = ["torch", "auto"] + (["triton"] if device.type == "cuda" else [])
    rows = run(preset, args.batch, args.steps, device, backends)
    print(f"mask-sc end to end, preset {preset}, batch {args.batch}, {device_info(device)['device']}")
    print_table(rows, ["backend", "train_step_ms", "train_cells_s", "train_speedup", "embed_ms", "embed_cells_s",
                       "embed_speedup"])
    name = f"end_to_end_{'gpu' if device.type == 'cuda' else 'cpu'}"
    write_result(name, {**device_info(device), "preset": preset, "batch": args.batch, "steps": args.steps,
                        "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
                        "timing": "median step time after one warm-up", "rows": rows,
                        "note": "on CPU 'auto' differs from 'torch' only in the C++ masking op"})


if __name__ == "__main__":
    main()
