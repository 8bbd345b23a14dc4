"""AnnData-level API: fit -> embed -> cluster -> evaluate, storage conventions, model reuse."""
import json
import os
import shutil
import types
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from masksc import cluster, tl
from masksc.data import Preprocessor, synthetic
from masksc.errors import CheckpointError, DataError
from masksc.pipeline import MaskSCModel

TINY = dict(grid_shape=(16, 16), embed_dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
            decoder_heads=2, batch_size=64)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    adata = synthetic(240, n_genes=300, n_types=3, seed=1)
    before = adata.X.copy()
    model_dir = tmp_path_factory.mktemp("model")
    model = tl.fit(adata, "demo", model_dir=model_dir, epochs=2, progress=False, **TINY)
    return adata, before, model, model_dir


def _stop_after_epoch_1(run):
    """Leave the run in ``run`` as if stopped after its first epoch."""
    shutil.rmtree(run / "epoch-000002")
    (run / "last").unlink()
    os.symlink("epoch-000001", run / "last")


def test_fit_records_run_and_leaves_input_unchanged(fitted):
    adata, before, model, _ = fitted
    assert (adata.X != before).nnz == 0
    run = adata.uns["masksc"]["fit"]
    assert run["preset"] == "demo" and run["epochs"] == 2 and len(run["losses"]) == 2
    assert all(np.isfinite(run["losses"]))
    assert model.config.grid_shape == (16, 16)


def test_embed_cluster_evaluate_store_results(fitted):
    adata, _, model, _ = fitted
    ad = adata.copy()
    tl.embed(ad, model, progress=False)
    Z = ad.obsm["X_masksc"]
    assert Z.shape == (ad.n_obs, model.config.embed_dim) and Z.dtype == np.float32 and np.isfinite(Z).all()
    tl.cluster(ad, k=3)
    assert ad.obs["masksc_cluster"].nunique() == 3
    scores = tl.evaluate(ad, label_key="label")
    expected = adjusted_rand_score(ad.obs["label"], ad.obs["masksc_cluster"])
    assert scores["ari"] == pytest.approx(expected)
    assert ad.uns["masksc"]["metrics"]["ari"] == pytest.approx(expected)


def test_resumed_fit_reuses_the_saved_transform_and_refuses_other_genes(tmp_path):
    """A fit resumed from a checkpoint keeps the transform and gene list it saved: on the same
    cells it ends where the uninterrupted run does, and cells of another gene set are refused
    instead of silently replacing the model's genes under weights trained on the old ones."""
    adata = synthetic(240, n_genes=300, n_types=3, seed=1)
    settings = dict(epochs=2, checkpoint_every=1, progress=False, **TINY)
    full = adata.copy()
    ref = tl.fit(full, "demo", model_dir=tmp_path / "full", **settings)
    run = tmp_path / "run"
    tl.fit(adata.copy(), "demo", model_dir=run, **settings)
    _stop_after_epoch_1(run)

    other = synthetic(240, n_genes=300, n_types=3, seed=2)
    other.var_names = [f"other_{i}" for i in range(other.n_vars)]
    with pytest.raises(DataError, match="missing"):
        tl.fit(other, "demo", model_dir=run, resume=True, **settings)
    with pytest.raises(CheckpointError, match=r"grid_shape: saved \[16, 16\], requested \[8, 8\].* -o on the command"):
        tl.fit(adata.copy(), "demo", model_dir=run, resume=True, **{**settings, "grid_shape": (8, 8)})
    # other cells (the same number of batches, so the step count let them through) are refused
    with pytest.raises(CheckpointError, match=r"cannot resume: the run in .* was trained on 240 cells, and this data "
                                              r"has 230; .*fix: pass the data the run started on"):
        tl.fit(adata[:230].copy(), "demo", model_dir=run, resume=True, **settings)
    with pytest.raises(CheckpointError, match=r"trained on 240 cells with other names or in another order than this "
                                              r"data's"):
        tl.fit(adata[::-1].copy(), "demo", model_dir=run, resume=True, **settings)
    recounted = adata.copy()  # the same cells and genes, some counts changed (e.g. QC rerun): resumed silently before
    recounted.X = recounted.X.copy()
    recounted.X.data[:40] += 1
    with pytest.raises(CheckpointError, match=r"cannot resume: the run in .* was trained on other values for these 240 "
                                              r"cells \(the same names in the same order\);.* fix: pass the data the "
                                              r"run started on"):
        tl.fit(recounted, "demo", model_dir=run, resume=True, **settings)
    config = json.loads((run / "epoch-000001" / "config.json").read_text())
    del config["meta"]["input"], config["meta"]["cells"]  # as an earlier release saved it
    (run / "epoch-000001" / "config.json").write_text(json.dumps(config))
    resumed = adata.copy()
    model = tl.fit(resumed, "demo", model_dir=run, resume=True, **settings)
    assert model.fitted_input == {"layer": None, "use_raw": False}  # recorded from now on
    assert MaskSCModel.load(run).fitted_input == model.fitted_input
    assert list(model.genes) == list(ref.genes)
    assert resumed.uns["masksc"]["fit"]["losses"] == pytest.approx(full.uns["masksc"]["fit"]["losses"], abs=1e-6)
    np.testing.assert_allclose(model.embed(adata, progress=False), ref.embed(adata, progress=False), atol=1e-5)


def test_a_streamed_run_resumes_only_streamed_in_chunks_of_its_size(tmp_path):
    """The chunk size sets the order of a streamed run's batches: resumed with another, the run
    ended on other weights without a word. It, and a switch between a file and an in-memory
    AnnData, are refused; the same chunk size ends where the uninterrupted run does."""
    from masksc import pipeline
    adata = synthetic(240, n_genes=300, n_types=3, seed=1)
    adata.write_h5ad(tmp_path / "d.h5ad")
    settings = dict(epochs=2, checkpoint_every=1, progress=False, chunk_size=100, **TINY)
    ref, _ = pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=tmp_path / "full", **settings)
    run = tmp_path / "run"
    pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=run, **settings)
    _stop_after_epoch_1(run)
    with pytest.raises(CheckpointError, match=r"streamed chunks of 100 cells, .* and 60 are asked for now; resume "
                                              r"with --chunk-size 100 \(chunk_size= in Python\)"):
        pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=run, resume=True, **{**settings, "chunk_size": 60})
    with pytest.raises(CheckpointError, match=r"streamed its cells from a file \(.*\) and this one trained on cells "
                                              r"held in memory \(.*\), which draws other batches; resume it as it"):
        pipeline.fit(adata, "demo", model_dir=run, resume=True, **settings)
    adata[::-1].copy().write_h5ad(tmp_path / "reversed.h5ad")
    with pytest.raises(CheckpointError, match=r"trained on 240 cells with other names or in another order"):
        pipeline.fit(tmp_path / "reversed.h5ad", "demo", model_dir=run, resume=True, **settings)
    recounted = adata.copy()  # the same cells and genes, counts changed (ambient RNA removed): resumed silently before
    recounted.X = recounted.X.copy()
    recounted.X.data[::7] += 3
    recounted.write_h5ad(tmp_path / "recounted.h5ad")
    with pytest.raises(CheckpointError, match=r"cannot resume: the run in .* was trained on other values for these "
                                              r"cells \(the same names in the same order; a streamed run compares its "
                                              r"first 240 cells'\);.* fix: pass the data the run started on"):
        pipeline.fit(tmp_path / "recounted.h5ad", "demo", model_dir=run, resume=True, **settings)
    original = (run / "epoch-000001" / "config.json").read_text()
    config = json.loads(original)
    for record in ({"cells": 241, "digest": "0"}, {"cells": 0, "digest": "0"}, {"cells": 240}, "0"):
        damaged = {**config, "meta": {**config["meta"], "cells": {**config["meta"]["cells"], "first_values": record}}}
        (run / "epoch-000001" / "config.json").write_text(json.dumps(damaged))
        with pytest.raises(CheckpointError, match=r"the cells record of the run in .* is damaged"):
            pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=run, resume=True, **settings)
    del config["meta"]["cells"]  # as an earlier release saved it: its streamed record's count is compared
    (run / "epoch-000001" / "config.json").write_text(json.dumps(config))
    adata[:230].copy().write_h5ad(tmp_path / "fewer.h5ad")
    with pytest.raises(CheckpointError, match=r"was trained on 240 cells, and this data has 230"):
        pipeline.fit(tmp_path / "fewer.h5ad", "demo", model_dir=run, resume=True, **settings)
    for n_cells in (-5, True, 240.0, None):  # a damaged count was taken ("trained on -5 cells"), or skipped
        damaged = {**config, "meta": {**config["meta"], "streamed": {**config["meta"]["streamed"], "n_cells": n_cells}}}
        (run / "epoch-000001" / "config.json").write_text(json.dumps(damaged))
        with pytest.raises(CheckpointError, match=r"the cells record of the run in .* is damaged"):
            pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=run, resume=True, **settings)
    (run / "epoch-000001" / "config.json").write_text(original)  # the first cells' values compared, and equal
    model, _ = pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=run, resume=True, **settings)
    np.testing.assert_array_equal(model.embed(adata, progress=False), ref.embed(adata, progress=False))

    memory = tmp_path / "memory"
    pipeline.fit(adata, "demo", model_dir=memory, **settings)
    _stop_after_epoch_1(memory)
    with pytest.raises(CheckpointError, match=r"trained on cells held in memory \(.*\) and this one streamed its "
                                              r"cells from a file"):
        pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=memory, resume=True, **settings)


