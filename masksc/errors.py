"""Exceptions masksc raises for problems the user can fix, each message naming the fix, and the
warnings it gives."""
import contextlib
import os
import sys
import warnings


class MaskscError(Exception):
    """Base class of every error masksc raises on purpose."""


class DataError(MaskscError, ValueError):
    """The input data is unusable as given (shape, values, genes, labels, file)."""


class CheckpointError(MaskscError, ValueError):
    """A saved model is missing, corrupt, or does not fit the data it is applied to."""


class UncheckedGenesWarning(UserWarning):
    """Genes without names, matched to a model's by column position, in too few cells to check
    that they are the model's genes."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside masksc, so that the warning
    names the user's line (``tl.fit(...)``), not whichever masksc function noticed the problem
    (nor the wrapper of a masksc function decorated with ``torch.no_grad()`` and the like)."""
    wrappers = {contextlib.__file__, getattr(sys.modules.get("torch.utils._contextlib"), "__file__", None)}
    level, frame = 2, sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE) or frame.f_code.co_filename in wrappers):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 epoch", "40 epochs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
