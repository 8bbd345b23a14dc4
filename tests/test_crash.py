"""Crash safety: `masksc fit` killed with SIGKILL mid-run resumes from its last checkpoint to the
weights of an uninterrupted run; no corrupt checkpoint is ever left under a checkpoint name."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from masksc import checkpoint as ckpt
from masksc.data import write_synthetic_h5ad
from masksc.pipeline import MaskSCModel

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
TINY = ["--preset", "demo", "--epochs", str(EPOCHS), "--grid", "16x16", "--batch-size", "40",
        "--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2", "--set", "decoder_dim=32",
        "--set", "decoder_depth=1", "--set", "decoder_heads=2", "--checkpoint-every", "1",
        "--chunk-size", "64", "--teacher-cells", "200", "--teacher-set", "epochs=2", "--device", "cpu"]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _fit(data, out, *extra, **kw):
    return subprocess.Popen([sys.executable, "-m", "masksc", "fit", str(data), "-o", str(out), *TINY, *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _epoch_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if re.fullmatch(r"epoch-\d{6}", p.name))


def _wait_for_last(run: Path, epoch: int, proc) -> float:
    """Poll until ``run/last`` points at epoch ``epoch`` or later; the time it did."""
    deadline = time.time() + 120
    while not ((run / "last").exists() and int(os.readlink(run / "last").split("-")[1]) >= epoch):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"no checkpoint of epoch {epoch} appeared"
        time.sleep(0.01)
    return time.time()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    data = tmp_path / "cells.h5ad"
    write_synthetic_h5ad(data, 600, n_genes=300, n_types=3, seed=9)
    ref = _fit(data, tmp_path / "ref")           # the uninterrupted run, alongside the one we kill
    run = tmp_path / "run"
    victim = _fit(data, run)
    t1 = _wait_for_last(run, 1, victim)
    t2 = _wait_for_last(run, 2, victim)
    time.sleep((t2 - t1) / 2)                    # half an epoch on this machine: inside epoch 3
    victim.send_signal(signal.SIGKILL)
    _, err = victim.communicate()
    assert victim.returncode == -signal.SIGKILL

    # every checkpoint present loads completely; nothing half-written carries a checkpoint name
    dirs = _epoch_dirs(run)
    assert dirs and (run / "last").resolve() in [d.resolve() for d in dirs]
    for d in dirs:
        ckpt.load_model(d)
        ckpt.load_training_state(d)
    for p in run.iterdir():
        assert (p.name == "last" or re.fullmatch(r"epoch-\d{6}", p.name)
                or p.name.startswith((".tmp-", ".old-", ".last-")))
    saved = int((run / "last").resolve().name.split("-")[1])
    logged = [int(m) for m in re.findall(r"epoch (\d+)/%d loss" % EPOCHS, err)]
    assert saved >= (max(logged) if logged else 0) - 1   # at most the epoch in progress (+ one) is lost
    assert saved < EPOCHS, "the run finished before it was killed; the test did not interrupt it"
    MaskSCModel.load(run)                         # the run dir resolves to its last complete checkpoint

    resumed = _fit(data, run, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {run / f'epoch-{saved:06d}'} at epoch {saved}" in err
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    a = ckpt.load_state_dict(run)
    b = ckpt.load_state_dict(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # exact resume
    sa, sb = ckpt.load_training_state(run)[1], ckpt.load_training_state(tmp_path / "ref")[1]
    assert sa["epoch"] == sb["epoch"] == EPOCHS and sa["losses"] == sb["losses"]


@pytest.mark.slow
def test_sigterm_stops_fit_as_ctrl_c_does(tmp_path):
    """SIGTERM (kill, timeout, a scheduler) used to end the process where it stood, leaving
    whatever was being written; it now stops the command as Ctrl-C does: partial writes removed,
    exit status 143, and the resume hint."""
    data = tmp_path / "cells.h5ad"
    write_synthetic_h5ad(data, 600, n_genes=300, n_types=3, seed=9)
    run = tmp_path / "run"
    victim = _fit(data, run)
    _wait_for_last(run, 1, victim)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.rstrip().endswith(f"masksc fit: terminated; continue with the same command and --resume "
                                 f"(checkpoints are in {run}).")
    assert all(p.name == "last" or re.fullmatch(r"epoch-\d{6}", p.name) for p in run.iterdir())
    for d in _epoch_dirs(run):
        ckpt.load_training_state(d)
