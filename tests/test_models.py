"""mask-sc model, targets and contrastive-sc: shapes, oracles, loss semantics."""
import json
import math
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from masksc import ops
from masksc.data import CSRBatch
from masksc.models import PRESETS, ContrastiveConfig, ContrastiveSC, MaskSC, MaskSCConfig, nt_xent
from masksc.models.masksc_model import check_recipe, csr_to_dense
from masksc.models.targets import (FRAGMENTS, FragmentTargets, fit_teacher, fragment_gene_mask,
                                   fragment_of_patch, patch_columns, token_columns)

TINY = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                    decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)


def random_grid(n=6, shape=(8, 8), density=0.3, seed=0, n_real=None):
    rng = np.random.default_rng(seed)
    X = sp.random(n, shape[0] * shape[1], density=density, format="csr", dtype=np.float32, random_state=rng)
    X.data = rng.random(X.nnz, dtype=np.float32) * 3 + 0.1
    if n_real is not None:  # the tail of the grid is padding
        X = X.tolil()
        X[:, n_real:] = 0
        X = X.tocsr()
        X.eliminate_zeros()
    X.sort_indices()
    return X


def tiny_teacher(cfg, seed=0, X=None):
    torch.manual_seed(seed)
    t = ContrastiveSC(ContrastiveConfig(n_input=cfg.n_genes, layers=(10, 8, cfg.target_dim), standardize=True))
    if X is not None:
        dense = X.toarray()
        t.fit_standardizer(dense.mean(0), dense.std(0))
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in t.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return t.eval()


def make_model(cfg=TINY, X=None, seed=0, n_real=None):
    torch.manual_seed(seed)
    model = MaskSC(cfg)
    if cfg.med:
        model.set_teacher(tiny_teacher(cfg, seed, X))
    if n_real is not None:
        pad = np.zeros(cfg.n_genes, bool)
        pad[n_real:] = True
        model.set_padding(pad)
    return model


def test_forward_backward_shapes():
    X = random_grid()
    model = make_model(X=X)
    batch = CSRBatch.from_csr(X)
    loss = model.training_loss(batch, seed=3)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.patch_weight.grad is not None and model.patch_weight.grad.abs().sum() > 0
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.embed(batch).shape == (6, 16)
    assert model.last_attention(batch).shape == (6, 2, 1 + TINY.n_patches, 1 + TINY.n_patches)


