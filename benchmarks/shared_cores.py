"""Training and embedding throughput on CPU cores that other processes keep busy, under
libgomp's default wait policy (threads spin before they sleep), ``OMP_WAIT_POLICY=PASSIVE``
(they sleep at once) and ``OMP_NUM_THREADS=1``, against the same on idle cores.

PyTorch's CPU wheels run their intra-op threads on GNU OpenMP. When another process holds a core,
a thread spinning at a barrier takes CPU time from the thread it waits for; small steps (the
``demo`` preset, the teacher) then slow down many times over. Each measurement runs in a fresh
interpreter, since the policy is read when OpenMP starts; "busy" starts one pure-Python spinning
process per core for its duration.

  python benchmarks/shared_cores.py                  # demo and cpu presets, ~2 minutes
  python benchmarks/shared_cores.py --presets demo --seconds 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import device_info, print_table, write_result  # noqa: E402

# One measurement, in a child interpreter: steps per second of training (forward, backward, AdamW)
# and of embedding, each for `seconds`, on a random 8%-dense grid with an untrained teacher.
MEASURE = """
import json, sys, time
import numpy as np, scipy.sparse as sp, torch
from masksc.data import CellBatches
from masksc.models import ContrastiveConfig, ContrastiveSC, MaskSC
from masksc.models.presets import get_preset
preset, seconds = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
cfg = get_preset(preset)
net = MaskSC(cfg)
net.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=cfg.n_genes, layers=(200, 40, cfg.target_dim),
                                                standardize=True)))
X = sp.random(8 * cfg.batch_size, cfg.n_genes, density=0.08, format="csr", dtype=np.float32, random_state=0)
batches = list(CellBatches(X, batch_size=cfg.batch_size, shuffle=False))
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

def rate(step):
    step(0)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step(n)
        n += 1
    return n / (time.perf_counter() - t0)

def train(i):
    opt.zero_grad()
    net(batches[i % len(batches)], seed=i).backward()
    opt.step()

def embed(i):
    with torch.no_grad():
        net.embed(batches[i % len(batches)])

print(json.dumps({"threads": torch.get_num_threads(), "train_steps_s": rate(train), "embed_batches_s": rate(embed),
                  "batch": cfg.batch_size}))
"""


# the cores this process may use, which the spinners fill (no affinity call on macOS / Windows)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
# a busy core's load: spins until killed, or until its parent (whose pid it is given) is gone: a
# SIGTERM to the benchmark skips the cleanup below and would leave it spinning
SPIN = "import os, sys\nwhile os.getppid() == int(sys.argv[1]):\n    sum(range(100_000))"
SETTINGS = {"(default)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}


def measure(preset: str, seconds: float, setting: dict, busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(setting)
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())]) for _ in range(CORES if busy else 0)]
    try:
        run = subprocess.run([sys.executable, "-c", MEASURE, preset, str(seconds)], env=env, capture_output=True,
                             text=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    if run.returncode:
        raise SystemExit(f"measuring {preset} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["demo", "cpu"])
    ap.add_argument("--seconds", type=float, default=6.0, help="time each rate is measured over")
    args = ap.parse_args()
    from masksc.models.presets import PRESETS
    unknown = sorted(set(args.presets) - set(PRESETS))
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    rows = []
    for preset in args.presets:
        for busy in (False, True):
            for name, setting in SETTINGS.items():
                r = measure(preset, args.seconds, setting, busy)
                rows.append({"preset": preset, "cores": f"busy ({CORES} spinners)" if busy else "idle",
                             "environment": name, **r})
                print("  ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in rows[-1].values()))
    print()
    print_table(rows)
    path = write_result("shared_cores", {**device_info("cpu"), "seconds": args.seconds, "rows": rows,
                                          "note": "steps per second; each row a fresh interpreter with the "
                                                  "default torch thread count"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
