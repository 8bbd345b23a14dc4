"""How should a trained mask-sc model be read out and clustered? For a `cpu`-preset model per
(dataset, seed), the embedding is taken three ways (mean of the patch tokens, the global
token, both concatenated) and the mean-pooled one is clustered eight ways with k = number of
labels. Prints a table and writes benchmarks/results/readout.json (with the device).

    python benchmarks/readout.py                       # the runs the README cites
    python benchmarks/readout.py --runs pbmc:1,worm:0

Each model is trained once (the same recipe and seed as ``reproduce.py``'s ``masksc`` row, so
its scores under "mean / kmeans10" are that row's) and kept in --workdir
(default ~/.cache/masksc-readout), named by the preset's config hash.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import device_info, print_table, write_result  # noqa: E402
from benchmarks.reproduce import DATA, DATASETS, _labels  # noqa: E402
from benchmarks.scale import _preset_hash  # noqa: E402
from masksc.cluster import kmeans, knn_graph, knn_search, leiden_for_k  # noqa: E402


def _knn_mean(Z, n_neighbors=15):
    idx, _ = knn_search(Z, n_neighbors)
    return Z[idx].mean(1)


def _pca(Z, n, seed):
    from sklearn.decomposition import PCA
    return PCA(n, random_state=seed).fit_transform(Z)


def _ward(Z, k):
    from sklearn.cluster import AgglomerativeClustering
    return AgglomerativeClustering(k).fit_predict(Z)


CLUSTERINGS = {  # name -> (Z, k, seed) -> labels; "kmeans10" is what reproduce.py reports
    "kmeans10": lambda Z, k, s: kmeans(Z, k, seed=s),
    "kmeans100": lambda Z, k, s: kmeans(Z, k, seed=s, n_init=100),
    "l2 + kmeans10": lambda Z, k, s: kmeans(Z / np.linalg.norm(Z, axis=1, keepdims=True), k, seed=s),
    "standardise + kmeans10": lambda Z, k, s: kmeans((Z - Z.mean(0)) / Z.std(0), k, seed=s),
    "pca16 + kmeans10": lambda Z, k, s: kmeans(_pca(Z, 16, s), k, seed=s),
    "ward": lambda Z, k, s: _ward(Z, k),
    "15-NN mean + kmeans10": lambda Z, k, s: kmeans(_knn_mean(Z), k, seed=s),
    "leiden_for_k": lambda Z, k, s: leiden_for_k(knn_graph(Z, 15), k, seed=s)[0],
}


def _model(ds: str, seed: int, adata, workdir: Path):
    from masksc.pipeline import MaskSCModel, fit
    path = workdir / f"{ds}_s{seed}_cpu-{_preset_hash('cpu')}"
    if (path / "model.safetensors").exists():
        return MaskSCModel.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fewer genes than grid positions: padded
        model, _ = fit(adata, "cpu", seed=seed, progress=False)
    model.save(path)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="pbmc:0,worm:2", help="dataset:seed pairs")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "masksc-readout")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipping: {DATA} is absent (the benchmark datasets live beside the project)")
        return 0
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from masksc.data import read
    from masksc.embed import embed_matrix

    rows = []
    for run in args.runs.split(","):
        ds, seed = run.split(":")
        seed = int(seed)
        adata = read(DATA / DATASETS[ds])
        truth = _labels(adata)
        k = len(np.unique(truth))
        model = _model(ds, seed, adata, args.workdir)
        X = model.to_grid(adata)
        net, pooled = model.network, {}
        for pool in ("mean", "cls"):
            net.cfg = dataclasses.replace(net.cfg, pool=pool)
            pooled[pool] = embed_matrix(net, X, batch_size=512, progress=False)
        pooled["mean + cls"] = np.hstack([pooled["mean"], pooled["cls"]])
        todo = [(pool, "kmeans10") for pool in pooled] + [("mean", c) for c in CLUSTERINGS if c != "kmeans10"]
        for pool, clustering in todo:
            t = time.perf_counter()
            pred = CLUSTERINGS[clustering](pooled[pool], k, seed)
            rows.append({"dataset": ds, "seed": seed, "pool": pool, "clustering": clustering,
                         "ari": float(adjusted_rand_score(truth, pred)),
                         "nmi": float(normalized_mutual_info_score(truth, pred)),
                         "seconds": time.perf_counter() - t})
            print(f"{ds} seed {seed}  {pool:10s} {clustering:24s} ARI {rows[-1]['ari']:.4f}  NMI {rows[-1]['nmi']:.4f}", flush=True)
    print_table(rows, ["dataset", "seed", "pool", "clustering", "ari", "nmi"])
    print(write_result("readout", {**device_info("cpu"), "preset": "cpu", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