def test_encode_n_blocks_equals_a_shallower_copy():
    """encode(n_blocks=k) is the encoder of depth k holding the first k blocks; last_attention
    of a depth-3 model is the attention of its third block on what the first two produce."""
    cfg = TINY.replace(depth=3)
    X = random_grid(n_real=50)
    deep = make_model(cfg, X=X, n_real=50).eval()
    batch = CSRBatch.from_csr(X)
    with torch.no_grad():
        tokens = deep.tokenize(batch)
        pad = deep.pad_tokens.expand(tokens.shape[0], -1)
        for k in (1, 2):
            shallow = MaskSC(cfg.replace(depth=k)).eval()
            loaded = shallow.load_state_dict({n: v for n, v in deep.state_dict().items()
                                              if not n.startswith("blocks.") or int(n.split(".")[1]) < k}, strict=False)
            assert not loaded.missing_keys
            torch.testing.assert_close(deep.encode(tokens, pad, n_blocks=k), shallow.encode(tokens, pad))
        torch.testing.assert_close(deep.encode(tokens, pad, n_blocks=3), deep.encode(tokens, pad))
        two = MaskSC(cfg.replace(depth=2)).eval()
        assert not two.load_state_dict(deep.state_dict(), strict=False).missing_keys
        kpm = F.pad(pad, (1, 0))  # the global token is never padding
        x = torch.cat([deep.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1)
        x = two.blocks[1](two.blocks[0](x, kpm), kpm)
        last = deep.blocks[2]
        torch.testing.assert_close(deep.last_attention(batch), last.attn.probs(last.norm1(x), kpm))
    with pytest.raises(ValueError, match="n_blocks=4"):
        deep.encode(tokens, pad, n_blocks=4)


def test_embed_ignores_masking_and_is_deterministic(monkeypatch):
    X = random_grid()
    model = make_model(X=X).eval()
    batch = CSRBatch.from_csr(X)
    with torch.no_grad():
        z1 = model.embed(batch)
        monkeypatch.setattr(ops, "random_masking", lambda *a, **k: pytest.fail("embed must not mask"))
        z2 = model.embed(batch)
        # each cell embedded alone gives the same vector: no masking, no cross-cell mixing
        z3 = torch.cat([model.embed(CSRBatch.from_csr(X[i:i + 1])) for i in range(X.shape[0])])
    assert torch.equal(z1, z2)
    torch.testing.assert_close(z1, z3, atol=1e-5, rtol=1e-5)


def test_embed_is_mean_of_normed_nonpadding_tokens():
    X = random_grid(n_real=48)
    model = make_model(X=X, n_real=48).eval()
    batch = CSRBatch.from_csr(X)
    with torch.no_grad():
        tokens = model.tokenize(batch)
        x = torch.cat([model.cls_token.expand(6, -1, -1), tokens], 1)
        pad = model.pad_tokens
        assert pad.sum() == 4  # grid rows 6-7 are padding: the last 4 of 16 patches
        kpm = F.pad(pad.expand(6, -1), (1, 0), value=False)
        for blk in model.blocks:
            x = blk(x, kpm)
        expected = model.norm(x)[:, 1:][:, ~pad].mean(1)
        torch.testing.assert_close(model.embed(batch), expected, atol=1e-6, rtol=1e-5)
        per_patch = torch.randn(6, 16, 3)
        torch.testing.assert_close(model.mean_over_patches(per_patch), per_patch[:, ~pad].mean(1))
        kept_pad = torch.rand(6, 16) < 0.3  # per-cell padding, as a masked view's kept tokens have
        kept_pad[0] = True  # a cell with nothing but padding pools to zeros
        torch.testing.assert_close(model.mean_over_patches(per_patch, kept_pad)[1:],
                                   torch.stack([per_patch[i, ~kept_pad[i]].mean(0) for i in range(1, 6)]))
        assert (model.mean_over_patches(per_patch, kept_pad)[0] == 0).all()


def test_target_readout_is_decoder_prediction_on_all_tokens():
    """pool='target': the decoder run on the unmasked encoding (no mask tokens anywhere),
    its head output averaged over the non-padding tokens."""
    X = random_grid(n_real=48)
    model = make_model(TINY.replace(pool="target"), X=X, n_real=48).eval()
    batch = CSRBatch.from_csr(X)
    with torch.no_grad():
        latent = model._encode_all(batch)
        pad = model.pad_tokens
        x = model.decoder_embed(latent)
        x = torch.cat([x[:, :1], x[:, 1:] + model.decoder_pos_embed], 1)
        kpm = F.pad(pad.expand(6, -1), (1, 0), value=False)
        for blk in model.decoder_blocks:
            x = blk(x, kpm)
        expected = model.head(model.decoder_norm(x))[:, 1:][:, ~pad].mean(1)
        got = model.embed(batch)
    assert got.shape == (6, TINY.target_dim) == (6, model.cfg.embedding_dim)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_target_readout_needs_med():
    with pytest.raises(ValueError, match="MED on"):
        TINY.replace(pool="target", med=False)


def test_med_targets_without_a_teacher_name_the_fix():
    with pytest.raises(RuntimeError, match="set_teacher"):
        MaskSC(TINY).compute_targets(CSRBatch.from_csr(random_grid()))


def test_masked_mse_known_answer():
    pred = torch.zeros(2, 4, 3)
    target = torch.zeros(2, 4, 3)
    target[0, 0] = 3.0       # per-token mse 9
    target[0, 1] = 1.0       # per-token mse 1
    target[1, 2] = 2.0       # per-token mse 4 (but padding)
    target[1, 3] = torch.tensor([3.0, 0.0, 0.0])  # mse 3
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])
    pad = torch.tensor([False, False, True, False])
    # counted: (0,0)=9, (1,1)=0, (1,3)=3 -> mean over 3 tokens = 4; (0,1) unmasked, (*,2) padding
    assert MaskSC.masked_mse(pred, target, mask, pad).item() == pytest.approx(4.0)


