"""Out-of-core path: row blocks from disk, streamed training batches, streamed/atomic embedding."""
import hashlib
import pickle
import re
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from masksc.data import GridLayout, Preprocessor, read, write_synthetic_h5ad
from masksc.errors import CheckpointError, DataError, MaskscError, UncheckedGenesWarning
from masksc.models import MaskSC, MaskSCConfig
from masksc.outofcore import RowReader, StreamBatches, subsample_genes, subsample_rows
from masksc.pipeline import MaskSCModel
from test_data_io import write_10x_h5

N, GENES = 500, 300
CFG = MaskSCConfig(grid_shape=(16, 16), patch=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                   decoder_dim=16, decoder_depth=1, decoder_heads=2, med=False)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("ooc") / "cells.h5ad"
    write_synthetic_h5ad(path, N, n_genes=GENES, n_types=3, seed=5, chunk_size=1024)
    return path


@pytest.fixture(scope="module")
def fitted(h5ad):
    """(in-memory AnnData, Preprocessor, GridLayout, in-memory grid matrix = the oracle)."""
    adata = read(h5ad)
    pre = Preprocessor(n_top_genes=256).fit(adata)
    X = pre.transform(adata).X
    grid = GridLayout.fit(X, pre.genes_, shape=(16, 16), patch=4)
    return adata, pre, grid, grid.to_grid(X)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_row_reader_matches_in_memory_read_for_every_layout(tmp_path, h5ad, fitted):
    adata = fitted[0]
    ref = adata.X.toarray()
    dense = tmp_path / "dense.h5ad"
    ad.AnnData(X=ref, obs=adata.obs.copy(), var=adata.var.copy()).write_h5ad(dense)
    tenx = tmp_path / "m.h5"
    write_10x_h5(tenx, ref, list(adata.obs_names), list(adata.var_names),
                 ["Gene Expression"] * (GENES - 1) + ["Antibody Capture"])
    for source, cols in ((h5ad, slice(None)), (dense, slice(None)), (tenx, slice(0, GENES - 1)),
                         (adata, slice(None)), (ad.read_h5ad(h5ad, backed="r"), slice(None))):
        r = RowReader(source)
        assert r.n_obs == N and r.streamed == (source is not adata)
        np.testing.assert_array_equal(r.rows(123, 321).toarray(), ref[123:321, cols])
        assert r.rows(7, 7).shape == (0, len(r.var_names))
        r.close()
    assert list(RowReader(tenx).var_names) == list(adata.var_names[:GENES - 1])


def test_row_reader_pickles_for_every_source_and_reads_the_same_rows(h5ad, fitted):
    adata = fitted[0]
    backed = ad.read_h5ad(h5ad, backed="r")
    for source in (h5ad, adata, backed):
        r = RowReader(source)
        r.rows(0, 5)                                                    # opens the file handle
        clone = pickle.loads(pickle.dumps(r))
        np.testing.assert_array_equal(clone.rows(40, 90).toarray(), adata.X[40:90].toarray())
        r.close()
        clone.close()
    backed.file.close()


def _epoch(sb, epoch):
    sb.set_epoch(epoch)
    batches = list(sb)
    assert len(batches) == len(sb)
    return batches


def test_stream_batches_cover_every_cell_once_with_the_in_memory_values(h5ad, fitted):
    _, pre, grid, Xg = fitted
    sb = StreamBatches(h5ad, pre, grid, batch_size=64, chunk_size=70, buffer_chunks=2, seed=3)
    b0 = _epoch(sb, 0)
    idx = np.concatenate([b.cell_index.numpy() for b in b0])
    assert sorted(idx.tolist()) == list(range(N))                      # every cell exactly once
    assert [b.n_rows for b in b0] == [64] * 7 + [N - 7 * 64]           # full batches but the last
    assert not np.array_equal(idx, np.arange(N))                        # shuffled
    for b in b0[:3]:                                                    # values = the in-memory transform
        np.testing.assert_allclose(b.to_dense(256).numpy(), Xg[b.cell_index.numpy()].toarray(), rtol=1e-6)
    again = _epoch(sb, 0)
    assert all(torch.equal(a.cell_index, b.cell_index) and torch.equal(a.values, b.values) for a, b in zip(b0, again))
    other = np.concatenate([b.cell_index.numpy() for b in _epoch(sb, 1)])
    assert not np.array_equal(idx, other) and sorted(other.tolist()) == list(range(N))


