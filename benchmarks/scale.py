"""Scale benchmark: synthetic 10k / 100k / 1M cells x 4096 genes streamed through masksc.

Usage: python benchmarks/scale.py [--sizes 10000,100000,1000000] [--workdir ~/.cache/masksc-scale]
                                  [--preset auto|cpu|paper] [--train-cells 4096] [--train-epochs N]

Per size, each stage runs in its own subprocess, so ``peak_rss_mb`` (ru_maxrss) is that stage's
own peak, imports included:

* ``write``: ``masksc.data.write_synthetic_h5ad`` (seed 0, 10 cell types), once, cached in
  ``--workdir`` (outside the repo);
* ``preprocess``: the streaming ``Preprocessor.fit`` over the backed file (library sizes, HVG
  statistics; two passes for seurat_v3), selecting the preset's ``g*s`` genes;
* ``embed``: ``MaskSCModel.embed_file`` (what ``masksc embed big.h5ad -o out.npy`` runs):
  chunks read from disk, preprocessed, embedded, written to a .npy memmap, renamed at the end;
* ``kmeans_faiss`` / ``kmeans_sklearn``: k = 10 on the embedding, same restarts and Lloyd
  iterations for both; ARI between the two labelings and against the synthetic truth;
* ``knn_leiden``: FAISS kNN graph (15 neighbours; IVF above 10^5 cells) + Leiden (resolution 1).

The model: the preset (``auto``: ``paper`` on a GPU, ``cpu`` on the CPU) trained by
``masksc.pipeline.fit`` (teacher included, default settings; the preset's own epochs unless
``--train-epochs`` says otherwise) on the first ``--train-cells`` cells of the same synthetic
dataset (the generator makes the first n cells of every size identical), written once to
``--workdir``; every size is embedded with that one model, so throughput is that of the real
encoder and ARI is that of a model trained as a user would train it (a 3-epoch cpu model,
used before, embeds with ARI ~0.03: the masked model needs ~10 epochs to pick up its teacher).
Prints a table and writes benchmarks/results/scale.json (``--tag`` appends to the name).
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import positive_ints  # noqa: E402  (light: torch is imported where a stage needs it)

N_GENES, N_TYPES, SEED, K = 4096, 10, 0, 10


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def data_path(workdir: Path, n: int) -> Path:
    return workdir / f"synthetic_{n}x{N_GENES}_seed{SEED}.h5ad"


def _truth(path: Path):
    from masksc.outofcore import RowReader
    return RowReader(path).obs["label"].to_numpy()


def _device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _preset_hash(preset: str) -> str:
    """Short hash of the preset's config, so a changed preset never reuses a stale cached model."""
    import hashlib
    from masksc.models import PRESETS
    return hashlib.sha1(json.dumps(PRESETS[preset].to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def stage(name: str, args) -> dict:
    """Run one stage in this process and return its measurements."""
    import numpy as np

    workdir, n = Path(args.workdir), args.n
    path = data_path(workdir, n)
    emb = workdir / f"embedding_{n}_{args.preset}.npy"
    model_dir = workdir / f"model_{args.preset}-{_preset_hash(args.preset)}_{args.train_cells}x{args.train_epochs}ep"
    out: dict = {}
    t = time.perf_counter()
    if name == "write":
        from masksc.data import write_synthetic_h5ad
        sidecar = path.resolve().with_suffix(".write.json")  # the timing of the run that wrote the file
        out["file_gb"] = path.stat().st_size / 1e9 if path.exists() else None
        if path.exists():
            out["cached"] = True
            if sidecar.exists():
                timing = json.loads(sidecar.read_text())
                return {"seconds": timing["seconds"], "cells_per_s": n / timing["seconds"],
                        "peak_rss_mb": timing.get("peak_rss_mb"), "timed_by": sidecar.name, **out}
        else:
            write_synthetic_h5ad(path, n, N_GENES, n_types=N_TYPES, seed=SEED, chunk_size=16_384)
            out["file_gb"] = path.stat().st_size / 1e9
            sidecar.write_text(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_mb()}))
    elif name == "preprocess":
        from masksc.data import Preprocessor
        from masksc.models import PRESETS
        p = Preprocessor(n_top_genes=PRESETS[args.preset].n_genes, chunk_size=16_384).fit(path)
        out["genes"] = len(p.genes_)
    elif name == "train":
        from masksc import pipeline
        from masksc.data import write_synthetic_h5ad
        train_path = data_path(workdir, args.train_cells)
        if not train_path.exists():
            write_synthetic_h5ad(train_path, args.train_cells, N_GENES, n_types=N_TYPES, seed=SEED)
        t = time.perf_counter()
        _, result = pipeline.fit(train_path, args.preset, model_dir=model_dir, epochs=args.train_epochs,
                                 resume=True, progress=False)  # resume: a finished model is reused
        out.update(cached=result.resumed_from_epoch == args.train_epochs, losses=result.losses)
        n = args.train_cells
    elif name == "embed":
        from masksc.pipeline import MaskSCModel
        dev = _device()
        model = MaskSCModel.load(model_dir, device=dev)
        model.embed_file(path, emb, batch_size=args.embed_batch, chunk_size=16_384, device=dev, progress=False)
        out["dim"] = model.config.embedding_dim
    elif name in ("kmeans_faiss", "kmeans_sklearn"):
        from sklearn.metrics import adjusted_rand_score as ari
        Z = np.load(emb)
        t = time.perf_counter()
        if name == "kmeans_faiss":
            from masksc.cluster import kmeans
            labels = kmeans(Z, K, seed=0, n_init=args.n_init, max_iter=args.kmeans_iters)
        else:
            from sklearn.cluster import KMeans
            labels = KMeans(K, n_init=args.n_init, max_iter=args.kmeans_iters, tol=0.0, algorithm="lloyd",
                            random_state=0).fit(Z).labels_
        seconds = time.perf_counter() - t
        np.save(workdir / f"labels_{name}_{n}.npy", labels)
        out["ari_truth"] = float(ari(_truth(path), labels))
        other = workdir / f"labels_{'kmeans_faiss' if name == 'kmeans_sklearn' else 'kmeans_sklearn'}_{n}.npy"
        if other.exists() and other.stat().st_mtime > emb.stat().st_mtime:
            out["ari_faiss_vs_sklearn"] = float(ari(np.load(other), labels))
        return {"seconds": seconds, "cells_per_s": n / seconds, "peak_rss_mb": _peak_mb(), **out}
    elif name == "knn_leiden":
        from sklearn.metrics import adjusted_rand_score as ari
        from masksc.cluster import knn_graph, leiden
        Z = np.load(emb)
        t = time.perf_counter()
        graph = knn_graph(Z, n_neighbors=15, seed=0)
        t_knn = time.perf_counter() - t
        labels = leiden(graph, resolution=1.0, seed=0)
        seconds = time.perf_counter() - t
        out.update(knn_s=t_knn, leiden_s=seconds - t_knn, n_clusters=int(len(np.unique(labels))),
                   ari_truth=float(ari(_truth(path), labels)))
        return {"seconds": seconds, "cells_per_s": n / seconds, "peak_rss_mb": _peak_mb(), **out}
    else:
        raise ValueError(f"unknown stage {name!r}")
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "cells_per_s": n / seconds, "peak_rss_mb": _peak_mb(), **out}


