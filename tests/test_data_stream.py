"""Streaming sources: 10x HDF5 read by cell blocks, dense/CSC h5ad, fit on a 10x file."""
import logging

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from masksc.data import Preprocessor, iter_chunks, open_source, read, synthetic, with_layer
from masksc.errors import DataError
from test_data_io import write_10x_h5


@pytest.fixture(scope="module")
def data():
    return synthetic(1500, 300, n_types=4, seed=11)


def test_10x_h5_chunks_equal_read(tmp_path, data):
    X = data.X.toarray()
    ftypes = ["Gene Expression"] * 298 + ["Antibody Capture"] * 2
    write_10x_h5(tmp_path / "m.h5", X, list(data.obs_names), list(data.var_names), ftypes)
    full = read(tmp_path / "m.h5")
    chunks = list(iter_chunks(tmp_path / "m.h5", chunk_size=400))
    assert [s for s, _ in chunks] == [0, 400, 800, 1200]
    np.testing.assert_array_equal(sp.vstack([c for _, c in chunks]).toarray(), full.X.toarray())
    assert full.n_vars == 298


def test_a_streamed_10x_file_names_its_repeated_genes_as_read_does(tmp_path, data, caplog):
    """The streamed reader made them unique silently; read() says so, as scanpy does."""
    from masksc.outofcore import RowReader
    genes = list(data.var_names)
    genes[5] = genes[4]
    write_10x_h5(tmp_path / "m.h5", data.X.toarray()[:20], list(data.obs_names[:20]), genes)
    with caplog.at_level(logging.WARNING, logger="masksc.data.io"):
        streamed = RowReader(tmp_path / "m.h5").var_names
    assert list(streamed) == list(read(tmp_path / "m.h5").var_names) and streamed[5] == f"{genes[4]}-1"
    said = [r.getMessage() for r in caplog.records if "duplicated gene names made unique" in r.getMessage()]
    assert len(said) == 2 and all("1 duplicated gene names made unique as scanpy's" in m for m in said), said


def test_fit_on_10x_file_equals_in_memory(tmp_path, data):
    write_10x_h5(tmp_path / "m.h5", data.X.toarray(), list(data.obs_names), list(data.var_names))
    a = Preprocessor(n_top_genes=100).fit(data)
    b = Preprocessor(n_top_genes=100, chunk_size=333).fit(tmp_path / "m.h5")
    assert a.genes_ == b.genes_
    np.testing.assert_array_equal(b.transform(tmp_path / "m.h5").X.toarray(), a.transform(data).X.toarray())


def test_dense_h5ad_streams_and_a_csc_one_is_read_into_memory(tmp_path, data, caplog):
    """A CSC X or layer cannot be streamed by cells: it is read into memory as CSR with one log
    line saying why and how to avoid it; the file is left as it was."""
    dense = ad.AnnData(X=data.X.toarray(), obs=data.obs.copy(), var=data.var.copy())
    dense.write_h5ad(tmp_path / "d.h5ad")
    got = sp.vstack([c for _, c in iter_chunks(tmp_path / "d.h5ad", chunk_size=600)])
    np.testing.assert_array_equal(got.toarray(), data.X.toarray())
    csc = ad.AnnData(X=sp.csc_matrix(data.X), obs=pd.DataFrame(index=data.obs_names), var=data.var.copy())
    csc.layers["counts"] = sp.csc_matrix(data.X)
    path = tmp_path / "c.h5ad"
    csc.write_h5ad(path)
    before = path.read_bytes()
    for layer in (None, "counts"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="masksc"):
            src = open_source(path, layer)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "stored CSC" in lines[0] and "reading it into memory as CSR" in lines[0]
        assert "rewrite it as CSR" in lines[0]
        assert src.path is None  # rows come from memory, not the file
        got = sp.vstack([c for _, c in src.chunks(chunk_size=600)])
        assert got.format == "csr" and got.dtype == np.float32
        np.testing.assert_array_equal(got.toarray(), data.X.toarray())
        assert list(src.obs.index) == list(data.obs_names) and list(src.var_names) == list(data.var_names)
    assert path.read_bytes() == before