def test_loss_counts_only_masked_nonpadding_patches(monkeypatch):
    """End to end: the loss equals the mean target-prediction MSE over masked, non-padding tokens."""
    X = random_grid(n_real=48)
    model = make_model(X=X, n_real=48)
    batch = CSRBatch.from_csr(X)
    seen = {}
    real_mse = MaskSC.masked_mse

    def spy(pred, target, mask, pad):
        seen.update(pred=pred.detach(), target=target, mask=mask, pad=pad)
        return real_mse(pred, target, mask, pad)

    monkeypatch.setattr(MaskSC, "masked_mse", staticmethod(spy))
    loss = model.training_loss(batch, seed=11)
    _, _, _, mask = ops.random_masking(model.tokenize(batch), TINY.n_keep, 11)
    assert torch.equal(seen["mask"], mask)
    assert mask.sum(1).eq(TINY.n_patches - TINY.n_keep).all()
    sel = mask & ~model.pad_tokens
    per = ((seen["pred"] - seen["target"]) ** 2).mean(-1)
    torch.testing.assert_close(loss.detach(), per[sel].mean())


@pytest.mark.parametrize("fragment", FRAGMENTS)
@pytest.mark.parametrize("ime", [True, False])
def test_targets_equal_teacher_on_fragment_input(fragment, ime):
    cfg = TINY.replace(target_fragment=fragment, ime=ime)
    X = random_grid(n=5)
    teacher = tiny_teacher(cfg, X=X)
    targets = FragmentTargets(cfg.grid_shape, cfg.patch, fragment, ime)
    dense = torch.from_numpy(X.toarray())
    got = targets(teacher, dense)
    assert got.shape == (5, cfg.n_patches, cfg.target_dim)
    cols = token_columns(cfg.grid_shape, cfg.patch, ime)
    frag = fragment_of_patch(cfg.grid_shape, cfg.patch, fragment)
    with torch.no_grad():
        z = teacher.standardize(dense)
        for p in range(cfg.n_patches):
            genes = np.zeros(cfg.n_genes, bool)
            same = np.flatnonzero(frag == frag[p])
            genes[cols[same].ravel()] = True
            x_frag = z * torch.from_numpy(genes).float()
            expected = teacher(x_frag, standardized=True)  # the slow, direct way
            torch.testing.assert_close(got[:, p], expected, atol=1e-5, rtol=1e-5)


def test_fragment_geometry():
    cols = patch_columns((4, 6), 2)
    assert cols.shape == (6, 4)
    assert cols[0].tolist() == [0, 1, 6, 7] and cols[4].tolist() == [14, 15, 20, 21]
    assert fragment_of_patch((4, 6), 2, "row").tolist() == [0, 0, 0, 1, 1, 1]
    m = fragment_gene_mask((4, 6), 2, "row")
    assert m.shape == (2, 24) and m[0, :12].all() and not m[0, 12:].any()
    assert fragment_gene_mask((4, 6), 2, "cell").all()
    assert token_columns((4, 6), 2, ime=False)[1].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="unknown target fragment"):
        fragment_of_patch((4, 6), 2, "band")


def test_ime_off_tokens_are_consecutive_gene_runs():
    cfg = TINY.replace(ime=False, med=False)
    X = random_grid()
    model = make_model(cfg)
    batch = CSRBatch.from_csr(X)
    with torch.no_grad():
        tok = model.tokenize(batch) - model.pos_embed
        dense = torch.from_numpy(X.toarray()).reshape(6, cfg.n_patches, cfg.patch ** 2)
        expected = dense @ model.patch_weight.T + model.patch_bias
    torch.testing.assert_close(tok, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [dict(ime=False), dict(med=False), dict(med=False, norm_pix=True),
                                     dict(ime=False, med=False), dict(pool="cls"), dict(pool="target")])
def test_ablation_variants_run(variant):
    cfg = TINY.replace(**variant)
    X = random_grid()
    model = make_model(cfg, X=X)
    batch = CSRBatch.from_csr(X)
    loss = model.training_loss(batch, seed=0)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.embed(batch).shape == (6, cfg.embedding_dim)
    if not cfg.med:
        target = model.compute_targets(batch)
        assert target.shape == (6, cfg.n_patches, cfg.patch ** 2)
        if not cfg.norm_pix:
            dense = torch.from_numpy(X.toarray())
            torch.testing.assert_close(target, dense[:, model.token_cols])


