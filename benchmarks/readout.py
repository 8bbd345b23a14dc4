"""How should a trained mask-sc model be read out and clustered? For a `cpu`-preset model per
(dataset, seed), the embedding is taken eight ways (mean of the patch tokens, the global
token, the predicted teacher feature, mean and global token concatenated, the frozen
teacher's own feature of the whole cell, mean and teacher feature concatenated, the mean of
the tokens after the second-to-last encoder block, the mean over 8 masked views of the cell
as training sees it) and the
mean-pooled and predicted-feature ones are clustered ten ways with k = number of labels,
plain and L2-normalised k-means also from 10 clustering seeds (mean +- std: the share of a
score that is the k-means draw rather than the embedding). A 15-nearest-neighbour classifier
on the labels (5-fold accuracy) says how well the mean-pooled embedding separates the types
locally, whatever shape k-means needs them to have. Prints a table and writes
benchmarks/results/readout.json (with the device).

    python benchmarks/readout.py                       # the runs the README cites
    python benchmarks/readout.py --runs pbmc:1,worm:0

The models are ``reproduce.py``'s ``masksc`` models (same recipe and seed, so the preset's own
read-out under "kmeans10" scores that row), trained once and shared with it in --models.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_info, print_table, teacher_embedding, write_result  # noqa: E402
from benchmarks.reproduce import DATA, MODELS, _labels, preset_model, read_dataset  # noqa: E402
from masksc import ops  # noqa: E402
from masksc.cluster import kmeans, knn_graph, knn_search, leiden_for_k  # noqa: E402
from masksc.models.masksc_model import POOLS  # noqa: E402


def _unit_rms(Z):
    """Centre Z [n, d] and scale it to a mean squared row norm of 1, so that blocks of
    different sizes weigh alike when concatenated."""
    Z = Z - Z.mean(0)
    return Z / np.sqrt((Z ** 2).sum(1).mean())


def _earlier_block_mean(net, X, block: int) -> np.ndarray:
    """Mean of the non-padding patch tokens after encoder block ``block`` (1-based), through
    the encoder's final LayerNorm as the shipped read-out is: X [n, g*s] CSR -> [n, embed_dim]."""
    def one(batch):
        tokens = net.tokenize(batch)
        x = net.encode(tokens, net.pad_tokens.expand(tokens.shape[0], -1), n_blocks=block)
        return net.mean_over_patches(x[:, 1:])
    return _per_batch(net, X, one)


def _masked_views_mean(net, X, views: int = 8, n_keep: int | None = None) -> np.ndarray:
    """Mean-pooled encoder tokens averaged over ``views`` random maskings of each cell (the
    ``n_keep`` visible patches, default cfg.n_keep as training encodes), instead of one pass over
    every patch: X [n, g*s] CSR -> [n, embed_dim]. Seeded by view and first row, so reruns agree."""
    n_keep = net.cfg.n_keep if n_keep is None else n_keep

    def one(batch):
        tokens, pad = net.tokenize(batch), net.pad_tokens
        total = 0.0
        for view in range(views):
            kept, ids_keep, _, _ = ops.random_masking(tokens, n_keep,
                                                      view * 1_000_003 + int(batch.cell_index[0]))
            total = total + net.mean_over_patches(net.encode(kept, pad[ids_keep])[:, 1:], pad[ids_keep])
        return total / views
    return _per_batch(net, X, one)


def _per_batch(net, X, fn) -> np.ndarray:
    from masksc.data import CellBatches
    net.eval()
    out = None
    with torch.no_grad():
        for batch in CellBatches(X, batch_size=512, shuffle=False):
            z = fn(batch).numpy()
            out = np.empty((X.shape[0], z.shape[1]), np.float32) if out is None else out
            out[batch.cell_index.numpy()] = z
    return out


def _knn_mean(Z, n_neighbors=15):
    idx, _ = knn_search(Z, n_neighbors)
    return Z[idx].mean(1)


def _pca(Z, n, seed):
    from sklearn.decomposition import PCA
    return PCA(n, random_state=seed).fit_transform(Z)


def _ward(Z, k):
    from sklearn.cluster import AgglomerativeClustering
    return AgglomerativeClustering(k).fit_predict(Z)


def _gmm(Z, k, seed):
    """Gaussian mixture with a full covariance per cluster (k-means-initialised): clusters of
    unequal size and spread, which k-means's equal spheres split or merge."""
    from sklearn.mixture import GaussianMixture
    return GaussianMixture(k, covariance_type="full", reg_covar=1e-4, random_state=seed).fit_predict(Z)


def _spectral(Z, k, seed):
    from sklearn.cluster import SpectralClustering
    return SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=15, assign_labels="cluster_qr",
                              random_state=seed).fit_predict(Z)