def test_streamed_values_beyond_float32_are_named_with_their_cells(tmp_path, data):
    """float64 values float32 cannot hold (they would turn infinite) are not reported as inf."""
    X = data.X.toarray().astype(np.float64)
    X[700, np.flatnonzero(X[700])[0]] = 1e39
    for name, matrix in (("csr.h5ad", sp.csr_matrix(X)), ("dense.h5ad", X), ("csc.h5ad", sp.csc_matrix(X))):
        ad.AnnData(X=matrix, obs=data.obs.copy(), var=data.var.copy()).write_h5ad(tmp_path / name)
        where = "in csc.h5ad" if name == "csc.h5ad" else "in cells 600..1199"
        with pytest.raises(DataError, match=rf"X holds 1 values too large for float32 \(max 3.4e38; largest "
                                            rf"magnitude 1e\+39\) {where}; fix: pass raw counts") as exc:
            list(iter_chunks(tmp_path / name, chunk_size=600))
        assert "infinite" not in str(exc.value)


def test_chunk_size_must_be_positive(data):
    for bad in (0, 1e4):
        with pytest.raises(DataError, match=rf"^chunk_size={bad!r}; fix: pass a positive whole number of cells"):
            list(iter_chunks(data, chunk_size=bad))


def test_rows_equal_slices_of_the_in_memory_matrix(tmp_path, data):
    X = data.X.toarray()
    data.write_h5ad(tmp_path / "csr.h5ad")
    ad.AnnData(X=X, obs=data.obs.copy(), var=data.var.copy()).write_h5ad(tmp_path / "dense.h5ad")
    write_10x_h5(tmp_path / "m.h5", X, list(data.obs_names), list(data.var_names),
                 ["Gene Expression"] * 298 + ["Antibody Capture"] * 2)
    for name, cols in (("csr.h5ad", slice(None)), ("dense.h5ad", slice(None)), ("m.h5", slice(0, 298))):
        src = open_source(tmp_path / name)
        for a, b in ((0, 0), (7, 7), (123, 321), (1200, 1500), (0, 1500)):  # empty, inner, last partial block
            got = src.rows(a, b)
            assert got.format == "csr" and got.dtype == np.float32 and got.shape == (b - a, src.n_vars)
            np.testing.assert_array_equal(got.toarray(), X[a:b, cols])
        with pytest.raises(IndexError):
            src.rows(5, 1501)


def test_no_expression_matrix_named(tmp_path, data):
    """An AnnData or .h5ad without X (e.g. `masksc embed`'s output) is refused with what to pass."""
    bare = ad.AnnData(obs=pd.DataFrame(index=data.obs_names), var=data.var.copy())
    with pytest.raises(DataError, match="no X matrix; fix: set adata.X"):
        Preprocessor(n_top_genes=20).fit(bare)
    bare.obsm["X_masksc"] = np.zeros((data.n_obs, 4), np.float32)
    bare.write_h5ad(tmp_path / "embedded.h5ad")
    with pytest.raises(DataError, match="no X matrix .* fix: pass the file that holds the expression counts"):
        Preprocessor(n_top_genes=20).fit(tmp_path / "embedded.h5ad")
    with pytest.raises(DataError, match="no X matrix .* anndata.read_h5ad"):
        read(tmp_path / "embedded.h5ad")


def test_half_precision_counts_read_as_float32(data):
    half = ad.AnnData(X=data.X.toarray().astype(np.float16), var=data.var.copy())
    p, q = Preprocessor(n_top_genes=20).fit(half), Preprocessor(n_top_genes=20).fit(data)
    assert p.genes_ == q.genes_
    np.testing.assert_array_equal(p.transform(half).X.toarray(), q.transform(data).X.toarray())
    with pytest.raises(DataError, match="dtype object, not numbers"):
        Preprocessor(n_top_genes=20).fit(ad.AnnData(X=data.X.toarray().astype(object), var=data.var.copy()))


