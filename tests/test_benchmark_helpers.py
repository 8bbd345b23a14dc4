"""The benchmark scripts' own model pieces against the shipped ones they vary (their oracles):
readout.py's read-outs, centroid_bound.py's partitions, student_variants.py's input scaling,
per-patch embedding and joint targets; and where the scripts write their results."""
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from masksc import ops
from masksc.data import CSRBatch
from masksc.embed import embed_matrix
from masksc.models import ContrastiveConfig, ContrastiveSC, MaskSC, MaskSCConfig
from masksc.models.contrastive import nt_xent
from tests.test_train import structured_grid


def _load(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readout, variants, bound = _load("readout"), _load("student_variants"), _load("centroid_bound")


def _last_patch_is_padding():
    """bool [64]: on an 8 x 8 grid of 2 x 2 patches, the genes of the last patch (rows and
    columns 6-7) are padding."""
    pad = np.zeros((8, 8), bool)
    pad[6:, 6:] = True
    return pad.ravel()


def _model(mask_ratio):
    torch.manual_seed(0)
    cfg = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=mask_ratio, target_dim=6)
    net = MaskSC(cfg)
    net.set_padding(_last_patch_is_padding())  # never pooled
    assert net.pad_tokens.sum() == 1
    net.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True)))
    return net.eval()


def test_last_block_mean_is_the_shipped_mean_read_out():
    net, X = _model(0.5), structured_grid(n=30)
    np.testing.assert_allclose(readout._earlier_block_mean(net, X, net.cfg.depth),
                               embed_matrix(net, X, progress=False), atol=1e-5)
    assert not np.allclose(readout._earlier_block_mean(net, X, 1), embed_matrix(net, X, progress=False), atol=1e-3)


def test_masked_views_keeping_every_patch_equal_the_shipped_mean_read_out():
    """With nothing masked a view is the whole cell in shuffled token order, which attention with
    added positions does not see: the views' mean is the one-pass mean."""
    net, X = _model(0.5), structured_grid(n=30)
    every = readout._masked_views_mean(net, X, views=3, n_keep=net.cfg.n_patches)
    np.testing.assert_allclose(every, embed_matrix(net, X, progress=False), atol=1e-5)


def test_masked_views_are_seeded_and_differ_from_one_pass():
    net, X = _model(0.5), structured_grid(n=30)
    a, b = readout._masked_views_mean(net, X, views=2), readout._masked_views_mean(net, X, views=2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, embed_matrix(net, X, progress=False), atol=1e-3)


def test_centroid_bound_partitions_against_brute_force_and_sklearn():
    from sklearn.cluster import KMeans
    from masksc.cluster import kmeans
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    Z = (rng.normal(size=(300, 5)) + 1.5 * np.eye(3, 5)[truth]).astype(np.float32)  # overlapping types
    parts = bound.partitions(Z, truth, seed=4)
    np.testing.assert_array_equal(parts["kmeans10"], kmeans(Z, 3, seed=4))
    means = np.stack([Z[truth == c].mean(0) for c in range(3)])
    nearest = np.linalg.norm(Z[:, None] - means[None], axis=-1).argmin(1)
    np.testing.assert_array_equal(parts["nearest true centroid (oracle)"], nearest)
    assert (nearest != truth).mean() > 0.05                       # overlap: the oracle is not the truth
    lloyd = KMeans(3, init=means, n_init=1, max_iter=300).fit(Z)
    np.testing.assert_array_equal(parts["k-means from true centroids (oracle)"], lloyd.labels_)
    assert bound.objective(Z, lloyd.labels_) == pytest.approx(lloyd.inertia_, rel=1e-4)
    assert bound.objective(Z, lloyd.labels_) < bound.objective(Z, nearest)  # Lloyd only lowers it