def _knn_accuracy(Z, truth, seed):
    """5-fold accuracy of a 15-NN classifier on the labels: how well the embedding separates
    the types locally, whatever shape k-means needs them to have."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(15), Z, truth, cv=folds).mean())


CLUSTERINGS = {  # name -> (Z, k, seed) -> labels; "kmeans10" is what reproduce.py reports
    "kmeans10": lambda Z, k, s: kmeans(Z, k, seed=s),
    "kmeans100": lambda Z, k, s: kmeans(Z, k, seed=s, n_init=100),
    "l2 + kmeans10": lambda Z, k, s: kmeans(Z / np.linalg.norm(Z, axis=1, keepdims=True), k, seed=s),
    "standardise + kmeans10": lambda Z, k, s: kmeans((Z - Z.mean(0)) / Z.std(0), k, seed=s),
    "pca16 + kmeans10": lambda Z, k, s: kmeans(_pca(Z, 16, s), k, seed=s),
    "ward": lambda Z, k, s: _ward(Z, k),
    "15-NN mean + kmeans10": lambda Z, k, s: kmeans(_knn_mean(Z), k, seed=s),
    "leiden_for_k": lambda Z, k, s: leiden_for_k(knn_graph(Z, 15), k, seed=s)[0],
    "gmm (full covariance)": _gmm,
    "spectral (15-NN)": _spectral,
}

# k-means restarts from SPREAD_SEEDS seeds: how much of a score is the clustering's own draw?
SPREAD, SPREAD_SEEDS = ("kmeans10", "l2 + kmeans10"), 10


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="pbmc:0,pbmc:1,pbmc:2,worm:0,worm:1,worm:2", help="dataset:seed pairs")
    p.add_argument("--models", default=str(MODELS), help="trained models, shared with reproduce.py")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipping: {DATA} is absent (the benchmark datasets live beside the project)")
        return 0
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from masksc.embed import embed_matrix

    rows = []
    for run in args.runs.split(","):
        ds, seed = run.split(":")
        seed = int(seed)
        adata = read_dataset(ds)
        truth = _labels(adata)
        k = len(np.unique(truth))
        model = preset_model(adata, ds, seed, args.models)
        X = model.to_grid(adata)
        pooled = {}
        for pool in POOLS:
            model.set_pool(pool)
            pooled[pool] = embed_matrix(model.network, X, batch_size=512, progress=False)
        pooled["mean + cls"] = np.hstack([pooled["mean"], pooled["cls"]])
        pooled["teacher"] = teacher_embedding(model.network.teacher, X)
        pooled["mean + teacher"] = np.hstack([_unit_rms(pooled["mean"]), _unit_rms(pooled["teacher"])])
        depth = model.network.cfg.depth
        pooled[f"mean, block {depth - 1} of {depth}"] = _earlier_block_mean(model.network, X, depth - 1)
        pooled["mean of 8 masked views"] = _masked_views_mean(model.network, X)
        todo = [(pool, "kmeans10") for pool in pooled] + [(pool, c) for pool in ("mean", "target")
                                                          for c in CLUSTERINGS if c != "kmeans10"]
        for pool, clustering in todo:
            t = time.perf_counter()
            pred = CLUSTERINGS[clustering](pooled[pool], k, seed)
            rows.append({"dataset": ds, "seed": seed, "pool": pool, "clustering": clustering,
                         "ari": float(adjusted_rand_score(truth, pred)),
                         "nmi": float(normalized_mutual_info_score(truth, pred)),
                         "seconds": time.perf_counter() - t})
            print(f"{ds} seed {seed}  {pool:10s} {clustering:24s} ARI {rows[-1]['ari']:.4f}  NMI {rows[-1]['nmi']:.4f}", flush=True)
        rows.append({"dataset": ds, "seed": seed, "pool": "mean", "clustering": "15-NN classifier, 5-fold",
                     "accuracy": _knn_accuracy(pooled["mean"], truth, seed)})
        print(f"{ds} seed {seed}  mean       15-NN classifier accuracy {rows[-1]['accuracy']:.4f}", flush=True)
        for pool, clustering in [(pool, c) for pool in ("mean", "target") for c in SPREAD]:
            scores = [(adjusted_rand_score(truth, pred), normalized_mutual_info_score(truth, pred))
                      for pred in (CLUSTERINGS[clustering](pooled[pool], k, s) for s in range(SPREAD_SEEDS))]
            ari, nmi = np.array(scores).T
            rows.append({"dataset": ds, "seed": seed, "pool": pool, "clustering": f"{clustering}, seeds 0-{SPREAD_SEEDS - 1}",
                         "ari": float(ari.mean()), "ari_std": float(ari.std()), "nmi": float(nmi.mean())})
            print(f"{ds} seed {seed}  {pool:10s} {rows[-1]['clustering']:24s} ARI {ari.mean():.4f} ± {ari.std():.4f}  "
                  f"NMI {nmi.mean():.4f}", flush=True)
    print_table(rows, ["dataset", "seed", "pool", "clustering", "ari", "nmi", "accuracy"])
    print(write_result("readout", {**device_info("cpu"), "preset": "cpu", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