def test_layers_stream_like_x(tmp_path, data):
    """A layer of an in-memory, backed or on-disk AnnData reads as that layer, chunk by chunk."""
    other = np.zeros(data.X.shape, dtype=np.float32)
    other[:, 0] = 1.0  # X is something else: the layer must be what is read
    a = ad.AnnData(X=sp.csr_matrix(other), obs=data.obs.copy(), var=data.var.copy())
    a.layers["counts"] = data.X.copy()
    a.write_h5ad(tmp_path / "l.h5ad")
    backed = ad.read_h5ad(tmp_path / "l.h5ad", backed="r")
    for source in (a, tmp_path / "l.h5ad", backed):
        got = sp.vstack([X for _, X in open_source(source, layer="counts").chunks(400)])
        np.testing.assert_array_equal(got.toarray(), data.X.toarray())
    with pytest.raises(DataError, match=r"no layer 'spliced'; fix: pass one of \['counts'\]"):
        open_source(tmp_path / "l.h5ad", layer="spliced")
    with pytest.raises(DataError, match=r"no layer 'spliced'; fix: pass one of \['counts'\]"):
        open_source(a, layer="spliced")
    data.to_df().to_csv(tmp_path / "c.csv")
    with pytest.raises(DataError, match="csv file, which has no layers"):
        open_source(tmp_path / "c.csv", layer="counts")
    with pytest.raises(DataError, match=r"^the AnnData has no layer 'counts' \(its layers: none\); fix: drop "
                                        r"layer= \(--layer\) to read adata\.X .*adata\.layers\['counts'\] = counts"):
        with_layer(read(tmp_path / "c.csv"), "counts")  # what the CLI reads a csv into


def test_a_view_of_a_backed_anndata_is_refused(tmp_path):
    """Its cells would be streamed from the whole file, not the selection."""
    from masksc.outofcore import RowReader
    synthetic(60, n_genes=30, n_types=2, seed=0).write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    for make in (lambda: open_source(backed[:20]), lambda: RowReader(backed[:, :10]),
                 lambda: Preprocessor(n_top_genes=10).fit(backed[:20])):
        with pytest.raises(DataError, match=r"view \(20 cells x 30 genes\)|view \(60 cells x 10 genes\)"):
            make()
    assert open_source(backed[:20].to_memory()).n_obs == 20


