"""The kNN graph scanpy's tools read: ``masksc.tl.neighbors`` (FAISS) against scanpy's own
``sc.pp.neighbors`` (exact below 8192 cells, pynndescent above) on the same embedding, both
15 neighbours with UMAP weights, both stored in ``obsp``, and against pynndescent's search
alone with scanpy's settings (scanpy 1.11.5 itself fails above 8192 cells beside scipy 1.17:
``'csr_array' object has no attribute 'getnnz'``; its error is recorded). Embedding: bench_cluster's Gaussian
mixture (d = 64, 10 clusters of unequal size), a pessimistic case for approximate search.

Recall@15 of each graph is measured on 1000 sampled cells against exact neighbours (numpy,
brute force over all cells). Above 100k cells FAISS's IVF index is also run tuned to the recall
pynndescent reached, to compare speed at equal quality. Time: masksc's whole call, weights and storage included;
pynndescent's search alone (scanpy would add its weights and storage); each after a warm-up call on 5000 cells
(numba's compilation, FAISS's import).

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
import scipy.sparse as sp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import device_info, positive_ints, print_table, write_result  # noqa: E402
from benchmarks.bench_cluster import mixture  # noqa: E402
from masksc import tl  # noqa: E402

N_NEIGHBORS = 15
COLUMNS = ["n", "method", "time_s", "recall", "masksc_speedup", "error"]


def exact_neighbors(X: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices [len(queries), k - 1] of each query's nearest other cells, by brute force."""
    x_sq = (X.astype(np.float64) ** 2).sum(1)
    out = np.empty((len(queries), k - 1), dtype=np.int64)
    for s in range(0, len(queries), 100):
        q = queries[s:s + 100]
        d = x_sq[None, :] - 2.0 * X[q].astype(np.float64) @ X.T.astype(np.float64)
        d[np.arange(len(q)), q] = np.inf
        part = np.argpartition(d, k - 1, axis=1)[:, :k - 1]
        out[s:s + 100] = part
    return out


def recall(distances, queries: np.ndarray, truth: np.ndarray) -> float:
    """Share of each sampled cell's exact neighbours among the nearest ``len(truth[0])`` other cells
    of its row of a kNN distances matrix (a row may list the cell itself, as pynndescent's does)."""
    distances = sp.csr_matrix(distances)
    found = []
    for q, t in zip(queries, truth):
        a, b = distances.indptr[q], distances.indptr[q + 1]
        cols, vals = distances.indices[a:b], distances.data[a:b]
        nearest = cols[cols != q][np.argsort(vals[cols != q], kind="stable")][:len(t)]
        found.append(len(np.intersect1d(nearest, t)) / len(t))
    return float(np.mean(found))


def pynndescent_as_scanpy(X: np.ndarray):
    """The search scanpy's pp.neighbors runs above 8192 cells, called as scanpy 1.11 calls it:
    ``PyNNDescentTransformer`` with UMAP's n_trees / n_iters for this many cells (on every core
    here, where scanpy's default is one job). Returns its sparse kNN distances."""
    from pynndescent import PyNNDescentTransformer
    n = len(X)
    transformer = PyNNDescentTransformer(n_neighbors=N_NEIGHBORS, metric="euclidean", metric_kwds={},
                                         random_state=0, n_jobs=-1, n_trees=min(64, 5 + round(n ** 0.5 / 20.0)),
                                         n_iters=max(5, round(np.log2(n))))
    return transformer.fit_transform(X)


def bench(n: int, rows: list, scanpy_max: int) -> None:
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
    t = time.perf_counter()
    dist = pynndescent_as_scanpy(X)
    t_nnd = time.perf_counter() - t
    rows.append({"n": n, "method": "pynndescent search alone, as scanpy calls it", "time_s": t_nnd,
                 "recall": recall(dist, queries, truth), "masksc_speedup": t_nnd / t_masksc})
    if n >= 100_000:  # IVF: FAISS tuned to the recall pynndescent reached, for speed at equal quality
        target = float(np.floor(rows[-1]["recall"] * 100) / 100)
        b = anndata.AnnData(obs={"i": np.arange(n)})
        b.obsm["X_masksc"] = X
        t = time.perf_counter()
        tl.neighbors(b, N_NEIGHBORS, target_recall=target)
        t_matched = time.perf_counter() - t
        rows.append({"n": n, "method": f"masksc.tl.neighbors (FAISS IVF, target_recall={target})",
                     "time_s": t_matched, "recall": recall(b.obsp["masksc_neighbors_distances"], queries, truth),
                     "masksc_speedup": t_nnd / t_matched})
    if n > scanpy_max:
        return
    t = time.perf_counter()
    try:
        sc.pp.neighbors(a, n_neighbors=N_NEIGHBORS, use_rep="X_masksc", random_state=0)
    except Exception as exc:  # scanpy 1.11.5 + scipy 1.17 fail above 8192 cells (pynndescent's path)
        rows.append({"n": n, "method": "scanpy pp.neighbors", "error": f"{type(exc).__name__}: {exc}"})
        return
    t_scanpy = time.perf_counter() - t
    rows.append({"n": n, "method": "scanpy pp.neighbors (" + ("exact" if n < 8192 else "pynndescent") + ")",
                 "time_s": t_scanpy, "recall": recall(a.obsp["distances"], queries, truth),
                 "masksc_speedup": t_scanpy / t_masksc})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=[10_000, 100_000], type=positive_ints, help="cells, comma-separated")
    ap.add_argument("--scanpy-max", type=int, default=100_000,
                    help="largest size to run sc.pp.neighbors on (it repeats pynndescent's search)")
    args = ap.parse_args()
    bench(5000, [], 5000)  # compiles numba (scanpy, pynndescent) and loads FAISS before anything is timed
    rows: list[dict] = []
    for n in args.sizes:
        bench(n, rows, args.scanpy_max)
        print_table([r for r in rows if r["n"] == n], COLUMNS)
    print()
    print_table(rows, COLUMNS)
    path = write_result("neighbors", {**device_info("cpu"), "d": 64, "n_neighbors": N_NEIGHBORS,
                                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
