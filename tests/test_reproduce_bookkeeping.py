"""benchmarks/reproduce.py's resumable bookkeeping: which finished row a run is, and when an
ablation is the very run the preset already made."""
import argparse
import concurrent.futures
import dataclasses
import importlib.util
import re
import time
import types
from pathlib import Path

import pytest

from masksc.models import get_preset

_spec = importlib.util.spec_from_file_location(
    "reproduce", Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)

ARGS = argparse.Namespace(preset="cpu", epochs=0, mask_ratio=0.0)
DATA_ID = {"file": "10X_PBMC_top2000.h5", "sha1": "5" * 40, "cells": 120, "genes": 300}


def _row(method, seed=0, dataset="pbmc", **switches):
    cfg = dataclasses.replace(get_preset("cpu"), **switches).to_dict()
    return {"dataset": dataset, "method": method, "seed": seed, "preset": "cpu", "epochs": cfg["epochs"],
            "config": cfg, "ari": 0.5, "nmi": 0.5, "data": DATA_ID}


def test_run_key_matches_the_row_it_writes():
    for method, switches in reproduce.ABLATIONS.items():
        assert reproduce._key(_row(method, **switches)) == reproduce._run_key("pbmc", method, 0, ARGS)


def test_key_tells_ime_on_from_ime_off():
    on, off = _row("masksc", ime=True), _row("masksc", ime=False)
    assert reproduce._key(on) != reproduce._key(off)


def test_ablation_equal_to_the_preset_reuses_its_run():
    preset_ime = get_preset("cpu").ime
    same_as_preset = "ime-on" if preset_ime else "ime-off"
    other = "ime-off" if preset_ime else "ime-on"
    docs = [{"runs": [_row("masksc", seed=1, ime=preset_ime)]}, {"runs": []}]
    found = reproduce._same_run(docs, "pbmc", 1, reproduce._model_config(same_as_preset, ARGS), DATA_ID)
    assert found is docs[0]["runs"][0]
    assert reproduce._same_run(docs, "pbmc", 1, reproduce._model_config(other, ARGS), DATA_ID) is None
    assert reproduce._same_run(docs, "pbmc", 2, reproduce._model_config(same_as_preset, ARGS), DATA_ID) is None
    assert reproduce._same_run(docs, "worm", 1, reproduce._model_config(same_as_preset, ARGS), DATA_ID) is None
    other_data = {**DATA_ID, "sha1": "6" * 40}  # a subsample under the dataset's name, say
    assert reproduce._same_run(docs, "pbmc", 1, reproduce._model_config(same_as_preset, ARGS), other_data) is None


def test_non_model_methods_never_reuse_model_runs():
    docs = [{"runs": [_row("masksc")]}]
    assert reproduce._model_config("log-pca", ARGS) is None
    assert reproduce._same_run(docs, "pbmc", 0, None, DATA_ID) is None


def test_epochs_and_mask_overrides_enter_the_config():
    args = argparse.Namespace(preset="cpu", epochs=7, mask_ratio=0.25)
    cfg = reproduce._model_config("masksc", args)
    assert (cfg["epochs"], cfg["mask_ratio"]) == (7, 0.25)
    assert reproduce._run_key("worm", "masksc", 2, args)[3:6] == ("cpu", 7, 0.25)


def test_correlation_patches_are_not_the_ime_on_run():
    docs = [{"runs": [_row("ime-on", ime=True)]}, {"runs": []}]
    cfg = reproduce._model_config("corr-patches", ARGS)
    assert (cfg["ime"], cfg["layout"]) == (True, "correlation")
    assert reproduce._same_run(docs, "pbmc", 0, cfg, DATA_ID) is None
    assert reproduce._same_run(docs, "pbmc", 0, reproduce._model_config("ime-on", ARGS), DATA_ID) is docs[0]["runs"][0]


def test_table_names_layout_and_size_where_they_differ_from_the_preset():
    rows = [{**_row(m, **reproduce.ABLATIONS[m]), "silhouette": 0.1, "wall_s": 1.0, "device": "cpu"}
            for m in ("masksc", "corr-patches", "small")]
    lines = {line.split("|")[2].strip(): line for line in
             reproduce.markdown({"runs": rows}, reproduce.TABLE2, "t").splitlines() if line.startswith("| pbmc")}
    assert "layout" not in lines["masksc"] and "depth" not in lines["masksc"]
    assert "layout correlation" in lines["corr-patches"]
    assert "embed_dim 64, depth 2" in lines["small"] and "layout" not in lines["small"]


