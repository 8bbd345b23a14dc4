"""Self-describing, atomically written checkpoints.

A checkpoint is a directory::

    config.json          format/version, model config, teacher config, train config,
                         preprocessing transform, grid layout (with the gene list), extra meta
    model.safetensors    model weights (teacher included when the model has one)
    optimizer.pt         optimizer + LR-scheduler state (training checkpoints only)
    trainer_state.json   epoch, step, per-epoch losses, RNG states (training checkpoints only)

It is written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written checkpoint under the final name. A checkpoint already there is swapped
with the new one in one atomic step on Linux (``renameat2(RENAME_EXCHANGE)``); where that is not
available it is first moved into a ``.old-<name>-*`` sibling, and a crash between the two renames
leaves it only there (loading ``path`` then names it). A training run keeps its checkpoints as
``<run>/epoch-000010/`` and an atomically swapped symlink ``<run>/last`` to the newest one.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from masksc import __version__
from masksc.errors import CheckpointError, warn
from masksc.io_utils import check_output, default_mode, fsync_dir, fsync_file, out_of_space
from masksc.models.contrastive import ContrastiveConfig, ContrastiveSC
from masksc.models.masksc_model import MaskSC, MaskSCConfig
from masksc.rng import keeping_global_rngs

logger = logging.getLogger(__name__)

FORMAT = "masksc-checkpoint"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, OPTIMIZER, STATE = "config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"
TRAINER_STATE_KEYS = ("epoch", "step", "losses", "rng")  # what a resumed run reads from STATE
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
_ASIDE = "x"  # a checkpoint moved aside is .old-<name>-*/x
# renameat2 errors meaning "no exchange here" (old kernel or C library, a filesystem without it)
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def _unwrap(model: torch.nn.Module) -> MaskSC:
    return getattr(model, "module", model)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, train_config: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    trainer_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return it.

    ``extra`` may hold ``preprocessor`` (Preprocessor.to_dict()), ``grid`` (GridLayout.to_dict())
    and any other JSON-able meta. An existing checkpoint at ``path`` is replaced (see
    ``_put_in_place``; then the old one is deleted); anything else there (a file, a folder that
    is not a checkpoint, such as a training run, or a symlink) is refused with a CheckpointError
    rather than deleted.
    """
    model = _unwrap(model)
    path = check_output(path, folder=True, via_sibling=True)
    _check_replaceable(path, training=optimizer is not None or trainer_state is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700; the checkpoint keeps this mode
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "masksc_version": __version__,
                  "model_config": model.cfg.to_dict(),
                  "teacher_config": model.teacher.cfg.to_dict() if model.teacher is not None else None,
                  "train_config": train_config, "meta": extra or {}}
        _write_json(tmp / CONFIG, config)
        save = uuid.uuid4().hex  # in each file: files of two saves (epochs, runs) put together are told apart
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "save": save})
        os.chmod(tmp / WEIGHTS, default_mode())  # safetensors creates it 0600; the other files get open()'s mode
        if optimizer is not None:
            with open(tmp / OPTIMIZER, "wb") as fh:
                torch.save({"optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None, "save": save}, fh)
                fh.flush()
                os.fsync(fh.fileno())
        if trainer_state is not None:
            _write_json(tmp / STATE, {**trainer_state, "save": save} if isinstance(trainer_state, dict) else
                        trainer_state)
        fsync_file(tmp / WEIGHTS)
        fsync_dir(tmp)
        old = _put_in_place(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(exc):
            again = (", then run again with --resume (resume=True), which continues from the last checkpoint "
                     "saved, if any" if trainer_state is not None else ", or save elsewhere")
            raise CheckpointError(f"no space left to write the checkpoint {path} (none of it is left behind, and "
                                  f"checkpoints saved before are intact); fix: free space there{again}.") from exc
        raise
    return path


def _check_replaceable(path: Path, training: bool) -> None:
    """Refuse (CheckpointError) to save at ``path`` when replacing what is there would lose
    something: a symlink, a folder that is not a masksc checkpoint, a checkpoint holding other
    files beside its own, or (``training`` off: a saved model, not a training checkpoint) a
    training checkpoint, whose optimiser state and training record the model would not keep."""
    if not os.path.lexists(path) or (path.is_dir() and not path.is_symlink() and not any(path.iterdir())):
        return
    if path.is_symlink() or not is_checkpoint(path):
        what = ("a symlink" if path.is_symlink() else "a training run directory (its checkpoints and last link)"
                if os.path.lexists(path / "last") or epoch_dirs(path) else "a folder that is not a masksc checkpoint")
        raise CheckpointError(f"{path} is {what}, and saving there would delete what it holds; fix: save to a new "
                              "directory (or to an existing checkpoint, which is replaced).")
    others = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG, WEIGHTS, OPTIMIZER, STATE))
    if others:
        raise CheckpointError(f"{path} is a checkpoint that also holds {others[:5]}{' ...' if len(others) > 5 else ''}, "
                              "which replacing it would delete; fix: save to a new directory, or move those out "
                              "first.")
    if not training and ((path / OPTIMIZER).exists() or (path / STATE).exists()):
        raise CheckpointError(f"{path} is a checkpoint of a training run; saving a model over it would drop its "
                              f"optimiser state and training record ({OPTIMIZER}, {STATE}), so the run could no "
                              "longer resume and `masksc plot loss` would find no losses; fix: save to a new "
                              "directory.")


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory masksc wrote (so replacing it loses nothing else)."""
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: nested past json's depth
        return False


@functools.cache
def _renameat2():
    """The C library's ``renameat2`` with its signature set, or None where there is none
    (not Linux, or glibc older than 2.28)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> None:
    """Swap the names ``a`` and ``b`` (both existing) in one atomic step. Raises OSError: ENOSYS
    where the C library has no ``renameat2``, EINVAL / EOPNOTSUPP (or ENOSYS) where the kernel
    or the filesystem cannot exchange."""
    renameat2 = _renameat2()
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(a))
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _put_in_place(tmp: Path, path: Path) -> Path | None:
    """Rename the finished checkpoint directory ``tmp`` to ``path`` and return where the directory
    it replaced now is, for the caller to delete (None: ``path`` was free). The replacement is
    one atomic exchange where the system has one, so a crash leaves the old or the new checkpoint
    at ``path``; elsewhere the old one is moved aside first, and a crash between the two renames
    leaves it only in a ``.old-*`` sibling (which ``resolve`` then names)."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return None
    try:
        _exchange(tmp, path)
        return tmp
    except OSError as exc:
        if exc.errno not in _NO_EXCHANGE:
            raise
    old = _move_aside(path)
    os.replace(tmp, path)
    return old


def _move_aside(path: Path) -> Path:
    """Rename ``path`` into a fresh ``.old-*`` sibling directory (one atomic step) and return that
    directory, so what is deleted next is never seen under a checkpoint name."""
    old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
    os.replace(path, old / _ASIDE)
    return old


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete the checkpoint directory ``path`` so that a crash part-way leaves either the whole
    checkpoint or nothing under its name (a leftover ``.old-*`` directory is removed by the next
    prune)."""
    path = Path(path)
    old = _move_aside(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(run_dir: str | os.PathLike) -> None:
    """Delete what an interrupted save_checkpoint, remove_checkpoint or point_last left in
    ``run_dir`` (their ``.tmp-epoch-*`` / ``.old-epoch-*`` / ``.old-last-*`` directories and
    ``.last-*.tmp`` links; a user's own hidden folders there are left alone). Call it only while
    no checkpoint is being written there."""
    for p in Path(run_dir).iterdir():
        if p.is_symlink():
            if re.fullmatch(r"\.last-\d+\.tmp", p.name):
                p.unlink()
        elif p.is_dir() and re.fullmatch(r"\.(tmp|old)-(epoch-\d{6}|last)-[a-z0-9_]{8}", p.name):
            shutil.rmtree(p, ignore_errors=True)  # only what saving the run's own names leaves (mkdtemp's suffix)


def epoch_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The epoch checkpoints (``epoch-000010``) in the training run directory ``run_dir``, oldest first."""
    return sorted(p for p in Path(run_dir).iterdir() if re.fullmatch(r"epoch-\d{6}", p.name))


def check_run_dir(path: str | os.PathLike, resume: bool = False) -> Path:
    """Refuse, before any work, a training run directory ``path`` that cannot be created or
    written (see ``io_utils.check_output``; MaskscError), that already holds a run or a saved
    model while ``resume`` is off (training there would mix two runs), or, with ``resume``, that
    is one checkpoint of a run rather than the run (CheckpointError). With ``resume``, a ``last``
    link that is missing or names no checkpoint while epoch checkpoints are there (a crash
    before the link was written, a deleted folder) is pointed at the newest of them, with a
    warning; nothing else is created. ``resume`` on a directory that does not exist (a typo?)
    starts a run there, with a warning. Returns ``path``."""
    path = check_output(path, folder=True)
    if not path.is_dir():
        if resume:  # a typo would otherwise start a new run in silence
            warn(f"resume=True (--resume), but there is no run directory {path}; starting a new run there (check the "
                 "path if you meant to continue one)")
        return path
    if (path / CONFIG).exists() and not is_checkpoint(path) and not (path / WEIGHTS).exists():
        # a folder of the user's: --resume, then "-o its parent", were the advice (a damaged checkpoint's is below)
        raise CheckpointError(f"{path} holds a {CONFIG} that is not a masksc checkpoint's (a folder of other work?); "
                              "fix: choose a new directory for the run (-o, model_dir=).")
    if not resume and (os.path.lexists(path / "last") or (path / CONFIG).exists() or epoch_dirs(path)):
        raise CheckpointError(f"{path} already holds a training run or a saved model; fix: pass --resume "
                              "(resume=True) to continue that run, or choose a new directory.")
    if resume and (path / CONFIG).exists():
        raise CheckpointError(f"{path} is one checkpoint (a saved model), not a training run directory, so there is "
                              f"no run to resume in it; fix: pass the run directory that holds it (-o "
                              f"{shlex.quote(str(path.parent))}, model_dir=) to resume that run.")
    if resume and not (path / "last" / CONFIG).is_file():
        saved = [p for p in epoch_dirs(path) if is_checkpoint(p)]
        named = (path / "last").resolve() if (path / "last").is_symlink() else None
        what = _unsavable(named) if named is not None and named.parent == path.resolve() else None
        if what:  # the checkpoint resumed from, damaged: refused before the link is moved (and that epoch retrained)
            instead = f"to resume from {saved[-1].name}" if saved else "to start the run again"
            raise CheckpointError(f"{path}/last names {named.name}, which {what}; fix: restore {named.name} from a "
                                  f"copy (the run resumes from it), or move it out of {path} {instead}.")
        if saved:
            how = "names no checkpoint" if os.path.lexists(path / "last") else "is missing"
            warn(f"{path}/last {how}; resuming from the newest checkpoint there, {saved[-1].name}")
            point_last(path, saved[-1].name)
    return path


def _unsavable(p: Path) -> str | None:
    """What in the epoch folder ``p`` save_checkpoint would refuse to replace (e.g. "has no
    config.json"); None when ``p`` is absent, an empty folder or a whole checkpoint."""
    if not os.path.lexists(p) or (p.is_dir() and not p.is_symlink() and not any(p.iterdir())):
        return None
    others = sorted(q.name for q in p.iterdir() if q.name not in (CONFIG, WEIGHTS, OPTIMIZER, STATE)) \
        if p.is_dir() and not p.is_symlink() else []
    return ("is a symlink" if p.is_symlink() else "is not a folder" if not p.is_dir() else
            f"has no {CONFIG}" if not (p / CONFIG).exists() else
            f"has a {CONFIG} masksc cannot read" if not is_checkpoint(p) else
            f"also holds {others[:5]}" if others else None)


def check_resumed_saves(run_dir: str | os.PathLike, epochs, done: int) -> None:
    """CheckpointError, before a resumed run trains, when an epoch folder it will save (``epochs``,
    after ``done``) holds something ``save_checkpoint`` would refuse to replace, e.g. a folder whose
    config.json was lost in a copy: the run would otherwise train up to that epoch and fail there."""
    run_dir = Path(run_dir)
    for epoch in epochs:
        p = run_dir / f"epoch-{epoch:06d}"
        what = _unsavable(p)
        if what:
            raise CheckpointError(f"{p} {what}, and the resumed run saves epoch {epoch} there; fix: restore "
                                  f"{p.name} from a copy or move it out of {run_dir} (the run resumes after epoch "
                                  f"{done}).")


_LOCKED: dict[str, list] = {}  # run directory -> [holding thread, depth] for the directories this process holds
_LOCKED_GUARD = threading.Lock()


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold the training run directory ``run_dir`` (created if missing, and removed again if the fit
    left it empty) while a fit writes into it:
    an exclusive ``flock`` on the directory itself (no lock file is left), so a second fit into
    it, in another process or another thread, fails at once with a CheckpointError instead of
    the two overwriting each other's checkpoints. Re-entrant in the thread that holds it. Where
    the filesystem cannot lock a folder (NFS) or there is no ``fcntl`` (Windows), the fit goes on
    unguarded."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    run_dir = check_output(run_dir, folder=True)  # a path that cannot be a folder is named, not an OSError
    key, me = os.path.realpath(run_dir), threading.get_ident()
    with _LOCKED_GUARD:
        held = _LOCKED.get(key)
        if held is not None and held[0] != me:
            raise _in_use(run_dir)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield
        finally:
            with _LOCKED_GUARD:
                held[1] -= 1
        return
    real = Path(key)  # "missing/../kept" is kept: what is removed is judged on the real path
    created = [p for p in (real, *real.parents) if not p.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)  # as typed, so that the fit's own paths exist
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise _in_use(run_dir) from exc
        except OSError as exc:  # e.g. NFS, which locks only files opened for writing: train unguarded
            logger.info("cannot lock %s (%s); a second fit into it would not be stopped", run_dir, exc)
        with _LOCKED_GUARD:
            if key in _LOCKED:  # another thread took it meanwhile (flock does not tell threads apart)
                raise _in_use(run_dir)
            _LOCKED[key] = [me, 1]
        try:
            yield
        finally:
            with _LOCKED_GUARD:
                del _LOCKED[key]
            for folder in created:  # a fit that wrote nothing (bad input, Ctrl-C early) leaves no empty folder
                try:
                    folder.rmdir()
                except OSError:  # not empty: a run is there
                    break
    finally:
        os.close(fd)  # releases the flock


def _in_use(run_dir: Path) -> CheckpointError:
    return CheckpointError(f"{run_dir} is in use: another fit is writing its run there; fix: wait for it to finish "
                           "(if it stops early, --resume continues it), or choose another directory.")


def point_last(run_dir: str | os.PathLike, target_name: str) -> None:
    """Atomically make ``run_dir/last`` a symlink to ``run_dir/target_name``. A ``last`` that is
    a folder (a copy of a checkpoint, as ``cp -rL`` or ``scp -r`` make of the link) is moved
    aside first and deleted once the link is in place."""
    run_dir = Path(run_dir)
    last = run_dir / "last"
    tmp = run_dir / f".last-{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target_name, tmp)
    copy = _move_aside(last) if last.is_dir() and not last.is_symlink() else None
    os.replace(tmp, last)
    fsync_dir(run_dir)
    if copy is not None:
        shutil.rmtree(copy, ignore_errors=True)


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``run_dir/last`` points at, as ``run_dir/<the name it links to>`` (that
    entry may itself be a link elsewhere), or ``run_dir/last`` when it is a copied folder; None
    when ``last`` names nothing."""
    run_dir = Path(run_dir)
    last = run_dir / "last"
    if not last.exists():
        return None
    return run_dir / (Path(os.readlink(last)).name if last.is_symlink() else last.name)


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: itself when it holds config.json, else its ``last``.
    Raises CheckpointError when neither exists."""
    path = Path(path)
    if not path.exists():
        aside = _moved_aside(path)
        if aside is not None:
            raise CheckpointError(f"no checkpoint at {path}, but {aside} holds a complete masksc checkpoint that an "
                                  f"interrupted save moved aside; fix: rename it back (mv {shlex.quote(str(aside))} "
                                  f"{shlex.quote(str(path))}).")
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist; pass the directory "
                              "`masksc fit -o` / train(checkpoint_dir=...) wrote.")
    if (path / CONFIG).is_file():
        return path
    if (path / "last" / CONFIG).is_file():
        return (path / "last").resolve()
    saved = [p for p in epoch_dirs(path) if is_checkpoint(p)] if path.is_dir() else []
    if saved:  # a training run whose last link is missing or names a deleted checkpoint
        how = "names no checkpoint" if os.path.lexists(path / "last") else "is missing"
        raise CheckpointError(f"{path} is a training run, but its last link {how}; the newest complete checkpoint "
                              f"there is {saved[-1].name}; fix: pass {shlex.quote(str(saved[-1]))} (`masksc fit "
                              "--resume` on the run points last at it again).")
    raise CheckpointError(f"{path} is not a masksc checkpoint (no {CONFIG}, no last/{CONFIG}); pass a checkpoint "
                          "directory or a training run directory.")


def _moved_aside(path: Path) -> Path | None:
    """The newest complete checkpoint that ``_move_aside`` left for ``path`` in a ``.old-*``
    sibling (a save interrupted between its two renames), or None."""
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return None
    pattern = re.escape(f".old-{path.name}-") + r"[a-z0-9_]{8}"  # tempfile.mkdtemp's suffix
    found = [p / _ASIDE for p in siblings if re.fullmatch(pattern, p.name)]
    found = [p for p in found if is_checkpoint(p) and (p / WEIGHTS).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def read_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of the checkpoint at ``path`` (validated format and version)."""
    ckpt = resolve(path)
    try:
        config = json.loads((ckpt / CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # bad JSON, not UTF-8, nested past the parser's depth
        raise CheckpointError(f"{ckpt / CONFIG} is unreadable or corrupt ({exc}); retrain or restore the "
                              "checkpoint from a copy.") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / CONFIG} is not a masksc checkpoint config; pass a directory written by "
                              "masksc.")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {config.get('format_version')!r} (masksc "
                              f"{config.get('masksc_version')}) is not {FORMAT_VERSION} (this masksc {__version__}); "
                              "load it with the masksc version that wrote it or retrain.")
    return config


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of the checkpoint at ``path`` (CPU tensors)."""
    ckpt = resolve(path)
    f = ckpt / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"{f} is missing; the checkpoint is incomplete — retrain or restore it.")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{f} is corrupt ({exc}); retrain or restore the checkpoint from a copy.") from exc


def build_model(config: dict) -> MaskSC:
    """An untrained MaskSC (with an untrained teacher where the config has one) from a config.json dict.
    The caller's global generators are left as they were (the initial weights are overwritten by
    loading, so drawing them must not shift the user's later random draws)."""
    try:
        with keeping_global_rngs():
            model = MaskSC(MaskSCConfig.from_dict(config["model_config"]))
            if config.get("teacher_config") is not None:
                model.set_teacher(ContrastiveSC(ContrastiveConfig.from_dict(config["teacher_config"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's model config does not fit this masksc version ({exc}); it was "
                              "written by another version or edited: load it with the masksc version that wrote it, "
                              "restore its config.json from a copy, or retrain.") from exc
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MaskSC, dict]:
    """Load a model for inference: returns (model in eval mode on ``device``, meta) where meta is
    the config.json dict (``meta["meta"]["preprocessor"]`` / ``["grid"]`` hold the transform and
    the gene layout; ``meta["path"]`` the resolved checkpoint directory)."""
    config = read_config(path)
    model = build_model(config)
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not match the saved config ({exc}); the checkpoint is corrupt or "
                              "mixed from two runs — retrain or restore it.") from exc
    config["path"] = str(resolve(path))
    return model.to(device).eval(), config


def read_losses(path: str | os.PathLike) -> list[float]:
    """The per-epoch mean training losses recorded in a training checkpoint (or a run
    directory's ``last`` one), without reading its weights or optimiser state."""
    ckpt = resolve(path)
    try:
        return [float(v) for v in json.loads((ckpt / STATE).read_text())["losses"]]
    except FileNotFoundError as exc:
        raise CheckpointError(f"{ckpt} holds no training record ({STATE}): it was saved by MaskSCModel.save, not by "
                              "training; fix: pass the directory `masksc fit -o` wrote.") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"the training record {ckpt / STATE} is corrupt ({exc}); fix: restore it from a "
                              "copy.") from exc


def load_training_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """(optimizer.pt contents, trainer_state.json contents) of a training checkpoint."""
    ckpt = resolve(path)
    try:
        opt = torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True)  # no pickled code runs
        state = json.loads((ckpt / STATE).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{exc.filename} is missing, so the run cannot resume from {ckpt}; fix: restore it "
                              "from a copy, or start the run again in a new directory (its model can still be "
                              "loaded and embed).") from exc
    except Exception as exc:  # torch.load raises many types on a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"the training state ({OPTIMIZER}, {STATE}) in {ckpt} is damaged ({first}); fix: "
                              "restore those files from a copy, or start the run again in a new directory.") from exc
    damage = _training_state_damage(opt, state)
    if damage:
        raise CheckpointError(f"the training state in {ckpt} is damaged ({damage}); fix: restore it from a copy, or "
                              "start the run again in a new directory.")
    _check_one_save(ckpt, opt, state)
    return opt, state


