"""Checkpoints: round trip, atomic writes, clear errors, gene-list refusal."""
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from masksc import checkpoint as ckpt
from masksc.checkpoint import check_genes, load_model, save_checkpoint
from masksc.data import GridLayout
from masksc.embed import embed_matrix
from masksc.errors import CheckpointError, MaskscError
from masksc.models import ContrastiveConfig, ContrastiveSC, MaskSC, MaskSCConfig

CFG = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                   decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)
GENES = [f"g{i}" for i in range(60)]


def setup(seed=0, med=True):
    torch.manual_seed(seed)
    X = sp.random(12, 60, density=0.3, format="csr", dtype=np.float32, random_state=seed)
    with pytest.warns(UserWarning, match="padding"):
        layout = GridLayout.fit(X, GENES, shape=(8, 8), patch=2)
    model = MaskSC(CFG.replace(med=med))
    model.set_padding(layout.is_padding)
    if med:
        teacher = ContrastiveSC(ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True))
        teacher.fit_standardizer(np.full(64, 0.5), np.full(64, 2.0))
        model.set_teacher(teacher)
    return model, layout, layout.to_grid(X)


@pytest.mark.parametrize("med", [True, False])
def test_round_trip_embeddings_equal(tmp_path, med):
    model, layout, Xg = setup(med=med)
    extra = {"grid": layout.to_dict(), "preprocessor": {"params": {"n_top_genes": 60}}}
    save_checkpoint(tmp_path / "m", model, extra=extra, train_config={"epochs": 1})
    loaded, meta = load_model(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    assert meta["meta"]["grid"]["genes"] == layout.genes
    assert meta["meta"]["preprocessor"] == extra["preprocessor"]
    assert loaded.cfg == model.cfg and torch.equal(loaded.grid_padding, model.grid_padding)
    assert (loaded.teacher is None) == (not med)
    np.testing.assert_array_equal(embed_matrix(model, Xg, progress=False), embed_matrix(loaded, Xg, progress=False))
    if med:  # the teacher (weights, BatchNorm stats, standardiser) survives the round trip
        for (k, v), w in zip(model.teacher.state_dict().items(), loaded.teacher.state_dict().values()):
            assert torch.equal(v, w), k
    assert not loaded.training


@pytest.mark.parametrize("read_only", ["parent", "checkpoint"])
def test_saving_over_a_checkpoint_in_a_folder_it_cannot_write_is_named(tmp_path, monkeypatch, read_only):
    """The replacement is written beside the checkpoint, but the check probed inside it: a folder
    that can't be written (chattr +i, a read-only mount) raised PermissionError on a temp path;
    probing only beside it, a checkpoint made read-only was replaced and left hidden beside the
    new one, its files undeletable."""
    import tempfile
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    real = tempfile.mkdtemp
    locked = tmp_path if read_only == "parent" else tmp_path / "m"

    def read_only_folder(*a, dir=None, **k):
        if Path(dir) == locked:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkdtemp", read_only_folder)
    with pytest.raises(MaskscError, match=rf"cannot write {re.escape(str(tmp_path / 'm'))}: cannot write in "
                                          rf"{re.escape(str(locked))} \(Operation not permitted\)"):
        save_checkpoint(tmp_path / "m", setup(seed=1)[0])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m"]
    saved, got = model.state_dict(), load_model(tmp_path / "m")[0].state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())


def test_loading_leaves_the_callers_generator_alone(tmp_path):
    """Loading draws initial weights it then overwrites: the caller's next random draw must be the
    one it would have been without the load (as after an unseeded scanpy call)."""
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    load_model(tmp_path / "m")
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_overwrite_is_atomic_and_failed_save_keeps_old(tmp_path, monkeypatch):
    model, layout, Xg = setup()
    save_checkpoint(tmp_path / "m", model)
    before = embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False)
    other, _, _ = setup(seed=1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m", other)
    assert os.listdir(tmp_path) == ["m"]  # no temp dir left behind
    np.testing.assert_array_equal(embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False), before)
    monkeypatch.undo()
    save_checkpoint(tmp_path / "m", other)  # a successful overwrite replaces it
    after = embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False)
    np.testing.assert_array_equal(after, embed_matrix(other, Xg, progress=False))
    assert os.listdir(tmp_path) == ["m"]


