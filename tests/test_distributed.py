"""DDP training and sharded embedding on CPU: gloo backend, 2 processes launched by torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from masksc import distributed, pipeline
from masksc.data import write_synthetic_h5ad
from masksc.errors import CheckpointError
from masksc.pipeline import MaskSCModel

ROOT = Path(__file__).resolve().parents[1]

# each worker's start: argv (data, out folder), the process group, tiny model settings
PREAMBLE = """
import sys
from masksc import distributed, pipeline
data, out = sys.argv[1], sys.argv[2]
ctx = distributed.init_from_env("cpu")
tiny = dict(grid_shape=(16, 16), batch_size=40, embed_dim=32, depth=1, num_heads=2, decoder_dim=32,
            decoder_depth=1, decoder_heads=2)
"""

WORKER = PREAMBLE + """
import json
from safetensors.torch import save_file
assert ctx.world_size == 2 and ctx.distributed
model, result = pipeline.fit(data, "demo", model_dir=f"{out}/run", epochs=4, progress=False, chunk_size=64,
                             teacher_cells=200, teacher_overrides={"epochs": 2}, dist=ctx, **tiny)
save_file({k: v.contiguous() for k, v in model.network.state_dict().items()}, f"{out}/rank{ctx.rank}.safetensors")
with open(f"{out}/losses{ctx.rank}.json", "w") as fh:
    json.dump({"losses": result.losses, "path": model.path}, fh)
model.embed_file(data, f"{out}/sharded.npy", chunk_size=50, dist=ctx, progress=False)
distributed.shutdown()
"""

NAN_WORKER = PREAMBLE + """
from masksc.models import MaskSC
if ctx.rank == 1:  # this rank's loss turns non-finite at its first step
    real_forward = MaskSC.forward
    MaskSC.forward = lambda self, batch, seed: real_forward(self, batch, seed) * float("nan")
try:
    pipeline.fit(data, "demo", epochs=2, progress=False, chunk_size=64, teacher_cells=200,
                 teacher_overrides={"epochs": 1}, dist=ctx, **tiny)
except FloatingPointError as exc:
    open(f"{out}/stopped{ctx.rank}.txt", "w").write(str(exc))
distributed.shutdown()
"""

ERROR_WORKER = PREAMBLE + """
from masksc.errors import MaskscError
bad = f"{out}/bad.h5ad"  # a negative count in cell 150: rank 1's half when embedding
model, _ = pipeline.fit(data, "demo", epochs=1, progress=False, chunk_size=64, teacher_cells=200,
                        teacher_overrides={"epochs": 1}, dist=ctx, **tiny)
steps = {"fit": lambda: pipeline.fit(bad, "demo", epochs=1, progress=False, chunk_size=64, dist=ctx, **tiny),
         "embed": lambda: model.embed_file(bad, f"{out}/e.npy", chunk_size=50, dist=ctx, progress=False),
         "shuffled": lambda: model.embed_file(f"{out}/shuffled.h5ad", f"{out}/s.npy", dist=ctx, progress=False)}
for name, step in steps.items():
    try:
        step()
    except MaskscError as exc:
        open(f"{out}/{name}{ctx.rank}.txt", "w").write(f"{type(exc).__name__}: {exc}")
distributed.shutdown()
"""

READ_WORKER = PREAMBLE + """
from masksc.errors import DataError, MaskscError
from masksc.outofcore import StreamBatches
if ctx.rank == 1:  # a bad chunk met while training (as on a resumed run, which skips the first pass)
    real_iter = StreamBatches.__iter__
    def failing_iter(self):
        for i, batch in enumerate(real_iter(self)):
            if i == 1:
                raise DataError("X contains 1 NaN values (a chunk of rank 1)")
            yield batch
    StreamBatches.__iter__ = failing_iter
try:
    pipeline.fit(data, "demo", epochs=2, progress=False, chunk_size=64, teacher_cells=200,
                 teacher_overrides={"epochs": 1}, dist=ctx, **tiny)
except MaskscError as exc:
    open(f"{out}/read{ctx.rank}.txt", "w").write(f"{type(exc).__name__}: {exc}")