@pytest.mark.parametrize("name, bad, unit", [("batch_size", 0, "cells"), ("chunk_size", "70", "cells"),
                                             ("buffer_chunks", 1.5, "chunks")])
def test_stream_batches_refuse_a_size_that_is_not_a_positive_whole_number(h5ad, fitted, name, bad, unit):
    _, pre, grid, _ = fitted
    with pytest.raises(DataError, match=rf"^{name}={bad!r}; fix: pass a positive whole number of {unit}\.$"):
        StreamBatches(h5ad, pre, grid, **{name: bad})


def test_stream_batches_through_dataloader_workers_equal_one_process(h5ad, fitted):
    _, pre, grid, _ = fitted
    sb = StreamBatches(h5ad, pre, grid, batch_size=64, chunk_size=70, buffer_chunks=2, seed=3)
    direct = _epoch(sb, 1)
    loaded = list(torch.utils.data.DataLoader(sb, batch_size=None, num_workers=2))
    assert len(loaded) == len(direct)
    assert all(torch.equal(a.cell_index, b.cell_index) and torch.equal(a.values, b.values)
               for a, b in zip(direct, loaded))


def test_stream_batches_shard_disjointly_with_equal_step_counts(h5ad, fitted):
    _, pre, grid, _ = fitted
    ranks = [StreamBatches(h5ad, pre, grid, batch_size=50, chunk_size=64, seed=1, rank=r, world_size=3)
             for r in range(3)]
    assert len({len(sb) for sb in ranks}) == 1
    for epoch in (0, 1):
        seen = []
        for sb in ranks:
            sb.set_epoch(epoch)
            own = set(int(c) for c in sb.chunks_of_rank())
            idx = np.concatenate([b.cell_index.numpy() for b in sb])
            assert sum(b.n_rows for b in sb) == sb.cells_per_rank
            first = idx[:len(set(idx.tolist()))]
            assert len(set(first.tolist())) == len(first)                # own cells first, each once
            starts = np.array([a for a, _ in sb.bounds])
            assert set(np.searchsorted(starts, idx, side="right") - 1) <= own   # only this rank's chunks
            seen.append(set(first.tolist()))
        assert set().union(*seen) == set(range(N))
        assert sum(len(s) for s in seen) == N                           # disjoint shards
    # about one pass: the top-up is a cell a chunk at most (fixed-size chunks and a short last one
    # repeated up to half a rank's cells: 64-cell chunks of these 500 cells on 3 ranks, 76 repeats; now 4)
    sizes = [b - a for a, b in ranks[0].bounds]
    assert len(sizes) % 3 == 0 and max(sizes) - min(sizes) <= 1 and max(sizes) <= 64
    assert 3 * ranks[0].cells_per_rank - N <= len(sizes)
    for world_size in (7, 16):  # few cells a rank: a 1,000-cell chunk size left ranks without a chunk
        many = [StreamBatches(h5ad, pre, grid, batch_size=50, chunk_size=1000, rank=r, world_size=world_size)
                for r in range(world_size)]
        assert all(len(sb.chunks_of_rank()) == 1 for sb in many)
        assert sorted(c for sb in many for c in sb.chunks_of_rank()) == list(range(world_size))


def test_stream_batches_refuse_a_seed_rank_or_epoch_that_is_not_one(h5ad, fitted):
    """They failed at the first iteration, after the file was opened, or were cut (epoch 1.7)."""
    _, pre, grid, _ = fitted
    for seed in (-1, None, 1.5, "3", True):
        with pytest.raises(DataError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\], got " + re.escape(repr(seed))):
            StreamBatches(h5ad, pre, grid, seed=seed)
    with pytest.raises(ValueError, match=r"rank 1\.5 is not in 0\.\.1"):
        StreamBatches(h5ad, pre, grid, rank=1.5, world_size=2)
    with pytest.raises(DataError, match=r"world_size=0; fix: pass a positive whole number of processes"):
        StreamBatches(h5ad, pre, grid, world_size=0)
    sb = StreamBatches(h5ad, pre, grid)
    for epoch in (1.7, -1, "2"):
        with pytest.raises(DataError, match=rf"^epoch={re.escape(repr(epoch))}; fix: pass a whole number >= 0"):
            sb.set_epoch(epoch)