def test_gene_scale_divides_each_gene_by_its_sd_and_clips():
    dense = structured_grid(n=40).toarray().astype(np.float64)
    dense[:, 5] = 0.0  # a gene never detected stays 0
    X = sp.csr_matrix(dense.astype(np.float32))
    sd = dense.std(0)
    expected = np.minimum(np.divide(dense, sd, out=np.zeros_like(dense), where=sd > 0), 3.0)
    scaled = variants.scale_genes(X, clip=3.0)
    assert sp.issparse(scaled) and scaled.nnz == X.nnz
    np.testing.assert_allclose(scaled.toarray(), expected, rtol=1e-5, atol=1e-6)
    assert (scaled.toarray() >= 3.0 - 1e-6).any()  # the clip was reached


def test_per_patch_embedding_with_the_shared_weight_in_every_patch_is_the_shipped_embedding():
    torch.manual_seed(0)
    cfg = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)
    net = variants.PerPatchEmbedMaskSC(cfg)
    batch = CSRBatch.from_csr(structured_grid(n=12))
    with torch.no_grad():
        assert not torch.allclose(net.tokenize(batch), MaskSC.tokenize(net, batch), atol=1e-3)
        net.per_patch_weight.copy_(net.patch_weight.T.expand(cfg.n_patches, -1, -1))
        torch.testing.assert_close(net.tokenize(batch), MaskSC.tokenize(net, batch), atol=1e-5, rtol=1e-5)


def test_med_plus_values_target_is_the_teacher_feature_then_the_standardised_patch_values():
    torch.manual_seed(0)
    cfg = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)
    net = variants.MedPlusValuesMaskSC(cfg)
    net.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True)))
    X = structured_grid(n=12)
    batch = CSRBatch.from_csr(X)
    with torch.no_grad():
        target = net.compute_targets(batch)
        assert target.shape == (12, cfg.n_patches, 6 + 4)
        torch.testing.assert_close(target[..., :6], MaskSC.compute_targets(net, batch))
        med_off = MaskSC(dataclasses.replace(cfg, med=False, norm_pix=True))  # the MED-off ablation's target
        torch.testing.assert_close(target[..., 6:], med_off.compute_targets(batch))
        assert target[..., 6:].abs().max() > 0.5
        assert net.decode(net.encode(net.tokenize(batch), net.pad_tokens.expand(12, -1)),
                          torch.arange(cfg.n_patches).expand(12, -1)).shape == target.shape


@pytest.mark.parametrize("variant,weight", [("med+views", 0.1), ("med+views-0.01", 0.01)])
def test_med_plus_views_loss_is_the_shipped_loss_plus_weighted_nt_xent_of_two_masked_views(variant, weight):
    torch.manual_seed(0)
    cfg = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)
    net = variants.VARIANT_MODELS[variant](cfg)
    net.set_padding(_last_patch_is_padding())
    net.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True)))
    batch = CSRBatch.from_csr(structured_grid(n=12))
    with torch.no_grad():
        shipped = MaskSC.training_loss(net, batch, 7)
        tokens = net.tokenize(batch)
        pooled = []
        for seed in (7, 7 ^ (1 << 61)):
            kept, ids_keep, _, _ = ops.random_masking(tokens, cfg.n_keep, seed)
            latent = net.encode(kept, net.pad_tokens[ids_keep])[:, 1:]
            visible = ~net.pad_tokens[ids_keep]
            pooled.append(torch.stack([latent[i, visible[i]].mean(0) for i in range(12)]))
        z = torch.nn.functional.normalize(net.projector(torch.cat(pooled)), dim=-1)
        expected = shipped + weight * nt_xent(z[:12], z[12:], temperature=net.TEMPERATURE)
        torch.testing.assert_close(net.training_loss(batch, 7), expected)
        assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)  # the two views differ
        assert net.pad_tokens.sum() == 1 and (~visible).any()  # a padding patch was kept and left out


