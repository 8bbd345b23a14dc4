"""Exceptions masksc raises for problems the user can fix; each message names the fix."""


class MaskscError(Exception):
    """Base class of every error masksc raises on purpose."""


class DataError(MaskscError, ValueError):
    """The input data is unusable as given (shape, values, genes, labels, file)."""


class CheckpointError(MaskscError, ValueError):
    """A saved model is missing, corrupt, or does not fit the data it is applied to."""
