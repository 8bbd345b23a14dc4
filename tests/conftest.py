"""Shared test fixtures.

Triton kernels are tested on the CPU through the Triton interpreter, which is read when the
kernels are first imported: it is switched on here, before any test module is collected,
unless a CUDA GPU is present (then the kernels run for real).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numba
import pytest
import torch

# numba (scanpy's parallel loops) and torch share the OpenMP runtime, and numba resets its thread
# count to numba's own (every core) whenever it starts a parallel loop; under OMP_NUM_THREADS=1
# that changes torch's float reduction order mid-session. Tests comparing two trainings need
# both on one count.
numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data beside the repo, or skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} absent: these tests read the paper's datasets from ../shared/data beside the repo")
    return SHARED_DATA


def compile_for_sm90(script: str) -> str:
    """Run ``script`` (which compiles Triton kernels for sm_90 and prints a count) in a fresh
    interpreter without TRITON_INTERPRET, so Triton's GPU lowering runs without a GPU; returns
    its stdout, failing the test with its stderr when it fails."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
