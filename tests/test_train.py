"""Training loop: learning, schedule, seeds, checkpoint cadence and exact resume."""
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from masksc.data import CellBatches
from masksc.embed import embed_matrix
from masksc.errors import CheckpointError, DataError, MaskscError
from masksc.models import ContrastiveConfig, ContrastiveSC, MaskSC, MaskSCConfig
from masksc.train import TrainConfig, lr_factor, mask_seed, seed_everything, train

CFG = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                   decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)


def structured_grid(n=48, seed=0):
    """Cells of 3 types, each expressing its own block of grid rows: masked patches are
    predictable from the visible ones, so a model can lower the loss."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, 64), np.float32)
    for i in range(n):
        t = i % 3
        X[i, t * 16:(t + 1) * 16 + 8] = rng.poisson(3.0, 24) + 1.0
    X = np.log1p(X) * (rng.random(X.shape) > 0.2)
    return sp.csr_matrix(X.astype(np.float32))


def make(med=False, seed=0):
    torch.manual_seed(seed)
    cfg = CFG.replace(med=med)
    model = MaskSC(cfg)
    if med:
        t = ContrastiveSC(ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True)).eval()
        model.set_teacher(t)
    return model


def tcfg(**kw):
    base = dict(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=1, seed=0, progress=False, device="cpu",
                checkpoint_every=2)
    base.update(kw)
    return TrainConfig(**base)


def test_train_reduces_loss():
    X = structured_grid()
    model = make()
    res = train(model, X, tcfg(epochs=10, lr=5e-3))
    assert len(res.losses) == 10 and res.steps == 10 * 3
    assert np.mean(res.losses[-3:]) < 0.7 * np.mean(res.losses[:2])
    assert not model.training


def test_train_with_teacher_targets_runs():
    X = structured_grid()
    model = make(med=True)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    res = train(model, X, tcfg(epochs=2))
    assert all(math.isfinite(v) for v in res.losses)
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher changed: {k}"


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)
    assert lr_factor(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_a_warmup_as_long_as_the_run_is_named(caplog):
    """With epochs cut to the warm-up or below (demo --epochs 2: the factor ended at 1.0) the rate
    never decays; a run says so rather than passing for a full schedule."""
    import logging
    with caplog.at_level(logging.WARNING, logger="masksc.train"):
        train(make(), structured_grid(), tcfg(epochs=2, warmup_epochs=2))
    assert "warmup_epochs=2 covers all 2 epochs: the learning rate rises the whole run and never decays" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="masksc.train"):
        train(make(), structured_grid(), tcfg(epochs=3, warmup_epochs=2))
    assert "covers all" not in caplog.text


def test_mask_seed_is_deterministic_and_distinct():
    seeds = {mask_seed(s, e, t) for s in range(3) for e in range(5) for t in range(7)}
    assert len(seeds) == 3 * 5 * 7
    assert mask_seed(1, 2, 3) == mask_seed(1, 2, 3)
    assert 0 <= mask_seed(2**40, 10**6, 10**6) < 2**62
    assert mask_seed(1, 2, 3, rank=0) == mask_seed(1, 2, 3)
    assert len({mask_seed(1, 2, 3, rank=r) for r in range(4)}) == 4  # DDP ranks mask differently


def test_train_equals_a_plain_torch_reference_loop():
    """train() is AdamW with weight decay on the matrices only (biases, norms and the mask token
    are not decayed), per-step LambdaLR warmup + cosine from ``lr_factor`` and gradient clipping
    at ``cfg.clip``: a loop written here from those pieces ends at the same weights. The settings
    make each piece matter: a strong decay, a clip below the gradient norms, a warmup epoch."""
    X = structured_grid()
    cfg = tcfg(epochs=3, lr=2e-2, clip=0.05, weight_decay=0.5)
    got = make()
    train(got, X, cfg)

    ref = make()
    batches = CellBatches(X, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed)
    total, warmup = cfg.epochs * len(batches), int(round(cfg.warmup_epochs * len(batches)))
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    decay = [n for n, p in named if p.ndim >= 2]
    assert {"patch_weight", "cls_token", "head.weight", "blocks.0.attn.qkv.weight"} <= set(decay)
    assert not [n for n in decay if n.endswith("bias") or "norm" in n or n == "mask_token"]
    params = [p for _, p in named]
    opt = torch.optim.AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": cfg.weight_decay},
                             {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    seed_everything(cfg.seed)
    ref.train()
    norms = []
    for epoch in range(cfg.epochs):
        batches.set_epoch(epoch)
        for i, batch in enumerate(batches):
            loss = ref(batch, mask_seed(cfg.seed, epoch, i))
            opt.zero_grad()
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.clip)))
            opt.step()
            sched.step()
    assert len(norms) == 9 and min(norms) > cfg.clip  # every step was clipped
    want = ref.state_dict()
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _global_draws():
    import random
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_training_leaves_the_callers_global_generators_as_they_were():
    """train, fit_masksc and the teacher seeded python's, numpy's and torch's global generators
    and left them at their own seed: a notebook's later unseeded draws repeated whatever it seeded."""
    import random

    from masksc.models.contrastive import train_contrastive_dense
    from masksc.train import fit_masksc
    X = structured_grid()
    model = make()  # make seeds torch itself: built before the caller's seed below
    teacher_cfg = ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True, epochs=1, batch_size=16)
    calls = [lambda: train(model, X, tcfg(epochs=1)),
             lambda: fit_masksc(X, CFG.replace(med=True), tcfg(epochs=1), teacher_cfg=teacher_cfg),
             lambda: train_contrastive_dense(X.toarray(), ContrastiveConfig(n_input=64, layers=(8, 4), epochs=1,
                                                                            batch_size=16), progress=False)]
    for call in calls:
        random.seed(321), np.random.seed(321), torch.manual_seed(321)
        expected = _global_draws()
        random.seed(321), np.random.seed(321), torch.manual_seed(321)
        call()
        assert _global_draws() == expected


def test_same_seed_same_result_with_and_without_workers():
    X = structured_grid()
    a, b = make(), make()
    ra = train(a, X, tcfg(epochs=2))
    rb = train(b, X, tcfg(epochs=2, num_workers=2))
    assert ra.losses == rb.losses
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("med", [False, True])
def test_resume_equals_uninterrupted_run(tmp_path, med):
    X = structured_grid()
    full = make(med)
    ref = train(full, X, tcfg(checkpoint_dir=str(tmp_path / "full")))

    def crash_at_epoch_3(epoch, loss):
        if epoch == 2:  # after the epoch-2 checkpoint, during epoch 3
            raise Interrupt

    run = str(tmp_path / "run")
    with pytest.raises(Interrupt):
        train(make(med), X, tcfg(checkpoint_dir=run), callback=crash_at_epoch_3)
    assert os.path.islink(os.path.join(run, "last")) and os.readlink(os.path.join(run, "last")) == "epoch-000002"
    resumed_model = make(med, seed=123)  # a different init: everything must come from the checkpoint
    res = train(resumed_model, X, tcfg(checkpoint_dir=run, resume=True))
    assert res.resumed_from_epoch == 2
    assert res.losses == ref.losses
    for (k, va), vb in zip(full.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=1e-6, rtol=0, msg=k)
    np.testing.assert_allclose(embed_matrix(full, X, progress=False), embed_matrix(resumed_model, X, progress=False),
                               atol=1e-6)