def run_stage(name: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--stage", name, "--n", str(n), "--workdir", args.workdir,
           "--preset", args.preset, "--train-cells", str(args.train_cells), "--train-epochs", str(args.train_epochs),
           "--n-init", str(args.n_init), "--kmeans-iters", str(args.kmeans_iters),
           "--embed-batch", str(args.embed_batch)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    row = {"n_cells": n, "stage": name, "wall_s": time.perf_counter() - t}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        row["error"] = (proc.stderr or proc.stdout)[-600:]
        print(f"  {name} n={n} FAILED:\n{row['error']}", file=sys.stderr)
        return row
    row.update(json.loads(lines[-1][len("RESULT "):]))
    return row


def _merge_previous(name: str, settings: dict, rows: list[dict]) -> list[dict]:
    """Rows of this run plus those of an earlier run with the same ``settings`` (same result file:
    device, preset, model, k-means and embedding batch) for (size, stage) pairs not measured now,
    so sizes can be run one at a time; a stage that was cached now (model, data file) keeps the
    timing measured when it really ran, unless the cached file carries the timing of the run
    that wrote it (``timed_by``). An earlier run with other settings is replaced, saying so."""
    from _common import RESULTS
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    differ = [key for key in settings if old.get(key) != settings[key]]
    if differ:
        print(f"{path}: its rows were measured with other settings ({', '.join(differ)}) and are replaced, not "
              "merged (git checkout restores committed ones; MASKSC_BENCH_RESULTS=DIR writes elsewhere)")
        return rows
    measured = {(r["n_cells"], r["stage"]): r for r in old.get("rows", []) if not r.get("cached") and "error" not in r}
    rows = [measured.get((r["n_cells"], r["stage"]), r) if r.get("cached") and not r.get("timed_by") else r
            for r in rows]  # real timings
    done = {(r["n_cells"], r["stage"]) for r in rows}
    kept = [r for r in old.get("rows", []) if (r["n_cells"], r["stage"]) not in done]
    order = {s: i for i, s in enumerate(("train", *STAGES))}
    return sorted(kept + rows, key=lambda r: (r["stage"] != "train", r["n_cells"], order.get(r["stage"], 99)))


STAGES = ("write", "preprocess", "embed", "kmeans_faiss", "kmeans_sklearn", "knn_leiden")
COLS = ["n_cells", "stage", "seconds", "cells_per_s", "peak_rss_mb", "ari_truth", "ari_faiss_vs_sklearn",
        "n_clusters", "file_gb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=[10_000, 100_000], type=positive_ints,
                    help="cells, comma-separated (add 1000000 for the 1M run)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "masksc-scale"))
    ap.add_argument("--preset", default="auto", help="auto (paper on a GPU, cpu on the CPU), cpu, paper")
    ap.add_argument("--train-cells", type=int, default=4096)
    ap.add_argument("--train-epochs", type=int, default=None,
                    help="epochs of the model's training run (default: the preset's own, 40 for cpu)")
    ap.add_argument("--n-init", type=int, default=3, help="k-means restarts (both libraries)")
    ap.add_argument("--kmeans-iters", type=int, default=20, help="Lloyd iterations (both libraries)")
    ap.add_argument("--embed-batch", type=int, default=1024)
    ap.add_argument("--stages", default=",".join(STAGES), help="subset of " + ",".join(STAGES))
    ap.add_argument("--tag", default="", help="suffix of the result name (scale<tag>.json)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.preset == "auto":
        args.preset = "paper" if _device() == "cuda" else "cpu"
    if args.train_epochs is None:
        from masksc.models import PRESETS
        args.train_epochs = PRESETS[args.preset].epochs
    if args.stage:
        print("RESULT " + json.dumps(stage(args.stage, args)), flush=True)
        return

    from _common import device_info, print_table, write_result
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = [run_stage("train", args.train_cells, args)]
    print_table(rows, ["n_cells", "stage", "seconds", "peak_rss_mb", "cached"])
    stages = [s for s in args.stages.split(",") if s]
    for n in args.sizes:
        for name in stages:
            rows.append(run_stage(name, n, args))
            print_table(rows[-1:], COLS)
    settings = {"device": device_info(_device())["device"], "preset": args.preset,
                "model": f"{args.preset} preset trained {args.train_epochs} epochs on the first {args.train_cells} "
                         "cells (pipeline.fit, streamed, teacher with default settings)",
                "preset_config": _preset_hash(args.preset),  # the preset's fields change between releases
                "kmeans": {"n_init": args.n_init, "max_iter": args.kmeans_iters}, "embed_batch": args.embed_batch}
    rows = _merge_previous(f"scale{args.tag}", settings, rows)
    print()
    print_table(rows, COLS)
    path = write_result(f"scale{args.tag}", {
        **device_info(_device()), **settings, "n_genes": N_GENES, "n_types": N_TYPES, "k": K, "chunk_size": 16_384,
        "workdir": args.workdir, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
