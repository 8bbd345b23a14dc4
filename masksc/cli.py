"""The ``masksc`` command: fit, embed, cluster, evaluate, plot, demo.

Every command reads its input, never modifies it, and writes outputs atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from masksc import __version__, progress
from masksc.cluster import LEIDEN_RESOLUTION, N_NEIGHBORS
from masksc.data.io import FORMATS
from masksc.errors import DataError, MaskscError, UncheckedGenesWarning, counted
from masksc.io_utils import nearest_existing, out_of_space
from masksc.models import PRESETS
from masksc.models.masksc_model import POOLS

log = logging.getLogger("masksc")


def _integer(text: str) -> int:
    """``text`` as an int, or the argparse error every integer option gives."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs an integer, got {text!r}") from None


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        value = _integer(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _sample_size(text: str) -> int:
    """An argparse type: a silhouette sample, 0 (all cells) or at least 3 cells."""
    value = _at_least(0)(text)
    if value in (1, 2):
        raise argparse.ArgumentTypeError(f"must be 0 (all cells) or at least 3 (a silhouette needs 2 clusters and a "
                                         f"cell more), got {value}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed, an integer ``checks.check_seed`` takes (in [0, 2**63 - 1])."""
    from masksc.checks import check_seed
    value = _integer(text)
    try:
        return check_seed(value)
    except DataError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1], got {value}") from None


def _map_seed(text: str) -> int:
    """An argparse type: a seed UMAP, t-SNE and sklearn's PCA take too (in [0, 2**32 - 1])."""
    from masksc.checks import is_map_seed
    value = _integer(text)
    if not is_map_seed(value):
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32 - 1] (the most UMAP and PCA take), "
                                         f"got {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _grid(text: str) -> tuple[int, int]:
    try:
        g, s = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 48x48, got {text!r}") from None
    return g, s


def _input_format(args) -> tuple[Path, str]:
    """The input file of fit/embed/plot attention (MaskscError when it is missing) and its format:
    --format, else detected from the file. --layer / --use-raw on a file that is not an .h5ad and
    --genome on one that is not a 10x .h5 are refused (each reads a part only that format has)."""
    from masksc.data.io import detect_format
    path = Path(args.data)
    if not path.exists():
        raise MaskscError(f"file not found: {path}; fix: check the path.")
    fmt = args.format or detect_format(path)
    for flag, given, part_of in (("--layer", args.layer is not None, "h5ad"), ("--use-raw", args.use_raw, "h5ad"),
                                 ("--genome", args.genome is not None, "10x_h5")):
        if given and fmt != part_of:
            raise MaskscError(f"{flag} reads a part of {'an .h5ad' if part_of == 'h5ad' else 'a 10x .h5'}, and "
                              f"{path} is a {fmt} file, which has none; fix: drop {flag}.")
    return path, fmt


def _source(args):
    """The input of fit/embed: the path itself when it is an .h5ad or 10x .h5 (the streaming reader
    reads those it cannot stream into memory: a CSC X, a Cell Ranger v2 file, saying so), else the
    file read into memory (mtx, csv/tsv, scDeepCluster .h5, what only --format places, or one
    --genome of a 10x .h5)."""
    from masksc.data import read
    path, fmt = _input_format(args)
    if args.genome is not None:
        log.info("%s: reading genome %s into memory", path, args.genome)
        return read(path, format=fmt, transpose=args.transpose, genome=args.genome)
    if fmt in ("h5ad", "10x_h5") and not args.transpose and (args.format is None or _detects_as(path, fmt)):
        return path
    unused = "--chunk-size and --teacher-cells do not apply" if args.command == "fit" else "--chunk-size does not apply"
    log.info("%s: a %s file cannot be streamed by cells; reading it into memory (%s; an .h5ad or 10x .h5 copy "
             "would stream)", path, fmt, unused)
    return read(path, format=fmt, transpose=args.transpose)


def _detects_as(path: Path, fmt: str) -> bool:
    """Whether ``path`` is recognised as ``fmt`` without --format (the streaming readers detect
    the format again; a file --format had to name is read into memory instead)."""
    from masksc.data.io import detect_format
    try:
        return detect_format(path) == fmt
    except DataError:
        return False


def _device(name):
    """The torch.device ``--device`` names; MaskscError before any work when it is unusable here."""
    from masksc.train import resolve_device
    try:
        return resolve_device(name)
    except ValueError as exc:
        raise MaskscError(str(exc)) from exc


def _check_backend() -> None:
    """MaskscError before any work when ``MASKSC_BACKEND`` holds no backend's name."""
    from masksc.ops import forced_backend
    try:
        forced_backend()
    except ValueError as exc:
        raise MaskscError(str(exc)) from exc