distributed.shutdown()
"""

SAVE_WORKER = PREAMBLE + """
import errno
from masksc import checkpoint
from masksc.errors import MaskscError
real_save = checkpoint.save_checkpoint
def full_disk_at_epoch_2(path, *args, **kwargs):
    if str(path).endswith("epoch-000002"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(path, *args, **kwargs)
checkpoint.save_checkpoint = full_disk_at_epoch_2
try:
    pipeline.fit(data, "demo", model_dir=f"{out}/run", epochs=3, checkpoint_every=1, progress=False, chunk_size=64,
                 teacher_cells=200, teacher_overrides={"epochs": 1}, dist=ctx, **tiny)
except (OSError, MaskscError) as exc:
    open(f"{out}/save{ctx.rank}.txt", "w").write(f"{type(exc).__name__}: {exc}")
distributed.shutdown()
"""

UNREADABLE_WORKER = PREAMBLE + """
import contextlib, io
from masksc.cli import main
pipeline.fit(data, "demo", model_dir=f"{out}/run", epochs=1, progress=False, chunk_size=64, teacher_cells=200,
             teacher_overrides={"epochs": 1}, dist=ctx, **tiny)
ctx.barrier()  # rank 0 has written the model
path = data if ctx.rank == 0 else f"{out}/absent.h5ad"  # a node that cannot see the file
said = io.StringIO()
with contextlib.redirect_stderr(said):
    code = main(["embed", path, "--model", f"{out}/run", "-o", f"{out}/e.npy", "--device", "cpu"])
open(f"{out}/embed{ctx.rank}.txt", "w").write(f"{code} {said.getvalue()}")
"""

LOCKED_WORKER = PREAMBLE + """
import fcntl, os
from masksc.errors import MaskscError
if ctx.rank == 0:  # another fit holds the run directory (an flock of another open file stands in for it)
    os.makedirs(f"{out}/held")
    other = os.open(f"{out}/held", os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
ctx.barrier()
try:
    pipeline.fit(data, "demo", model_dir=f"{out}/held", epochs=1, progress=False, dist=ctx)
except MaskscError as exc:
    open(f"{out}/held{ctx.rank}.txt", "w").write(f"{type(exc).__name__}: {exc}")
distributed.shutdown()
"""


def _two_gloo_processes(worker: str, n_cells: int, tmp_path: Path) -> Path:
    """Write a synthetic dataset of ``n_cells`` and run ``worker`` (argv: data, tmp_path) on 2
    processes under torchrun, failing the test with its output when it fails; returns the data path."""
    data = tmp_path / "d.h5ad"
    write_synthetic_h5ad(data, n_cells, n_genes=300, n_types=3, seed=2)
    (tmp_path / "worker.py").write_text(worker)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "worker.py"), str(data), str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_shard_range_partitions_rows_contiguously():
    for n in (0, 1, 7, 10, 11):
        for w in (1, 2, 3, 4):
            parts = [distributed.shard_range(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_single_process_context_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx) is model


@pytest.mark.slow
def test_ddp_training_and_sharded_embedding_on_two_gloo_processes(tmp_path):
    data = _two_gloo_processes(WORKER, 400, tmp_path)

    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)   # identical weights
    r0, r1 = (json.loads((tmp_path / f"losses{r}.json").read_text()) for r in (0, 1))
    assert len(r0["losses"]) == 4 and r0["losses"][-1] < 0.7 * r0["losses"][0]        # it learns
    assert r1["losses"] == r0["losses"]              # the mean over both ranks' cells, not each rank's shard
    assert r0["path"] is not None and r1["path"] is None                              # rank 0 saves
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["epoch-000004", "last"]

    model = MaskSCModel.load(tmp_path / "run")
    saved = model.network.state_dict()
    assert all(torch.equal(saved[k], w0[k]) for k in w0)
    model.embed_file(data, tmp_path / "single.npy", chunk_size=128, progress=False)
    sharded, single = np.load(tmp_path / "sharded.npy"), np.load(tmp_path / "single.npy")
    assert sharded.shape == (400, 32)
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]            # no temp files left
    # one process resuming a run of two, which the steps per epoch may not tell apart, is refused by name
    tiny = dict(grid_shape=(16, 16), batch_size=40, embed_dim=32, depth=1, num_heads=2, decoder_dim=32,
                decoder_depth=1, decoder_heads=2)
    with pytest.raises(CheckpointError, match=r"trained by 2 processes and this one has 1 process, .* resume with "
                                              r"torchrun --nproc_per_node 2"):
        pipeline.fit(data, "demo", model_dir=tmp_path / "run", resume=True, epochs=4, progress=False, chunk_size=64,
                     teacher_cells=200, teacher_overrides={"epochs": 2}, **tiny)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's loss is NaN from its first step: both ranks stop there with the error. Before,
    rank 0 went on into DDP's gradient all-reduce, where gloo failed it with a lost connection
    once rank 1 had exited (NCCL would leave it waiting)."""
    _two_gloo_processes(NAN_WORKER, 200, tmp_path)
    stopped = [(tmp_path / f"stopped{r}.txt").read_text() for r in (0, 1)]
    assert stopped[0].startswith("training loss became non-finite on another rank at epoch 1, step 1;")
    assert stopped[1].startswith("training loss became nan at epoch 1, step 1;")


def test_a_read_error_on_one_rank_while_training_stops_every_rank(tmp_path):
    """A rank meeting a bad chunk while training (a resumed streamed run skips the first pass that
    checks every cell) stopped alone: the other waited in DDP's next collective, for the 6-hour
    timeout under gloo's wait (a review's run hung until killed)."""
    _two_gloo_processes(READ_WORKER, 200, tmp_path)
    read = [(tmp_path / f"read{r}.txt").read_text() for r in (0, 1)]
    assert read[0].startswith("MaskscError: rank 1 stopped with an error")
    assert read[1] == "DataError: X contains 1 NaN values (a chunk of rank 1)"


def test_a_checkpoint_rank_0_cannot_save_stops_every_rank(tmp_path):
    """Rank 0 alone saves checkpoints; a full disk there left rank 1 to die in its next collective
    with gloo's 'Connection closed by peer' traceback (a review's run), not a line naming rank 0."""
    _two_gloo_processes(SAVE_WORKER, 200, tmp_path)
    said = [(tmp_path / f"save{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == "OSError: [Errno 28] No space left on device"
    assert said[1].startswith("MaskscError: rank 0 stopped with an error")
    assert os.readlink(tmp_path / "run" / "last") == "epoch-000001"


def test_masksc_embed_stops_every_rank_when_one_cannot_read_the_file(tmp_path):
    """`masksc embed` under torchrun with the file missing on one rank: that rank waited in its
    shutdown barrier and the other in the first broadcast, until killed (fit named it)."""
    _two_gloo_processes(UNREADABLE_WORKER, 200, tmp_path)
    said = [(tmp_path / f"embed{r}.txt").read_text() for r in (0, 1)]
    assert said[0].startswith("2 masksc embed: error: rank 1 stopped with an error")
    assert said[1].startswith("2 masksc embed: error: file not found: ") and "absent.h5ad" in said[1]
    assert not (tmp_path / "e.npy").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".e.npy")]


def test_an_input_error_on_one_rank_stops_every_rank_with_a_message(tmp_path):
    """The rank that meets bad cells raises its DataError; the other raises a MaskscError naming
    it, instead of dying in the next collective with gloo's lost connection (or NCCL's wait)."""
    import anndata as ad
    write_synthetic_h5ad(tmp_path / "ok.h5ad", 200, n_genes=300, n_types=3, seed=2)
    bad = ad.read_h5ad(tmp_path / "ok.h5ad")
    bad.X = bad.X.tocsr(copy=True)
    bad.X.data[bad.X.indptr[150]] = -1.0
    bad.write_h5ad(tmp_path / "bad.h5ad")
    # 80 cells of other genes under the same (positional) names: each rank's shard of 40 is too few
    # for the gene-profile check, and both ranks embedded them; one process refuses them
    shuffled = ad.read_h5ad(tmp_path / "ok.h5ad")[:80]
    ad.AnnData(shuffled.X[:, np.random.default_rng(1).permutation(300)], obs=shuffled.obs,
               var=shuffled.var).write_h5ad(tmp_path / "shuffled.h5ad")
    _two_gloo_processes(ERROR_WORKER, 200, tmp_path)
    fit = [(tmp_path / f"fit{r}.txt").read_text() for r in (0, 1)]
    assert fit[0].startswith("DataError: X contains 1 negative values")
    assert fit[1].startswith("MaskscError: rank 0 stopped with an error")
    embed = [(tmp_path / f"embed{r}.txt").read_text() for r in (0, 1)]
    assert embed[0].startswith("MaskscError: rank 1 stopped with an error")
    assert embed[1].startswith("DataError: X contains 1 negative values") and "in cells 150.." in embed[1]
    assert not (tmp_path / "e.npy").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    for r in (0, 1):
        shuffled = (tmp_path / f"shuffled{r}.txt").read_text()
        assert shuffled.startswith("DataError: ") and "are not the genes it was trained on" in shuffled, shuffled
    assert not (tmp_path / "s.npy").exists()


def test_a_run_directory_in_use_stops_every_rank(tmp_path):
    """The main rank holds the run directory; when another fit holds it, every rank stops with a
    message (the others used to wait for rank 0 in the next collective, for ever)."""
    _two_gloo_processes(LOCKED_WORKER, 100, tmp_path)
    held = [(tmp_path / f"held{r}.txt").read_text() for r in (0, 1)]
    assert held[0].startswith("CheckpointError: ") and "is in use: another fit is writing its run there" in held[0]
    assert held[1].startswith("MaskscError: rank 0 stopped with an error")
