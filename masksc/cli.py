"""The ``masksc`` command: fit, embed, cluster, evaluate, demo.

Every command reads its input, never modifies it, and writes outputs atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from masksc.errors import MaskscError

log = logging.getLogger("masksc")


def _grid(text: str) -> tuple[int, int]:
    try:
        g, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 48x48, got {text!r}") from None
    return g, s


def _read(args):
    from masksc.data import read
    return read(args.data, format=args.format, transpose=args.transpose)


def _write_h5ad(adata, path) -> Path:
    from masksc.io_utils import atomic_write
    path = Path(path)
    if path.suffix != ".h5ad":
        raise MaskscError(f"output {path} must end in .h5ad; fix: pass -o NAME.h5ad.")
    with atomic_write(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return path


def _print_metrics(scores: dict) -> None:
    print("  ".join(f"{k.upper()} {v:.4f}" for k, v in scores.items() if v is not None))


def cmd_fit(args) -> int:
    from masksc import tl
    adata = _read(args)
    overrides = {}
    if args.grid:
        overrides["grid_shape"] = args.grid
    for key in ("mask_ratio", "layout"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    model = tl.fit(adata, args.preset, model_dir=args.output, epochs=args.epochs, seed=args.seed,
                   device=args.device, resume=args.resume, checkpoint_every=args.checkpoint_every, **overrides)
    print(f"model written to {model.path}")
    return 0


def cmd_embed(args) -> int:
    from masksc import tl
    adata = _read(args)
    tl.embed(adata, args.model, batch_size=args.batch_size, device=args.device)
    print(f"embedding {adata.obsm['X_masksc'].shape} written to {_write_h5ad(adata, args.output)}")
    return 0


def _read_h5ad(path):
    from masksc.data import read
    return read(path, format="h5ad")


def cmd_cluster(args) -> int:
    from masksc import tl
    adata = _read_h5ad(args.data)
    tl.cluster(adata, k=args.k, seed=args.seed)
    n = adata.obs["masksc_cluster"].nunique()
    print(f"{n} clusters written to {_write_h5ad(adata, args.output)}")
    return 0


def cmd_evaluate(args) -> int:
    from masksc import tl
    adata = _read_h5ad(args.data)
    scores = tl.evaluate(adata, label_key=args.label_key)
    _print_metrics(scores)
    if args.json:
        from masksc.io_utils import atomic_write
        with atomic_write(args.json) as tmp:
            tmp.write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def cmd_demo(args) -> int:
    from masksc.demo import run_demo
    run_demo(args.output, epochs=args.epochs, seed=args.seed, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``masksc`` command."""
    p = argparse.ArgumentParser(prog="masksc", description="Masked expression modeling (mask-sc) for "
                                "single-cell RNA-seq: learn cell embeddings and cluster cells.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(sp):
        sp.add_argument("data", help="counts: .h5ad, 10x .h5, 10x mtx folder, csv/tsv, scDeepCluster .h5")
        sp.add_argument("--format", default=None, help="force the reader (default: detect)")
        sp.add_argument("--transpose", action="store_true", help="csv/tsv is genes x cells")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")

    sp = sub.add_parser("fit", help="train a mask-sc model on a dataset")
    data_args(sp)
    sp.add_argument("-o", "--output", required=True, help="model directory (checkpoints, config.json)")
    sp.add_argument("--preset", default="cpu", help="paper | cpu | demo (default cpu)")
    sp.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    sp.add_argument("--grid", type=_grid, default=None, help="gene grid, e.g. 48x48")
    sp.add_argument("--mask-ratio", dest="mask_ratio", type=float, default=None)
    sp.add_argument("--layout", choices=["hvg", "correlation"], default=None, help="gene order in the grid")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=None, help="epochs")
    sp.add_argument("--resume", action="store_true", help="continue the run in --output")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("embed", help="embed cells with a trained model -> .h5ad with obsm['X_masksc']")
    data_args(sp)
    sp.add_argument("--model", required=True, help="model directory written by `masksc fit`")
    sp.add_argument("-o", "--output", required=True, help="output .h5ad")
    sp.add_argument("--batch-size", dest="batch_size", type=int, default=1024)
    sp.set_defaults(func=cmd_embed)

    sp = sub.add_parser("cluster", help="cluster an embedded .h5ad -> obs['masksc_cluster']")
    sp.add_argument("data", help=".h5ad written by `masksc embed`")
    sp.add_argument("-k", type=int, default=None, help="number of clusters (k-means); omit for Leiden")
    sp.add_argument("-o", "--output", required=True, help="output .h5ad (the input is never modified)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_cluster)

    sp = sub.add_parser("evaluate", help="ARI / NMI against labels and silhouette of a clustered .h5ad")
    sp.add_argument("data", help=".h5ad written by `masksc cluster`")
    sp.add_argument("--label-key", dest="label_key", default="label", help="obs column of true labels")
    sp.add_argument("--json", default=None, help="also write the scores to this JSON file")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("demo", help="train on scanpy's bundled pbmc68k_reduced, cluster, score, plot")
    sp.add_argument("-o", "--output", default="masksc-demo", help="output folder (default ./masksc-demo)")
    sp.add_argument("--epochs", type=int, default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--device", default=None)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``masksc`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.time()
    try:
        code = args.func(args)
    except (MaskscError, FileNotFoundError) as exc:
        print(f"masksc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    log.info("%s finished in %.1fs", args.command, time.time() - t0)
    return code


if __name__ == "__main__":
    sys.exit(main())