def _write_h5ad(adata, path, overwrite: bool) -> Path:
    from masksc.io_utils import anndata_bytes, atomic_write
    with atomic_write(path, suffix=".h5ad", min_bytes=anndata_bytes(adata), replace=overwrite) as tmp:
        adata.write_h5ad(tmp)
    return path


def _print_metrics(scores: dict) -> None:
    print("  ".join(f"{k.upper()} {v}" if isinstance(v, int) else f"{k.upper()} {v:.4f}"
                    for k, v in scores.items() if v is not None))


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"needs KEY=VALUE (a config field and its value), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        pass
    if "," in value:  # grid_shape=16,16 or betas=0.9,0.95: the list without brackets
        try:
            return key, json.loads(f"[{value}]")
        except json.JSONDecodeError:
            pass
    return key, value


def _overrides(args) -> dict:
    """The MaskSCConfig fields ``fit``'s --set and its own flags set (epochs among them)."""
    overrides = {}
    for key, value in args.set or []:
        if key in overrides:
            raise MaskscError(f"--set {key}= is given twice; fix: keep one of them.")
        overrides[key] = tuple(value) if isinstance(value, list) else value
    flags = {"grid_shape": ("--grid", args.grid), "epochs": ("--epochs", args.epochs),
             **{key: ("--" + key.replace("_", "-"), getattr(args, key))
                for key in ("mask_ratio", "layout", "batch_size")}}
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        if key in overrides:
            raise MaskscError(f"{key} is given twice, by --set {key}= and by {flag}; fix: drop one of them.")
        overrides[key] = value
    from masksc.models.masksc_model import MaskSCConfig
    unknown = set(overrides) - {f.name for f in dataclasses.fields(MaskSCConfig)}
    if unknown:
        raise MaskscError(f"unknown config field(s) {sorted(unknown)} in --set; fix: use MaskSCConfig fields, "
                          "e.g. --set embed_dim=64 --set depth=2.")
    return overrides


def cmd_fit(args) -> int:
    """Train from a file, streamed from disk (.h5ad / 10x .h5; other formats are read into memory),
    on one process or, under torchrun, with DDP over all ranks."""
    from masksc import distributed, pipeline
    from masksc.train import holding_run_dir
    overrides = _overrides(args)
    settings = dict(model_dir=args.output, epochs=overrides.pop("epochs", None), seed=args.seed, device=args.device,
                    resume=args.resume, checkpoint_every=args.checkpoint_every, chunk_size=args.chunk_size,
                    teacher_cells=args.teacher_cells or None, teacher_overrides=dict(args.teacher_set or []),
                    **overrides)
    _device(args.device)
    try:  # settings out of range, or a run that cannot resume with them, are refused before reading the data
        pipeline.check_fit(args.preset, layer=args.layer, use_raw=args.use_raw, **settings)
        ctx = distributed.init_from_env(args.device)
        with holding_run_dir(args.output, ctx):  # before a csv or mtx is read into memory
            with ctx.together():  # a file one rank cannot read stops them all
                source = _source(args)
            model, result = pipeline.fit(source, args.preset, min_cells=args.min_cells, dist=ctx, layer=args.layer,
                                         use_raw=args.use_raw, **settings)
    except ValueError as exc:
        raise MaskscError(str(exc)) from exc
    if ctx.is_main:
        done = "nothing trained: the run had finished; its model is in" if result.resumed_from_epoch == result.epochs \
            else "model written to"
        print(f"{done} {args.output} (last checkpoint {Path(model.path).name}, final loss "
              f"{result.losses[-1]:.4f}, {ctx.world_size} process(es)); use it as --model {args.output}")
    return 0


def cmd_embed(args) -> int:
    """Stream the cells through the model chunk by chunk into OUT.h5ad (obs + obsm['X_masksc'], no X)
    or OUT.npy; sharded over the ranks under torchrun. A streamable input is never loaded whole (see
    _source); the output records the input file as its source."""
    from masksc import distributed
    from masksc.io_utils import check_output
    from masksc.outofcore import EMBED_SUFFIXES
    from masksc.pipeline import MaskSCModel
    device = _device(args.device)
    check_output(args.output, args.data, suffixes=EMBED_SUFFIXES, overwrite=args.overwrite)
    ctx = distributed.init_from_env(args.device)
    if ctx.distributed:
        device = ctx.device
    with ctx.together():  # a model or file one rank cannot read stops them all
        model = MaskSCModel.load(args.model, device=device)
        if args.pool:
            try:
                model.set_pool(args.pool)
            except ValueError as exc:
                raise MaskscError(f"--pool {args.pool}: {exc}") from exc
        source = _source(args)
    out = model.embed_file(source, args.output, batch_size=args.batch_size, chunk_size=args.chunk_size,
                           device=device, dist=ctx, layer=args.layer, use_raw=args.use_raw, source_path=args.data,
                           overwrite=args.overwrite)
    if ctx.is_main:
        print(f"embedding of {model.config.embedding_dim} dims written to {out}")
    return 0


