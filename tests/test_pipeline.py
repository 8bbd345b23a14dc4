"""MaskSCModel: moving a model between devices, its attention maps, loading a damaged one."""
import numpy as np
import pytest
import torch

from masksc.data import synthetic
from masksc.models import ContrastiveConfig, ContrastiveSC, MaskSC, MaskSCConfig
from masksc.pipeline import MaskSCModel, preprocess_to_grid

CFG = MaskSCConfig(grid_shape=(8, 8), patch=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                   decoder_dim=8, decoder_depth=1, decoder_heads=2, mask_ratio=0.5, target_dim=6)


@pytest.fixture(scope="module")
def tiny():
    """An untrained tiny MaskSCModel with a teacher, and the cells it embeds."""
    adata = synthetic(120, n_genes=200, n_types=3, seed=5)
    preprocessor, grid, _ = preprocess_to_grid(adata, CFG, seed=0)
    torch.manual_seed(0)
    network = MaskSC(CFG).eval()
    network.set_padding(grid.is_padding)
    network.set_teacher(ContrastiveSC(ContrastiveConfig(n_input=64, layers=(10, 8, 6), standardize=True)))
    return MaskSCModel(network, preprocessor, grid), adata


def test_to_returns_the_model_and_embeds_the_same(tiny):
    model, adata = tiny
    before = model.embed(adata, progress=False)
    assert model.to("cpu") is model
    assert model.to(torch.device("cpu")) is model
    np.testing.assert_array_equal(model.embed(adata, progress=False), before)


@pytest.mark.parametrize("device, message", [("meta", "device 'meta' holds no weights.*fix: "),
                                             ("nonsense", "device 'nonsense' is not a device name.*fix: "),
                                             ("cuda:99", "device 'cuda:99'.*fix: ")])
def test_to_refuses_a_device_that_cannot_hold_the_weights(tiny, device, message):
    model, _ = tiny
    with pytest.raises(ValueError, match=message):
        model.to(device)
    assert {p.device.type for p in model.network.parameters()} == {"cpu"}  # nothing moved


def test_to_cuda_on_a_torch_without_cuda_names_the_fix_as_to_is_called(tiny, monkeypatch):
    """`.to("cuda")` is answered with `.to("cpu")`, not the command line's --device cpu."""
    from masksc.train import resolve_device
    model, _ = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda': this torch .*; fix: call \.to\(\"cpu\"\)\.$") as exc:
        model.to("cuda")
    assert "--device" not in str(exc.value)
    with pytest.raises(ValueError, match=r"fix: pass --device cpu \(device='cpu'\), or omit it"):
        resolve_device("cuda")  # the command line and the functions taking device= keep their fix
    assert {p.device.type for p in model.network.parameters()} == {"cpu"}


@pytest.mark.parametrize("call", ["embed", "attention_maps", "embed_file"])
def test_running_on_a_device_this_machine_lacks_is_refused_with_the_fix_before_any_work(tiny, call, monkeypatch,
                                                                                        tmp_path):
    """embed / attention_maps / embed_file check an explicit device= as .to() does, rather than
    leaving it to torch's error from deep inside the forward pass (or after a temp file is made)."""
    model, adata = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = {"embed": lambda device: model.embed(adata, device=device, progress=False),
           "attention_maps": lambda device: model.attention_maps(adata[:2], device=device),
           "embed_file": lambda device: model.embed_file(adata, tmp_path / "z.npy", device=device, progress=False)}[call]
    with pytest.raises(ValueError, match=r"^device 'cuda': this torch .*; fix: pass --device cpu \(device='cpu'\)"):
        run("cuda")
    with pytest.raises(ValueError, match="device 'meta' holds no weights.*fix: "):
        run("meta")
    assert {p.device.type for p in model.network.parameters()} == {"cpu"}  # nothing moved
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert run("cpu") is not None


def test_embedding_a_layer_an_anndata_lacks_names_the_anndata_and_its_layers(tiny):
    """Not "only .h5ad files and AnnData objects have them": this is an AnnData."""
    from masksc import tl
    from masksc.errors import DataError
    model, adata = tiny
    adata = adata.copy()
    with pytest.raises(DataError, match=r"^the AnnData has no layer 'counts' \(its layers: none\); fix: drop layer= "
                                        r"\(--layer\) to read adata\.X .*adata\.layers\['counts'\] = counts\.$") as exc:
        tl.embed(adata, model, layer="counts", progress=False)
    assert "have them" not in str(exc.value) and "X_masksc" not in adata.obsm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_cuda_moves_network_and_teacher_and_embed_follows(tiny):
    model, adata = tiny
    before = model.embed(adata, progress=False)
    try:
        assert model.to("cuda") is model
        tensors = [*model.network.parameters(), *model.network.buffers()]
        assert {t.device.type for t in tensors} == {"cuda"}
        assert {p.device.type for p in model.network.teacher.parameters()} == {"cuda"}
        np.testing.assert_allclose(model.embed(adata, progress=False), before, rtol=1e-3, atol=1e-4)
        assert next(model.network.parameters()).device.type == "cuda"  # embed ran where the weights are
    finally:
        model.to("cpu")


