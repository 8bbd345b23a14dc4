"""benchmarks/readout.py's own read-outs against the model's shipped one (their oracle)."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from masksc.embed import embed_matrix
from masksc.models import ContrastiveConfig, ContrastiveSC, MaskSC, MaskSCConfig
from tests.test_train import structured_grid

_spec = importlib.util.spec_from_file_location(
    "readout", Path(__file__).resolve().parents[1] / "benchmarks" / "readout.py")
readout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readout)


def _model(mask_ratio):
    torch.manual_seed(0)
    cfg = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                       decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=mask_ratio, target_dim=6)
    net = MaskSC(cfg)
    pad = np.zeros(64, bool)
    pad[-4:] = True  # the last patch is padding: never pooled
    net.set_padding(pad)
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
    net, X = _model(0.01), structured_grid(n=30)
    assert net.cfg.n_keep == net.cfg.n_patches
    np.testing.assert_allclose(readout._masked_views_mean(net, X, views=3), embed_matrix(net, X, progress=False),
                               atol=1e-5)


def test_masked_views_are_seeded_and_differ_from_one_pass():
    net, X = _model(0.5), structured_grid(n=30)
    a, b = readout._masked_views_mean(net, X, views=2), readout._masked_views_mean(net, X, views=2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, embed_matrix(net, X, progress=False), atol=1e-3)
