"""Shared helpers for benchmark scripts: device description, result JSON, printed table."""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

COMMITTED_RESULTS = Path(__file__).resolve().parent / "results"
# where every script writes: the committed figures the README quotes, or, for a trial run that
# must leave those alone, the folder MASKSC_BENCH_RESULTS names
RESULTS = Path(os.environ.get("MASKSC_BENCH_RESULTS") or COMMITTED_RESULTS).resolve()
_existing = next(p for p in (RESULTS, *RESULTS.parents) if p.exists())
if not _existing.is_dir():  # found before the benchmark runs, not when its results are written
    raise SystemExit(f"MASKSC_BENCH_RESULTS={os.environ['MASKSC_BENCH_RESULTS']}: {_existing} is a file; fix: name a "
                     "folder (it is created if missing).")


def positive_int(text: str) -> int:
    """argparse type of a whole number >= 1 (cells, a batch, a step count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def positive_ints(text: str) -> list[int]:
    """argparse type of a comma-separated list of whole numbers >= 1, e.g. ``1000,10000``."""
    values = [positive_int(s) for s in text.split(",") if s.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1 separated by commas, got {text!r}")
    return values


def seed_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of seeds (whole numbers >= 0)."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds separated by commas, e.g. 0,1,2; got {text!r}")
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected seeds >= 0 separated by commas; got {text!r}")
    return values


def device_info(device: str | torch.device | None = None) -> dict:
    """Describe the machine a benchmark ran on (GPU name where CUDA is used, else CPU)."""
    import torch
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version()}
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


def interpret_triton_without_cuda(smoke: bool) -> None:
    """For a ``--smoke`` run on a machine without CUDA, run Triton kernels under its interpreter.
    Call it before triton is first imported: the interpreter is chosen at import."""
    import torch
    if smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def use_threads(n: int) -> None:
    """Run torch on ``n`` CPU threads for the rest of the process. numba (scanpy's parallel
    loops) shares torch's OpenMP runtime and resets its thread count to numba's own, every
    core, whenever it starts a parallel loop (after the log-PCA baseline's scanpy calls torch
    reported 2 threads where 1 was set), so numba is held to ``n`` too."""
    import numba
    import torch
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def ready_for_data(data: Path, threads: int) -> bool:
    """Whether the benchmark datasets are at ``data`` (printing why not when they are absent).
    When they are, torch runs on ``threads`` threads and the warning that a dataset has fewer
    genes than grid positions (they are padded) is silenced."""
    if not data.is_dir():
        print(f"skipping: {data} is absent (the benchmark datasets live beside the project)")
        return False
    use_threads(threads)
    warnings.simplefilter("ignore", UserWarning)
    return True


def teacher_embedding(teacher, X_grid) -> np.ndarray:
    """The frozen teacher's own feature of every cell: X_grid [n, g*s] scipy sparse rows on the
    model's grid -> [n, out_dim] float32 numpy (eval mode, no gradients)."""
    import torch
    with torch.no_grad():
        return teacher(torch.from_numpy(X_grid.toarray()).float()).numpy()


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` (plus a timestamp) to benchmarks/results/<name>.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], cols: list[str] | None = None) -> None:
    """Print ``rows`` as an aligned text table over ``cols`` (default: keys of the first row)."""
    if not rows:
        print("(no rows)")
        return
    cols = cols or list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))