def test_a_group_run_on_two_devices_names_both_with_their_own_wall_times():
    """Seeds of one row filled in on another machine: the row must not carry the first run's
    device for all of them, nor average a GPU's wall time with a CPU's."""
    rows = [{**_row("masksc", seed=s), "silhouette": 0.1, "wall_s": w, "device": d}
            for s, w, d in ((0, 100.0, "NVIDIA H200"), (1, 1400.0, "CPU (2 cores)"), (2, 1300.0, "CPU (2 cores)"))]
    line = next(x for x in reproduce.markdown({"runs": rows}, reproduce.TABLE1, "t").splitlines()
                if x.startswith("| pbmc"))
    assert "| 0,1,2 | 100 / 1350 | NVIDIA H200 ×1, CPU (2 cores) ×2 |" in line
    assert reproduce._devices(rows) == "CPU (2 cores), NVIDIA H200"


def test_a_row_of_one_run_shows_no_spread():
    """One seed's row gives its scores alone; "± 0.0000" is kept for runs that agree."""
    rows = [{**_row(m, seed=s), "ari": 0.5 + s / 10, "nmi": 0.6, "silhouette": 0.1, "wall_s": 1.0, "device": "cpu"}
            for m, seeds in (("masksc", (0,)), ("pca-raw", (0, 1))) for s in seeds]
    lines = {line.split("|")[2].strip(): line.split("|")[4:7] for line in
             reproduce.markdown({"runs": rows}, reproduce.TABLE1, "t").splitlines() if line.startswith("| pbmc")}
    assert [x.strip() for x in lines["masksc"]] == ["0.5000", "0.6000", "0.1000"]
    assert [x.strip() for x in lines["pca-raw"]] == ["0.5500 ± 0.0500", "0.6000 ± 0.0000", "0.1000 ± 0.0000"]


def test_a_row_of_an_earlier_preset_is_not_the_preset_s_row():
    """A row trained with another value of a field the setting column does not show (here the
    learning rate) is neither skipped as done nor grouped with the preset's rows; the table names it."""
    lr = get_preset("cpu").lr
    old = {**_row("masksc", lr=lr * 2), "silhouette": 0.1, "wall_s": 1.0, "device": "cpu"}
    now = {**_row("masksc"), "silhouette": 0.1, "wall_s": 1.0, "device": "cpu"}
    assert reproduce._key(old) != reproduce._run_key("pbmc", "masksc", 0, ARGS) == reproduce._key(now)
    lines = [line for line in reproduce.markdown({"runs": [old, now]}, reproduce.TABLE1, "t").splitlines()
             if line.startswith("| pbmc")]
    assert len(lines) == 2 and sum(f"lr {lr * 2}" in line for line in lines) == 1


