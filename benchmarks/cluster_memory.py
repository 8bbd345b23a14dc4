"""Peak memory of Leiden clustering at scale, as a user runs it: ``masksc cluster EMB.h5ad -o OUT.h5ad``
(read the embedding, search the kNN graph, store it as scanpy does with its distances matrix,
Leiden, write the result) against the bare ``knn_graph`` + ``leiden`` of ``benchmarks/scale.py``,
each in a fresh process so ``peak_rss_mb`` (ru_maxrss of the child) is its own.

The embedding is synthetic, written once to ``--workdir``: ``--n`` cells x 128 float32 (a
``cpu``-preset embedding's width), 10 types of unequal size, each a Gaussian in its own random
8-dimensional subspace plus small isotropic noise. Like a trained embedding (and unlike
bench_cluster's isotropic 64-D mixture, the hard case for an IVF index) its neighbourhoods are
low-dimensional, so the kNN search's default recall target is reached at a small ``nprobe``.
Memory depends on the cell count, the width and the neighbours, not on the values.

    python benchmarks/cluster_memory.py --n 1000000

Prints a table and writes benchmarks/results/cluster_memory.json (with the device).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, TYPES, SUBSPACE = 128, 10, 8


def write_embedding(path: Path, n: int, seed: int = 0) -> None:
    """An .h5ad with only obs (``label``) and obsm["X_masksc"] float32 [n, DIM], as `masksc embed` writes."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from masksc.io_utils import atomic_write
    rng = np.random.default_rng(seed)
    y = rng.choice(TYPES, size=n, p=rng.dirichlet(np.full(TYPES, 5.0)))
    Z = np.empty((n, DIM), np.float32)
    for t in range(TYPES):
        rows = np.flatnonzero(y == t)
        basis = np.linalg.qr(rng.standard_normal((DIM, SUBSPACE)))[0].T.astype(np.float32)  # [8, DIM]
        centre = rng.normal(scale=3.0, size=DIM).astype(np.float32)
        Z[rows] = rng.standard_normal((rows.size, SUBSPACE), dtype=np.float32) @ basis + centre
    Z += 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
    obs = pd.DataFrame({"label": pd.Categorical(y.astype(str))}, index=[f"c{i}" for i in range(n)])
    with atomic_write(path, suffix=".h5ad") as tmp:
        ad.AnnData(obs=obs, obsm={"X_masksc": Z}).write_h5ad(tmp)


def _stage(name: str, emb: Path, out: Path) -> dict:
    """Run one way of clustering in this (fresh) process; returns its figures."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score as ari
    t = time.perf_counter()
    if name == "masksc cluster":
        from masksc.cli import main
        assert main(["cluster", str(emb), "-o", str(out), "--overwrite"]) == 0  # a rerun replaces its output
        import anndata as ad
        result = ad.read_h5ad(out, backed="r")
        truth, labels = result.obs["label"].to_numpy(), result.obs["masksc_cluster"].to_numpy()
        seconds = time.perf_counter() - t
    else:
        import anndata as ad

        from masksc.cluster import knn_graph, leiden
        cells = ad.read_h5ad(emb)
        graph = knn_graph(cells.obsm["X_masksc"], n_neighbors=15, seed=0)
        labels = leiden(graph, resolution=1.0, seed=0)
        truth = cells.obs["label"].to_numpy()
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_clusters": int(len(np.unique(labels))), "ari_truth": float(ari(truth, labels))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="cells (default 1M)")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "masksc-scale",
                    help="where the synthetic embedding and the clustered output go (outside the repo)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = ap.parse_args()
    emb = args.workdir / f"embedding_{args.n}x{DIM}.h5ad"
    out = args.workdir / f"clustered_{args.n}x{DIM}.h5ad"
    if args.stage:
        print(json.dumps(_stage(args.stage, emb, out)))
        return
    from benchmarks._common import device_info, print_table, write_result
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not emb.exists():
        t = time.perf_counter()
        write_embedding(emb, args.n)
        print(f"wrote {emb} in {time.perf_counter() - t:.1f}s")
    rows = []
    for stage in ("knn_graph + leiden", "masksc cluster"):
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--workdir", str(args.workdir),
                               "--stage", stage], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"stage {stage!r} failed:\n{proc.stderr[-3000:]}")
        rows.append({"n_cells": args.n, "stage": stage, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print_table(rows[-1:])
    out.unlink(missing_ok=True)
    print()
    print_table(rows)
    path = write_result("cluster_memory", {**device_info("cpu"), "dim": DIM, "types": TYPES, "subspace": SUBSPACE,
                                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