def _exchange_supported(tmp_path) -> bool:
    """Whether renameat2(RENAME_EXCHANGE) works here (glibc >= 2.28 and a filesystem with it)."""
    (tmp_path / "probe-a").mkdir()
    (tmp_path / "probe-b").mkdir()
    try:
        ckpt._exchange(tmp_path / "probe-a", tmp_path / "probe-b")
        return True
    except OSError:
        return False
    finally:
        os.rmdir(tmp_path / "probe-a")
        os.rmdir(tmp_path / "probe-b")


def _moving_aside_forbidden(*a, **k):
    raise AssertionError("the old checkpoint was moved aside, not exchanged")


def test_overwrite_is_one_atomic_exchange(tmp_path, monkeypatch):
    """Where the system can exchange two names, replacing a checkpoint never leaves ``path``
    without one: the new directory and the old one swap names, and the old one is deleted."""
    if not _exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    model, _, Xg = setup()
    other, _, _ = setup(seed=1)
    save_checkpoint(tmp_path / "m", model)
    swaps = []
    real = ckpt._exchange

    def exchange(a, b):
        assert sorted(os.listdir(b)) == ["config.json", "model.safetensors"]  # the old one is still there
        real(a, b)
        swaps.append((a.name, b.name))

    monkeypatch.setattr(ckpt, "_exchange", exchange)
    monkeypatch.setattr(ckpt, "_move_aside", _moving_aside_forbidden)
    save_checkpoint(tmp_path / "m", other)
    assert len(swaps) == 1 and swaps[0][0].startswith(".tmp-m-") and swaps[0][1] == "m"
    assert os.listdir(tmp_path) == ["m"]  # neither the temp dir (holding the old one) nor an .old- dir is left
    np.testing.assert_array_equal(embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False),
                                  embed_matrix(other, Xg, progress=False))


def test_exchange_failing_otherwise_raises_and_keeps_old(tmp_path, monkeypatch):
    """Only errors meaning "no exchange here" fall back to moving aside; others (here EIO) raise,
    with the old checkpoint untouched and the new one's temp dir removed."""
    model, _, Xg = setup()
    other, _, _ = setup(seed=1)
    save_checkpoint(tmp_path / "m", model)
    before = embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False)

    def broken(a, b):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ckpt, "_exchange", broken)
    monkeypatch.setattr(ckpt, "_move_aside", _moving_aside_forbidden)
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path / "m", other)
    assert info.value.errno == errno.EIO
    assert os.listdir(tmp_path) == ["m"]
    np.testing.assert_array_equal(embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False), before)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, None])
def test_overwrite_falls_back_to_moving_aside_without_exchange(tmp_path, monkeypatch, code):
    """A filesystem or kernel without RENAME_EXCHANGE (EINVAL, EOPNOTSUPP, ENOSYS) or a C library
    without renameat2 (None) still replaces the checkpoint, by moving the old one aside."""
    model, _, Xg = setup()
    other, _, _ = setup(seed=1)
    save_checkpoint(tmp_path / "m", model)

    def unsupported(a, b):
        raise OSError(code, os.strerror(code))

    if code is None:
        monkeypatch.setattr(ckpt, "_renameat2", lambda: None)
    else:
        monkeypatch.setattr(ckpt, "_exchange", unsupported)
    moved = []
    real = ckpt._move_aside
    monkeypatch.setattr(ckpt, "_move_aside", lambda p: moved.append(p.name) or real(p))
    save_checkpoint(tmp_path / "m", other)
    assert moved == ["m"]
    assert os.listdir(tmp_path) == ["m"]
    np.testing.assert_array_equal(embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False),
                                  embed_matrix(other, Xg, progress=False))