def test_subsample_is_seeded_and_transformed_like_in_memory(h5ad, fitted):
    adata, pre, _, _ = fitted
    X, rows = subsample_genes(h5ad, pre, n_max=120, seed=4, chunk_size=77)
    assert len(rows) == 120 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, subsample_rows(N, 120, 4))
    assert not np.array_equal(rows, subsample_rows(N, 120, 5))
    np.testing.assert_allclose(X.toarray(), pre.transform(adata[rows]).X.toarray(), rtol=1e-6)
    assert len(subsample_genes(h5ad, pre, n_max=None)[1]) == N


def _model(pre, grid):
    torch.manual_seed(0)
    net = MaskSC(CFG).eval()
    net.set_padding(grid.is_padding)
    return MaskSCModel(net, pre, grid, path="untrained")


@pytest.mark.parametrize("suffix", [".npy", ".h5ad"])
def test_embed_file_equals_in_memory_embedding_and_is_atomic(tmp_path, h5ad, fitted, suffix):
    adata, pre, grid, _ = fitted
    model = _model(pre, grid)
    before = _sha(h5ad)
    ref = model.embed(adata, progress=False)
    out = tmp_path / f"emb{suffix}"
    assert model.embed_file(h5ad, out, chunk_size=90, batch_size=33, progress=False) == out
    if suffix == ".npy":
        Z = np.load(out)
    else:
        res = ad.read_h5ad(out)
        Z = res.obsm["X_masksc"]
        assert res.X is None and list(res.obs_names) == list(adata.obs_names)
        assert list(res.obs["label"]) == list(adata.obs["label"])
    np.testing.assert_allclose(Z, ref, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]    # no temp file left behind
    assert _sha(h5ad) == before