@pytest.mark.parametrize("variant,p", [("gene-dropout-0.5", 0.5), ("gene-dropout-0.2", 0.2)])
def test_gene_dropout_drops_detected_values_in_training_only_and_keeps_whole_cell_targets(variant, p, monkeypatch):
    torch.manual_seed(0)
    cfg = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)
    net = variants.VARIANT_MODELS[variant](cfg)
    net.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True)))
    batch = CSRBatch.from_csr(structured_grid(n=12))
    seen, real_patch_embed = [], ops.patch_embed

    def spy(crow, col, values, *args):
        seen.append(values.clone())
        return real_patch_embed(crow, col, values, *args)

    with torch.no_grad():
        whole = MaskSC.tokenize(net, batch)
        torch.testing.assert_close(net.eval().tokenize(batch), whole)        # embedding reads the whole cell
        net.train()
        draws = torch.stack([net.tokenize(batch) for _ in range(4000)])
        torch.testing.assert_close(draws.mean(0), whole, atol=0.06, rtol=0)  # patch embedding is linear
        monkeypatch.setattr(ops, "patch_embed", spy)
        for _ in range(200):
            net.tokenize(batch)
        values = torch.stack(seen)                                            # [draws, nnz]
        kept = values != 0
        torch.testing.assert_close(values[kept], (batch.values / (1 - p)).expand_as(values)[kept])
        torch.testing.assert_close(1 - kept.float().mean(), torch.tensor(p), atol=0.01, rtol=0)
        torch.testing.assert_close(net.compute_targets(batch), MaskSC.compute_targets(net, batch))


def test_use_threads_holds_numba_to_torchs_count():
    """scanpy's numba loops set the OpenMP thread count torch shares to numba's own, so
    use_threads sets both (seen in reproduce.py: torch at 2 threads after log-PCA, 1 asked)."""
    import numba

    from benchmarks._common import use_threads
    before = torch.get_num_threads()
    try:
        use_threads(1)
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    finally:
        use_threads(before)
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)


def test_scale_keeps_earlier_rows_only_when_they_were_measured_with_the_same_settings(tmp_path, monkeypatch, capsys):
    """A tiny trial (another model, other k-means settings) kept the committed rows under its own
    header; rows are merged only with an earlier run of the same settings."""
    scale = _load("scale")
    import _common  # the module scale.py imports, with benchmarks/ on sys.path
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    settings = {"device": "CPU (2 cores)", "preset": "cpu", "model": "cpu preset trained 20 epochs on 4096 cells",
                "kmeans": {"n_init": 3, "max_iter": 20}, "embed_batch": 1024}
    old = [{"n_cells": 100_000, "stage": "embed", "seconds": 9.0}, {"n_cells": 500, "stage": "embed", "seconds": 1.0}]
    (tmp_path / "scale.json").write_text(json.dumps({**settings, "rows": old}))
    new = [{"n_cells": 500, "stage": "embed", "seconds": 2.0}]
    assert scale._merge_previous("scale", settings, new) == [new[0], old[0]]  # sorted by size
    other = {**settings, "model": "cpu preset trained 1 epochs on 400 cells"}
    assert scale._merge_previous("scale", other, new) == new
    assert "measured with other settings (model) and are replaced, not merged" in capsys.readouterr().out


def test_a_benchmark_writes_to_the_folder_masksc_bench_results_names(tmp_path):
    """A trial run replaced the committed figures the README quotes; MASKSC_BENCH_RESULTS sends it elsewhere."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    committed = (root / "benchmarks" / "results" / "cluster.json").read_bytes()
    env = {**os.environ, "MASKSC_BENCH_RESULTS": str(tmp_path / "trial"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_cluster.py"), "--sizes", "40", "--k", "2",
                           "--iters", "2", "--n-init", "1", "--graph-n", "0", "--silhouette-n", "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "trial" / "cluster.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [40, 40, 40]
    assert (root / "benchmarks" / "results" / "cluster.json").read_bytes() == committed
    (tmp_path / "trial.json").write_text("")  # a file: refused before the benchmark runs, not after
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_cluster.py"), "--help"],
                          env={**env, "MASKSC_BENCH_RESULTS": str(tmp_path / "trial.json")}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1 and proc.stderr.strip().endswith(
        f"MASKSC_BENCH_RESULTS={tmp_path / 'trial.json'}: {tmp_path / 'trial.json'} is a file; fix: name a folder (it "
        "is created if missing).")
