"""Training loop for mask-sc: AdamW, per-step linear warmup + cosine decay, bf16 autocast on
CUDA, gradient clipping, seeded everything, tqdm progress, atomic checkpoints and exact resume.

Determinism: the cell order of epoch ``e`` comes from ``(seed, e)`` (``CellBatches``), the
masking of step ``t`` in epoch ``e`` from ``mask_seed(seed, e, t)``, the weights from ``seed``;
the model has no dropout. A run resumed from a checkpoint therefore continues to the same
weights as an uninterrupted run (bitwise on CPU).

Distributed hook: ``model`` may be wrapped (e.g. DDP; its forward is the training loss) and
``batches`` may be a rank-sharded batch iterable with ``set_epoch``; only rank 0 writes
checkpoints.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from masksc import checkpoint as ckpt
from masksc import distributed
from masksc.checkpoint import load_model  # re-exported: the contract names masksc.train.load_model
from masksc.checks import is_finite_number, is_integer, is_number, plain_numbers
from masksc.checks import check_flags, check_seed
from masksc.errors import CheckpointError, counted, warn
from masksc.models.masksc_model import MaskSC, MaskSCConfig, check_recipe
from masksc.models.targets import check_grid_columns
from masksc.progress import progress_bar
from masksc.rng import keeping_global_rngs

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "train", "fit_masksc", "load_model", "mask_seed", "lr_factor",
           "resolve_device"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``from_model_config`` takes them from a preset."""

    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.0
    clip: float = 1.0                 # max gradient norm; 0 disables clipping
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 5         # epochs; the final epoch is always saved
    keep_checkpoints: int = 1         # epoch checkpoints kept besides the newest
    resume: bool = False
    amp: bool = True                  # bf16 autocast, CUDA only
    num_workers: int = 0
    device: str | None = None         # None: CUDA when available, else CPU
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.betas, (list, tuple, np.ndarray)):  # a list (JSON, a user) resumes like the tuple
            object.__setattr__(self, "betas", tuple(self.betas))
        plain_numbers(self)
        for key, low in (("epochs", 1), ("batch_size", 1), ("checkpoint_every", 1), ("keep_checkpoints", 0),
                         ("num_workers", 0)):
            value = getattr(self, key)
            if not is_integer(value) or value < low:
                raise ValueError(f"{key}={value!r} must be an integer >= {low}; fix: pass {key} >= {low}.")
        check_seed(self.seed)
        check_flags(amp=self.amp, resume=self.resume, progress=self.progress)
        check_recipe(self.lr, self.weight_decay, self.betas, self.warmup_epochs, self.clip)
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True continues the run saved in checkpoint_dir, and none is given; fix: pass "
                             "checkpoint_dir (the run's directory), or drop resume=True.")
        if not (is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be a number in [0, 1] (the share of lr the "
                             "cosine ends at).")

    @classmethod
    def from_model_config(cls, cfg: MaskSCConfig, **overrides) -> "TrainConfig":
        """The training recipe stored in a preset (epochs, batch, lr, wd, betas, warmup, clip) plus overrides."""
        base = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    betas=tuple(cfg.betas), warmup_epochs=cfg.warmup_epochs, clip=cfg.clip)
        base.update(overrides)
        return cls(**base)

    def replace(self, **kw) -> "TrainConfig":
        """A copy with the fields in ``kw`` changed (validated like a new one)."""
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (what a checkpoint's config.json stores)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The TrainConfig of a ``to_dict`` dict; keys this version does not know are ignored."""
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        for key in ("amp", "resume", "progress"):  # earlier releases saved what was passed (progress=0 or None):
            if key in d:                           # read as it acted, by its truth
                d[key] = bool(d[key])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


@dataclass
class TrainResult:
    """What ``train`` did: per-epoch mean losses (all epochs, resumed ones included), steps, wall time."""

    losses: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    wall_s: float = 0.0
    resumed_from_epoch: int | None = None
    checkpoint: str | None = None


def mask_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """The masking seed of (run seed, epoch, step within epoch, process rank): a 62-bit int.
    Each DDP rank masks its own batch differently; rank 0 keeps the single-process seeds."""
    entropy = [seed, epoch, step, 0x6D61736B] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(2))


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at optimiser step ``step`` (0-based): linear warmup over
    ``warmup_steps`` then cosine from 1 down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def _is_main() -> bool:
    return _rank() == 0