def test_attention_maps_are_the_global_tokens_last_layer_attention_on_the_grid(tiny):
    """attention_maps = the network's last-block attention of token 0, head-averaged and laid on the
    grid by pl.attention_to_grid; each map spreads the global token's weight over the genes."""
    from masksc.data import CellBatches
    from masksc.pl import attention_to_grid
    model, adata = tiny
    cells = adata[:5]
    model.network.train()  # read out in eval mode (no dropout), the caller's mode given back
    maps = model.attention_maps(cells)
    assert model.network.training
    model.embed(cells, progress=False)
    assert model.network.training
    batch = next(iter(CellBatches(model.to_grid(cells), batch_size=5, shuffle=False)))
    with torch.no_grad():
        attn = model.network.eval().last_attention(batch)
    expected = attention_to_grid(attn, model.config.grid_shape, model.config.patch, ime=model.config.ime)
    np.testing.assert_allclose(maps, expected, rtol=1e-6)
    P = model.config.patch
    # each token's weight is repeated over its P*P genes, and the weights over tokens sum to 1 minus self
    token_sum = maps.sum(axis=(1, 2)) / (P * P)
    self_weight = attn[:, :, 0, 0].mean(dim=1).numpy()
    np.testing.assert_allclose(token_sum + self_weight, 1.0, rtol=1e-4)


def test_attention_maps_are_nan_exactly_where_the_grid_holds_no_gene():
    """40 genes on an 8 x 8 grid: the padding positions are NaN (pl.attention_grid draws them
    grey), every gene's position keeps its token's weight."""
    adata = synthetic(120, n_genes=40, n_types=2, seed=6)
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    with pytest.warns(UserWarning, match="padding"):
        preprocessor, grid, _ = preprocess_to_grid(adata, CFG, seed=0)
    torch.manual_seed(0)
    network = MaskSC(CFG).eval()
    network.set_padding(grid.is_padding)
    model = MaskSCModel(network, preprocessor, grid)
    maps = model.attention_maps(adata[:3])
    padding = grid.is_padding.reshape(CFG.grid_shape)
    assert 0 < padding.sum() < padding.size
    assert np.isnan(maps[:, padding]).all() and np.isfinite(maps[:, ~padding]).all()
    assert (maps[:, ~padding] > 0).all()


