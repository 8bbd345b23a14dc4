"""masksc.pl writes real, non-blank PNGs and validates its inputs."""
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from matplotlib.image import imread
from threadpoolctl import threadpool_limits

from masksc import pl
from masksc.errors import DataError, MaskscError


@pytest.fixture(autouse=True)
def _one_thread():
    """Small shapes: OpenMP/BLAS threads (t-SNE) only add waiting on the shared CI cores."""
    with threadpool_limits(1):
        yield


def _png(path, min_w=200, min_h=150):
    img = imread(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] >= min_h and img.shape[1] >= min_w
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    return img


def _n_colours(img):
    return len(np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0))


def _data(n=120, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    Z = (rng.normal(size=(n, 8)) + 4 * np.eye(8)[y]).astype(np.float32)
    return Z, y


def test_embedding_tsne_two_panels(tmp_path):
    Z, y = _data()
    out = pl.embedding(Z, {"predicted": y, "true label": np.array(["a", "b", "c"])[y]}, tmp_path / "sub" / "e.png",
                       method="tsne")
    assert out == tmp_path / "sub" / "e.png"
    img = _png(out, min_w=600)
    assert img.shape[1] > 1.5 * img.shape[0]  # two panels side by side
    assert _n_colours(img) > 10
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["e.png"]  # no temp file left behind


def test_embedding_from_anndata_defaults_and_many_categories(tmp_path):
    import anndata
    import pandas as pd

    Z, y = _data(n=150, k=3)
    ad = anndata.AnnData(np.zeros((150, 2), np.float32))
    ad.obsm["X_masksc"] = Z
    ad.obs["label"] = pd.Categorical(np.array(["T", "B", "NK"])[y])
    ad.obs["masksc_cluster"] = pd.Categorical((np.arange(150) % 25).astype(str))  # 25 categories, 2-column legend
    out = pl.embedding(ad, None, tmp_path / "ad.png", method="tsne")
    img = _png(out, min_w=600)
    assert img.shape[1] > 1.5 * img.shape[0]


@pytest.mark.slow
def test_embedding_umap(tmp_path):
    Z, y = _data(n=100)
    _png(pl.embedding(Z, {"cluster": y}, tmp_path / "u.png", method="umap"))


def test_embedding_umap_falls_back_to_tsne(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    Z, y = _data(n=80)
    with pytest.warns(UserWarning, match="falling back to t-SNE"):
        out = pl.embedding(Z, {"cluster": y}, tmp_path / "f.png", method="umap")
    _png(out)
    with pytest.warns(UserWarning, match="falling back to t-SNE"):
        fig = pl.embedding(Z, {"cluster": y}, method="umap")
    assert fig.axes[0].get_xlabel() == "TSNE 1"  # the axes name the map that was drawn


def test_embedding_without_a_path_returns_the_figure_and_writes_nothing(tmp_path, monkeypatch):
    """path=None gives the Figure (a notebook shows it); the clusters of the last tl.cluster
    and the labels are the default panels, unlabelled cells one grey "NA" entry."""
    import anndata
    import pandas as pd
    from matplotlib.figure import Figure

    monkeypatch.chdir(tmp_path)
    Z, y = _data(n=90, k=3)
    ad = anndata.AnnData(np.zeros((90, 2), np.float32))
    ad.obsm["X_masksc"] = Z
    labels = np.array(["T", "B", "NK"], dtype=object)[y]
    labels[:7] = None
    ad.obs["label"] = pd.Categorical(labels)
    ad.obs["leiden_masksc"] = pd.Categorical(y.astype(str))
    ad.uns["masksc"] = {"cluster": {"key": "leiden_masksc"}}
    fig = pl.embedding(ad, method="tsne")
    assert isinstance(fig, Figure) and list(tmp_path.iterdir()) == []
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["leiden_masksc", "label"]
    legend = [t.get_text() for t in panels[1].get_legend().get_texts()]
    assert legend[0] == "NA (7)" and sorted(legend[1:]) == sorted(
        f"{c} ({int(((labels == c)).sum())})" for c in ("T", "B", "NK"))
    assert isinstance(pl.loss_curve([3.0, 2.0]), Figure)
    assert isinstance(pl.attention_grid(np.random.default_rng(0).random((2, 8, 8))), Figure)
    assert list(tmp_path.iterdir()) == []


def test_single_panels_draw_into_the_callers_axes(tmp_path):
    """ax= composes masksc panels into a figure of one's own, as scanpy's plots do."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    Z, y = _data(n=60)
    assert pl.embedding(Z, {"cluster": y}, method="tsne", ax=left) is left
    assert pl.loss_curve([3.0, 2.0, 1.5], ax=right) is right
    assert left.get_title() == "cluster" and len(left.get_legend().get_texts()) == 3 and right.get_ylabel() == "loss"
    fig.savefig(tmp_path / "mine.png")
    _png(tmp_path / "mine.png", min_w=600)
    with pytest.raises(ValueError, match="ax= takes one panel, but there are 2 colourings"):
        pl.embedding(Z, {"a": y, "b": y}, method="tsne", ax=left)
    with pytest.raises(ValueError, match="pass path=None with it"):
        pl.loss_curve([1.0], tmp_path / "x.png", ax=right)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]


def test_a_wrong_suffix_is_refused_before_the_map_is_computed(tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the map was computed before the path was checked")

    monkeypatch.setattr(pl, "_coords_2d", no_work)
    Z, y = _data(n=50)
    with pytest.raises(ValueError, match=r"ending in \.png .*x\.pdf"):
        pl.embedding(Z, {"c": y}, tmp_path / "x.pdf")


def test_embedding_precomputed_and_subsample(tmp_path):
    rng = np.random.default_rng(1)
    xy = rng.normal(size=(500, 2))
    before = xy.copy()
    out = pl.embedding(xy, {"score": rng.random(500)}, tmp_path / "p.png", method="precomputed", max_cells=200)
    _png(out)
    np.testing.assert_array_equal(xy, before)


def test_numbers_with_many_values_get_a_colour_bar_and_their_nan_cells_are_drawn_grey():
    """A count per cell (integers, as scanpy's n_genes_by_counts) is continuous, as in scanpy, not
    hundreds of unlegended categories; NaN cells of a score stay on the map, grey; a few integer
    labels stay categories."""
    rng = np.random.default_rng(4)
    xy = rng.normal(size=(300, 2))
    score = rng.random(300)
    score[:9] = np.nan
    colorings = {"n_genes": rng.integers(100, 2000, 300), "score": score, "label": rng.integers(0, 8, 300)}
    fig = pl.embedding(xy, colorings, method="precomputed")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"n_genes", "score", "label"}  # no "(300 categories, no legend)"
    assert len(fig.axes) == 5  # three panels, a colour bar for each continuous one
    counts = panels["n_genes"].collections
    assert len(counts) == 1 and len(counts[0].get_offsets()) == 300
    grey, coloured = panels["score"].collections
    assert len(grey.get_offsets()) == 9 and len(coloured.get_offsets()) == 291
    assert [t.get_text() for t in panels["score"].get_legend().get_texts()] == ["NA (9)"]
    assert len(panels["label"].get_legend().get_texts()) == 8
    score[:2] = [np.inf, -np.inf]  # matplotlib masked them: the cells left the map without a word
    panel = pl.embedding(xy, {"score": score}, method="precomputed").axes[0]
    grey, coloured = panel.collections
    assert len(grey.get_offsets()) == 9 and not np.ma.is_masked(coloured.get_offsets())
    assert [t.get_text() for t in panel.get_legend().get_texts()] == ["NA / inf (9)"]


def test_a_categorical_column_of_many_integer_categories_stays_categorical():
    """obs["clusters"] as a Categorical of 40 integers (leiden's, say) is categories, not a colour bar."""
    import anndata as ad
    rng = np.random.default_rng(5)
    cells = ad.AnnData(obs=pd.DataFrame({"clusters": pd.Categorical(rng.integers(0, 40, 300)),
                                         "n_genes": rng.integers(100, 2000, 300)},
                                        index=[f"c{i}" for i in range(300)]),
                       obsm={"X_umap": rng.normal(size=(300, 2)).astype(np.float32)})
    fig = pl.embedding(cells, ["clusters", "n_genes"], basis="umap")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"clusters (40 categories, no legend)", "n_genes"}
    assert len(fig.axes) == 3  # one colour bar: the counts'
    (drawn,) = panels["clusters (40 categories, no legend)"].collections
    assert len(drawn.get_offsets()) == 300 and len(np.unique(drawn.get_facecolors(), axis=0)) == 40


def test_a_categorical_column_keeps_its_order_and_scanpys_stored_colours():
    """The legend follows the categories' order, and uns["<column>_colors"] (as scanpy stores them)
    colour them, so a map here matches sc.pl.umap's; without stored colours a category keeps its
    colour when a sample lacks another one."""
    import anndata as ad
    from matplotlib.colors import to_rgba
    rng = np.random.default_rng(5)
    order = ["type_3", "type_2", "type_1", "type_0"]
    cells = ad.AnnData(obs=pd.DataFrame({"t": pd.Categorical(rng.choice(order, 200), categories=order)},
                                        index=[f"c{i}" for i in range(200)]),
                       obsm={"X_umap": rng.normal(size=(200, 2)).astype(np.float32)})
    cells.uns["t_colors"] = ["#ff0000", "#00ff00", "#0000ff", "#000000"]
    fig = pl.embedding(cells, "t", basis="umap")
    legend = [text.get_text().split(" (")[0] for text in fig.axes[0].get_legend().get_texts()]
    assert legend == order
    assert _legend_colors(fig.axes[0]) == [to_rgba(c) for c in cells.uns["t_colors"]]
    (drawn,) = fig.axes[0].collections  # each cell in its category's colour, in data order
    assert [tuple(c) for c in drawn.get_facecolors()] == [
        to_rgba(cells.uns["t_colors"][order.index(t)]) for t in cells.obs["t"]]
    del cells.uns["t_colors"]
    whole = _legend_colors(pl.embedding(cells, "t", basis="umap").axes[0])
    values = cells.obs["t"].to_numpy()
    no_type_2 = pd.Categorical(np.where(values == "type_2", "type_3", values), categories=order)  # unused category
    fig = pl.embedding(cells.obsm["X_umap"], {"t": no_type_2})
    assert _legend_colors(fig.axes[0]) == [whole[0], whole[2], whole[3]]


def _legend_colors(ax) -> list:
    """The RGBA colour of each legend entry of ``ax``, in order."""
    from matplotlib.colors import to_rgba
    return [to_rgba(handle.get_color()) for handle in ax.get_legend().legend_handles]


def test_integer_categories_beside_missing_cells_are_drawn_and_a_series_keeps_its_categories():
    """Categories 10, 2, 1 with NaN cells: every labelled cell is drawn under its category (the
    object values of such a column are floats, 1.0, which named no category), and an obs column
    passed as a Series keeps its categories' order."""
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(200, 2)).astype(np.float32)
    f = pd.Series(pd.Categorical([1, 2, 10] * 66 + [np.nan, np.nan], categories=[10, 2, 1]))
    ax = pl.embedding(Z, {"f": f}).axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["NA (2)", "10 (66)", "2 (66)", "1 (66)"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 200


def test_attention_grid_takes_a_colormap_object_as_matplotlib_does():
    from matplotlib import colormaps
    fig = pl.attention_grid(np.random.default_rng(0).random((1, 4, 4)), cmap=colormaps["viridis"])
    assert fig.axes[0].images[0].cmap.name == "viridis"


def test_embedding_of_very_few_cells_is_drawn_or_refused_with_a_fix(tmp_path):
    """UMAP's spectral layout fails below 16 cells: t-SNE draws them, saying so; max_cells below 2
    cannot make a map."""
    Z, y = _data(n=3)
    with pytest.warns(UserWarning, match="3 cells are too few for UMAP's spectral layout.*t-SNE"):
        fig = pl.embedding(Z, {"c": y})
    assert [ax.get_xlabel() for ax in fig.axes if ax.get_title()] == ["TSNE 1"]
    with pytest.warns(UserWarning, match="2 cells are too few"):
        _png(pl.embedding(Z[:2], {"c": y[:2]}, tmp_path / "two.png"))
    for bad in (0, 1, 2.5, True):
        with pytest.raises(DataError, match=rf"max_cells must be an integer >= 2 .*got {bad!r}"):
            pl.embedding(Z, {"c": y}, max_cells=bad)


def test_embedding_rejects_bad_input(tmp_path):
    Z, y = _data(n=50)
    with pytest.raises(DataError, match="one label per cell"):
        pl.embedding(Z, {"c": y[:-1]}, tmp_path / "x.png", method="tsne")
    Zn = Z.copy()
    Zn[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        pl.embedding(Zn, {"c": y}, tmp_path / "x.png", method="tsne")
    with pytest.raises(ValueError, match="method"):
        pl.embedding(Z, {"c": y}, tmp_path / "x.png", method="pca")
    with pytest.raises(ValueError, match=r"give a path ending in \.png .*got '.*x\.jpg'"):
        pl.embedding(Z[:, :2], {"c": y}, tmp_path / "x.jpg", method="precomputed")
    with pytest.raises(DataError, match="2-D coordinates"):
        pl.embedding(Z, {"c": y}, tmp_path / "x.png", method="precomputed")
    for method in ("tsne", "umap"):  # t-SNE on identical points crashed the process (SIGSEGV)
        with pytest.raises(DataError, match=r"every one of the 50 cells has the same embedding, .* fix: check the "
                                            r"model"):
            pl.embedding(np.ones_like(Z), {"c": y}, tmp_path / "x.png", method=method)
    assert list(tmp_path.iterdir()) == []


def test_a_sparse_or_one_column_embedding_is_drawn_as_its_dense_values(tmp_path):
    """The tl functions take a sparse obsm entry: pl.embedding called it 'shape ()'; t-SNE's PCA
    start needs two columns, so one column raised sklearn's error."""
    import anndata as ad
    import scipy.sparse as sp
    Z, y = _data(n=60)
    a = ad.AnnData(obs=pd.DataFrame({"c": pd.Categorical(y.astype(str))}, index=[f"c{i}" for i in range(60)]))
    a.obsm["dense"], a.obsm["sparse"], a.obsm["one"] = Z, sp.csr_matrix(Z), Z[:, :1]
    for basis in ("dense", "sparse", "one"):
        _png(pl.embedding(a, "c", tmp_path / f"{basis}.png", method="tsne", basis=basis))
    np.testing.assert_array_equal(imread(str(tmp_path / "sparse.png")), imread(str(tmp_path / "dense.png")))


def test_attention_to_grid_gives_each_gene_its_patchs_weight():
    torch.manual_seed(0)
    B, H, g, s, P = 2, 3, 8, 12, 4
    gh, gw = g // P, s // P
    attn = torch.softmax(torch.randn(B, H, 1 + gh * gw, 1 + gh * gw), dim=-1)
    grid = pl.attention_to_grid(attn, (g, s), P)
    per_patch = attn[:, :, 0, 1:].mean(1).reshape(B, gh, gw).numpy()
    np.testing.assert_allclose(grid, np.kron(per_patch, np.ones((P, P))), rtol=1e-6)
    assert grid[1, 5, 9] == pytest.approx(attn[1, :, 0, 1 + (5 // P) * gw + 9 // P].mean().item(), rel=1e-6)
    with pytest.raises(DataError, match="n_prefix"):
        pl.attention_to_grid(attn, (16, 16), P)
    with pytest.raises(DataError, match=r"grid 10x12 is not divisible into 4x4 patches"):  # a row of 0s drawn
        pl.attention_to_grid(attn, (10, 12), P)


def test_attention_to_grid_without_ime_follows_gene_runs():
    torch.manual_seed(1)
    B, H, g, s, P = 2, 2, 8, 12, 2
    G = (g // P) * (s // P)
    attn = torch.softmax(torch.randn(B, H, 1 + G, 1 + G), dim=-1)
    grid = pl.attention_to_grid(attn, (g, s), P, ime=False).reshape(B, g * s)
    per_token = attn[:, :, 0, 1:].mean(1).numpy()
    np.testing.assert_allclose(grid, np.repeat(per_token, P * P, axis=1), rtol=1e-6)  # token t: genes 4t..4t+3


def test_attention_grid_png(tmp_path):
    rng = np.random.default_rng(2)
    maps = rng.random((5, 16, 16))
    out = pl.attention_grid(maps, [f"cell {i} (T)" for i in range(5)], tmp_path / "attn.png")
    img = _png(out, min_w=600, min_h=300)  # 4 + 1 panels: two rows
    assert _n_colours(img) > 50
    _png(pl.attention_grid(rng.random((2, 64, 64)), None, tmp_path / "genes.png"))


def test_attention_grid_draws_positions_without_a_gene_grey_and_says_so(tmp_path):
    """NaN (grid padding, as MaskSCModel.attention_maps marks it) is drawn light grey, not as the
    colour map's darkest colour, which would read as genes with no attention."""
    from matplotlib.colors import to_rgba
    maps = np.random.default_rng(3).random((2, 16, 16)) * 0.01
    maps[:, 12:, :] = np.nan  # the last 4 rows hold no gene
    fig = pl.attention_grid(maps)
    image = fig.axes[0].images[0]
    assert image.cmap.get_bad() == pytest.approx(to_rgba("lightgrey"))
    assert fig._suptitle.get_text().endswith("(grey: no gene)")
    img = _png(pl.attention_grid(maps, None, tmp_path / "padded.png"))
    grey = np.all(np.abs(img[..., :3] - np.array(to_rgba("lightgrey")[:3])) < 2 / 255, axis=-1)
    assert grey.sum() > 1000  # two 16 x 4 bands, several pixels per position
    assert "grey" not in pl.attention_grid(np.nan_to_num(maps))._suptitle.get_text()


def test_attention_grid_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match="n_cells, h, w"):
        pl.attention_grid(np.ones((4, 4)), None, tmp_path / "a.png")
    with pytest.raises(DataError, match="titles"):
        pl.attention_grid(np.ones((2, 4, 4)), ["only one"], tmp_path / "a.png")
    with pytest.raises(DataError, match=r"attn_maps \[1\] are NaN everywhere.*fix: "):
        pl.attention_grid(np.stack([np.ones((4, 4)), np.full((4, 4), np.nan)]), None, tmp_path / "a.png")
    with pytest.raises(DataError, match="finite"):
        pl.attention_grid(np.full((1, 4, 4), np.inf), None, tmp_path / "a.png")
    negative = np.full((1, 4, 4), 0.1)
    negative[0, 2, 3] = -0.5
    with pytest.raises(DataError, match="1 negative values"):
        pl.attention_grid(negative, None, tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_loss_curve(tmp_path):
    _png(pl.loss_curve([5.0, 3.0, 2.0, 1.5, 1.4, float("nan"), 1.2], tmp_path / "l.png"))
    img = _png(pl.loss_curve({"train": np.geomspace(100, 0.1, 50), "val": np.geomspace(120, 0.2, 50)},
                             tmp_path / "l2.png"))
    assert _n_colours(img) > 5
    with pytest.raises(DataError, match="empty"):
        pl.loss_curve([], tmp_path / "x.png")
    with pytest.raises(DataError, match="NaN"):
        pl.loss_curve([float("nan")] * 3, tmp_path / "x.png")
    with pytest.raises(DataError, match="empty"):
        pl.loss_curve({}, tmp_path / "x.png")


def test_plots_keep_an_existing_file_unless_told_to_overwrite(tmp_path):
    """overwrite=False (the command line without --overwrite) refuses an existing PNG before any
    work; the default replaces it, as matplotlib's savefig does."""
    Z, y = _data(n=40, k=2)
    path = tmp_path / "p.png"
    path.write_bytes(b"mine")
    calls = [lambda **kw: pl.loss_curve([3.0, 2.0], path, **kw),
             lambda **kw: pl.embedding(Z[:, :2], {"label": y}, path, **kw),
             lambda **kw: pl.attention_grid(np.ones((1, 4, 4)), None, path, **kw)]
    for draw in calls:
        with pytest.raises(MaskscError, match=r"p\.png exists; fix: pass --overwrite"):
            draw(overwrite=False)
        assert path.read_bytes() == b"mine"
    for draw in calls:
        _png(draw())
        path.write_bytes(b"mine")


def test_embedding_takes_scanpy_style_basis_and_color(tmp_path, monkeypatch):
    """basis="umap" finds obsm["X_umap"], a 2-D map is drawn as it is, color= one obs column."""
    import anndata
    import pandas as pd

    Z, y = _data(n=120, k=3)
    ad = anndata.AnnData(np.zeros((120, 2), np.float32))
    ad.obsm["X_umap"] = Z[:, :2].copy()
    ad.obs["label"] = pd.Categorical(np.array(["T", "B", "NK"])[y])
    seen = []
    monkeypatch.setattr(pl, "_coords_2d", lambda Z, method, seed: seen.append((Z.copy(), method)) or (Z, method))
    _png(pl.embedding(ad, "label", tmp_path / "u.png", basis="umap"))
    assert seen[0][1] == "precomputed" and np.array_equal(seen[0][0], ad.obsm["X_umap"])


def test_embedding_plot_names_values_float32_cannot_hold_apart_from_nan(tmp_path):
    Z = np.random.default_rng(0).normal(size=(50, 4))
    Z[3, 1] = 1e39
    with pytest.raises(DataError, match=r"embedding has values too large for float32 .* in 1 row\(s\); fix"):
        pl.embedding(Z, path=tmp_path / "big.png", method="tsne")
    Z[3, 1] = np.nan
    with pytest.raises(DataError, match=r"embedding has NaN or infinite values in 1 row\(s\)"):
        pl.embedding(Z, path=tmp_path / "nan.png", method="tsne")


def test_loss_curve_reads_a_run_directory_and_names_the_fix_for_other_objects(tmp_path):
    """A run directory draws its recorded losses (the figure of the list itself); an object that is
    not numbers (a model, say) is a DataError naming what to pass."""
    import json
    run = tmp_path / "run" / "epoch-000002"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"format": "masksc-checkpoint", "format_version": 1}))
    (run / "trainer_state.json").write_text(json.dumps({"losses": [0.9, 0.5]}))
    (tmp_path / "run" / "last").symlink_to("epoch-000002")
    pl.loss_curve(tmp_path / "run", tmp_path / "dir.png")
    pl.loss_curve([0.9, 0.5], tmp_path / "list.png")
    np.testing.assert_array_equal(imread(str(tmp_path / "dir.png")), imread(str(tmp_path / "list.png")))
    with pytest.raises(DataError, match=r"must be numbers, got a object; fix: pass the losses"):
        pl.loss_curve(object())


def _legend_texts(labels) -> list[str]:
    """The labels as pl.embedding's legend lists them, read off the figure it draws."""
    xy = np.random.default_rng(0).normal(size=(len(labels), 2))
    fig = pl.embedding(xy, color={"l": labels}, method="precomputed")
    texts = [t.get_text().rsplit(" (", 1)[0] for t in fig.axes[0].get_legend().get_texts()]
    return [t for t in texts if t != "NA"]


@pytest.mark.parametrize("labels", [
    np.array([10, 2, np.nan, 2, 10, 33, 2, np.nan, 10, 10]),                 # numbers: 2 before 10
    np.array(["b", None, "a", "c", "a", np.nan, "b", "b"], dtype=object),    # text; None and NaN missing
    np.array(["t10", "t2", "t10", "t1"]),                                    # text naturally: t2 before t10
    np.array(["10", "2", "-1", "0.5", "2"]),                                 # numbers as text: by value
    np.array(["1.5", "1.10", "1.2"]),
    np.array(["1e3", "5", "20", "5"]),
    np.array(["type_10", 3, "type_2", 3], dtype=object),                     # mixed
    np.array([1, "2", 10, True, 1], dtype=object),                           # True and 1 apart, as drawn
    np.array(["²", "a", "²"]),                                               # a digit int() cannot read
    np.array(["1", "nan", "2", "10", "nan", "3", "0.5"] * 3, dtype=object),  # astype(str) of NaN: last
    pd.Series(pd.Categorical([10, 2, None, 2, 10, 2], categories=[2, 10])),  # an obs column
    pd.Series(pd.Categorical(["NK", "B", "T", "B"], categories=["T", "x", "NK", "B"])),  # its own order
    pd.Series(pd.Categorical([1, "1", "a", "a"], categories=[1, "1", "a"])),  # 1 and "1": one legend entry
    [3, 1, 2, 1, 3],                                                         # a plain list
])
def test_one_cell_per_label_follows_the_legend_and_draws_every_cell_of_a_label(labels):
    legend = _legend_texts(labels)
    values = np.asarray(labels, dtype=object)
    texts = np.array([None if pd.isna(v) else pl._label_text(v) for v in values], dtype=object)
    drawn = {text: set() for text in legend}
    for seed in range(40):
        picks = pl.one_cell_per_label(labels, seed)
        assert picks.dtype == np.int64 and list(texts[picks]) == legend  # one per legend entry, in its order
        np.testing.assert_array_equal(pl.one_cell_per_label(labels, seed), picks)  # the seed decides
        for n in (0, 1, 2, len(legend) + 5):
            np.testing.assert_array_equal(pl.one_cell_per_label(labels, seed, n=n), picks[:n])
        for text, i in zip(legend, picks):
            drawn[text].add(int(i))
    for text, cells in drawn.items():  # over the seeds, every cell of a label gets drawn
        assert cells == set(np.flatnonzero(texts == text).tolist()), text


def test_one_cell_per_label_reads_the_labels_once_not_once_per_label():
    """Linear in the cells: not one comparison of the whole column per label (quadratic with one
    label per cell: 40 minutes at 1M cells). Counted, not timed."""
    class Scans(np.ndarray):
        count = 0

        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            Scans.count += 1
            return getattr(ufunc, method)(*(np.asarray(x) for x in inputs), **kwargs)

    labels = np.arange(500).repeat(2).view(Scans)
    picks = pl.one_cell_per_label(labels, 0)
    assert Scans.count <= 2 and picks.shape == (500,)
    np.testing.assert_array_equal(np.asarray(labels)[picks], np.arange(500))


def test_one_cell_per_label_edge_cases():
    assert pl.one_cell_per_label(np.array([np.nan, np.nan]), 0).shape == (0,)
    assert pl.one_cell_per_label([], 0).shape == (0,)
    with pytest.raises(ValueError, match="n must be a non-negative integer or None"):
        pl.one_cell_per_label([1, 2], 0, n=-1)
    with pytest.raises(DataError, match=r"labels must be 1-D .*got shape \(2, 2\)"):
        pl.one_cell_per_label(np.ones((2, 2)), 0)


def _gene_adata():
    """120 cells on a precomputed 2-D map, 3 genes of counts in X (7 distinct values: few enough
    that an obs column of them would be categories), log values in a layer and a .raw of 4 genes."""
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    counts = rng.poisson(1.5, size=(120, 3)).clip(0, 6).astype(np.float32)
    ad = anndata.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=["CD3E", "MS4A1", "LYZ"]))
    ad.obs_names = [f"c{i}" for i in range(120)]
    ad.layers["log"] = np.log1p(counts)
    raw = anndata.AnnData(counts[:, [2, 0, 1, 2]] * 10, var=pd.DataFrame(index=["LYZ", "CD3E", "MS4A1", "NKG7"]))
    ad.raw = raw
    ad.obsm["X_umap"] = rng.normal(size=(120, 2)).astype(np.float32)
    ad.obs["label"] = pd.Categorical(rng.choice(["T", "B"], 120))
    return ad, counts


def _drawn_values(ax, xy: np.ndarray) -> np.ndarray:
    """The colour values of the one colour-mapped scatter in ``ax``, in the row order of the cells
    at ``xy`` [n, 2]; the points are drawn in increasing value (the highest on top)."""
    (mapped,) = [c for c in ax.collections if c.get_array() is not None]
    values, points = np.asarray(mapped.get_array()), mapped.get_offsets()
    assert (np.diff(values) >= 0).all()
    rows = [int(np.flatnonzero((xy == p).all(axis=1))[0]) for p in points]
    assert sorted(rows) == list(range(len(xy)))
    return values[np.argsort(rows)]


def test_a_gene_is_drawn_by_its_values_from_x_a_layer_or_raw():
    """As scanpy's color=: a gene name draws that gene's values on a colour map (with a colour
    bar) even when it has few distinct values, read from X, layers[layer] or .raw (by default .raw
    when there is one and no layer, scanpy's rule); the panel's title names where from; obs
    columns beside it stay categories; names may come as a pd.Index or an array."""
    from matplotlib.figure import Figure

    ad, counts = _gene_adata()
    without_raw = ad.copy()
    del without_raw.raw
    for adata, kwargs, expected, title in [(ad, {"use_raw": False}, counts[:, 1], "MS4A1"),
                                           (ad, {"layer": "log"}, np.log1p(counts[:, 1]), "MS4A1 (log)"),
                                           (ad, {"use_raw": True}, counts[:, 1] * 10, "MS4A1 (raw)"),
                                           (ad, {}, counts[:, 1] * 10, "MS4A1 (raw)"),
                                           (without_raw, {}, counts[:, 1], "MS4A1")]:
        fig = Figure()
        ax = fig.add_subplot()
        assert pl.embedding(adata, "MS4A1", basis="umap", ax=ax, **kwargs) is ax
        np.testing.assert_allclose(_drawn_values(ax, ad.obsm["X_umap"]), expected, rtol=1e-6)
        assert ax.get_title() == title and len(fig.axes) == 2  # the panel and its colour bar
    fig = pl.embedding(ad, ["label", "NKG7"], basis="umap", use_raw=True)
    label_ax, gene_ax = fig.axes[:2]
    for names in (pd.Index(["CD3E", "LYZ"]), np.array(["CD3E", "LYZ"])):
        assert [a.get_title() for a in pl.embedding(ad, names, basis="umap", use_raw=False).axes[:2]] == ["CD3E", "LYZ"]
    assert [t.get_text() for t in label_ax.get_legend().get_texts()] == [
        f"{c} ({int((ad.obs['label'] == c).sum())})" for c in ad.obs["label"].cat.categories]
    np.testing.assert_allclose(_drawn_values(gene_ax, ad.obsm["X_umap"]), counts[:, 2] * 10)
    assert ad.X.nnz == np.count_nonzero(counts)  # nothing the caller gave was changed


def test_a_gene_of_a_backed_file_is_read_from_disk(tmp_path, monkeypatch):
    import anndata

    monkeypatch.setattr(pl, "GENE_READ_ROWS", 7)  # blocks of rows, the last one short
    ad, counts = _gene_adata()
    ad.write_h5ad(tmp_path / "g.h5ad")
    backed = anndata.read_h5ad(tmp_path / "g.h5ad", backed="r")
    from matplotlib.figure import Figure
    ax = Figure().add_subplot()
    pl.embedding(backed, "LYZ", basis="umap", ax=ax, use_raw=False)
    np.testing.assert_allclose(_drawn_values(ax, ad.obsm["X_umap"]), counts[:, 2])
    ax = Figure().add_subplot()
    pl.embedding(backed, "LYZ", basis="umap", ax=ax)  # its .raw, by scanpy's rule
    np.testing.assert_allclose(_drawn_values(ax, ad.obsm["X_umap"]), counts[:, 2] * 10)
    backed.file.close()


def test_a_gene_of_a_backed_csr_file_is_read_in_blocks_of_rows(tmp_path, monkeypatch):
    """One gene's column of a backed CSR matrix is its in-memory column, read holding a block of
    rows at a time, not the whole matrix (anndata's column indexing reads it all)."""
    import tracemalloc

    import anndata
    X = sp.random(20_000, 400, density=0.1, format="csr", dtype=np.float32, random_state=0)
    anndata.AnnData(X, var=pd.DataFrame(index=[f"g{j}" for j in range(400)])).write_h5ad(tmp_path / "big.h5ad")
    backed = anndata.read_h5ad(tmp_path / "big.h5ad", backed="r")
    monkeypatch.setattr(pl, "GENE_READ_ROWS", 1000)
    tracemalloc.start()
    values = pl._gene_values(backed, "g123")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    backed.file.close()
    np.testing.assert_array_equal(values, X[:, 123].toarray().ravel())
    assert peak < (X.data.nbytes + X.indices.nbytes) / 4, peak


def test_gene_colours_refuse_what_they_cannot_read_naming_the_fix():
    import anndata

    ad, _ = _gene_adata()
    with pytest.raises(DataError, match=r"\['GAPDH'\] are neither obs columns nor genes of var_names; obs columns: "
                                        r"\['label'\]"):
        pl.embedding(ad, ["label", "GAPDH"], basis="umap", use_raw=False)
    with pytest.raises(DataError, match=r"genes of adata\.raw"):
        pl.embedding(ad, "GAPDH", basis="umap")
    clash = ad.copy()
    clash.obs["LYZ"] = 1.0
    with pytest.raises(DataError, match=r"\['LYZ'\] name both an obs column and a gene.*rename the obs column"):
        pl.embedding(clash, "LYZ", basis="umap")
    twice = ad.copy()
    twice.var_names = ["CD3E", "LYZ", "LYZ"]
    with pytest.raises(DataError, match=r"gene 'LYZ' names 2 columns.*var_names_make_unique"):
        pl.embedding(twice, "LYZ", basis="umap", use_raw=False)
    with pytest.raises(DataError, match=r"no layer 'counts'; fix: pass one of \['log'\]"):
        pl.embedding(ad, "LYZ", basis="umap", layer="counts")
    embedded = anndata.AnnData(obs=ad.obs[["label"]], obsm={"X_masksc": ad.obsm["X_umap"]})
    with pytest.raises(DataError, match=r"it has no genes: a `masksc embed` output stores only obs"):
        pl.embedding(embedded, "LYZ")
    with pytest.raises(ValueError, match="a dict of labels reads none"):
        pl.embedding(ad, {"x": np.zeros(120)}, basis="umap", layer="log")
    with pytest.raises(ValueError, match="with an array, drop them"):
        pl.embedding(ad.obsm["X_umap"], use_raw=True)
    with pytest.raises(DataError, match=r"and 115 more are neither .*color looks like one value per cell \(120 of "
                                        r"them\): pass it as color=\{'title': values\}") as exc:
        pl.embedding(ad, ad.obs["label"].to_numpy(), basis="umap")  # values, not names
    assert len(str(exc.value)) < 400
    # the same values as a Series (an obs column), or with an array: a numpy/pandas "truth value is ambiguous"
    with pytest.raises(DataError, match=r"color looks like one value per cell \(120 of them\)"):
        pl.embedding(ad, color=ad.obs["label"], basis="umap")
    for values in (ad.obs["label"], ad.obs["label"].to_numpy()):
        with pytest.raises(DataError, match=rf"color must be a dict .*got a {type(values).__name__}; fix: e\.g\. "
                                            r"color=\{'label': values\}"):
            pl.embedding(ad.obsm["X_umap"], values, method="precomputed")


def test_the_earlier_color_by_name_still_works_with_a_future_warning(tmp_path):
    from matplotlib.figure import Figure
    ad, _ = _gene_adata()
    ax = Figure().add_subplot()
    with pytest.warns(FutureWarning, match=r"color_by= is now color="):
        pl.embedding(ad, basis="umap", ax=ax, color_by="label")
    assert ax.get_title() == "label"
    with pytest.raises(TypeError, match="pass color= alone"):
        pl.embedding(ad, "label", basis="umap", color_by="label")


def test_loss_curves_skip_gaps_and_count_epochs_in_whole_numbers():
    """A curve with NaN every other point drew nothing past 30 points (each NaN broke the line
    and no markers were drawn); the epoch axis showed 1.2, 1.4, ..."""
    val = np.full(60, np.nan)
    val[::2] = np.linspace(2, 1, 30)
    ax = pl.loss_curve({"train": np.linspace(3, 1, 60), "val": val}).axes[0]
    drawn = ax.get_lines()[1].get_xydata()
    np.testing.assert_array_equal(drawn, np.column_stack([np.arange(1, 61, 2), val[::2]]))
    for losses in ([2.0, 1.5], [2.0]):  # one epoch was labelled 0.95, 0.975, ...
        ax = pl.loss_curve(losses).axes[0]
        assert all(float(t).is_integer() for t in ax.xaxis.get_majorticklocs())


def test_number_labels_are_ordered_by_value_and_named_as_whole_numbers():
    Z, _ = _data(n=60)
    for values, expected in (
            (np.repeat([2, -1, 0, 1, -2], 12), ["-2", "-1", "0", "1", "2"]),
            (np.repeat([0.5, 0.05, 1.0, 0.25, 0.75], 12), ["0.05", "0.25", "0.5", "0.75", "1"]),
            (pd.array([1, 2, None] * 20, dtype="Int64"), ["NA", "1", "2"])):
        legend = pl.embedding(Z, {"v": values}, method="tsne").axes[0]
        assert [t.get_text().split(" (")[0] for t in legend.get_legend().get_texts()] == expected


def test_panels_wrap_at_four_a_row_and_a_sample_is_named_on_the_figure():
    Z, y = _data(n=60)
    fig = pl.embedding(Z, {f"c{i}": y for i in range(6)}, method="tsne", max_cells=40, seed=3)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 6 and len({round(ax.get_position().y0, 3) for ax in panels}) == 2
    assert fig.get_suptitle() == "a random sample of 40 of 60 cells (seed 3)"
    assert sum(len(c.get_offsets()) for c in panels[0].collections) == 40


def test_small_and_empty_colourings_stay_readable():
    """One category still gets its legend, an all-NaN gene no 0..1 colour bar, 11-20 categories
    scanpy's default_20 (tab20 put dark and light shades of one hue side by side)."""
    from matplotlib.colors import to_rgba
    from scanpy.plotting.palettes import default_20
    Z, _ = _data(n=60)
    ax = pl.embedding(Z, {"one": np.array(["only"] * 60)}, method="tsne").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["only (60)"]
    fig = pl.embedding(Z, {"gene": np.full(60, np.nan)}, method="tsne")
    assert len(fig.axes) == 1  # no colour bar
    ax = pl.embedding(Z, {"many": np.arange(60) % 15}, method="tsne").axes[0]
    assert _legend_colors(ax) == [to_rgba(c) for c in default_20[:15]]


def test_bad_seed_palette_and_path_are_caught_before_the_map(tmp_path, monkeypatch):
    import anndata as ad
    Z, y = _data(n=60)
    monkeypatch.setattr(pl, "_coords_2d", lambda *a: pytest.fail("mapped before the check"))
    with pytest.raises(DataError, match=r"seed must be an integer in \[0, 2\*\*32 - 1\] \(what UMAP and t-SNE take\)"):
        pl.embedding(Z, {"c": y}, method="tsne", seed=5_000_000_000)
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(MaskscError, match=r"file\.txt"):
        pl.embedding(Z, {"c": y}, tmp_path / "file.txt" / "x.png", method="tsne")
    monkeypatch.undo()
    cells = ad.AnnData(obs=pd.DataFrame({"ph": pd.Categorical(np.array(["a", "b", "c"])[np.arange(60) % 3])},
                                        index=[f"c{i}" for i in range(60)]),
                       obsm={"X_umap": Z[:, :2].astype(np.float32)})
    cells.uns["ph_colors"] = ["notacolor", "#ff0000", "#00ff00"]
    with pytest.warns(UserWarning, match=r"uns\['ph_colors'\] holds values that are not colours \(e\.g\. "
                                         r"'notacolor'\); drawing 'ph' in the default palette"):
        ax = pl.embedding(cells, "ph", basis="umap").axes[0]
    assert len(_legend_colors(ax)) == 3


def test_labels_whose_texts_collide_are_each_counted_and_coloured():
    """Categories 1 and "1" crashed the single scatter; object labels True and 1 lost the 1s from
    the legend (pandas treats them as one value) and painted them another label's colour; an
    uncoloured map has no "0" legend; 1e300 is not written out in 301 digits."""
    Z, _ = _data(n=200)
    ax = pl.embedding(Z, {"c": pd.Categorical([1, "1"] * 100)}, method="tsne").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1 (200)"]
    ax = pl.embedding(Z, {"c": np.array([True, 1, 2, False] * 50, dtype=object)}, method="tsne").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1 (50)", "2 (50)", "False (50)", "True (50)"]
    (drawn,) = ax.collections
    assert len(np.unique(drawn.get_facecolors(), axis=0)) == 4
    assert pl.embedding(Z, method="tsne").axes[0].get_legend() is None
    assert pl.embedding(Z, [], method="tsne").axes[0].get_legend() is None  # no colourings: uncoloured, as ever
    ax = pl.embedding(Z, {"c": np.array([1e300, 2.0] * 100)}, method="tsne").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["2 (100)", "1e+300 (100)"]
    with pytest.raises(ValueError, match=r"point_size is a marker area and must be > 0, got 0"):
        pl.embedding(Z, method="tsne", point_size=0)


def test_label_order_puts_numbers_by_value_and_texts_reading_as_nan_last_whatever_the_set_order():
    texts = ["1", "nan", "2", "10", "3", "0.5", "NaN", "01"]
    expected = ["0.5", "01", "1", "2", "3", "10", "NaN", "nan"]  # equal values by their text
    for seed in range(20):
        assert pl._label_order(list(np.random.default_rng(seed).permutation(texts))) == expected


def test_stored_colours_colour_text_and_bool_columns_and_longer_lists_as_scanpy_does():
    """scanpy makes a text or bool column categorical (categories sorted) and takes the first n of
    a stored uns["<column>_colors"] holding at least n; 21-28 categories get its default_28."""
    import anndata as ad
    from matplotlib.colors import to_rgba
    from scanpy.plotting.palettes import default_28
    rng = np.random.default_rng(2)
    text = rng.choice(["b", "c", "a"], 90).astype(object)
    cells = ad.AnnData(obs=pd.DataFrame({"t": text, "flag": text == "a"}, index=[f"c{i}" for i in range(90)]),
                       obsm={"X_umap": rng.normal(size=(90, 2)).astype(np.float32)})
    cells.uns["t_colors"] = ["#ff0000", "#00ff00", "#0000ff", "#123456"]  # one more than the categories
    cells.uns["flag_colors"] = ["#000000", "#ffffff"]
    ax = pl.embedding(cells, "t", basis="umap").axes[0]
    assert [t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    assert _legend_colors(ax) == [to_rgba(c) for c in cells.uns["t_colors"][:3]]
    ax = pl.embedding(cells, "flag", basis="umap").axes[0]
    assert [t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()] == ["False", "True"]
    assert _legend_colors(ax) == [to_rgba("#000000"), to_rgba("#ffffff")]
    ax = pl.embedding(cells.obsm["X_umap"], {"many": np.arange(90) % 25}).axes[0]
    assert _legend_colors(ax) == [to_rgba(c) for c in default_28[:25]]
    numbered = rng.choice(["2", "10", "1", "01"], 90).astype(object)  # natural order, as anndata makes categories
    numbered[0] = np.nan  # text with a missing value is still text
    cells.obs["n"] = numbered
    cells.uns["n_colors"] = ["#ff0000", "#00ff00", "#0000ff", "#123456"]
    ax = pl.embedding(cells, "n", basis="umap").axes[0]
    as_anndata = cells.copy()
    as_anndata.strings_to_categoricals()  # what scanpy colours by
    order = ["NA"] + list(as_anndata.obs["n"].cat.categories)
    assert [t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()] == order == ["NA", "01", "1", "2", "10"]
    assert _legend_colors(ax)[1:] == [to_rgba(c) for c in cells.uns["n_colors"]]


def test_thirty_categories_beside_unlabelled_cells_keep_their_legend():
    Z, _ = _data(n=240)
    labels = (np.arange(240) % 30).astype(str).astype(object)
    labels[0] = None
    ax = pl.embedding(Z, {"c30": pd.Categorical(labels)}, method="tsne").axes[0]
    assert ax.get_title() == "c30" and len(ax.get_legend().get_texts()) == 31  # 30 categories and NA


def test_an_anndatas_nan_embedding_is_named_by_its_obsm_key(tmp_path):
    import anndata as ad
    Z, _ = _data(n=60)
    Z[4] = np.nan
    cells = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(60)]), obsm={"X_masksc": Z})
    with pytest.raises(DataError, match=r"adata.obsm\['X_masksc'\] has NaN .* fix: leave those cells out \(adata = "
                                        r"adata\[np.isfinite\(adata.obsm\['X_masksc'\]\).all\(axis=1\)\].copy\(\)\)"):
        pl.embedding(cells, path=tmp_path / "nan.png", method="tsne")


def test_a_series_of_labels_is_matched_to_the_cells_by_name():
    """A column of another AnnData in another cell order colours each cell by its own label
    (it was taken by position); a Series naming cells that are not these is refused."""
    import anndata as ad
    Z, y = _data(n=60)
    names = [f"c{i}" for i in range(60)]
    cells = ad.AnnData(obs=pd.DataFrame({"y": y.astype(str)}, index=names), obsm={"X_umap": Z[:, :2]})
    reordered = cells.obs["y"].iloc[::-1]
    by_name = pl.embedding(cells, {"y": reordered}, basis="umap").axes[0].collections[0].get_facecolors()
    direct = pl.embedding(cells, "y", basis="umap").axes[0].collections[0].get_facecolors()
    np.testing.assert_array_equal(by_name, direct)
    subset = cells[10:40].copy()  # the parent's column colours the cells of a subset
    by_name = pl.embedding(subset, {"y": reordered}, basis="umap").axes[0].collections[0].get_facecolors()
    np.testing.assert_array_equal(by_name, pl.embedding(subset, "y", basis="umap").axes[0].collections[0]
                                  .get_facecolors())
    other = pd.Series(y.astype(str), index=names[:59] + ["elsewhere"])
    with pytest.raises(DataError, match=r"color\['y'\] is a Series indexed by cell names, but 1 of these cells are "
                                        r"not in its index; fix: .*series.reindex\(adata.obs_names\)"):
        pl.embedding(cells, {"y": other}, basis="umap")