def _damage(f, key, name):
    """Damage the sparse matrix group ``f[key]`` as a faulty exporter or a cut-short copy would."""
    g = f[key]
    if name == "short indptr":
        ip = g["indptr"][()]
        del g["indptr"]
        g["indptr"] = ip[: len(ip) * 2 // 3]
    elif name == "decreasing indptr":
        ip = g["indptr"][()]
        ip[10], ip[11] = ip[11] + 1, ip[10]
        g["indptr"][...] = ip
    elif name in ("index too large", "negative index"):
        i = g["indices"][()]
        i[5] = 10_000 if name == "index too large" else -3
        g["indices"][...] = i
    elif name == "short data":
        d = g["data"][()]
        del g["data"]
        g["data"] = d[:-5]
    elif name == "no indices":
        del g["indices"]


DAMAGE = {"short indptr": r"pointers \(indptr\) for \d+ (rows \(cells\)|cells), not \d+",
          "decreasing indptr": r"pointers \(indptr\) decrease",
          "index too large": r"gene indices from 0 to 10000, outside 0\.\.29 for its 30 genes",
          "negative index": r"gene indices from -3 to 29, outside 0\.\.29",
          "short data": r"stores \d+ values (and|but) \d+ indices",
          "no indices": r"lacks a 1-D indices array|'indices' doesn't exist"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_corrupt_sparse_matrix_is_named_before_scipy_touches_it(tmp_path, damage):
    """scipy's conversions trust a sparse matrix's arrays: a cut-short indptr crashed the process
    (SIGSEGV), an out-of-range gene index read out of bounds or went into an embedding. Reading the
    file, streaming it and converting the matrix in memory each name the fault."""
    from masksc.data.io import to_csr32
    a = synthetic(60, n_genes=30, n_types=2, seed=0)
    a.write_h5ad(tmp_path / "d.h5ad")
    with h5py.File(tmp_path / "d.h5ad", "r+") as f:
        _damage(f, "X", damage)
    pattern = r"X is a corrupt sparse matrix in (d\.h5ad|cells 0\.\.59): .*" + DAMAGE[damage] + "|" + DAMAGE[damage]
    with pytest.raises(DataError, match=pattern):
        read(tmp_path / "d.h5ad")
    with pytest.raises(DataError, match=pattern):
        list(iter_chunks(tmp_path / "d.h5ad", chunk_size=25))
    if damage != "no indices":  # scipy cannot hold that one in memory
        with h5py.File(tmp_path / "d.h5ad", "r") as f:
            g = f["X"]
            X = sp.csr_matrix((60, 30), dtype=np.float32)  # arrays set as anndata sets them, unchecked
            X.data, X.indices, X.indptr = g["data"][()], g["indices"][()], g["indptr"][()]
        with pytest.raises(DataError, match=r"X is a corrupt sparse matrix: .*" + DAMAGE[damage]):
            to_csr32(X)
        Y = sp.csc_matrix((30, 60), dtype=np.float32)  # the same arrays as a CSC matrix of 30 cells x 60 genes
        Y.data, Y.indices, Y.indptr = X.data, X.indices, X.indptr
        with pytest.raises(DataError, match=r"X is a corrupt sparse matrix: "):
            to_csr32(Y)


def test_a_stored_shape_that_disagrees_with_the_cells_is_refused_before_streaming(tmp_path):
    """Streaming read as many cells as the stored shape said and wrote the rest off: a file whose
    shape, cell list or row pointers disagree is refused, as reading it whole refuses it."""
    a = synthetic(60, n_genes=30, n_types=2, seed=0)
    a.write_h5ad(tmp_path / "rows.h5ad")
    with h5py.File(tmp_path / "rows.h5ad", "r+") as f:
        f["X"].attrs["shape"] = np.array([50, 30])
    with pytest.raises(DataError, match=r"X is 50 x 30 in rows\.h5ad but the file names 60 cells \(obs\) and 30 "
                                        r"genes \(var\); fix: write the matrix again"):
        open_source(tmp_path / "rows.h5ad")
    with pytest.raises(DataError, match="rows.h5ad"):
        read(tmp_path / "rows.h5ad")
    dense = ad.AnnData(X=np.zeros(30, dtype=np.float32)[None].repeat(2, 0))  # written, then flattened to 1-D
    dense.write_h5ad(tmp_path / "flat.h5ad")
    with h5py.File(tmp_path / "flat.h5ad", "r+") as f:
        del f["X"]
        f["X"] = np.zeros(30, dtype=np.float32)
    with pytest.raises(DataError, match=r"X has shape \(30,\) in flat\.h5ad, not a 2-D cells x genes matrix"):
        open_source(tmp_path / "flat.h5ad")
    cells, genes = list(a.obs_names), list(a.var_names)
    for name, kw in {"few_barcodes": dict(cells=cells[:50]), "few_features": dict(genes=genes[:25])}.items():
        write_10x_h5(tmp_path / f"{name}.h5", a.X.toarray(), kw.get("cells", cells), kw.get("genes", genes))
        with pytest.raises(DataError, match=rf"the matrix is 30 genes x 60 cells in {name}\.h5 but the file names "
                                            rf"{len(kw.get('genes', genes))} features and "
                                            rf"{len(kw.get('cells', cells))} barcodes"):
            open_source(tmp_path / f"{name}.h5")
    write_10x_h5(tmp_path / "short.h5", a.X.toarray(), cells, genes)
    with h5py.File(tmp_path / "short.h5", "r+") as f:
        _damage(f, "matrix", "short indptr")
    with pytest.raises(DataError, match=r"corrupt sparse matrix in short\.h5: it has 40 pointers \(indptr\) for 60 "
                                        r"cells, not 61"):
        open_source(tmp_path / "short.h5")
    csc = a.copy()
    csc.X = csc.X.tocsc()
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with h5py.File(tmp_path / "csc.h5ad", "r+") as f:
        _damage(f, "X", "short indptr")
    for read_it in (open_source, read):  # a CSC matrix's pointers run over its genes
        with pytest.raises(DataError, match=r"corrupt sparse matrix in csc\.h5ad: it has 20 pointers \(indptr\) for "
                                            r"30 (genes|columns \(genes\)), not 31"):
            read_it(tmp_path / "csc.h5ad")


@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata")
def test_a_file_read_as_the_wrong_format_is_named(tmp_path):
    """--format scdeepcluster on an .h5ad and --format h5ad on a 10x .h5 raised AttributeError /
    TypeError from deep inside the reader."""
    a = synthetic(40, n_genes=30, n_types=2, seed=0)
    a.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(DataError, match=r"format='scdeepcluster' \(--format\), but .*a\.h5ad holds an AnnData; fix: "
                                        r"format='h5ad' \(--format h5ad\), or drop format="):
        read(tmp_path / "a.h5ad", format="scdeepcluster")
    write_10x_h5(tmp_path / "m.h5", a.X.toarray(), list(a.obs_names), list(a.var_names))
    with pytest.raises(DataError, match=r"format='h5ad' \(--format\), but .*m\.h5 holds a 10x Cell Ranger matrix; "
                                        r"fix: format='10x_h5' \(--format 10x_h5\), or drop format="):
        read(tmp_path / "m.h5", format="h5ad")