def test_load_names_a_checkpoint_an_interrupted_save_left_aside(tmp_path):
    """A crash between moving the old checkpoint aside and renaming the new one in leaves no
    checkpoint at ``path``; loading it names the complete one left aside and how to restore it."""
    model, _, Xg = setup()
    save_checkpoint(tmp_path / "m", model)
    save_checkpoint(tmp_path / "m-2", model)
    old = ckpt._move_aside(tmp_path / "m")  # what the fallback had done when the crash came
    other = ckpt._move_aside(tmp_path / "m-2")  # another checkpoint's, newer: not this one
    os.utime(other / "x", (2e9, 2e9))
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint at {tmp_path / 'm'}, but {old / 'x'} holds a "
                                                        "complete masksc checkpoint") + r".*fix: rename it back \(mv "):
        load_model(tmp_path / "m")
    os.rename(old / "x", tmp_path / "m")  # the fix the message gives
    np.testing.assert_array_equal(embed_matrix(load_model(tmp_path / "m")[0], Xg, progress=False),
                                  embed_matrix(model, Xg, progress=False))


def test_load_ignores_an_incomplete_or_foreign_old_sibling(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    old = ckpt._move_aside(tmp_path / "m")
    os.remove(old / "x" / "model.safetensors")  # deleted part-way: nothing to restore
    (tmp_path / ".old-m-12345678" / "x").mkdir(parents=True)  # a folder that is not a checkpoint
    with pytest.raises(CheckpointError, match="the directory does not exist"):
        load_model(tmp_path / "m")


def test_save_replaces_only_a_checkpoint(tmp_path):
    """Saving over a checkpoint replaces it; anything else at the path is refused and kept."""
    from masksc.errors import MaskscError
    model, _, _ = setup()
    (tmp_path / "results" / "sub").mkdir(parents=True)
    (tmp_path / "results" / "sub" / "scores.csv").write_text("1")
    (tmp_path / "notes.txt").write_text("mine")
    save_checkpoint(tmp_path / "run" / "epoch-000001", model)
    os.symlink("epoch-000001", tmp_path / "run" / "last")
    for target, message in ((tmp_path / "results", "is a folder that is not a masksc checkpoint"),
                            (tmp_path / "run", r"is a training run directory \(its checkpoints and last link\)"),
                            (tmp_path / "run" / "last", "is a symlink"),
                            (tmp_path / "notes.txt", "is a file, not a folder"),
                            (tmp_path / "notes.txt" / "m", "is a file, not a folder")):
        with pytest.raises(MaskscError, match=message):
            save_checkpoint(target, model)
    assert (tmp_path / "results" / "sub" / "scores.csv").read_text() == "1"
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert os.readlink(tmp_path / "run" / "last") == "epoch-000001"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "results", "run"]  # nothing left aside


def test_load_refuses_a_device_before_reading(tmp_path):
    from masksc.pipeline import MaskSCModel
    with pytest.raises(ValueError, match="device 'meta' holds no weights"):
        MaskSCModel.load(tmp_path / "nowhere", device="meta")
    with pytest.raises(ValueError, match="device 'bogus' is not a device name"):
        MaskSCModel.load(tmp_path / "nowhere", device="bogus")


def test_load_resolves_run_dir_last(tmp_path):
    """A run directory loads the checkpoint its ``last`` link names, not merely the newest one."""
    model, _, _ = setup()
    newer, _, _ = setup(seed=1)
    save_checkpoint(tmp_path / "epoch-000003", model)
    save_checkpoint(tmp_path / "epoch-000004", newer)
    ckpt.point_last(tmp_path, "epoch-000003")
    loaded, meta = load_model(tmp_path)
    assert meta["path"].endswith("epoch-000003")
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    for name, value in saved.items():
        assert torch.equal(got[name], value), name
    assert any(not torch.equal(got[k], v) for k, v in newer.state_dict().items())


def test_missing_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a masksc checkpoint"):
        load_model(tmp_path / "empty")