def test_a_streamed_fit_of_repeated_cell_names_warns_once(tmp_path):
    """anndata's warning about repeated cell names was given again for every chunk of the first
    cells whose values a streamed run records."""
    from masksc import pipeline
    adata = synthetic(240, n_genes=300, n_types=3, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.obs_names = ["cell"] * 240  # two samples' barcodes, say
        adata.write_h5ad(tmp_path / "d.h5ad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=tmp_path / "run", epochs=1, progress=False,
                     chunk_size=100, teacher_overrides={"epochs": 1}, **TINY)
    assert sum("Observation names are not unique" in str(w.message) for w in caught) == 1


def test_a_run_whose_saved_input_or_stream_record_is_damaged_is_refused_on_resume(tmp_path):
    """Resume read meta['input'] and meta['streamed'] before anything checked them: a TypeError,
    KeyError or AttributeError traceback where load named the damage."""
    from masksc import pipeline
    adata = synthetic(240, n_genes=300, n_types=3, seed=1)
    adata.write_h5ad(tmp_path / "d.h5ad")
    settings = dict(epochs=2, checkpoint_every=1, progress=False, chunk_size=100, **TINY)
    run = tmp_path / "run"
    pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=run, **settings)
    _stop_after_epoch_1(run)
    config_path = run / "epoch-000001" / "config.json"
    saved = config_path.read_text()
    for key, value, detail in (("input", {"layer": None}, r"input is \{'layer': None\}, not a dict of layer and use_raw"),
                               ("input", ["x"], r"input is \['x'\]"),
                               ("streamed", 4096, r"streamed is 4096, not a dict")):
        config = json.loads(saved)
        config["meta"][key] = value
        config_path.write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=rf"the transform saved in .*epoch-000001/config\.json is damaged "
                                                  rf"\({detail}"):
            pipeline.fit(tmp_path / "d.h5ad", "demo", model_dir=run, resume=True, **settings)


def test_leiden_when_k_unknown():
    """Without k, tl.cluster is Leiden (resolution 1) on the 15-neighbour kNN graph, both seeded
    by ``seed``: the labels equal that pipeline's, and three far-apart blobs are never merged."""
    rng = np.random.default_rng(0)
    blob = np.repeat(np.arange(3), 80)
    Z = (rng.normal(size=(240, 8)) + 20.0 * np.eye(8)[blob]).astype(np.float32)
    ad = synthetic(240, n_genes=20, n_types=3, seed=5)
    ad.obsm["X_masksc"] = Z
    tl.cluster(ad, seed=3)
    expected = cluster.leiden(cluster.knn_graph(Z, n_neighbors=15, seed=3), resolution=1.0, seed=3)
    got = ad.obs["masksc_cluster"].to_numpy().astype(str)
    np.testing.assert_array_equal(got, expected.astype(str))
    run = ad.uns["masksc"]["cluster"]
    assert run["k"] is None and run["seed"] == 3 and run["n_clusters"] == len(np.unique(expected)) >= 3
    for label in np.unique(got):  # no cluster spans two blobs
        assert len(np.unique(blob[got == label])) == 1, label


def test_saved_model_embeds_new_data_identically(fitted):
    adata, _, model, model_dir = fitted
    loaded = MaskSCModel.load(model_dir)
    sub = adata[:50].copy()
    np.testing.assert_allclose(loaded.embed(sub, progress=False), model.embed(sub, progress=False),
                               rtol=1e-5, atol=1e-5)


def test_gene_order_of_new_data_does_not_matter(fitted):
    adata, _, model, _ = fitted
    sub = adata[:40].copy()
    shuffled = sub[:, np.random.default_rng(0).permutation(sub.n_vars)].copy()
    np.testing.assert_allclose(model.embed(shuffled, progress=False), model.embed(sub, progress=False),
                               rtol=1e-5, atol=1e-5)


def test_refuses_data_missing_model_genes(fitted):
    adata, _, model, _ = fitted
    other = adata[:20].copy()
    other.var_names = [f"other_{i}" for i in range(other.n_vars)]
    with pytest.raises(CheckpointError, match="missing"):
        model.embed(other, progress=False)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        MaskSCModel.load(tmp_path / "nope")


def test_cluster_and_evaluate_need_their_inputs(fitted):
    adata, _, _, _ = fitted
    ad = adata.copy()
    with pytest.raises(DataError, match=r"tl.embed\(adata, model\) first, or `masksc embed DATA --model DIR -o OUT.h5ad`"):
        tl.cluster(ad, k=3)
    with pytest.raises(DataError, match="tl.cluster"):
        tl.evaluate(ad)
    ad.obsm["X_masksc"] = np.zeros((ad.n_obs, 4), np.float32) + np.arange(ad.n_obs)[:, None]
    tl.cluster(ad, k=2)
    with pytest.raises(DataError, match=r"no 'celltype'.* one of \['label'\]"):  # not the clusters themselves
        tl.evaluate(ad, label_key="celltype")
    with pytest.raises(DataError, match=r"on the command line \(or pass use_rep= \(--use-rep\) one of \['X_masksc'\]\)"):
        tl.cluster(ad, k=2, use_rep="X_other")
    del ad.obsm["X_masksc"]
    with pytest.raises(DataError, match=r"`masksc embed DATA --model DIR -o OUT.h5ad` on the command line\.$"):
        tl.cluster(ad, k=2)  # no "one of []" to pick from