def test_med_off_targets_are_patch_values_in_conv_order():
    cfg = TINY.replace(med=False)
    X = random_grid()
    model = make_model(cfg)
    t = model.compute_targets(CSRBatch.from_csr(X))
    grid = torch.from_numpy(X.toarray()).reshape(6, 1, 8, 8)
    unfolded = F.unfold(grid, kernel_size=2, stride=2).transpose(1, 2)  # [B, G, P*P] row-major patches
    torch.testing.assert_close(t, unfolded)


def test_nt_xent_matches_direct_computation():
    torch.manual_seed(0)
    z1 = F.normalize(torch.randn(5, 4), dim=1)
    z2 = F.normalize(torch.randn(5, 4), dim=1)
    tau = 0.07
    z = torch.cat([z1, z2]).double()
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + 5) % n
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(total / n, rel=1e-5)


def test_nt_xent_refuses_views_of_different_cells():
    with pytest.raises(ValueError, match=r"two views of the same cells, both \[B, d\]; got \(3, 8\) and \(4, 8\)"):
        nt_xent(torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"got \(3,\) and \(3,\)"):
        nt_xent(torch.randn(3), torch.randn(3))


def test_contrastive_architecture_matches_authors():
    model = ContrastiveSC(ContrastiveConfig())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(500, 200), (200, 40), (40, 60)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 2
    assert model.drop.p == 0.9
    model.eval()
    out = model(torch.randn(7, 500))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))
    lone = ContrastiveSC(ContrastiveConfig(n_input=20, layers=(8,))).eval()  # one layer is the output layer
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.ReLU)) for m in lone.modules())
    assert (lone(torch.randn(50, 20)) < 0).any()  # not squashed through a ReLU


def test_fit_teacher_freezes_and_separates_fragments(monkeypatch):
    """The teacher trains from its seeded initialisation and is frozen after; every cell it sees
    is one standardised cell restricted to one "row" fragment, never to the all-padding one."""
    from masksc.models import contrastive
    X = random_grid(n=40, density=0.4, n_real=48)   # grid rows 6-7 (genes 48-63) are padding
    pad = np.zeros(64, bool)
    pad[48:] = True
    cfg = ContrastiveConfig(n_input=64, layers=(16, 8, 6), standardize=True, epochs=2, batch_size=20, lr=1e-3)
    seen, real_fit = [], contrastive.fit_contrastive

    def spy(model, batches_fn, n_cells, **kw):
        def recorded(epoch, rng):
            for x in batches_fn(epoch, rng):
                seen.append(x.clone())
                yield x
        return real_fit(model, recorded, n_cells, **kw)

    monkeypatch.setattr(contrastive, "fit_contrastive", spy)
    t = fit_teacher(X, (8, 8), 2, "row", cfg, is_padding=pad, progress=False)
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    dense = torch.from_numpy(X.toarray())
    torch.testing.assert_close(t.in_mean, dense.mean(0), atol=1e-5, rtol=1e-5)

    torch.manual_seed(cfg.seed)
    init = dict(ContrastiveSC(cfg).named_parameters())
    moved = [n for n, p in t.named_parameters() if not torch.equal(p, init[n])]
    assert moved == list(init), "the teacher's weights never left their seeded initialisation"

    masks = torch.from_numpy(fragment_gene_mask((8, 8), 2, "row"))   # 4 bands of 16 genes; band 3 is padding
    z = t.standardize(dense)
    assert (z[:, ~pad] != 0).all() and (z[:, pad] == 0).all()   # a cell's fragment has the fragment's support
    assert sum(len(x) for x in seen) == cfg.epochs * 40
    drawn = []
    for x in seen:
        for row in x:
            support = row != 0
            inside = [f for f in range(len(masks)) if support.any() and not (support & ~masks[f]).any()]
            assert len(inside) == 1, "a training input is not one non-padding fragment"
            f = inside[0]
            assert (row - z * masks[f]).abs().amax(1).min() < 1e-6, "a training input is not a cell's fragment"
            drawn.append(f)
    assert set(drawn) == {0, 1, 2}


