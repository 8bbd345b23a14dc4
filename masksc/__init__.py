"""masksc: masked expression modeling for single-cell clustering."""
__version__ = "0.1.0"

import importlib

# Submodules reachable as attributes after a plain `import masksc` (masksc.tl, masksc.pipeline, ...),
# imported on first use so that `import masksc` stays light (anndata, torch, FAISS, matplotlib load when needed;
# the `masksc` command answers a Ctrl-C while they load).
_SUBMODULES = ("checkpoint", "checks", "cli", "cluster", "data", "demo", "distributed", "embed", "errors",
               "io_utils", "masking", "models", "ops", "outofcore", "pipeline", "pl", "progress", "rng", "tl", "train")

__all__ = ["read", "__version__", *_SUBMODULES]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name == "read":  # the one-call entry point: masksc.read(path)
        return importlib.import_module("masksc.data").read
    if name in _SUBMODULES:
        return importlib.import_module(f"masksc.{name}")
    raise AttributeError(f"module 'masksc' has no attribute {name!r}")
