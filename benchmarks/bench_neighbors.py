"""The kNN graph scanpy's tools read: ``masksc.tl.neighbors`` (FAISS) against scanpy's own
``sc.pp.neighbors`` (exact below 4096 cells, pynndescent above) on the same embedding, both
15 neighbours with UMAP weights, both stored in ``obsp``. Embedding: bench_cluster's Gaussian
mixture (d = 64, 10 clusters of unequal size), a pessimistic case for approximate search.

Recall@15 of each graph is measured on 1000 sampled cells against exact neighbours (numpy,
brute force over all cells); time is the whole call, weights and storage included, after a
warm-up call of each on 5000 cells (numba's compilation, FAISS's import).

    python benchmarks/bench_neighbors.py --sizes 10000,100000
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in bench_cluster: both libraries alike

import anndata  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import device_info, print_table, write_result  # noqa: E402
from benchmarks.bench_cluster import mixture  # noqa: E402
from masksc import tl  # noqa: E402

N_NEIGHBORS = 15


def exact_neighbors(X: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices [len(queries), k - 1] of each query's nearest other cells, by brute force."""
    x_sq = (X.astype(np.float64) ** 2).sum(1)
    out = np.empty((len(queries), k - 1), dtype=np.int64)
    for s in range(0, len(queries), 100):
        q = queries[s:s + 100]
        d = x_sq[None, :] - 2.0 * X[q].astype(np.float64) @ X.T.astype(np.float64)
        d[np.arange(len(q)), q] = np.inf
        out[s:s + 100] = np.argsort(d, axis=1)[:, :k - 1]
    return out


def recall(distances, queries: np.ndarray, truth: np.ndarray) -> float:
    """Share of each sampled cell's exact neighbours present in its row of a distances matrix."""
    rows = distances[queries].tolil().rows
    return float(np.mean([len(np.intersect1d(r, t)) / len(t) for r, t in zip(rows, truth)]))


def bench(n: int, rows: list, skip_scanpy: bool) -> None:
    import scanpy as sc
    X, _ = mixture(n, k=10, seed=3)
    queries = np.random.default_rng(0).choice(n, size=min(1000, n), replace=False)
    truth = exact_neighbors(X, queries, N_NEIGHBORS)
    a = anndata.AnnData(obs={"i": np.arange(n)})
    a.obsm["X_masksc"] = X
    t = time.perf_counter()
    tl.neighbors(a, N_NEIGHBORS)
    t_masksc = time.perf_counter() - t
    rows.append({"n": n, "method": "masksc.tl.neighbors (FAISS " + ("flat" if n < 100_000 else "IVF") + ")",
                 "time_s": t_masksc, "recall": recall(a.obsp["masksc_neighbors_distances"], queries, truth)})
    if skip_scanpy:
        return
    t = time.perf_counter()
    sc.pp.neighbors(a, n_neighbors=N_NEIGHBORS, use_rep="X_masksc", random_state=0)
    t_scanpy = time.perf_counter() - t
    rows.append({"n": n, "method": "scanpy pp.neighbors (" + ("exact" if n < 4096 else "pynndescent") + ")",
                 "time_s": t_scanpy, "recall": recall(a.obsp["distances"], queries, truth),
                 "masksc_speedup": t_scanpy / t_masksc})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="cells, comma-separated")
    ap.add_argument("--masksc-only-above", type=int, default=None,
                    help="sizes above this run masksc alone (scanpy's search too slow to wait for)")
    args = ap.parse_args()
    bench(5000, [], False)  # compiles numba (scanpy, pynndescent) and loads FAISS before anything is timed
    rows: list[dict] = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        bench(n, rows, args.masksc_only_above is not None and n > args.masksc_only_above)
        print_table(rows[-2:], ["n", "method", "time_s", "recall", "masksc_speedup"])
    print()
    print_table(rows, ["n", "method", "time_s", "recall", "masksc_speedup"])
    path = write_result("neighbors", {**device_info("cpu"), "d": 64, "n_neighbors": N_NEIGHBORS,
                                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
