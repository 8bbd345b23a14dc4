"""Output files: checked before any work, written atomically (nothing is half-written if a
process dies mid-write)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from masksc.errors import MaskscError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` / ``mkdir`` would give under the current umask (mkstemp and
    mkdtemp use 0600 / 0700 instead)."""
    return (0o777 if directory else 0o666) & ~_umask()


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk or an exhausted quota, also as libraries pass it on (torch's
    RuntimeError raised while handling the OSError, safetensors' error naming the OS error)."""
    for error in (exc, exc.__cause__, exc.__context__):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    return any(text in str(exc) for text in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the open file ``fd`` on disk now, so that a full disk is an OSError
    here rather than a SIGBUS when a memory map of the file is written later. Where the system
    or the filesystem cannot allocate ahead (no ``posix_fallocate``, as on macOS and Windows;
    EOPNOTSUPP / EINVAL) nothing is done."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _unwritable(path: Path, folder: Path, exc: OSError) -> MaskscError:
    return MaskscError(f"cannot write {path}: cannot write in {folder} ({exc.strerror or exc}); fix: choose an "
                       "output in a folder you can write to.")


def check_output(path: str | os.PathLike, source: str | os.PathLike | None = None, *, folder: bool = False,
                 suffixes: tuple[str, ...] = (), overwrite: bool = True, flag: str = "-o",
                 via_sibling: bool = False) -> Path:
    """Refuse, before any work, an output that would fail or do harm: ``path`` does not end in
    one of ``suffixes`` (when given; e.g. ``(".h5ad",)``), is the input file ``source``, is a
    folder where a file goes (a file where a folder goes when ``folder``), is an existing file
    and ``overwrite`` is False (the command line's default: a user's file is not replaced
    unasked), lies under a file, or lies in a folder this process cannot write. Creates nothing
    (the check makes and removes a hidden probe directory). Raises MaskscError naming ``path``
    and the fix (``flag``: the option that names it); returns ``path``. ``via_sibling``: a folder
    written as a hidden sibling and renamed into place (a checkpoint), so the folder holding it
    must be writable, and an existing one too (its old files are deleted)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise MaskscError(f"output {path} must end in {' or '.join(suffixes)}; fix: e.g. "
                          f"{flag} {path.with_suffix(suffixes[0])}.")
    if source is not None and _same_file(path, Path(source)):
        raise MaskscError(f"output {path} is the input file; fix: write to a new file (the input is never "
                          "modified).")
    if path.exists() and path.is_dir() != folder:
        want, found = ("a folder", "a file") if folder else ("a file", "a folder")
        raise MaskscError(f"output {path} is {found}, not {want}; fix: choose another output path.")
    if not overwrite and not folder and os.path.lexists(path):  # a symlink pointing nowhere is there too
        what = "exists" if path.exists() else f"is a symlink to {os.readlink(path)}, which leads to no file"
        raise MaskscError(f"output {path} {what}; fix: pass --overwrite (overwrite=True) to replace it, or choose a "
                          f"new path ({flag}).")
    existing = nearest_existing(path if folder and not via_sibling else path.parent)
    if not existing.is_dir():
        raise MaskscError(f"cannot create {path}: {existing} is a file, not a folder; fix: choose an output "
                          "path inside a folder.")
    # replaced through a sibling, an existing folder is emptied too: written in (a folder a user made read-only
    # would be left behind, hidden, its files undeletable)
    for folder_written in [existing] + ([path] if via_sibling and path.is_dir() else []):
        try:  # os.access is not enough: it says yes to root in /proc, where nothing can be created
            os.rmdir(tempfile.mkdtemp(prefix=".masksc-probe-", dir=folder_written))
        except OSError as exc:
            raise _unwritable(path, folder_written, exc) from exc
    return path


def nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest ancestor that does (what a folder still to
    be made would be made in)."""
    while not path.exists():
        path = path.parent
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError):  # either one does not exist, or is a symlink loop
        return False


def fsync_file(path: str | os.PathLike) -> None:
    """Flush the file ``path``'s data to disk."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush the folder ``path``'s entries (a rename or link made in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def frame_bytes(frame) -> int:
    """A lower bound of the bytes a pandas DataFrame (``obs``, ``var``) takes in an ``.h5ad``: its
    names, its numbers, and its text and categories as anndata writes them (a text column with
    repeats as categories: each distinct value once, a code a cell); a text value counts its
    characters and the 16-byte header HDF5 stores it under."""
    import pandas as pd

    text = lambda values: sum(len(str(x)) + 16 for x in values)
    total = text(frame.index)
    for _, column in frame.items():
        if pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
            total += column.array.nbytes  # a nullable column's values and mask, as written (not objects)
            continue
        categories = (column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else
                      pd.Index(column.dropna().unique()))
        numeric = pd.api.types.is_numeric_dtype(categories.dtype)
        total += len(column) + (categories.to_numpy().nbytes if numeric else text(categories))  # codes: 1 byte+
    return total


def anndata_bytes(adata) -> int:
    """A lower bound of the bytes an ``.h5ad`` of ``adata`` takes: the numbers of its matrices (``X``,
    ``layers``, ``obsm``, ``varm``, ``obsp``, ``varp``, ``raw.X``) and its ``obs`` and ``var``
    (:func:`frame_bytes`; ``uns`` not counted)."""
    arrays = [adata.X, *adata.layers.values(), *adata.obsm.values(), *adata.varm.values(), *adata.obsp.values(),
              *adata.varp.values(), *([adata.raw.X] if adata.raw is not None else [])]
    sparse = lambda x: all(hasattr(x, part) for part in ("data", "indices", "indptr"))
    return frame_bytes(adata.obs) + frame_bytes(adata.var) + sum(
        x.data.nbytes + x.indices.nbytes + x.indptr.nbytes if sparse(x) else int(getattr(x, "nbytes", 0) or 0)
        for x in arrays if x is not None)


STRUCTURE_BYTES = 2**20  # room counted for an .h5ad's own structure (HDF5 headers, anndata's groups)


def check_free_space(path: Path, nbytes: int) -> None:
    """OSError (ENOSPC) before ``path`` is written when its folder has fewer than ``nbytes`` bytes
    and ``STRUCTURE_BYTES`` free: h5py meets a full disk while closing a file, as a RuntimeError
    after which the process can crash in its teardown, where this is an ordinary error. (Space
    taken between this check and the write still fails there.)"""
    need, free = nbytes + STRUCTURE_BYTES, shutil.disk_usage(path.parent).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device: {path} needs at least {need / 2**20:.1f} MiB, and "
                                    f"{free / 2**20:.1f} MiB are free")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str | None = None, min_bytes: int = 0, replace: bool = True):
    """Yield a temporary path beside ``path``; on success it is published as ``path`` atomically
    (after an fsync; see :func:`publish`, ``replace=False`` keeps a ``path`` that exists by
    then), on any exception it is removed and ``path`` is left untouched.
    Raises MaskscError naming ``path`` when its folder cannot be created or written or the
    final rename fails, and OSError (ENOSPC) before anything is written when its folder lacks
    room for ``min_bytes`` bytes (``check_free_space``; 0: not checked)."""
    path = Path(path)
    created = []
    try:
        created = make_folders(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp",
                                   dir=path.parent)
    except OSError as exc:
        remove_empty_folders(created)
        raise _unwritable(path, path.parent, exc) from exc
    os.close(fd)
    os.chmod(tmp, default_mode())
    try:
        if min_bytes:
            check_free_space(path, min_bytes)
        yield Path(tmp)
        fsync_file(tmp)
        publish(tmp, path, replace)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        remove_empty_folders(created)
        raise


def publish(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = True) -> None:
    """Rename the finished file ``tmp`` to ``path`` in one step and sync the folder. With
    ``replace=False`` an existing ``path`` (one another command wrote since the output was
    checked, say) is kept and MaskscError raised, ``tmp`` left for the caller to remove.
    MaskscError names ``path`` when the rename fails."""
    path = Path(path)
    try:
        if replace:
            os.replace(tmp, path)
        elif not _move_unless_taken(tmp, path):
            raise MaskscError(f"output {path} was written by another command while this one ran, and is kept; fix: "
                              "pass --overwrite (overwrite=True) to replace it, or choose a new path.")
    except OSError as exc:
        raise _unwritable(path, path.parent, exc) from exc
    fsync_dir(path.parent)


def _move_unless_taken(tmp, path: Path) -> bool:
    """Move ``tmp`` to ``path`` unless ``path`` exists (False, ``tmp`` left): a hard link fails
    rather than replaces; where the filesystem has none, an existence check before the rename
    leaves a moment's race."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            return False
        os.replace(tmp, path)
        return True
    os.unlink(tmp)
    return True


def make_folders(folder: str | os.PathLike) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first, so that a failed write
    can take them away again (:func:`remove_empty_folders`) and leave the filesystem as it was."""
    folder = Path(folder)
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir(exist_ok=True)
    return missing[::-1]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (as :func:`make_folders` returned them) innermost first, each only if empty."""
    for f in reversed(folders):
        with contextlib.suppress(OSError):
            f.rmdir()
