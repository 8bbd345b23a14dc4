"""Leaving the caller's global random generators as they were: training seeds Python's, numpy's
and torch's own generators (for runs that repeat bit for bit), which a notebook's later unseeded
draws would otherwise inherit, as scanpy's tools (``random_state=``) never make them."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def keeping_global_rngs():
    """Context manager (and decorator) that restores the states of ``random``, ``np.random``,
    torch's CPU generator and, when CUDA is initialised, every CUDA generator on exit."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