def _crashed_run(run: str, med: bool = False) -> None:
    """A run of tcfg() stopped during epoch 3, after its epoch-2 checkpoint."""
    def crash_at_epoch_3(epoch, loss):
        if epoch == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(make(med), structured_grid(), tcfg(checkpoint_dir=run), callback=crash_at_epoch_3)


class _RunsCode:
    """Unpickling this runs os.system: what a doctored trainer_state.json could hide."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _edit_state(run, edit):
    """Apply ``edit`` to the trainer_state.json dict of ``run``'s last checkpoint."""
    import json
    path = os.path.join(run, "last", "trainer_state.json")
    state = json.loads(open(path).read())
    edit(state)
    open(path, "w").write(json.dumps(state))


def _edit_optimizer(run, edit):
    path = os.path.join(run, "last", "optimizer.pt")
    opt = torch.load(path, weights_only=True)
    edit(opt)
    torch.save(opt, path)


def test_rng_states_are_saved_as_plain_json_and_restored_exactly():
    import json

    from masksc.train import _rng_state, _set_rng_state
    seed_everything(5)
    np.random.standard_normal()  # numpy keeps a cached gaussian: the state records it
    saved = json.loads(json.dumps(_rng_state()))
    expected = (torch.rand(3), np.random.standard_normal(3), [__import__("random").random() for _ in range(3)])
    seed_everything(99)
    _set_rng_state(saved)
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.standard_normal(3), expected[1])
    assert [__import__("random").random() for _ in range(3)] == expected[2]


def _legacy_blob(numpy1: bool) -> str:
    """The RNG states as earlier releases saved them: a base64 torch.save blob, whose pickle names
    numpy's array constructor as numpy 1.x (``numpy.core``) or numpy 2 (``numpy._core``) does."""
    import base64
    import io
    import random
    import zipfile
    buf = io.BytesIO()
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": None}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(out, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if numpy1 and name.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(name, data)
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("numpy1", [False, True])
def test_a_run_saved_with_pickled_rng_states_resumes_exactly(tmp_path, numpy1):
    """Checkpoints of earlier releases hold the RNG states as a base64 torch.save blob; they are
    read without unpickling code (whichever numpy major wrote them) and continue the run as before."""
    X = structured_grid()
    full = make()
    train(full, X, tcfg(checkpoint_dir=str(tmp_path / "full")))
    run = str(tmp_path / "run")
    _crashed_run(run)
    blob = _legacy_blob(numpy1)
    _edit_state(run, lambda st: st.update(rng={"blob": blob}))
    resumed = make(seed=123)
    assert train(resumed, X, tcfg(checkpoint_dir=run, resume=True)).resumed_from_epoch == 2
    for (k, va), vb in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("copied", [["model.safetensors"], ["optimizer.pt", "trainer_state.json"]])
def test_files_copied_in_from_another_epoch_are_refused(tmp_path, copied):
    """Weights from one epoch with another's optimiser state and record resumed silently, on other
    weights than the run's (or retraining an epoch); a whole earlier epoch's folder still resumes."""
    run = tmp_path / "run"
    def stop_at_epoch_3(epoch, loss):
        if epoch == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(make(), structured_grid(), tcfg(checkpoint_every=1, keep_checkpoints=5, checkpoint_dir=str(run)),
              callback=stop_at_epoch_3)
    for name in copied:  # what "restore those files from a copy" may lead to, with older epochs lying around
        shutil.copy(run / "epoch-000001" / name, run / "epoch-000002" / name)
    with pytest.raises(CheckpointError, match=r"the files of the checkpoint .*epoch-000002 were written by different "
                                              r"saves \(model\.safetensors apart from optimizer\.pt and "
                                              r"trainer_state\.json\), .*; fix: restore the folder whole"):
        train(make(), structured_grid(), tcfg(checkpoint_every=1, checkpoint_dir=str(run), resume=True))
    shutil.rmtree(run / "epoch-000002")
    (run / "last").unlink()
    os.symlink("epoch-000001", run / "last")
    assert train(make(), structured_grid(), tcfg(checkpoint_every=1, checkpoint_dir=str(run),
                                                 resume=True)).resumed_from_epoch == 1


