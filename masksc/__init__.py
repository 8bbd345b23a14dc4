"""masksc: masked expression modeling for single-cell clustering."""
__version__ = "0.1.0"

from masksc.data import read  # noqa: E402  (the one-call entry point: masksc.read(path))

__all__ = ["read", "__version__"]
