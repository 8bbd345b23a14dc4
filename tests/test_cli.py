"""The `masksc` command: help, fit -> embed -> cluster -> evaluate round trip, bad input."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from masksc.cli import main
from masksc.data import write_synthetic_h5ad

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


def test_help_lists_the_commands():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "masksc.cli", "--help"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for command in ("fit", "embed", "cluster", "evaluate", "demo"):
        assert f"    {command} " in out.stdout


def test_fit_embed_cluster_evaluate_round_trip(trained, tmp_path, capsys):
    data, before, model = trained
    config = json.loads((model / "last" / "config.json").read_text())
    assert config["teacher_config"]["epochs"] == 2 and config["teacher_config"]["temperature"] == 0.5
    emb = tmp_path / "emb.h5ad"
    assert main(["embed", str(data), "--model", str(model), "-o", str(emb), "--chunk-size", "150"]) == 0
    E = ad.read_h5ad(emb)
    assert E.obsm["X_masksc"].shape == (400, 32) and np.isfinite(E.obsm["X_masksc"]).all()
    assert E.X is None                                            # out-of-core output: obs + obsm only
    assert main(["embed", str(data), "--model", str(model), "-o", str(tmp_path / "emb.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "emb.npy"), E.obsm["X_masksc"])

    clustered = tmp_path / "clustered.h5ad"
    assert main(["cluster", str(emb), "-k", "3", "-o", str(clustered)]) == 0
    C = ad.read_h5ad(clustered)
    assert C.obs["masksc_cluster"].nunique() == 3
    capsys.readouterr()
    scores_path = tmp_path / "scores.json"
    assert main(["evaluate", str(clustered), "--json", str(scores_path)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(scores_path.read_text())
    assert "ARI" in printed and 0.0 <= scores["nmi"] <= 1.0 and -1.0 <= scores["ari"] <= 1.0
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
    assert main(["embed", str(data), "--model", str(model_dir), "-o", str(tmp_path / "x.npy"), "--pool", "max"]) == 2
    assert "choose one of" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
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
    assert "temperature=0 must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and _sha(data) == before