def test_a_kept_model_is_reused_only_for_another_read_out(monkeypatch, tmp_path):
    """trained_masksc trains once per (dataset, seed, what is learned); a method that changes only
    the read-out embeds with the kept model (same weights, its own pool), another seed trains."""
    import masksc.pipeline
    import torch
    from masksc.data import synthetic

    tiny = dict(grid_shape=(16, 16), embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
                decoder_heads=2, batch_size=64)
    monkeypatch.setattr(reproduce, "ABLATIONS", {"masksc": tiny, "target-readout": {**tiny, "pool": "target"}})
    calls = []
    real_fit = masksc.pipeline.fit

    def counting_fit(*a, **kw):
        calls.append(kw["seed"])
        return real_fit(*a, **kw)

    monkeypatch.setattr(masksc.pipeline, "fit", counting_fit)
    adata = synthetic(120, n_genes=300, n_types=3, seed=1)
    adata.uns["data"] = DATA_ID
    args = argparse.Namespace(preset="demo", epochs=1, mask_ratio=0.0, models=str(tmp_path), progress=False)

    first, info = reproduce.trained_masksc(adata, "syn", 0, args, "masksc")
    assert calls == [0] and first.config.pool == "mean" and info["train_s"] > 0
    reused, info2 = reproduce.trained_masksc(adata, "syn", 0, args, "target-readout")
    assert calls == [0] and info2 == info
    assert reused.config.pool == "target" and reused.config.to_dict() == reproduce._model_config("target-readout", args)
    for a, b in zip(first.network.state_dict().values(), reused.network.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    reproduce.trained_masksc(adata, "syn", 1, args, "target-readout")
    assert calls == [0, 1]
    adata.uns["data"] = {**DATA_ID, "sha1": "6" * 40}  # other data under the same name: not the kept model
    reproduce.trained_masksc(adata, "syn", 0, args, "masksc")
    assert calls == [0, 1, 0]
    assert reproduce._training_id(reproduce._model_config("masksc", args)) == \
        reproduce._training_id(reproduce._model_config("target-readout", args))


def test_contrastive_sc_sweep_picks_the_size_with_the_highest_silhouette(monkeypatch):
    """The authors' rule: 3 seeds per input size, keep the size with the highest mean k-means
    silhouette (no labels); sizes past the data's gene count are one run, not several."""
    silhouette = {500: [0.30, 0.28, 0.32], 1000: [0.25, 0.26, 0.24], 1200: [0.33, 0.34, 0.35]}
    calls = []

    def fake(adata, k, n_genes, seed):
        assert k == 3
        used = 1200 if n_genes is None or n_genes > 1200 else n_genes
        calls.append((n_genes, seed))
        return {"silhouette": silhouette[used][seed], "ari": used / 10_000 + seed}, {"n_genes": used}

    monkeypatch.setattr(reproduce, "_contrastive_sc", fake)
    monkeypatch.setattr(reproduce, "_SWEEPS", {})
    adata = argparse.Namespace(uns={"dataset": "syn"})
    scores, extra = reproduce.run_contrastive_sweep(adata, 3, 2, ARGS)
    assert [n for n, _ in calls] == [500] * 3 + [1000] * 3 + [1500] * 3   # 1500 > 1200 genes: stop
    assert extra["n_genes"] == 1200 and scores == {"silhouette": 0.35, "ari": 0.12 + 2}
    assert extra["silhouette_by_size"] == pytest.approx({500: 0.30, 1000: 0.25, 1200: 0.34})
    reproduce.run_contrastive_sweep(adata, 3, 0, ARGS)                   # the other seeds reuse the sweep
    assert len(calls) == 9
    assert reproduce._run_key("worm", "contrastive-sc-sweep", 1, ARGS)[:5] == ("worm", "contrastive-sc-sweep", 1,
                                                                             None, 30)


def test_contrastive_sc_uses_the_asked_number_of_genes():
    from masksc.data import synthetic
    adata = synthetic(150, n_genes=400, n_types=3, seed=0)
    k = adata.obs["label"].nunique()
    scores, extra = reproduce._contrastive_sc(adata, k, 100, 0)
    assert extra["n_genes"] == 100 and 0 <= scores["ari"] <= 1
    _, every = reproduce._contrastive_sc(adata, k, None, 0)
    assert every["n_genes"] == int(((adata.X.sum(0) >= 3)).sum())


README = """# project

intro

#### Table 1: clustering

| dataset | method | ARI |
|---|---|---|
| pbmc | old | 0.1 |

text after the table
"""


def test_readme_table_is_replaced_and_nothing_else():
    md = "### Table 1: clustering\n\n| dataset | method | ARI |\n|---|---|---|\n| pbmc | new | 0.2 |\n| worm | new | 0.3 |\n"
    out = reproduce.replace_readme_table(README, "Table 1: clustering", md)
    assert "| pbmc | old |" not in out
    assert out == README.replace("| pbmc | old | 0.1 |", "| pbmc | new | 0.2 |\n| worm | new | 0.3 |")
    assert reproduce.replace_readme_table(out, "Table 1: clustering", md) == out


def test_readme_without_the_table_is_an_error_naming_the_heading():
    with pytest.raises(ValueError, match="Table 2: ablations"):
        reproduce.replace_readme_table(README, "Table 2: ablations", "| a |\n")
    no_table = "#### Table 2: ablations\n\ntext\n\n## Next\n\n| other | table |\n"
    with pytest.raises(ValueError, match="no table under"):
        reproduce.replace_readme_table(no_table, "Table 2: ablations", "| a |\n")
    with pytest.raises(ValueError, match="no table under"):                 # the heading ends the file
        reproduce.replace_readme_table("intro\n\n#### Table 2: ablations\n\ntext\n", "Table 2: ablations", "| a |\n")


def test_the_readme_holds_the_tables_the_results_give():
    """The README's two tables are what ``markdown`` makes of the committed results."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    for n, methods, title in reproduce.TABLES:
        doc = reproduce._load(root / "benchmarks" / "results" / f"table{n}.json")
        assert reproduce.replace_readme_table(readme, title, reproduce.markdown(doc, methods, title)) == readme


@pytest.mark.parametrize("argv, message", [
    (["--datasets", "pbmc,bogus"], r"unknown dataset\(s\) \['bogus'\]"),
    (["--methods", "pca-raw,bogus"], r"unknown method\(s\) \['bogus'\]"),
    (["--seeds", "0,x"], r"--seeds '0,x': give whole numbers"),
    (["--seeds", "0,-1"], r"--seeds 0,-1: each must be in \[0, 2\*\*32 - 1\]"),
    (["--seeds", f"0,{2**32}"], r"--seeds 0,4294967296: each must be in"),
    (["--threads", "0"], r"--threads 0: must be >= 1"),
    (["--epochs", "-1"], r"--epochs -1: must be >= 1, or 0"),
    (["--mask-ratio", "1.5"], r"--mask-ratio 1.5: must be in \(0, 1\)"),
    (["--methods", "masksc", "--preset", "nope"], r"masksc with --preset 'nope': unknown preset"),
    (["--data", "/nonexistent-masksc"], r"/nonexistent-masksc/10X_PBMC_top2000.h5.* not found; fix: --data the "
                                        r"folder holding"),
])
def test_every_setting_is_checked_before_any_run(argv, message, monkeypatch, capsys):
    """A bad setting stops the script at once (exit 2, naming it), not after hours of the runs before it."""
    monkeypatch.setattr(reproduce, "METHODS", {name: None for name in reproduce.METHODS})  # any run would fail
    with pytest.raises(SystemExit) as stop:
        reproduce.main(argv)
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_two_invocations_needing_one_model_train_it_once(tmp_path, monkeypatch):
    """The second waits for the first's model instead of training it again and failing to save over it."""
    import masksc.pipeline

    cfg = reproduce._model_config("masksc", ARGS)
    trained = []

    class Model:
        config = types.SimpleNamespace(to_dict=lambda: dict(cfg))

        def set_pool(self, pool):
            assert pool == cfg["pool"]

        def save(self, path):
            Path(path).mkdir()  # as save_checkpoint, which refuses a folder holding another run's files

    def fit(adata, preset, **kw):
        trained.append(preset)
        time.sleep(0.5)
        return Model(), types.SimpleNamespace(losses=[0.25])

    monkeypatch.setattr(masksc.pipeline, "fit", fit)
    monkeypatch.setattr(masksc.pipeline.MaskSCModel, "load", classmethod(lambda cls, path: Model()))
    args = argparse.Namespace(**vars(ARGS), models=str(tmp_path), progress=False)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        adata = types.SimpleNamespace(uns={"data": DATA_ID})
        infos = list(pool.map(lambda _: reproduce.trained_masksc(adata, "pbmc", 0, args)[1], range(2)))
    assert trained == ["cpu"]
    assert infos[0] == infos[1] and infos[0]["final_loss"] == 0.25


def test_a_dataset_missing_from_the_default_folder_is_named_before_any_run(tmp_path, monkeypatch, capsys):
    (tmp_path / reproduce.DATASETS["pbmc"]).write_bytes(b"")
    monkeypatch.setattr(reproduce, "DATA", tmp_path)
    monkeypatch.setattr(reproduce, "METHODS", {name: None for name in reproduce.METHODS})  # any run would fail
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["--datasets", "pbmc,worm", "--methods", "pca-raw"])
    assert stop.value.code == 2
    assert re.search(r"worm_neuron_cell\.h5'\] not found; fix: --data", capsys.readouterr().err)


