"""The mask-sc teacher on its own: how well does the frozen contrastive-sc network that gives
mask-sc its targets cluster cells, and how much does that vary with its settings and seed?

For each setting: the `cpu` preset's gene selection and grid (fit's own recipe: seurat_v3 HVG
among genes detected in >= 3 cells, HVG-order grid), the whole-cell teacher trained with
``fit_teacher``, its eval-mode embedding of every cell, k-means with k = number of labels.
Prints a table and writes benchmarks/results/teacher_alone.json (with the device).

    python benchmarks/teacher_alone.py                 # the sweep the README cites
    python benchmarks/teacher_alone.py --quick         # the seed-0 baseline of each dataset, printed only

``teachers = n`` rows train n teachers (seeds seed .. seed+n-1) and cluster the concatenation of
their embeddings: would an ensemble of teachers (as the student's target) average out the
seed-to-seed spread? ``readout = "hidden"`` rows embed cells as the teacher's last hidden layer
(the 40 units before the output layer, as SimCLR reads out before its projection head) instead
of its L2-normalised output, the feature mask-sc's student regresses.
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

from benchmarks._common import device_info, print_table, ready_for_data, write_result  # noqa: E402
from benchmarks.reproduce import DATA, DATASETS, _cluster_and_score, _labels  # noqa: E402

BASE = dict(n_genes=2304, grid=48, dropout=None, lr=0.4, epochs=30, temperature=0.07, flavor="auto", seed=0,
            teachers=1, layers=(200, 40, 60), batch_size=200, readout="output")
SWEEP = [  # (dataset, changes from BASE); dropout None = auto_teacher_dropout
    ("pbmc", {}),
    ("worm-top2000", {}),
    ("worm", {}), ("worm", {"seed": 1}), ("worm", {"seed": 2}),
    ("worm", {"lr": 1e-2}), ("worm", {"lr": 1e-3}), ("worm", {"epochs": 60}),
    ("worm", {"dropout": 0.6}), ("worm", {"dropout": 0.85}), ("worm", {"dropout": 0.9}),
    ("worm", {"flavor": "dispersion"}), ("worm", {"n_genes": 4096, "grid": 64}),
    ("pbmc", {"teachers": 3}), ("worm", {"teachers": 3}), ("worm", {"teachers": 3, "seed": 3}),
    ("worm", {"seed": 3}), ("worm", {"seed": 4}), ("worm", {"seed": 5}),
    ("pbmc", {"seed": 1}), ("pbmc", {"seed": 2}), ("pbmc", {"seed": 3}), ("pbmc", {"seed": 4}),
    ("pbmc", {"dropout": 0.8}), ("pbmc", {"dropout": 0.95}), ("pbmc", {"epochs": 60}), ("pbmc", {"lr": 1e-2}),
    ("pbmc", {"temperature": 0.2}), ("pbmc", {"temperature": 0.3}), ("pbmc", {"temperature": 0.5}),
    ("pbmc", {"temperature": 0.5, "seed": 1}), ("pbmc", {"temperature": 0.5, "seed": 2}),
    ("worm", {"temperature": 0.2}), ("worm", {"temperature": 0.5}),
    ("pbmc", {"temperature": 0.3, "seed": 1}), ("pbmc", {"temperature": 0.3, "seed": 2}),
    *[(ds, {"temperature": 0.2, "seed": seed}) for ds in ("worm", "pbmc") for seed in (1, 2)],
    *[("pbmc", {"layers": layers, "seed": seed})
      for layers in ((512, 128, 60), (1024, 256, 128)) for seed in (0, 1, 2)],
    *[("pbmc", {"batch_size": 100, "seed": seed}) for seed in (0, 1, 2)],
    *[(ds, {**changes, "seed": seed}) for ds, changes in [
        ("pbmc", {"readout": "hidden"}), ("pbmc", {"temperature": 1.0}), ("pbmc", {"batch_size": 512}),
        ("pbmc", {"temperature": 0.5, "readout": "hidden"}), ("pbmc", {"temperature": 0.5, "epochs": 60}),
        ("pbmc", {"temperature": 0.5, "batch_size": 512}), ("pbmc", {"temperature": 0.5, "layers": (512, 128, 60)}),
        ("worm", {"readout": "hidden"}), ("worm", {"batch_size": 512})] for seed in (0, 1, 2)],
]


def _hidden(teacher, dense: torch.Tensor) -> torch.Tensor:
    """The teacher's last hidden layer (after its BatchNorm and ReLU) for dense grid rows
    [n, g*s] -> [n, layers[-2]]."""
    h = teacher.fc1(teacher.standardize(dense))
    for layer in list(teacher.rest)[:-1]:
        h = layer(h)
    return h


def run(adata, s: dict) -> dict:
    from masksc.data import GridLayout, Preprocessor
    from masksc.models.presets import get_preset
    from masksc.models.targets import auto_teacher_dropout, fit_teacher, teacher_config

    pre = Preprocessor(n_top_genes=s["n_genes"], hvg_flavor=s["flavor"], min_cells=3).fit(adata)
    X = pre.transform(adata).X
    shape = (s["grid"], s["grid"])
    grid = GridLayout.fit(X, pre.genes_, shape=shape, patch=4, order="hvg")
    Xg = grid.to_grid(X)
    dropout = auto_teacher_dropout(Xg) if s["dropout"] is None else s["dropout"]
    t0 = time.time()
    dense = torch.from_numpy(Xg.toarray())
    Z = []
    model_cfg = get_preset("cpu").replace(grid_shape=shape, target_dim=s["layers"][-1])
    for seed in range(s["seed"], s["seed"] + s["teachers"]):
        cfg = teacher_config(model_cfg, seed, dropout=dropout, epochs=s["epochs"], lr=s["lr"],
                             temperature=s["temperature"], layers=s["layers"], batch_size=s["batch_size"])
        teacher = fit_teacher(Xg, shape, model_cfg.patch, "cell", cfg, is_padding=grid.is_padding, progress=False)
        with torch.no_grad():
            Z.append((teacher(dense) if s["readout"] == "output" else _hidden(teacher, dense)).numpy())
    Z = np.concatenate(Z, axis=1)
    k = int(adata.obs["label"].nunique())
    scores = _cluster_and_score(Z, _labels(adata), k, s["seed"])
    return {**s, "dropout": round(dropout, 4), "detected_per_cell": round(Xg.getnnz() / Xg.shape[0], 1),
            "ari": scores["ari"], "nmi": scores["nmi"], "wall_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the seed-0 baseline of each dataset, printed; the JSON of the whole sweep is kept")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the README's figures: 1)")
    args = p.parse_args(argv)
    if not ready_for_data(DATA, args.threads):
        return 0
    from masksc.data import read

    sweep = [(ds, ch) for ds, ch in SWEEP if not args.quick or not ch]
    data, rows = {}, []
    for ds, changes in sweep:
        if ds not in data:
            data[ds] = read(DATA / DATASETS[ds])
        rows.append({"dataset": ds, **run(data[ds], {**BASE, **changes})})
        print(f"{ds} {changes or 'baseline'}: ARI {rows[-1]['ari']:.4f} NMI {rows[-1]['nmi']:.4f}", flush=True)
    print_table(rows)
    if not args.quick:
        print(write_result("teacher_alone", {**device_info("cpu"), "torch_threads": args.threads, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