@pytest.mark.parametrize("fragment", ["cell", "row"])
def test_teacher_batches_follow_the_model_to_its_device(fragment):
    """Training on another device moves each batch there (a CUDA fit once failed at its first
    batch). The meta device stands in for a GPU: a meta tensor meeting a CPU one raises a
    device error as a CUDA one does, and reading the loss is where a correct run on meta stops."""
    from masksc.models.contrastive import train_contrastive_dense
    cfg = ContrastiveConfig(n_input=64, layers=(16, 8, 6), standardize=True, epochs=1, batch_size=20)
    X = random_grid(n=40, density=0.4, n_real=48)
    for train in (lambda: fit_teacher(X, (8, 8), 2, fragment, cfg, device="meta", progress=False),
                  lambda: train_contrastive_dense(X.toarray(), cfg, device="meta", progress=False)):
        with pytest.raises((RuntimeError, NotImplementedError)) as err:
            train()
        message = str(err.value)
        assert "meta" in message and "same device" not in message and "expected device" not in message, message


def test_set_teacher_checks_sizes():
    model = MaskSC(TINY)
    with pytest.raises(ValueError, match="teacher maps"):
        model.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=10, layers=(4, 4, 6))))
    with pytest.raises(ValueError, match="needs a teacher"):
        model.set_teacher(None)


def test_config_round_trip_and_version_check():
    for cfg in PRESETS.values():
        assert MaskSCConfig.from_dict(cfg.to_dict()) == cfg
    d = TINY.to_dict()
    d["config_version"] = 999
    with pytest.raises(ValueError, match="another masksc version"):
        MaskSCConfig.from_dict(d)
    with pytest.raises(ValueError, match="divisible"):
        TINY.replace(grid_shape=(9, 8))
    c = ContrastiveConfig(n_input=12)
    assert ContrastiveConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("field, value, need", [("batch_size", 2.5, "an integer"), ("batch_size", "200", "an integer"),
                                                ("epochs", True, "an integer"), ("lr", "0.4", "a number"),
                                                ("layers", (200.5, 40, 60), r"integers \(layer widths\)"),
                                                ("standardize", 1, "True or False")])
def test_contrastive_config_refuses_values_of_the_wrong_type_by_name(field, value, need):
    """A teacher setting of the wrong type (teacher_overrides, --teacher-set) is named here, before
    any work; batch_size=2.5 passed the `< 2` check and failed deep in training with a TypeError."""
    with pytest.raises(ValueError, match=rf"^contrastive-sc config: {field}={re.escape(repr(value))} must be {need}\.$"):
        ContrastiveConfig(**{field: value})
    typed = ContrastiveConfig(epochs=np.int16(3), lr=np.float32(0.5), layers=(np.int64(8), 6))
    assert (type(typed.epochs), type(typed.lr), type(typed.layers[0])) == (int, float, int)  # stored as plain numbers
    assert ContrastiveConfig(layers=[10, 6]).layers == ContrastiveConfig(layers=np.array([10, 6])).layers == (10, 6)


def test_contrastive_config_from_a_checkpoint_reads_whole_floats_in_integer_fields():
    """Earlier versions took lr_horizon_epochs=500.0 (its type unchecked) and saved it so; such a
    model still loads, the field an int."""
    saved = {**ContrastiveConfig(n_input=12).to_dict(), "lr_horizon_epochs": 500.0}
    loaded = ContrastiveConfig.from_dict(saved)
    assert loaded.lr_horizon_epochs == 500 and type(loaded.lr_horizon_epochs) is int
    with pytest.raises(ValueError, match=r"lr_horizon_epochs=500\.5 must be an integer"):
        ContrastiveConfig.from_dict({**saved, "lr_horizon_epochs": 500.5})
    assert ContrastiveConfig.from_dict({**saved, "layers": [10.0, 6]}).layers == (10, 6)
    for layers in ([10.5, 8, 6], ["10", 6], None):  # 10.5 was read as 10 and "10" as 10, silently
        with pytest.raises(ValueError, match=r"layers=.* must be integers \(layer widths\)"):
            ContrastiveConfig.from_dict({**saved, "layers": layers})


