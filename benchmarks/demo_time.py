"""Time ``./scripts/demo``, the README's main command, against its goal (under 5 minutes).

Runs the command ``--runs`` times, each into a fresh output folder, and records per run: the
wall time of the whole command (environment check included), the demo's own time (its
"demo finished in" log line), from its ``metrics.json`` its time from loading the data to
the scores (``steps_s``), its training loop's time (``train_s``) and its scores. Writes
``benchmarks/results/demo_time.json`` naming the device and the commit, and prints a table.
Run it from a fresh clone to time what a new user meets.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_info, print_table, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def time_once(out: Path) -> dict:
    """Run ``./scripts/demo -o out`` and return its row; exits with the demo's error when it fails."""
    t0 = time.perf_counter()
    run = subprocess.run([str(ROOT / "scripts" / "demo"), "-o", str(out)], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode:
        sys.exit(f"./scripts/demo failed (exit status {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
    inside = re.search(r"demo finished in ([0-9.]+)s", run.stderr)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": round(wall, 1), "demo_s": float(inside.group(1)) if inside else None,
            "steps_s": metrics["wall_s"], "train_s": metrics["train_s"], "epochs": metrics["epochs"],
            **{f"masksc_{k}": v for k, v in metrics["masksc"].items()},
            **{f"pca_{k}": v for k, v in metrics["pca_kmeans"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="runs of the demo, each into a fresh folder (default 2)")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="masksc-demo-time-") as tmp:
        for i in range(args.runs):
            rows.append({"run": i + 1, **time_once(Path(tmp) / f"run{i + 1}")})
            print(f"run {i + 1}: {rows[-1]['wall_s']} s wall", flush=True)
    print_table(rows)
    path = write_result("demo_time", {**device_info(), "commit": commit, "goal_s": 300, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