def test_embed_file_reserves_its_space_where_the_system_can_and_works_where_it_cannot(tmp_path, h5ad, fitted,
                                                                                     monkeypatch):
    """posix_fallocate is asked for the whole embedding (its absence, on macOS and Windows, is no
    error; the result is the same)."""
    import os
    adata, pre, grid, _ = fitted
    model = _model(pre, grid)
    asked = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: (asked.append(size), real(fd, offset, size)))
    model.embed_file(h5ad, tmp_path / "a.npy", progress=False)
    assert len(asked) == 1 and asked[0] == (tmp_path / "a.npy").stat().st_size >= N * model.config.embedding_dim * 4
    monkeypatch.delattr(os, "posix_fallocate")
    model.embed_file(h5ad, tmp_path / "b.npy", progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"))


def test_embed_file_failure_leaves_no_output(tmp_path, h5ad, fitted, monkeypatch):
    _, pre, grid, _ = fitted
    model = _model(pre, grid)
    calls = {"n": 0}
    real = model.network.embed

    def dies_on_second_batch(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(batch)

    monkeypatch.setattr(model.network, "embed", dies_on_second_batch)
    (tmp_path / "runs").mkdir()
    for output in (tmp_path / "e.npy", tmp_path / "runs" / "new" / "deeper" / "e.h5ad"):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="simulated"):
            model.embed_file(h5ad, output, chunk_size=100, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("runs")]  # folders it made: gone


def test_a_bad_cell_past_the_first_block_is_named_by_its_row_and_name_in_the_file(tmp_path, fitted):
    """Streamed, each block was transformed as cells 0..: a zero-count cell at row 250 was
    "row 50 (50)" with 100-cell chunks. Embedding the file and subsampling it now name it as the
    in-memory transform does."""
    adata, pre, grid, _ = fitted
    bad = adata[:300].copy()
    X = bad.X.toarray()
    X[250] = 0
    bad.X = sp.csr_matrix(X)
    bad.write_h5ad(tmp_path / "bad.h5ad")
    name = f"row 250 \\({bad.obs_names[250]}\\)"
    with pytest.raises(DataError, match=rf"^1 cell \({name}\) has zero counts") as in_memory:
        pre.transform(bad)
    with pytest.raises(DataError, match=rf"^1 cell \({name}\) has zero counts") as streamed:
        _model(pre, grid).embed_file(tmp_path / "bad.h5ad", tmp_path / "e.npy", chunk_size=100, progress=False)
    assert str(streamed.value) == str(in_memory.value)
    with pytest.raises(DataError, match=rf"^1 cell \({name}\) has zero counts"):
        subsample_genes(tmp_path / "bad.h5ad", pre, n_max=None, chunk_size=100)


def test_embed_file_refuses_wrong_genes_and_bad_suffix(tmp_path, fitted):
    adata, pre, grid, _ = fitted
    model = _model(pre, grid)
    other = ad.AnnData(X=sp.csr_matrix(adata.X), var=ad.AnnData(var=adata.var).var.rename(index=lambda g: g + "x"))
    other.write_h5ad(tmp_path / "o.h5ad")
    with pytest.raises(CheckpointError, match="missing"):
        model.embed_file(tmp_path / "o.h5ad", tmp_path / "e.npy", progress=False)
    with pytest.raises(MaskscError, match=r"must end in \.h5ad or \.npy"):
        model.embed_file(adata, tmp_path / "e.csv", progress=False)


def test_blockwise_passes_check_unnamed_genes_whatever_the_chunk_size(tmp_path, fitted):
    """The cells here have made-up names (gene_0000..), so columns match by position and the
    detection profile is what refuses other genes: blocks of 10 cells, each too small for the
    check alone, must not let them through, whether embedded or streamed for training."""
    adata, pre, grid, _ = fitted
    assert adata.var_names[0] == "gene_0000"
    other = ad.AnnData(X=sp.csr_matrix(adata.X)[:, np.random.default_rng(0).permutation(adata.n_vars)],
                       var=adata.var.copy())
    other.write_h5ad(tmp_path / "other.h5ad")
    for chunk_size in (10, 400):
        with pytest.raises(DataError, match=r"named gene_0000\.\. .* in cells 0\.\.499"):
            _model(pre, grid).embed_file(tmp_path / "other.h5ad", tmp_path / "e.npy", chunk_size=chunk_size,
                                         progress=False)
        with pytest.raises(DataError, match="named gene_0000"):
            StreamBatches(tmp_path / "other.h5ad", pre, grid, chunk_size=chunk_size)
        with pytest.raises(DataError, match="named gene_0000"):
            subsample_genes(tmp_path / "other.h5ad", pre, n_max=100, chunk_size=chunk_size)
    assert not (tmp_path / "e.npy").exists()
    StreamBatches(adata, pre, grid, chunk_size=10)  # the fitted cells pass


def test_plot_attention_checks_unnamed_genes_on_the_files_cells_and_few_cells_are_flagged(tmp_path, fitted, capsys):
    """`masksc plot attention` draws a handful of cells, too few for the gene-profile check: it
    drew other genes through the model without a word. It checks the file's first cells, as
    embed does; cells too few to check are used with a warning, not silently."""
    from masksc.cli import main
    adata, pre, grid, _ = fitted
    _model(pre, grid).save(tmp_path / "model")
    other = ad.AnnData(X=sp.csr_matrix(adata.X)[:, np.random.default_rng(0).permutation(adata.n_vars)],
                       obs=adata.obs.copy(), var=adata.var.copy())
    other.write_h5ad(tmp_path / "other.h5ad")
    adata.write_h5ad(tmp_path / "same.h5ad")
    plot = ["plot", "attention", "--model", str(tmp_path / "model"), "--device", "cpu", "-o"]
    assert main([*plot, str(tmp_path / "o.png"), str(tmp_path / "other.h5ad")]) == 2
    assert "named gene_0000.. " in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncheckedGenesWarning)  # the file passed: the few cells drawn are not flagged
        assert main([*plot, str(tmp_path / "s.png"), str(tmp_path / "same.h5ad")]) == 0
    with pytest.warns(UncheckedGenesWarning, match=r"and 10 cells are too few to check that these columns are the genes it was "
                                         r"trained on \(it takes 50\); they are used unchecked"):
        pre.transform(other[:10])