def _check_one_save(ckpt: Path, opt: dict, state: dict) -> None:
    """Raise CheckpointError when the weights, optimiser state and training record of the training
    checkpoint ``ckpt`` were not written by one save (a file copied in from another epoch's folder:
    the run would go on from one epoch's weights with another's optimiser state, or retrain an
    epoch). Checkpoints of earlier releases record no save: theirs are not compared. Weights that
    cannot be read are left for loading them to name."""
    from safetensors import safe_open
    try:
        with safe_open(str(ckpt / WEIGHTS), framework="pt") as fh:
            weights = (fh.metadata() or {}).get("save")
    except (SafetensorError, OSError, ValueError):
        return
    saves = {WEIGHTS: weights, OPTIMIZER: opt.get("save"), STATE: state.get("save")}  # ids' types: checked before
    if len(set(saves.values())) > 1:
        groups = {}
        for name, save in saves.items():
            groups.setdefault(save, []).append(name)
        apart = " apart from ".join(" and ".join(names) for names in groups.values())
        raise CheckpointError(f"the files of the checkpoint {ckpt} were written by different saves ({apart}), as when "
                              "one is copied in from another epoch's folder: the run would go on from one epoch's "
                              "weights with another's optimiser state or epoch count; fix: restore the folder whole "
                              "from one copy, or start the run again in a new directory.")


