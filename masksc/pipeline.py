"""A trained mask-sc encoder bundled with the preprocessing and gene grid it was trained on.

``fit`` runs the whole recipe (preprocess -> grid layout -> teacher -> masked expression
training) and returns a ``MaskSCModel``; ``MaskSCModel.load(dir)`` restores one from its
checkpoint directory and embeds new data with the saved transform, refusing data whose genes
do not match.

Two paths, one recipe:

* an in-memory AnnData is preprocessed and laid on the grid in memory (``CellBatches``);
* a path (``.h5ad``, 10x ``.h5``) or an AnnData opened ``backed="r"`` is streamed from disk
  (``masksc.outofcore``): preprocessing statistics in one streaming pass
  (``Preprocessor.fit``), training batches chunk-shuffled from disk (``StreamBatches``), and
  the teacher, its input standardisation and the grid layout fitted on a seeded subsample of
  at most ``teacher_cells`` cells (default 50,000) held in memory. Peak memory is bounded by
  the chunk size and ``teacher_cells``, not by the dataset. Under ``torchrun`` (or any
  initialised process group) this path trains with DDP: rank 0 fits the preprocessing, grid
  and teacher and broadcasts them, every rank trains on a disjoint shard of each epoch's
  chunks, and rank 0 writes the checkpoints.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from masksc import checkpoint as ckpt
from masksc.checks import check_flags, is_integer
from masksc.data import GridLayout, Preprocessor, naming_matrix, with_layer
from masksc.data.stream import ScaledBesideRawError
from masksc.data.validate import check_count
from masksc.embed import embed_matrix
from masksc.errors import counted, warn
from masksc.models import MaskSC
from masksc.models.presets import get_preset
from masksc.models.targets import teacher_config
from masksc.rng import keeping_global_rngs
from masksc.train import resolve_device

log = logging.getLogger(__name__)

MIN_FIT_CELLS = 20  # below this there is nothing to learn a cell embedding from (hundreds in practice)
STREAMED_CELLS_COMPARED = 1024  # a resumed streamed run compares the values of this many first cells, not all


class MaskSCModel:
    """A mask-sc network (``network``, a MaskSC) with its fitted ``preprocessor`` and ``grid``;
    ``fitted_input``: the matrix it was fitted on, ``{"layer": str | None, "use_raw": bool}``
    (None for a model saved before it was recorded)."""

    def __init__(self, network: MaskSC, preprocessor: Preprocessor, grid: GridLayout, path: str | None = None,
                 fitted_input: dict | None = None):
        self.network = network
        self.preprocessor = preprocessor
        self.grid = grid
        self.path = path
        self.fitted_input = fitted_input

    @property
    def config(self):
        """The MaskSCConfig the network was built with."""
        return self.network.cfg

    def __repr__(self) -> str:
        c = self.config
        g, s = c.grid_shape
        return (f"MaskSCModel({len(self.genes)} genes on a {g}x{s} grid, {c.patch}x{c.patch} patches, "
                f"D={c.embed_dim}, depth {c.depth}, {counted(c.epochs, 'epoch')}, pool={c.pool!r}, "
                f"embedding_dim={c.embedding_dim}, path={self.path!r})")

    @property
    def genes(self) -> list[str]:
        """Input genes the model needs (those placed on the grid)."""
        return [g for g in self.grid.genes if g]

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "MaskSCModel":
        """Load the model saved in ``path`` (a checkpoint directory or a training run directory,
        whose ``last`` checkpoint is used) onto ``device``. Raises CheckpointError when it is
        missing or broken, ValueError for a device this machine lacks, before reading anything."""
        from masksc.errors import CheckpointError
        network, config = ckpt.load_model(path, device=resolve_device(device))
        meta = config.get("meta") or {}
        if "preprocessor" not in meta or "grid" not in meta:
            raise CheckpointError(f"{config['path']} has no saved preprocessing/grid, so it cannot embed new data; "
                                  "save it with masksc.tl.fit / `masksc fit`.")
        preprocessor, grid, fitted_input = _transform_from_meta(meta, config["path"])
        return cls(network, preprocessor, grid, path=config["path"], fitted_input=fitted_input)

    def to(self, device: str | torch.device) -> "MaskSCModel":
        """Move the network (with its teacher) to ``device`` and return this model, as
        ``nn.Module.to`` does; ``embed`` with ``device=None`` then runs there. Raises ValueError,
        naming the fix, for a device this machine lacks or masksc does not run on (``meta``, ``mps``), before
        moving anything."""
        self.network.to(resolve_device(device, cpu_fix='call .to("cpu")'))
        return self

    def set_pool(self, pool: str) -> None:
        """Read cells out another way from now on (``mean``, ``cls`` or ``target``, see
        ``MaskSC.embed``) without retraining; ``save`` then stores that choice."""
        self.network.cfg = self.network.cfg.replace(pool=pool)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as a checkpoint directory (config.json + model.safetensors), atomically."""
        return ckpt.save_checkpoint(path, self.network, extra=self.meta())

    def meta(self) -> dict:
        """The JSON-able transform (and the input it was fitted on, when known) saved beside the weights."""
        meta = {"preprocessor": self.preprocessor.to_dict(), "grid": self.grid.to_dict()}
        if self.fitted_input is not None:
            meta["input"] = self.fitted_input
        return meta

    @contextlib.contextmanager
    def noting_fitted_input(self, layer: str | None, use_raw: bool):
        """Wrap the reading of new data (from ``layer`` / ``use_raw``): a DataError or
        CheckpointError (missing genes) raised inside gets a note naming the matrix this model was
        fitted on, when that was another one, since reading another is the likely cause; one about
        "X" names the layer or ``.raw`` read (``naming_matrix``)."""
        from masksc.errors import CheckpointError, DataError
        try:
            with naming_matrix(layer, use_raw):
                yield
        except (DataError, CheckpointError) as exc:
            fitted = self.fitted_input
            if isinstance(exc, ScaledBesideRawError):  # the fix is the model's matrix, not any usable one
                raise type(exc)(self._scaled_x_message()) from exc
            if fitted is None or (fitted["layer"], fitted["use_raw"]) == (layer, bool(use_raw)):
                raise
            if isinstance(exc, CheckpointError) and fitted["use_raw"] == bool(use_raw):
                raise  # missing genes: a layer has X's genes, so reading another layer is not the cause
            kind = {"counts": "raw counts", "log": "log-normalised values"}.get(self.preprocessor.input_kind_, "")
            held = f" ({kind})" if kind else ""
            others = (f" for an AnnData or .h5ad; other files hold only X, which must then hold {kind or 'them'}"
                      if fitted["layer"] is not None or fitted["use_raw"] else "")
            raise type(exc)(f"{exc} Note: this model was fitted on {_describe_input(**fitted)}{held}, and "
                            f"{_describe_input(layer, use_raw)} was read here; to read the same, "
                            f"{_input_arguments(**fitted)}{others}.") from exc

    def _scaled_x_message(self) -> str:
        """The error for scaled X read beside ``.raw``, whose fix is the matrix this model reads."""
        fitted = self.fitted_input
        kind = self.preprocessor.input_kind_
        if fitted is not None and (fitted["layer"] is not None or fitted["use_raw"]):
            held = {"counts": "raw counts", "log": "log-normalised values"}.get(kind, "its values")
            fix = (f"read {_describe_input(**fitted)} ({held}), which this model was fitted on: "
                   f"{_input_arguments(**fitted)}")
        elif kind == "counts":
            fix = ("this model was fitted on raw counts, which scanpy's .raw does not hold (it keeps log-normalised "
                   "values): read a layer of raw counts (layer=, --layer), or .raw (use_raw=True, --use-raw) where "
                   "it holds counts")
        else:
            fix = ("use_raw=True (--use-raw) to read .raw's log-normalised values, the kind this model was fitted "
                   "on, or layer= (--layer) a layer of them")
        return f"X holds negative (scaled) values and .raw is set; fix: {fix}."

    def to_grid(self, adata, layer: str | None = None, use_raw: bool = False, rows: np.ndarray | None = None):
        """Preprocess ``adata`` (its ``X``, ``adata.layers[layer]``, or with ``use_raw`` its
        ``.raw``) with the saved transform and lay it on the grid: CSR float32 [kept cells, g*s]
        (every cell unless the preprocessor's ``min_counts`` drops some; :meth:`embed` gives
        those NaN rows). Raises CheckpointError when that matrix lacks genes the model needs.
        ``rows``: int [n_cells], the rows of a larger dataset that ``adata``'s cells are, which
        errors name (default 0 ..)."""
        X, keep = self._kept_on_grid(adata, layer, use_raw, rows)
        if not keep.all():
            warn(f"to_grid left out {int((~keep).sum())} of {keep.size} cells: the model's preprocessor drops them "
                 f"(min_counts={self.preprocessor.min_counts})")
        return X

    def _kept_on_grid(self, adata, layer, use_raw, rows=None) -> tuple:
        """(:meth:`to_grid`'s CSR matrix, bool [n_cells]: False for the cells it leaves out)."""
        from masksc.errors import CheckpointError
        check_flags(use_raw=use_raw)
        _check_anndata(adata)
        with self.noting_fitted_input(layer, use_raw):
            expression = with_layer(adata, layer, use_raw)
        try:
            ckpt.check_genes(self.grid.to_dict(), expression.var_names)
        except CheckpointError as exc:
            self._refuse_missing_genes(exc, expression.var, layer, use_raw)
        with self.noting_fitted_input(layer, use_raw):
            keep, X = self.preprocessor.transform_kept(expression, rows=rows)
        genes = pd.DataFrame(index=pd.Index(self.preprocessor.genes_))  # X's columns, which the grid matches by name
        return self.grid.to_grid(ad.AnnData(X=X, var=genes)), keep

    def _refuse_missing_genes(self, exc, var: pd.DataFrame, layer: str | None, use_raw: bool) -> None:
        """Raise ``exc`` (the data read lacks grid genes): when a column of its gene annotations
        ``var`` holds them (symbols beside Ensembl IDs), naming the column, without
        :meth:`noting_fitted_input`'s note (the naming is the cause, not the matrix read, so a note
        to read another would mislead); else with that note."""
        from masksc.errors import CheckpointError
        column = _column_naming(var, self.genes)
        if column is None:
            with self.noting_fitted_input(layer, use_raw):
                raise exc
        rename = (f"raw = adata.raw.to_adata(); raw.var_names = raw.var[{column!r}].astype(str); "
                  "raw.var_names_make_unique(); adata.raw = raw" if use_raw else
                  f"adata.var_names = adata.var[{column!r}].astype(str) (then adata.var_names_make_unique() if "
                  "names repeat)")
        where = "adata.raw.var" if use_raw else "var"
        raise CheckpointError(f"{exc} The column {where}[{column!r}] holds the model's genes: to match by it, "
                              f"{rename}.") from exc

    def embed(self, adata, batch_size: int = 1024, device: str | torch.device | None = None,
              progress: bool = True, layer: str | None = None, use_raw: bool = False,
              amp: bool = True) -> np.ndarray:
        """Embeddings of the cells of ``adata`` (its ``X``, ``adata.layers[layer]``, or with
        ``use_raw`` its ``.raw``: what the model was fitted on): float32
        [n_cells, config.embedding_dim], in row order; NaN rows for cells the preprocessor's
        ``min_counts`` drops, as :meth:`embed_file` writes them. ``device``: where to run (None: where the
        weights are; another device moves the weights there). ``amp``: bf16 autocast on CUDA,
        as :meth:`embed_file` (False: float32 there too; the CPU always runs float32). Raises
        ValueError, naming the fix, for a device this machine lacks or ``meta``, before any work."""
        from masksc.errors import DataError
        from masksc.outofcore import warn_nan_rows
        _check_anndata(adata)
        device = _run_device(device)
        check_count("batch_size", batch_size)  # before the preprocessing
        check_flags(progress=progress, amp=amp)
        if adata.shape[0] == 0:
            raise DataError(f"the data to embed holds no cells (0 x {adata.shape[1]}); fix: pass the cells to embed "
                            "(check a filter upstream).")
        X, keep = self._kept_on_grid(adata, layer, use_raw)
        if keep.all():
            return embed_matrix(self.network, X, batch_size=batch_size, device=device, progress=progress, amp=amp)
        out = np.full((keep.size, self.config.embedding_dim), np.nan, dtype=np.float32)
        if X.shape[0]:
            out[keep] = embed_matrix(self.network, X, batch_size=batch_size, device=device, progress=progress, amp=amp)
        warn_nan_rows(int((~keep).sum()), keep.size, self.preprocessor.min_counts)
        return out

    def attention_maps(self, adata, layer: str | None = None, device: str | torch.device | None = None,
                       use_raw: bool = False, rows: np.ndarray | None = None) -> np.ndarray:
        """The global token's last-layer encoder attention over the gene grid (paper Fig. 6) for
        each cell of ``adata`` (its ``X``, ``adata.layers[layer]`` or, with ``use_raw``, its
        ``.raw``, as in ``embed``; meant for a few cells: they
        go through in one batch), averaged over heads: float32 [n_cells, g, s], each gene weighted
        by its token's share, NaN at grid positions that hold no gene (padding; ``pl.attention_grid``
        draws them grey). ``device``: as in ``embed`` (None: where the weights are; another
        device moves the weights there, as ``embed`` does). ``rows``: as in :meth:`to_grid`, the
        dataset rows of the cells, which errors name. A cell the preprocessor's ``min_counts``
        drops has no map: a DataError names it."""
        from masksc.data import CellBatches
        from masksc.embed import evaluating
        from masksc.errors import DataError
        from masksc.pl import attention_to_grid
        device = _run_device(device)  # checked before any work
        X, keep = self._kept_on_grid(adata, layer, use_raw, rows=rows)
        if not keep.all():
            dropped = np.flatnonzero(~keep)
            where = (np.arange(keep.size) if rows is None else np.asarray(rows))[dropped]
            names = ", ".join(f"row {r} ({n})" for r, n in zip(where[:5], adata.obs_names[dropped[:5]]))
            raise DataError(f"{dropped.size} of the cells ({names}{', ...' if dropped.size > 5 else ''}) have no "
                            f"attention map: the model's preprocessor drops them (min_counts="
                            f"{self.preprocessor.min_counts}); fix: pass other cells (on the command line, another "
                            "--seed draws others).")
        batch = next(iter(CellBatches(X, batch_size=max(1, X.shape[0]), shuffle=False)))
        with evaluating(self.network, device) as (net, device):
            attn = net.last_attention(batch.to(device)).float().cpu()
        maps = attention_to_grid(attn, self.config.grid_shape, self.config.patch, ime=self.config.ime)
        maps[:, self.grid.is_padding.reshape(self.config.grid_shape)] = np.nan
        return maps

    def embed_file(self, source, output: str | os.PathLike, *, batch_size: int = 1024, chunk_size: int = 16_384,
                   device: str | torch.device | None = None, amp: bool = True, dist=None,
                   progress: bool = True, layer: str | None = None, use_raw: bool = False,
                   source_path: str | os.PathLike | None = None, overwrite: bool = True) -> Path | None:
        """Stream the cells of ``source`` (an .h5ad / 10x .h5 path or an AnnData; its ``X``, the
        layer ``layer`` or, with ``use_raw``, its ``.raw``) through the model into ``output`` (.npy or .h5ad with obs +
        obsm["X_masksc"]) without loading the dataset; sharded over the ranks of a distributed run.
        ``source_path``: the file an in-memory ``source`` was read from, recorded as the source.
        ``overwrite=False``: an existing ``output`` is refused. See ``masksc.outofcore.embed_file``."""
        from masksc.outofcore import embed_file
        return embed_file(self, source, output, batch_size=batch_size, chunk_size=chunk_size,
                          device=_run_device(device), amp=amp, dist=dist, progress=progress, layer=layer,
                          use_raw=use_raw, source_path=source_path, overwrite=overwrite)


