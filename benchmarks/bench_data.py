"""Data-layer throughput and peak memory: synthetic write, read, preprocess (in memory and streamed).

Usage: python benchmarks/bench_data.py [--n-cells 100000] [--n-genes 4096] [--workdir DIR]

The synthetic .h5ad is written once to --workdir (default ~/.cache/masksc-bench, outside the
repo) and reused. Each phase runs in its own subprocess so its peak RSS (ru_maxrss) is its own;
``rss_base_mb`` is the RSS after imports (numpy, scanpy, torch...), ``rss_peak_mb`` the peak.
Prints a table and writes benchmarks/results/bench_data.json.
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


def _rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase(name: str, path: Path, args) -> dict:
    """Run one phase in this process and return its measurements."""
    from masksc.data import Preprocessor, read, write_synthetic_h5ad

    base = _rss_mb()
    t = time.perf_counter()
    out = {}
    if name == "write_synthetic":
        write_synthetic_h5ad(path, args.n_cells, args.n_genes, n_types=10, seed=0, chunk_size=args.chunk_size)
        out["file_gb"] = path.stat().st_size / 1e9
    elif name == "read_in_memory":
        a = read(path)
        out["nnz"] = int(a.X.nnz)
    elif name == "preprocess_in_memory":
        a = read(path)
        p = Preprocessor(n_top_genes=args.n_top_genes)  # default chunking of the in-memory matrix
        out["nnz_out"] = int(p.fit_transform(a).X.nnz)
    elif name == "preprocess_streaming":
        p = Preprocessor(n_top_genes=args.n_top_genes, chunk_size=args.chunk_size).fit(path)
        out["nnz_out"] = sum(int(X.nnz) for _, _, X in p.transform_chunks(path))
    else:
        raise SystemExit(f"unknown phase {name}")
    dt = time.perf_counter() - t
    return {"phase": name, "seconds": dt, "cells_per_s": args.n_cells / dt, "rss_base_mb": base,
            "rss_peak_mb": _peak_mb(), **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=100_000)
    ap.add_argument("--n-genes", type=int, default=4096)
    ap.add_argument("--n-top-genes", type=int, default=2048)
    ap.add_argument("--chunk-size", type=int, default=16_384)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "masksc-bench")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = args.workdir / f"synthetic_{args.n_cells}x{args.n_genes}_seed0.h5ad"
    if args.phase:
        print(json.dumps(phase(args.phase, path, args)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import device_info, print_table, write_result

    phases = ["read_in_memory", "preprocess_in_memory", "preprocess_streaming"]
    sidecar = path.with_suffix(".write.json")  # the write measurement, kept with the cached file
    rows = []
    if path.exists() and sidecar.exists():
        rows.append({**json.loads(sidecar.read_text()), "cached": True})
    else:
        phases.insert(0, "write_synthetic")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in phases:
        cmd = [sys.executable, __file__, "--phase", name, "--n-cells", str(args.n_cells), "--n-genes",
               str(args.n_genes), "--n-top-genes", str(args.n_top_genes), "--chunk-size", str(args.chunk_size),
               "--workdir", str(args.workdir)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if res.returncode:
            sys.exit(f"phase {name} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        if name == "write_synthetic":
            sidecar.write_text(json.dumps(rows[-1]))
        print(f"done {name}: {rows[-1]['seconds']:.1f}s", file=sys.stderr)
    print_table(rows, ["phase", "seconds", "cells_per_s", "rss_base_mb", "rss_peak_mb"])
    out = write_result("bench_data", {**device_info("cpu"), "n_cells": args.n_cells, "n_genes": args.n_genes,
                                      "n_top_genes": args.n_top_genes, "chunk_size": args.chunk_size,
                                      "file": str(path), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