def test_a_row_computed_on_other_data_under_the_dataset_s_name_is_run_again(tmp_path, monkeypatch, caplog):
    """A trial on a subsample saved as 10X_PBMC_top2000.h5 stood in for the real run: the row was
    skipped as done. Rows now record the file's SHA-1, cells and genes, and are run again on other data."""
    import h5py
    import numpy as np

    def write(folder, n_cells):
        folder.mkdir()
        rng = np.random.default_rng(n_cells)
        with h5py.File(folder / reproduce.DATASETS["pbmc"], "w") as f:
            f["X"], f["Y"] = rng.poisson(2.0, (n_cells, 60)).astype(np.float64), np.arange(n_cells) % 3

    write(tmp_path / "trial", 60)
    write(tmp_path / "real", 90)
    (tmp_path / "README.md").write_text("#### Table 1: clustering (k = number of labels)\n| a |\n\n"
                                        "#### Table 2: ablations\n| a |\n")
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path)
    ran = []

    def pca_raw(adata, k, seed, args):
        ran.append(adata.n_obs)
        return {"ari": 0.5, "nmi": 0.5, "silhouette": 0.1, "n_clusters": 3}, {}

    monkeypatch.setattr(reproduce, "METHODS", {**reproduce.METHODS, "pca-raw": pca_raw})
    argv = ["--datasets", "pbmc", "--methods", "pca-raw", "--seeds", "0", "--threads", "1", "--models", ""]
    for folder in ("trial", "trial", "real", "real"):
        reproduce.main([*argv, "--data", str(tmp_path / folder)])
    assert ran == [60, 90]  # the second call on each data skips; the real data replaces the trial's row
    rows = reproduce._load(tmp_path / "table1.json")["runs"]
    assert len(rows) == 1 and rows[0]["data"]["cells"] == 90 and rows[0]["data"]["genes"] == 60
    assert "the row was computed on other data" in caplog.text