def _transform_from_meta(meta: dict, path) -> tuple[Preprocessor, GridLayout, dict | None]:
    """The Preprocessor, GridLayout and fitted input (None when not recorded) saved in the metadata
    ``meta`` of the checkpoint ``path``; a CheckpointError naming the damage when they, or the
    ``streamed`` record, cannot be read back (a hand-edited or corrupted config.json)."""
    from masksc.errors import CheckpointError, DataError
    try:
        preprocessor, grid = Preprocessor.from_dict(meta["preprocessor"]), GridLayout.from_dict(meta["grid"])
        fitted_input, streamed = meta.get("input"), meta.get("streamed")
        if fitted_input is not None and not (isinstance(fitted_input, dict)
                                             and {"layer", "use_raw"} <= fitted_input.keys()):
            raise DataError(f"input is {fitted_input!r}, not a dict of layer and use_raw")
        if streamed is not None and not (isinstance(streamed, dict) and isinstance(streamed.get("chunk_size", 1), int)):
            raise DataError(f"streamed is {streamed!r}, not a dict of n_cells, teacher_cells and chunk_size")
    except DataError as exc:
        cause = exc.__cause__ or exc
        detail = f"missing {cause}" if isinstance(cause, KeyError) else str(cause).split("; fix:")[0]
        raise CheckpointError(f"the transform saved in {path}/config.json is damaged ({detail}); fix: restore the "
                              "checkpoint from a copy, or fit the model again.") from exc
    return preprocessor, grid, fitted_input