def test_a_doctored_training_state_cannot_run_code(tmp_path):
    """The RNG blob and optimizer.pt were read with torch.load(weights_only=False): a pickled object
    in either ran its code on resume."""
    import base64
    import pickle
    run = str(tmp_path / "run")
    _crashed_run(run)
    marker = tmp_path / "ran"
    blob = base64.b64encode(pickle.dumps(_RunsCode(marker))).decode()
    _edit_state(run, lambda st: st.update(rng={"blob": blob}))
    with pytest.raises(CheckpointError, match=r"the training state \(optimizer.pt, trainer_state.json\) in .* does not "
                                              r"fit this run \(.*\); fix: restore those files from a copy"):
        train(make(), structured_grid(), tcfg(checkpoint_dir=run, resume=True))
    assert not marker.exists()
    run2 = str(tmp_path / "run2")
    _crashed_run(run2)
    path = os.path.join(run2, "last", "optimizer.pt")
    torch.save({"optimizer": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"the training state \(optimizer.pt, trainer_state.json\) in .* is "
                                              r"damaged"):
        train(make(), structured_grid(), tcfg(checkpoint_dir=run2, resume=True))
    assert not marker.exists()


def _drop_group(opt):
    opt["optimizer"]["param_groups"].pop()


def _edit_moment(edit):
    def apply(opt):
        state = opt["optimizer"]["state"]
        edit(state[next(k for k, v in state.items() if v["exp_avg"].ndim == 2)])
    return apply


def _drop_one_state(opt):
    state = opt["optimizer"]["state"]
    del state[next(iter(state))]


@pytest.mark.parametrize("damage, message", [
    (lambda run: _edit_state(run, lambda st: st.update(rng={"blob": "AAAA"})), r"does not fit this run"),
    (lambda run: _edit_state(run, lambda st: st.update(rng="x")), r"does not fit this run"),
    (lambda run: _edit_state(run, lambda st: st["rng"].update(torch="!!")), r"does not fit this run"),
    (lambda run: _edit_state(run, lambda st: st["rng"].update(numpy=[1, 2])), r"does not fit this run"),
    (lambda run: _edit_optimizer(run, _drop_group), r"does not fit this run \(ValueError: loaded state dict has a "
                                                    r"different number of parameter groups"),
    (lambda run: _edit_optimizer(run, _edit_moment(lambda st: st.update(exp_avg=st["exp_avg"].reshape(-1)))),
     r"does not fit this run \(exp_avg of shape"),
    (lambda run: _edit_optimizer(run, _edit_moment(lambda st: st.pop("exp_avg"))),
     r"does not fit this run \(exp_avg missing for a parameter"),
    (lambda run: _edit_optimizer(run, _edit_moment(lambda st: st.update(step=st["step"] + 0.5))),
     r"does not fit this run \(AdamW step tensor\(6.5000\) where the record says 6\)"),
    (lambda run: _edit_optimizer(run, _drop_one_state), r"does not fit this run \(exp_avg missing"),
    (lambda run: _edit_optimizer(run, lambda opt: opt["optimizer"]["param_groups"][0].update(lr="x")),
     r"does not fit this run \(the parameter group's lr='x'\)"),
    (lambda run: _edit_optimizer(run, lambda opt: opt["optimizer"]["param_groups"][0].update(betas=(float("nan"), 0.95))),
     r"does not fit this run \(the parameter group's betas=\(nan, 0.95\) where this run sets \(0.9, 0.95\)\)"),
    (lambda run: _edit_optimizer(run, lambda opt: opt["optimizer"]["param_groups"][1].update(maximize=True)),
     r"does not fit this run \(the parameter group's maximize=True where this run sets False\)"),
    (lambda run: _edit_state(run, lambda st: st.update(steps_per_epoch="3")),
     r"is damaged \(trainer_state.json has steps_per_epoch='3', not a count\)"),
    (lambda run: _edit_state(run, lambda st: st.update(world_size=0)),
     r"is damaged \(trainer_state.json has world_size=0, not a count\)"),
    (lambda run: _edit_optimizer(run, lambda opt: opt["scheduler"].pop("lr_lambdas")), r"does not fit this run"),
    (lambda run: _edit_state(run, lambda st: st.update(epoch=7)), r"is damaged \(epoch=7 of a run of 4 epochs\)"),
    (lambda run: _edit_state(run, lambda st: st.update(step=5)), r"is damaged \(step=5, where epoch 2 of 3 steps "
                                                                  r"ends at 6\)"),
    (lambda run: _edit_state(run, lambda st: st.update(losses=[])), r"is damaged \(0 losses for 2 epochs"),
    (lambda run: _edit_state(run, lambda st: st.update(losses=[1.0, "a"])), r"is damaged \(2 losses for 2 epochs, or "
                                                                             r"not all finite numbers\)"),
])
def test_a_training_state_that_does_not_fit_the_run_is_refused_by_name(tmp_path, damage, message):
    """These reached the user as raw torch tracebacks (a reshaped moment only at the first step after
    resuming), or, for a record past the run's end, resumed and returned epoch 2's weights as done."""
    run = str(tmp_path / "run")
    _crashed_run(run)
    damage(run)
    with pytest.raises(CheckpointError, match=message + r".*fix: restore"):
        train(make(), structured_grid(), tcfg(checkpoint_dir=run, resume=True))


def test_a_run_of_another_number_of_processes_is_not_resumed(tmp_path):
    """The steps per epoch may not tell a run of two processes from one (each rank draws its own
    masks from its own cells), so the record names its process count and resuming checks it."""
    run = str(tmp_path / "run")
    _crashed_run(run)
    _edit_state(run, lambda st: st.update(world_size=2))
    with pytest.raises(CheckpointError, match=r"was trained by 2 processes and this one has 1 process, so each "
                                              r"one's cells and masks .* torchrun --nproc_per_node 2, or use a new"):
        train(make(), structured_grid(), tcfg(checkpoint_dir=run, resume=True))


def test_a_run_of_an_earlier_release_resumes_in_one_process_only(tmp_path, monkeypatch):
    """Its record names no process count, and several processes split a streamed run's cells otherwise
    now; one process resumes it as before."""
    import masksc.train
    run = str(tmp_path / "run")
    _crashed_run(run)
    _edit_state(run, lambda st: st.pop("world_size"))
    with monkeypatch.context() as m:
        m.setattr(masksc.train, "_world_size", lambda: 2)
        with pytest.raises(CheckpointError, match=r"cannot resume under 2 processes: .* saved by an earlier masksc "
                                                  r"release"):
            train(make(), structured_grid(), tcfg(checkpoint_dir=run, resume=True))
    assert train(make(), structured_grid(), tcfg(checkpoint_dir=run, resume=True)).resumed_from_epoch == 2


def test_resuming_a_finished_run_clears_what_a_kill_while_pruning_left_and_nothing_else(tmp_path):
    """A finished run resumed (to get its model) writes nothing; it removes the half-deleted
    checkpoint a kill while pruning left, and keeps the checkpoints the run kept, whatever
    keep_checkpoints the resuming call passes."""
    run = tmp_path / "run"
    train(make(), structured_grid(), tcfg(epochs=3, checkpoint_every=1, keep_checkpoints=5, checkpoint_dir=str(run)))
    shutil.copytree(run / "epoch-000003", run / ".old-epoch-000002-abcd1234")
    train(make(), structured_grid(), tcfg(epochs=3, checkpoint_every=1, keep_checkpoints=0, checkpoint_dir=str(run),
                                          resume=True))
    assert sorted(os.listdir(run)) == ["epoch-000001", "epoch-000002", "epoch-000003", "last"]


@pytest.mark.parametrize("damage", ["last copied as a folder", "last missing", "last dangling"])
def test_resume_continues_a_run_whose_last_link_was_copied_lost_or_left_dangling(tmp_path, damage):
    """cp -rL / scp -r make `last` a folder (the next save crashed on it, every time); a crash
    before the first link, or a deleted folder, leaves none: the run resumes from the newest
    epoch checkpoint (with a warning) and ends as an uninterrupted run does."""
    X = structured_grid()
    full = make()
    ref = train(full, X, tcfg(checkpoint_dir=str(tmp_path / "full")))
    run = tmp_path / "run"
    _crashed_run(str(run))
    last = run / "last"
    last.unlink()
    if damage == "last copied as a folder":
        shutil.copytree(run / "epoch-000002", last)
    elif damage == "last dangling":
        os.symlink("epoch-000009", last)
    resumed_model = make(seed=123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train(resumed_model, X, tcfg(checkpoint_dir=str(run), resume=True))
    said = [str(w.message) for w in caught if "resuming from the newest checkpoint" in str(w.message)]
    assert len(said) == (0 if damage == "last copied as a folder" else 1), said
    assert res.resumed_from_epoch == 2 and res.losses == ref.losses
    for (k, va), vb in zip(full.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(va, vb, atol=1e-6, rtol=0, msg=k)
    assert last.is_symlink() and os.readlink(last) == f"epoch-{tcfg().epochs:06d}"
    assert sorted(os.listdir(run)) == sorted(os.listdir(tmp_path / "full"))  # the folder copy is gone too


def test_resume_refuses_an_epoch_folder_it_would_save_to_before_training(tmp_path):
    """An epoch folder that lost its config.json (an interrupted copy) used to be trained up to and
    then refused at the save, with a fix ("save to a new directory") that did not apply. Only the
    folders the run will save are checked: earlier ones, ones past the run or off its schedule,
    and a run copied with its `last` link made a folder, resume as before."""
    run = tmp_path / "run"

    def stop_in_epoch_3(epoch, loss):
        if epoch == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(make(), structured_grid(), tcfg(checkpoint_dir=str(run), checkpoint_every=1), callback=stop_in_epoch_3)
    config = (run / "epoch-000002" / "config.json").read_bytes()
    (run / "epoch-000002" / "config.json").unlink()

    def no_training(epoch, loss):
        raise AssertionError("trained before refusing")
    resume = tcfg(checkpoint_dir=str(run), checkpoint_every=1, resume=True)
    # the checkpoint `last` names, damaged: refused as it is (it was moved to epoch-000001, so the fix, followed,
    # retrained epoch 2 over the restored folder)
    with pytest.raises(CheckpointError, match=r"run/last names epoch-000002, which has no config.json; fix: restore "
                                              r"epoch-000002 from a copy \(the run resumes from it\), or move it out "
                                              r"of .*run to resume from epoch-000001\."):
        train(make(), structured_grid(), resume, callback=no_training)
    assert os.readlink(run / "last") == "epoch-000002"
    (run / "epoch-000002" / "config.json").write_bytes(config)
    trained = []

    def first_epoch(epoch, loss):
        trained.append(epoch)
        raise Interrupt
    with pytest.raises(Interrupt):
        train(make(), structured_grid(), resume, callback=first_epoch)
    assert trained == [2]  # resumed from the restored checkpoint: the third epoch is the first it trains
    (run / "epoch-000002" / "config.json").unlink()
    (run / "last").unlink()
    os.symlink("epoch-000001", run / "last")  # `last` on the checkpoint before: the damaged one is the next save
    with pytest.raises(CheckpointError, match=r"epoch-000002 has no config.json, and the resumed run saves epoch 2 "
                                              r"there; fix: restore epoch-000002 from a copy or move it out of "
                                              r".*run \(the run resumes after epoch 1\)"):
        train(make(), structured_grid(), resume, callback=no_training)
    shutil.rmtree(run / "epoch-000002")
    (run / "epoch-000003").write_text("a note")
    with pytest.raises(CheckpointError, match=r"epoch-000003 is not a folder, and the resumed run saves epoch 3"):
        train(make(), structured_grid(), resume, callback=no_training)
    (run / "epoch-000003").unlink()
    # not saved by this run (checkpoint_every 2 saves 2 and 4) or past it (4 epochs): left alone
    shutil.copytree(run / "epoch-000001", run / "epoch-000003")
    (run / "epoch-000003" / "config.json").unlink()
    (run / "epoch-000009").mkdir()
    (run / "epoch-000009" / "notes.txt").write_text("mine")
    shutil.copytree(run / "epoch-000001", run / "epoch-000000")  # before the start, and no checkpoint
    (run / "epoch-000000" / "config.json").unlink()
    os.unlink(run / "last")
    shutil.copytree(run / "epoch-000001", run / "last")  # cp -rL
    res = train(make(), structured_grid(), tcfg(checkpoint_dir=str(run), resume=True))
    assert res.resumed_from_epoch == 1 and len(res.losses) == 4
    assert (run / "epoch-000009" / "notes.txt").exists()


def test_resume_of_a_run_whose_checkpoints_are_all_gone_says_it_starts_again(tmp_path):
    """A `last` link left dangling with no checkpoint beside it started a new run in silence, where a
    missing run directory is said."""
    run = tmp_path / "run"
    run.mkdir()
    os.symlink("epoch-000002", run / "last")
    from masksc import tl
    adata, tiny = _tiny_fit_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tl.fit(adata, "demo", model_dir=run, epochs=1, resume=True, **tiny)
    said = [w for w in caught if "names no checkpoint and there is none in" in str(w.message)]
    assert len(said) == 1 and "starting the run again there" in str(said[0].message)  # once: fit checks it 3 times
    assert model.path == str(run / "epoch-000001") and os.readlink(run / "last") == "epoch-000001"


def test_resume_pointed_at_one_checkpoint_of_a_run_names_the_run_directory(tmp_path):
    """-o run/epoch-000002 --resume used to start a new run nested inside that checkpoint."""
    run = tmp_path / "run"
    _crashed_run(str(run))
    before = sorted(os.listdir(run / "epoch-000002"))
    with pytest.raises(CheckpointError, match=r"epoch-000002 is one checkpoint .*not a training run directory.*fix: "
                                              rf"pass the run directory that holds it \(-o {re.escape(str(run))},"):
        train(make(), structured_grid(), tcfg(checkpoint_dir=str(run / "epoch-000002"), resume=True))
    assert sorted(os.listdir(run / "epoch-000002")) == before


def test_resume_refuses_different_settings(tmp_path):
    X = structured_grid()
    train(make(), X, tcfg(epochs=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(CheckpointError, match="batch_size"):
        train(make(), X, tcfg(epochs=2, batch_size=8, checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(CheckpointError, match=r"different model config \(embed_dim: saved 16, requested 32; "
                                              r"mask_ratio: saved 0.5, requested 0.6\)"):
        m = MaskSC(CFG.replace(med=False, embed_dim=32, mask_ratio=0.6))
        train(m, X, tcfg(epochs=2, checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(CheckpointError, match=r"took 3 steps per epoch and this data gives 6"):  # twice the cells
        train(make(), sp.vstack([X, X]).tocsr(), tcfg(epochs=2, checkpoint_dir=str(tmp_path), resume=True))
    state_file = tmp_path / "last" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["world_size"]  # as an earlier release saved it: the steps may differ by its process count
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"this data gives 6, .*resume on the cells it was trained on \(the run "
                                              r"was saved by an earlier masksc release, which did not record how many "
                                              r"processes trained it: if torchrun ran it on several, resume it with "
                                              r"that release\)"):
        train(make(), sp.vstack([X, X]).tocsr(), tcfg(epochs=2, checkpoint_dir=str(tmp_path), resume=True))


@pytest.mark.parametrize("damage, detail", [(None, r"it lacks \['batch_size', 'seed', .*'amp'\]"),
                                            ({"batch_size": 8}, r"it lacks \['seed', .*'amp'\]"),
                                            ({**tcfg(epochs=2).to_dict(), "batch_size": "abc"}, "batch_size='abc'")])
def test_resume_names_damaged_training_settings(tmp_path, damage, detail):
    """A checkpoint whose train_config was lost was compared as if the run had used the defaults
    ("batch_size was 256 ... and is 8 now"); a wrong type was a raw ValueError."""
    X = structured_grid()
    train(make(), X, tcfg(epochs=2, checkpoint_dir=str(tmp_path)))
    path = tmp_path / "last" / "config.json"
    config = json.loads(path.read_text())
    config["train_config"] = damage
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"the training settings \(train_config\) saved in .* are damaged "
                                              rf"\({detail}.*\); fix: restore the checkpoint's config.json"):
        train(make(), X, tcfg(epochs=2, checkpoint_dir=str(tmp_path), resume=True))


@pytest.mark.parametrize("key, value", [("seed", 1), ("epochs", 3), ("lr", 1e-3), ("warmup_epochs", 0.5),
                                        ("batch_size", 8), ("weight_decay", 0.1), ("betas", (0.9, 0.99)),
                                        ("min_lr_ratio", 0.1), ("clip", 0.5), ("amp", False)])
def test_resume_refuses_a_changed_training_setting(tmp_path, key, value):
    """Each setting the step schedule, masking or cell order depend on must match the checkpoint's."""
    X = structured_grid()
    train(make(), X, tcfg(epochs=1, checkpoint_dir=str(tmp_path)))
    weights = (tmp_path / "epoch-000001" / "model.safetensors").read_bytes()
    saved = getattr(tcfg(epochs=1), key)
    with pytest.raises(CheckpointError, match=rf"cannot resume: {key} was {re.escape(str(saved))} in .* and is "
                                              rf"{re.escape(str(value))} now"):
        train(make(), X, tcfg(**{"epochs": 1, key: value, "checkpoint_dir": str(tmp_path), "resume": True}))
    assert sorted(os.listdir(tmp_path)) == ["epoch-000001", "last"]
    assert (tmp_path / "epoch-000001" / "model.safetensors").read_bytes() == weights


def test_resume_without_a_run_directory_is_refused_before_any_work(monkeypatch):
    """TrainConfig refuses it when made; pipeline.check_fit names model_dir before any data is read
    (fit used to preprocess and train the teacher first)."""
    with pytest.raises(ValueError, match=r"resume=True continues the run saved in checkpoint_dir, and none is given; "
                                         r"fix: pass checkpoint_dir"):
        tcfg(resume=True)
    from masksc import pipeline
    monkeypatch.setattr(pipeline, "preprocess_to_grid", lambda *a, **k: pytest.fail("data was prepared"))
    for call in (lambda: pipeline.check_fit("demo", resume=True), lambda: pipeline.fit(None, "demo", resume=True)):
        with pytest.raises(ValueError, match=r"resume=True continues the run saved in model_dir, and none is given; "
                                             r"fix: pass model_dir="):
            call()


class PoisonedLoss(torch.nn.Module):
    """A DDP-like wrapper (``.module`` is the MaskSC) whose loss turns NaN once ``poisoned`` is set."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.poisoned = False

    def forward(self, batch, seed):
        loss = self.module.training_loss(batch, seed)
        return loss * float("nan") if self.poisoned else loss


def test_non_finite_loss_stops_training_before_it_is_saved(tmp_path):
    wrapped = PoisonedLoss(make())

    def poison(epoch, loss):
        wrapped.poisoned = True

    with pytest.raises(FloatingPointError, match="training loss became nan at epoch 2, step 1; lower the learning"):
        train(wrapped, structured_grid(), tcfg(epochs=3, checkpoint_every=1, checkpoint_dir=str(tmp_path)),
              callback=poison)
    assert sorted(os.listdir(tmp_path)) == ["epoch-000001", "last"]   # the NaN epoch wrote no checkpoint
    saved = load_file(str(tmp_path / "epoch-000001" / "model.safetensors"))
    for name, p in wrapped.module.state_dict().items():  # refused before its step: the epoch-1 weights
        assert torch.equal(p, saved[name]), name


def test_checkpoints_are_pruned_and_last_points_to_newest(tmp_path):
    X = structured_grid()
    train(make(), X, tcfg(epochs=6, checkpoint_every=1, keep_checkpoints=1, checkpoint_dir=str(tmp_path)))
    names = sorted(p for p in os.listdir(tmp_path) if not p.startswith("."))
    assert names == ["epoch-000005", "epoch-000006", "last"]
    assert os.readlink(tmp_path / "last") == "epoch-000006"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_prune_removes_interrupted_writes_and_nothing_else(tmp_path):
    def plant(epoch, loss):   # what a kill of an earlier run left, and names none of our writes leaves
        (tmp_path / ".tmp-epoch-000002-k3_q9zx1").mkdir()     # save_checkpoint before its rename
        (tmp_path / ".old-epoch-000001-a8cd_1x2" / "x").mkdir(parents=True)  # remove_checkpoint mid-delete
        os.symlink("epoch-000001", tmp_path / ".last-999.tmp")  # point_last before its rename
        (tmp_path / ".tmp-notes").write_text("the user's file")
        (tmp_path / ".old-runs").mkdir()
        os.symlink(".old-runs", tmp_path / ".old-link-abcdefgh")

    train(make(), structured_grid(), tcfg(epochs=1, checkpoint_dir=str(tmp_path)), callback=plant)
    left = sorted(p for p in os.listdir(tmp_path) if p.startswith("."))
    assert left == [".old-link-abcdefgh", ".old-runs", ".tmp-notes"]


def test_prune_deletes_and_counts_only_checkpoints(tmp_path):
    """An epoch folder that is no checkpoint (its config.json lost, a folder of notes past the run)
    was deleted with what it held, and counted among the checkpoints kept."""
    def plant(epoch, loss):
        if epoch == 0:
            (tmp_path / "epoch-000000").mkdir()
            (tmp_path / "epoch-000000" / "notes.txt").write_text("mine")
            (tmp_path / "epoch-000009").mkdir()
            (tmp_path / "epoch-000009" / "model.safetensors").write_text("a copy without its config")

    train(make(), structured_grid(), tcfg(epochs=4, checkpoint_every=1, keep_checkpoints=1,
                                          checkpoint_dir=str(tmp_path)), callback=plant)
    assert sorted(os.listdir(tmp_path)) == ["epoch-000000", "epoch-000003", "epoch-000004", "epoch-000009", "last"]
    assert (tmp_path / "epoch-000000" / "notes.txt").read_text() == "mine"


def test_crash_while_pruning_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    """A kill part-way through deleting an old checkpoint (here: after its weights are gone) must
    not leave the rest of it under its epoch name, where resume and load would find it broken."""
    import shutil

    from masksc import checkpoint as ckpt
    real_rmtree = shutil.rmtree

    def killed_after_weights(path, *a, **k):
        for f in sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns):
            if f.endswith(ckpt.WEIGHTS):
                os.remove(f)
                raise KeyboardInterrupt("killed mid-delete")
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed_after_weights)
    with pytest.raises(KeyboardInterrupt):
        train(make(), structured_grid(), tcfg(epochs=4, checkpoint_every=1, keep_checkpoints=1,
                                              checkpoint_dir=str(tmp_path)))
    monkeypatch.undo()
    epochs = sorted(p for p in os.listdir(tmp_path) if p.startswith("epoch-"))
    assert epochs == ["epoch-000002", "epoch-000003"]   # epoch 1 was being pruned after epoch 3
    for name in epochs:
        ckpt.load_model(tmp_path / name)
        ckpt.load_training_state(tmp_path / name)
    resumed = train(make(), structured_grid(), tcfg(epochs=4, checkpoint_every=1, keep_checkpoints=1,
                                                    checkpoint_dir=str(tmp_path), resume=True))
    assert resumed.resumed_from_epoch == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # the next prune clears leftovers


def test_embed_matrix_row_order_and_dtype():
    X = structured_grid(n=20)
    model = make().eval()
    Z = embed_matrix(model, X, batch_size=7, progress=False)
    assert Z.dtype == np.float32 and Z.shape == (20, 16)
    from masksc.data import CSRBatch
    with torch.no_grad():
        ref = model.embed(CSRBatch.from_csr(X)).numpy()
    np.testing.assert_allclose(Z, ref, atol=1e-5)


def test_fit_masksc_trains_teacher_then_model_and_resumes(tmp_path):
    from masksc.train import fit_masksc
    X = structured_grid()
    pad = np.zeros(64, bool)
    pad[60:] = True
    cfg = CFG.replace(med=True, target_fragment="cell", epochs=2, batch_size=16)
    teacher_cfg = ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True, epochs=2, batch_size=16)
    run = str(tmp_path / "run")
    model, res = fit_masksc(X, cfg, tcfg(epochs=2, checkpoint_dir=run), is_padding=pad, teacher_cfg=teacher_cfg)
    assert len(res.losses) == 2 and model.teacher is not None and not model.teacher.training
    assert torch.equal(model.grid_padding, torch.from_numpy(pad))
    again, res2 = fit_masksc(X, cfg, tcfg(epochs=2, checkpoint_dir=run, resume=True), is_padding=pad)
    assert res2.resumed_from_epoch == 2 and res2.losses == res.losses
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k


def test_fit_masksc_resumed_refuses_another_teacher_and_leaves_the_given_one_alone(tmp_path):
    """A resumed run continues with the teacher its checkpoint holds: teacher settings or a teacher
    other than that one are refused by name (they were ignored), the same ones are accepted, and a
    given teacher object is not overwritten with the checkpoint's weights."""
    from masksc.train import fit_masksc
    X = structured_grid()
    cfg = CFG.replace(med=True, target_fragment="cell", epochs=2, batch_size=16)
    teacher_cfg = ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True, epochs=2, batch_size=16)
    run = str(tmp_path / "run")
    model, res = fit_masksc(X, cfg, tcfg(epochs=2, checkpoint_dir=run), teacher_cfg=teacher_cfg)
    resume = tcfg(epochs=2, checkpoint_dir=run, resume=True)
    with pytest.raises(CheckpointError, match=r"trained with dropout=0\.9, not 0\.3"):
        fit_masksc(X, cfg, resume, teacher_cfg=teacher_cfg.replace(dropout=0.3))
    other = ContrastiveSC(teacher_cfg)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="teacher= is not the teacher the run"):
        fit_masksc(X, cfg, resume, teacher=other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    same = ContrastiveSC(teacher_cfg)
    same.load_state_dict(model.teacher.state_dict())
    same_before = {k: v.clone() for k, v in same.state_dict().items()}
    again, res2 = fit_masksc(X, cfg, resume, teacher_cfg=teacher_cfg, teacher=same)
    assert res2.resumed_from_epoch == 2 and res2.losses == res.losses and again.teacher is not same
    assert all(torch.equal(v, same_before[k]) for k, v in same.state_dict().items())


def test_a_matrix_not_of_the_model_s_grid_is_refused_by_train_and_embed():
    """Fewer columns than the grid were read as its first positions, silently; with IME off, more
    columns gave an IndexError and a negative column wrapped around."""
    from masksc.data import CSRBatch
    X = structured_grid(n=12)[:, :50]
    with pytest.raises(ValueError, match=r"X has 50 columns but the grid \(8, 8\) has 64 positions"):
        embed_matrix(make().eval(), X, progress=False)
    with pytest.raises(ValueError, match="X has 50 columns"):
        train(make(), X, tcfg(epochs=1))
    ime_off = MaskSC(CFG.replace(ime=False)).eval()
    wide = sp.hstack([structured_grid(n=4), sp.csr_matrix(np.ones((4, 2), np.float32))]).tocsr()
    with pytest.raises(MaskscError, match=r"col must index grid positions 0 \.\. 63, got 0 \.\. 65"):
        ime_off.embed(CSRBatch.from_csr(wide))
    batch = CSRBatch.from_csr(structured_grid(n=4))
    batch.col_indices[0] = -1
    with pytest.raises(MaskscError, match=r"got -1 \.\. "):
        ime_off.embed(batch)


def test_fit_masksc_builds_and_trains_the_model_class_it_is_given():
    """A MaskSC subclass goes through the whole recipe: its overridden method is what trains, and
    one that changes nothing ends at the default model's weights."""
    from masksc.train import fit_masksc

    class CountingTokenize(MaskSC):
        calls = 0

        def tokenize(self, batch):
            CountingTokenize.calls += 1
            return super().tokenize(batch)

    X = structured_grid()
    cfg = CFG.replace(med=True, target_fragment="cell", epochs=2, batch_size=16)
    teacher_cfg = ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True, epochs=2, batch_size=16)
    plain, _ = fit_masksc(X, cfg, tcfg(epochs=2), teacher_cfg=teacher_cfg, progress=False)
    counted, _ = fit_masksc(X, cfg, tcfg(epochs=2), teacher_cfg=teacher_cfg, progress=False,
                            model_class=CountingTokenize)
    assert type(counted) is CountingTokenize and CountingTokenize.calls >= 2 * math.ceil(X.shape[0] / 16)
    for (k, v), w in zip(plain.state_dict().items(), counted.state_dict().values()):
        assert torch.equal(v, w), k


def test_auto_teacher_dropout():
    from masksc.models.targets import auto_teacher_dropout
    dense = sp.csr_matrix(np.ones((5, 200), np.float32))
    assert auto_teacher_dropout(dense) == pytest.approx(0.9)
    sparse = sp.csr_matrix(np.eye(5, 200, dtype=np.float32).repeat(10, axis=1)[:, :200])
    assert sparse.getnnz() / 5 == 10
    assert auto_teacher_dropout(sparse) == pytest.approx(0.4)


def test_teacher_config_is_the_authors_recipe_with_overrides():
    from masksc.models.targets import auto_teacher_dropout, teacher_config
    X = structured_grid()
    cfg = CFG.replace(med=True)
    default = teacher_config(cfg, 3, X, layers=[10, 8, 6])
    authors = ContrastiveConfig()
    assert default.n_input == 64 and default.standardize and default.seed == 3 and default.layers == (10, 8, 6)
    assert default.dropout == auto_teacher_dropout(X)
    assert (default.temperature, default.lr, default.epochs, default.batch_size) == \
        (authors.temperature, authors.lr, authors.epochs, authors.batch_size)
    changed = teacher_config(cfg, 3, X, layers=(10, 8, 6), temperature=0.5, dropout=0.8)
    assert changed == default.replace(temperature=0.5, dropout=0.8)
    with pytest.raises(ValueError, match=r"\['n_input'\] cannot be set"):
        teacher_config(cfg, 0, X, n_input=10)
    with pytest.raises(ValueError, match="tempreature"):
        teacher_config(cfg, 0, X, tempreature=0.5)
    with pytest.raises(ValueError, match="last layer is 60 wide but the model's target_dim is 6"):
        teacher_config(cfg, 0, X)
    with pytest.raises(ValueError, match=r"dropout=1.0 must be in \[0, 1\)"):
        teacher_config(cfg, 0, X, layers=(10, 8, 6), dropout=1.0)


def test_fit_teacher_overrides_train_the_teacher_fit_masksc_trains_from_that_config(tmp_path):
    """``fit(..., teacher_overrides=...)`` is fit_masksc on ``teacher_config`` with the same
    overrides (the same weights), conflicting settings on resume and teacher settings with MED off
    are refused."""
    from masksc.data import GridLayout, Preprocessor, synthetic
    from masksc.models.targets import teacher_config
    from masksc.pipeline import _train_config, fit
    from masksc.train import fit_masksc

    adata = synthetic(120, n_genes=200, n_types=3, seed=5)
    tiny = dict(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
                decoder_heads=2, target_dim=6, batch_size=32)
    teacher = {"epochs": 2, "temperature": 0.5, "layers": [10, 8, 6]}
    model, _ = fit(adata, "demo", model_dir=tmp_path / "run", epochs=2, progress=False, device="cpu",
                   teacher_overrides=teacher, **tiny)
    assert model.network.teacher.cfg.temperature == 0.5 and model.network.teacher.cfg.epochs == 2

    cfg = model.config
    pre = Preprocessor(n_top_genes=cfg.n_genes, min_cells=3).fit(adata)
    X = pre.transform(adata).X
    grid = GridLayout.fit(X, pre.genes_, shape=cfg.grid_shape, patch=cfg.patch, order=cfg.layout, seed=0)
    Xg = grid.to_grid(X)
    train_cfg = _train_config(cfg, seed=0, model_dir=None, resume=False, device="cpu", progress=False,
                              checkpoint_every=None)
    network, _ = fit_masksc(Xg, cfg, train_cfg, is_padding=grid.is_padding, progress=False,
                            teacher_cfg=teacher_config(cfg, 0, Xg, **teacher))
    for (k, v), w in zip(model.network.state_dict().items(), network.state_dict().values()):
        assert torch.equal(v, w), k

    with pytest.raises(CheckpointError, match="temperature=0.5, not 0.2"):
        fit(adata, "demo", model_dir=tmp_path / "run", epochs=3, progress=False, device="cpu", resume=True,
            teacher_overrides={**teacher, "temperature": 0.2}, **tiny)
    with pytest.raises(ValueError, match="MED is off"):
        fit(adata, "demo", epochs=1, progress=False, device="cpu", med=False, teacher_overrides={"epochs": 1},
            **tiny)


def test_train_config_refuses_values_that_cannot_train():
    """Refused where the config is made, not once AdamW is built after the teacher has trained,
    and never silently reinterpreted (a negative clip would turn clipping off)."""
    for key, value in (("epochs", 0), ("epochs", -3), ("epochs", 2.5), ("batch_size", 0), ("checkpoint_every", 0),
                       ("keep_checkpoints", -1), ("num_workers", -1)):
        with pytest.raises(ValueError, match=f"{key}={value} must be an integer >= "):
            tcfg(**{key: value})
    for key, value, message in (("lr", -1.0, "lr=-1.0 must be a number > 0"), ("lr", float("nan"), "lr=nan"),
                                ("clip", -1.0, r"clip=-1.0 must be a number >= 0 \(0: no clipping\)"),
                                ("warmup_epochs", -1.0, "warmup_epochs=-1.0 must be"),
                                ("betas", (0.9, 1.5), r"betas=\(0.9, 1.5\) must be two numbers in \[0, 1\)"),
                                ("weight_decay", -0.1, "weight_decay=-0.1"), ("min_lr_ratio", 2.0, "min_lr_ratio=2.0")):
        with pytest.raises(ValueError, match=message):
            tcfg(**{key: value})
        if key != "min_lr_ratio":  # the preset carries the same recipe fields
            with pytest.raises(ValueError, match=message):
                CFG.replace(**{key: value})
    cfg = tcfg(betas=(0.8, 0.9))
    assert TrainConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
    assert cfg.replace(epochs=7).epochs == 7
    assert tcfg(betas=[0.8, 0.9]) == cfg  # a list is the tuple, so a run started with one resumes


def test_train_config_takes_numpy_numbers_and_refuses_bools():
    cfg = tcfg(epochs=np.int32(4), batch_size=np.int64(16), seed=np.int64(3), lr=np.float32(3e-3),
               warmup_epochs=np.float32(1.0), min_lr_ratio=np.float32(0.5), keep_checkpoints=np.uint8(0))
    assert cfg == tcfg(seed=3, lr=float(np.float32(3e-3)), min_lr_ratio=0.5, keep_checkpoints=0)
    assert type(cfg.epochs) is int and type(cfg.lr) is float
    for key, value in (("epochs", True), ("batch_size", np.True_), ("keep_checkpoints", False)):
        with pytest.raises(ValueError, match=f"^{key}=True must be an integer >= |^{key}=False must be an integer"):
            tcfg(**{key: value})
    for key in ("lr", "min_lr_ratio", "clip"):
        with pytest.raises(ValueError, match=f"^{key}=True must be a number"):
            tcfg(**{key: True})


@pytest.mark.parametrize("seed", [-1, True, 1.0, 2**63, 2**64])
def test_train_config_refuses_a_seed_outside_the_range_every_generator_takes(seed):
    """SeedSequence refuses -1 mid-run, torch overflows on 2**64 ("Overflow when unpacking long long"):
    both are refused when the config is made, naming the range, as checks.check_seed does."""
    with pytest.raises(DataError, match=r"^seed must be an integer in \[0, 2\*\*63 - 1\], got .*fix: "):
        tcfg(seed=seed)
    assert tcfg(seed=2**63 - 1).seed == 2**63 - 1


def test_train_refuses_a_directory_holding_a_run_without_resume(tmp_path):
    X = structured_grid()
    train(make(), X, tcfg(epochs=2, checkpoint_dir=str(tmp_path)))
    before = {p: (tmp_path / p / "model.safetensors").read_bytes() for p in os.listdir(tmp_path) if p != "last"}
    with pytest.raises(CheckpointError, match="holds a training run.*fix: pass --resume"):
        train(make(), X, tcfg(epochs=3, checkpoint_dir=str(tmp_path)))
    assert before == {p: (tmp_path / p / "model.safetensors").read_bytes() for p in os.listdir(tmp_path)
                      if p != "last"}


def test_resuming_a_finished_run_returns_its_last_checkpoint(tmp_path):
    X = structured_grid()
    done = train(make(), X, tcfg(epochs=2, checkpoint_dir=str(tmp_path)))
    again = train(make(), X, tcfg(epochs=2, checkpoint_dir=str(tmp_path), resume=True))
    assert again.resumed_from_epoch == 2 and again.losses == done.losses
    assert again.checkpoint == done.checkpoint == str(tmp_path / "epoch-000002")


def _tiny_fit_args():
    from masksc.data import synthetic
    adata = synthetic(120, n_genes=200, n_types=3, seed=5)
    tiny = dict(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, decoder_dim=8, decoder_depth=1,
                decoder_heads=2, target_dim=6, batch_size=32, progress=False, device="cpu",
                teacher_overrides={"epochs": 1, "layers": [10, 8, 6]})
    return adata, tiny


def test_tl_fit_resuming_a_finished_run_records_its_model_dir(tmp_path):
    from masksc import tl
    adata, tiny = _tiny_fit_args()
    first = tl.fit(adata, "demo", model_dir=tmp_path / "run", epochs=1, **tiny)
    again = tl.fit(adata, "demo", model_dir=tmp_path / "run", epochs=1, resume=True, **tiny)
    assert again.path == first.path == str(tmp_path / "run" / "epoch-000001")
    run = adata.uns["masksc"]["fit"]
    assert run["model_dir"] == str((tmp_path / "run").resolve()) and run["checkpoint"] == first.path


def test_tl_fit_resumes_without_repeating_its_teacher_overrides(tmp_path):
    """A resumed in-memory fit continues with the checkpoint's teacher; one given no teacher settings
    contradicts nothing (it was refused: the defaults were compared with the saved teacher)."""
    from masksc import tl
    adata, tiny = _tiny_fit_args()
    first = tl.fit(adata, "demo", model_dir=tmp_path / "run", epochs=1, **tiny)
    rest = {k: v for k, v in tiny.items() if k != "teacher_overrides"}
    layers = {"layers": [10, 8, 6]}  # needed by the tiny target_dim, not by the run: its teacher epochs are not repeated
    again = tl.fit(adata, "demo", model_dir=tmp_path / "run", epochs=1, resume=True, **rest, teacher_overrides=layers)
    assert again.path == first.path
    with pytest.raises(CheckpointError, match=r"teacher in .* was trained with epochs=1, not 3"):
        tl.fit(adata, "demo", model_dir=tmp_path / "run", epochs=1, resume=True, **rest,
               teacher_overrides={**layers, "epochs": 3})


def test_fit_masksc_resuming_a_run_without_a_teacher_with_med_on_names_the_model_config(tmp_path):
    from masksc.train import fit_masksc
    run = str(tmp_path / "run")
    fit_masksc(structured_grid(), CFG.replace(med=False), tcfg(epochs=1, checkpoint_dir=run))
    teacher_cfg = ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True, epochs=1, batch_size=16)
    with pytest.raises(CheckpointError, match=r"different model config \(med: saved False, requested True\)"):
        fit_masksc(structured_grid(), CFG.replace(med=True), tcfg(epochs=1, checkpoint_dir=run, resume=True),
                   teacher_cfg=teacher_cfg)


def test_fit_refuses_bad_settings_and_model_dirs_before_any_work(tmp_path, monkeypatch):
    from masksc import pipeline, tl
    from masksc.errors import CheckpointError, DataError, MaskscError

    def no_work(*a, **k):
        raise AssertionError("fit started working before checking its settings")

    monkeypatch.setattr(pipeline, "preprocess_to_grid", no_work)
    monkeypatch.setattr(pipeline, "_fit_streaming", no_work)
    adata, tiny = _tiny_fit_args()
    afile = tmp_path / "notes.txt"
    afile.write_text("the user's file")
    with pytest.raises(ValueError, match="epochs=0 must be an integer >= 1"):
        tl.fit(adata, "demo", epochs=0, **tiny)
    with pytest.raises(ValueError, match=r"device 'cuda:99'.*fix: pass"):
        tl.fit(adata, "demo", epochs=1, **{**tiny, "device": "cuda:99"})
    with monkeypatch.context() as m:  # it was found at the first op, after the teacher had trained
        m.setenv("MASKSC_BACKEND", "trition")
        with pytest.raises(ValueError, match=r"MASKSC_BACKEND='trition' is not one of"):
            tl.fit(adata, "demo", epochs=1, **tiny)
    for bad in (0, 1e5, "4096", True):  # 1e5 passed a `< 1` check and failed inside range()
        with pytest.raises(DataError, match=rf"chunk_size={bad!r}; fix: pass a positive whole number of cells"):
            tl.fit(adata, "demo", epochs=1, chunk_size=bad, **tiny)
    with pytest.raises(DataError, match=r"teacher_cells='500'; fix: pass a whole number of cells \(default 50,000\), or "
                                        r"None for all cells\.$"):
        tl.fit(adata, "demo", epochs=1, teacher_cells="500", **tiny)  # was a TypeError from `<`
    with pytest.raises(ValueError, match=r"contrastive-sc config: batch_size=2\.5 must be an integer"):
        tl.fit(adata, "demo", epochs=1, **{**tiny, "teacher_overrides": {"batch_size": 2.5}})  # a TypeError in training
    for teacher_cells in (0, 1, 19):  # one cell trained a teacher to loss 0 and fitted the layout on it
        with pytest.raises(DataError, match=rf"teacher_cells={teacher_cells} are too few to fit the teacher and the "
                                            r"gene layout on \(at least 20, .* or None for all cells"):
            tl.fit(adata, "demo", epochs=1, teacher_cells=teacher_cells, **tiny)
    with pytest.raises(DataError, match=r"^3 cells are too few to train on \(at least 20"):
        tl.fit(adata[:3].copy(), "demo", epochs=1, **tiny)
    adata[:3].copy().write_h5ad(tmp_path / "three.h5ad")
    with pytest.raises(DataError, match=r"^3 cells are too few"):
        pipeline.fit(tmp_path / "three.h5ad", "demo", epochs=1, **tiny)
    (tmp_path / "three.h5ad").unlink()
    with pytest.raises(MaskscError, match="notes.txt is a file, not a folder"):
        tl.fit(adata, "demo", epochs=1, model_dir=afile, **tiny)
    with pytest.raises(MaskscError, match="notes.txt is a file, not a folder"):
        tl.fit(adata, "demo", epochs=1, model_dir=afile / "run", **tiny)
    (tmp_path / "run" / "epoch-000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds a training run"):
        tl.fit(adata, "demo", epochs=1, model_dir=tmp_path / "run", **tiny)
    assert afile.read_text() == "the user's file" and sorted(os.listdir(tmp_path)) == ["notes.txt", "run"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a torch without CUDA")
def test_cuda_device_without_cuda_is_refused_with_the_fix():
    from masksc.train import resolve_device
    with pytest.raises(ValueError, match="device 'cuda'.*fix: pass --device cpu"):
        resolve_device("cuda")
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


def test_a_finished_run_whose_last_checkpoint_was_moved_and_linked_names_the_link(tmp_path):
    """`last` -> epoch-000002, itself a link to a folder moved elsewhere: the run's checkpoint is
    run/epoch-000002 (it was named run/<the moved folder's name>, a path that does not exist)."""
    run = tmp_path / "run"
    train(make(), structured_grid(), tcfg(epochs=2, checkpoint_every=1, checkpoint_dir=str(run)))
    shutil.move(run / "epoch-000002", tmp_path / "moved-ckpt")
    os.symlink(tmp_path / "moved-ckpt", run / "epoch-000002")
    resumed = train(make(), structured_grid(), tcfg(epochs=2, checkpoint_every=1, checkpoint_dir=str(run),
                                                    resume=True))
    assert resumed.checkpoint == str(run / "epoch-000002") and Path(resumed.checkpoint).is_dir()