def _training_state_damage(opt, state) -> str | None:
    """What is wrong with a training checkpoint's optimiser state ``opt`` and ``trainer_state``
    ``state`` as read back, or None when a resumed run can use them."""
    if not isinstance(opt, dict) or "optimizer" not in opt:
        return f"{OPTIMIZER} holds no optimizer state"
    if not isinstance(state, dict):
        return f"{STATE} holds a {type(state).__name__}, not a record"
    missing = [key for key in TRAINER_STATE_KEYS if key not in state]
    if missing:
        return f"{STATE} lacks {missing}"
    bad = [key for key in ("epoch", "step") if isinstance(state[key], bool) or not isinstance(state[key], int)
           or state[key] < 0]
    if bad:
        return f"{STATE} has {', '.join(f'{key}={state[key]!r}' for key in bad)}, not a count"
    if not isinstance(state["losses"], list):
        return f"{STATE} has losses={state['losses']!r}, not a list"
    for key in ("steps_per_epoch", "world_size"):  # absent from checkpoints of earlier releases
        value = state.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{STATE} has {key}={value!r}, not a count"
    for name, record in ((OPTIMIZER, opt), (STATE, state)):  # the id of the save that wrote it (weights: a str)
        if record.get("save") is not None and not isinstance(record["save"], str):
            return f"{name} holds save={record['save']!r}, not a save's id"
    return None


