"""Clustering at scale: FAISS k-means vs sklearn KMeans, FAISS kNN (flat vs IVF) + Leiden,
sampled vs exact silhouette. Synthetic Gaussian mixture embeddings: d=64 (a cell embedding's
width), k=10 well-separated clusters of unequal size. Isotropic 64-d noise is a hard case for
IVF (no low-dimensional structure), so its recall/speed here is a pessimistic figure.

Fairness of the k-means comparison: both run the same budget, --n-init restarts (default 5;
one restart often stops in a local optimum on this mixture, for both libraries) of greedy
k-means++ seeding followed by at most --iters Lloyd iterations (sklearn: algorithm="lloyd", tol=0; both
stop early only on exact convergence). FAISS is timed twice: training on all cells (same work as
sklearn) and with masksc's default training sample (1024 cells per centroid, then every cell
assigned) -- the second is what masksc.cluster.kmeans does by default.

    python benchmarks/bench_cluster.py --sizes 100000,1000000
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Before anything loads OpenMP (torch, via _common): busy-waiting OpenMP threads made FAISS
# 10-40x and sklearn KMeans several times slower on this shared machine (masksc.cluster._faiss).
# The same policy applies to both libraries.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import device_info, positive_ints, print_table, write_result  # noqa: E402
from masksc import cluster  # noqa: E402


def mixture(n: int, d: int = 64, k: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture, unequal weights, unit noise, centres N(0, 2^2) apart; float32 [n, d]."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 5.0))
    y = rng.choice(k, size=n, p=weights)
    centers = rng.normal(scale=2.0, size=(k, d)).astype(np.float32)
    X = rng.standard_normal((n, d), dtype=np.float32)
    X += centers[y]
    return X, y


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def inertia(X: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(labels):
        xc = X[labels == c].astype(np.float64)
        total += float(((xc - xc.mean(0)) ** 2).sum())
    return total


def bench_kmeans(n: int, k: int, iters: int, n_init: int, rows: list) -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score as ari

    X, y = mixture(n, k=k)
    few = X[:max(4096, k)]
    for warm in (lambda: KMeans(k, n_init=1, max_iter=2, random_state=0).fit(few),  # thread pools start once
                 lambda: cluster.kmeans(few, k, seed=0, n_init=1, max_iter=2)):
        warm()
    sk_km = KMeans(k, n_init=n_init, max_iter=iters, tol=0.0, algorithm="lloyd", random_state=0)
    sk, t_sk = timed(lambda: sk_km.fit(X))
    sk_in = inertia(X, sk.labels_)
    rows.append({"task": "kmeans", "n": n, "method": "sklearn KMeans", "time_s": t_sk, "speedup": 1.0,
                 "ari_vs_sklearn": 1.0, "ari_vs_truth": ari(y, sk.labels_), "inertia_ratio": 1.0})
    for name, mppc in (("faiss all cells", None), ("faiss sample 1024/centroid", 1024)):
        lab, t = timed(lambda: cluster.kmeans(X, k, seed=0, n_init=n_init, max_iter=iters,
                                              max_points_per_centroid=mppc))
        rows.append({"task": "kmeans", "n": n, "method": name, "time_s": t, "speedup": t_sk / t,
                     "ari_vs_sklearn": ari(sk.labels_, lab), "ari_vs_truth": ari(y, lab),
                     "inertia_ratio": inertia(X, lab) / sk_in})


def bench_graph(n: int, rows: list) -> None:
    X, y = mixture(n, k=10, seed=1)
    (I_flat, D_flat), t_flat = timed(lambda: cluster.knn_search(X, 15, index="flat"))
    rows.append({"task": "knn@15", "n": n, "method": "faiss IndexFlatL2", "time_s": t_flat, "recall": 1.0})
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
    for nprobe in (nlist // 32, nlist // 16, nlist // 8):  # fixed; knn_search tunes it when not given
        (I_ivf, _), t_ivf = timed(lambda: cluster.knn_search(X, 15, index="ivf", nprobe=max(1, nprobe)))
        hits = (I_ivf[:, :, None] == I_flat[:, None, :]).any(2).sum(1)
        rows.append({"task": "knn@15", "n": n, "method": f"faiss IVFFlat nlist={nlist} nprobe={max(1, nprobe)}",
                     "time_s": t_ivf, "speedup": t_flat / t_ivf, "recall": float(hits.mean() / 15)})
    G, t_fuzzy = timed(lambda: cluster.fuzzy_connectivities(I_flat, D_flat))
    rows.append({"task": "fuzzy weights", "n": n, "method": "umap-style (numpy)", "time_s": t_fuzzy})
    labels, t_leiden = timed(lambda: cluster.leiden(G, resolution=1.0, seed=0))
    from sklearn.metrics import adjusted_rand_score as ari
    rows.append({"task": "leiden", "n": n, "method": "igraph community_leiden r=1, 2 iterations", "time_s": t_leiden,
                 "n_clusters": int(labels.max()) + 1, "ari_vs_truth": ari(y, labels)})


def bench_silhouette(n: int, sample: int, rows: list) -> None:
    X, y = mixture(n, k=10, seed=2)
    exact, t_exact = timed(lambda: cluster.evaluate(X, y, silhouette_sample=None)["silhouette"])
    sampled, t_s = timed(lambda: cluster.evaluate(X, y, silhouette_sample=sample)["silhouette"])
    rows.append({"task": "silhouette", "n": n, "method": "exact", "time_s": t_exact, "silhouette": exact})
    rows.append({"task": "silhouette", "n": n, "method": f"sampled {sample}", "time_s": t_s,
                 "speedup": t_exact / t_s, "silhouette": sampled})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=[100_000, 1_000_000], type=positive_ints,
                    help="k-means sizes (cells), comma-separated")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20, help="Lloyd iterations for both libraries")
    ap.add_argument("--n-init", type=int, default=5, help="k-means restarts for both libraries")
    ap.add_argument("--graph-n", type=int, default=100_000, help="cells for the kNN/Leiden benchmark (0 = skip)")
    ap.add_argument("--silhouette-n", type=int, default=30_000, help="cells for exact vs sampled silhouette (0 = skip)")
    ap.add_argument("--silhouette-sample", type=int, default=10_000)
    args = ap.parse_args()
    if min(args.sizes) < args.k:
        ap.error(f"--sizes {min(args.sizes)}: k-means needs at least --k {args.k} cells")
    rows: list[dict] = []
    for n in args.sizes:
        bench_kmeans(n, args.k, args.iters, args.n_init, rows)
        print_table(rows[-3:], ["task", "n", "method", "time_s", "speedup", "ari_vs_sklearn", "ari_vs_truth",
                                "inertia_ratio"])
    if args.graph_n:
        bench_graph(args.graph_n, rows)
    if args.silhouette_n:
        bench_silhouette(args.silhouette_n, args.silhouette_sample, rows)
    print()
    print_table(rows, ["task", "n", "method", "time_s", "speedup", "ari_vs_sklearn", "ari_vs_truth",
                       "inertia_ratio", "recall", "n_clusters", "silhouette"])
    path = write_result("cluster", {**device_info("cpu"), "dtype": "float32", "d": 64, "k": args.k,
                                    "iters": args.iters, "n_init": args.n_init,
                                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