def test_evaluate_warns_when_the_clusters_were_made_from_another_embedding(fitted, tmp_path):
    """After tl.cluster(use_rep="X_other"), evaluate's silhouette is of X_masksc (use_rep's
    default), which said nothing: a score of an embedding the clusters were not made from."""
    from sklearn.metrics import silhouette_score
    adata, _, _, _ = fitted
    ad = adata.copy()
    rng = np.random.default_rng(0)
    ad.obsm["X_masksc"] = rng.normal(size=(ad.n_obs, 4)).astype(np.float32)
    ad.obsm["X_other"] = (np.eye(3)[ad.obs["label"].cat.codes] * 5 + rng.normal(size=(ad.n_obs, 3))).astype(np.float32)
    tl.cluster(ad, k=3, use_rep="X_other")
    pred = ad.obs["masksc_cluster"].to_numpy()
    with pytest.warns(UserWarning, match=r"the clusters in adata.obs\['masksc_cluster'\] were made from "
                                         r"adata.obsm\['X_other'\] .* pass use_rep='X_other' \(--use-rep X_other\)"):
        scores = tl.evaluate(ad, silhouette_sample=None)
    assert scores["silhouette"] == pytest.approx(silhouette_score(ad.obsm["X_masksc"], pred), abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tl.evaluate(ad, use_rep="X_other", silhouette_sample=None)["silhouette"] == \
            pytest.approx(silhouette_score(ad.obsm["X_other"], pred), abs=1e-5)
        tl.cluster(ad, k=2, key_added="other")  # another column clustered since: the record of the first is kept
    tl.cluster(ad, k=3, use_rep="X_other", key_added="a/b")  # a "/" in an uns key became nested h5 groups
    ad.write_h5ad(tmp_path / "clustered.h5ad")  # and read back
    ad = anndata.read_h5ad(tmp_path / "clustered.h5ad")
    for key in ("masksc_cluster", "a/b"):
        with pytest.warns(UserWarning, match=rf"obs\['{key}'\] were made from adata.obsm\['X_other'\]"):
            tl.evaluate(ad, cluster_key=key, silhouette_sample=None)
    earlier = ad.copy()  # a record of a release before made_from names its last column alone
    earlier.uns["masksc"]["cluster"] = {"key": "masksc_cluster", "use_rep": "X_other", "n_clusters": 3}
    with pytest.warns(UserWarning, match=r"made from adata.obsm\['X_other'\]"):
        tl.evaluate(earlier, silhouette_sample=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ad.obs["masksc_cluster"] = pd.Categorical((np.arange(ad.n_obs) % 5).astype(str))  # rewritten by another tool
        tl.evaluate(ad, silhouette_sample=None)  # its 5 clusters are not the 3 recorded: no advice about X_other
        del ad.obsm["X_other"]  # nothing to point to
        tl.evaluate(ad, silhouette_sample=None)


def test_clusters_never_replace_the_users_columns_nor_score_against_themselves(fitted):
    adata, _, _, _ = fitted
    ad = adata.copy()
    ad.obsm["X_masksc"] = sp.csr_matrix(np.eye(3, dtype=np.float32)[ad.obs["label"].cat.codes] * 5)  # sparse is read
    truth = ad.obs["label"].copy()
    with pytest.raises(DataError, match=r"obs\['label'\] exists and was not written by masksc.tl.cluster"):
        tl.cluster(ad, k=3, key_added="label")
    assert ad.obs["label"].equals(truth)
    tl.cluster(ad, k=3, key_added="mine")
    tl.cluster(ad, k=3, key_added="other")
    tl.cluster(ad, k=2, key_added="mine")  # a column it wrote, if not last: replaced
    assert ad.obs["mine"].nunique() == 2
    assert tl.evaluate(ad, cluster_key="mine")["ari"] < 1.0
    with pytest.raises(DataError, match="scored against themselves"):
        tl.evaluate(ad, label_key="mine", cluster_key="mine")
    tl.cluster(ad, k=3)
    assert tl.evaluate(ad)["ari"] == pytest.approx(1.0)  # three separated points per type: exact
    with pytest.raises(DataError, match="MaskSCModel or the directory"):
        tl.embed(ad, None)


def test_fit_refuses_nan_input():
    adata = synthetic(60, n_genes=300, n_types=2, seed=2)
    X = adata.X.tocsr(copy=True)
    X.data[0] = np.nan
    adata.X = X
    with pytest.raises(DataError, match="NaN"):
        tl.fit(adata, "demo", epochs=1, progress=False, **TINY)


def test_tl_refuses_paths_and_bare_matrices_before_any_work(tmp_path, fitted):
    adata, _, model, _ = fitted
    path = tmp_path / "cells.h5ad"
    adata[:50].copy().write_h5ad(path)
    with pytest.raises(DataError, match=r"tl.fit takes an AnnData.*masksc.read\(path\).*`masksc fit"):
        tl.fit(str(path), "demo", model_dir=tmp_path / "m", epochs=1, progress=False, **TINY)
    assert not (tmp_path / "m").exists()  # refused before training, not after
    with pytest.raises(DataError, match=r"tl.embed takes an AnnData.*embed_file"):
        tl.embed(path, model, progress=False)
    for matrix in (adata.X, adata.X.toarray()):
        with pytest.raises(DataError, match=r"got a \w+; fix: wrap .* as anndata.AnnData\(X\)"):
            tl.fit(matrix, "demo", model_dir=tmp_path / "m", epochs=1, progress=False, **TINY)
        with pytest.raises(DataError, match=r"anndata.AnnData\(X\)"):
            tl.embed(matrix, model, progress=False)
    with pytest.raises(DataError, match="cluster_embedding"):
        tl.cluster(np.zeros((10, 4), np.float32), k=2)
    assert not (tmp_path / "m").exists()


def test_tl_refuses_anndata_without_x(tmp_path, fitted):
    adata, _, model, _ = fitted
    empty = adata[:20].copy()
    empty.X = None
    with pytest.raises(DataError, match="no X matrix; fix: set adata.X"):
        tl.fit(empty, "demo", model_dir=tmp_path / "m", epochs=1, progress=False, **TINY)
    with pytest.raises(DataError, match="no X matrix; fix: set adata.X"):
        tl.embed(empty, model, progress=False)
    assert "X_masksc" not in empty.obsm and not (tmp_path / "m").exists()


def test_fit_names_unknown_config_fields(tmp_path):
    adata = synthetic(60, n_genes=300, n_types=2, seed=3)
    with pytest.raises(ValueError, match=r"unknown MaskSCConfig field\(s\) \['bogus'\]; fix: use one of"):
        tl.fit(adata, "demo", model_dir=tmp_path / "m", epochs=1, progress=False, bogus=1, **TINY)
    assert not (tmp_path / "m").exists() and "masksc" not in adata.uns


def test_fewer_cells_than_n_neighbors_lower_it_as_scanpy_does():
    """On 10 cells the default 15 neighbours (or any number over 10) become scanpy's 1 + 10 // 2
    with a warning, and the graph is the one sc.pp.neighbors builds there; a value below 2 is
    still refused."""
    import scanpy as sc
    ad = synthetic(10, n_genes=20, n_types=2, seed=4)
    ad.obsm["X_masksc"] = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"n_neighbors=15 is more than the 10 cells; lowered to 6"):
        tl.cluster(ad)
    assert ad.obs["masksc_cluster"].nunique() == ad.uns["masksc"]["cluster"]["n_clusters"]
    ref = ad.copy()
    sc.pp.neighbors(ref, n_neighbors=15, use_rep="X_masksc")
    assert ad.uns["masksc_neighbors"]["params"]["n_neighbors"] == ref.uns["neighbors"]["params"]["n_neighbors"] == 6
    np.testing.assert_allclose(ad.obsp["masksc_neighbors_connectivities"].toarray(),
                               ref.obsp["connectivities"].toarray(), atol=1e-4)
    with pytest.warns(UserWarning, match=r"n_neighbors=40 .* lowered to 6"):
        tl.neighbors(ad, n_neighbors=40, key_added="wide")
    assert ad.uns["wide"]["params"]["n_neighbors"] == 6
    with pytest.raises(DataError, match=r"must be an integer in \[2, n_cells=10\], got 1"):
        tl.neighbors(ad, n_neighbors=1, key_added="one")
    one = ad[:1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lowered to 1" before the refusal
        with pytest.raises(DataError, match=r"^a kNN graph needs at least 2 cells, got 1; fix: pass at least 2 "):
            tl.cluster(one)


def test_cluster_refuses_kmeans_arguments_under_leiden(fitted):
    ad = fitted[0][:60].copy()
    ad.obsm["X_masksc"] = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    with pytest.raises(TypeError, match=r"\['n_init'\] are k-means arguments"):
        tl.cluster(ad, n_init=3)
    assert "masksc_cluster" not in ad.obs
    tl.cluster(ad, k=2, n_init=3)
    assert ad.obs["masksc_cluster"].nunique() == 2


def test_cluster_refuses_a_misspelt_setting_before_building_a_graph_and_records_its_settings():
    ad = synthetic(60, n_genes=20, n_types=2, seed=4)
    ad.obsm["X_masksc"] = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    with pytest.raises(TypeError, match=r"\['resolutoin'\] \(resolutoin: did you mean 'resolution'\?\)"):
        tl.cluster(ad, resolutoin=0.3)
    assert "masksc_neighbors" not in ad.uns and "masksc_cluster" not in ad.obs  # refused before any search
    with pytest.raises(TypeError, match=r"\['graph'\]; clustering takes \['method', 'n_neighbors'") as exc:
        tl.cluster(ad, graph=None)  # tl.cluster's graphs are named by neighbors_key
    assert "did you mean" not in str(exc.value) and "'graph'" not in str(exc.value).split("takes")[1]
    tl.cluster(ad, resolution=0.3, n_neighbors=10)
    assert ad.uns["masksc"]["cluster"]["settings"] == {"method": "leiden", "resolution": 0.3, "n_neighbors": 10}
    tl.cluster(ad)
    assert ad.uns["masksc"]["cluster"]["settings"] == {"method": "leiden", "resolution": 1.0}
    tl.cluster(ad, k=2, n_init=3)
    assert ad.uns["masksc"]["cluster"]["settings"] == {"method": "kmeans", "n_init": 3}


def test_leiden_with_k_records_the_resolution_its_search_found():
    """Leiden asked for k clusters records the resolution leiden_for_k settled on (the one that
    gives these clusters again), not a default it never used."""
    ad = synthetic(90, n_genes=20, n_types=3, seed=4)
    ad.obsm["X_masksc"] = np.random.default_rng(2).normal(size=(90, 4)).astype(np.float32)
    tl.cluster(ad, k=4, method="leiden", seed=1)
    recorded = ad.uns["masksc"]["cluster"]["settings"]
    graph = ad.obsp[ad.uns["masksc_neighbors"]["connectivities_key"]]
    labels, resolution = cluster.leiden_for_k(graph, 4, seed=1)
    assert recorded == {"method": "leiden", "resolution": resolution} and resolution != cluster.LEIDEN_RESOLUTION
    np.testing.assert_array_equal(ad.obs["masksc_cluster"].astype(int).to_numpy(), labels)
    again = cluster.leiden(graph, resolution=recorded["resolution"], seed=1)
    assert len(np.unique(again)) == 4
    with pytest.raises(TypeError, match=r"resolution=0.5 would be ignored: with k=4 Leiden searches"):
        tl.cluster(ad, k=4, method="leiden", resolution=0.5)
    with pytest.raises(TypeError, match=r"\['n_neighbors', 'resolution'\] are Leiden's settings, but k-means"):
        tl.cluster(ad, k=4, n_neighbors=5, resolution=0.5)
    del ad.uns["masksc_neighbors"]
    for bad in ({"resolution": 0.5}, {"n_init": 3}):  # refused before a graph is built and stored
        with pytest.raises(TypeError):
            tl.cluster(ad, k=4, method="leiden", **bad)
        assert "masksc_neighbors" not in ad.uns
    with pytest.raises(TypeError, match="did you mean 'resolution'"):
        cluster.cluster_graph(graph, resolutoin=2)
    for resolution in (np.inf, np.nan, 0.0, -1.0):  # inf put every cell in a cluster of its own
        with pytest.raises(ValueError, match=rf"resolution must be a finite number > 0, got {resolution}; fix: e\.g\."):
            tl.cluster(ad, resolution=resolution)
        assert "masksc_neighbors" not in ad.uns
        with pytest.raises(ValueError, match="resolution must be a finite number > 0"):
            cluster.leiden(graph, resolution=resolution)


def test_counts_layer_trains_and_embeds_as_counts_in_x(fitted, tmp_path):
    """scanpy's usual layout (log data in X, counts in layers["counts"]): layer="counts" gives the
    model and embedding that the same counts in X give, and X is left as it was."""
    import scanpy as sc
    counts = synthetic(240, n_genes=300, n_types=3, seed=1)
    layered = counts.copy()
    layered.layers["counts"] = counts.X.copy()
    sc.pp.normalize_total(layered, target_sum=1e4)
    sc.pp.log1p(layered)
    log_x = layered.X.copy()
    from_layer = tl.fit(layered, "demo", layer="counts", epochs=2, progress=False, **TINY)
    assert (layered.X != log_x).nnz == 0 and layered.uns["masksc"]["fit"]["layer"] == "counts"
    _, _, from_x, _ = fitted  # the same cells, counts in X, same preset and seed
    tl.embed(layered, from_layer, layer="counts", progress=False)
    np.testing.assert_allclose(layered.obsm["X_masksc"], from_x.embed(counts, progress=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="non-integer .* layer='counts'") as exc:
        tl.embed(layered, from_layer, progress=False)  # X holds log values, the model wants counts
    assert str(exc.value).endswith("Note: this model was fitted on the layer 'counts' (raw counts), and X was read "
                                   "here; to read the same, pass layer='counts' (--layer counts) for an AnnData or "
                                   ".h5ad; other files hold only X, which must then hold raw counts.")
    with pytest.raises(CheckpointError, match="missing from the data") as exc:
        tl.embed(layered[:, 10:], from_layer, progress=False)
    assert "Note" not in str(exc.value)  # a layer has X's genes: reading it would not bring the missing ones
    with pytest.raises(DataError, match="holds no cells; fix: pass a dataset with cells.$"):
        from_layer.embed_file(layered[:0], tmp_path / "none.npy", progress=False)  # not about the matrix: no note
    saved = MaskSCModel.load(from_layer.save(tmp_path / "layer_model"))
    assert saved.fitted_input == from_layer.fitted_input == {"layer": "counts", "use_raw": False}
    assert from_x.fitted_input == {"layer": None, "use_raw": False}
    with pytest.raises(DataError, match=r"no layer 'raw'; fix: pass one of \['counts'\]"):
        tl.fit(layered, "demo", layer="raw", progress=False, **TINY)


def test_a_log_model_checks_new_data_as_fitting_checks_it(tmp_path):
    """Normalised values never logged, and log1p of counts never normalised, were embedded by a
    model fitted on log-normalised values without a word (embeddings off by up to 1.9); fitting
    refuses the one and warns about the other. Values over 30 were called raw counts."""
    import anndata as ad
    import scanpy as sc
    counts = synthetic(240, n_genes=300, n_types=3, seed=1)
    log = counts.copy()
    sc.pp.normalize_total(log, target_sum=1e4)
    sc.pp.log1p(log)
    model = tl.fit(log, "demo", epochs=1, progress=False, teacher_overrides={"epochs": 1}, **TINY)
    never_logged = counts.copy()
    sc.pp.normalize_total(never_logged, target_sum=20)
    never_logged.write_h5ad(tmp_path / "never_logged.h5ad")
    for embed in (lambda: tl.embed(never_logged, model, progress=False),
                  lambda: model.embed_file(tmp_path / "never_logged.h5ad", tmp_path / "z.npy", chunk_size=50,
                                           progress=False)):
        with pytest.raises(DataError, match=r"looks normalised but not log-transformed \(every cell sums to 20\); "
                                            r"fix: sc\.pp\.log1p it first, as the training data was\."):
            embed()
    assert sorted(os.listdir(tmp_path)) == ["never_logged.h5ad"]
    with pytest.raises(DataError, match="looks normalised but not log-transformed"):  # chunks of 5: the first cells
        list(model.preprocessor.transform_chunks(never_logged, chunk_size=5))      # are gathered, not skipped
    never_normalised = counts.copy()
    sc.pp.log1p(never_normalised)
    never_normalised.write_h5ad(tmp_path / "never_normalised.h5ad")
    with warnings.catch_warnings(record=True) as caught:  # a streamed fit said it thrice, twice as for new data
        warnings.simplefilter("always")
        tl.fit(ad.read_h5ad(tmp_path / "never_normalised.h5ad", backed="r"), "demo", epochs=1, progress=False,
               teacher_overrides={"epochs": 1}, **TINY)
    said = [str(w.message) for w in caught if "expm1 of its values gives whole numbers" in str(w.message)]
    assert len(said) == 1 and "pass the raw counts" in said[0], said
    with pytest.warns(UserWarning, match=r"expm1 of its values gives whole numbers.*fix: then sc\.pp\.normalize_total "
                                         r"before sc\.pp\.log1p, as for the training data"):
        tl.embed(never_normalised, model, progress=False)
    big = counts.copy()
    sc.pp.normalize_total(big, target_sum=200)
    with pytest.raises(DataError, match=r"look like raw counts or normalised values never logged, but the "
                                        r"preprocessor was fitted on log-normalised data"):
        tl.embed(big, model, progress=False)
    tl.embed(log, model, progress=False)  # the training data's kind passes
    from masksc import pipeline  # a resumed streamed fit reads new data too: it is checked (it was not)
    log.write_h5ad(tmp_path / "log.h5ad")
    run = tmp_path / "run"
    pipeline.fit(tmp_path / "log.h5ad", "demo", model_dir=run, epochs=2, checkpoint_every=1, progress=False,
                 teacher_overrides={"epochs": 1}, **TINY)
    shutil.rmtree(run / "epoch-000002")
    os.unlink(run / "last")
    os.symlink("epoch-000001", run / "last")
    with pytest.raises(DataError, match="looks normalised but not log-transformed"):
        pipeline.fit(tmp_path / "never_logged.h5ad", "demo", model_dir=run, epochs=2, checkpoint_every=1,
                     resume=True, progress=False, teacher_overrides={"epochs": 1}, **TINY)
    told = Preprocessor(n_top_genes=100, input="log").fit(never_logged)  # the user's word: fit and embed take it
    told.transform(never_logged)


def test_genes_named_otherwise_in_raw_point_to_raw_var_without_a_note_to_drop_use_raw():
    """The same in .raw (scanpy's layout: counts in .raw, processed X): the pointer was left out,
    and a model fitted on X added a note to drop use_raw, which would read the processed X."""
    data = synthetic(240, n_genes=300, n_types=3, seed=1)
    data.var_names = [f"SYM{i}" for i in range(data.n_vars)]
    model = tl.fit(data, "demo", epochs=1, progress=False, **TINY)  # fitted on X
    ens = data.copy()
    ens.var["symbol"] = list(ens.var_names)
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    ens.raw = ens.copy()
    ens.X = ens.X * 0.1
    with pytest.raises(CheckpointError, match=r"The column adata\.raw\.var\['symbol'\] holds the model's genes: to "
                                              r"match by it, raw = adata\.raw\.to_adata\(\); raw\.var_names = "
                                              r"raw\.var\['symbol'\]\.astype\(str\); raw\.var_names_make_unique\(\); "
                                              r"adata\.raw = raw\.$"):
        tl.embed(ens, model, use_raw=True, progress=False)
    raw = ens.raw.to_adata()
    raw.var_names = raw.var["symbol"].astype(str)
    raw.var_names_make_unique()
    ens.raw = raw
    tl.embed(ens, model, use_raw=True, progress=False)
    np.testing.assert_allclose(ens.obsm["X_masksc"], model.embed(data, progress=False), rtol=1e-6)


def test_genes_named_otherwise_point_to_the_var_column_that_names_them(tmp_path):
    """Ensembl IDs as var_names with the model's symbols in a var column: the refusal names that
    column and code that matches by it, and following it embeds as the symbol-named data does."""
    data = synthetic(240, n_genes=300, n_types=3, seed=1)
    data.var_names = [f"SYM{i}" for i in range(data.n_vars)]
    model = tl.fit(data, "demo", epochs=1, progress=False, **TINY)
    ens = data.copy()
    ens.var["gene_symbols"] = pd.Categorical(ens.var_names)
    ens.var["n_cells"] = 1
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    with pytest.raises(CheckpointError, match=r"missing from the data.*The column var\['gene_symbols'\] holds the "
                                              r"model's genes: to match by it, adata.var_names = adata.var\["
                                              r"'gene_symbols'\].astype\(str\)"):
        tl.embed(ens, model, progress=False)
    ens.write_h5ad(tmp_path / "ens.h5ad")
    # streamed too (it gave no pointer)
    for source in (ens, anndata.read_h5ad(tmp_path / "ens.h5ad", backed="r"), tmp_path / "ens.h5ad"):
        with pytest.raises(CheckpointError, match=r"The column var\['gene_symbols'\] holds the model's genes"):
            model.embed_file(source, tmp_path / "e.npy", progress=False)
    ens.var_names = ens.var["gene_symbols"].astype(str)
    tl.embed(ens, model, progress=False)
    np.testing.assert_allclose(ens.obsm["X_masksc"], model.embed(data, progress=False), rtol=1e-6)
    ens.var_names = [f"ENSG{i:011d}" for i in range(ens.n_vars)]
    with pytest.raises(CheckpointError) as exc:
        tl.embed(ens[:, :0].copy(), model, progress=False)
    assert "The column" not in str(exc.value)  # no column names the genes: no pointer
    fewer = data[:, 120:].copy()
    fewer.var["same"] = fewer.var_names  # names no more genes than var_names do: no pointer either
    with pytest.raises(CheckpointError) as exc:
        tl.embed(fewer, model, progress=False)
    assert "The column" not in str(exc.value)


def test_evaluate_names_cells_without_a_cluster():
    ad = synthetic(60, n_genes=20, n_types=2, seed=4)
    ad.obsm["X_masksc"] = np.random.default_rng(1).normal(size=(60, 4)).astype(np.float32)
    tl.cluster(ad, k=2)
    ad.obs.loc[ad.obs_names[:5], "masksc_cluster"] = np.nan  # as ad.concat leaves unclustered cells
    with pytest.raises(DataError, match=r"5 of 60 cells have no cluster in adata.obs\['masksc_cluster'\].*fix: run "
                                        r"masksc.tl.cluster on this object"):
        tl.evaluate(ad, "label")
    scores = tl.evaluate(ad[ad.obs["masksc_cluster"].notna()].copy(), "label")  # the fix it names works
    assert 0 <= scores["nmi"] <= 1


def test_errors_name_the_layer_or_raw_that_was_read_not_x(fitted, tmp_path):
    """A bad value in layers['counts'] or .raw is reported against that matrix, in memory and
    streamed from an .h5ad, in fit and embed; X's own errors still say X."""
    import anndata as ad
    _, _, model, _ = fitted
    cells = synthetic(240, n_genes=300, n_types=3, seed=1)
    layered = ad.AnnData(np.log1p(cells.X.toarray()), obs=cells.obs, var=cells.var)
    bad = cells.X.toarray()
    bad[7, 3] = np.nan
    layered.layers["counts"] = bad
    with pytest.raises(DataError, match=r"^adata\.layers\['counts'\] contains 1 NaN"):
        tl.fit(layered, "demo", layer="counts", epochs=1, progress=False, **TINY)
    with pytest.raises(DataError, match=r"^adata\.layers\['counts'\] contains 1 NaN"):
        tl.embed(layered, model, layer="counts", progress=False)
    bad[7, 3] = -1
    layered.layers["counts"] = bad
    layered.write_h5ad(tmp_path / "layered.h5ad")
    with pytest.raises(DataError, match=r"^adata\.layers\['counts'\] contains 1 negative values .* in cells 0\.\.239"):
        model.embed_file(tmp_path / "layered.h5ad", tmp_path / "z.npy", layer="counts", progress=False)
    layered.layers["counts"] = cells.X.toarray() * 0.5
    with pytest.raises(DataError, match=r"^adata\.layers\['counts'\] holds non-integer values .*, the first in cell "
                                        r"0 \(cell_0000\) where raw counts are required; fix: pass the raw count "
                                        r"matrix; log-normalised"):
        tl.embed(layered, model, layer="counts", progress=False)  # a model of counts
    with_raw = ad.AnnData(cells.X.toarray(), obs=cells.obs, var=cells.var)
    with_raw.raw = ad.AnnData(bad, var=cells.var)
    with pytest.raises(DataError, match=r"^adata\.raw\.X contains 1 negative values"):
        tl.embed(with_raw, model, use_raw=True, progress=False)
    with_raw.X[7, 3] = np.inf
    with pytest.raises(DataError, match=r"^X contains 0 NaN and 1 infinite values"):
        tl.embed(with_raw, model, progress=False)


def test_use_raw_reads_log_values_beside_scaled_x(fitted, tmp_path):
    """scanpy's usual layout (log values in .raw, scaled X): use_raw=True trains and embeds on
    .raw; scaled X alone is refused with that fix."""
    import anndata as ad
    import scanpy as sc
    counts = synthetic(240, n_genes=300, n_types=3, seed=1)
    sc.pp.normalize_total(counts, target_sum=1e4)
    sc.pp.log1p(counts)
    log_x = counts.copy()
    counts.raw = counts
    sc.pp.scale(counts)
    with pytest.raises(DataError, match=r"negative \(scaled\) values and \.raw is set.*"
                                        r"tl\.(fit|embed)\(\.\.\., use_raw=True\)"):
        tl.fit(counts, "demo", epochs=2, progress=False, **TINY)
    from_raw = tl.fit(counts, "demo", use_raw=True, epochs=2, progress=False, **TINY)
    from_log = tl.fit(log_x, "demo", epochs=2, progress=False, **TINY)
    tl.embed(counts, from_raw, use_raw=True, progress=False)
    np.testing.assert_allclose(counts.obsm["X_masksc"], from_log.embed(log_x, progress=False), rtol=1e-5, atol=1e-6)
    assert counts.uns["masksc"]["fit"]["use_raw"] is True
    with pytest.raises(DataError, match="use_raw=True but adata.raw is None"):
        tl.embed(ad.AnnData(log_x.X, var=log_x.var), from_log, use_raw=True, progress=False)
    # the attention maps read .raw alike, and the same file opened backed gets the same hint
    np.testing.assert_allclose(from_raw.attention_maps(counts[:4], use_raw=True), from_log.attention_maps(log_x[:4]),
                               rtol=1e-5, atol=1e-7)
    counts.write_h5ad(tmp_path / "layout.h5ad")
    backed = ad.read_h5ad(tmp_path / "layout.h5ad", backed="r")
    for data in (counts, backed):  # the fix is the model's own matrix, as model.embed names it
        with pytest.raises(DataError, match=r"^X holds negative \(scaled\) values and \.raw is set; fix: read "
                                            r"adata\.raw \(log-normalised values\), which this model was fitted on: "
                                            r"pass use_raw=True \(--use-raw\)\.$"):
            tl.embed(data, from_raw, progress=False)
        with pytest.raises(DataError, match=r"^X holds negative \(scaled\) values and \.raw is set; fix: use_raw=True "
                                            r"\(--use-raw\) to read \.raw's log-normalised values, the kind this model "
                                            r"was fitted on, or layer= \(--layer\) a layer of them\.$"):
            tl.embed(data, from_log, progress=False)
        with pytest.raises(DataError, match=r"^X holds negative \(scaled\) values and \.raw is set; fix: this model "
                                            r"was fitted on raw counts, .*: read a layer of raw counts"):
            tl.embed(data, fitted[2], progress=False)  # .raw's log values will not do: not use_raw=True
    for step in (lambda: tl.embed(backed[:20], from_raw, use_raw=True, progress=False),
                 lambda: tl.fit(backed[:20], "demo", use_raw=True, epochs=1, progress=False, **TINY)):
        with pytest.raises(DataError, match=r"this is a view \(20 cells x 300 genes\) of the backed file"):
            step()  # not anndata's "cannot index repeatedly into a backed AnnData"
    tl.embed(backed, from_raw, use_raw=True, progress=False)
    np.testing.assert_allclose(backed.obsm["X_masksc"], counts.obsm["X_masksc"], rtol=1e-5, atol=1e-6)


def test_steps_on_a_view_keep_their_record(fitted):
    adata, _, model, _ = fitted
    view = adata[:100]
    with pytest.warns(UserWarning):  # anndata's ImplicitModificationWarning: the view becomes a copy
        tl.embed(view, model, progress=False)
    assert not view.is_view and view.uns["masksc"]["embed"]["key"] == "X_masksc"
    assert "X_masksc" in view.obsm


def test_cluster_categories_in_numeric_order():
    rng = np.random.default_rng(0)
    import anndata as ad
    a = ad.AnnData(obs={"i": np.arange(600)})
    a.obsm["X_masksc"] = (rng.normal(size=(600, 2)) + 20 * np.repeat(np.arange(12), 50)[:, None]).astype(np.float32)
    tl.cluster(a, k=12)
    assert list(a.obs["masksc_cluster"].cat.categories) == [str(i) for i in range(12)]


def test_evaluate_leaves_out_unlabelled_cells_and_records_its_keys(fitted):
    adata, _, model, _ = fitted
    ad_ = adata.copy()
    tl.embed(ad_, model, progress=False)
    tl.cluster(ad_, k=3)
    truth = ad_.obs["label"].astype(object).to_numpy()
    truth[:20] = np.nan
    ad_.obs["partial"] = truth
    with pytest.warns(UserWarning, match="20 of 240 cells have no 'partial' label"):
        scores = tl.evaluate(ad_, label_key="partial")
    pred = ad_.obs["masksc_cluster"].to_numpy()
    assert scores["ari"] == pytest.approx(adjusted_rand_score(truth[20:].astype(str), pred[20:]))
    rec = ad_.uns["masksc"]["metrics"]
    assert (rec["label_key"], rec["cluster_key"], rec["use_rep"], rec["n_labelled"]) == \
        ("partial", "masksc_cluster", "X_masksc", 220)
    assert (rec["silhouette_cells"], rec["silhouette_seed"]) == (240, 0)  # every cell
    Z, pred = ad_.obsm["X_masksc"], ad_.obs["masksc_cluster"].to_numpy()
    for sample in (100, None):  # the record, passed back, gives the same silhouette
        again = tl.evaluate(ad_, label_key=None, silhouette_sample=sample, seed=np.int64(3))
        rec = ad_.uns["masksc"]["metrics"]
        assert (rec["silhouette_cells"], rec["silhouette_seed"]) == (sample or 240, 3)
        assert type(rec["silhouette_seed"]) is int
        assert again["silhouette"] == cluster.evaluate(Z, pred, silhouette_sample=rec["silhouette_cells"],
                                                       seed=rec["silhouette_seed"])["silhouette"]
    # a sample holding one cluster has no silhouette, though every cell has two: passed back, the same None
    ad_.obs["few"] = pd.Categorical(["a"] * 238 + ["b"] * 2)
    assert tl.evaluate(ad_, label_key=None, cluster_key="few", silhouette_sample=3)["silhouette"] is None
    rec = ad_.uns["masksc"]["metrics"]
    assert tl.evaluate(ad_, label_key=None, cluster_key="few", silhouette_sample=rec["silhouette_cells"],
                       seed=rec["silhouette_seed"])["silhouette"] is None
    ad_.obs["none"] = np.full(240, np.nan)
    with pytest.raises(DataError, match="no cell has a 'none' label"):
        tl.evaluate(ad_, label_key="none")


def test_fit_leaves_the_notebooks_global_generators_as_they_were(tmp_path):
    """tl.fit reset python's, numpy's and torch's global generators to its seed, so draws after it
    were the same whatever the notebook had seeded; scanpy's tools leave them alone."""
    import random

    import torch
    adata = synthetic(120, n_genes=300, n_types=3, seed=2)
    draws = []
    for user_seed in (123, 456):
        random.seed(user_seed), np.random.seed(user_seed), torch.manual_seed(user_seed)
        expected = (random.random(), np.random.rand(), torch.rand(1).item())
        random.seed(user_seed), np.random.seed(user_seed), torch.manual_seed(user_seed)
        tl.fit(adata, "demo", model_dir=tmp_path / str(user_seed), epochs=1, progress=False, **TINY)
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
        assert draws[-1] == expected
    assert draws[0] != draws[1]


def test_model_repr_says_what_it_is(fitted):
    _, _, model, model_dir = fitted
    assert repr(model) == (f"MaskSCModel({len(model.genes)} genes on a 16x16 grid, 4x4 patches, D=32, depth 1, "
                           f"2 epochs, pool='mean', embedding_dim=32, path={model.path!r})")
    assert str(model_dir) in model.path


def test_embed_from_a_directory_loads_where_fit_and_the_cli_run(fitted, monkeypatch):
    """A model directory is loaded onto CUDA when there is a GPU (as `masksc embed` and tl.fit
    choose), onto the device asked for otherwise, and a bad device is named before loading."""
    import torch
    adata, _, model, model_dir = fitted
    loaded_on = []
    real_load = MaskSCModel.load

    def spy(path, device="cpu"):
        loaded_on.append(torch.device(device))
        return real_load(path, device="cpu")  # this machine may have no GPU

    monkeypatch.setattr(MaskSCModel, "load", staticmethod(spy))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ad = adata[:20].copy()
    tl.embed(ad, model_dir, progress=False)
    tl.embed(ad, model_dir, device="cpu", progress=False, key_added="X_cpu")
    assert loaded_on == [torch.device("cuda"), torch.device("cpu")]
    np.testing.assert_array_equal(ad.obsm["X_masksc"], ad.obsm["X_cpu"])
    with pytest.raises(ValueError, match="device 'gpu'.*fix: pass cpu, cuda"):
        tl.embed(ad, model_dir, device="gpu", progress=False)
    assert len(loaded_on) == 2


def _blob_adata(n=300, seed=0):
    """An AnnData with a 3-blob embedding in obsm["X_masksc"] and its blob in obs["label"]."""
    import anndata
    rng = np.random.default_rng(seed)
    blob = np.repeat(np.arange(3), n // 3)
    a = anndata.AnnData(obs={"label": blob.astype(str)})
    a.obsm["X_masksc"] = (rng.normal(size=(n, 8)) + 6.0 * np.eye(8)[blob]).astype(np.float32)
    return a


def test_neighbors_stores_scanpys_graph_which_scanpy_tools_read(tmp_path):
    """tl.neighbors writes the graph scanpy's pp.neighbors computes from the same embedding (exact
    kNN at this size, UMAP weights), under scanpy's layout, so sc.tl.umap / sc.tl.leiden take it
    by neighbors_key, and it survives an .h5ad round trip."""
    import anndata
    import scanpy as sc
    a = _blob_adata()
    assert tl.neighbors(a, n_neighbors=15) is None
    ref = a.copy()
    sc.pp.neighbors(ref, n_neighbors=15, use_rep="X_masksc")
    stored = a.uns["masksc_neighbors"]
    assert stored["connectivities_key"] == "masksc_neighbors_connectivities"
    assert stored["params"]["n_neighbors"] == 15 and stored["params"]["use_rep"] == "X_masksc"
    conn, dist = a.obsp["masksc_neighbors_connectivities"], a.obsp["masksc_neighbors_distances"]
    np.testing.assert_allclose(conn.toarray(), ref.obsp["connectivities"].toarray(), atol=1e-4)
    np.testing.assert_array_equal((dist > 0).toarray(), (ref.obsp["distances"] > 0).toarray())
    np.testing.assert_allclose(dist.toarray(), ref.obsp["distances"].toarray(), rtol=1e-4, atol=1e-5)
    sc.tl.umap(a, neighbors_key="masksc_neighbors", random_state=0)
    sc.tl.leiden(a, neighbors_key="masksc_neighbors", flavor="igraph", n_iterations=2, random_state=0)
    assert a.obsm["X_umap"].shape == (300, 2) and adjusted_rand_score(a.obs["label"], a.obs["leiden"]) == 1.0
    a.write_h5ad(tmp_path / "g.h5ad")
    back = anndata.read_h5ad(tmp_path / "g.h5ad")
    assert (back.obsp["masksc_neighbors_connectivities"] != conn).nnz == 0
    assert back.uns["masksc_neighbors"]["params"]["computed_by"] == "masksc"


def test_neighbors_never_replaces_a_graph_masksc_did_not_compute():
    import scanpy as sc
    a = _blob_adata()
    sc.pp.neighbors(a, n_neighbors=10, use_rep="X_masksc")
    theirs = a.obsp["connectivities"].copy()
    with pytest.raises(DataError, match=r"adata.uns\['neighbors'\].*masksc did not compute.*key_added="):
        tl.neighbors(a, key_added="neighbors")
    assert (a.obsp["connectivities"] != theirs).nnz == 0
    b = _blob_adata()
    tl.neighbors(b, key_added="neighbors", n_neighbors=10)  # scanpy's default keys, then sc.tl.umap(b) as is
    tl.neighbors(b, key_added="neighbors", n_neighbors=12)  # its own graph it replaces
    assert b.uns["neighbors"]["params"]["n_neighbors"] == 12 and (b.obsp["distances"] > 0).sum(axis=1).max() == 11


def test_leiden_reuses_the_graph_of_this_embedding_and_rebuilds_a_stale_one(monkeypatch):
    """tl.cluster's Leiden stores its graph; a second call with the same embedding and settings
    reuses it (same labels, no search), other settings or a changed embedding rebuild it."""
    a = _blob_adata()
    searches = []
    real = cluster.knn_search
    monkeypatch.setattr(cluster, "knn_search", lambda *args, **kw: searches.append(1) or real(*args, **kw))
    tl.cluster(a, seed=1)
    first = a.obs["masksc_cluster"].to_numpy()
    graph = a.obsp["masksc_neighbors_connectivities"]
    expected = cluster.leiden(cluster.knn_graph(a.obsm["X_masksc"], n_neighbors=15, seed=1), seed=1)
    np.testing.assert_array_equal(first, expected.astype(str))
    searches.clear()
    tl.cluster(a, seed=1, resolution=0.5)
    assert searches == [] and a.uns["masksc"]["cluster"]["neighbors_key"] == "masksc_neighbors"
    tl.cluster(a, seed=1, n_neighbors=10)
    assert len(searches) == 1 and a.uns["masksc_neighbors"]["params"]["n_neighbors"] == 10
    a.obsm["X_masksc"] = a.obsm["X_masksc"][::-1].copy()  # re-embedded: same key, other values
    tl.cluster(a, seed=1, n_neighbors=10)
    assert len(searches) == 2
    assert (a.obsp["masksc_neighbors_connectivities"] != graph).nnz > 0
    tl.neighbors(a, 30, seed=1, index="ivf", nprobe=1)  # the user's own graph, under the same key
    assert len(searches) == 3
    tl.cluster(a, seed=2)  # clusters the user's graph as it is, whatever its settings or seed
    assert len(searches) == 3 and a.uns["masksc_neighbors"]["params"]["n_neighbors"] == 30
    assert a.uns["masksc_neighbors"]["params"]["search"] == {"index": "ivf", "nprobe": 1}
    np.testing.assert_array_equal(a.obs["masksc_cluster"].to_numpy(),
                                  cluster.leiden(a.obsp["masksc_neighbors_connectivities"], seed=2).astype(str))
    tl.cluster(a, k=3)
    assert len(searches) == 3 and a.uns["masksc"]["cluster"]["neighbors_key"] is None
    a.obsm["X_other"] = a.obsm["X_masksc"] + 1.0
    with pytest.warns(UserWarning, match=r"replacing the graph .* built from adata.obsm\['X_masksc'\], with one of "
                                         r"adata.obsm\['X_other'\]"):
        tl.cluster(a, use_rep="X_other")
    assert len(searches) == 4 and a.uns["masksc_neighbors"]["params"]["use_rep"] == "X_other"


def test_leiden_rebuilds_its_graph_when_the_record_outlived_the_matrices():
    """uns["masksc_neighbors"] kept while obsp lost its matrices (an AnnData rebuilt without obsp,
    or a graph deleted): tl.cluster builds the graph again, the same one, not a KeyError."""
    import anndata
    a = _blob_adata()
    tl.cluster(a, seed=1)
    first = a.obs["masksc_cluster"].to_numpy()
    rebuilt = anndata.AnnData(a.X, obs=a.obs.drop(columns="masksc_cluster"), obsm=dict(a.obsm), uns=dict(a.uns))
    tl.cluster(rebuilt, seed=1)
    np.testing.assert_array_equal(rebuilt.obs["masksc_cluster"].to_numpy(), first)
    del a.obsp["masksc_neighbors_connectivities"]
    tl.cluster(a, seed=1)
    np.testing.assert_array_equal(a.obs["masksc_cluster"].to_numpy(), first)
    assert "masksc_neighbors_connectivities" in a.obsp
    tl.neighbors(a, n_neighbors=30, metric="cosine", index="flat")  # a graph of the user's settings
    graph = a.obsp["masksc_neighbors_connectivities"].copy()
    del a.obsp["masksc_neighbors_connectivities"], a.obsp["masksc_neighbors_distances"]
    tl.cluster(a, seed=1)  # rebuilt as recorded, not with the defaults
    assert (a.obsp["masksc_neighbors_connectivities"] != graph).nnz == 0
    assert a.uns["masksc_neighbors"]["params"]["n_neighbors"] == 30


def test_neighbors_names_what_it_does_for_scanpys_arguments_and_typos():
    a = _blob_adata()
    for given, match in [({"random_state": 1}, r"\['random_state'\] \(random_state: seed= seeds masksc's index\)"),
                         ({"n_pcs": 10}, r"n_pcs: use_rep's embedding is used whole"),
                         ({"nprob": 4}, r"nprob: did you mean 'nprobe'\?"),
                         ({"method": "umap"}, r"method: masksc's connectivities are always UMAP's")]:
        with pytest.raises(TypeError, match=match):
            tl.neighbors(a, **given)
    assert "masksc_neighbors" not in a.uns


def test_steps_that_store_on_a_backed_view_say_anndata_cannot(tmp_path):
    """cluster / neighbors / evaluate on a view of a backed AnnData: anndata cannot store a result
    there; the refusal says so, not that cells are streamed (that is fit's and embed's reason)."""
    import anndata
    blobs = _blob_adata()
    blobs = anndata.AnnData(np.zeros((blobs.n_obs, 2), np.float32), obs=blobs.obs, obsm=dict(blobs.obsm))
    blobs.write_h5ad(tmp_path / "blobs.h5ad")  # with an X: a backed file without one cannot be sliced at all
    backed = anndata.read_h5ad(tmp_path / "blobs.h5ad", backed="r")
    for step in (lambda v: tl.cluster(v, k=3), tl.neighbors, tl.evaluate):
        with pytest.raises(DataError, match=r"this is a view \(100 cells\) of the backed file .*anndata cannot store "
                                            r"masksc\.tl\.\w+'s result on it .*to_memory\(\) first"):
            step(backed[:100])
    tl.cluster(backed[:100].to_memory(), k=3)
    backed.file.close()


def test_a_stored_masksc_graph_of_an_earlier_embedding_is_refused_not_clustered():
    """tl.neighbors records the embedding's digest: clustering its graph by name after the
    embedding changed (embedded again by another model) names the fix instead of giving the old
    graph's clusters under the new embedding's name."""
    a = _blob_adata()
    tl.neighbors(a, key_added="graph")
    tl.cluster(a, neighbors_key="graph")  # the embedding it was built from: clustered
    a.obsm["X_masksc"] = _blob_adata(seed=1).obsm["X_masksc"]
    with pytest.raises(DataError, match=r"adata.uns\['graph'\] was built from an earlier adata.obsm\['X_masksc'\].*"
                                        r"fix: masksc.tl.neighbors\(adata, use_rep='X_masksc', key_added='graph'\)"):
        tl.cluster(a, neighbors_key="graph")
    tl.neighbors(a, key_added="graph")
    tl.cluster(a, neighbors_key="graph")


def test_cluster_on_a_named_graph_uses_it_as_stored():
    """neighbors_key= makes Leiden cluster that stored graph (here scanpy's), whose labels are
    cluster.leiden's on it; settings that would build a graph, or k-means, are refused."""
    import scanpy as sc
    a = _blob_adata()
    sc.pp.neighbors(a, n_neighbors=8, use_rep="X_masksc")
    tl.cluster(a, neighbors_key="neighbors", seed=2)
    expected = cluster.leiden(a.obsp["connectivities"], seed=2)
    np.testing.assert_array_equal(a.obs["masksc_cluster"].to_numpy(), expected.astype(str))
    assert "masksc_neighbors" not in a.uns
    tl.cluster(a, 3, method="leiden", neighbors_key="neighbors")
    assert a.obs["masksc_cluster"].nunique() == 3
    with pytest.raises(TypeError, match=r"\['n_neighbors'\] set the graph built here"):
        tl.cluster(a, neighbors_key="neighbors", n_neighbors=5)
    with pytest.raises(TypeError, match="k-means clusters here"):
        tl.cluster(a, 3, neighbors_key="neighbors")
    with pytest.raises(DataError, match=r"no 'other' graph; fix: masksc.tl.neighbors\(adata, key_added='other'\)"):
        tl.cluster(a, neighbors_key="other")
    del a.obsm["X_masksc"]  # the named graph is all Leiden needs
    tl.cluster(a, neighbors_key="neighbors", seed=2)
    np.testing.assert_array_equal(a.obs["masksc_cluster"].to_numpy(), expected.astype(str))
    assert a.uns["masksc"]["cluster"]["use_rep"] == "X_masksc"  # the graph's own embedding, from its settings


def test_cluster_names_the_fix_when_its_graph_key_holds_scanpys_graph():
    import scanpy as sc
    a = _blob_adata()
    sc.pp.neighbors(a, n_neighbors=8, use_rep="X_masksc", key_added="masksc_neighbors")
    with pytest.raises(DataError, match=r"adata.uns\['masksc_neighbors'\] and adata.obsp\['masksc_neighbors_"
                                        r"connectivities'\] and .* masksc did not compute, where tl.cluster keeps its "
                                        r"own; fix: neighbors_key='masksc_neighbors'"):
        tl.cluster(a)
    tl.cluster(a, neighbors_key="masksc_neighbors")
    assert a.obs["masksc_cluster"].nunique() >= 3


def test_tl_names_embedding_values_float32_cannot_hold():
    a = _blob_adata()
    big = a.obsm["X_masksc"].astype(np.float64)
    big[4, 0] = 1e39
    a.obsm["X_big"] = big
    for step in (lambda: tl.neighbors(a, use_rep="X_big"), lambda: tl.cluster(a, k=3, use_rep="X_big")):
        with pytest.raises(DataError, match=r"adata.obsm\['X_big'\] has values too large for float32 .* in 1 row"):
            step()


def test_backed_copy_is_refused_before_the_search(tmp_path, monkeypatch):
    import anndata
    a = _blob_adata()
    a.write_h5ad(tmp_path / "b.h5ad")
    backed = anndata.read_h5ad(tmp_path / "b.h5ad", backed="r")
    monkeypatch.setattr(cluster, "knn_search", lambda *args, **kw: pytest.fail("searched before refusing"))
    with pytest.raises(DataError, match="copy=True on an AnnData opened backed"):
        tl.neighbors(backed, copy=True)


def test_copy_returns_a_copy_with_the_result_and_leaves_adata_as_it_was(fitted, tmp_path):
    import anndata
    adata, _, model, _ = fitted
    a = adata[:80].copy()
    uns_before = dict(a.uns)
    embedded = tl.embed(a, model, progress=False, copy=True)
    assert "X_masksc" not in a.obsm and dict(a.uns) == uns_before
    np.testing.assert_array_equal(embedded.obsm["X_masksc"], model.embed(a, progress=False))
    graphed = tl.neighbors(embedded, copy=True)
    assert "masksc_neighbors" in graphed.uns and "masksc_neighbors" not in embedded.uns and not embedded.obsp
    clustered = tl.cluster(embedded, k=3, copy=True)
    assert "masksc_cluster" not in embedded.obs and clustered.obs["masksc_cluster"].nunique() == 3
    assert "cluster" not in embedded.uns["masksc"] and clustered.uns["masksc"]["cluster"]["k"] == 3
    embedded.write_h5ad(tmp_path / "e.h5ad")
    backed = anndata.read_h5ad(tmp_path / "e.h5ad", backed="r")
    with pytest.raises(DataError, match=r"copy=True on an AnnData opened backed.*to_memory\(\)"):
        tl.cluster(backed, k=3, copy=True)


def test_a_float64_embedding_far_from_the_origin_keeps_its_digits_in_tl():
    """tl's graph and silhouette centre a float64 embedding before casting it to float32, as
    masksc.cluster does (its cast alone left recall@15 at 0.45 at an offset of 1e6)."""
    import anndata
    from sklearn.datasets import make_blobs
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors
    Z, y = make_blobs(3000, n_features=16, centers=6, random_state=0)
    Z = 1e6 + Z / np.abs(Z).max() * 0.5
    a = anndata.AnnData(obs=pd.DataFrame({"label": y.astype(str)}, index=[f"c{i}" for i in range(3000)]))
    a.obsm["X_masksc"] = Z
    tl.neighbors(a, n_neighbors=15)
    exact = Z - Z.mean(axis=0)  # the oracle in float64 too, centred: sklearn's |x|^2 + |y|^2 - 2x.y loses the spread
    ref = NearestNeighbors(n_neighbors=15).fit(exact).kneighbors(exact, return_distance=False)
    found = a.obsp["masksc_neighbors_distances"]
    recall = np.mean([len(set(found[i].indices) & set(ref[i][1:])) / 14 for i in range(3000)])
    assert recall > 0.99
    a.obs["masksc_cluster"] = pd.Categorical(y.astype(str))
    assert tl.evaluate(a, cluster_key="masksc_cluster")["silhouette"] == pytest.approx(silhouette_score(exact, y),
                                                                                          abs=1e-4)
    tl.cluster(a, neighbors_key="masksc_neighbors")  # the digest of a float64 embedding matches its graph's


def test_a_float64_embedding_changed_below_float32s_resolution_is_not_its_old_graphs():
    import anndata
    rng = np.random.default_rng(0)
    a = anndata.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(300)]))
    a.obsm["X_masksc"] = 1e6 + rng.normal(scale=0.004, size=(300, 8))
    tl.neighbors(a, key_added="graph")
    a.obsm["X_masksc"] = 1e6 + rng.normal(scale=0.004, size=(300, 8))  # the same as float32: every value 1e6
    with pytest.raises(DataError, match=r"adata.uns\['graph'\] was built from an earlier adata.obsm\['X_masksc'\]"):
        tl.cluster(a, neighbors_key="graph")
    a.obsm["X_masksc"] = np.full((300, 8), "x")  # not an embedding at all: named as such, not as a changed one
    with pytest.raises(DataError, match=r"adata.obsm\['X_masksc'\] must hold real numbers"):
        tl.cluster(a, neighbors_key="graph")


def test_a_backed_file_holding_only_layers_names_them(tmp_path):
    """tl.fit / tl.embed on such a file opened backed raised h5py's KeyError for X."""
    import anndata as ad
    data = synthetic(60, n_genes=300, n_types=3, seed=1)
    ad.AnnData(obs=data.obs, var=data.var, layers={"counts": data.X}).write_h5ad(tmp_path / "layers.h5ad")
    backed = ad.read_h5ad(tmp_path / "layers.h5ad", backed="r")
    with pytest.raises(DataError, match=r"no X matrix, only the layers \['counts'\]; fix: pass layer='counts'"):
        tl.fit(backed, "demo", epochs=1, progress=False, **TINY)
    import h5py
    data.write_h5ad(tmp_path / "damaged.h5ad")
    with h5py.File(tmp_path / "damaged.h5ad", "r+") as f:  # an X lacking a part is not a missing X
        del f["X/indices"]
    with pytest.raises(Exception) as exc:
        tl.fit(ad.read_h5ad(tmp_path / "damaged.h5ad", backed="r"), "demo", epochs=1, progress=False, **TINY)
    assert "no X matrix" not in str(exc.value)


def test_a_switch_given_a_string_is_refused_not_read_as_true(fitted, tmp_path):
    """A truthy string turned a switch on: overwrite="no" replaced the user's file, copy="no"
    returned a copy and left the object without its result, log1p="no" logged."""
    import masksc
    from masksc import pl
    from masksc.data import CellBatches, GridLayout, validate_counts, with_layer
    from masksc.train import TrainConfig
    adata, _, model, _ = fitted
    ad_ = adata.copy()
    tl.embed(ad_, model, progress=False)
    (tmp_path / "t.csv").write_text("cell,g1,g2\nc1,1,2\n")
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"the user's file")
    graph = sp.csr_matrix(np.ones((4, 4), np.float32))
    steps = [("overwrite", lambda: pl.embedding(ad_, "label", mine, overwrite="no")),
             ("copy", lambda: tl.embed(ad_, model, copy="no", progress=False)),
             ("copy", lambda: tl.cluster(ad_, 3, copy="no")),
             ("use_gpu", lambda: tl.neighbors(ad_, use_gpu="no")),
             ("use_gpu", lambda: cluster.kmeans(ad_.obsm["X_masksc"], 3, use_gpu="False")),
             ("directed", lambda: cluster.leiden(graph, directed="no")),
             ("use_raw", lambda: tl.fit(ad_, "demo", use_raw="no", epochs=1, progress=False, **TINY)),
             ("resume", lambda: tl.fit(ad_, "demo", resume="no", epochs=1, progress=False, **TINY)),
             ("amp", lambda: model.embed(ad_, amp="no", progress=False)),
             ("overwrite", lambda: model.embed_file(ad_, tmp_path / "z.npy", overwrite="no", progress=False)),
             ("log1p", lambda: Preprocessor(log1p="no")),
             ("shuffle", lambda: CellBatches(sp.csr_matrix(np.ones((4, 4))), shuffle="no")),
             ("strict", lambda: GridLayout.fit(adata.X, adata.var_names, shape=(16, 16), strict="no")),
             ("amp", lambda: TrainConfig(amp=1)),
             ("transpose", lambda: masksc.read(tmp_path / "t.csv", transpose="no")),  # cells and genes swapped
             ("use_raw", lambda: with_layer(ad_, None, "no")),  # read .raw
             ("require_integer", lambda: validate_counts(ad_, require_integer="no"))]
    for name, step in steps:
        with pytest.raises(DataError, match=rf"^{name}=('no'|'False'|1): a switch must be True or False; fix: pass "
                                            rf"a bool, e.g\. {name}=False\.$"):
            step()
    assert mine.read_bytes() == b"the user's file" and "masksc_cluster" not in ad_.obs
    for key in (None, 3, ""):  # obs[None] was stored, and writing the object failed later
        with pytest.raises(DataError, match=rf"^key_added={key!r}; fix: pass a name for the result"):
            tl.cluster(ad_, 3, key_added=key)
    assert list(ad_.obs.columns) == list(adata.obs.columns)
    with pytest.raises(DataError, match=r"grid shape \(16, 16\) or patch True is not whole"):
        GridLayout.fit(adata.X, adata.var_names, shape=(16, 16), patch=True)  # 1 x 1 patches, without a word