def test_submodules_are_attributes_after_a_plain_import():
    """`import masksc` then masksc.pipeline / masksc.tl / masksc.cluster, as the README writes them,
    in a fresh interpreter (no other masksc import having loaded them first)."""
    import subprocess
    import sys
    from pathlib import Path
    package = Path(__file__).resolve().parents[1] / "masksc"
    modules = {p.stem for p in package.glob("*.py")} | {p.parent.name for p in package.glob("*/__init__.py")}
    import masksc
    assert set(masksc._SUBMODULES) == {m for m in modules if not m.startswith("_")}  # masksc.masking was missing
    assert {"read", "tl", "masking"} <= set(dir(masksc))  # tab completion offers what resolves lazily
    code = ("import masksc; assert masksc.pipeline.MaskSCModel.load and masksc.tl.neighbors and "
            "masksc.cluster.kmeans and masksc.models.PRESETS and masksc.masking.random_masking_torch\n"
            "try:\n    masksc.no_such_module\nexcept AttributeError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "module 'masksc' has no attribute 'no_such_module'" in out.stdout


@pytest.mark.parametrize("damage, detail", [
    (lambda m: m.update(grid=None), r"'NoneType' object is not subscriptable"),
    (lambda m: m["preprocessor"].update(detection=[0.1, 0.2]), r"detection holds 2 values for \d+ genes"),
    (lambda m: m["preprocessor"].pop("genes"), r"missing 'genes'"),
    (lambda m: m["grid"].pop("order"), r"missing 'order'"),
    (lambda m: m.update(input="counts"), r"input is 'counts', not a dict of layer and use_raw"),
])
def test_a_damaged_saved_transform_is_named_as_a_damaged_checkpoint(tiny, tmp_path, damage, detail):
    """A config.json edited by hand or corrupted, but still JSON: loading it gave a TypeError or, at
    the first embed, a ValueError from deep inside; or told the user to pass Preprocessor.to_dict()."""
    import json

    from masksc.errors import CheckpointError
    model, adata = tiny
    path = model.save(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    damage(config["meta"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"^the transform saved in {path}/config\.json is damaged \({detail}\); "
                                              r"fix: restore the checkpoint from a copy, or fit the model again\.$"):
        MaskSCModel.load(path)


@pytest.mark.filterwarnings("ignore::masksc.errors.UncheckedGenesWarning")  # unnamed synthetic genes, few cells
def test_embed_gives_nan_rows_for_cells_min_counts_drops_as_embed_file_does(tiny, tmp_path):
    """A preprocessor with ``min_counts`` (set by hand: fit never sets it) drops cells; the in-memory
    embedding keeps one row a cell, NaN for those, so tl.embed can store it, as the streamed one does."""
    import copy

    import anndata as ad
    model, adata = tiny
    model = copy.deepcopy(model)
    sums = np.asarray(adata.X.sum(axis=1)).ravel()
    model.preprocessor.min_counts = float(np.sort(sums)[3])  # the smallest libraries fall below it
    dropped = sums < model.preprocessor.min_counts
    assert 0 < dropped.sum() <= 3
    nan_rows = rf"^{dropped.sum()} of 120 cells have NaN embeddings: the model's preprocessor drops them \(min_counts="
    with pytest.warns(UserWarning, match=nan_rows) as caught:
        Z = model.embed(adata, progress=False)
    assert len(caught) == 1 and caught[0].filename == __file__  # one warning, naming this line
    assert Z.shape == (adata.n_obs, CFG.embedding_dim)
    assert np.isnan(Z[dropped]).all() and np.isfinite(Z[~dropped]).all()
    np.testing.assert_allclose(Z[~dropped], model.embed(adata[~dropped], progress=False), rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=rf"^to_grid left out {dropped.sum()} of 120 cells: the model's preprocessor"):
        assert model.to_grid(adata).shape[0] == 120 - dropped.sum()
    user_script = tmp_path / "user_contextlib.py"  # a user's file whose name ends like contextlib's
    code = compile("import warnings\nwith warnings.catch_warnings(record=True) as seen:\n"
                   "    warnings.simplefilter('always')\n    model.embed(adata, progress=False)\n",
                   str(user_script), "exec")
    scope = {"model": model, "adata": adata}
    exec(code, scope)
    assert [(w.filename, w.lineno) for w in scope["seen"]] == [(str(user_script), 4)]  # not skipped as a wrapper
    with pytest.warns(UserWarning, match=nan_rows) as caught:
        model.embed_file(adata, tmp_path / "z.h5ad", progress=False)
    assert len(caught) == 1 and caught[0].filename == __file__
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "z.h5ad").obsm["X_masksc"], Z, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=rf"^{dropped.sum()} of {dropped.sum()} cells have NaN"):  # every cell: NaN
        assert np.isnan(model.embed(adata[dropped], progress=False)).all()  # was "no cells to batch"
    from masksc import tl
    from masksc.errors import DataError
    cells = adata.copy()
    with pytest.warns(UserWarning, match=nan_rows):
        tl.embed(cells, model, progress=False)
    first = int(np.flatnonzero(dropped)[0])
    with pytest.raises(DataError, match=rf"adata\.obsm\['X_masksc'\] has NaN or infinite values in {dropped.sum()} "
                                        rf"row\(s\), the first row {first}; fix: leave those cells out \(adata = "
                                        r"adata\[np\.isfinite\(adata\.obsm\['X_masksc'\]\)\.all\(axis=1\)\]\.copy\(\)\)"):
        tl.cluster(cells, k=2)
    tl.cluster(cells := cells[np.isfinite(cells.obsm["X_masksc"]).all(axis=1)].copy(), k=2)  # the fix works
    assert cells.n_obs == 120 - dropped.sum()
    with pytest.raises(DataError, match=rf"^1 of the cells \(row 1 \({adata.obs_names[first]}\)\) have no attention "
                                        r"map: the model's preprocessor drops them \(min_counts=.*\); fix: pass other"):
        model.attention_maps(adata[[int(np.flatnonzero(~dropped)[0]), first]])  # it returned fewer maps than cells


def test_embed_refuses_a_batch_size_before_preprocessing(tiny, monkeypatch):
    model, adata = tiny

    def no_work(*args, **kwargs):
        raise AssertionError("embed preprocessed the cells before checking batch_size")

    monkeypatch.setattr(model.preprocessor, "transform_chunks", no_work)
    from masksc.errors import DataError
    with pytest.raises(DataError, match=r"^batch_size=2\.5; fix: pass a positive whole number of cells"):
        model.embed(adata, batch_size=2.5, progress=False)


def test_embedding_no_cells_names_the_empty_data(tiny):
    """It was "no cells to batch; fix: check filtering upstream", from deep in batching."""
    from masksc import tl
    from masksc.errors import DataError
    model, adata = tiny
    for call in (lambda: model.embed(adata[:0], progress=False), lambda: tl.embed(adata[:0].copy(), model)):
        with pytest.raises(DataError, match=rf"^the data to embed holds no cells \(0 x {adata.n_vars}\); fix: pass "
                                            r"the cells to embed"):
            call()
