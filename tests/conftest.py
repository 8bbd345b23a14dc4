"""Shared test fixtures.

Triton kernels are tested on the CPU through the Triton interpreter, which is read when the
kernels are first imported: it is switched on here, before any test module is collected,
unless a CUDA GPU is present (then the kernels run for real).
"""
import os
import shutil
from pathlib import Path

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data beside the repo, or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} absent: these tests read the paper's datasets from ../shared/data beside the repo")
    return SHARED_DATA