def _column_naming(var, genes: list[str]) -> str | None:
    """The column of ``var`` (a DataFrame of gene annotations) whose values name most of ``genes``
    and more of them than ``var``'s index does (e.g. symbols beside Ensembl IDs as var_names), or None."""
    wanted = set(genes)
    best, best_hits = None, max(len(wanted) // 2, len(wanted & set(var.index.astype(str))))
    for column in var.columns:
        if var[column].dtype.kind in "biufcmM":
            continue
        hits = len(wanted & set(var[column].astype(str)))
        if hits > best_hits:
            best, best_hits = column, hits
    return best


def _check_anndata(adata) -> None:
    """Refuse what is not an AnnData: a bare matrix has no gene names to match the model's by, and
    a path is for ``embed_file``."""
    from masksc.errors import DataError
    if isinstance(adata, (str, os.PathLike)):
        raise DataError(f"the model reads an AnnData, got the path {os.fspath(adata)!r}; fix: model.embed_file(path, "
                        "OUT) streams a file, or read it first with masksc.read(path).")
    if not isinstance(adata, ad.AnnData):
        raise DataError(f"the model reads an AnnData, whose gene names it matches to its own, got a "
                        f"{type(adata).__name__}; fix: wrap the cells x genes matrix as anndata.AnnData(X) with "
                        "var_names set to the gene names (or pass a file's path to model.embed_file).")


def _describe_input(layer: str | None, use_raw: bool) -> str:
    return "adata.raw" if use_raw else "X" if layer is None else f"the layer {layer!r}"


def _input_arguments(layer: str | None, use_raw: bool) -> str:
    """What to pass, in Python and on the command line, to read the matrix ``layer`` / ``use_raw`` names."""
    if use_raw:
        return "pass use_raw=True (--use-raw)"
    if layer is not None:
        return f"pass layer={layer!r} (--layer {layer})"
    return "drop layer= / use_raw= (--layer / --use-raw)"


def _run_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` checked by ``train.resolve_device`` (None stays None: run where the weights are)."""
    return None if device is None else resolve_device(device)


def _streamed(data) -> bool:
    return isinstance(data, (str, os.PathLike)) or bool(getattr(data, "isbacked", False))


@keeping_global_rngs()
def fit(adata, preset: str = "cpu", *, model_dir: str | os.PathLike | None = None, epochs: int | None = None,
        seed: int = 0, device: str | None = None, resume: bool = False, checkpoint_every: int | None = None,
        progress: bool = True, chunk_size: int = 4096, teacher_cells: int | None = 50_000,
        teacher_overrides: dict | None = None, min_cells: int = 3, dist=None, layer: str | None = None,
        use_raw: bool = False, **overrides):
    """Train mask-sc on ``adata`` (raw counts or log-normalised, cells x genes): an in-memory
    AnnData, or a path / backed AnnData streamed from disk (see the module doc). ``layer``:
    train on ``adata.layers[layer]`` (e.g. ``"counts"``) instead of ``X``, ``use_raw``: on
    ``adata.raw`` (an ``.h5ad`` path's layer or ``.raw`` is streamed); the same must be passed
    when embedding.

    ``preset`` names a recipe in ``masksc.models.PRESETS``; ``overrides`` replace its fields
    (e.g. ``grid_shape=(32, 32)``, ``mask_ratio=0.5``, ``layout="correlation"``, ``ime=False``,
    ``batch_size=64``). ``model_dir``: where checkpoints go (every ``checkpoint_every`` epochs,
    atomically); ``resume=True`` continues the run there. ``teacher_overrides``: fields of the
    contrastive-sc teacher's config that differ from its authors' settings (``ContrastiveConfig``,
    e.g. ``{"epochs": 5, "temperature": 0.5}``; see ``masksc.models.targets.teacher_config``); a
    resumed run keeps its saved teacher and refuses settings that contradict it. ``min_cells``: a
    gene must be detected in that many cells to be an HVG candidate (scanpy's usual
    ``filter_genes(min_cells=3)``; without it the seurat_v3 trend fit fails on very sparse data
    such as all 13,488 worm-neuron genes). Streaming only:
    ``chunk_size`` cells read per disk block, ``teacher_cells`` size of the in-memory subsample
    (None: all cells), ``dist`` a ``masksc.distributed.DistContext`` (default: the current
    process group).
    Returns (MaskSCModel, TrainResult); on ranks other than 0 the model's ``path`` is None.
    """
    from masksc import distributed
    from masksc.outofcore import RowReader

    ctx = dist or distributed.context()
    if teacher_overrides is not None and not isinstance(teacher_overrides, dict):  # "epochs=1": dict() failed
        raise ValueError(f"teacher_overrides must be a dict of teacher settings, e.g. {{'epochs': 5}}, got "
                         f"{teacher_overrides!r}.")
    teacher_overrides = dict(teacher_overrides or {})
    # bad settings, an unusable model_dir and a run that cannot resume fail here, before any reading or training
    cfg, train_cfg, resume_from = check_fit(preset, epochs=epochs, seed=seed, model_dir=model_dir, resume=resume,
                                            device=device, progress=progress, checkpoint_every=checkpoint_every,
                                            chunk_size=chunk_size, teacher_cells=teacher_cells,
                                            teacher_overrides=teacher_overrides, layer=layer, use_raw=use_raw,
                                            streamed=_streamed(adata) or ctx.distributed, **overrides)
    # plain ints (an np.int64 is checked above but would be saved as one, which JSON cannot hold)
    chunk_size, teacher_cells = int(chunk_size), None if teacher_cells is None else int(teacher_cells)
    fitted_input = {"layer": layer, "use_raw": bool(use_raw)}
    from masksc.train import holding_run_dir
    with holding_run_dir(model_dir, ctx), naming_matrix(layer, use_raw):  # before the data is read
        if _streamed(adata) or ctx.distributed:
            reader = RowReader(adata, layer, use_raw)
            _check_enough_cells(reader.n_obs)
            return _fit_streaming(reader, preset, cfg, model_dir=model_dir, resume_from=resume_from, seed=seed,
                                  device=device, resume=resume, checkpoint_every=checkpoint_every, progress=progress,
                                  chunk_size=chunk_size, teacher_cells=teacher_cells,
                                  teacher_overrides=teacher_overrides, min_cells=min_cells, ctx=ctx,
                                  fitted_input=fitted_input)
        _check_enough_cells(adata.n_obs)
        return _fit_memory(with_layer(adata, layer, use_raw), preset, cfg, train_cfg, resume_from=resume_from,
                           seed=seed, progress=progress, teacher_overrides=teacher_overrides, min_cells=min_cells,
                           fitted_input=fitted_input)


def check_fit(preset: str = "cpu", *, epochs: int | None = None, seed: int = 0,
              model_dir: str | os.PathLike | None = None, resume: bool = False, device: str | None = None,
              progress: bool = True, checkpoint_every: int | None = None, chunk_size: int = 4096,
              teacher_cells: int | None = 50_000, teacher_overrides: dict | None = None, layer: str | None = None,
              use_raw: bool = False, streamed: bool | None = None, **overrides):
    """What ``fit`` checks before reading any data, for its arguments of the same names: every
    setting, ``model_dir``, and with ``resume`` that the run there can continue with them
    (``streamed``: whether the data will be streamed, when known, which a resumed run must share,
    with its ``chunk_size``).
    Returns (MaskSCConfig, TrainConfig, the run directory to resume from or None). Raises
    ValueError, DataError or CheckpointError naming the problem, so a caller about to read a
    large file can check first."""
    from masksc.errors import DataError
    from masksc.ops import forced_backend
    from masksc.train import check_resumable

    check_flags(("streamed",), resume=resume, progress=progress, use_raw=use_raw, streamed=streamed)
    if model_dir is not None and not os.fspath(model_dir):  # "" trained and kept no checkpoint, without a word
        raise DataError("model_dir='' names no directory; fix: pass the directory to save the model in (-o on the "
                        "command line; model_dir=None in Python keeps no checkpoint).")
    if resume and model_dir is None:
        raise ValueError("resume=True continues the run saved in model_dir, and none is given; fix: pass model_dir= "
                         "(the run's directory), or drop resume=True.")
    resolve_device(device)
    forced_backend()
    cfg = get_preset(preset).replace(**overrides, **({} if epochs is None else {"epochs": epochs}))
    train_cfg = _train_config(cfg, seed=seed, model_dir=model_dir, resume=resume, device=device, progress=progress,
                              checkpoint_every=checkpoint_every)
    _teacher_config(cfg, seed, None, dict(teacher_overrides or {}))  # names and values; the dropout needs the data
    check_count("chunk_size", chunk_size)
    if teacher_cells is not None and not is_integer(teacher_cells):
        raise DataError(f"teacher_cells={teacher_cells!r}; fix: pass a whole number of cells (default 50,000), or "
                        "None for all cells.")
    if teacher_cells is not None and teacher_cells < MIN_FIT_CELLS:
        raise DataError(f"teacher_cells={teacher_cells} are too few to fit the teacher and the gene layout on (at least "
                        f"{MIN_FIT_CELLS}, thousands in practice); fix: pass more (default 50,000), or None for all "
                        "cells (0 on the command line).")
    if model_dir is not None:
        ckpt.check_run_dir(model_dir, resume)
    resume_from = None  # the run to continue: its transform, layout and teacher come back from it
    if resume and model_dir is not None and (Path(model_dir) / "last").exists():
        resume_from = Path(model_dir)
        saved = _saved_transform(resume_from)
        _transform_from_meta(saved, ckpt.resolve(resume_from))  # not damaged
        _check_resumed_teacher(resume_from, dict(teacher_overrides or {}))
        _check_resumed_input(resume_from, saved, layer, use_raw)
        if streamed is not None:
            _check_resumed_streaming(resume_from, saved, streamed, chunk_size)
        check_resumable(resume_from, cfg, train_cfg)
    return cfg, train_cfg, resume_from


def _check_enough_cells(n: int) -> None:
    from masksc.errors import DataError
    if n < MIN_FIT_CELLS:
        raise DataError(f"{n} cells are too few to train on (at least {MIN_FIT_CELLS}, hundreds in practice); fix: "
                        "pass more cells, or embed these with a model trained on a larger dataset.")


def _fit_memory(adata, preset, cfg, train_cfg, *, resume_from, seed, progress, teacher_overrides, min_cells,
                fitted_input):
    from masksc.train import fit_masksc

    if resume_from is not None:
        # the saved transform, not one refitted on this data: it continues the run exactly and
        # refuses data from another gene set, as a resumed streamed run does
        bundle_meta = {"input": fitted_input, **_saved_transform(resume_from)}  # saved before it was recorded: now
        _check_resumed_cells(resume_from, bundle_meta, adata.obs_names)
        preprocessor, grid, _ = _transform_from_meta(bundle_meta, ckpt.resolve(resume_from))
        X_grid = grid.to_grid(preprocessor.transform(adata).X)
        _check_resumed_values(resume_from, bundle_meta, X_grid)
    else:
        preprocessor, grid, X_grid = preprocess_to_grid(adata, cfg, seed=seed, min_cells=min_cells, progress=progress)
        bundle_meta = {"preprocessor": preprocessor.to_dict(), "grid": grid.to_dict(), "input": fitted_input,
                       "cells": cells_record(adata.obs_names, X_grid)}
    # resumed, the checkpoint's teacher continues (check_fit refused overrides that contradict it)
    teacher_cfg = None if resume_from is not None else _teacher_config(cfg, seed, X_grid, teacher_overrides)
    network, result = fit_masksc(X_grid, cfg, train_cfg, is_padding=grid.is_padding, extra_state=bundle_meta,
                                 teacher_cfg=teacher_cfg, progress=progress)
    path = result.checkpoint
    _log_trained(preset, result)
    return MaskSCModel(network, preprocessor, grid, path=path, fitted_input=bundle_meta.get("input")), result


def preprocess_to_grid(adata, cfg, *, seed: int, min_cells: int = 3, progress: bool = True):
    """``fit``'s in-memory preparation of ``adata`` for model config ``cfg`` (a MaskSCConfig): preprocessing fitted
    on it (``cfg.n_genes`` HVG among genes detected in ``min_cells`` cells), the grid layout
    ``cfg.layout`` (seeded) and the cells on it.
    Returns (Preprocessor, GridLayout, X_grid: CSR float32 [n_cells, g*s])."""
    preprocessor = Preprocessor(n_top_genes=cfg.n_genes, min_cells=min_cells).fit(adata, progress=progress)
    X = preprocessor.transform(adata, check_profile=False).X  # the cells it was fitted on
    grid = GridLayout.fit(X, preprocessor.genes_, shape=cfg.grid_shape, patch=cfg.patch, order=cfg.layout,
                          seed=seed)
    return preprocessor, grid, grid.to_grid(X)


def _teacher_config(cfg, seed: int, X_grid, teacher_overrides: dict):
    """The teacher's ContrastiveConfig for model config ``cfg`` (None with MED off, where a teacher
    setting is an error rather than silently unused)."""
    if not cfg.med:
        if teacher_overrides:
            raise ValueError(f"MED is off (med=False), so there is no teacher for {sorted(teacher_overrides)}; "
                             "drop the teacher settings or turn MED on.")
        return None
    return teacher_config(cfg, seed, X_grid, **teacher_overrides)


def _check_resumed_teacher(run_dir: Path, teacher_overrides: dict) -> None:
    """A resumed run keeps the teacher saved in ``run_dir``; refuse teacher settings it was not
    trained with rather than silently ignoring them."""
    saved = (ckpt.read_config(run_dir).get("teacher_config") or {})
    for key, value in teacher_overrides.items():
        if key in saved and saved[key] != (list(value) if isinstance(value, tuple) else value):
            from masksc.errors import CheckpointError
            raise CheckpointError(f"cannot resume: the teacher in {run_dir} was trained with {key}={saved[key]!r}, "
                                  f"not {value!r}; resume with the same teacher settings or use a new model_dir.")


def _check_resumed_input(run_dir: Path, meta: dict, layer: str | None, use_raw: bool) -> None:
    """A resumed run reads the matrix it started on (``meta``: the run's saved metadata); refuse
    another (a run saved before the input was recorded is not checked)."""
    saved = meta.get("input")
    if saved is not None and (saved["layer"], saved["use_raw"]) != (layer, bool(use_raw)):
        from masksc.errors import CheckpointError
        raise CheckpointError(f"cannot resume: the run in {run_dir} was fitted on {_describe_input(**saved)}, not "
                              f"{_describe_input(layer, use_raw)}; to resume, {_input_arguments(**saved)}, or use a "
                              "new model_dir.")


_STREAMED = ("streamed its cells from a file (a path or backed AnnData in Python, an .h5ad or 10x .h5 on the command "
             "line, any run under torchrun)")
_IN_MEMORY = "trained on cells held in memory (an AnnData in Python, a csv, mtx or scDeepCluster file on the command line)"


def _log_trained(preset: str, result, how: str = "") -> None:
    """Log what this call trained (a resumed run: the epochs after its checkpoint; a finished one: none)."""
    loss = result.losses[-1] if result.losses else float("nan")
    done = result.resumed_from_epoch or 0
    if done >= result.epochs:
        log.info("nothing to train: the run had finished its %s (final loss %.4f)", counted(result.epochs, "epoch"),
                 loss)
        return
    epochs = counted(result.epochs, "epoch") if not done else \
        f"epochs {done + 1}-{result.epochs} of {result.epochs} (resumed after epoch {done})"
    log.info("trained %s preset%s for %s in %.1fs (final loss %.4f)", preset, how, epochs, result.wall_s, loss)


def cells_record(names, X_grid=None) -> dict:
    """What a run records of the cells it trains on (``names``: their obs names, in order): their
    number, a digest of the names in that order and, for cells held in memory (``X_grid``, CSR
    [n, g*s]), a digest of their values on the grid."""
    joined = "\n".join(map(str, names))
    record = {"n": len(names), "digest": hashlib.sha256(joined.encode()).hexdigest()[:16]}
    if X_grid is not None:
        record["values"] = _values_digest(X_grid)
    return record


def _values_digest(X_grid) -> str:
    digest = hashlib.sha256()
    for part in (X_grid.indptr.astype(np.int64), X_grid.indices.astype(np.int64), X_grid.data.astype(np.float32)):
        digest.update(np.ascontiguousarray(part).data)
    return digest.hexdigest()[:16]


def _check_resumed_values(run_dir: Path, meta: dict, X_grid) -> None:
    """A resumed in-memory run sees the values it stopped on (``meta``: its saved metadata, whose
    ``cells`` record runs saved before it was kept lack): other counts under the same cell names
    would continue the run on other data; else a CheckpointError."""
    saved = (meta.get("cells") or {}).get("values")
    if saved is not None and saved != _values_digest(X_grid):
        raise _other_values(run_dir, f"{X_grid.shape[0]} cells")


def _other_values(run_dir: Path, these: str, compared: str = ""):
    """The CheckpointError for a resumed run given other values under the run's cell names
    (``these``: which cells; ``compared``: which of them the check read, when not all)."""
    from masksc.errors import CheckpointError
    return CheckpointError(f"cannot resume: the run in {run_dir} was trained on other values for these {these} (the "
                           f"same names in the same order{compared}); a resumed run must see the data it stopped on to "
                           "continue as it would have; fix: pass the data the run started on, or start a new run in "
                           "another directory (-o, model_dir=).")


def _damaged_cells_record(run_dir: Path, saved):
    """The CheckpointError for a run whose record of its cells (``saved``) is damaged."""
    from masksc.errors import CheckpointError
    return CheckpointError(f"the cells record of the run in {run_dir} is damaged ({saved!r}); fix: restore its "
                           "config.json from a copy, or start the run again in a new directory.")


def _first_values_record(reader, preprocessor, grid, chunk_size: int, m: int | None = None) -> dict:
    """What a streamed run records of its cells' values, which it cannot hold: the number ``m`` of
    first cells compared (default :data:`STREAMED_CELLS_COMPARED`, or all there are) and a digest
    of their values on the grid (``reader``: a RowReader, read ``chunk_size`` cells at a time)."""
    m = min(reader.n_obs, STREAMED_CELLS_COMPARED) if m is None else m
    blocks = []
    for a in range(0, m, chunk_size):
        b = min(a + chunk_size, m)
        with warnings.catch_warnings():  # repeated cell names: anndata's warning, given once already
            warnings.filterwarnings("ignore", message="Observation names are not unique")
            cells = ad.AnnData(X=reader.rows(a, b), obs=pd.DataFrame(index=reader.obs.index[a:b].astype(str)),
                               var=pd.DataFrame(index=reader.var_names))
        blocks.append(grid.to_grid(preprocessor.transform_kept(cells, check_profile=False)[1]))
    return {"cells": m, "digest": _values_digest(sp.vstack(blocks, format="csr"))}


def _check_resumed_first_values(run_dir: Path, meta: dict, reader, preprocessor, grid, chunk_size: int) -> None:
    """A resumed streamed run sees the values it stopped on, in its first cells (``meta``: its saved
    metadata; runs saved before the record was kept lack it); else a CheckpointError."""
    saved = (meta.get("cells") or {}).get("first_values")
    if saved is None:
        return
    m = saved.get("cells") if isinstance(saved, dict) else None
    if not (type(m) is int and 0 < m <= reader.n_obs and isinstance(saved.get("digest"), str)):
        raise _damaged_cells_record(run_dir, saved)
    if _first_values_record(reader, preprocessor, grid, chunk_size, m)["digest"] != saved["digest"]:
        # values of another kind than the run's (normalised, never logged) are named as such first
        preprocessor.check_log_input(reader.rows(0, min(m, chunk_size)))
        raise _other_values(run_dir, "cells", f"; a streamed run compares its first {m} cells'")


def _check_resumed_cells(run_dir: Path, meta: dict, names) -> None:
    """A resumed run sees the cells it stopped on, in the same order (``meta``: its saved
    metadata, whose ``cells`` record runs saved before it was kept lack: then only the number of
    cells a streamed run recorded is compared; ``names``: this data's obs names), so its batches
    and masks continue the run; else a CheckpointError."""
    from masksc.errors import CheckpointError
    saved, now = meta.get("cells"), cells_record(names)
    if saved is None:  # saved before it was kept: a streamed run recorded its number of cells
        streamed = meta.get("streamed")
        saved = {"n": streamed.get("n_cells"), "digest": now["digest"]} if isinstance(streamed, dict) else now
    n = saved.get("n") if isinstance(saved, dict) else None
    if not (type(n) is int and n >= 0 and isinstance(saved.get("digest"), str)):
        raise _damaged_cells_record(run_dir, saved)
    if (now["n"], now["digest"]) != (saved["n"], saved["digest"]):
        what = (f"{saved['n']} cells, and this data has {now['n']}" if now["n"] != saved["n"] else
                f"{saved['n']} cells with other names or in another order than this data's")
        raise CheckpointError(f"cannot resume: the run in {run_dir} was trained on {what}; a resumed run must see the "
                              "cells it stopped on, in the same order, to continue as it would have; fix: pass the "
                              "data the run started on, or start a new run in another directory (-o, model_dir=).")


def _check_resumed_streaming(run_dir: Path, meta: dict, streamed: bool, chunk_size: int) -> None:
    """A resumed run draws its batches as the run did (``meta``: its saved metadata): streamed in
    chunks of the same size, or from memory; refuse another way, which would continue on another
    order of cells."""
    from masksc.errors import CheckpointError

    saved = meta.get("streamed")
    if (saved is not None) != streamed:
        was, now = (_STREAMED, _IN_MEMORY) if saved is not None else (_IN_MEMORY, _STREAMED)
        raise CheckpointError(f"cannot resume: the run in {run_dir} {was} and this one {now}, which draws other "
                              "batches; resume it as it started, or use a new model directory (model_dir= in Python, "
                              "-o on the command line).")
    if saved is not None and saved.get("chunk_size", chunk_size) != chunk_size:
        raise CheckpointError(f"cannot resume: the run in {run_dir} streamed chunks of {saved['chunk_size']} cells, "
                              f"which set the order of its batches, and {chunk_size} are asked for now; resume with "
                              f"--chunk-size {saved['chunk_size']} (chunk_size= in Python), or use a new model "
                              "directory.")


def _saved_transform(run_dir: Path) -> dict:
    """The checkpoint metadata a resumed run reuses: the fitted ``preprocessor`` and ``grid`` dicts
    (and, for a streamed run, its ``streamed`` record)."""
    meta = ckpt.read_config(run_dir).get("meta") or {}
    if "preprocessor" not in meta or "grid" not in meta:
        from masksc.errors import CheckpointError
        raise CheckpointError(f"{run_dir} has no saved preprocessing/grid to resume from; use a new model_dir.")
    return meta


def _train_config(cfg, *, seed, model_dir, resume, device, progress, checkpoint_every):
    from masksc.train import TrainConfig

    kw = dict(seed=seed, checkpoint_dir=str(model_dir) if model_dir else None, resume=resume, device=device,
              progress=progress)
    if checkpoint_every is not None:
        kw["checkpoint_every"] = checkpoint_every
    return TrainConfig.from_model_config(cfg, **kw)


def _fit_streaming(reader, preset, cfg, *, model_dir, resume_from, seed, device, resume, checkpoint_every,
                   progress, chunk_size, teacher_cells, teacher_overrides, min_cells, ctx, fitted_input):
    from masksc.models.contrastive import ContrastiveSC
    from masksc.models.targets import fit_teacher
    from masksc.outofcore import StreamBatches, subsample_genes
    from masksc.train import seed_everything, train

    dev = ctx.device if ctx.distributed else resolve_device(device)
    teacher_cfg = _teacher_config(cfg, seed, None, teacher_overrides)
    teacher, meta = None, None
    if resume_from is not None:
        # transform, layout and teacher come back with the checkpoint (the teacher's weights with
        # the model's), so a resumed run continues exactly where it stopped
        meta = {"input": fitted_input, **_saved_transform(resume_from)}  # saved before it was recorded: now
        _check_resumed_cells(resume_from, meta, reader.obs.index)
        if cfg.med:
            teacher = ckpt.build_model(ckpt.read_config(resume_from)).teacher
    else:
        with ctx.together():  # rank 0 alone prepares; an error there stops the ranks waiting for it
            if ctx.is_main:
                preprocessor = Preprocessor(n_top_genes=cfg.n_genes, min_cells=min_cells,
                                            chunk_size=chunk_size).fit(reader.chunks, progress=progress)
                X_sub, rows = subsample_genes(reader, preprocessor, teacher_cells, seed=seed, chunk_size=chunk_size,
                                              progress=progress)
                grid = GridLayout.fit(X_sub, preprocessor.genes_, shape=cfg.grid_shape, patch=cfg.patch,
                                      order=cfg.layout, seed=seed)
                if cfg.med:
                    X_sub_grid = grid.to_grid(X_sub)
                    teacher_cfg = _teacher_config(cfg, seed, X_sub_grid, teacher_overrides)
                    teacher = fit_teacher(X_sub_grid, cfg.grid_shape, cfg.patch, cfg.target_fragment, teacher_cfg,
                                          is_padding=grid.is_padding, ime=cfg.ime, device=dev, progress=progress)
                meta = {"preprocessor": preprocessor.to_dict(), "grid": grid.to_dict(), "input": fitted_input,
                        "streamed": {"n_cells": reader.n_obs, "teacher_cells": int(len(rows)),
                                     "chunk_size": chunk_size},
                        "cells": {**cells_record(reader.obs.index),
                                  "first_values": _first_values_record(reader, preprocessor, grid, chunk_size)}}
                del X_sub
    meta = ctx.broadcast_object(meta)
    preprocessor, grid, _ = _transform_from_meta(meta, resume_from and ckpt.resolve(resume_from))
    if resume_from is not None:
        _check_resumed_first_values(resume_from, meta, reader, preprocessor, grid, chunk_size)
    if cfg.med and teacher is None:  # other ranks: same architecture; DDP copies rank 0's weights into it
        teacher = ContrastiveSC(teacher_cfg)
    seed_everything(seed)
    network = MaskSC(cfg)
    network.set_padding(grid.is_padding)
    if cfg.med:
        network.set_teacher(teacher)
    train_cfg = _train_config(cfg, seed=seed, model_dir=model_dir, resume=resume, device=str(dev),
                              progress=progress and ctx.is_main, checkpoint_every=checkpoint_every)
    batches = StreamBatches(reader, preprocessor, grid, batch_size=train_cfg.batch_size, chunk_size=chunk_size,
                            seed=seed, rank=ctx.rank, world_size=ctx.world_size,
                            log_input=resume_from is not None)  # a fresh fit checked the data it fitted on
    from masksc import distributed

    result = train(distributed.wrap_model(network, ctx), None, train_cfg, extra_state=meta, batches=batches)
    network.eval()
    _log_trained(preset, result, f" (streamed, {ctx.world_size} rank(s))")
    return MaskSCModel(network, preprocessor, grid, path=result.checkpoint, fitted_input=meta.get("input")), result