def check_genes(meta: dict, genes) -> None:
    """Refuse data whose genes don't cover the model's grid genes.

    meta: the dict from ``load_model`` (or a GridLayout dict); genes: the data's gene names.
    Raises CheckpointError naming how many genes are missing and the fix.
    """
    grid = meta.get("meta", {}).get("grid") if "meta" in meta else meta
    if not grid or "genes" not in grid:
        raise CheckpointError("the checkpoint has no saved gene layout, so new data cannot be matched to it; "
                              "save the model with extra={'grid': GridLayout.to_dict()}.")
    needed = [g for g in grid["genes"] if g]
    needed_set, have = set(needed), set(map(str, genes))
    missing = [g for g in needed if g not in have]
    if missing:
        folded = {}  # the data's names the model lacks, by lower case (the first in the data's order)
        for name in map(str, genes):
            if name not in needed_set:
                folded.setdefault(name.lower(), name)
        case = [(g, folded[g.lower()]) for g in missing if g.lower() in folded]
        cased = (f" Every one is in the data in another case (e.g. {case[0][1]!r} for {case[0][0]!r}): names must "
                 "match exactly." if len(case) == len(missing) else "")
        raise CheckpointError(f"{len(missing)} of the {len(needed)} genes on the model's grid (its input) are missing "
                              f"from the data (e.g. {missing[:5]}); fix: use data measured on the same genes with the same "
                              f"gene naming (e.g. symbols vs Ensembl ids), or retrain the model on this data.{cased}")
