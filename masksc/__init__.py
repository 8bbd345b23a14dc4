"""masksc: masked expression modeling for single-cell clustering."""
__version__ = "0.1.0"
