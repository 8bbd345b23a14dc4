"""The `masksc` command: help, fit -> embed -> cluster -> evaluate round trip, bad input."""
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from masksc.cli import main
from masksc.data import synthetic, write_synthetic_h5ad

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "demo", "--epochs", "2", "--grid", "16x16", "--batch-size", "50", "--set", "embed_dim=32",
        "--set", "depth=1", "--set", "num_heads=2", "--set", "decoder_dim=32", "--set", "decoder_depth=1",
        "--set", "decoder_heads=2", "--chunk-size", "100", "--teacher-cells", "200", "--teacher-set", "epochs=2",
        "--teacher-set", "temperature=0.5", "--device", "cpu"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data path, its hash before anything ran, model dir) after `masksc fit`."""
    d = tmp_path_factory.mktemp("cli")
    data = d / "cells.h5ad"
    write_synthetic_h5ad(data, 400, n_genes=300, n_types=3, seed=4)
    before = _sha(data)
    assert main(["fit", str(data), "-o", str(d / "model"), *TINY]) == 0
    return data, before, d / "model"


@pytest.mark.parametrize("module", ["masksc", "masksc.cli"])  # masksc.cli: what earlier releases documented
def test_help_lists_the_commands(module):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", module, "--help"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for command in ("fit", "embed", "cluster", "evaluate", "plot", "demo"):
        assert f"    {command} " in out.stdout


def test_ctrl_c_while_the_command_loads_its_libraries_is_one_line(monkeypatch, capsys):
    """The first seconds of every command import anndata, torch, ...: a Ctrl-C there printed a
    32-line KeyboardInterrupt traceback and exited -2, where later it is one line and 130."""
    import builtins

    from masksc.__main__ import run
    real_import = builtins.__import__

    def ctrl_c_on_cli(name, *a, **k):
        if name == "masksc.cli":
            raise KeyboardInterrupt
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", ctrl_c_on_cli)
    assert run() == 130
    assert capsys.readouterr().err == "masksc: interrupted.\n"
    monkeypatch.undo()
    code = "import sys, masksc; assert 'anndata' not in sys.modules and 'torch' not in sys.modules; masksc.read"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr  # `import masksc` (what the command's import runs first) loads neither


@pytest.mark.parametrize("as_command, world_size, stops_cleanly", [(True, "1", True), (False, "1", False),
                                                                   (True, "2", False), (True, "", True)])
def test_sigterm_stops_the_command_cleanly_only_when_run_as_the_command(monkeypatch, as_command, world_size,
                                                                        stops_cleanly):
    """Run as `masksc` (no argv), SIGTERM is turned into an interrupt for the duration of the command
    and the earlier handler comes back after; a script calling main(argv) keeps its own, and so does
    a rank under torchrun, which would otherwise wait in the shutdown barrier for peers blocked in
    a collective."""
    import signal

    from masksc import cli
    seen = []
    monkeypatch.setattr(cli, "cmd_cluster", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    argv = ["cluster", "in.h5ad", "-k", "2", "-o", "out.h5ad"]
    monkeypatch.setattr(sys, "argv", ["masksc", *argv])
    before = signal.getsignal(signal.SIGTERM)
    assert (cli.main() if as_command else cli.main(argv)) == 0
    assert (seen[0] is cli._interrupt) == stops_cleanly
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sigterm_python_drops_is_raised_at_the_next_progress_step(monkeypatch, capsys):
    """A signal that lands while Python runs a garbage-collection callback has its exception
    dropped ("Exception ignored in ..."): a fit went on to finish and exit 0 (a CI run caught it).
    The command's next progress step raises it again, and the command stops as for SIGTERM."""
    import signal

    from masksc import cli, progress
    steps = []

    class DiesOnCollection:
        def __del__(self):  # the handler, run as the signal would run it inside a __del__
            cli._interrupt(signal.SIGTERM, None)

    def long_command(args):
        for i in progress.progress_bar(range(100), disable=True):
            steps.append(i)
            if i == 3:
                DiesOnCollection()  # collected at once: its exception is printed and dropped
        return 0
    monkeypatch.setattr(cli, "cmd_cluster", long_command)
    assert cli.main(["cluster", "in.h5ad", "-k", "2", "-o", "out.h5ad"]) == 128 + signal.SIGTERM
    assert steps == [0, 1, 2, 3] and progress.pending_interrupt is None
    assert capsys.readouterr().err.rstrip().endswith("masksc cluster: terminated.")
    assert list(progress.progress_bar(range(3), disable=True)) == [0, 1, 2]  # nothing left for later


def test_a_dropped_sigterm_is_raised_by_a_bar_stepped_with_update(monkeypatch, capsys):
    """The embed bar is stepped by ``update()``, not iterated: its steps raise a dropped SIGTERM too."""
    import signal

    from masksc import cli, progress
    steps = []

    class DiesOnCollection:
        def __del__(self):
            cli._interrupt(signal.SIGTERM, None)

    def long_command(args):
        bar = progress.progress_bar(total=100, disable=True)
        for i in range(100):
            steps.append(i)
            if i == 3:
                DiesOnCollection()
            bar.update(1)
        return 0
    monkeypatch.setattr(cli, "cmd_cluster", long_command)
    assert cli.main(["cluster", "in.h5ad", "-k", "2", "-o", "out.h5ad"]) == 128 + signal.SIGTERM
    assert steps == [0, 1, 2, 3] and progress.pending_interrupt is None
    assert capsys.readouterr().err.rstrip().endswith("masksc cluster: terminated.")