def test_a_numpy_integer_nlist_builds_the_ivf_index():
    """nlist=np.int64 passed the check, then failed in FAISS's SWIG constructor."""
    Z = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    got = cluster.knn_search(Z, 5, index="ivf", nlist=np.int64(4))
    want = cluster.knn_search(Z, 5, index="ivf", nlist=4)
    np.testing.assert_array_equal(got[0], want[0])


def test_a_model_given_a_bare_matrix_says_it_reads_an_anndata(fitted):
    """model.embed(X) raised AttributeError: 'ndarray' object has no attribute 'var_names'."""
    adata, _, model, _ = fitted
    for X in (adata.X, adata.X.toarray()):
        for step in (lambda: model.embed(X, progress=False), lambda: model.attention_maps(X[:2])):
            with pytest.raises(DataError, match=r"^the model reads an AnnData, whose gene names it matches to its "
                                                r"own, got a \w+; fix: wrap the cells x genes matrix as "
                                                r"anndata\.AnnData\(X\)"):
                step()
    with pytest.raises(DataError, match=r"^the model reads an AnnData, got the path 'cells\.h5ad'; fix: "
                                        r"model\.embed_file\(path, OUT\) streams a file"):
        model.embed("cells.h5ad", progress=False)  # AttributeError: 'str' object has no attribute 'shape'