@pytest.mark.parametrize("spoil, refusal", [
    (lambda obs: obs.insert(0, "collected", pd.date_range("2020-01-01", periods=len(obs))), "IORegistryError"),
    (lambda obs: obs.insert(0, 0, 1), "TypeError: 0 of type <class 'int'> is an invalid key"),
])
def test_obs_anndata_cannot_write_is_refused_before_any_cell_is_embedded(tmp_path, fitted, monkeypatch, spoil,
                                                                          refusal):
    """embed_file to .h5ad embedded every cell, then failed on anndata's own error; a .npy needs no obs."""
    import masksc.outofcore as outofcore
    adata, pre, grid, _ = fitted
    cells = adata[:40].copy()
    spoil(cells.obs)
    calls = []
    monkeypatch.setattr(outofcore, "embed_rows", lambda *a, **k: calls.append(1))
    with pytest.raises(DataError, match=rf"^obs cannot be written to an \.h5ad \({refusal}.*\); fix: convert or drop "
                                        r"the column .* or write the embedding to a \.npy\.$"):
        _model(pre, grid).embed_file(cells, tmp_path / "e.h5ad", progress=False)
    assert calls == [] and list(tmp_path.iterdir()) == []
    _model(pre, grid).embed_file(cells, tmp_path / "e.npy", progress=False)
    assert calls == [1]