def test_missing_weights_file(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "m")


def test_corrupt_weights(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "m")


def test_corrupt_config(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_bytes(b"\xff\xfe{")  # not UTF-8
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("[" * 100_000)  # nested past json's recursion limit
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "m")
    run = tmp_path / "run"  # a run without its last link: its epoch folders are looked at one by one
    save_checkpoint(run / "epoch-000001", model)
    (run / "epoch-000001" / "config.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match="is not a masksc checkpoint"):
        load_model(run)


def test_config_from_another_version(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["format_version"] = 99
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(tmp_path / "m")
    cfg["format_version"] = "1"  # read "format version 1 ... is not 1"
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format version '1' .* is not 1 "):
        load_model(tmp_path / "m")
    cfg["format_version"] = 1
    cfg["model_config"]["config_version"] = 7
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit this masksc version"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("section, field", [("model_config", "num_heads"), ("model_config", "ime"),
                                            ("teacher_config", "dropout")])
def test_a_config_field_deleted_is_named_not_defaulted(tmp_path, section, field):
    """Every release wrote every field; a deleted one took its default (4 heads for 2, 2-D patches
    for 1-D tokens), whose weights have the same shapes: another model loaded without a word."""
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg[section][field]
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"lacks \['{field}'\]; it was edited"):
        load_model(tmp_path / "m")


def test_weights_from_another_model(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    path = tmp_path / "m" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model_config"]["embed_dim"] = 32
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path / "m")


def test_gene_mismatch_refused_with_count_and_fix(tmp_path):
    model, layout, _ = setup()
    save_checkpoint(tmp_path / "m", model, extra={"grid": layout.to_dict()})
    _, meta = load_model(tmp_path / "m")
    check_genes(meta, GENES + ["extra"])  # a superset is fine
    with pytest.raises(CheckpointError, match=r"7 of the 60 genes .* missing.*fix") as exc:
        check_genes(meta, GENES[:53])
    assert "another case" not in str(exc.value)
    cased = [g.upper() for g in GENES[:3]] + GENES[3:]  # mouse symbols written as human ones, say
    with pytest.raises(CheckpointError, match=rf"3 of the 60 genes .* Every one is in the data in another case "
                                              rf"\(e\.g\. '{GENES[0].upper()}' for '{GENES[0]}'\): names must match "
                                              r"exactly\.$"):
        check_genes(meta, cased)
    both = {"genes": ["Actb", "ACTB", "Gapdh"]}  # the model has both: ACTB is its own gene, not Actb in another case
    with pytest.raises(CheckpointError) as exc:
        check_genes(both, ["ACTB", "Gapdh"])
    assert "another case" not in str(exc.value)
    with pytest.raises(CheckpointError, match=r"\(e\.g\. 'Actb' for 'actb'\)"):  # the data's first, every run
        check_genes({"genes": ["actb"]}, ["Actb", "ACTB"])
    with pytest.raises(CheckpointError, match="no saved gene layout"):
        check_genes({"meta": {}}, GENES)


def test_training_state_missing_is_clear(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "m", model)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is missing, so the run cannot resume from .*; fix: "
                                              r"restore it from a copy, or start the run again in a new directory"):
        ckpt.load_training_state(tmp_path / "m")


def _training_checkpoint(path, model, state=None):
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(path, model, optimizer=opt, trainer_state=state if state is not None else
                           {"epoch": 1, "step": 3, "losses": [0.5], "rng": {}})


def test_an_edited_save_id_is_named_as_damage(tmp_path):
    model, _, _ = setup()
    _training_checkpoint(tmp_path / "m", model)
    assert ckpt.load_training_state(tmp_path / "m")[1]["epoch"] == 1
    record = json.loads((tmp_path / "m" / "trainer_state.json").read_text())
    (tmp_path / "m" / "trainer_state.json").write_text(json.dumps({**record, "save": ["edited"]}))
    with pytest.raises(CheckpointError, match=r"damaged \(trainer_state\.json holds save=\['edited'\], not a "
                                              r"save's id\)"):  # not "unhashable type: 'list'"
        ckpt.load_training_state(tmp_path / "m")