def _read_h5ad(path, backed: bool = False):
    """An embedded .h5ad (from `masksc embed`, which stores obs + obsm but no X); ``backed``: its
    expression left on disk (the caller closes ``adata.file``)."""
    import anndata as ad
    path = Path(path)
    if path.is_dir():
        raise MaskscError(f"{path} is a folder; fix: pass the .h5ad file written by `masksc embed`.")
    if not path.is_file():
        raise MaskscError(f"file not found: {path}; fix: pass the .h5ad written by `masksc embed`.")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001 - h5py and anndata fail on a foreign file in many ways
        raise MaskscError(f"cannot read {path} as .h5ad ({type(exc).__name__}: {exc}); fix: pass the .h5ad file "
                          "`masksc embed` wrote (a counts file goes to `masksc embed` first).") from exc


def cmd_cluster(args) -> int:
    from masksc import tl
    from masksc.io_utils import check_output
    output = check_output(args.output, args.data, suffixes=(".h5ad",), overwrite=args.overwrite)
    adata = _read_h5ad(args.data)
    given = [flag for flag, value in (("--n-neighbors", args.n_neighbors), ("--resolution", args.resolution))
             if value is not None]
    if args.k is not None and given:
        raise MaskscError(f"{' and '.join(given)} set Leiden's graph and clusters, but -k {args.k} clusters with "
                          "k-means; fix: drop them, or drop -k to cluster with Leiden.")
    leiden = {} if args.k is not None else {  # the graph --help describes, not one stored of another kind
        "n_neighbors": args.n_neighbors or N_NEIGHBORS, "metric": "euclidean",
        "resolution": args.resolution or LEIDEN_RESOLUTION}
    tl.cluster(adata, k=args.k, seed=args.seed, use_rep=args.use_rep, key_added=args.key_added, **leiden)
    written = _write_h5ad(adata, output, args.overwrite)
    print(f"{counted(adata.obs[args.key_added].nunique(), 'cluster')} written to obs[{args.key_added!r}] of {written}")
    return 0


def cmd_evaluate(args) -> int:
    from masksc import tl
    from masksc.io_utils import atomic_write, check_output
    if args.json:
        check_output(args.json, args.data, suffixes=(".json",), overwrite=args.overwrite, flag="--json")
    adata = _read_h5ad(args.data)
    scores = tl.evaluate(adata, label_key=args.label_key, cluster_key=args.cluster_key, use_rep=args.use_rep,
                         silhouette_sample=args.silhouette_cells or None, seed=args.seed)
    if args.json:  # before printing: a reader gone from the pipe (`| head`) does not cost the file
        sample = {key: adata.uns["masksc"]["metrics"][key] for key in ("silhouette_cells", "silhouette_seed")}
        with atomic_write(args.json, replace=args.overwrite) as tmp:
            tmp.write_text(json.dumps({**scores, **sample}, indent=2) + "\n")
    _print_metrics(scores)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _cells_to_draw(args, model):
    """The few cells ``plot attention`` draws, in memory: one per label of ``--label-key`` when the
    data has that column, else ``--cells`` random ones; an .h5ad is opened backed, so only they
    (and, for genes without names, the first cells, which ``model`` checks them on as ``embed``
    does: the few drawn are too few to tell) are read. Returns (AnnData of those cells, panel
    titles, their int64 rows in the file, which errors name)."""
    import anndata as ad
    import numpy as np

    from masksc.data import read
    from masksc.outofcore import RowReader, check_first_cells
    from masksc.pl import one_cell_per_label
    path, fmt = _input_format(args)
    if fmt == "h5ad":
        try:
            has_x = _h5ad_has_x(path, args)
            # backed, only the drawn cells are read; anndata cannot take them into memory from a file without X
            adata = ad.read_h5ad(path, backed="r") if has_x else ad.read_h5ad(path)
        except (OSError, KeyError, ValueError, TypeError) as exc:  # what h5py and anndata raise on a foreign file
            raise MaskscError(f"cannot read {path} as .h5ad ({type(exc).__name__}: {exc}); fix: check the file is "
                              "complete and an .h5ad, or pass --format for another format.") from exc
    else:
        adata = read(path, format=fmt, transpose=args.transpose, genome=args.genome)
    if model.preprocessor.needs_profile_check():
        with model.noting_fitted_input(args.layer, args.use_raw):
            reader = RowReader(adata, args.layer, args.use_raw)
            check_first_cells(model.preprocessor, reader, 0, reader.n_obs)
    label_key = args.label_key or "label"  # not given: one cell per label when the data has labels
    if args.label_key is not None and (label_key not in adata.obs or adata.obs[label_key].isna().all()):
        without = ("to draw one cell per 'label'" if "label" in adata.obs and label_key != "label" else
                   "to draw --cells random cells")
        problem = (f"{path} has no obs column {label_key!r}" if label_key not in adata.obs else
                   f"no cell of {path} has a {label_key!r} label")
        raise MaskscError(f"{problem} (--label-key); fix: pass one of {list(adata.obs.columns)}, or drop --label-key "
                          f"{without}.")
    if label_key in adata.obs and adata.obs[label_key].notna().any():
        labels = adata.obs[label_key]
        every_label = one_cell_per_label(labels, args.seed)  # counted as the legend counts them
        n_labels, picks = every_label.size, every_label[:args.cells]
        if n_labels > args.cells:
            warnings.warn(f"{label_key!r} holds {n_labels} labels; drawing a cell of each of the first "
                          f"{args.cells} in the legend's order (--cells {n_labels} draws them all)", stacklevel=2)
        # the label and the cell drawn; not to_numpy(): NaN makes integer categories 2.0
        titles = [f"{label}\n{name}" for label, name in zip(labels.iloc[picks], adata.obs_names[picks])]
    else:
        picks = np.sort(np.random.default_rng(args.seed).choice(adata.n_obs, min(args.cells, adata.n_obs),
                                                                 replace=False))
        titles = [name if name.lower().startswith("cell") else f"cell {name}" for name in adata.obs_names[picks]]
    cells = adata[picks]
    return (cells.to_memory() if adata.isbacked else cells.copy()), titles, picks