@pytest.fixture
def umask_022():
    """A umask under which mkstemp's 0600 differs from a plain file's mode (0644)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_fit_embed_cluster_evaluate_round_trip(trained, tmp_path, capsys, umask_022):
    data, before, model = trained
    config = json.loads((model / "last" / "config.json").read_text())
    assert config["teacher_config"]["epochs"] == 2 and config["teacher_config"]["temperature"] == 0.5
    emb = tmp_path / "emb.h5ad"
    assert main(["embed", str(data), "--model", str(model), "-o", str(emb), "--chunk-size", "150"]) == 0
    E = ad.read_h5ad(emb)
    assert E.obsm["X_masksc"].shape == (400, 32) and np.isfinite(E.obsm["X_masksc"]).all()
    assert E.X is None                                            # out-of-core output: obs + obsm only
    record = E.uns["masksc"]["embed"]
    assert record["config"]["pool"] == "mean" and record["layer"] is None
    assert oct(emb.stat().st_mode & 0o777) == "0o644"
    assert main(["embed", str(data), "--model", str(model), "-o", str(tmp_path / "emb.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "emb.npy"), E.obsm["X_masksc"])
    renamed = tmp_path / "cells.dat"  # a name only --format can place
    renamed.write_bytes(data.read_bytes())
    assert main(["embed", str(renamed), "--format", "h5ad", "--model", str(model), "-o", str(tmp_path / "d.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), E.obsm["X_masksc"])
    assert oct((tmp_path / "emb.npy").stat().st_mode & 0o777) == "0o644"  # not mkstemp's 0600

    clustered = tmp_path / "clustered.h5ad"
    assert main(["cluster", str(emb), "-k", "3", "-o", str(clustered)]) == 0
    C = ad.read_h5ad(clustered)
    assert C.obs["masksc_cluster"].nunique() == 3
    capsys.readouterr()
    scores_path = tmp_path / "scores.json"
    assert main(["evaluate", str(clustered), "--json", str(scores_path)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(scores_path.read_text())
    truth, pred = C.obs["label"].to_numpy(), C.obs["masksc_cluster"].to_numpy()
    ari, nmi = adjusted_rand_score(truth, pred), normalized_mutual_info_score(truth, pred)
    assert scores["ari"] == pytest.approx(ari, abs=1e-12) and scores["nmi"] == pytest.approx(nmi, abs=1e-12)
    assert (scores["silhouette_cells"], scores["silhouette_seed"]) == (C.n_obs, 0)  # below the sample: every cell
    assert f"ARI {ari:.4f}  NMI {nmi:.4f}" in printed, printed
    assert _sha(data) == before                                   # the input file is never modified
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_embed_pool_target_matches_the_python_readout(trained, tmp_path, capsys):
    """`masksc embed --pool target` writes the predicted teacher features the Python API gives
    after ``set_pool("target")``; a read-out that needs MED on a model without it is refused."""
    from masksc.pipeline import MaskSCModel
    data, before, model_dir = trained
    out = tmp_path / "target.npy"
    assert main(["embed", str(data), "--model", str(model_dir), "-o", str(out), "--pool", "target"]) == 0
    model = MaskSCModel.load(model_dir)
    model.set_pool("target")
    expected = model.embed(ad.read_h5ad(data), progress=False)
    assert expected.shape == (400, model.config.target_dim)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["embed", str(data), "--model", str(model_dir), "-o", str(tmp_path / "x.npy"), "--pool", "max"])
    assert exit_.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
    assert _sha(data) == before


def test_missing_file_exits_nonzero_with_message(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "nope.h5ad"), "-o", str(tmp_path / "m"), *TINY]) != 0
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_wrong_genes_for_the_model_exit_nonzero(trained, tmp_path, capsys):
    data, before, model = trained
    a = ad.read_h5ad(data)
    other = ad.AnnData(X=sp.csr_matrix(a.X), obs=a.obs.copy())
    other.var_names = [f"other_{g}" for g in a.var_names]
    other.write_h5ad(tmp_path / "other.h5ad")
    other_hash = _sha(tmp_path / "other.h5ad")
    out = tmp_path / "e.h5ad"
    assert main(["embed", str(tmp_path / "other.h5ad"), "--model", str(model), "-o", str(out)]) != 0
    err = capsys.readouterr().err
    assert "genes" in err and "missing" in err
    assert not out.exists() and _sha(tmp_path / "other.h5ad") == other_hash
    assert main(["embed", str(data), "--model", str(tmp_path / "no-model"), "-o", str(out)]) != 0
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["fit", str(data), "-o", str(tmp_path / "m"), *TINY, "--set", "no_such_field=1"]) != 0
    assert "no_such_field" in capsys.readouterr().err
    assert main(["fit", str(data), "-o", str(tmp_path / "m"), *TINY, "--teacher-set", "n_input=9"]) != 0
    assert "n_input" in capsys.readouterr().err
    assert main(["fit", str(data), "-o", str(tmp_path / "m"), *TINY, "--teacher-set", "temperature=0"]) != 0
    assert "temperature=0 must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and _sha(data) == before


@pytest.fixture(scope="module")
def embedded(trained, tmp_path_factory):
    """An embedded .h5ad written by `masksc embed`."""
    data, _, model = trained
    emb = tmp_path_factory.mktemp("embedded") / "emb.h5ad"
    assert main(["embed", str(data), "--model", str(model), "-o", str(emb)]) == 0
    return emb


def test_no_command_overwrites_its_input(trained, embedded, tmp_path, capsys):
    data, before, model = trained
    emb_hash = _sha(embedded)
    os.symlink(embedded, tmp_path / "link.h5ad")
    for argv in (["cluster", str(embedded), "-k", "3", "-o", str(embedded)],
                 ["cluster", str(embedded), "-k", "3", "-o", str(tmp_path / "link.h5ad")],
                 ["embed", str(data), "--model", str(model), "-o", str(data)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is the input file; fix: write to a new file" in err and "Traceback" not in err
    # --json took any path: it replaced the counts file it was pointed at with the scores
    assert main(["evaluate", str(embedded), "--json", str(data)]) == 2
    assert f"output {data} must end in .json; fix: e.g. --json {data.with_suffix('.json')}." in capsys.readouterr().err
    # a symlink pointing nowhere: refused at the start (it was "written by another command" after the work)
    os.symlink(tmp_path / "gone" / "c.h5ad", tmp_path / "dangling.h5ad")
    argv = ["cluster", str(embedded), "-k", "3", "-o", str(tmp_path / "dangling.h5ad")]
    assert main(argv) == 2
    assert f"is a symlink to {tmp_path / 'gone' / 'c.h5ad'}, which leads to no file; fix: pass --overwrite" in \
        capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and not (tmp_path / "dangling.h5ad").is_symlink()
    os.symlink("loop.h5ad", tmp_path / "loop.h5ad")  # a symlink loop: a RuntimeError traceback
    argv = ["cluster", str(embedded), "-k", "3", "-o", str(tmp_path / "loop.h5ad")]
    assert main(argv) == 2
    assert "is a symlink to loop.h5ad, which leads to no file; fix: pass --overwrite" in capsys.readouterr().err
    assert _sha(embedded) == emb_hash and _sha(data) == before


def test_an_existing_output_file_is_replaced_only_with_overwrite(trained, embedded, tmp_path, capsys):
    """embed, cluster, evaluate --json and plot silently replaced any file at their output path, a
    user's counts file included; they now refuse it unless --overwrite is given."""
    data, before, model = trained
    mine = {name: tmp_path / name for name in ("counts.h5ad", "counts.npy", "scores.json", "figure.png")}
    for path in mine.values():
        shutil.copy(data, path)
    commands = [["embed", str(data), "--model", str(model), "-o", str(mine["counts.h5ad"])],
                ["embed", str(data), "--model", str(model), "-o", str(mine["counts.npy"])],
                ["cluster", str(embedded), "-k", "3", "-o", str(mine["counts.h5ad"])],
                ["evaluate", str(embedded), "--no-labels", "--cluster-key", "label", "--json", str(mine["scores.json"])],
                ["plot", "loss", str(model), "-o", str(mine["figure.png"])]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        flag = "--json" if "--json" in argv else "-o"
        assert err.strip().endswith(f"exists; fix: pass --overwrite (overwrite=True) to replace it, or choose a new "
                                    f"path ({flag})."), err
    assert all(_sha(path) == before for path in mine.values())
    for argv in commands:
        assert main([*argv, "--overwrite"]) == 0, argv
    assert ad.read_h5ad(mine["counts.h5ad"]).obs["masksc_cluster"].nunique() == 3
    assert json.loads(mine["scores.json"].read_text())["silhouette"] <= 1


def test_an_output_another_command_writes_meanwhile_is_kept_without_overwrite(trained, embedded, tmp_path, capsys,
                                                                              monkeypatch):
    """Two commands writing one output at once both succeeded, the later silently replacing the
    other's file: the check for an existing output ran only at the start."""
    from masksc import io_utils, outofcore
    data, _, model = trained
    real_fsync = io_utils.fsync_file
    embed = ["embed", str(data), "--model", str(model)]
    outputs = {"emb.h5ad": embed, "emb.npy": embed, "clustered.h5ad": ["cluster", str(embedded), "-k", "3"],
               "scores.json": ["evaluate", str(embedded), "--no-labels", "--cluster-key", "label", "--json"],
               "loss.png": ["plot", "loss", str(model)]}
    for name, argv in outputs.items():
        target = tmp_path / name
        argv = [*argv, str(target)] if name == "scores.json" else [*argv, "-o", str(target)]

        def racing(path):  # the other command publishes its output just before this one does
            real_fsync(path)
            target.write_text("theirs")
        monkeypatch.setattr(io_utils, "fsync_file", racing)
        monkeypatch.setattr(outofcore, "fsync_file", racing)
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert f"output {target} was written by another command while this one ran, and is kept; fix: pass " \
               "--overwrite" in capsys.readouterr().err
        assert target.read_text() == "theirs"
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left
        assert main([*argv, "--overwrite"]) == 0, argv  # asked to, it replaces the other's file
        monkeypatch.undo()
        assert target.read_bytes() != b"theirs"


@pytest.mark.parametrize("no_links", [None, errno.EPERM, errno.ENOSYS])
def test_publishing_without_replacing_keeps_a_file_that_exists_by_then(tmp_path, monkeypatch, no_links):
    """publish(replace=False) links the file in, which fails rather than replaces; on a filesystem
    without hard links (EPERM; ENOSYS from an older kernel's FUSE) it checks, then renames."""
    from masksc.errors import MaskscError
    from masksc.io_utils import publish
    if no_links is not None:
        def refused(*a, **k):
            raise OSError(no_links, os.strerror(no_links))
        monkeypatch.setattr(os, "link", refused)
    (tmp_path / "new.tmp").write_text("mine")
    publish(tmp_path / "new.tmp", tmp_path / "out.txt", replace=False)
    assert (tmp_path / "out.txt").read_text() == "mine" and not (tmp_path / "new.tmp").exists()
    (tmp_path / "late.tmp").write_text("later")
    with pytest.raises(MaskscError, match=r"out\.txt was written by another command while this one ran, and is kept"):
        publish(tmp_path / "late.tmp", tmp_path / "out.txt", replace=False)
    assert (tmp_path / "out.txt").read_text() == "mine" and (tmp_path / "late.tmp").exists()
    publish(tmp_path / "late.tmp", tmp_path / "out.txt")  # replace=True, the default
    assert (tmp_path / "out.txt").read_text() == "later" and sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_unwritable_outputs_are_one_line_errors_before_any_work(trained, embedded, tmp_path, capsys, monkeypatch):
    from masksc import pipeline, tl

    def no_work(*a, **k):
        raise AssertionError("the command started working before checking its output")

    for module, name in ((pipeline, "fit"), (tl, "cluster"), (tl, "evaluate")):
        monkeypatch.setattr(module, name, no_work)
    data, before, model = trained
    afile = tmp_path / "notes.py"
    afile.write_text("the user's file")
    cases = [(["fit", str(data), "-o", str(afile), *TINY], "notes.py is a file, not a folder; fix: "),
             (["fit", str(data), "-o", str(afile / "m"), *TINY], "notes.py is a file, not a folder; fix: "),
             (["cluster", str(embedded), "-k", "3", "-o", str(afile / "c.h5ad")], "is a file, not a folder; fix: "),
             (["evaluate", str(embedded), "--json", str(afile / "s.json")], "is a file, not a folder; fix: "),
             (["demo", "-o", str(afile)], "notes.py is a file, not a folder; fix: ")]
    cases.append((["cluster", str(embedded), "-k", "3", "-o", str(tmp_path / "c.npy")],
                  "c.npy must end in .h5ad; fix: e.g. -o "))
    if os.path.isdir("/proc/self"):   # a folder where nothing can be created, even by root
        cases.append((["cluster", str(embedded), "-k", "3", "-o", "/proc/c.h5ad"],
                      "cannot write /proc/c.h5ad: cannot write in /proc"))
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "/." not in err                      # never names a hidden temp file
    assert afile.read_text() == "the user's file" and sorted(os.listdir(tmp_path)) == ["notes.py"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no file can be created")
def test_atomic_write_names_the_destination_not_its_temp_file():
    from masksc.errors import MaskscError
    from masksc.io_utils import atomic_write
    with pytest.raises(MaskscError, match=r"^cannot write /proc/x\.h5ad: cannot write in /proc .*fix: "):
        with atomic_write("/proc/x.h5ad", suffix=".h5ad"):
            raise AssertionError("not reached")


def test_fit_into_a_run_needs_resume_and_resuming_a_finished_run_names_its_model(trained, capsys):
    data, before, model = trained
    files = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["fit", str(data), "-o", str(model), *TINY]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "fix: pass --resume" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == files
    assert main(["fit", str(data), "-o", str(model), *TINY, "--resume"]) == 0
    out = capsys.readouterr().out  # not "model written" after "trained ... for 2 epochs in 0.0s"
    assert f"nothing trained: the run had finished; its model is in {model} (last checkpoint epoch-000002, " in out
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == files


def test_demo_rerun_replaces_its_earlier_output_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--epochs", "2"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "-o", str(out), "--epochs", "1"]) == 0
    printed, err = capsys.readouterr()
    assert f"replacing the earlier demo in {out}" in printed
    assert "warning" not in err  # the preset's own grid padding was a warning the user could not act on
    assert sorted(p.name for p in (out / "model").iterdir() if p.name.startswith("epoch-")) == ["epoch-000001"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    assert 0 < metrics["train_s"] < metrics["wall_s"]  # the training loop, apart from loading to scores
    assert f"(1 epoch: {metrics['train_s']:.0f}s of training, {metrics['wall_s']:.0f}s from loading the data to " \
        "the scores" in printed
    assert (out / "notes.txt").read_text() == "mine"


def test_demo_refuses_a_folder_whose_model_or_outputs_are_not_an_earlier_demos(trained, tmp_path, capsys):
    """`demo -o DIR` deleted any masksc run in DIR/model (another fit's, with the user's notes)
    and overwrote a metrics.json of the user's."""
    data, _, model = trained
    project = tmp_path / "project"
    shutil.copytree(model, project / "model", symlinks=True)  # another fit's run (a 16 x 16 grid, not the preset)
    (project / "model" / "NOTES.txt").write_text("mine")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "metrics.json").write_text('{"mine": 1}')
    for out in (project, alone):
        files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        capsys.readouterr()
        assert main(["demo", "-o", str(out), "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert f"{out} holds " in err and "which the demo would replace, and no earlier demo's model (no model/ of " \
            "this release's demo preset trained on the demo's cells: another fit's, or an earlier release's demo); " \
            "fix: -o a new folder" in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    from masksc.demo import _earlier_demo_run
    assert not _earlier_demo_run(project / "model")
    (project / "model" / "NOTES.txt").unlink()
    assert not _earlier_demo_run(project / "model")  # its checkpoints are not the demo preset's
    # the demo preset fitted on the user's own cells was taken for an earlier demo, and deleted
    own = tmp_path / "own"
    assert main(["fit", str(data), "-o", str(own / "model"), "--preset", "demo", "--epochs", "1"]) == 0
    files = {p: p.read_bytes() for p in own.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["demo", "-o", str(own), "--epochs", "1"]) == 2
    assert "no earlier demo's model" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in own.rglob("*") if p.is_file()} == files
    config = own / "model" / "epoch-000001" / "config.json"
    saved = json.loads(config.read_text())
    for meta in (None, {**saved["meta"], "cells": "23ffc29f54ffc640"}, {**saved["meta"], "cells": [700]}):
        config.write_text(json.dumps({**saved, "meta": meta}))  # damaged: a traceback before, not the refusal
        assert not _earlier_demo_run(own / "model")
    config.write_text(json.dumps({**saved, "model_config": None}))
    assert not _earlier_demo_run(own / "model")


def test_a_demo_rerun_stopped_before_its_first_checkpoint_leaves_a_folder_the_demo_accepts(tmp_path, capsys,
                                                                                         monkeypatch):
    """Replacing an earlier demo removes its outputs with its model, so a rerun stopped before a
    new model exists does not leave outputs that lock the folder."""
    import masksc.demo
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--epochs", "1"]) == 0
    (out / "notes.txt").write_text("mine")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(masksc.demo, "fit_and_score", stopped)
    assert main(["demo", "-o", str(out), "--epochs", "1"]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["model", "notes.txt"] and not any((out / "model").iterdir())
    capsys.readouterr()
    assert main(["demo", "-o", str(out), "--epochs", "1"]) == 130  # accepted: it got as far as training again
    assert "no earlier demo's model" not in capsys.readouterr().err
    monkeypatch.undo()
    import masksc.pl
    monkeypatch.setattr(masksc.pl, "embedding", stopped)  # after training: the message says where its checkpoints are
    assert main(["demo", "-o", str(out), "--epochs", "1"]) == 130
    assert capsys.readouterr().err.endswith(f"masksc demo: interrupted; {out / 'model'} keeps the checkpoints saved so "
                                            "far (a rerun of the demo replaces them).\n")


def test_a_demo_never_deletes_a_demo_still_running_in_its_folder(tmp_path, capsys):
    """A second `masksc demo -o DIR` while one trains there (it holds DIR/model) stops before
    deleting anything, instead of removing the running demo's model under it."""
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--epochs", "1"]) == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, time\n"
                               f"fd = os.open({str(out / 'model')!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["demo", "-o", str(out), "--epochs", "1"]) == 2
        assert capsys.readouterr().err.strip().endswith(
            "model is in use: a demo (or a fit) is running there; fix: wait for it to finish, or -o another folder.")
    finally:
        holder.kill()
        holder.wait()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("flag", [["--layer", "counts"], ["--use-raw"]])
def test_layer_and_use_raw_on_a_file_without_them_name_the_flag(trained, tmp_path, capsys, flag):
    data, _, model = trained
    table = tmp_path / "cells.csv"
    ad.read_h5ad(data).to_df().to_csv(table)
    for command in (["fit", str(table), "-o", str(tmp_path / "m"), *TINY], ["embed", str(table), "--model", str(model),
                                                                          "-o", str(tmp_path / "e.h5ad")]):
        capsys.readouterr()
        assert main([*command, *flag]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"{flag[0]} reads a part of an .h5ad, and {table} is a csv file, which has none; fix: drop {flag[0]}.")
    assert not (tmp_path / "m").exists() and not (tmp_path / "e.h5ad").exists()


def test_genome_reads_one_genome_of_a_mixed_species_10x_file(trained, tmp_path, capsys):
    """embed / plot attention --genome read that genome of a two-genome Cell Ranger v2 file: the
    same embedding as the cells' .h5ad; without --genome the message names the genomes and the
    flag, and --genome on an .h5ad is refused naming it."""
    from test_data_io import write_10x_v2_h5
    data, _, model = trained
    cells = ad.read_h5ad(data)
    other = np.random.default_rng(0).poisson(1.0, size=(cells.n_obs, 40))
    write_10x_v2_h5(tmp_path / "mixed.h5", {"hg19": (other, [f"H{j}" for j in range(40)]),
                                            "mm10": (cells.X.toarray(), list(cells.var_names))}, list(cells.obs_names))
    embed = ["embed", str(tmp_path / "mixed.h5"), "--model", str(model), "-o"]
    assert main([*embed, str(tmp_path / "mixed.npy"), "--genome", "mm10"]) == 0
    assert main(["embed", str(data), "--model", str(model), "-o", str(tmp_path / "cells.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "mixed.npy"), np.load(tmp_path / "cells.npy"), rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main([*embed, str(tmp_path / "none.npy")]) == 2
    assert "holds 2 genomes ['hg19', 'mm10']" in capsys.readouterr().err and not (tmp_path / "none.npy").exists()
    assert main(["plot", "attention", str(tmp_path / "mixed.h5"), "--model", str(model), "-o",
                 str(tmp_path / "a.png"), "--genome", "mm10", "--cells", "2"]) == 0
    assert main([*embed, str(tmp_path / "t.npy"), "--genome", "mm10", "--transpose"]) == 2
    assert "transpose=True (--transpose) applies to csv/tsv tables only" in capsys.readouterr().err
    assert main(["embed", str(data), "--model", str(model), "-o", str(tmp_path / "g.npy"), "--genome", "mm10"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--genome reads a part of a 10x .h5, and {data} is a h5ad "
                                                    "file, which has none; fix: drop --genome.")


def test_fit_and_embed_check_settings_and_output_before_reading_a_file_into_memory(trained, tmp_path, capsys,
                                                                                  monkeypatch):
    """A csv is read whole before training: a bad setting or output name is refused first, not
    after minutes of reading."""
    import masksc.data
    data, _, model = trained
    table = tmp_path / "cells.csv"
    ad.read_h5ad(data).to_df().to_csv(table)

    def no_read(*args, **kwargs):
        raise AssertionError("the file was read before the settings were checked")
    monkeypatch.setattr(masksc.data, "read", no_read)
    fit = ["fit", str(table), "-o", str(tmp_path / "m")]
    shutil.copytree(model, tmp_path / "run", symlinks=True)  # a finished run, resumed with other epochs
    for argv, message in (([*fit, "--mask-ratio", "0"], "mask_ratio=0.0 must be a number in (0, 1)"),
                          ([*fit, "--grid", "47x48"], "grid (47, 48) is not divisible by patch 4"),
                          ([*fit, "--set", "embed_dim=-3"], "embed_dim=-3 must be an integer >= 1"),
                          ([*fit, "--teacher-set", "bogus=1"], "teacher setting(s) ['bogus'] cannot be set"),
                          (["embed", str(table), "--model", str(model), "-o", str(tmp_path / "e.txt")],
                           "e.txt must end in .h5ad or .npy; fix: e.g. -o "),
                          (["fit", str(table), "-o", str(tmp_path / "run"), *TINY, "--resume", "--epochs", "3"],
                           "trained with other training settings (epochs: saved 2, requested 3) (the learning-rate "
                           "schedule spans the run's epochs, so a longer or shorter run is a new one); resume with the "
                           "same preset/options")):
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_file_that_is_not_an_h5ad_or_a_folder_is_refused_in_one_line(tmp_path, capsys):
    import h5py
    foreign = tmp_path / "scdeepcluster.h5"
    with h5py.File(foreign, "w") as f:  # the scDeepCluster layout: X and Y, no obs
        f["X"] = np.ones((5, 3))
        f["Y"] = np.arange(5)
    for command in (["cluster", str(foreign), "-k", "2", "-o", str(tmp_path / "c.h5ad")], ["evaluate", str(foreign)],
                    ["plot", "embedding", str(foreign), "-o", str(tmp_path / "e.png")]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"cannot read {foreign} as .h5ad (" in err and "fix: pass the .h5ad file `masksc embed` wrote" in err
        assert "Traceback" not in err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder; fix: pass the .h5ad file" in capsys.readouterr().err


def test_a_full_disk_during_embed_is_one_line_and_leaves_no_temp_file(trained, tmp_path, capsys, monkeypatch):
    """The embedding's memory map was written into a sparse file: on a full disk that is a SIGBUS
    (exit 135, no message, the temp file left). The space is now reserved first."""
    import errno
    data, _, model = trained

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["embed", str(data), "--model", str(model), "-o", str(out / "e.h5ad")]) == 2
    err = capsys.readouterr().err
    assert f"masksc embed: error: [Errno 28] No space left on device; fix: free space on the disk of {out} (or " \
           "write elsewhere)" in err  # it said "there", naming no place
    assert "Traceback" not in err and list(out.iterdir()) == []
    assert main(["embed", str(data), "--model", str(model), "-o", str(out / "new" / "e.h5ad")]) == 2
    assert f"free space on the disk of {out} (or" in capsys.readouterr().err  # not the folder made and removed
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["embed", "cluster"])
def test_no_room_for_the_h5ad_is_one_line_before_it_is_written(trained, embedded, tmp_path, capsys, monkeypatch,
                                                               command):
    """h5py met a full disk while closing the file, as a RuntimeError with a multi-line message after
    which the process could crash (exit 139, the temp file left): the room is checked first. The
    existing output is kept."""
    import shutil
    from collections import namedtuple

    from masksc.io_utils import STRUCTURE_BYTES
    data, _, model = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "o.h5ad").write_text("the earlier output")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - STRUCTURE_BYTES, STRUCTURE_BYTES))
    argv = {"embed": ["embed", str(data), "--model", str(model)], "cluster": ["cluster", str(embedded), "-k", "3"]}
    assert main([*argv[command], "-o", str(out / "o.h5ad"), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"masksc {command}: error: \[Errno 28\] No space left on device: .*o\.h5ad needs at least "
                     r"1\.\d MiB, and 1\.0 MiB are free; fix: free space on the disk of .*out \(or write", err), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"masksc {command}: error")
    assert os.listdir(out) == ["o.h5ad"] and (out / "o.h5ad").read_text() == "the earlier output"


def test_the_room_counted_for_an_h5ad_never_exceeds_the_file(tmp_path):
    """The room check must not refuse a write that fits: text with repeats is written as categories
    (counting every value's characters put the estimate at 2.5x the file)."""
    import anndata as ad
    import scipy.sparse as sp

    from masksc.io_utils import anndata_bytes
    n = 3000
    names = [f"AAACCTGAGC-{i}" for i in range(n)]
    obs = pd.DataFrame({"sample": ["donor_07_lung_biopsy_replicate_2_" + "x" * 70] * n,
                        "note": [f"note é {i}" for i in range(n)],
                        "type": pd.Categorical(np.random.default_rng(0).choice(["T", "B", "NK"], n)),
                        "dose": pd.Categorical(np.repeat([0.5, 1.5, 2.5], n // 3)),
                        "flag": pd.array([True, None, False] * (n // 3), dtype="boolean"),  # with NA: values + mask
                        **{f"q{j}": pd.array([1, None, 3] * (n // 3), dtype="Int8") for j in range(10)},
                        "score": np.linspace(0, 1, n)}, index=names)
    X = sp.random(n, 400, density=0.05, format="csr", dtype=np.float32, random_state=0)
    for adata in (ad.AnnData(obs=obs, obsm={"X_masksc": np.zeros((n, 16), np.float32)}),
                  ad.AnnData(X=X, obs=obs, layers={"counts": X.copy()})):
        path = tmp_path / "a.h5ad"
        adata.copy().write_h5ad(path)
        assert 0.5 * path.stat().st_size < anndata_bytes(adata) <= path.stat().st_size


def test_an_h5py_full_disk_is_one_line(trained, embedded, tmp_path, capsys, monkeypatch):
    """What room the check cannot foresee (taken meanwhile) still fails in h5py, as a RuntimeError."""
    import anndata

    def full(self, path, *a, **k):
        raise RuntimeError("Can't decrement id ref count (file write failed: time = now\n, errno = 28, error "
                           "message = 'No space left on device')")
    monkeypatch.setattr(anndata.AnnData, "write_h5ad", full)
    assert main(["cluster", str(embedded), "-k", "3", "-o", str(tmp_path / "c.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "masksc cluster: error: Can't decrement id ref count (file write failed: time = now , errno = 28" in err
    assert f"fix: free space on the disk of {tmp_path} (or write elsewhere)" in err
    assert len(err.strip().splitlines()) == 1 and os.listdir(tmp_path) == []


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one_and_names_the_fix(trained, tmp_path, capsys,
                                                                                    monkeypatch):
    """torch.save passes a full disk on as a RuntimeError: the epoch-2 save names it, the epoch-1
    checkpoint stays the run's last, no temp folder is left, and the command ends in one line."""
    import errno

    import masksc.checkpoint as ckpt
    data, _, _ = trained
    real_save, calls = torch.save, []

    def full_after_first(obj, f, *args, **kwargs):
        if not isinstance(f, io.BufferedWriter):  # the RNG state, saved into memory
            return real_save(obj, f, *args, **kwargs)
        calls.append(f.name)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(ckpt.torch, "save", full_after_first)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["fit", str(data), "-o", str(run), *TINY, "--checkpoint-every", "1"]) == 2
    err = capsys.readouterr().err
    assert f"no space left to write the checkpoint {run / 'epoch-000002'} (none of it is left behind, and " \
        "checkpoints saved before are intact); fix: free space there, then run again with --resume" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["epoch-000001", "last"]
    assert os.readlink(run / "last") == "epoch-000001"


def test_ctrl_c_during_fit_is_one_line_naming_resume_once_there_is_a_checkpoint(trained, tmp_path, capsys,
                                                                                monkeypatch):
    """Ctrl-C after a checkpoint names --resume; before one there is nothing to resume (and the
    folder the fit made for its run is gone), so it does not."""
    import masksc.pipeline
    data, _, _ = trained
    run = tmp_path / "run"

    def interrupted(*args, checkpointed, **kwargs):
        if checkpointed:
            os.symlink("epoch-000001", run / "last")
        raise KeyboardInterrupt
    for checkpointed in (False, True):
        monkeypatch.setattr(masksc.pipeline, "fit", lambda *a, **k: interrupted(*a, checkpointed=checkpointed, **k))
        assert main(["fit", str(data), "-o", str(run), *TINY]) == 130
        hint = f"; continue with the same command and --resume (checkpoints are in {run})" if checkpointed else ""
        assert capsys.readouterr().err.strip() == f"masksc fit: interrupted{hint}."
        assert run.exists() == checkpointed


@pytest.mark.parametrize("argv, message", [
    (["fit", "DATA", "-o", "M", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["fit", "DATA", "-o", "M", "--epochs", "-3"], "argument --epochs: must be >= 1, got -3"),
    (["fit", "DATA", "-o", "M", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["fit", "DATA", "-o", "M", "--chunk-size", "0"], "argument --chunk-size: must be >= 1, got 0"),
    (["fit", "DATA", "-o", "M", "--checkpoint-every", "0"], "argument --checkpoint-every: must be >= 1"),
    (["fit", "DATA", "-o", "M", "--preset", "fast"], "argument --preset: invalid choice: 'fast'"),
    (["fit", "DATA", "-o", "M", "--format", "xlsx"], "argument --format: invalid choice: 'xlsx'"),
    (["embed", "DATA", "--model", "M", "-o", "E.npy", "--chunk-size", "0"], "argument --chunk-size: must be >= 1"),
    (["demo", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["cluster", "E.h5ad", "-o", "C.h5ad", "--resolution", "0"], "argument --resolution: must be a number > 0, got 0"),
    (["cluster", "E.h5ad", "-o", "C.h5ad", "--resolution", "-1"], "must be a number > 0, got -1"),
    (["cluster", "E.h5ad", "-o", "C.h5ad", "--resolution", "nan"], "must be a number > 0, got nan"),
    (["cluster", "E.h5ad", "-o", "C.h5ad", "-k", "0"], "argument -k: must be >= 1, got 0"),
    (["cluster", "E.h5ad", "-o", "C.h5ad", "--seed", "-1"], "argument --seed: must be an integer in [0, 2**63 - 1], "
                                                             "got -1"),
    (["fit", "DATA", "-o", "M", "--seed", "-1"], "argument --seed: must be an integer in [0, 2**63 - 1], got -1"),
    (["demo", "--seed", "1.5"], "argument --seed: needs an integer, got '1.5'"),
    (["fit", "DATA", "-o", "M", "--seed", str(2**64)], f"argument --seed: must be an integer in [0, 2**63 - 1], "
                                                       f"got {2**64}"),
    (["cluster", "E.h5ad", "-o", "C.h5ad", "--seed", str(2**63)], "argument --seed: must be an integer in [0, 2**63"),
    (["plot", "embedding", "E.h5ad", "-o", "p.png", "--seed", str(2**63)], "argument --seed: must be an integer in"),
    (["plot", "attention", "D.h5ad", "--model", "M", "-o", "p.png", "--seed", str(2**63)],
     "argument --seed: must be an integer in"),
    (["demo", "--seed", str(2**64)], f"argument --seed: must be an integer in [0, 2**32 - 1] (the most UMAP and PCA "
                                     f"take), got {2**64}"),
    # the demo trained, then its PCA reference failed in sklearn with a traceback
    (["demo", "--seed", str(2**32)], f"argument --seed: must be an integer in [0, 2**32 - 1] (the most UMAP and PCA "
                                     f"take), got {2**32}"),
    (["demo", "--seed", "-1"], "argument --seed: must be an integer in [0, 2**32 - 1] (the most UMAP and PCA take), "
                               "got -1"),  # it named 2**63 - 1
    (["plot", "embedding", "E.h5ad", "-o", "p.png", "--seed", str(2**32)], "must be an integer in [0, 2**32 - 1]"),
])
def test_bad_numbers_and_names_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, usage, stray", [
    (["plot", "embedding", "E.h5ad", "--color", "label", "masksc_cluster", "-o", "p.png"],
     "usage: masksc plot embedding [-h] [--color KEY]", "masksc_cluster"),
    (["fit", "DATA", "-o", "M", "--set", "embed_dim=32", "depth=1"], "usage: masksc fit [-h]", "depth=1"),
    (["cluster", "E.h5ad", "-o", "C.h5ad", "--bogus"], "usage: masksc cluster [-h]", "--bogus"),
    (["--bogus", "cluster", "E.h5ad", "-o", "C.h5ad"], "usage: masksc [-h] [-v] [--version] COMMAND", "--bogus"),
])
def test_stray_arguments_are_reported_with_the_commands_usage(argv, usage, stray, capsys):
    """`--color a b` (one value a flag) shows the command's usage, which says so, not the top-level one;
    a stray flag before the command, the top-level usage."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and usage in err and f"error: unrecognized arguments: {stray}" in err


def test_set_epochs_trains_that_many_and_a_field_given_twice_is_refused(trained, tmp_path, capsys):
    """`--set epochs=1` was a TypeError traceback (epochs passed twice); a --set field that a flag
    also sets took the flag's value without a word."""
    data, _, _ = trained
    no_epochs = [a for i, a in enumerate(TINY) if a != "--epochs" and (i == 0 or TINY[i - 1] != "--epochs")]
    assert main(["fit", str(data), "-o", str(tmp_path / "m"), *no_epochs, "--set", "epochs=1"]) == 0
    from masksc.pipeline import MaskSCModel
    assert MaskSCModel.load(tmp_path / "m").config.epochs == 1
    capsys.readouterr()
    for field, flag in (("epochs=3", "--epochs"), ("batch_size=16", "--batch-size"), ("grid_shape=8,8", "--grid")):
        assert main(["fit", str(data), "-o", str(tmp_path / "m2"), *TINY, "--set", field]) == 2
        name = field.split("=")[0]
        assert f"{name} is given twice, by --set {name}= and by {flag}; fix: drop one of them." in \
            capsys.readouterr().err
    assert main(["fit", str(data), "-o", str(tmp_path / "m2"), *TINY, "--set", "lr=1e-3", "--set", "lr=1e-4"]) == 2
    assert "--set lr= is given twice; fix: keep one of them." in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_demo_refuses_a_seed_its_maps_cannot_take_before_training(tmp_path, monkeypatch):
    from masksc import demo
    from masksc.errors import DataError
    monkeypatch.setattr(demo, "_run_demo", lambda *a: pytest.fail("the demo started"))
    with pytest.raises(DataError, match=r"seed=4294967296; fix: pass an integer in \[0, 2\*\*32 - 1\]"):
        demo.run_demo(tmp_path / "d", seed=2**32)
    assert not (tmp_path / "d").exists()


def test_evaluate_without_the_default_clusters_names_the_recorded_column(embedded, tmp_path, capsys):
    clustered = tmp_path / "c.h5ad"
    assert main(["cluster", str(embedded), "-k", "3", "--key-added", "mykey", "-o", str(clustered)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(clustered)]) == 2
    assert ("adata.obs has no 'masksc_cluster'; masksc.tl.cluster wrote its clusters to 'mykey'; fix: "
            "cluster_key='mykey' (--cluster-key mykey).") in capsys.readouterr().err
    assert main(["evaluate", str(clustered), "--cluster-key", "mykey"]) == 0


def test_fit_refuses_a_seed_beyond_2_63_before_any_work(trained, tmp_path, capsys, monkeypatch):
    """It used to preprocess the data, then fail in torch with "Overflow when unpacking long long"."""
    from masksc import pipeline

    def no_work(*a, **k):
        raise AssertionError("fit started working with a seed no generator takes")

    monkeypatch.setattr(pipeline, "fit", no_work)
    data, before, _ = trained
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(data), "-o", str(tmp_path / "m"), *TINY, "--seed", "18446744073709551616"])
    assert exc.value.code == 2
    assert "argument --seed: must be an integer in [0, 2**63 - 1], got 18446744073709551616" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and _sha(data) == before


@pytest.mark.parametrize("device, message", [("cuda:99", "device 'cuda:99'"),  # meta and mps failed after reading,
                                             ("meta", "device 'meta' holds no weights or values"),  # as tracebacks
                                             ("mps", "device 'mps': masksc runs on cpu and cuda devices only")])
def test_an_unusable_device_is_refused_before_reading_the_data(tmp_path, capsys, device, message):
    missing = str(tmp_path / "nope.h5ad")  # read first, it would say "not found"
    for argv in (["fit", missing, "-o", str(tmp_path / "m"), *TINY, "--device", device],
                 ["embed", missing, "--model", str(tmp_path / "m"), "-o", str(tmp_path / "e.npy"),
                  "--device", device]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "fix: pass" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_an_unknown_backend_is_refused_before_reading_the_data(tmp_path, capsys, monkeypatch):
    """A misspelt MASKSC_BACKEND surfaced at the first op: in fit, after the teacher had trained,
    as a traceback."""
    monkeypatch.setenv("MASKSC_BACKEND", "trition")
    missing = str(tmp_path / "nope.h5ad")
    for argv in (["fit", missing, "-o", str(tmp_path / "m"), *TINY],
                 ["embed", missing, "--model", str(tmp_path / "m"), "-o", str(tmp_path / "e.npy")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"masksc {argv[0]}: error: MASKSC_BACKEND='trition' is not one of" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_cluster_logs_no_faiss_loader_lines(embedded, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "masksc", "cluster", str(embedded), "-k", "3", "-o",
                          str(tmp_path / "c.h5ad")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and (tmp_path / "c.h5ad").is_file()
    assert "faiss" not in out.stderr and "ModuleNotFoundError" not in out.stderr, out.stderr


def test_verbose_logs_masksc_debug_not_other_libraries_and_is_taken_after_the_command(embedded, tmp_path):
    """-v set the root logger to DEBUG: a t-SNE map logged 225 lines of matplotlib's font search
    (UMAP tens of thousands of numba's); and `-v` after the command was an unrecognised argument."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "masksc", "plot", "embedding", str(embedded), "-o",
                          str(tmp_path / "m.png"), "--method", "tsne", "--color", "label", "-v"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and (tmp_path / "m.png").is_file(), out.stderr
    lines = out.stderr.splitlines()
    assert all(" masksc" in line for line in lines) and any("INFO masksc.pl: t-SNE of" in line for line in lines), \
        out.stderr


def test_a_reader_gone_from_the_pipe_stops_the_command_quietly_after_its_files(embedded, tmp_path):
    """`masksc evaluate --json s.json | true` (stdout unbuffered, as in many containers) printed
    'error: [Errno 32] Broken pipe', exited 2 and never wrote s.json; buffered, Python's own
    'Exception ignored ... BrokenPipeError' and exit 120."""
    for unbuffered in ("1", ""):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED=unbuffered)
        scores = tmp_path / f"s{unbuffered}.json"
        proc = subprocess.Popen([sys.executable, "-m", "masksc", "evaluate", str(embedded), "--no-labels",
                                 "--cluster-key", "label", "--json", str(scores)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader is gone before the command prints
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 141 and "error" not in err.lower(), err
        assert json.loads(scores.read_text())["silhouette"] <= 1
        for argv, status in ((proc.args[:-2], 141), (proc.args, 2)):  # 2>&1 | head: its output, or its error line
            both = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            both.stdout.close()
            assert both.wait(timeout=300) == status  # 120 (Python's 'Exception ignored' at exit) or 1 (a traceback)
        import socket
        ours, theirs = socket.socketpair()  # a socket's gone peer is POLLHUP, not a pipe's POLLERR
        sock = subprocess.Popen(proc.args[:-2], env=env, stdout=theirs, stderr=subprocess.PIPE, text=True)
        theirs.close()
        ours.close()
        assert sock.wait(timeout=300) == 141, sock.stderr.read()
    closed = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "-", *proc.args[:-2]], env=env, capture_output=True,
                            text=True, timeout=300)  # stderr closed: a clean run is a clean exit (it was 1)
    assert closed.returncode == 0 and closed.stdout.startswith("SILHOUETTE"), closed
    missing = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "-", *proc.args[:4], str(tmp_path / "nope.h5ad")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stdout == ""  # its error line went to stdout, among the data
    with open("/dev/full", "w") as full:  # a full device: one line, the files written
        out = subprocess.run([*proc.args[:-1], str(tmp_path / "full.json")], env=env, stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().endswith(
        "masksc evaluate: error: cannot print to standard output (No space left on device); the command's files are "
        "written; fix: send its output elsewhere."), out.stderr
    assert (tmp_path / "full.json").is_file()


def test_a_broken_pipe_not_of_the_output_is_an_error_and_logging_is_left_as_the_script_set_it(embedded, capsys,
                                                                                                monkeypatch):
    """Every BrokenPipeError was taken for a reader gone from stdout: exit 141 and no word, even
    with -v. And main() called from a script left the "masksc" logger at its own level."""
    from masksc import tl

    def peer_gone(*args, **kwargs):  # a socket or a worker's pipe, say
        raise BrokenPipeError(32, "Broken pipe")
    masksc_log = logging.getLogger("masksc")
    monkeypatch.setattr(masksc_log, "level", logging.ERROR)
    monkeypatch.setattr(tl, "evaluate", peer_gone)
    assert main(["evaluate", str(embedded), "--no-labels", "--cluster-key", "label"]) == 2
    assert "masksc evaluate: error: [Errno 32] Broken pipe; fix: see the system's message" in capsys.readouterr().err
    with pytest.raises(BrokenPipeError):
        main(["evaluate", str(embedded), "--no-labels", "--cluster-key", "label", "-v"])
    assert masksc_log.level == logging.ERROR


def test_warnings_made_errors_are_one_line_errors(tmp_path, capsys):
    """PYTHONWARNINGS=error (or -W error) made a warning a traceback and exit 1."""
    few = ad.AnnData(np.zeros((10, 2), np.float32))
    few.obsm["X_masksc"] = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    few.write_h5ad(tmp_path / "few.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["plot", "embedding", str(tmp_path / "few.h5ad"), "-o", str(tmp_path / "m.png")]) == 2
    assert capsys.readouterr().err.strip() == (
        "masksc plot: error: 10 cells are too few for UMAP's spectral layout (it needs 16); drawing them with t-SNE "
        "(a warning, raised as an error by the warnings filter, e.g. PYTHONWARNINGS=error)")
    assert not (tmp_path / "m.png").exists()


def test_version(capsys):
    from masksc import __version__
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"masksc {__version__}\n"


def test_cluster_leiden_options_reach_leiden(embedded, tmp_path):
    """`masksc cluster` without -k runs Leiden with --n-neighbors / --resolution, as tl.cluster does."""
    from masksc import tl
    for n_neighbors, resolution in ((15, 1.0), (5, 3.0)):
        out = tmp_path / f"leiden_{n_neighbors}.h5ad"
        assert main(["cluster", str(embedded), "-o", str(out), "--n-neighbors", str(n_neighbors),
                     "--resolution", str(resolution)]) == 0
        ref = ad.read_h5ad(embedded)
        tl.cluster(ref, n_neighbors=n_neighbors, resolution=resolution)
        got = ad.read_h5ad(out).obs["masksc_cluster"].astype(str).to_numpy()
        np.testing.assert_array_equal(got, ref.obs["masksc_cluster"].astype(str).to_numpy())


def test_cluster_without_options_builds_the_default_graph_over_a_stored_other_one(embedded, tmp_path):
    """Without --n-neighbors, Leiden clusters a graph of N_NEIGHBORS neighbours, as --help says,
    even where the file holds a masksc graph of another size (which tl.cluster would reuse)."""
    from masksc import cluster, tl
    five = ad.read_h5ad(embedded)
    tl.neighbors(five, n_neighbors=5, metric="cosine")
    five.write_h5ad(tmp_path / "five.h5ad")
    assert main(["cluster", str(tmp_path / "five.h5ad"), "-o", str(tmp_path / "c.h5ad")]) == 0
    ref = ad.read_h5ad(embedded)
    tl.cluster(ref, n_neighbors=cluster.N_NEIGHBORS)
    got = ad.read_h5ad(tmp_path / "c.h5ad")
    np.testing.assert_array_equal(got.obs["masksc_cluster"].astype(str), ref.obs["masksc_cluster"].astype(str))
    assert got.uns["masksc_neighbors"]["params"]["n_neighbors"] == cluster.N_NEIGHBORS
    assert got.uns["masksc_neighbors"]["params"]["metric"] == "euclidean"


def test_cluster_refuses_leiden_options_beside_k(embedded, tmp_path, capsys):
    """--resolution / --n-neighbors with -k would be ignored by k-means: refused, nothing written."""
    out = tmp_path / "c.h5ad"
    assert main(["cluster", str(embedded), "-o", str(out), "-k", "3", "--resolution", "2"]) == 2
    assert "--resolution set Leiden's graph and clusters, but -k 3 clusters with k-means" in capsys.readouterr().err
    assert main(["cluster", str(embedded), "-o", str(out), "-k", "3", "--n-neighbors", "5"]) == 2
    assert "--n-neighbors set Leiden's" in capsys.readouterr().err and not out.exists()


def test_cluster_seed_reaches_kmeans(embedded, tmp_path):
    """`masksc cluster -k 3 --seed 1` writes tl.cluster(k=3, seed=1)'s labels, which on this
    embedding are another partition than the default seed 0 gives."""
    from masksc import tl
    out = tmp_path / "c.h5ad"
    assert main(["cluster", str(embedded), "-k", "3", "--seed", "1", "-o", str(out)]) == 0
    refs = {}
    for seed in (0, 1):
        ref = ad.read_h5ad(embedded)
        tl.cluster(ref, k=3, seed=seed)
        refs[seed] = ref.obs["masksc_cluster"].astype(str).to_numpy()
    assert adjusted_rand_score(refs[0], refs[1]) < 0.95  # the seed matters on this data: the check below has teeth
    np.testing.assert_array_equal(ad.read_h5ad(out).obs["masksc_cluster"].astype(str).to_numpy(), refs[1])


def test_fit_mask_ratio_and_layout_reach_the_model_config(trained, tmp_path):
    data, _, model = trained
    default = json.loads((model / "last" / "config.json").read_text())["model_config"]
    assert (default["mask_ratio"], default["layout"]) == (0.5, "hvg")  # so the values below are not the defaults
    assert main(["fit", str(data), "-o", str(tmp_path / "m"), *TINY, "--epochs", "1", "--mask-ratio", "0.75",
                 "--layout", "correlation"]) == 0
    config = json.loads((tmp_path / "m" / "last" / "config.json").read_text())["model_config"]
    assert (config["mask_ratio"], config["layout"]) == (0.75, "correlation")


def test_layer_option_streams_that_layer(trained, tmp_path, capsys):
    """fit / embed --layer counts on an .h5ad with log values in X give what the counts in X give."""
    import scanpy as sc
    data, _, model = trained
    layered = ad.read_h5ad(data)
    layered.layers["counts"] = layered.X.copy()
    sc.pp.normalize_total(layered, target_sum=1e4)
    sc.pp.log1p(layered)
    layered.write_h5ad(tmp_path / "layered.h5ad")
    assert main(["fit", str(tmp_path / "layered.h5ad"), "-o", str(tmp_path / "m"), *TINY, "--layer", "counts"]) == 0
    for source, model_dir, layer in ((tmp_path / "layered.h5ad", tmp_path / "m", ["--layer", "counts"]),
                                     (data, model, [])):
        assert main(["embed", str(source), "--model", str(model_dir), "-o", str(tmp_path / f"{len(layer)}.npy"),
                     *layer]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "2.npy"), np.load(tmp_path / "0.npy"), rtol=1e-5, atol=1e-6)
    # the model records its layer: reading X instead is refused naming it, and so is resuming on X
    assert main(["embed", str(tmp_path / "layered.h5ad"), "--model", str(tmp_path / "m"), "-o",
                 str(tmp_path / "x.npy")]) == 2
    assert ("this model was fitted on the layer 'counts' (raw counts), and X was read here; to read the same, pass "
            "layer='counts' (--layer counts)") in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
    assert main(["fit", str(tmp_path / "layered.h5ad"), "-o", str(tmp_path / "m"), *TINY, "--resume"]) == 2
    assert "was fitted on the layer 'counts', not X; to resume, pass layer='counts' (--layer counts)" in \
        capsys.readouterr().err


def test_evaluate_without_labels_scores_silhouette_only(embedded, tmp_path, capsys):
    from sklearn.metrics import silhouette_score
    out = tmp_path / "c.h5ad"
    assert main(["cluster", str(embedded), "-k", "3", "-o", str(out)]) == 0
    assert main(["evaluate", str(out), "--no-labels", "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    a = ad.read_h5ad(out)
    assert scores["ari"] is None and scores["nmi"] is None
    assert scores["silhouette"] == pytest.approx(silhouette_score(a.obsm["X_masksc"], a.obs["masksc_cluster"]),
                                                 rel=1e-5)


def test_evaluate_samples_the_silhouette_as_asked(embedded, tmp_path, capsys):
    """--silhouette-cells N scores a seeded sample of N cells, as tl.evaluate(silhouette_sample=N,
    seed=S) does; 0 scores every cell, as sklearn does."""
    from sklearn.metrics import silhouette_score

    from masksc import tl
    out = tmp_path / "c.h5ad"
    assert main(["cluster", str(embedded), "-k", "3", "-o", str(out)]) == 0
    a = ad.read_h5ad(out)
    for flags, expected in ((["--silhouette-cells", "100", "--seed", "3"],
                             tl.evaluate(a.copy(), silhouette_sample=100, seed=3)["silhouette"]),
                            (["--silhouette-cells", "0"],
                             silhouette_score(a.obsm["X_masksc"], a.obs["masksc_cluster"]))):
        json_path = tmp_path / f"{flags[1]}.json"
        assert main(["evaluate", str(out), *flags, "--json", str(json_path)]) == 0
        assert json.loads(json_path.read_text())["silhouette"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "100.json").read_text())["silhouette"] != pytest.approx(
        json.loads((tmp_path / "0.json").read_text())["silhouette"], rel=1e-6)


@pytest.mark.parametrize("cells", ["1", "2"])
def test_a_silhouette_sample_of_one_or_two_cells_is_refused_by_the_parser(embedded, capsys, cells):
    """Two cells never give a silhouette (2 clusters need a third cell): it went missing, exit 0."""
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", str(embedded), "--silhouette-cells", cells])
    assert stop.value.code == 2
    assert (f"must be 0 (all cells) or at least 3 (a silhouette needs 2 clusters and a cell more), got {cells}"
            in capsys.readouterr().err)


def test_cluster_and_evaluate_keys(embedded, tmp_path):
    """--key-added / --use-rep / --cluster-key work as tl's key_added / use_rep / cluster_key."""
    from sklearn.metrics import adjusted_rand_score, silhouette_score
    from masksc import tl
    src = ad.read_h5ad(embedded)
    src.obsm["X_half"] = src.obsm["X_masksc"][:, :8].copy()
    src.write_h5ad(tmp_path / "two.h5ad")
    out = tmp_path / "c.h5ad"
    assert main(["cluster", str(tmp_path / "two.h5ad"), "-k", "3", "--use-rep", "X_half", "--key-added", "half",
                 "-o", str(out)]) == 0
    got = ad.read_h5ad(out)
    tl.cluster(src, k=3, use_rep="X_half", key_added="half")
    assert "masksc_cluster" not in got.obs
    np.testing.assert_array_equal(got.obs["half"].astype(str).to_numpy(), src.obs["half"].astype(str).to_numpy())
    assert main(["evaluate", str(out), "--cluster-key", "half", "--use-rep", "X_half",
                 "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["ari"] == pytest.approx(adjusted_rand_score(got.obs["label"], got.obs["half"]))
    assert scores["silhouette"] == pytest.approx(silhouette_score(got.obsm["X_half"], got.obs["half"]), rel=1e-5)


def test_embed_reads_a_csc_h5ad_into_memory_and_embeds_it_as_its_csr_twin(trained, tmp_path, caplog):
    """An .h5ad whose X is stored CSC cannot be streamed by cells: embed reads it into memory as
    CSR, says so in one line naming the way to stream it, leaves the file as it was, and gives
    the embedding of the same cells stored CSR."""
    data, _, model = trained
    csc = ad.read_h5ad(data)
    csc.X = sp.csc_matrix(csc.X)
    path = tmp_path / "csc.h5ad"
    csc.write_h5ad(path)
    before = _sha(path)
    with caplog.at_level(logging.INFO):
        assert main(["embed", str(path), "--model", str(model), "-o", str(tmp_path / "csc.npy")]) == 0
    lines = [r.getMessage() for r in caplog.records if "memory" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "X is stored CSC" in lines[0] and "rewrite it as CSR (adata.X = adata.X.tocsr()" in lines[0]
    assert main(["embed", str(data), "--model", str(model), "-o", str(tmp_path / "csr.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "csc.npy"), np.load(tmp_path / "csr.npy"))
    assert _sha(path) == before


def test_embed_records_the_file_it_read_into_memory_as_its_source(trained, embedded, tmp_path, caplog):
    """A csv is read into memory by the command (it cannot be streamed), saying so; the output still
    names that file as its source, as it names a streamed .h5ad, and embeds it as the .h5ad."""
    caplog.set_level(logging.INFO, logger="masksc")
    data, _, model = trained
    cells = ad.read_h5ad(data)
    for name, frame, extra in (("cells.csv", pd.DataFrame(cells.X.toarray(), cells.obs_names, cells.var_names), []),
                               ("genes.tsv", pd.DataFrame(cells.X.toarray().T, cells.var_names, cells.obs_names),
                                ["--transpose"])):
        table = tmp_path / name
        frame.to_csv(table, sep="," if name.endswith(".csv") else "\t")
        out = tmp_path / f"{name}.h5ad"
        assert main(["embed", str(table), "--model", str(model), "-o", str(out), *extra]) == 0
        got = ad.read_h5ad(out)
        assert got.uns["masksc"]["embed"]["source"] == str(table)
        assert f"{table}: a {name[-3:]} file cannot be streamed by cells; reading it into memory " \
               "(--chunk-size does not apply;" in caplog.text  # --teacher-cells is fit's
        np.testing.assert_array_equal(got.obsm["X_masksc"], ad.read_h5ad(embedded).obsm["X_masksc"])
    assert ad.read_h5ad(embedded).uns["masksc"]["embed"]["source"] == str(data)


def _pixels(path: Path) -> np.ndarray:
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(str(path))


def test_plot_embedding_draws_what_pl_embedding_draws(embedded, tmp_path, capsys):
    """`masksc plot embedding` on a clustered file is pl.embedding's figure of the same cells (clusters
    and labels by default, or the --color columns), pixel for pixel; the input is left as it was."""
    from masksc import pl
    clustered = tmp_path / "clustered.h5ad"
    assert main(["cluster", str(embedded), "-k", "3", "-o", str(clustered)]) == 0
    before = _sha(clustered)
    assert main(["plot", "embedding", str(clustered), "--method", "tsne", "-o", str(tmp_path / "cli.png")]) == 0
    assert f"wrote {tmp_path / 'cli.png'}" in capsys.readouterr().out
    pl.embedding(ad.read_h5ad(clustered), None, tmp_path / "api.png", method="tsne", seed=0)
    np.testing.assert_array_equal(_pixels(tmp_path / "cli.png"), _pixels(tmp_path / "api.png"))
    assert main(["plot", "embedding", str(clustered), "--method", "tsne", "--color", "label",
                 "-o", str(tmp_path / "one.png")]) == 0
    assert _pixels(tmp_path / "one.png").shape[1] < _pixels(tmp_path / "cli.png").shape[1]  # one panel, not two
    assert _sha(clustered) == before
    assert main(["plot", "embedding", str(clustered), "-o", str(tmp_path / "map.pdf")]) == 2
    assert "must end in .png" in capsys.readouterr().err
    assert main(["plot", "embedding", str(clustered), "--use-rep", "X_pca", "-o", str(tmp_path / "p.png")]) == 2
    assert f"{clustered} has no obsm['X_pca'] (its obsm: ['X_masksc']); fix: `masksc embed` the counts first, " \
           "or pass --use-rep one of those." in capsys.readouterr().err


def test_plot_embedding_colours_by_a_gene_of_a_layer(tmp_path, capsys):
    """--color takes a gene of an .h5ad holding expression, read from --layer, and draws what
    pl.embedding draws; on an embed output (no genes) it names why."""
    from masksc import pl
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, size=(60, 4)).astype(np.float32)
    adata = ad.AnnData(counts, var=pd.DataFrame(index=["A", "B", "C", "D"]))
    adata.layers["log"] = np.log1p(counts)
    adata.obsm["X_masksc"] = rng.normal(size=(60, 2)).astype(np.float32)
    path = tmp_path / "genes.h5ad"
    adata.write_h5ad(path)
    assert main(["plot", "embedding", str(path), "--color", "C", "--layer", "log", "-o", str(tmp_path / "cli.png")]) == 0
    pl.embedding(adata, "C", tmp_path / "api.png", layer="log")
    np.testing.assert_array_equal(_pixels(tmp_path / "cli.png"), _pixels(tmp_path / "api.png"))
    assert not np.array_equal(_pixels(tmp_path / "cli.png"),
                              _pixels(pl.embedding(adata, "C", tmp_path / "x.png")))  # X's counts, not the layer
    ad.AnnData(obs=adata.obs, obsm=dict(adata.obsm)).write_h5ad(tmp_path / "embedded.h5ad")
    assert main(["plot", "embedding", str(tmp_path / "embedded.h5ad"), "--color", "C",
                 "-o", str(tmp_path / "y.png")]) == 2
    assert "it has no genes: a `masksc embed` output" in capsys.readouterr().err


def test_plot_loss_draws_the_fits_recorded_losses(trained, tmp_path, capsys):
    from masksc import checkpoint, pl
    from masksc.pipeline import MaskSCModel
    _, _, model_dir = trained
    state = json.loads((model_dir / "last" / "trainer_state.json").read_text())
    assert checkpoint.read_losses(model_dir) == state["losses"] and len(state["losses"]) == 2
    assert main(["plot", "loss", str(model_dir), "-o", str(tmp_path / "cli.png")]) == 0
    pl.loss_curve(state["losses"], tmp_path / "api.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "cli.png"), _pixels(tmp_path / "api.png"))
    MaskSCModel.load(model_dir).save(tmp_path / "saved")
    assert main(["plot", "loss", str(tmp_path / "saved"), "-o", str(tmp_path / "x.png")]) == 2
    assert "holds no training record" in capsys.readouterr().err


def test_plot_attention_errors_name_the_files_rows_of_the_drawn_cells(trained, tmp_path, capsys):
    """A drawn cell with zero counts, or a negative value among the drawn, is named by its row in
    the file, not by its place among the few cells drawn; the drawn cells are listed as such."""
    from masksc import pl
    data, _, model_dir = trained
    cells = ad.read_h5ad(data)
    picks = pl.one_cell_per_label(cells.obs["label"], 0)
    X = cells.X.toarray() if hasattr(cells.X, "toarray") else np.array(cells.X)
    last = int(picks[-1])
    X[last] = 0
    cells.X = X
    cells.write_h5ad(tmp_path / "empty_cell.h5ad")
    assert main(["plot", "attention", str(tmp_path / "empty_cell.h5ad"), "--model", str(model_dir),
                 "--device", "cpu", "-o", str(tmp_path / "a.png")]) == 2
    assert f"1 cell (row {last} ({cells.obs_names[last]})) has zero counts" in capsys.readouterr().err
    X[last, 0] = -2
    cells.X = X
    cells.write_h5ad(tmp_path / "negative.h5ad")
    assert main(["plot", "attention", str(tmp_path / "negative.h5ad"), "--model", str(model_dir),
                 "--device", "cpu", "-o", str(tmp_path / "a.png")]) == 2
    assert (f"in {len(picks)} cells (rows {', '.join(map(str, picks))}), the first in cell {last} "
            f"({cells.obs_names[last]});") in capsys.readouterr().err


def test_plot_attention_draws_one_cell_per_label(trained, tmp_path, capsys):
    """`masksc plot attention` draws model.attention_maps of one seeded cell per label, titled by
    label and cell name, saying when --cells leaves labels out; without the label column it draws
    --cells random cells titled by name."""
    from masksc import pl
    from masksc.pipeline import MaskSCModel
    data, before, model_dir = trained
    assert main(["plot", "attention", str(data), "--model", str(model_dir), "--device", "cpu",
                 "-o", str(tmp_path / "cli.png")]) == 0
    cells = ad.read_h5ad(data)
    picks = pl.one_cell_per_label(cells.obs["label"], 0)
    model = MaskSCModel.load(model_dir)
    pl.attention_grid(model.attention_maps(cells[picks]), [f"{label}\n{name}" for label, name in zip(
        cells.obs["label"].to_numpy()[picks], cells.obs_names[picks])], tmp_path / "api.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "cli.png"), _pixels(tmp_path / "api.png"))
    n_labels = cells.obs["label"].nunique()
    assert main(["plot", "attention", str(data), "--model", str(model_dir), "--device", "cpu", "--cells", "1",
                 "-o", str(tmp_path / "one.png")]) == 0
    assert f"warning: 'label' holds {n_labels} labels; drawing a cell of each of the first 1 in the legend's order " \
           f"(--cells {n_labels} draws them all)" in capsys.readouterr().err
    assert main(["plot", "attention", str(data), "--model", str(model_dir), "--label-key", "none",
                 "-o", str(tmp_path / "none.png")]) == 2  # a column asked for and absent: not random cells
    assert ("has no obs column 'none' (--label-key); fix: pass one of ['label'], or drop --label-key to draw one cell "
            "per 'label'.") in capsys.readouterr().err and not (tmp_path / "none.png").exists()
    unlabelled = cells.copy()
    unlabelled.obs["empty"] = np.nan
    del unlabelled.obs["label"]
    unlabelled.write_h5ad(tmp_path / "unlabelled.h5ad")
    assert main(["plot", "attention", str(tmp_path / "unlabelled.h5ad"), "--model", str(model_dir), "--label-key",
                 "empty", "-o", str(tmp_path / "empty.png")]) == 2
    assert ("has a 'empty' label (--label-key); fix: pass one of ['empty'], or drop --label-key to draw --cells random "
            "cells.") in capsys.readouterr().err
    assert main(["plot", "attention", str(tmp_path / "unlabelled.h5ad"), "--model", str(model_dir), "--cells", "2",
                 "--seed", "5", "-o", str(tmp_path / "two.png")]) == 0
    rng_picks = np.sort(np.random.default_rng(5).choice(cells.n_obs, 2, replace=False))
    titles = list(cells.obs_names[rng_picks])  # "cell_0065", not "cell cell_0065"
    assert all(t.startswith("cell_") for t in titles)
    pl.attention_grid(model.attention_maps(cells[rng_picks]), titles, tmp_path / "two_api.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "two.png"), _pixels(tmp_path / "two_api.png"))
    assert _sha(data) == before


def test_plot_attention_of_an_unreadable_h5ad_names_the_file(trained, tmp_path, capsys):
    """It was h5py's "Unable to synchronously open file (file signature not found)" alone."""
    _, _, model_dir = trained
    fake = tmp_path / "fake.h5ad"
    fake.write_bytes(b"not an hdf5 file" * 100)
    assert main(["plot", "attention", str(fake), "--model", str(model_dir), "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {fake} as .h5ad (OSError: " in err and "fix: check the file is complete" in err


def test_plot_attention_of_data_missing_genes_gives_the_error_alone(trained, tmp_path, capsys):
    """With genes named gene_0000.. (matched by position), the missing-library-genes warning came
    first and said none of the missing genes was on the model's grid, which was false."""
    data, _, model_dir = trained
    cells = ad.read_h5ad(data)
    cells[:, : cells.n_vars // 2].copy().write_h5ad(tmp_path / "half.h5ad")
    assert main(["plot", "attention", str(tmp_path / "half.h5ad"), "--model", str(model_dir), "--device", "cpu",
                 "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "genes the preprocessor was fitted on are missing from the data" in err and "warning" not in err, err
    assert not (tmp_path / "a.png").exists()


def test_plot_attention_on_an_embedding_without_x_names_the_file_and_the_fix(trained, embedded, tmp_path, capsys):
    """`masksc embed` writes obs + the embedding, no X: its cells cannot be drawn (was a raw h5py KeyError)."""
    _, _, model_dir = trained
    assert main(["plot", "attention", str(embedded), "--model", str(model_dir), "--device", "cpu",
                 "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"{embedded} holds no expression matrix X" in err and "Traceback" not in err
    data, _, _ = trained  # a file holding its counts only in a layer: refused even with --layer before
    counts = ad.read_h5ad(data)
    ad.AnnData(obs=counts.obs, var=counts.var, layers={"counts": counts.X}).write_h5ad(tmp_path / "layers.h5ad")
    command = ["plot", "attention", str(tmp_path / "layers.h5ad"), "--model", str(model_dir), "--device", "cpu"]
    assert main([*command, "-o", str(tmp_path / "b.png")]) == 2
    assert "holds no expression matrix X, only the layers ['counts']; fix: --layer counts." in capsys.readouterr().err
    assert main([*command, "--layer", "counts", "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").stat().st_size > 0
    assert "fix: pass the counts file the model was fitted on." in err
    assert not (tmp_path / "a.png").exists()


def test_plot_attention_never_draws_a_cell_without_a_label(trained, tmp_path, capsys):
    """Cells whose label is missing (NaN) are never picked; numeric labels keep their order (2 before 10,
    not "10" before "2" as text) and are titled as written (2, not 2.0)."""
    from masksc import pl
    from masksc.pipeline import MaskSCModel
    data, _, model_dir = trained
    cells = ad.read_h5ad(data)
    kind = cells.obs["label"].astype(str).to_numpy()
    cells.obs["label"] = pd.Categorical(np.select([kind == "type_1", kind == "type_2"], [10, 2], -1),
                                        categories=[2, 10])  # -1 is no category: type_0 cells are NaN
    assert cells.obs["label"].isna().sum() == (kind == "type_0").sum() > 0
    cells.write_h5ad(tmp_path / "nan.h5ad")
    for seed in range(3):
        out = tmp_path / f"cli{seed}.png"
        assert main(["plot", "attention", str(tmp_path / "nan.h5ad"), "--model", str(model_dir), "--device", "cpu",
                     "--seed", str(seed), "-o", str(out)]) == 0
        picks = pl.one_cell_per_label(cells.obs["label"], seed)
        assert list(cells.obs["label"].to_numpy()[picks]) == [2, 10]
        model = MaskSCModel.load(model_dir)
        pl.attention_grid(model.attention_maps(cells[picks]), [f"{label}\n{name}" for label, name in zip(
            ["2", "10"], cells.obs_names[picks])], tmp_path / "api.png")
        np.testing.assert_array_equal(_pixels(out), _pixels(tmp_path / "api.png"))


def test_set_takes_a_list_without_brackets():
    """--set grid_shape=16,16 is the list [16, 16] (it was split into the characters '1', '6', ',' ..)."""
    from masksc.cli import _override
    assert _override("grid_shape=16,16") == ("grid_shape", [16, 16])
    assert _override("betas=0.9,0.95") == ("betas", [0.9, 0.95])
    assert _override("grid_shape=[16, 16]") == ("grid_shape", [16, 16])
    assert _override("layout=hvg") == ("layout", "hvg")
    assert _override("layout=a,b") == ("layout", "a,b")  # not a list of JSON values: the text as given


def test_warnings_are_printed_as_the_commands_own_lines(embedded, tmp_path, capsys):
    """A warning reaches a command's user as `masksc CMD: warning: ...`, not as a Python source line."""
    clustered, partial = tmp_path / "c.h5ad", tmp_path / "p.h5ad"
    assert main(["cluster", str(embedded), "-k", "3", "-o", str(clustered)]) == 0
    cells = ad.read_h5ad(clustered)
    labels = cells.obs["label"].astype(object).to_numpy()
    labels[:7] = np.nan
    cells.obs["label"] = labels
    cells.write_h5ad(partial)
    capsys.readouterr()
    assert main(["evaluate", str(partial)]) == 0
    err = capsys.readouterr().err
    assert "masksc evaluate: warning: 7 of 400 cells have no 'label' label" in err
    assert "UserWarning" not in err and ".py:" not in err


def test_log_lines_and_warnings_on_a_terminal_are_never_glued_to_a_progress_bar(tmp_path):
    """On a terminal a bar is cleared before a log line or warning is printed and redrawn after it,
    so each message starts its own line (a plain handler would append it to the half-drawn bar)."""
    data = tmp_path / "cells.h5ad"
    write_synthetic_h5ad(data, 200, n_genes=300, n_types=3, seed=4)
    script = ("import io, sys\n"
              "class Terminal(io.StringIO):\n"
              "    def isatty(self): return True\n"
              "sys.stderr = Terminal()\n"
              "from masksc.cli import main\n"
              f"code = main(['fit', {str(data)!r}, '-o', {str(tmp_path / 'model')!r}, *{TINY!r}])\n"
              "sys.__stderr__.write(sys.stderr.getvalue())\n"
              "sys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "it/s" in out.stderr  # bars were drawn
    messages = [line.rsplit("\r", 1)[-1] for line in out.stderr.split("\n") if " INFO " in line or "warning:" in line]
    assert any("contrastive-sc epoch 1/2" in m for m in messages) and any("masksc fit: warning:" in m for m in messages)
    glued = [m for m in messages if not (m[:2].isdigit() or m.startswith("masksc fit: warning:"))]
    assert not glued, glued


def test_use_raw_reads_scanpys_layout_as_the_log_values_in_x_are_read(tmp_path, capsys):
    """scaled X with log values in .raw (scanpy's usual file): fit / embed --use-raw stream .raw and
    give the model and embedding that the same log values stored as X give; plot attention reads it."""
    import scanpy as sc

    from masksc.data import synthetic
    cells = synthetic(300, n_genes=300, n_types=3, seed=4)
    sc.pp.normalize_total(cells, target_sum=1e4)
    sc.pp.log1p(cells)
    cells.write_h5ad(tmp_path / "log.h5ad")
    cells.raw = cells
    sc.pp.scale(cells)
    cells.write_h5ad(tmp_path / "scaled.h5ad")
    assert main(["fit", str(tmp_path / "scaled.h5ad"), "-o", str(tmp_path / "m_raw"), *TINY]) == 2
    assert "X holds negative (scaled) values and .raw is set: scanpy's layout keeps the log-normalised values " \
        "there; fix: use_raw=True (--use-raw)" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "scaled.h5ad"), "-o", str(tmp_path / "m_raw"), *TINY, "--use-raw"]) == 0
    assert main(["fit", str(tmp_path / "log.h5ad"), "-o", str(tmp_path / "m_log"), *TINY]) == 0
    assert main(["embed", str(tmp_path / "scaled.h5ad"), "--model", str(tmp_path / "m_raw"), "-o",
                 str(tmp_path / "e_raw.h5ad"), "--use-raw"]) == 0
    assert main(["embed", str(tmp_path / "log.h5ad"), "--model", str(tmp_path / "m_log"), "-o",
                 str(tmp_path / "e_log.h5ad")]) == 0
    raw, log = ad.read_h5ad(tmp_path / "e_raw.h5ad"), ad.read_h5ad(tmp_path / "e_log.h5ad")
    np.testing.assert_allclose(raw.obsm["X_masksc"], log.obsm["X_masksc"], rtol=1e-5, atol=1e-6)
    assert raw.uns["masksc"]["embed"]["use_raw"] is True
    assert main(["plot", "attention", str(tmp_path / "scaled.h5ad"), "--model", str(tmp_path / "m_raw"),
                 "--use-raw", "-o", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main(["embed", str(tmp_path / "log.h5ad"), "--model", str(tmp_path / "m_log"), "-o",
                 str(tmp_path / "e2.h5ad"), "--use-raw"]) == 2
    assert "has no .raw to read with use_raw (--use-raw); fix: drop it" in capsys.readouterr().err


def test_the_demo_quiets_only_its_own_presets_grid_padding(monkeypatch):
    """The demo preset's 28 x 28 grid pads the demo's 765 genes: no news to a user. A grid or
    another setting given through fit_and_score (benchmarks/demo_seeds.py --set) keeps its warning."""
    import masksc.demo
    from masksc import tl
    from masksc.data import GridLayout

    class Fitted(Exception):
        pass

    def fit(adata, preset, **kwargs):
        GridLayout.fit(None, [f"g{i}" for i in range(3)], shape=(2, 2), patch=1)  # warns: 3 genes for 4 positions
        raise Fitted
    monkeypatch.setattr(tl, "fit", fit)
    for kwargs, warned in (({"epochs": 1, "model_dir": None}, False), ({"grid_shape": (64, 64)}, True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(Fitted):
                masksc.demo.fit_and_score(synthetic(10, n_genes=5, n_types=2), 0, **kwargs)
        assert any("padding the last 1 positions" in str(w.message) for w in seen) == warned, kwargs