@pytest.mark.parametrize("state, damage", [({}, r"trainer_state\.json lacks \['epoch', 'step', 'losses', 'rng'\]"),
                                           ({"epoch": "one", "step": 3, "losses": [], "rng": {}},
                                            r"trainer_state\.json has epoch='one', not a count"),
                                           ({"epoch": 1, "step": 3, "losses": 0.5, "rng": {}},
                                            r"trainer_state\.json has losses=0\.5, not a list"),
                                           ([1, 2], r"trainer_state\.json holds a list, not a record")])
def test_a_damaged_training_record_is_named_not_a_traceback(tmp_path, state, damage):
    model, _, _ = setup()
    _training_checkpoint(tmp_path / "m", model, state)
    with pytest.raises(CheckpointError, match=rf"the training state in .* is damaged \({damage}\); fix: restore"):
        ckpt.load_training_state(tmp_path / "m")
    torch.save({"scheduler": None}, tmp_path / "m" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt holds no optimizer state"):
        ckpt.load_training_state(tmp_path / "m")
    (tmp_path / "m" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"is damaged \([^\n]*\); fix: restore those files") as exc:
        ckpt.load_training_state(tmp_path / "m")
    assert "\n" not in str(exc.value)  # torch's paragraph cut to its first line


def test_saving_a_model_never_drops_a_runs_training_state_or_other_files(tmp_path):
    """MaskSCModel.save over a training checkpoint (load(...).save(m.path)) would drop its optimiser
    state and losses; over a checkpoint holding other files it would delete them: both refused,
    both kept. A saved model is still replaced, and training replaces its own checkpoints."""
    model, _, _ = setup()
    other, _, _ = setup(seed=1)
    _training_checkpoint(tmp_path / "run" / "epoch-000001", model)
    with pytest.raises(CheckpointError, match=r"is a checkpoint of a training run; saving a model over it would drop "
                                              r"its optimiser state and training record"):
        save_checkpoint(tmp_path / "run" / "epoch-000001", other)
    assert (tmp_path / "run" / "epoch-000001" / "optimizer.pt").exists()
    _training_checkpoint(tmp_path / "run" / "epoch-000001", other)  # a resumed run re-saving its epoch
    save_checkpoint(tmp_path / "m", model)
    (tmp_path / "m" / "NOTES.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"is a checkpoint that also holds \['NOTES\.txt'\], which replacing it "
                                              r"would delete; fix"):
        save_checkpoint(tmp_path / "m", other)
    assert (tmp_path / "m" / "NOTES.txt").read_text() == "mine"
    (tmp_path / "m" / "NOTES.txt").unlink()
    save_checkpoint(tmp_path / "m", other)
    assert torch.equal(load_model(tmp_path / "m")[0].state_dict()["patch_weight"], other.state_dict()["patch_weight"])


def test_leftover_cleanup_removes_only_what_saving_leaves(tmp_path):
    """remove_leftovers deletes interrupted saves' .tmp-epoch-* / .old-epoch-* / .old-last-* folders
    and .last-*.tmp links, never a user's hidden folders that merely look alike."""
    keep = [".old-photos-20240101", ".tmp-cache-abc_1234", ".tmp-epoch-1-abcdefgh", ".cache"]
    gone = [".tmp-epoch-000003-ab_cd123", ".old-epoch-000002-xyz12345", ".old-last-q1w2e3r4"]
    for name in keep + gone:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    os.symlink("epoch-000001", tmp_path / ".last-123.tmp")
    ckpt.remove_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_a_run_whose_last_link_is_broken_names_its_newest_checkpoint(tmp_path):
    model, _, _ = setup()
    save_checkpoint(tmp_path / "epoch-000001", model)
    save_checkpoint(tmp_path / "epoch-000002", model)
    ckpt.point_last(tmp_path, "epoch-000003")  # a deleted checkpoint
    with pytest.raises(CheckpointError, match=r"is a training run, but its last link names no checkpoint; the newest "
                                              r"complete checkpoint there is epoch-000002; fix: pass .*epoch-000002"):
        load_model(tmp_path)
    os.unlink(tmp_path / "last")
    with pytest.raises(CheckpointError, match=r"its last link is missing"):
        load_model(tmp_path)


def test_a_run_directory_is_held_by_one_fit_at_a_time(tmp_path):
    """run_lock: a directory another process holds is refused at once; within a process the lock
    is re-entrant (pipeline.fit holds it, and train() inside takes it again)."""
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(tmp_path)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=r"is in use: another fit is writing its run there; fix: wait"):
            with ckpt.run_lock(tmp_path):
                pass
        from masksc.data import synthetic
        from masksc.pipeline import fit
        with pytest.raises(CheckpointError, match=r"is in use"):  # before any preprocessing or teacher training
            fit(synthetic(60, n_genes=80, seed=0), "demo", model_dir=tmp_path, epochs=1, progress=False)
        assert os.listdir(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()
    with ckpt.run_lock(tmp_path / "new"):
        with ckpt.run_lock(tmp_path / "new"):
            pass
        assert (tmp_path / "new").is_dir()
    with ckpt.run_lock(tmp_path / "new"):  # released: free again
        pass


def test_the_lock_removes_only_the_folders_it_created_and_left_empty(tmp_path, monkeypatch):
    """A folder made for a run that wrote nothing goes again, parents too; one that existed stays,
    also when the path reaches it through a folder that does not exist ("missing/../kept")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    for path in ("missing/../kept", "kept", "new/sub/run", "missing/../new"):
        with ckpt.run_lock(path):
            assert Path(path).is_dir()
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "new").exists()
    with ckpt.run_lock("new/run"):
        (tmp_path / "new" / "run" / "epoch-000001").mkdir()
    assert (tmp_path / "new" / "run" / "epoch-000001").is_dir()  # a run was written: kept, parents too


def test_a_run_directory_is_held_by_one_thread_at_a_time(tmp_path):
    """Two threads of one process fitting into one directory: the second is refused (re-entry is
    the holding thread's alone), and the first is unharmed."""
    import threading
    entered, release = threading.Event(), threading.Event()

    def first():
        with ckpt.run_lock(tmp_path / "run"):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(30)
        with pytest.raises(CheckpointError, match="is in use"):
            with ckpt.run_lock(tmp_path / "run"):
                pass
    finally:
        release.set()
        thread.join()
    with ckpt.run_lock(tmp_path / "run"):  # free once the first thread let go
        pass


def test_a_filesystem_that_cannot_lock_a_folder_still_trains(tmp_path, monkeypatch, caplog):
    """NFS locks only files opened for writing (EBADF on a folder): the fit goes on, unguarded."""
    import fcntl
    import logging

    def no_locks(fd, op):
        raise OSError(errno.EBADF, "Bad file descriptor")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.INFO, logger="masksc.checkpoint"), ckpt.run_lock(tmp_path / "nfs"):
        model, _, _ = setup()
        _training_checkpoint(tmp_path / "nfs" / "epoch-000001", model)
    assert "cannot lock" in caplog.text and (tmp_path / "nfs" / "epoch-000001").is_dir()


def test_checkpoint_directories_get_the_umask_mode(tmp_path):
    """A checkpoint directory gets the mode ``mkdir`` would give (mkdtemp's 0700 would hide it
    from the group), like its files."""
    model, _, _ = setup(med=False)
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "m", model)
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "m" / ckpt.CONFIG).stat().st_mode & 0o777 == 0o640