def test_the_embedding_keeps_scanpys_colours_of_its_obs_columns(tmp_path, fitted):
    """`masksc plot embedding` on embed's output drew labels in the default palette where the
    input's uns['label_colors'] (sc.pl.umap's) named others: the colours come along now."""
    adata, pre, grid, _ = fitted
    cells = adata[:60].copy()
    labels = cells.obs["label"].cat.categories
    cells.obs["label"] = cells.obs["label"].cat.reorder_categories(labels[::-1])  # an order set for plotting
    cells.uns["label_colors"] = np.array(["#123456", "#abcdef", "#fedcba", "#000000"][:len(labels)], dtype=object)
    cells.uns["gone_colors"] = np.array(["#111111"], dtype=object)  # no such column: not copied
    cells.write_h5ad(tmp_path / "cells.h5ad")
    wanted = dict(zip(cells.obs["label"].cat.categories, cells.uns["label_colors"]))
    for source in (cells, tmp_path / "cells.h5ad", ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")):
        out = ad.read_h5ad(_model(pre, grid).embed_file(source, tmp_path / "e.h5ad", progress=False))
        assert dict(zip(out.obs["label"].cat.categories, out.uns["label_colors"])) == wanted  # each label its colour
        assert "gone_colors" not in out.uns


def test_embed_file_writes_obs_as_anndata_would_and_refuses_no_cells(tmp_path, fitted):
    """Text columns with missing values or mixed types (which h5py cannot write as they are)
    come out as categoricals, missing values missing; a dataset without cells is refused."""
    adata, pre, grid, _ = fitted
    cells = adata[:40].copy()
    cells.obs["note"] = np.array(["a", np.nan] * 20, dtype=object)
    cells.obs["mixed"] = np.array([1, "x"] * 20, dtype=object)
    out = _model(pre, grid).embed_file(cells, tmp_path / "e.h5ad", progress=False)
    obs = ad.read_h5ad(out).obs
    assert obs["note"].iloc[0] == "a" and obs["note"].isna().sum() == 20  # missing stays missing, not "nan"
    assert list(obs["mixed"][:2]) == ["1", "x"]
    with pytest.raises(DataError, match="holds no cells"):
        _model(pre, grid).embed_file(adata[:0].copy(), tmp_path / "z.h5ad", progress=False)
    assert not (tmp_path / "z.h5ad").exists()
    # as anndata writes text: distinct values stay text, repeated ones become categories in natural order
    cells.obs["barcode"] = [f"AAAC{i:04d}" for i in range(40)]
    cells.obs["celltype"] = ["T10", "B", "T2", "NK"] * 10
    ad.AnnData(obs=cells.obs[["barcode", "celltype"]]).write_h5ad(tmp_path / "ref.h5ad")
    ref = ad.read_h5ad(tmp_path / "ref.h5ad").obs
    out = ad.read_h5ad(_model(pre, grid).embed_file(cells, tmp_path / "t.h5ad", progress=False,
                                                    chunk_size=np.int16(20_000))).obs
    assert out["barcode"].dtype == ref["barcode"].dtype and not isinstance(out["barcode"].dtype, pd.CategoricalDtype)
    assert list(out["celltype"].cat.categories) == list(ref["celltype"].cat.categories) == ["B", "NK", "T2", "T10"]
    from masksc.outofcore import _writable_obs  # pandas' string dtype with repeats: a categorical, as anndata's
    typed = _writable_obs(pd.DataFrame({"s": pd.array(["a", "b", "a"], dtype="string")}, index=["x", "y", "z"]))
    assert list(typed["s"].cat.categories) == ["a", "b"]


@pytest.mark.parametrize("size", [0, -1, 2.5])
def test_embed_file_refuses_a_chunk_or_batch_size_below_one_before_any_work(tmp_path, fitted, size):
    """chunk_size=-1 wrote an all-zero embedding (no chunk was embedded) and 0 gave range()'s error."""
    adata, pre, grid, _ = fitted
    for name in ("chunk_size", "batch_size"):
        with pytest.raises(DataError, match=rf"{name}={size!r}; fix: pass a positive whole number of cells"):
            _model(pre, grid).embed_file(adata[:30].copy(), tmp_path / "e.npy", progress=False, **{name: size})
    assert list(tmp_path.iterdir()) == []


def test_missing_training_genes_are_warned_about_once_a_file_not_once_a_chunk(tmp_path, fitted):
    adata, pre, grid, _ = fitted
    model = _model(pre, grid)
    unused = [g for g in adata.var_names if g not in pre.genes_][:5]
    cells = adata[:100, [g for g in adata.var_names if g not in unused]].copy()
    with pytest.warns(UserWarning) as caught:
        model.embed_file(cells, tmp_path / "e.npy", chunk_size=10, progress=False)
    assert [str(w.message) for w in caught if "genes of the training data are missing" in str(w.message)] == [
        f"5 of the {GENES} genes of the training data are missing from the data (none on the model's grid); library "
        "sizes are summed over the rest, so cells normalise differently than in training and their embedding shifts; "
        "fix: pass every gene of the training data (a gene not measured can be a zero column)"]
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), model.embed(cells, progress=False), rtol=1e-5, atol=1e-6)