def test_config_replace_names_unknown_fields_and_valid_ones():
    with pytest.raises(ValueError, match=r"unknown MaskSCConfig field\(s\) \['bogus'\]; fix: use one of .*'embed_dim'"):
        TINY.replace(bogus=1, embed_dim=32)
    assert TINY.replace(embed_dim=32).embed_dim == 32 and TINY.embed_dim == 16


@pytest.mark.parametrize("field, value", [("embed_dim", -5), ("num_heads", 0), ("patch", 0), ("depth", -1), ("depth", 0),
                                          ("decoder_heads", 0), ("batch_size", 0), ("embed_dim", 16.0)])
def test_config_sizes_must_be_positive_before_divisibility(field, value):
    # num_heads=0 and patch=0 were ZeroDivisionErrors; embed_dim=-5 a divisibility complaint
    with pytest.raises(ValueError, match=f"^{field}={value!r} must be an integer >= "):
        TINY.replace(**{field: value})


def test_check_recipe_takes_numbers_of_any_real_type_and_refuses_bools():
    """np.float32 (what a float32 array yields) and numpy integers are numbers; a bool is not."""
    check_recipe(np.float32(1e-3), np.float16(0.05), (np.float32(0.9), np.float64(0.95)), np.int64(2), np.int32(1))
    check_recipe(1, 0, (0, 0.5), 0, 0)
    for args, message in (((True, 0.05, (0.9, 0.95), 2, 1.0), "lr=True must be a number > 0"),
                          ((1e-3, np.True_, (0.9, 0.95), 2, 1.0), "weight_decay=np.True_ must be a number >= 0"),
                          ((1e-3, 0.05, (False, 0.95), 2, 1.0), r"betas=\(False, 0.95\) must be two numbers"),
                          ((1e-3, 0.05, (0.9, 0.95), True, 1.0), "warmup_epochs=True must be a number >= 0"),
                          ((1e-3, 0.05, (0.9, 0.95), 2, False), "clip=False must be a number >= 0")):
        with pytest.raises(ValueError, match=f"^{message}"):
            check_recipe(*args)


def test_config_takes_numpy_numbers_as_the_python_values_they_equal():
    cfg = TINY.replace(lr=np.float32(1e-3), weight_decay=np.float64(0.05), betas=(np.float32(0.5), 0.95),
                       warmup_epochs=np.int64(2), clip=np.float32(1.0), epochs=np.int32(3), embed_dim=np.int64(16),
                       grid_shape=(np.int32(8), np.int64(8)), mlp_ratio=np.float32(2.0), mask_ratio=np.float32(0.5))
    assert cfg == TINY.replace(lr=float(np.float32(1e-3)), weight_decay=0.05, betas=(0.5, 0.95), warmup_epochs=2,
                               clip=1.0, epochs=3)
    assert type(cfg.lr) is float and type(cfg.epochs) is int and type(cfg.grid_shape[0]) is int
    assert MaskSCConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # plain JSON, no numpy scalars


def test_configs_take_any_real_number_as_the_float_it_equals():
    """is_number accepts a Fraction, so the configs store it as a float: the checkpoint's
    config.json written after training must be plain JSON."""
    from fractions import Fraction

    from masksc.train import TrainConfig
    cfg = TINY.replace(lr=Fraction(1, 1000), betas=(Fraction(1, 2), 0.95), warmup_epochs=Fraction(3, 2),
                       mlp_ratio=Fraction(2), mask_ratio=Fraction(1, 2))
    assert cfg == TINY.replace(lr=0.001, betas=(0.5, 0.95), warmup_epochs=1.5, mask_ratio=0.5)
    assert type(cfg.lr) is float and type(cfg.betas[0]) is float and type(cfg.mlp_ratio) is float
    assert MaskSCConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    train_cfg = TrainConfig(lr=Fraction(1, 1000), min_lr_ratio=Fraction(1, 10), clip=Fraction(1))
    assert (train_cfg.lr, train_cfg.min_lr_ratio, train_cfg.clip) == (0.001, 0.1, 1.0)
    assert TrainConfig.from_dict(json.loads(json.dumps(train_cfg.to_dict()))) == train_cfg