def _h5ad_has_x(path: Path, args) -> bool:
    """Whether the .h5ad at ``path`` holds X; MaskscError when it holds neither X nor what
    --layer / --use-raw read instead."""
    import h5py
    with h5py.File(path, "r") as f:
        layers = list(f["layers"]) if "layers" in f else []
        if "X" not in f and args.layer is None and not args.use_raw:  # read backed, it would fail later, on the
            # cells' X, as a raw h5py KeyError
            raise MaskscError(f"{path} holds no expression matrix X, only the layers {layers}; fix: --layer "
                              f"{layers[0]}." if layers else
                              f"{path} holds no expression matrix X (a `masksc embed` output stores only obs "
                              "and the embedding); fix: pass the counts file the model was fitted on.")
        return "X" in f


def cmd_plot(args) -> int:
    """Draw one PNG: the 2-D map of an embedded .h5ad coloured by its clusters and labels (paper
    Fig. 4), a fit's training loss per epoch, or the last encoder block's attention over the gene
    grid for one cell per label (paper Fig. 6)."""
    from masksc import pl
    from masksc.io_utils import check_output
    output = check_output(args.output, args.data, suffixes=(".png",), overwrite=args.overwrite)
    if args.kind == "embedding":
        adata = _read_h5ad(args.data, backed=True)  # the expression stays on disk unless a gene is coloured
        if args.use_rep not in adata.obsm and f"X_{args.use_rep}" not in adata.obsm:
            adata.file.close()
            held = (f"its obsm: {list(adata.obsm)}", ", or pass --use-rep one of those") if len(adata.obsm) else \
                ("its obsm is empty", "")
            raise MaskscError(f"{args.data} has no obsm[{args.use_rep!r}] ({held[0]}); fix: `masksc embed` the counts "
                              f"first{held[1]}.")
        try:
            out = pl.embedding(adata, args.color, output, method=args.method, basis=args.use_rep, seed=args.seed,
                               max_cells=args.max_cells, layer=args.layer, use_raw=args.use_raw,
                               overwrite=args.overwrite)
        finally:
            adata.file.close()
    elif args.kind == "loss":
        out = pl.loss_curve(args.data, output, overwrite=args.overwrite)
    else:
        from masksc.pipeline import MaskSCModel
        device = _device(args.device)
        model = MaskSCModel.load(args.model, device=device)
        cells, titles, rows = _cells_to_draw(args, model)
        with warnings.catch_warnings():  # the file's first cells were checked (or their too few flagged)
            warnings.simplefilter("ignore", UncheckedGenesWarning)
            maps = model.attention_maps(cells, layer=args.layer, use_raw=args.use_raw, rows=rows)
        out = pl.attention_grid(maps, titles, output, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from masksc.demo import run_demo
    _device(args.device)
    run_demo(args.output, epochs=args.epochs, seed=args.seed, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``masksc`` command."""
    p = argparse.ArgumentParser(prog="masksc", description="Masked expression modeling (mask-sc) for "
                                "single-cell RNA-seq: learn cell embeddings and cluster cells.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log masksc's debug messages and show tracebacks (also taken after COMMAND)")
    p.add_argument("--version", action="version", version=f"masksc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(sp):
        sp.add_argument("data", help="counts: .h5ad, 10x .h5, 10x mtx folder, csv/tsv, scDeepCluster .h5")
        sp.add_argument("--format", default=None, choices=FORMATS, help="force the reader (default: detect)")
        sp.add_argument("--transpose", action="store_true", help="csv/tsv is genes x cells")
        sp.add_argument("--layer", default=None,
                        help="read this layer of an .h5ad (e.g. counts) instead of X; embed with the layer fit used")
        sp.add_argument("--use-raw", dest="use_raw", action="store_true",
                        help="read the .h5ad's .raw (log values beside scaled X, scanpy's layout) instead of X; "
                             "embed with it too")
        sp.add_argument("--genome", default=None,
                        help="read this genome of a 10x .h5 holding several (read into memory)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")

    def overwrite_arg(sp, output="-o"):
        sp.add_argument("--overwrite", action="store_true",
                        help=f"replace the {output} file if it exists (refused by default)")

    sp = sub.add_parser("fit", help="train a mask-sc model on a dataset (streamed from disk; torchrun for DDP)")
    data_args(sp)
    sp.add_argument("-o", "--output", required=True, help="model directory (checkpoints, config.json)")
    sp.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="recipe (default cpu)")
    sp.add_argument("--epochs", type=_at_least(1), default=None, help="override the preset's epochs")
    sp.add_argument("--grid", type=_grid, default=None, help="gene grid, e.g. 48x48 (default: the preset's)")
    sp.add_argument("--mask-ratio", dest="mask_ratio", type=float, default=None,
                    help="share of the gene tokens hidden per cell, in (0, 1) (default: the preset's)")
    sp.add_argument("--layout", choices=["hvg", "correlation"], default=None,
                    help="gene order in the grid (default: the preset's)")
    sp.add_argument("--batch-size", dest="batch_size", type=_at_least(1), default=None,
                    help="cells per step (per process; default: the preset's)")
    sp.add_argument("--set", action="append", type=_override, metavar="KEY=VALUE",
                    help="override any preset field, e.g. --set embed_dim=64 --set depth=2 (repeatable)")
    sp.add_argument("--seed", type=_seed, default=0,
                    help="seed of the teacher, the model and the batches (default 0)")
    sp.add_argument("--checkpoint-every", dest="checkpoint_every", type=_at_least(1), default=None,
                    help="save a checkpoint every this many epochs (default 5; the last epoch is always saved)")
    sp.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    sp.add_argument("--chunk-size", dest="chunk_size", type=_at_least(1), default=4096,
                    help="cells read from disk at a time (memory bound; default 4096); .h5ad and 10x .h5 only "
                         "(csv, mtx and scDeepCluster .h5 are read into memory)")
    sp.add_argument("--teacher-cells", dest="teacher_cells", type=_at_least(0), default=50_000,
                    help="seeded subsample the teacher and grid layout are fitted on (0 = all cells, else at least 20; "
                         "default 50000); .h5ad and 10x .h5 only (other formats use all cells)")
    sp.add_argument("--teacher-set", dest="teacher_set", action="append", type=_override, metavar="KEY=VALUE",
                    help="override a contrastive-sc teacher setting (its authors' by default), e.g. "
                         "--teacher-set epochs=5 --teacher-set temperature=0.5 (repeatable)")
    sp.add_argument("--min-cells", dest="min_cells", type=_at_least(0), default=3,
                    help="an HVG candidate must be detected in this many cells (default 3, as scanpy's filter_genes)")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("embed", help="embed cells with a trained model -> .h5ad (obs + obsm['X_masksc']) or .npy")
    data_args(sp)
    sp.add_argument("--model", required=True, help="model directory written by `masksc fit`")
    sp.add_argument("-o", "--output", required=True, help="output .h5ad (obs + obsm['X_masksc'], no X) or .npy")
    overwrite_arg(sp)
    sp.add_argument("--batch-size", dest="batch_size", type=_at_least(1), default=1024,
                    help="cells per forward pass (default 1024)")
    sp.add_argument("--chunk-size", dest="chunk_size", type=_at_least(1), default=16_384,
                    help="cells read from disk at a time (memory bound; default 16384)")
    sp.add_argument("--pool", default=None, choices=POOLS,
                    help="read-out, default the model's own: mean (of the encoded tokens), cls (the global "
                         "token) or target (the predicted teacher feature)")
    sp.set_defaults(func=cmd_embed)

    sp = sub.add_parser("cluster", help="cluster an embedded .h5ad -> obs['masksc_cluster']")
    sp.add_argument("data", help=".h5ad written by `masksc embed`")
    sp.add_argument("-k", type=_at_least(1), default=None, help="number of clusters (k-means); omit for Leiden")
    sp.add_argument("-o", "--output", required=True, help="output .h5ad (the input is never modified)")
    overwrite_arg(sp)
    sp.add_argument("--seed", type=_seed, default=0, help="seed of k-means / Leiden (default 0)")
    sp.add_argument("--n-neighbors", dest="n_neighbors", type=_at_least(2), default=None,
                    help=f"Leiden (no -k): neighbours per cell in the kNN graph (default {N_NEIGHBORS})")
    sp.add_argument("--resolution", type=_positive_float, default=None,
                    help=f"Leiden (no -k): higher gives more, smaller clusters (default {LEIDEN_RESOLUTION})")
    sp.add_argument("--use-rep", dest="use_rep", default="X_masksc", help="obsm key to cluster (default X_masksc)")
    sp.add_argument("--key-added", dest="key_added", default="masksc_cluster",
                    help="obs column the clusters go to (default masksc_cluster)")
    sp.set_defaults(func=cmd_cluster)

    sp = sub.add_parser("evaluate", help="ARI / NMI against labels and silhouette of a clustered .h5ad")
    sp.add_argument("data", help=".h5ad written by `masksc cluster`")
    labels = sp.add_mutually_exclusive_group()
    labels.add_argument("--label-key", dest="label_key", default="label",
                        help="obs column of true labels (default label)")
    labels.add_argument("--no-labels", dest="label_key", action="store_const", const=None,
                        help="silhouette only (data without labels)")
    sp.add_argument("--cluster-key", dest="cluster_key", default="masksc_cluster",
                    help="obs column of the clusters scored (default masksc_cluster)")
    sp.add_argument("--use-rep", dest="use_rep", default="X_masksc",
                    help="obsm key the silhouette is computed on (default X_masksc)")
    sp.add_argument("--silhouette-cells", dest="silhouette_cells", type=_sample_size, default=10_000,
                    help="the silhouette is computed on a random sample of this many cells when there are more "
                         "(default 10000, at least 3 and best far more than the clusters; 0 = all cells, whose "
                         "cost grows with the square of their number)")
    sp.add_argument("--seed", type=_seed, default=0, help="seed of the silhouette's sample (default 0)")
    sp.add_argument("--json", default=None, help="also write the scores to this .json file")
    overwrite_arg(sp, "--json")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("plot", help="draw a PNG: an embedding's map, a fit's loss, or attention over the gene grid")
    kinds = sp.add_subparsers(dest="kind", required=True, metavar="KIND")
    kp = kinds.add_parser("embedding", help="UMAP / t-SNE of an embedded .h5ad, one panel per colouring")
    kp.add_argument("data", help=".h5ad written by `masksc embed` or `masksc cluster` (or any .h5ad with the "
                                 "embedding in obsm)")
    kp.add_argument("--color", action="append", default=None, metavar="KEY",
                    help="obs column, or gene of an .h5ad that holds expression, to colour by (repeatable; "
                         "default: the clusters and the label column)")
    kp.add_argument("--method", choices=("umap", "tsne"), default="umap", help="2-D map (default umap)")
    kp.add_argument("--use-rep", dest="use_rep", default="X_masksc",
                    help="obsm key to map (default X_masksc; a 2-D one such as X_umap is drawn as it is)")
    kp.add_argument("--max-cells", dest="max_cells", type=_at_least(2), default=50_000,
                    help="map a random sample of this many cells when there are more (default 50000)")
    kp.add_argument("--seed", type=_map_seed, default=0,
                    help="seed of the map and the sample (default 0; at most 2**32 - 1)")
    kp.add_argument("--layer", default=None,
                    help="read --color genes from this layer (default: .raw when the file has one, else X)")
    kp.add_argument("--use-raw", dest="use_raw", action=argparse.BooleanOptionalAction, default=None,
                    help="read --color genes from .raw, or with --no-use-raw from X (default: .raw when the file "
                         "has one and no --layer is given, as scanpy does)")
    kp = kinds.add_parser("loss", help="training loss per epoch of a fit")
    kp.add_argument("data", metavar="MODEL_DIR", help="the directory `masksc fit -o` wrote (or one of its checkpoints)")
    kp = kinds.add_parser("attention", help="last-layer attention of the global token over the gene grid, "
                                            "one panel per cell (one cell per label)")
    kp.add_argument("data", help="counts: .h5ad (read backed: only the drawn cells are loaded), 10x .h5, mtx, "
                                 "csv/tsv, scDeepCluster .h5")
    kp.add_argument("--model", required=True, help="the directory `masksc fit -o` wrote")
    kp.add_argument("--label-key", dest="label_key", default=None,
                    help="obs column whose labels get one cell each (default: label, when the data has it; "
                         "else --cells random cells)")
    kp.add_argument("--cells", type=_at_least(1), default=8, help="most panels to draw (default 8)")
    kp.add_argument("--seed", type=_seed, default=0, help="seed of the cells picked (default 0)")
    kp.add_argument("--format", default=None, choices=FORMATS, help="force the reader (default: detect)")
    kp.add_argument("--transpose", action="store_true", help="csv/tsv is genes x cells")
    kp.add_argument("--layer", default=None, help="read this layer of an .h5ad (the one fit used)")
    kp.add_argument("--use-raw", dest="use_raw", action="store_true", help="read the .h5ad's .raw (as fit did)")
    kp.add_argument("--genome", default=None, help="read this genome of a 10x .h5 holding several")
    kp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    for kp in kinds.choices.values():
        kp.add_argument("-o", "--output", required=True, help="output .png")
        overwrite_arg(kp)
    sp.set_defaults(func=cmd_plot)

    sp = sub.add_parser("demo", help="train on scanpy's bundled pbmc68k_reduced, cluster, score, plot")
    sp.add_argument("-o", "--output", default="masksc-demo", help="output folder (default ./masksc-demo)")
    sp.add_argument("--epochs", type=_at_least(1), default=None, help="override the demo preset's epochs")
    sp.add_argument("--seed", type=_map_seed, default=0,
                    help="seed of training, clustering and the maps (default 0; at most 2**32 - 1)")
    sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    sp.set_defaults(func=cmd_demo)
    for name, command in sub.choices.items():  # each command's own parser reports its stray arguments
        for leaf in (kinds.choices.values() if name == "plot" else [command]):
            leaf.set_defaults(command_parser=leaf)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler) raised in the command as Ctrl-C is, so it
    stops the same way: its partial outputs removed, a fit resumable from its last checkpoint.
    A native call (FAISS, Leiden, a torch op) finishes first, as it does for Ctrl-C."""


def _interrupt(signum, frame):
    progress.pending_interrupt = Terminated()  # raised again by the next progress step if Python drops it
    raise progress.pending_interrupt


def _one_process() -> bool:
    """Whether this process runs alone rather than as one of several torchrun started."""
    from masksc.distributed import env_int
    try:
        return env_int("WORLD_SIZE", 1) <= 1
    except ValueError:  # not torchrun's value; the commands that launch processes name it
        return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``masksc`` command (``argv``: its arguments, default ``sys.argv[1:]``);
    returns the exit status. Run as the command (no ``argv``), SIGTERM stops it as Ctrl-C does."""
    argv_given = argv is not None
    argv = list(argv) if argv_given else sys.argv[1:]
    parser = build_parser()
    args, stray = parser.parse_known_args(argv)
    if {"-v", "--verbose"} & set(stray):  # after the command, where people often put it
        args.verbose = True
        stray = [s for s in stray if s not in ("-v", "--verbose")]
    if stray:  # with the usage of the command they follow (e.g. `--color KEY`, one value a flag)
        before_command = argv.index(stray[0]) < argv.index(args.command)
        (parser if before_command else args.command_parser).error(f"unrecognized arguments: {' '.join(stray)}")
    # other libraries' warnings, masksc's own info (debug with -v): numba's debug alone is tens of thousands of lines
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    level_before = log.level  # the "masksc" logger: a script calling main() gets its own level back
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not argv_given and hasattr(sys.stdout, "reconfigure"):  # a name the terminal's encoding lacks is printed
        sys.stdout.reconfigure(errors="backslashreplace")  # escaped, not a UnicodeEncodeError after the work
    t0 = time.time()

    def say(text: str) -> None:  # an error line on stderr, whose reader may be gone too (`2>&1 | head`)
        if sys.stderr is None:  # closed (`2>&-`): print would write it to stdout, among the data
            return
        try:
            print(text, file=sys.stderr)
        except OSError:  # gone (`2>&1 | head`) or full: nothing can be said there
            _drop([sys.stderr], as_process=not argv_given)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # a command's user has no source line to be pointed at: the message alone, as errors are printed
        tqdm.write(f"masksc {args.command}: warning: {message}", file=sys.stderr)

    # Only as the command itself: a script calling main() keeps its own SIGTERM, and a rank under torchrun
    # dies at once as before (a rank stopping cleanly would wait in the shutdown barrier for peers blocked
    # in a collective, which cannot see their signal until it returns).
    as_command = not argv_given and threading.current_thread() is threading.main_thread() and _one_process()
    on_term = signal.getsignal(signal.SIGTERM) if as_command else None
    if as_command:
        signal.signal(signal.SIGTERM, _interrupt)
    finished = False
    try:
        # log lines go through tqdm.write, so a running bar is redrawn below them instead of cut in two
        with warnings.catch_warnings(), logging_redirect_tqdm():
            warnings.showwarning = show_warning
            _check_backend()
            code = args.func(args)
        log.info("%s finished in %.1fs", args.command, time.time() - t0)
        finished = True
        return _flushed(code, args.command, as_process=not argv_given)
    except Warning as exc:  # PYTHONWARNINGS=error / -W error makes warnings exceptions: one line, as errors are
        say(f"masksc {args.command}: error: {exc} (a warning, raised as an error by the warnings filter, e.g. "
            "PYTHONWARNINGS=error)")
        return 2
    except (MaskscError, FileNotFoundError) as exc:
        say(f"masksc {args.command}: error: {exc}")
        return 2
    except (OSError, RuntimeError) as exc:  # the system's refusal (a full disk, a permission), not a bug: one line
        gone = _readers_gone() if isinstance(exc, BrokenPipeError) else []
        if gone:  # the reader of the output went away (`| head`): stop quietly, as Unix tools do
            _drop(gone, as_process=not argv_given)
            return 128 + signal.SIGPIPE
        if args.verbose or (isinstance(exc, RuntimeError) and not out_of_space(exc)):  # h5py's full disk: RuntimeError
            raise
        output = getattr(args, "json", None) or getattr(args, "output", None)  # what the command writes
        # an existing folder: not one the command made for its output and removed again
        folder = nearest_existing(Path(output).resolve().parent) if output else None
        where = f"on the disk of {folder}" if folder else "on the output's disk"
        fix = (f"free space {where} (or write elsewhere) and run it again" if out_of_space(exc) else
               "see the system's message; run with -v for the traceback")
        said = " ".join(str(exc).split())  # h5py's messages hold line breaks
        say(f"masksc {args.command}: error: {said}; fix: {fix}.")
        return 2
    except KeyboardInterrupt as exc:
        again = ""
        if args.command == "fit" and os.path.lexists(Path(args.output) / "last"):
            again = f"; continue with the same command and --resume (checkpoints are in {args.output})"
        elif args.command == "demo" and os.path.lexists(Path(args.output) / "model" / "last"):
            again = (f"; {Path(args.output) / 'model'} keeps the checkpoints saved so far (a rerun of the demo "
                     "replaces them)")
        stopped = isinstance(exc, Terminated)
        say(f"masksc {args.command}: {'terminated' if stopped else 'interrupted'}{again}.")
        return 128 + (signal.SIGTERM if stopped else signal.SIGINT)
    finally:
        progress.pending_interrupt = None  # caught, or dropped after the last progress step: not for later
        if as_command:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if on_term is None else on_term)
        if argv_given:
            log.setLevel(level_before)
        from masksc.distributed import shutdown
        shutdown(wait_for_peers=finished)


def _readers_gone() -> list:
    """The standard streams (stdout, stderr) whose pipe's reader has gone (``| head`` done)."""
    import select
    gone = []
    for stream in (sys.stdout, sys.stderr):
        try:
            poll = select.poll()
            poll.register(stream.fileno(), select.POLLOUT)
            # a pipe's gone reader is POLLERR on Linux, POLLHUP on BSD and macOS, and a socket's POLLHUP
            if any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0)):
                gone.append(stream)
        except (OSError, ValueError, AttributeError):  # no file behind it (a test's capture)
            continue
    return gone


def _drop(streams: list, as_process: bool) -> None:
    """Point ``streams`` at /dev/null, so that the interpreter's last flush of what they still
    buffer does not fail the exit ("Exception ignored ... BrokenPipeError", status 120); only in
    the command's own process (a script calling main() keeps its streams)."""
    if as_process:
        null = os.open(os.devnull, os.O_WRONLY)
        for stream in streams:
            os.dup2(null, stream.fileno())
        os.close(null)


def _flushed(code: int, command: str, as_process: bool) -> int:
    """``code`` once the command's printed lines have left their buffers. Where stdout cannot take
    them, its files are written all the same: a reader gone from the pipe (``| head``) ends the
    command quietly with 141, as Unix tools end; a full device, with one line and status 2."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: closed by the caller (`2>&-`)
                stream.flush()
    except BrokenPipeError:
        _drop(_readers_gone() or [sys.stdout], as_process)
        return 128 + signal.SIGPIPE
    except OSError as exc:
        _drop([sys.stdout], as_process)
        print(f"masksc {command}: error: cannot print to standard output ({exc.strerror}); the command's files are "
              "written; fix: send its output elsewhere.", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # `python -m masksc.cli`, as earlier releases documented it
    sys.exit(main())