@pytest.fixture
def umask_022():
    """A umask under which mkstemp's and safetensors' 0600 differs from a plain file's mode (0644)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_every_file_of_a_checkpoint_gets_the_umask_mode(tmp_path, umask_022):
    """The weights too: safetensors writes model.safetensors 0600, which would hide them from the
    group that can read config.json beside them."""
    model, _, _ = setup(med=True)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "m", model, train_config={"epochs": 1}, optimizer=optimizer,
                    trainer_state={"epoch": 1, "losses": [1.0]}, extra={"note": "x"})
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == sorted([ckpt.CONFIG, ckpt.WEIGHTS, ckpt.OPTIMIZER, ckpt.STATE])
    assert {name: oct((tmp_path / "m" / name).stat().st_mode & 0o777) for name in files} == \
        {name: "0o644" for name in files}
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755


def test_check_run_dir_refuses_unusable_paths_before_creating_anything(tmp_path):
    from masksc.errors import MaskscError
    afile = tmp_path / "notes.txt"
    afile.write_text("the user's file")
    with pytest.raises(MaskscError, match="notes.txt is a file, not a folder; fix: "):
        ckpt.check_run_dir(afile)
    with pytest.raises(MaskscError, match="notes.txt is a file, not a folder; fix: "):
        ckpt.check_run_dir(afile / "run")
    assert afile.read_text() == "the user's file"
    assert ckpt.check_run_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]   # checked, not created; no probe left
    (tmp_path / "empty").mkdir()
    ckpt.check_run_dir(tmp_path / "empty")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no file can be created")
def test_check_run_dir_refuses_a_folder_that_cannot_be_written():
    from masksc.errors import MaskscError
    with pytest.raises(MaskscError, match=r"cannot write /proc/run: cannot write in /proc .*fix: choose"):
        ckpt.check_run_dir("/proc/run")


def test_check_run_dir_refuses_a_directory_holding_a_run_unless_resuming(tmp_path):
    model, _, _ = setup(med=False)
    run = tmp_path / "run"
    save_checkpoint(run / "epoch-000001", model)
    with pytest.raises(CheckpointError, match="run already holds a training run.*--resume.*new directory"):
        ckpt.check_run_dir(run)
    ckpt.point_last(run, "epoch-000001")
    with pytest.raises(CheckpointError, match="--resume"):
        ckpt.check_run_dir(run)
    ckpt.check_run_dir(run, resume=True)
    save_checkpoint(tmp_path / "saved", model)          # a saved model (model.save) is not a place to train
    with pytest.raises(CheckpointError, match="saved model"):
        ckpt.check_run_dir(tmp_path / "saved")
    with pytest.warns(UserWarning, match=r"resume=True \(--resume\), but there is no run directory .*runn; starting "
                                         r"a new run there \(check the path"):
        ckpt.check_run_dir(tmp_path / "runn", resume=True)  # a typo: nothing to continue
    assert not (tmp_path / "runn").exists()
    mine = tmp_path / "mine"  # a folder of the user's own work that happens to hold a config.json
    mine.mkdir()
    (mine / "config.json").write_text('{"lr": 0.1}')
    for resume in (False, True):  # --resume was the advice, and then "-o <its parent>"
        with pytest.raises(CheckpointError, match=r"mine holds a config\.json that is not a masksc checkpoint's .*; "
                                                  r"fix: choose a new directory for the run"):
            ckpt.check_run_dir(mine, resume=resume)
    assert os.listdir(mine) == ["config.json"]
    (tmp_path / "saved" / "config.json").write_text('{"format": "mask')  # a damaged checkpoint is still one
    with pytest.raises(CheckpointError, match=r"saved is one checkpoint \(a saved model\), not a training run"):
        ckpt.check_run_dir(tmp_path / "saved", resume=True)


def test_a_model_saved_on_a_full_disk_is_told_to_save_elsewhere_not_to_resume(tmp_path, monkeypatch):
    """--resume is a training run's fix; a plain save (MaskSCModel.save) gets its own."""
    model, _, _ = setup()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError, match=r"no space left to write the checkpoint .*fix: free space there, or "
                                              r"save elsewhere\.$") as exc:
        save_checkpoint(tmp_path / "model", model)
    assert "resume" not in str(exc.value) and list(tmp_path.iterdir()) == []