def test_colours_of_an_h5ad_written_by_anndata_before_0_8_come_along(tmp_path, fitted):
    """An obs stored as a compound dataset (anndata < 0.7), its categories in uns, crashed the
    .h5ad output after every cell was embedded; its colours now come as anndata reads them."""
    adata, pre, grid, _ = fitted
    cells = adata[:50]
    M = sp.csr_matrix(cells.X)
    codes = np.arange(50) % 3
    with h5py.File(tmp_path / "old.h5ad", "w") as f:
        g = f.create_group("X")
        g["data"], g["indices"], g["indptr"] = M.data, M.indices, M.indptr
        g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = "csr", np.array(M.shape)
        f["obs"] = np.array([(c.encode(), k) for c, k in zip(cells.obs_names, codes)],
                            dtype=[("index", "S20"), ("ct", "i1")])
        f["var"] = np.array([(g_.encode(),) for g_ in cells.var_names], dtype=[("index", "S20")])
        uns = f.create_group("uns")
        uns["ct_categories"] = np.array([b"NK", b"T", b"B"])
        uns["ct_colors"] = np.array([b"#ff0000", b"#00ff00", b"#0000ff"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on the old layout
        out = ad.read_h5ad(_model(pre, grid).embed_file(tmp_path / "old.h5ad", tmp_path / "e.h5ad", progress=False))
    assert dict(zip(out.obs["ct"].cat.categories, out.uns["ct_colors"])) == {
        "NK": "#ff0000", "T": "#00ff00", "B": "#0000ff"}
    assert list(out.obs["ct"]) == [["NK", "T", "B"][k] for k in codes]


def test_embed_file_errors_name_the_dataset_cells(tmp_path, fitted):
    adata, pre, grid, _ = fitted
    X = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    X[234, X[234].indices[0]] = np.nan
    path = tmp_path / "nan234.h5ad"
    ad.AnnData(X=X, obs=adata.obs.copy(), var=adata.var.copy()).write_h5ad(path)
    named = rf"1 NaN .* in cells 200\.\.299, the first in cell 234 \({adata.obs_names[234]}\);"  # not chunk-local
    with pytest.raises(DataError, match=named):
        _model(pre, grid).embed_file(path, tmp_path / "e.npy", chunk_size=100, progress=False)
    with pytest.raises(DataError, match=named):
        subsample_genes(path, pre, n_max=None, chunk_size=100)


def test_source_path_names_an_in_memory_sources_file_and_never_hides_the_input(tmp_path, h5ad, fitted, monkeypatch):
    """source_path records where an in-memory source came from, and the output may not be that file;
    a path source is its own origin: another source_path beside it is refused, so a mismatch can
    never let the output replace the input."""
    adata, pre, grid, _ = fitted
    model = _model(pre, grid)
    out = tmp_path / "e.h5ad"
    model.embed_file(adata, out, source_path=h5ad, progress=False)
    assert ad.read_h5ad(out).uns["masksc"]["embed"]["source"] == str(h5ad)
    with monkeypatch.context() as m:  # a relative path is recorded absolute, as the model is
        m.chdir(h5ad.parent)
        model.embed_file(h5ad.name, tmp_path / "relative.h5ad", progress=False)
    assert ad.read_h5ad(tmp_path / "relative.h5ad").uns["masksc"]["embed"]["source"] == str(h5ad.resolve())
    with pytest.raises(MaskscError, match="is the input file"):
        model.embed_file(adata, h5ad, source_path=h5ad, progress=False)
    victim = tmp_path / "victim.h5ad"
    victim.write_bytes(h5ad.read_bytes())
    before = _sha(victim)
    with pytest.raises(MaskscError, match=r"the source is the file .*victim.h5ad itself; fix: drop source_path"):
        model.embed_file(victim, victim, source_path=tmp_path / "small.csv", progress=False)
    assert _sha(victim) == before


def test_a_streamed_fit_reads_no_block_larger_than_its_chunk_size(tmp_path, h5ad, monkeypatch):
    """The preprocessor was fitted on blocks of at least 10,000 cells and the teacher's subsample
    read blocks of 16,384 whatever chunk_size said: memory is bounded by chunk_size now. Sizes
    given as numpy integers are saved as ints (an np.int64 chunk_size made the run's own record
    unreadable at the end of the fit)."""
    from masksc import pipeline
    from masksc.data.stream import ChunkSource
    widest = []
    real_rows = ChunkSource.rows

    def rows(self, a, b, *args):
        widest.append(b - a)
        return real_rows(self, a, b, *args)

    named = read(h5ad)  # named genes: the profile check of unnamed ones reads its fixed 1000-cell sample
    named.var_names = [f"g{j}" for j in range(named.n_vars)]
    named.write_h5ad(tmp_path / "named.h5ad")
    monkeypatch.setattr(ChunkSource, "rows", rows)
    model, _ = pipeline.fit(tmp_path / "named.h5ad", "demo", model_dir=tmp_path / "run", epochs=1, progress=False,
                            chunk_size=np.int64(64), teacher_cells=np.int32(200), teacher_overrides={"epochs": 1},
                            grid_shape=(16, 16), batch_size=40, embed_dim=32, depth=1, num_heads=2, decoder_dim=32,
                            decoder_depth=1, decoder_heads=2)
    assert widest and max(widest) <= 64, max(widest)
    assert pipeline.MaskSCModel.load(tmp_path / "run").genes == model.genes


def test_in_memory_and_streamed_embedding_ask_for_the_same_precision(tmp_path, fitted, monkeypatch):
    """embed_file ran bf16 on a GPU where MaskSCModel.embed / tl.embed ran float32, so the same
    cells embedded differently by path; both now take amp=True (bf16 on CUDA) unless told."""
    from masksc import embed, pipeline, tl
    adata, pre, grid, _ = fitted
    asked, real = [], embed.embed_matrix

    def spy(*args, amp=False, **kwargs):
        asked.append(amp)
        return real(*args, amp=amp, **kwargs)

    monkeypatch.setattr(embed, "embed_matrix", spy)
    monkeypatch.setattr(pipeline, "embed_matrix", spy)
    model, cells = _model(pre, grid), adata[:60].copy()
    model.embed(cells, progress=False)
    model.embed_file(cells, tmp_path / "e.npy", progress=False)
    tl.embed(cells, model, progress=False)
    tl.embed(cells, model, progress=False, amp=False)
    assert asked == [True, True, True, False]


@pytest.fixture(scope="module")
def named(tmp_path_factory, h5ad):
    """(.h5ad whose genes have real-looking names, its in-memory AnnData, Preprocessor fitted on it)."""
    adata = read(h5ad)
    adata.var_names = [f"GENE{i}A" for i in range(adata.n_vars)]
    path = tmp_path_factory.mktemp("named") / "named.h5ad"
    adata.write_h5ad(path)
    return path, adata, Preprocessor(n_top_genes=256).fit(adata, progress=False)


def test_a_backed_anndatas_edited_obs_and_gene_names_are_what_is_embedded(tmp_path, named):
    path, adata, pre = named
    X = pre.transform(adata).X
    model = _model(pre, GridLayout.fit(X, pre.genes_, shape=(16, 16), patch=4))
    backed = ad.read_h5ad(path, backed="r")
    backed.var_names = backed.var_names[np.random.default_rng(0).permutation(GENES)]
    backed.obs["batch"] = pd.Categorical(np.where(np.arange(N) % 2, "b1", "b2"))
    backed.obs_names = [f"renamed{i}" for i in range(N)]
    in_memory = backed.to_memory()
    ref = model.embed(in_memory, progress=False)
    assert not np.allclose(ref, model.embed(adata, progress=False), atol=1e-3)  # the renaming matters
    out = tmp_path / "emb.h5ad"
    model.embed_file(backed, out, chunk_size=90, progress=False)
    res = ad.read_h5ad(out)
    np.testing.assert_allclose(res.obsm["X_masksc"], ref, rtol=1e-5, atol=1e-6)
    assert list(res.obs_names) == list(in_memory.obs_names)
    assert list(res.obs["batch"]) == list(in_memory.obs["batch"])


def test_a_grid_listing_its_genes_in_another_order_than_the_preprocessor_streams_as_in_memory(tmp_path, named):
    path, adata, pre = named
    X = pre.transform(adata).X
    grid = GridLayout.fit(X[:, ::-1], list(pre.genes_)[::-1], shape=(16, 16), patch=4)
    model = _model(pre, grid)
    out = tmp_path / "emb.npy"
    model.embed_file(path, out, chunk_size=90, progress=False)
    np.testing.assert_allclose(np.load(out), model.embed(adata, progress=False), rtol=1e-5, atol=1e-6)


def test_use_raw_on_a_backed_anndata_whose_raw_was_removed_is_refused_as_in_memory(tmp_path, h5ad, fitted):
    """Its file still holds raw/X: streaming it under X's gene names raised an IndexError (or,
    with as many genes, embedded the wrong columns)."""
    adata, pre, grid, _ = fitted
    with_raw = adata.copy()
    with_raw.raw = adata[:, :280].copy()
    with_raw.write_h5ad(tmp_path / "raw.h5ad")
    backed = ad.read_h5ad(tmp_path / "raw.h5ad", backed="r")
    backed.raw = None
    with pytest.raises(DataError, match=r"use_raw=True but adata.raw is None; fix: drop use_raw"):
        _model(pre, grid).embed_file(backed, tmp_path / "e.npy", use_raw=True, progress=False)
    assert not (tmp_path / "e.npy").exists()