@pytest.mark.parametrize("field, value", [("lr", True), ("clip", False), ("warmup_epochs", True),
                                          ("epochs", True), ("embed_dim", np.True_), ("mlp_ratio", True),
                                          ("mask_ratio", True), ("target_scale", True), ("grid_shape", (True, 8)),
                                          ("betas", (0.9, True))])
def test_config_refuses_bools_for_numbers(field, value):
    with pytest.raises(ValueError, match=f"^{re.escape(field)}="):
        TINY.replace(**{field: value})


def test_config_grid_sides_must_be_positive():
    with pytest.raises(ValueError, match="grid_shape=.*two positive integers"):
        TINY.replace(grid_shape=(0, 8))  # 0 is divisible by the patch, so only this check catches it


def test_sincos_embeddings_have_the_asked_width_or_refuse_it():
    """An odd width, or 2-D one not a multiple of 4, gave fewer columns than asked without a word."""
    from masksc.models.masksc_model import sincos_1d, sincos_2d
    pos = np.arange(5)
    e = sincos_1d(6, pos)
    omega = 1.0 / 10000 ** (np.arange(3) / 3.0)
    np.testing.assert_allclose(e, np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1))
    assert sincos_2d(8, 2, 3).shape == (6, 8)
    with pytest.raises(ValueError, match="dim=5 must be even"):
        sincos_1d(5, pos)
    with pytest.raises(ValueError, match="dim=6 must be a multiple of 4"):
        sincos_2d(6, 2, 2)


def test_config_refuses_what_would_fail_or_learn_nothing_later():
    """Each of these built a model that failed at its first step (after the teacher had trained)
    or trained on nothing without an error."""
    with pytest.raises(ValueError, match="must be multiples of 4 for the sin-cos position embedding over the 2-D"):
        TINY.replace(embed_dim=6, num_heads=2)  # 2-D positions give each grid axis half the channels
    with pytest.raises(ValueError, match="must be multiples of 2"):
        TINY.replace(ime=False, decoder_dim=5, decoder_heads=1)
    assert TINY.replace(ime=False, embed_dim=6, num_heads=2).embed_dim == 6  # 1-D positions need only even widths
    with pytest.raises(ValueError, match=r"mask_ratio=0.01 masks no patch of 16 .* fix: mask_ratio >= 0.0625"):
        TINY.replace(mask_ratio=0.01)
    assert TINY.replace(mask_ratio=1 / 16).n_keep == 15  # the value the message names works
    with pytest.raises(ValueError, match="layout='bogus'"):
        TINY.replace(layout="bogus")
    # 1-D tokens are runs of a grid row: on the correlation layout each took a row of P modules
    with pytest.raises(ValueError, match=r"layout='correlation' groups co-expressed genes into P x P patches, .* fix: "
                                         r"ime=True, or layout='hvg' for 1-D tokens"):
        TINY.replace(ime=False, layout="correlation")
    assert TINY.replace(ime=True, layout="correlation").layout == "correlation"
    with pytest.raises(ValueError, match="mlp_ratio=-1"):
        TINY.replace(mlp_ratio=-1)
    assert TINY.replace(grid_shape=[8, 8]).grid_shape == (8, 8)  # a list (from JSON) is the tuple


def test_config_refuses_settings_that_train_nothing_or_give_a_nan_loss():
    """Without a decoder block a masked position's prediction never sees the encoder, so the
    encoder got no gradient at all; norm_pix over patch=1's single value and an infinite
    target_scale made the loss NaN."""
    with pytest.raises(ValueError, match=r"^decoder_depth=0 must be an integer >= 1"):
        TINY.replace(decoder_depth=0)
    for scale in (float("inf"), 1e39, 10 ** 400):  # 1e39 is infinite in float32; 10**400 overflowed a float
        with pytest.raises(ValueError, match=rf"target_scale={re.escape(repr(scale))} must be a finite number >= 0"):
            TINY.replace(target_scale=scale)
    with pytest.raises(ValueError, match=r"norm_pix=True standardises each token's P\*P values, .* fix: "
                                         r"norm_pix=False, or patch >= 2"):
        TINY.replace(med=False, norm_pix=True, patch=1)
    assert TINY.replace(med=False, norm_pix=True, patch=2).patch == 2
    assert TINY.replace(med=True, norm_pix=True, patch=1).patch == 1  # norm_pix is read only with MED off