def _world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _mean_over_ranks(total: float, count: int, device: torch.device) -> float:
    """The epoch's mean loss over every rank's cells (``total`` / ``count`` in a single process),
    so that the recorded history is the same on every rank and not rank 0's shard alone."""
    if _world_size() == 1:
        return total / max(count, 1)
    both = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both)
    return float(both[0] / both[1].clamp(min=1))


def _finite_on_every_rank(finite: bool, device: torch.device) -> bool:
    """Whether the loss is finite on all ranks (this rank's answer in a single process). Every
    rank then stops at the same step: a rank stopping alone would leave the others waiting
    in DDP's gradient all-reduce."""
    if _world_size() == 1:
        return finite
    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _read_on_every_rank(batches):
    """``batches``, each read checked on every rank under torchrun: a rank whose chunk is bad
    (a value error met on a resumed streamed run, whose first pass is skipped) stops with its
    error and the others name it, where they would wait in DDP's next collective."""
    ctx = distributed.context()
    if not ctx.distributed:
        yield from batches
        return
    batch, end = iter(batches), object()
    while True:
        with ctx.together():
            item = next(batch, end)
        if item is end:
            return
        yield item


def _rng_state() -> dict:
    """The global RNG states as plain JSON (nothing a resumed run reads can run code): torch's and
    CUDA's byte states in base64, numpy's and Python's Mersenne Twister states as lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": _bytes_text(torch.get_rng_state()),
            "cuda": [_bytes_text(t) for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def _bytes_text(state: torch.Tensor) -> str:
    """A uint8 RNG state tensor as base64 text."""
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _text_bytes(text: str) -> torch.Tensor:
    """The uint8 RNG state tensor ``_bytes_text`` wrote."""
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def _legacy_rng_state(blob: str) -> dict:
    """The states a release before JSON RNG states saved as a base64 ``torch.save`` blob, read with
    ``weights_only`` (tensors and the numpy array of numpy's state, nothing that can run code)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    # named as numpy 1.x pickled it, and as numpy 2 does: a blob written under either loads under either
    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"),
               (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        s = torch.load(io.BytesIO(base64.b64decode(blob, validate=True)), weights_only=True)
    return {"torch": s["torch"], "cuda": s.get("cuda"), "numpy": tuple(s["numpy"]), "python": s["python"]}


def _set_rng_state(state: dict) -> None:
    """Restore the global RNG states ``_rng_state`` saved (or a legacy blob). Raises ValueError,
    TypeError, KeyError ... on a damaged record, for the caller to name."""
    if "blob" in state:
        s = _legacy_rng_state(state["blob"])
    else:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        version, internal, gauss_next = state["python"]
        s = {"torch": _text_bytes(state["torch"]),
             "cuda": None if state["cuda"] is None else [_text_bytes(text) for text in state["cuda"]],
             "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
             "python": (version, tuple(internal), gauss_next)}
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


CPU_FIX = "pass --device cpu (device='cpu'), or omit it to use CUDA only when there is one"


def resolve_device(device: str | torch.device | None, cpu_fix: str = CPU_FIX) -> torch.device:
    """``device`` as a torch.device (None: CUDA when available, else CPU). Raises ValueError
    naming the fix for a name torch does not know, a device type other than cpu and cuda
    (``meta``, ``mps`` ...) or a CUDA device this machine lacks, so a bad ``--device`` fails
    before any work. ``cpu_fix``: how the caller's user asks for the CPU
    instead, the fix a torch without CUDA is answered with (e.g. ``'call .to("cpu")'``)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name ({exc}); fix: pass cpu, cuda or cuda:N.") from exc
    if dev.type == "meta":
        raise ValueError("device 'meta' holds no weights or values, so nothing could train or embed; fix: pass cpu, "
                         "cuda or cuda:N.")
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, ...: torch parses them, masksc's ops and tests cover neither
        raise ValueError(f"device '{dev}': masksc runs on cpu and cuda devices only; fix: pass cpu, cuda or "
                         "cuda:N.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "finds no GPU" if torch.version.cuda else "was built without CUDA"
            raise ValueError(f"device {device!r}: this torch {torch.__version__} {why}; fix: {cpu_fix}.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible; fix: pass "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}.")
    return dev


def _prune(run_dir: Path, keep: int) -> None:
    """Delete epoch checkpoints beyond the newest ``keep + 1`` and what interrupted writes left. An
    epoch folder that is no checkpoint (a copy that lost its config.json, a folder of the user's)
    is neither counted nor deleted: masksc's own unfinished saves never carry an epoch's name."""
    epochs = [p for p in ckpt.epoch_dirs(run_dir) if ckpt.is_checkpoint(p)]
    last = ckpt.last_checkpoint(run_dir)
    for p in epochs[:-(keep + 1)]:
        if p != last:
            ckpt.remove_checkpoint(p)
    ckpt.remove_leftovers(run_dir)


@keeping_global_rngs()
def train(model: torch.nn.Module, X_grid_csr, cfg: TrainConfig, extra_state: dict | None = None,
          batches=None, callback=None) -> TrainResult:
    """Train a MaskSC (teacher set when MED is on) on cells in grid order.

    model: MaskSC, or a wrapper (DDP) whose ``.module`` is one and whose forward(batch, seed)
    is the loss. X_grid_csr: scipy CSR float32 [n, g*s] (GridLayout.to_grid output); may be
    None when ``batches`` is given. extra_state: JSON-able meta saved in every checkpoint
    (``preprocessor``, ``grid`` dicts, ...). batches: optional iterable of CSRBatch with
    ``set_epoch`` and ``len`` (default ``CellBatches(X, batch_size, shuffle=True, seed)``).
    callback(epoch, mean_loss) is called after each epoch. The main process holds
    ``cfg.checkpoint_dir`` while it trains (``holding_run_dir``). Returns a TrainResult.
    """
    with holding_run_dir(cfg.checkpoint_dir):
        return _train(model, X_grid_csr, cfg, extra_state, batches, callback)


@contextlib.contextmanager
def holding_run_dir(run_dir: str | os.PathLike | None, ctx=None):
    """Hold the run directory ``run_dir`` (``checkpoint.run_lock``, on the main rank of the
    ``DistContext`` ``ctx``, default the current process's) for the block, so that a second fit
    into it stops at once; one in use stops every rank. No-op for ``run_dir=None``."""
    from masksc import distributed
    ctx = ctx or distributed.context()
    with contextlib.ExitStack() as stack:
        if run_dir is not None:
            with ctx.together():  # the others would wait for rank 0 in the next collective
                if ctx.is_main:
                    stack.enter_context(ckpt.run_lock(run_dir))
        yield


def _train(model: torch.nn.Module, X_grid_csr, cfg: TrainConfig, extra_state: dict | None, batches,
           callback) -> TrainResult:
    """``train``'s work, in the run directory it holds."""
    core: MaskSC = getattr(model, "module", model)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if run_dir is not None:
        ckpt.check_run_dir(run_dir, cfg.resume)
    if X_grid_csr is not None:
        check_grid_columns(X_grid_csr, core.cfg.grid_shape)
    if batches is None:
        from masksc.data import CellBatches
        batches = CellBatches(X_grid_csr, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ValueError("no batches to train on; pass a non-empty matrix.")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warmup_steps >= total_steps:
        log.warning("warmup_epochs=%s covers all %s: the learning rate rises the whole run and never decays; "
                    "for a schedule that does, train more epochs than that, or set warmup_epochs below epochs "
                    "(warmup_epochs=N; `--set warmup_epochs=N` on `masksc fit`)", cfg.warmup_epochs,
                    counted(cfg.epochs, "epoch"))

    model.to(device)
    params = [p for p in core.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, cfg.min_lr_ratio))

    result = TrainResult()
    start_epoch, step = 0, 0
    if cfg.resume:
        last = ckpt.last_checkpoint(run_dir)
        if last is not None:
            start_epoch, step = _restore(core, optimizer, scheduler, run_dir, last, cfg, result, steps_per_epoch)
            if _is_main():  # a finished run writes nothing more: its model is the last checkpoint
                result.checkpoint = str(last)
                ckpt.remove_leftovers(run_dir)  # what a run killed while saving or pruning left
            log.info("resumed from %s at epoch %d (step %d)", last, start_epoch, step)
        elif (run_dir / "last").is_symlink():  # a run whose checkpoints are gone: said, as a missing directory is
            warn(f"resume=True (--resume), but {run_dir}/last names no checkpoint and there is none in {run_dir}; "
                 "starting the run again there (restore its checkpoints first if you meant to continue it)")
        else:
            log.info("resume=True but %s has no checkpoint yet; starting from scratch", run_dir)
    if cfg.resume and run_dir is not None:
        ckpt.check_resumed_saves(run_dir, [e for e in range(start_epoch + 1, cfg.epochs + 1)
                                           if e % cfg.checkpoint_every == 0 or e == cfg.epochs], start_epoch)
    if start_epoch == 0:
        seed_everything(cfg.seed)

    autocast = device.type == "cuda" and cfg.amp
    rank = _rank()
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        batches.set_epoch(epoch)
        source = batches
        if cfg.num_workers > 0:  # workers fork after set_epoch, so they see this epoch's order
            source = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.num_workers,
                                                 pin_memory=device.type == "cuda")
        total, count = 0.0, 0
        bar = progress_bar(source, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           disable=not cfg.progress or not _is_main(), leave=False)
        for i, batch in enumerate(_read_on_every_rank(bar)):
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(batch, mask_seed(cfg.seed, epoch, i, rank))
            value = loss.item()
            if not _finite_on_every_rank(math.isfinite(value), device):  # before the step: weights stay finite
                where = f"{value}" if not math.isfinite(value) else "non-finite on another rank"
                raise FloatingPointError(f"training loss became {where} at epoch {epoch + 1}, step {i + 1}; lower the "
                                         "learning rate or check the input for extreme values.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            n = batch.n_rows
            total += value * n
            count += n
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        mean = _mean_over_ranks(total, count, device)
        result.losses.append(mean)
        log.info("epoch %d/%d loss %.5f (%.1fs)", epoch + 1, cfg.epochs, mean, time.time() - t0)
        if callback is not None:
            callback(epoch, mean)
        done = epoch + 1
        with distributed.context().together():  # a save failing on rank 0 (a full disk) stops every rank
            if run_dir is not None and _is_main() and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
                state = {"epoch": done, "step": step, "losses": result.losses, "rng": _rng_state(),
                         "steps_per_epoch": steps_per_epoch, "world_size": _world_size()}
                name = f"epoch-{done:06d}"
                ckpt.save_checkpoint(run_dir / name, core, train_config=cfg.to_dict(), optimizer=optimizer,
                                     scheduler=scheduler, trainer_state=state, extra=extra_state)
                ckpt.point_last(run_dir, name)
                _prune(run_dir, cfg.keep_checkpoints)
                result.checkpoint = str(run_dir / name)
    result.epochs = cfg.epochs
    result.steps = step
    result.wall_s = time.time() - t0
    model.eval()
    return result


# Settings a resumed run must share with its checkpoint to continue the same trajectory.
_RESUME_FIXED = ("batch_size", "seed", "epochs", "lr", "weight_decay", "betas", "warmup_epochs", "min_lr_ratio",
                 "clip", "amp")


def check_resumable(run_dir: str | os.PathLike, model_cfg: MaskSCConfig, cfg: TrainConfig) -> None:
    """Raise CheckpointError, naming each difference, unless the run saved in ``run_dir`` was
    trained with ``model_cfg`` and the settings of ``cfg`` that fix its trajectory (the
    schedule depends on ``epochs``, so a finished run is not extended: start a new one)."""
    run_dir = Path(run_dir)
    config = ckpt.read_config(run_dir)
    was, now = config["model_config"], model_cfg.to_dict()
    if was != now:
        keys = [k for k in sorted(was.keys() | now.keys()) if was.get(k) != now.get(k)]
        diff = "; ".join(f"{k}: saved {was.get(k)!r}, requested {now.get(k)!r}" for k in keys)
        what = "other training settings" if set(keys) <= {f.name for f in dataclasses.fields(TrainConfig)} else \
            "a different model config"
        why = (" (the learning-rate schedule spans the run's epochs, so a longer or shorter run is a new one)"
               if "epochs" in keys else "")
        raise CheckpointError(f"the checkpoint in {run_dir} was trained with {what} ({diff}){why}; "
                              f"resume with the same preset/options or use a new model directory {_NEW_DIR}.")
    recorded = config.get("train_config")
    lacking = [key for key in _RESUME_FIXED if not isinstance(recorded, dict) or key not in recorded]
    try:  # every release recorded them all: a default would be compared as if the run had used it
        if lacking:
            raise ValueError(f"it lacks {lacking}")
        saved = TrainConfig.from_dict(recorded)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the training settings (train_config) saved in {run_dir} are damaged ({exc}); fix: "
                              f"restore the checkpoint's config.json from a copy, or use a new model directory "
                              f"{_NEW_DIR}.") from exc
    for key in _RESUME_FIXED:
        if getattr(saved, key) != getattr(cfg, key):
            raise CheckpointError(f"cannot resume: {key} was {getattr(saved, key)} in {run_dir} and is "
                                  f"{getattr(cfg, key)} now; resume with the same settings or use a new model "
                                  f"directory {_NEW_DIR}.")


_NEW_DIR = "(model_dir= in Python, -o on the command line)"


def _restore(core: MaskSC, optimizer, scheduler, run_dir: Path, last: Path, cfg: TrainConfig, result: TrainResult,
             steps_per_epoch: int):
    """Load the checkpoint ``last`` of the run ``run_dir`` into ``core``, ``optimizer``, ``scheduler``
    and ``result``; return (epoch, step) to continue from. CheckpointError names what does not fit."""
    check_resumable(run_dir, core.cfg, cfg)
    opt_state, state = ckpt.load_training_state(run_dir)
    if "world_size" not in state and _world_size() > 1:
        raise CheckpointError(f"cannot resume under {_world_size()} processes: the run in {run_dir} was saved by an "
                              "earlier masksc release, which split a streamed run's cells over processes otherwise, "
                              "so it would not continue the same run; fix: resume it with that release, or start "
                              f"again in a new model directory {_NEW_DIR}.")
    saved_world = state.get("world_size", 1)  # absent from checkpoints of earlier releases: one process
    # before the steps per epoch, which may not tell (1,000 cells, batch 256: 2 and 3 ranks alike)
    if saved_world != _world_size():
        processes = lambda n: f"{n} process{'es' if n != 1 else ''}"
        raise CheckpointError(f"cannot resume: the run in {run_dir} was trained by {processes(saved_world)} and this "
                              f"one has {processes(_world_size())}, so each one's cells and masks would not continue "
                              f"the run; resume with torchrun --nproc_per_node {saved_world}"
                              f"{' (or without torchrun)' if saved_world == 1 else ''}, or use a new model directory "
                              f"{_NEW_DIR}.")
    saved_steps = state.get("steps_per_epoch", steps_per_epoch)
    if saved_steps != steps_per_epoch:
        unrecorded = (" (the run was saved by an earlier masksc release, which did not record how many processes "
                      "trained it: if torchrun ran it on several, resume it with that release)"
                      if "world_size" not in state else "")
        raise CheckpointError(f"cannot resume: the run in {run_dir} took {saved_steps} steps per epoch and this data "
                              f"gives {steps_per_epoch}, so the schedule and masking would not continue the run; "
                              f"resume on the cells it was trained on{unrecorded}, or use a new model directory "
                              f"{_NEW_DIR}.")
    damage = _record_damage(state, cfg.epochs, steps_per_epoch)
    if damage:
        raise CheckpointError(f"the training record {last / ckpt.STATE} is damaged ({damage}); fix: restore it from "
                              f"a copy, or start the run again in a new directory {_NEW_DIR}.")
    try:
        core.load_state_dict(ckpt.load_state_dict(run_dir), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {run_dir} don't fit the model ({exc}); use a new model directory "
                              f"{_NEW_DIR}.") from exc
    settings = _group_settings(optimizer)  # this run's, which the saved groups must hold
    try:
        optimizer.load_state_dict(opt_state["optimizer"])
        if opt_state.get("scheduler") is not None:
            scheduler.load_state_dict(opt_state["scheduler"])
        damage = _optimizer_damage(optimizer, settings, state["step"])
        if damage is None:
            _set_rng_state(state["rng"])
    except Exception as exc:  # load_state_dict and the RNG setters raise many types on a damaged state
        damage = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    if damage:
        raise CheckpointError(f"the training state ({ckpt.OPTIMIZER}, {ckpt.STATE}) in {last} does not fit this run "
                              f"({damage}); fix: restore those files from a copy, or start the run again in a new "
                              f"directory {_NEW_DIR}.")
    result.losses = list(state["losses"])
    result.resumed_from_epoch = int(state["epoch"])
    return int(state["epoch"]), int(state["step"])


def _record_damage(state: dict, epochs: int, steps_per_epoch: int) -> str | None:
    """What in a checkpoint's training record ``state`` (types checked by ``load_training_state``)
    cannot be where a run of ``epochs`` epochs of ``steps_per_epoch`` steps stopped, or None: a
    checkpoint is written at the end of an epoch, with one mean loss per epoch so far."""
    epoch, step, losses = state["epoch"], state["step"], state["losses"]
    if not 1 <= epoch <= epochs:
        return f"epoch={epoch} of a run of {epochs} epochs"
    if step != epoch * steps_per_epoch:
        return f"step={step}, where epoch {epoch} of {steps_per_epoch} steps ends at {epoch * steps_per_epoch}"
    if len(losses) != epoch or not all(is_number(v) and math.isfinite(v) for v in losses):
        return f"{len(losses)} losses for {epoch} epochs, or not all finite numbers"
    return None


def _group_settings(optimizer) -> list[dict]:
    """Each parameter group's settings but its parameters and its scheduled ``lr``, sequences as
    tuples (a loaded state may hold a list where the optimiser made a tuple)."""
    return [{key: tuple(value) if isinstance(value, list) else value for key, value in group.items()
             if key not in ("params", "lr")} for group in optimizer.param_groups]


def _optimizer_damage(optimizer, settings: list[dict], step: int) -> str | None:
    """What in the AdamW state just loaded into ``optimizer`` does not fit this run, or None:
    every group holds this run's ``settings`` (betas, weight decay, eps, maximize ...: a bad one
    failed only at the first step, or trained on silently) and a finite learning rate, and every
    parameter both moments, of its shape and dtype, after ``step`` steps."""
    for group, loaded, expected in zip(optimizer.param_groups, _group_settings(optimizer), settings):
        for key, value in loaded.items():  # a key this torch does not know is one it does not use
            if key in expected and not value == expected[key]:
                return f"the parameter group's {key}={value!r} where this run sets {expected[key]!r}"
        if not is_finite_number(group.get("lr")):
            return f"the parameter group's lr={group.get('lr')!r}"
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                moment = st.get(key)
                if not isinstance(moment, torch.Tensor) or moment.shape != p.shape or moment.dtype != p.dtype:
                    found = (f"of shape {tuple(moment.shape)} and {moment.dtype}" if isinstance(moment, torch.Tensor)
                             else "missing")
                    return f"{key} {found} for a parameter of shape {tuple(p.shape)} and {p.dtype}"
            taken = st.get("step")
            if not isinstance(taken, torch.Tensor) or taken.numel() != 1 or float(taken) != step:
                return f"AdamW step {taken!r} where the record says {step}"
    return None


def _resumed_teacher(run_dir: Path, teacher, teacher_cfg):
    """The teacher a resumed run continues with: an untrained one of the config saved in ``run_dir``,
    whose weights come back with the checkpoint (it is not trained again). A ``teacher`` or
    ``teacher_cfg`` other than the saved one is refused rather than ignored; a given ``teacher`` is
    compared, never overwritten."""
    config = ckpt.read_config(run_dir)
    saved = config.get("teacher_config") or {}
    if teacher_cfg is not None:
        given = json.loads(json.dumps(teacher_cfg.to_dict()))
        for key in sorted(set(given) | set(saved)):
            if given.get(key) != saved.get(key):
                raise CheckpointError(f"cannot resume: the teacher in {run_dir} was trained with {key}="
                                      f"{saved.get(key)!r}, not {given.get(key)!r}; resume with the same teacher "
                                      "settings (or teacher_cfg=None: the checkpoint holds them) or use a new "
                                      "checkpoint_dir.")
    if teacher is not None:
        weights = {name[len("teacher."):]: value for name, value in ckpt.load_state_dict(run_dir).items()
                   if name.startswith("teacher.")}
        given = teacher.state_dict()
        if given.keys() != weights.keys() or any(not torch.equal(value.cpu(), weights[name])
                                                 for name, value in given.items()):
            raise CheckpointError(f"cannot resume: teacher= is not the teacher the run in {run_dir} was trained "
                                  "with; resume without teacher= (the checkpoint holds it) or use a new "
                                  "checkpoint_dir.")
    return ckpt.build_model(config).teacher


@keeping_global_rngs()
def fit_masksc(X_grid_csr, cfg: MaskSCConfig, train_cfg: TrainConfig | None = None, *, is_padding=None,
               teacher_cfg=None, extra_state: dict | None = None, teacher=None, progress: bool = True,
               model_class: type[MaskSC] = MaskSC):
    """The whole mask-sc recipe on cells in grid order: train the contrastive-sc teacher on
    ``cfg.target_fragment`` fragments (MED on, unless ``teacher`` is given), build the model
    (seeded by ``train_cfg.seed``), mark padding, train. Returns (model, TrainResult).

    X_grid_csr: scipy CSR float32 [n, g*s]; is_padding: bool [g*s] (GridLayout.is_padding);
    teacher_cfg: ContrastiveConfig for the teacher (default: ``teacher_config(cfg, train seed,
    X_grid_csr)``, the authors' settings with the dropout of ``auto_teacher_dropout``).
    model_class: MaskSC or a subclass (a research variant, built as ``model_class(cfg)``); a
    subclass's checkpoints resume here but load back only through that class.
    """
    from masksc.models.targets import fit_teacher, teacher_config

    train_cfg = train_cfg or TrainConfig.from_model_config(cfg, progress=progress)
    device = resolve_device(train_cfg.device)
    run_dir = Path(train_cfg.checkpoint_dir) if train_cfg.checkpoint_dir else None
    if run_dir is not None:
        ckpt.check_run_dir(run_dir, train_cfg.resume)
    if train_cfg.resume and run_dir is not None and ckpt.last_checkpoint(run_dir) is not None:
        check_resumable(run_dir, cfg, train_cfg)  # first: a run without a teacher has no teacher settings to name
        if cfg.med:
            teacher = _resumed_teacher(run_dir, teacher, teacher_cfg)
    if cfg.med and teacher is None:
        teacher_cfg = teacher_cfg or teacher_config(cfg, train_cfg.seed, X_grid_csr)
        teacher = fit_teacher(X_grid_csr, cfg.grid_shape, cfg.patch, cfg.target_fragment, teacher_cfg,
                              is_padding=is_padding, ime=cfg.ime, device=device, progress=progress)
    seed_everything(train_cfg.seed)
    model = model_class(cfg)
    if is_padding is not None:
        model.set_padding(is_padding)
    if cfg.med:
        model.set_teacher(teacher)
    result = train(model, X_grid_csr, train_cfg, extra_state=extra_state)
    return model, result