def test_counts_of_plots_and_layouts_and_an_empty_model_dir_are_checked(fitted):
    """ncols=0 or True drew a layout of one column, numpy's own errors named neither n_sample nor
    seed, and model_dir="" trained and kept no checkpoint."""
    from masksc import pl
    from masksc.data import GridLayout
    adata, _, _, _ = fitted
    for ncols in (0, -1, True, 2.0):
        with pytest.raises(DataError, match=rf"^ncols={ncols!r}; fix: pass a positive whole number of columns"):
            pl.attention_grid(np.ones((2, 4, 4), np.float32), ncols=ncols)
    for setting, message in (({"n_sample": -1}, r"^n_sample=-1; fix"), ({"n_sample": 2.5}, r"^n_sample=2\.5; fix"),
                             ({"seed": -1}, r"^seed must be an integer in \[0, 2\*\*63 - 1\], got -1")):
        with pytest.raises(DataError, match=message):
            GridLayout.fit(adata.X, adata.var_names, shape=(16, 16), order="correlation", **setting)
    with pytest.raises(DataError, match=r"^model_dir='' names no directory"):
        tl.fit(adata.copy(), "demo", model_dir="", epochs=1, progress=False, **TINY)


def test_numpy_bools_act_as_bools_and_old_runs_saved_switches_as_numbers(fitted, monkeypatch):
    """np.False_ is not False: use_gpu=np.False_ still chose the GPU, amp=np.False_ failed in
    torch, a Preprocessor kept np.True_ and could not be saved as JSON; a run saved progress=0
    (accepted then) and could no longer resume."""
    import json
    from masksc.models.contrastive import ContrastiveConfig
    from masksc.train import TrainConfig
    adata, _, model, _ = fitted
    monkeypatch.setattr(cluster, "_faiss", lambda: types.SimpleNamespace(get_num_gpus=lambda: 1))
    assert cluster._resolve_gpus(np.False_, None) == 0 and cluster._resolve_gpus(False, None) == 0
    np.testing.assert_array_equal(model.embed(adata, amp=np.False_, progress=np.False_),
                                  model.embed(adata, progress=False))
    p = Preprocessor(n_top_genes=50, log1p=np.True_).fit(adata)
    assert json.loads(json.dumps(p.to_dict()))["params"]["log1p"] is True
    assert ContrastiveConfig(standardize=np.True_).standardize is True
    saved = TrainConfig(progress=False).to_dict()
    for progress in (0, None):  # progress=None, tqdm's habit, was saved as null
        old = TrainConfig.from_dict({**saved, "progress": progress, "amp": 1, "resume": 0})
        assert (old.progress, old.amp, old.resume) == (False, True, False)
    d = p.to_dict()
    again = Preprocessor.from_dict({**d, "params": {**d["params"], "log1p": 1, "scale": None}})  # as saved before
    np.testing.assert_array_equal(again.transform(adata).X.toarray(), p.transform(adata).X.toarray())


def test_teacher_overrides_must_be_a_dict(fitted):
    adata = fitted[0]
    with pytest.raises(ValueError, match=r"^teacher_overrides must be a dict of teacher settings, e\.g\. "
                                         r"\{'epochs': 5\}, got 'epochs=1'\.$"):  # dict() said "sequence element #0"
        tl.fit(adata.copy(), "demo", teacher_overrides="epochs=1", epochs=1, progress=False, **TINY)