def test_rows_on_different_data_are_never_averaged_together():
    """Seeds 1, 2 of a trial on a subsample and seed 0 run again on the real file: one row read
    as the mean of three seeds of one dataset. Each file's rows now make their own row, named."""
    rows = [{**_row("pca-raw", seed=s), "ari": a, "silhouette": 0.1, "wall_s": 1.0, "device": "cpu",
             "data": {**DATA_ID, "sha1": sha1 * 40}}
            for s, a, sha1 in ((1, 0.61, "a"), (2, 0.62, "a"), (0, 0.90, "b"))]
    lines = [line for line in reproduce.markdown({"runs": rows}, reproduce.TABLE1, "t").splitlines()
             if line.startswith("| pbmc")]
    assert len(lines) == 2
    trial, real = sorted(lines, key=lambda line: "data bbbbbbbb" in line)
    assert "(data aaaaaaaa)" in trial and "| 0.6150 ± 0.0050 |" in trial and "| 1,2 |" in trial
    assert "(data bbbbbbbb)" in real and "| 0.9000 |" in real and "| 0 |" in real
    one_file = reproduce.markdown({"runs": rows[:2]}, reproduce.TABLE1, "t")
    assert "(data" not in one_file  # named only where the files differ
    unrecorded = reproduce.markdown({"runs": [rows[0], {**rows[2], "data": None}]}, reproduce.TABLE1, "t")
    assert "(data not recorded)" in unrecorded  # a hand-edited row: an AttributeError


@pytest.mark.parametrize("text", ["{\"runs\": [", "", "[]", "{\"rows\": []}"])
def test_a_corrupt_results_file_is_named_and_left_as_it_is(tmp_path, monkeypatch, text):
    """A truncated or foreign table2.json was a bare JSONDecodeError / KeyError naming no file."""
    (tmp_path / "README.md").write_text("#### Table 1: clustering (k = number of labels)\n| a |\n\n"
                                        "#### Table 2: ablations\n| a |\n")
    (tmp_path / "table2.json").write_text(text)
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match=re.escape(str(tmp_path / "table2.json")) + " is not a results file"):
        reproduce.main(["--tables-only"])
    assert (tmp_path / "table2.json").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "table2.json"]  # nothing written


def test_a_trial_results_folder_leaves_the_readme_as_it_is(tmp_path, monkeypatch, capsys):
    """MASKSC_BENCH_RESULTS names a folder for a trial run: its tables are written there, and the
    README, which quotes the committed results, is not rewritten from them."""
    readme = "#### Table 1: clustering (k = number of labels)\n| a |\n\n#### Table 2: ablations\n| a |\n"
    (tmp_path / "README.md").write_text(readme)
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path / "trial")
    reproduce.main(["--tables-only"])
    assert (tmp_path / "README.md").read_text() == readme
    assert sorted(p.name for p in (tmp_path / "trial").iterdir()) == ["table1.md", "table2.md"]
    assert f"README left as it is: these tables are of the results in {tmp_path / 'trial'}" in capsys.readouterr().out
    monkeypatch.setattr(reproduce, "COMMITTED_RESULTS", tmp_path / "trial")  # the committed folder: rewritten
    reproduce.main(["--tables-only"])
    assert (tmp_path / "README.md").read_text() != readme
