"""Is a dataset's gap to its goal in the embedding or in k-means? For a trained model per
(dataset, seed), its embedding (the method's read-out) and its frozen teacher's feature (or, with
``--method log-pca``, the log-PCA baseline's 50 components) are each partitioned three ways:
k-means (k = number of labels, 10 restarts, what Table 1 reports), and two oracles that read the
labels, bounding what any centroid clustering could score there:

- ``nearest true centroid``: each cell to the nearest mean of a true type;
- ``k-means from true centroids``: Lloyd's k-means started from those means and run to
  convergence, the k-means solution nearest the truth.

Each partition's k-means objective (sum of squared distances to its parts' means) is given as a
ratio to plain k-means's: where k-means from the truth settles on plain k-means's partition
(ratio 1, same scores), no restart or initialisation of k-means does better, and the first oracle
is the most a centroid partition of that embedding holds. Each row is appended, under a lock, to
benchmarks/results/centroid_bound.json (with the device):

    python benchmarks/centroid_bound.py --runs pbmc:0,pbmc:1,pbmc:2 --method masksc

The models are ``reproduce.py``'s (same recipe and seed), trained once and shared with it in
--models; a model absent there is trained first (about 20 minutes a `cpu`-preset run on 1 thread).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, ready_for_data, teacher_embedding  # noqa: E402
from benchmarks.reproduce import (ABLATIONS, DATA, MODELS, _labels, _scanpy_logpca, append_run,  # noqa: E402
                                  preset_model, read_dataset)
from masksc.cluster import kmeans  # noqa: E402

RESULT = RESULTS / "centroid_bound.json"


def objective(Z: np.ndarray, labels: np.ndarray) -> float:
    """k-means objective of a partition of Z [n, d]: sum of squared distances to each part's mean."""
    return float(sum(((Z[labels == c] - Z[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def partitions(Z: np.ndarray, truth: np.ndarray, seed: int) -> dict:
    """Z [n, d] float32, truth [n] labels -> {name: int labels [n]}: k-means (10 restarts, k = the
    number of true types) and the two oracles of the module docstring."""
    from sklearn.cluster import KMeans
    centroids = np.stack([Z[truth == c].mean(0) for c in np.unique(truth)]).astype(Z.dtype)
    nearest = ((Z ** 2).sum(1, keepdims=True) - 2 * Z @ centroids.T + (centroids ** 2).sum(1)).argmin(1)
    return {"kmeans10": kmeans(Z, len(centroids), seed=seed),
            "nearest true centroid (oracle)": nearest,
            "k-means from true centroids (oracle)": KMeans(len(centroids), init=centroids, n_init=1,
                                                           max_iter=300).fit_predict(Z)}


def _readouts(adata, dataset: str, seed: int, args) -> dict:
    """{name: float32 [n, d]}: a mask-sc model's embedding and its teacher's feature, or log-PCA's
    50 components (Table 1's ``log-pca`` row)."""
    if args.method == "log-pca":
        return {"log-pca": _scanpy_logpca(adata, seed).obsm["X_pca"].astype(np.float32)}
    from masksc.embed import embed_matrix
    model = preset_model(adata, dataset, seed, args.models, args.method)
    X = model.to_grid(adata)
    return {"model": embed_matrix(model.network, X, batch_size=512, progress=False),
            "teacher": teacher_embedding(model.network.teacher, X)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="pbmc:0,pbmc:1,pbmc:2,worm:0,worm:1,worm:2", help="dataset:seed pairs")
    p.add_argument("--method", default="masksc", choices=sorted(ABLATIONS) + ["log-pca"],
                   help="a mask-sc row of Table 1 or 2, or the log-PCA baseline")
    p.add_argument("--models", default=str(MODELS), help="trained models, shared with reproduce.py")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the README's figures: 1)")
    args = p.parse_args(argv)
    if not ready_for_data(DATA, args.threads):
        return 0
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    datasets = {}
    for run in args.runs.split(","):
        ds, seed = run.split(":")
        if ds not in datasets:
            datasets[ds] = read_dataset(ds)
        seed, adata = int(seed), datasets[ds]
        truth = _labels(adata)
        readouts = _readouts(adata, ds, seed, args)
        for readout, Z in readouts.items():
            parts = partitions(Z, truth, seed)
            plain = objective(Z, parts["kmeans10"])
            for name, pred in parts.items():
                row = {"dataset": ds, "seed": seed, "method": args.method, "readout": readout, "partition": name,
                       "ari": float(adjusted_rand_score(truth, pred)),
                       "nmi": float(normalized_mutual_info_score(truth, pred)),
                       "objective_vs_kmeans10": objective(Z, pred) / plain, "torch_threads": args.threads}
                print(f"{ds} seed {seed} {args.method} {readout:8s} {name:37s} ARI {row['ari']:.4f} "
                      f"NMI {row['nmi']:.4f}  objective {row['objective_vs_kmeans10']:.4f} x k-means's", flush=True)
                append_run(RESULT, row, ("dataset", "seed", "method", "readout", "partition"))
    print(RESULT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