@pytest.mark.parametrize("field, value", [("temperature", float("inf")), ("temperature", float("nan")),
                                          ("temperature", 10 ** 400), ("lr", float("inf")), ("lr", float("nan"))])
def test_teacher_config_refuses_numbers_that_are_not_finite(field, value):
    """An infinite temperature trained a teacher whose loss never moved (zero gradients); NaN
    failed only in training, with advice to lower the learning rate."""
    with pytest.raises(ValueError, match=rf"contrastive-sc config: {field}={value} must be a finite number > 0"):
        ContrastiveConfig(n_input=12, layers=(8, 4), **{field: value})


def test_paper_preset_matches_the_paper():
    p = PRESETS["paper"]
    assert (p.grid_shape, p.patch, p.embed_dim, p.depth, p.num_heads) == ((64, 64), 4, 768, 12, 12)
    assert (p.decoder_depth, p.decoder_heads, p.mask_ratio) == (8, 16, 0.75)
    assert (p.lr, p.betas, p.batch_size, p.epochs) == (1e-4, (0.9, 0.95), 256, 1600)
    assert p.n_patches == 256


def test_csr_to_dense():
    X = random_grid()
    b = CSRBatch.from_csr(X)
    torch.testing.assert_close(csr_to_dense(b.crow_indices, b.col_indices, b.values, 64),
                               torch.from_numpy(X.toarray()))


def test_fit_contrastive_stops_at_a_non_finite_loss_before_stepping():
    from masksc.models.contrastive import fit_contrastive
    model = ContrastiveSC(ContrastiveConfig(n_input=12, layers=(8, 4), epochs=2, batch_size=4, lr=0.1))
    start = {k: v.clone() for k, v in model.named_parameters()}
    bad = torch.ones(4, 12)
    bad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"contrastive-sc loss became nan at epoch 1; lower its learning rate"):
        fit_contrastive(model, lambda epoch, rng: [bad], n_cells=4, progress=False)
    for name, value in model.named_parameters():  # no optimiser step was taken
        assert torch.equal(value, start[name]), name


def test_a_string_for_a_pair_is_named_as_given():
    from masksc.train import TrainConfig
    with pytest.raises(ValueError, match=r"grid_shape='16,16' must be two positive integers"):
        MaskSCConfig(grid_shape="16,16")
    with pytest.raises(ValueError, match=r"betas='ab'"):
        TrainConfig(betas="ab")


@pytest.mark.parametrize("field, value, message", [
    ("betas", 0.9, r"betas=0\.9 must be two numbers in \[0, 1\)"),
    ("grid_shape", 5, r"grid_shape=5 must be two positive integers"),
    ("grid_shape", None, r"grid_shape=None must be two positive integers"),
    ("ime", "False", r"ime='False': a switch must be true or false"),
    ("med", "no", r"med='no': a switch must be true or false"),
    ("norm_pix", 1, r"norm_pix=1: a switch must be true or false"),
    ("mlp_ratio", 1e-9, r"mlp_ratio=1e-09 must be a number giving the MLPs at least one hidden unit \(>= 0\.0156 "
                        r"for width 64\)"),
    ("mlp_ratio", float("inf"), r"mlp_ratio=inf must be a number giving"),
    ("mlp_ratio", float("nan"), r"mlp_ratio=nan must be a number giving")])
def test_a_setting_of_the_wrong_kind_is_refused_by_name(field, value, message):
    """Values --set can give (JSON of the wrong shape, a capitalised False, a ratio leaving the
    MLPs no unit) are a ValueError naming them, not a TypeError from deep inside, nor silently on."""
    with pytest.raises(ValueError, match=message):
        MaskSCConfig(**{field: value, "embed_dim": 64, "decoder_dim": 64})


def test_train_config_refuses_one_number_for_betas():
    from masksc.train import TrainConfig
    with pytest.raises(ValueError, match=r"betas=0\.9 must be two numbers"):
        TrainConfig(betas=0.9)
    assert MaskSCConfig(ime=np.bool_(False)).ime is False  # numpy's bools are bools
