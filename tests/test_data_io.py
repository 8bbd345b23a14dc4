"""Readers: round trips on files the tests write, format detection, read errors."""
import gzip
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from masksc.data import io as io_module
from masksc.data import open_source, read
from masksc.errors import DataError


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    X = rng.poisson(0.7, size=(30, 12)).astype(np.float32)
    X[:, 0] += 1  # no empty cells
    cells = [f"AAAC-{i}" for i in range(30)]
    genes = [f"G{j}" for j in range(12)]
    return X, cells, genes


def _check(adata, X, cells, genes):
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), X)
    assert list(adata.obs_names) == cells
    assert list(adata.var_names) == genes


def write_10x_h5(path, X, cells, genes, feature_types=None, genomes=None):
    """Cell Ranger v3 layout: CSC genes x cells under group 'matrix' (``genomes``: each feature's)."""
    M = sp.csc_matrix(X.T.astype(np.int32))
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = M.data, M.indices, M.indptr
        m["shape"] = np.array(M.shape, dtype=np.int32)
        m["barcodes"] = np.array(cells, dtype="S")
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{j}" for j in range(len(genes))], dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array(feature_types or ["Gene Expression"] * len(genes), dtype="S")
        feats["genome"] = np.array(genomes or ["GRCh38"] * len(genes), dtype="S")


def test_h5ad_roundtrip_and_backed(tmp_path, counts):
    X, cells, genes = counts
    src = ad.AnnData(X=sp.csc_matrix(X.astype(np.int64)), obs=pd.DataFrame(index=cells),
                     var=pd.DataFrame(index=genes))
    src.obs["label"] = [i % 3 for i in range(30)]
    src.write_h5ad(tmp_path / "a.h5ad")
    a = read(tmp_path / "a.h5ad")
    _check(a, X, cells, genes)
    assert isinstance(a.obs["label"].dtype, pd.CategoricalDtype)
    assert list(a.obs["label"][:4]) == ["0", "1", "2", "0"]
    b = read(tmp_path / "a.h5ad", backed=True)
    assert b.isbacked and b.shape == (30, 12)


def test_10x_h5_roundtrip(tmp_path, counts):
    X, cells, genes = counts
    write_10x_h5(tmp_path / "m.h5", X, cells, genes)
    a = read(tmp_path / "m.h5")
    _check(a, X, cells, genes)
    assert a.var["gene_ids"].iloc[3] == "ENSG3"


def test_10x_h5_keeps_gene_expression_and_unique_names(tmp_path, counts):
    X, cells, genes = counts
    genes = list(genes)
    genes[5] = genes[4]  # duplicate symbol, as in real 10x files
    ftypes = ["Gene Expression"] * 11 + ["Antibody Capture"]
    write_10x_h5(tmp_path / "m.h5", X, cells, genes, ftypes)
    a = read(tmp_path / "m.h5")
    np.testing.assert_array_equal(a.X.toarray(), X[:, :11])
    assert a.var_names.is_unique and list(a.var_names[4:6]) == ["G4", "G4-1"]


def test_csv_duplicate_genes_made_unique_as_10x(tmp_path, counts, caplog):
    """A file's repeated gene names get scanpy's G, G-1 (as 10x files do), not pandas's G.1."""
    X, cells, genes = counts
    genes = list(genes)
    genes[5] = genes[4]
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "d.csv")
    pd.DataFrame(X, index=cells, columns=genes).T.to_csv(tmp_path / "dt.csv")
    for a in (read(tmp_path / "d.csv"), read(tmp_path / "dt.csv", transpose=True)):
        assert list(a.var_names[4:6]) == ["G4", "G4-1"] and a.var_names.is_unique
        np.testing.assert_array_equal(a.X.toarray(), X)
    assert "1 duplicated gene names made unique" in caplog.text


@pytest.mark.parametrize("gz", [True, False])
def test_10x_mtx_roundtrip(tmp_path, counts, gz):
    X, cells, genes = counts
    d = tmp_path / "mtx"
    d.mkdir()
    op = (lambda p: gzip.open(p, "wt")) if gz else (lambda p: open(p, "w"))
    ext = ".gz" if gz else ""
    scipy.io.mmwrite(str(d / "matrix.mtx"), sp.coo_matrix(X.T.astype(np.int64)))
    if gz:
        (d / "matrix.mtx.gz").write_bytes(gzip.compress((d / "matrix.mtx").read_bytes()))
        (d / "matrix.mtx").unlink()
    with op(d / f"features.tsv{ext}") as fh:
        fh.writelines(f"ENSG{j}\t{g}\tGene Expression\n" for j, g in enumerate(genes))
    with op(d / f"barcodes.tsv{ext}") as fh:
        fh.writelines(c + "\n" for c in cells)
    _check(read(d), X, cells, genes)


def test_10x_mtx_v2_genes_tsv(tmp_path, counts):
    X, cells, genes = counts
    d = tmp_path / "v2"
    d.mkdir()
    scipy.io.mmwrite(str(d / "matrix.mtx"), sp.coo_matrix(X.T))
    (d / "genes.tsv").write_text("".join(f"ENSG{j}\t{g}\n" for j, g in enumerate(genes)))
    (d / "barcodes.tsv").write_text("".join(c + "\n" for c in cells))
    _check(read(d), X, cells, genes)


def test_csv_tsv_and_transpose(tmp_path, counts):
    X, cells, genes = counts
    df = pd.DataFrame(X, index=cells, columns=genes)
    df.to_csv(tmp_path / "a.csv")
    df.to_csv(tmp_path / "a.tsv", sep="\t")
    df.T.to_csv(tmp_path / "t.csv")
    _check(read(tmp_path / "a.csv"), X, cells, genes)
    _check(read(tmp_path / "a.tsv"), X, cells, genes)
    _check(read(tmp_path / "t.csv", transpose=True), X, cells, genes)


def test_scdeepcluster_roundtrip(tmp_path, counts):
    X, _, _ = counts
    y = np.arange(30) % 4 + 1.0
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["X"], f["Y"] = X.astype(np.float64), y
    a = read(tmp_path / "s.h5")
    np.testing.assert_array_equal(a.X.toarray(), X)
    assert a.X.dtype == np.float32
    assert list(a.var_names[:2]) == ["gene_0000", "gene_0001"]
    assert list(a.obs["label"][:5]) == ["1", "2", "3", "4", "1"]
    assert isinstance(a.obs["label"].dtype, pd.CategoricalDtype)


def test_missing_labels_stay_missing(tmp_path, counts):
    """A NaN label is an unlabelled cell, not a type called "nan" that ARI would score."""
    X, cells, genes = counts
    y = np.arange(30) % 3 + 1.0
    y[:4] = np.nan
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["X"], f["Y"] = X, y
    labels = read(tmp_path / "s.h5").obs["label"]
    assert labels.isna().sum() == 4
    assert list(labels.cat.categories) == ["1", "2", "3"]
    obs = pd.DataFrame({"label": pd.Categorical(["T", None] * 15)}, index=cells)
    ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(tmp_path / "a.h5ad")
    labels = read(tmp_path / "a.h5ad").obs["label"]
    assert labels.isna().sum() == 15 and list(labels.cat.categories) == ["T"]


def test_read_does_not_modify_file(tmp_path, counts):
    X, cells, genes = counts
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)).write_h5ad(
        tmp_path / "a.h5ad")
    before = (tmp_path / "a.h5ad").read_bytes()
    read(tmp_path / "a.h5ad").X.data[:] = 7
    assert (tmp_path / "a.h5ad").read_bytes() == before


# ---------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read(tmp_path / "nope.h5ad")


def test_unknown_format(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"abc")
    with pytest.raises(DataError, match="unknown format"):
        read(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="unknown format"):
        read(tmp_path / "x.parquet", format="loom")


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.h5ad").write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="cannot"):
        read(tmp_path / "bad.h5ad")
    (tmp_path / "bad.h5").write_bytes(b"truncated")
    with pytest.raises(DataError, match="cannot open"):
        read(tmp_path / "bad.h5")


def test_header_only_table(tmp_path):
    """A table of a header and no rows names what it lacks (it was reported as 0 cells x 0 genes)."""
    pd.DataFrame(np.zeros((0, 3)), columns=list("abc")).to_csv(tmp_path / "e.csv")
    with pytest.raises(DataError, match="e.csv holds a header row and no rows of values: 0 cells"):
        read(tmp_path / "e.csv")
    with pytest.raises(DataError, match="no rows of values: 0 genes"):
        read(tmp_path / "e.csv", transpose=True)


def test_empty_matrix(tmp_path):
    # (the index titled: untitled, the header line would be blank, and blank lines before a header are skipped)
    pd.DataFrame(np.ones((2, 0)), index=pd.Index(["c1", "c2"], name="cell")).to_csv(tmp_path / "e.csv")
    with pytest.raises(DataError, match="empty matrix: 2 cells x 0 genes"):
        read(tmp_path / "e.csv")


def test_nan_values(tmp_path, counts):
    X, cells, genes = counts
    X = X.copy()
    X[2, 3] = np.nan
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "n.csv")
    with pytest.raises(DataError, match="NaN"):
        read(tmp_path / "n.csv")


def test_a_loom_file_is_named_with_its_conversion(tmp_path, counts):
    """Its fix said "pass format=", and every format was then refused ("check the file")."""
    X, _, _ = counts
    for name in ("a.loom", "a.h5"):
        with h5py.File(tmp_path / name, "w") as f:
            f["matrix"] = X.T
            f.create_group("row_attrs")["Gene"] = np.array([b"g%d" % j for j in range(X.shape[1])])
            f.create_group("col_attrs")["CellID"] = np.array([b"c%d" % i for i in range(X.shape[0])])
        for fmt in (None, "h5ad", "10x_h5"):
            with pytest.raises(DataError, match=rf"a\.{name[2:]} is a loom file, which masksc does not read; fix: "
                                                r"convert it to \.h5ad, e\.g\. \(after pip install loompy\) "
                                                r"anndata\.read_loom\("):
                read(tmp_path / name, format=fmt)


def test_labels_wrong_length(tmp_path, counts):
    """The file's own labels were named as labels the user passed ("pass exactly one label per
    cell"); one per gene says the matrix is stored genes x cells."""
    X, _, _ = counts
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["X"], f["Y"] = X, np.arange(29)
    with pytest.raises(DataError, match=r"s\.h5: Y holds 29 labels, but X has 30 rows \(cells\) and 12 columns "
                                        r"\(genes\); fix: store one label per row \(cell\) of X\.$"):
        read(tmp_path / "s.h5")
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["X"], f["Y"] = X.T, np.arange(30)
    with pytest.raises(DataError, match=r"t\.h5: Y holds 30 labels, but X has 12 rows \(cells\) and 30 columns "
                                        r"\(genes\); X looks stored genes x cells; fix: write it cells x genes"):
        read(tmp_path / "t.h5")


def test_tables_keep_names_as_written_and_take_r_headers(tmp_path):
    """Names are text: "001" is not 1 and a gene called "NA" is not missing; a header without a
    name for the cell column (R's write.table) reads like one with it."""
    rows = ["001\t0\t2\t1", "010\t3\t0\t1"]
    (tmp_path / "r.tsv").write_text("\n".join(["NA\t0101\tG3"] + rows) + "\n")        # R: no corner name
    (tmp_path / "p.tsv").write_text("\n".join(["cell\tNA\t0101\tG3"] + rows) + "\n")  # pandas: a corner name
    for name in ("r.tsv", "p.tsv"):
        a = read(tmp_path / name)
        assert list(a.obs_names) == ["001", "010"] and list(a.var_names) == ["NA", "0101", "G3"]
        np.testing.assert_array_equal(a.X.toarray(), [[0, 2, 1], [3, 0, 1]])
    (tmp_path / "bad.tsv").write_text("\n".join(["a\tb\tc\td\te"] + rows) + "\n")
    with pytest.raises(DataError, match="the header names 5 columns but the rows hold a name and 3 values"):
        read(tmp_path / "bad.tsv")
    mtx = tmp_path / "mtx"
    mtx.mkdir()
    scipy.io.mmwrite(str(mtx / "matrix.mtx"), sp.coo_matrix(np.array([[1.0, 0.0], [2.0, 3.0]])))  # genes x cells
    (mtx / "genes.tsv").write_text("ENSG1\tNA\nENSG2\tnull\n")
    (mtx / "barcodes.tsv").write_text("AAAC-1\nNA\n")
    b = read(mtx)
    assert list(b.var_names) == ["NA", "null"] and list(b.obs_names) == ["AAAC-1", "NA"]


def test_transpose_is_for_tables_only(tmp_path, counts):
    X, cells, genes = counts
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)).write_h5ad(
        tmp_path / "a.h5ad")
    with pytest.raises(DataError, match="applies to csv/tsv tables only, not format 'h5ad'"):
        read(tmp_path / "a.h5ad", transpose=True)


def test_backed_needs_h5ad(tmp_path, counts):
    X, cells, genes = counts
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "a.csv")
    with pytest.raises(DataError, match="backed=True needs an .h5ad"):
        read(tmp_path / "a.csv", backed=True)


def test_non_numeric_csv(tmp_path, counts):
    X, cells, genes = counts
    df = pd.DataFrame(X, index=cells, columns=genes)
    df["celltype"] = "T"
    df.to_csv(tmp_path / "a.csv")
    with pytest.raises(DataError, match="not numeric"):
        read(tmp_path / "a.csv")


def test_a_table_cut_short_is_named_as_such_not_as_nan_to_clean(tmp_path, counts):
    """A csv cut off mid-row was reported as NaN values, with np.nan_to_num as the fix: that would
    fill the lost values with zeros. A missing value inside a complete line is still a NaN."""
    X, cells, genes = counts
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "a.csv")
    text = (tmp_path / "a.csv").read_text()
    cut = text[:text.rstrip("\n").rindex(",", 0, len(text) - 10)]  # the last line loses its last values
    kept = cut.splitlines()[-1].count(",")
    (tmp_path / "cut.csv").write_text(cut)
    with pytest.raises(DataError, match=rf"cut\.csv: its last line holds {kept + 1} of the 13 fields of the lines "
                                        r"before it: the file looks cut short .*; fix: copy or write it again whole\.$"):
        read(tmp_path / "cut.csv")
    lines = text.splitlines()
    for name, last in {"holed": 3, "empty_last": 12}.items():  # an empty field inside or at the end of a whole line
        holed = lines[:-1] + [",".join(v if j != last else "" for j, v in enumerate(lines[-1].split(",")))]
        (tmp_path / f"{name}.csv").write_text("\n".join(holed) + "\n")
        with pytest.raises(DataError, match=r"X contains 1 NaN and 0 infinite values"):
            read(tmp_path / f"{name}.csv")
    (tmp_path / "trailing.csv").write_text("\n".join(line + "," for line in lines) + "\n")  # every line ends in ","
    # not a file cut short, nor an empty gene name (it was "30 NaN values", np.nan_to_num, then "1 gene name is empty")
    trailing = r"every row ends in an empty field \(a separator ',' at the end of each line\); fix: remove the trailing"
    with pytest.raises(DataError, match=r"trailing\.csv: " + trailing):
        read(tmp_path / "trailing.csv")
    (tmp_path / "rows_only.csv").write_text("\n".join(lines[:1] + [line + "," for line in lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"rows_only\.csv: " + trailing):  # the header shifted onto the values: NaN
        read(tmp_path / "rows_only.csv")
    (tmp_path / "sheet.csv").write_text("\n".join(lines + [",,,", ",,,"]) + "\n")  # a spreadsheet's empty rows
    with pytest.raises(DataError, match=rf"sheet\.csv: line {len(lines) + 1} holds separators and no values \(a "
                                        r"spreadsheet's empty row\); fix: delete such lines"):  # "X contains 24 NaN"
        read(tmp_path / "sheet.csv")
    blanks = " ," * (len(lines[0].split(",")) - 1) + " "  # fields of spaces alone: pandas reads them as text
    (tmp_path / "sheet_spaces.csv").write_text("\n".join(lines + [blanks]) + "\n")
    (tmp_path / "trailing_space.csv").write_text("\n".join(line + ", " for line in lines) + "\n")
    for str_dtype in (False, True):  # True: text read as pandas 3 reads it (str, not object)
        with pd.option_context("future.infer_string", str_dtype):
            with pytest.raises(DataError, match=rf"line {len(lines) + 1} holds separators and no values"):  # not
                read(tmp_path / "sheet_spaces.csv")  # "columns [...] are not numeric"
            with pytest.raises(DataError, match=r"trailing_space\.csv: " + trailing):
                read(tmp_path / "trailing_space.csv")
    (tmp_path / "blank_lines.csv").write_text("\n".join(lines + ["", ""]) + "\n")  # empty lines are skipped
    _check(read(tmp_path / "blank_lines.csv"), X, cells, genes)
    # a last gene the header names, empty in every cell, is missing values, not a trailing separator
    (tmp_path / "last_nan.csv").write_text("\n".join(lines[:1] + [line[:line.rindex(",") + 1] for line in lines[1:]]))
    with pytest.raises(DataError, match=r"X contains 30 NaN"):
        read(tmp_path / "last_nan.csv")


def write_10x_v2_h5(path, genomes: dict, cells):
    """Cell Ranger v2 layout: one group per genome, each a CSC genes x cells matrix;
    ``genomes``: {name: (X cells x genes, genes)}."""
    with h5py.File(path, "w") as f:
        for name, (X, genes) in genomes.items():
            M = sp.csc_matrix(X.T.astype(np.int32))
            g = f.create_group(name)
            g["data"], g["indices"], g["indptr"] = M.data, M.indices, M.indptr
            g["shape"] = np.array(M.shape, dtype=np.int32)
            g["barcodes"] = np.array(cells, dtype="S")
            g["genes"] = np.array([f"ENS{name}{j}" for j in range(len(genes))], dtype="S")
            g["gene_names"] = np.array(genes, dtype="S")


def test_10x_h5_v2_legacy(tmp_path, counts):
    X, cells, genes = counts
    write_10x_v2_h5(tmp_path / "v2.h5", {"GRCh38": (X, genes)}, cells)
    _check(read(tmp_path / "v2.h5"), X, cells, genes)
    # stored genes x cells, so not streamed: read in memory instead
    src = open_source(tmp_path / "v2.h5")
    assert src.path is None and list(src.var_names) == genes
    np.testing.assert_array_equal(sp.vstack([c for _, c in src.chunks(7)]).toarray(), X)


def test_10x_h5_genome_picks_one_genome_of_a_mixed_species_file(tmp_path, counts):
    """A v2 file with two genomes must name one (the message lists them), and reads as scanpy
    reads that genome; a v3 file is read whole, or one genome's features with genome=."""
    import scanpy as sc
    X, cells, genes = counts
    human, mouse = X[:, :7], X[:, 7:]
    write_10x_v2_h5(tmp_path / "v2.h5", {"hg19": (human, genes[:7]), "mm10": (mouse, genes[7:])}, cells)
    with pytest.raises(DataError, match=r"holds 2 genomes \['hg19', 'mm10'\].*fix: read one, e.g. "
                                        r"masksc.read\(path, genome='hg19'\) \(--genome hg19"):
        read(tmp_path / "v2.h5")
    for name, part, part_genes in (("hg19", human, genes[:7]), ("mm10", mouse, genes[7:])):
        _check(read(tmp_path / "v2.h5", genome=name), part, cells, part_genes)
        scanpy_read = sc.read_10x_h5(tmp_path / "v2.h5", genome=name)
        assert (read(tmp_path / "v2.h5", genome=name).X != scanpy_read.X).nnz == 0
    with pytest.raises(DataError, match=r"genome='GRCh38' \(--genome\): .* holds the genomes \['hg19', 'mm10'\]"):
        read(tmp_path / "v2.h5", genome="GRCh38")
    write_10x_h5(tmp_path / "v3.h5", X, cells, genes, genomes=["hg19"] * 7 + ["mm10"] * 5)
    _check(read(tmp_path / "v3.h5"), X, cells, genes)
    _check(read(tmp_path / "v3.h5", genome="mm10"), mouse, cells, genes[7:])
    with pytest.raises(DataError, match=r"genome='mm9' \(--genome\): .* holds the genomes \['hg19', 'mm10'\]"):
        read(tmp_path / "v3.h5", genome="mm9")
    # CITE-seq: antibody features carry no genome; genome= and the Gene Expression filter apply together
    write_10x_h5(tmp_path / "ab.h5", X, cells, genes, feature_types=["Gene Expression"] * 10 + ["Antibody Capture"] * 2,
                 genomes=["hg19"] * 7 + ["mm10"] * 3 + [""] * 2)
    _check(read(tmp_path / "ab.h5", genome="mm10"), X[:, 7:10], cells, genes[7:10])
    assert (read(tmp_path / "ab.h5", genome="mm10").X != sc.read_10x_h5(tmp_path / "ab.h5", genome="mm10").X).nnz == 0
    with pytest.raises(DataError, match=r"holds the genomes \['hg19', 'mm10'\]; fix"):
        read(tmp_path / "ab.h5", genome="GRCh38")
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"genome='hg19' \(--genome\) picks a genome of a 10x .h5 file, not of "
                                        r"format 'csv'; fix: drop it"):
        read(tmp_path / "t.csv", genome="hg19")


@pytest.mark.parametrize("name", ["b.csv", "b.h5ad"])
def test_values_beyond_float32_are_not_reported_as_infinite(tmp_path, counts, name):
    """Reading casts to float32, which would make 1e39 inf: it is named as too large instead."""
    X, cells, genes = counts
    X = X.astype(np.float64)
    X[2, 3] = 1e39
    if name.endswith(".csv"):
        pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / name)
    else:
        ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)).write_h5ad(
            tmp_path / name)
    with pytest.raises(DataError, match=rf"X holds 1 values too large for float32 \(max 3.4e38; largest magnitude "
                                        rf"1e\+39\) in {name}; fix: ") as exc:
        read(tmp_path / name)
    assert "infinite" not in str(exc.value)


def _barcodes(n):
    rng = np.random.default_rng(1)
    return ["".join(rng.choice(list("ACGT"), 16)) + "-1" for _ in range(n)]


def test_a_genes_by_cells_table_is_refused_unless_transposed(tmp_path, counts):
    """A header of barcodes means rows are genes: read as stored, it was trained on sideways."""
    X, _, genes = counts
    cells = _barcodes(len(X))
    pd.DataFrame(X, index=cells, columns=genes).T.to_csv(tmp_path / "genes_by_cells.csv.gz")
    with pytest.raises(DataError, match=r"header row looks like cell barcodes \(e\.g\. '[ACGT]{16}-1'\).*fix: "
                                        r"transpose=True \(--transpose\)"):
        read(tmp_path / "genes_by_cells.csv.gz")
    _check(read(tmp_path / "genes_by_cells.csv.gz", transpose=True), X, cells, genes)
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "cells_by_genes.csv")
    _check(read(tmp_path / "cells_by_genes.csv"), X, cells, genes)  # barcodes as row names: as it should be


@pytest.mark.parametrize("suffix", [".1", "_1", "-1"])
def test_barcodes_as_r_and_merged_samples_write_them_mark_a_genes_by_cells_table(tmp_path, counts, suffix):
    """R's make.names turns AAAC..-1 into AAAC...1 and merged samples append _1: both are barcodes."""
    X, _, genes = counts
    cells = [f"s1_{c[:-2]}{suffix}" for c in _barcodes(len(X))]
    pd.DataFrame(X, index=cells, columns=genes).T.to_csv(tmp_path / "g.csv")
    with pytest.raises(DataError, match="header row looks like cell barcodes"):
        read(tmp_path / "g.csv")
    _check(read(tmp_path / "g.csv", transpose=True), X, cells, genes)


def test_ensembl_gene_ids_as_row_names_mark_a_genes_by_cells_table(tmp_path, counts):
    """Cells named cell_1.. give no barcode to go by; Ensembl IDs down the first column do."""
    X, _, _ = counts
    ids = [f"ENSMUSG{j:011d}.{j % 3 + 1}" for j in range(X.shape[1])]
    cells = [f"cell_{i}" for i in range(len(X))]
    pd.DataFrame(X, index=cells, columns=ids).T.to_csv(tmp_path / "g.tsv", sep="\t")
    with pytest.raises(DataError, match=r"first column looks like Ensembl gene IDs \(e\.g\. 'ENSMUSG00000000000\.1'"
                                        r"\), so its rows are genes.*transpose=True \(--transpose\)"):
        read(tmp_path / "g.tsv")
    _check(read(tmp_path / "g.tsv", transpose=True), X, cells, ids)
    pd.DataFrame(X, index=cells, columns=ids).to_csv(tmp_path / "c.tsv", sep="\t")
    _check(read(tmp_path / "c.tsv"), X, cells, ids)  # Ensembl IDs as the header: cells x genes, as it should be


def test_a_table_without_cell_names_keeps_its_first_gene(tmp_path, counts):
    """pandas' index=False / R's row.names=FALSE: the first column is the first gene's counts, not
    names (it lost that gene, its counts becoming cell names); scanpy names the cells 0..n-1 too."""
    import scanpy as sc
    X, _, genes = counts
    pd.DataFrame(X.astype(int), columns=genes).to_csv(tmp_path / "noindex.csv", index=False)
    adata = read(tmp_path / "noindex.csv")
    _check(adata, X, [str(i) for i in range(len(X))], genes)
    ref = sc.read_csv(tmp_path / "noindex.csv")
    np.testing.assert_array_equal(adata.X.toarray(), np.asarray(ref.X))
    assert list(adata.var_names) == list(ref.var_names) == genes
    # unique integer cell IDs in the first column are names, as before
    pd.DataFrame(X, index=range(1, len(X) + 1), columns=genes).to_csv(tmp_path / "ids.csv")
    _check(read(tmp_path / "ids.csv"), X, [str(i) for i in range(1, len(X) + 1)], genes)
    # and a blank first header cell (pandas' and R's index column) always marks names: float, repeated or
    # missing IDs included
    for name, index in (("float", np.arange(len(X)) + 0.5), ("repeated", np.arange(len(X)) % 7),
                        ("missing", np.r_[np.nan, np.arange(1, len(X))])):
        pd.DataFrame(X, index=index, columns=genes).to_csv(tmp_path / f"{name}.csv")
        got = read(tmp_path / f"{name}.csv")
        np.testing.assert_array_equal(got.X.toarray(), X)
        assert list(got.var_names) == genes, name
    pd.DataFrame(X, index=np.arange(len(X)) + 0.5, columns=genes).T.to_csv(tmp_path / "float_t.csv")
    assert list(read(tmp_path / "float_t.csv", transpose=True).var_names) == genes


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_gzip_is_one_error_naming_the_file(tmp_path, counts, damage):
    X, cells, genes = counts
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "a.csv.gz")
    data = bytearray((tmp_path / "a.csv.gz").read_bytes())
    if damage == "truncated":  # an interrupted download
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2:len(data) // 2 + 8] = b"\xff" * 8
    (tmp_path / "a.csv.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot read .*a\.csv\.gz as csv \((EOFError|error|BadGzipFile)"):
        read(tmp_path / "a.csv.gz")


def test_a_file_whose_name_and_content_disagree_on_gzip_is_named_with_the_rename(tmp_path, counts, monkeypatch):
    """Readers pick gzip by the name: a compressed .csv was 'names are not text the reader
    decodes ... write it again with UTF-8', a plain .csv.gz and an mtx folder's files 'BadGzipFile
    ... check the file is complete'."""
    X, cells, genes = counts
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "plain.csv")
    (tmp_path / "packed.csv").write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    (tmp_path / "named.csv.gz").write_bytes((tmp_path / "plain.csv").read_bytes())
    for fmt in (None, "csv"):
        with pytest.raises(DataError, match=r"packed\.csv is gzip-compressed, but its name does not end in \.gz.*; "
                                            r"fix: rename it packed\.csv\.gz\.$"):
            read(tmp_path / "packed.csv", format=fmt)
        with pytest.raises(DataError, match=r"named\.csv\.gz is named \.gz but is not gzip-compressed .*; fix: "
                                            r"rename it named\.csv\.$"):
            read(tmp_path / "named.csv.gz", format=fmt)
    _mtx_folder(tmp_path / "d", X, cells, genes)
    (tmp_path / "d" / "barcodes.tsv").write_bytes(gzip.compress((tmp_path / "d" / "barcodes.tsv").read_bytes()))
    with pytest.raises(DataError, match=r"d/barcodes\.tsv is gzip-compressed, but its name"):
        read(tmp_path / "d")
    _mtx_folder(tmp_path / "e", X, cells, genes)
    (tmp_path / "e" / "matrix.mtx").rename(tmp_path / "e" / "matrix.mtx.gz")
    with pytest.raises(DataError, match=r"e/matrix\.mtx\.gz is named \.gz but is not gzip-compressed"):
        read(tmp_path / "e")
    _check(read(tmp_path / "plain.csv"), X, cells, genes)
    (tmp_path / "locked.csv.gz").write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    real_open = open

    def locked(file, *a, **k):  # as chmod 000 for a user without root's override
        if str(file).endswith("locked.csv.gz"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **k)
    monkeypatch.setattr(io_module, "open", locked, raising=False)
    # the check cannot open it and leaves it to the reader (it said "not gzip-compressed; rename it"); pandas opens
    # the file itself, past the fake, so it is read here
    _check(read(tmp_path / "locked.csv.gz"), X, cells, genes)


def test_a_table_with_another_separator_names_it(tmp_path, counts):
    X, cells, genes = counts
    df = pd.DataFrame(X, index=cells, columns=genes)
    df.to_csv(tmp_path / "excel.csv", sep=";")
    with pytest.raises(DataError, match=r"one column: no comma separates its values \(a semicolon does\); fix: write "
                                        r"the table again with a comma between values, e\.g\. pandas\.read_csv\(path, "
                                        r"sep=';', index_col=0\)\.to_csv\(new_path, sep=','\)"):
        read(tmp_path / "excel.csv")
    df.to_csv(tmp_path / "spaced.txt", sep=" ")
    with pytest.raises(DataError, match=r"no tab separates its values \(a space does\); fix: write the table again "
                                        r"with a tab"):
        read(tmp_path / "spaced.txt")
    df.to_csv(tmp_path / "comma.txt")
    with pytest.raises(DataError, match=r"no tab separates its values \(a comma does\); fix: format='csv'"):
        read(tmp_path / "comma.txt")
    _check(read(tmp_path / "comma.txt", format="csv"), X, cells, genes)


@pytest.mark.parametrize("comments", [["# exported by tool v1"], ["#v1"], ["# tool, v1"], ["", "#a", "#b"]])
def test_comment_lines_above_the_header_are_named(tmp_path, counts, comments):
    """They were 'no comma separates its values (a space does)', a header of the wrong length or
    a line of the wrong length."""
    X, cells, genes = counts
    text = "\n".join(comments) + "\n" + pd.DataFrame(X, index=cells, columns=genes).to_csv()
    (tmp_path / "t.csv").write_text(text)
    with gzip.open(tmp_path / "t.csv.gz", "wt") as fh:
        fh.write(text)
    what = (rf"line 1 \({comments[0]!r}\) is a comment \('#'\), which is not skipped: it" if len(comments) == 1 else
            r"lines 2-3 \('#a', \.\.\.\) are comments \('#'\), which are not skipped: the first")  # after the blank
    for name, cmd in (("t.csv", r"grep -v '\^#' t\.csv > new\.csv"),
                      ("t.csv.gz", r"zcat t\.csv\.gz \| grep -v '\^#' > new\.csv")):
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: {what} would be read as the header; fix: "
                                            rf"delete the comment lines above the header row, e\.g\. {cmd}\.$"):
            read(tmp_path / name)


def test_headers_starting_with_a_hash_are_headers_and_keep_their_tables_messages(tmp_path, counts):
    """'#,g0,...' or '#cell,g0,...' over rows of as many fields is a header; a fault of its table
    (a row cut short, a header short of names) was blamed on a comment, with advice deleting it."""
    X, cells, genes = counts
    text = pd.DataFrame(X, index=cells, columns=genes).to_csv()
    for head in ("#", "#cell"):
        (tmp_path / "h.csv").write_text(head + text)
        _check(read(tmp_path / "h.csv"), X, cells, genes)
        (tmp_path / "cut.csv").write_text(head + text.rstrip("\n").rsplit(",", 1)[0] + "\n")
        with pytest.raises(DataError, match=r"its last line holds \d+ of the \d+ fields"):
            read(tmp_path / "cut.csv")
    (tmp_path / "short.csv").write_text("#cell," + ",".join(genes[:-2]) + "\n" + text.split("\n", 1)[1])
    with pytest.raises(DataError, match=r"the header names \d+ columns but the rows hold a name and \d+ values; fix: "
                                        r".* If the first line is a comment \('#'\), delete it: comments are not "
                                        r"skipped\.$"):
        read(tmp_path / "short.csv")
    (tmp_path / "alone.csv").write_text("#a,b\n")  # a header alone, not a comment
    with pytest.raises(DataError, match=r"holds a header row and no rows of values"):
        read(tmp_path / "alone.csv")
    (tmp_path / "only.csv").write_text("# a\n# b\n")  # comments alone: named (it was 'a space separates values')
    with pytest.raises(DataError, match=r"lines 1-2 \('# a', \.\.\.\) are comments"):
        read(tmp_path / "only.csv")


def _mtx_folder(d, X, cells, genes, prefix="", cells_by_genes=False, barcode_header=False):
    d.mkdir(exist_ok=True)
    scipy.io.mmwrite(str(d / f"{prefix}matrix.mtx"), sp.coo_matrix(X if cells_by_genes else X.T))
    (d / f"{prefix}features.tsv").write_text("".join(f"ENSG{j}\t{g}\tGene Expression\n" for j, g in enumerate(genes)))
    (d / f"{prefix}barcodes.tsv").write_text(("barcode\n" if barcode_header else "") + "".join(c + "\n" for c in cells))


def test_mtx_stored_cells_by_genes_geo_prefixes_and_header_lines(tmp_path, counts):
    X, cells, genes = counts
    _mtx_folder(tmp_path / "swapped", X, cells, genes, cells_by_genes=True)
    _check(read(tmp_path / "swapped"), X, cells, genes)
    _mtx_folder(tmp_path / "geo", X, cells, genes, prefix="GSM123_sample1_")
    _check(read(tmp_path / "geo" / "GSM123_sample1_matrix.mtx"), X, cells, genes)
    with pytest.raises(DataError, match=r"folder without matrix\.mtx\[\.gz\].*e\.g\. .*GSM123_sample1_matrix\.mtx "
                                        r"\(its prefix names"):
        read(tmp_path / "geo")
    _mtx_folder(tmp_path / "header", X, cells, genes, barcode_header=True)
    with pytest.raises(DataError, match=r"barcodes\.tsv has one line more than the matrix has cells \(a header line\? "
                                        r"fix: remove it\)"):
        read(tmp_path / "header")


def test_empty_gene_names_of_a_file_are_refused_naming_it(tmp_path, counts):
    """Made unique, empty symbols became "", "-1", .. and matched another file's empty ones."""
    from masksc.data import Preprocessor
    X, cells, genes = counts
    _mtx_folder(tmp_path / "blank", X, cells, ["", *genes[1:3], "", *genes[4:]])
    with pytest.raises(DataError, match=r"blank: 2 gene names are empty \(columns \[0, 3\]\); fix: fill them"):
        read(tmp_path / "blank")
    with pytest.raises(DataError, match=r"2 gene names are empty"):
        Preprocessor(n_top_genes=5).fit(tmp_path / "blank")


def test_files_no_reader_takes_as_they_are_are_named_with_their_fix(tmp_path, counts):
    """A gzipped .h5ad, a float16 sparse X (scipy holds none) and an AnnData with only layers were
    "check the file is complete" / "set adata.X" errors."""
    from masksc.data import Preprocessor
    X, cells, genes = counts
    adata = ad.AnnData(sp.csr_matrix(X.astype(np.float32)), obs=pd.DataFrame(index=cells),
                       var=pd.DataFrame(index=genes))
    adata.write_h5ad(tmp_path / "a.h5ad")
    (tmp_path / "a.h5ad.gz").write_bytes(gzip.compress((tmp_path / "a.h5ad").read_bytes()))
    (tmp_path / "kept_name.h5ad.gz").write_bytes((tmp_path / "a.h5ad").read_bytes())  # decompressed, name kept
    _check(read(tmp_path / "kept_name.h5ad.gz"), X, cells, genes)
    for call in (read, Preprocessor().fit):
        with pytest.raises(DataError, match=r"a\.h5ad\.gz is gzip-compressed; .*fix: gunzip -c .*a\.h5ad\.gz > "
                                            r".*a\.h5ad, then pass .*a\.h5ad\.$"):
            call(tmp_path / "a.h5ad.gz")
    (tmp_path / "packed.h5ad").write_bytes((tmp_path / "a.h5ad.gz").read_bytes())  # compressed, named as not
    for call in (read, lambda p: read(p, format="h5ad"), Preprocessor().fit):  # was "file signature not found"
        with pytest.raises(DataError, match=r"packed\.h5ad is gzip-compressed; .*fix: gunzip -c .*packed\.h5ad > "
                                            r".*unpacked_packed\.h5ad, then pass"):
            call(tmp_path / "packed.h5ad")
    half = tmp_path / "half.h5ad"
    half.write_bytes((tmp_path / "a.h5ad").read_bytes())
    with h5py.File(half, "r+") as f:
        data = f["X/data"][()].astype(np.float16)
        del f["X/data"]
        f["X/data"] = data
    with pytest.raises(DataError, match=r"its sparse matrices \['X'\] are stored as float16, which scipy\.sparse \(so "
                                        r"anndata too\) cannot hold"):
        read(half)
    with h5py.File(half, "r+") as f:  # the fix given
        d = f['X/data'][()]
        del f['X/data']
        f['X/data'] = d.astype('float32')
    _check(read(half), X, cells, genes)
    only_layers = ad.AnnData(obs=adata.obs, var=adata.var, layers={"counts": adata.X})
    with pytest.raises(DataError, match=r"no X matrix, only the layers \['counts'\]; fix: pass layer='counts'"):
        Preprocessor().fit(only_layers)


def test_the_names_files_beside_a_10x_matrix_point_to_the_matrix(tmp_path, counts):
    """A path to barcodes.tsv / features.tsv (GEO-prefixed too) names the matrix beside it, where
    it was read as a table (one column, or text columns); a tsv of that name with no matrix beside
    it is still a table, and format='tsv' reads it as one."""
    X, cells, genes = counts
    _mtx_folder(tmp_path / "mtx", X, cells, genes)
    for name in ("barcodes.tsv", "features.tsv"):
        with pytest.raises(DataError, match=rf"mtx/{name} is the .* file of a 10x matrix, not a matrix; fix: pass "
                                            rf".*mtx/matrix\.mtx or its folder .*mtx \(masksc reads"):
            read(tmp_path / "mtx" / name)
    _mtx_folder(tmp_path / "geo", X, cells, genes, prefix="GSM9_")
    with pytest.raises(DataError, match=r"GSM9_barcodes\.tsv is the barcodes \(cell names\) file of a 10x matrix, "
                                        r"not a matrix; fix: pass .*geo/GSM9_matrix\.mtx \(masksc"):
        read(tmp_path / "geo" / "GSM9_barcodes.tsv")
    table = pd.DataFrame(X, index=cells, columns=genes)
    table.to_csv(tmp_path / "genes.tsv", sep="\t")
    _check(read(tmp_path / "genes.tsv"), X, cells, genes)
    table.to_csv(tmp_path / "mtx" / "genes.tsv", sep="\t")  # beside a matrix, but named as a table on purpose
    _check(read(tmp_path / "mtx" / "genes.tsv", format="tsv"), X, cells, genes)


def test_h5ad_layouts_scanpy_and_old_anndata_write(tmp_path, counts):
    """Scaled X beside .raw reads, and reading its X as the data names --use-raw (streamed, as fit /
    embed read it); a file with layers but no X names them and --layer; a file of anndata < 0.7
    streams as it reads, its .raw too."""
    X, cells, genes = counts
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))
    a.raw = a.copy()
    a.X = sp.csr_matrix(X - X.mean(0))
    a.write_h5ad(tmp_path / "scaled.h5ad")
    got = read(tmp_path / "scaled.h5ad")
    np.testing.assert_array_equal(got.raw.X.toarray(), X)
    for source in (tmp_path / "scaled.h5ad", got):
        with pytest.raises(DataError, match=r"X holds negative \(scaled\) values and \.raw is set.*fix: use_raw=True "
                                            r"\(--use-raw\)"):
            open_source(source)
        np.testing.assert_array_equal(next(open_source(source, use_raw=True).chunks(100))[1].toarray(), X)
    b = ad.AnnData(obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes), layers={"counts": sp.csr_matrix(X)})
    b.write_h5ad(tmp_path / "layers.h5ad")
    with pytest.raises(DataError, match=r"no X matrix, only the layers \['counts'\]; fix: read a layer with --layer "
                                        "counts"):
        read(tmp_path / "layers.h5ad")
    with pytest.raises(DataError, match=r"only the layers \['counts'\]; fix: --layer counts"):
        open_source(tmp_path / "layers.h5ad")
    M = sp.csr_matrix(X)
    with h5py.File(tmp_path / "legacy.h5ad", "w") as f:  # anndata < 0.7: compound obs / var, no encoding-type
        g = f.create_group("X")
        g["data"], g["indices"], g["indptr"] = M.data, M.indices, M.indptr
        g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = "csr", np.array(M.shape)
        f["obs"] = np.array([(c.encode(),) for c in cells], dtype=[("index", "S10")])
        f["var"] = np.array([(g_.encode(),) for g_ in genes], dtype=[("index", "S10")])
    _check(read(tmp_path / "legacy.h5ad"), X, cells, genes)
    streamed = sp.vstack([chunk for _, chunk in open_source(tmp_path / "legacy.h5ad").chunks(7)])
    np.testing.assert_array_equal(streamed.toarray(), X)
    with h5py.File(tmp_path / "legacy.h5ad", "a") as f:  # scanpy's old layout: scaled X, raw.X / raw.var beside it
        f["raw.X"] = f["X"]
        f["raw.var"] = f["var"][()]
        del f["X"]
        f["X"] = X - X.mean(0)
    with pytest.raises(DataError, match=r"X holds negative \(scaled\) values and \.raw is set.*--use-raw"):
        open_source(tmp_path / "legacy.h5ad")
    streamed = sp.vstack([chunk for _, chunk in open_source(tmp_path / "legacy.h5ad", use_raw=True).chunks(7)])
    np.testing.assert_array_equal(streamed.toarray(), X)


def test_a_layer_and_raw_named_together_are_refused_alike_for_files_and_anndata(tmp_path, counts):
    from masksc.data import with_layer
    X, cells, genes = counts
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes),
                   layers={"counts": sp.csr_matrix(X)})
    a.raw = a.copy()
    a.write_h5ad(tmp_path / "a.h5ad")
    message = r"^use_raw=True \(--use-raw\) and layer= \(--layer\) both name the matrix to read; fix: pass one of them\.$"
    for call in (lambda: with_layer(a, "counts", use_raw=True), lambda: open_source(a, "counts", use_raw=True),
                 lambda: open_source(tmp_path / "a.h5ad", "counts", use_raw=True)):
        with pytest.raises(DataError, match=message):
            call()


def test_small_tables_without_cell_names_read_as_scanpy_reads_them(tmp_path):
    """A first column of distinct whole numbers under a gene's name is that gene, as scanpy reads
    it (one cell's counts became its name, and the gene was lost), with a warning from three rows;
    cell IDs are told by their column's title (R's "X" after subsetting, cell_id, Unnamed: 0) or
    by numbering the rows 0.. / 1..; transposed, a cell's title heads that cell's counts; a
    one-gene table is a table."""
    import scanpy as sc
    tables = {"one.csv": "A,B,C\n5,1,2\n", "gapdh.csv": "GAPDH,ACTB,CD3E\n5,1,0\n12,0,1\n7,3,0\n"}
    for name, text in tables.items():
        (tmp_path / name).write_text(text)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = read(tmp_path / name)
        ref = sc.read_csv(tmp_path / name)
        np.testing.assert_array_equal(got.X.toarray(), np.asarray(ref.X))
        assert list(got.var_names) == list(ref.var_names) and list(got.obs_names) == list(ref.obs_names)
        assert [str(w.message) for w in caught] == ([] if name == "one.csv" else [
            f"{tmp_path / name}: its first column 'GAPDH' holds distinct whole numbers, read as the first gene's "
            "counts; if they are cell IDs, title that column cell_id"])
    (tmp_path / "gene.csv").write_text("A\n1\n2\n3\n")  # scanpy's read_csv finds no ',' and stops
    _check(read(tmp_path / "gene.csv"), np.array([[1], [2], [3]], dtype=np.float32), ["0", "1", "2"], ["A"])
    counts = np.array([[1, 0, 2], [0, 5, 1], [2, 2, 0], [4, 0, 1]], dtype=np.float32)
    for title, cells in (("X", (3, 7, 12, 15)), ("cell_idx", (3, 7, 12, 15)), ("Unnamed: 0", (3, 7, 12, 15)),
                         ("cell_id", (3, 7, 12, 15)), ("n", (1, 2, 3, 4))):
        (tmp_path / "r.csv").write_text(f"{title},GeneA,GeneB,GeneC\n" + "".join(
            f"{cell},{','.join(str(int(v)) for v in row)}\n" for cell, row in zip(cells, counts)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the title or the numbering settles it
            _check(read(tmp_path / "r.csv"), counts, [str(c) for c in cells], ["GeneA", "GeneB", "GeneC"])
    barcodes = ["AAACCTGAGAAACCAT-1", "AAACCTGAGAAACCGC-1", "AAACCTGAGAAACGAG-1"]
    (tmp_path / "t.csv").write_text(",".join(barcodes) + "\n5,1,0\n12,0,1\n7,3,0\n")
    _check(read(tmp_path / "t.csv", transpose=True), np.array([[5, 12, 7], [1, 0, 3], [0, 1, 0]], dtype=np.float32),
           barcodes, ["0", "1", "2"])


def test_numeric_ids_or_a_gene_title_heading_a_genes_by_cells_table(tmp_path):
    """Transposed, Entrez IDs under a title not read as a name column's became a cell, and every
    gene was named 0..n-1, without a word; a first gene named IDS lost its counts to the cells'
    names; a genes x cells table titled gene_symbol was read as cells."""
    ids, counts = [51248, 63633, 7157, 1956], np.array([[1, 0, 0], [0, 2, 0], [3, 0, 0], [0, 0, 4]])
    (tmp_path / "entrez.tsv").write_text("EntrezID\tc0\tc1\tc2\n" + "".join(
        f"{g}\t{chr(9).join(map(str, row))}\n" for g, row in zip(ids, counts)))
    with pytest.warns(UserWarning, match=r"its first column 'EntrezID' holds distinct whole numbers, read as the first "
                                         r"cell's counts; if they are gene IDs, title that column gene_id"):
        read(tmp_path / "entrez.tsv", transpose=True)
    (tmp_path / "gene_id.tsv").write_text((tmp_path / "entrez.tsv").read_text().replace("EntrezID", "gene_id"))
    _check(read(tmp_path / "gene_id.tsv", transpose=True), counts.T.astype(np.float32), ["c0", "c1", "c2"],
           [str(g) for g in ids])
    # two samples' cells numbered alike under a name title are names still (repeated IDs are not counts)
    (tmp_path / "concat.csv").write_text("cell_id,GeneA,GeneB\n0,1,2\n1,0,3\n0,4,0\n1,2,2\n")
    with pytest.warns(UserWarning, match="not unique"):  # anndata's
        got = read(tmp_path / "concat.csv")
    np.testing.assert_array_equal(got.X.toarray(), [[1, 2], [0, 3], [4, 0], [2, 2]])
    assert list(got.var_names) == ["GeneA", "GeneB"]
    (tmp_path / "symbols.csv").write_text("gene_symbol,c1,c2,c3\nG1,1,0,2\nG2,0,3,1\nG3,2,2,0\n")
    with pytest.raises(DataError, match=r"symbols\.csv: its first column is titled 'gene_symbol', so its rows are "
                                        r"genes and its columns cells; fix: transpose=True \(--transpose\)"):
        read(tmp_path / "symbols.csv")
    _check(read(tmp_path / "symbols.csv", transpose=True), np.array([[1, 0, 2], [0, 3, 2], [2, 1, 0]],
                                                                     dtype=np.float32), ["c1", "c2", "c3"],
           ["G1", "G2", "G3"])


def test_header_rows_the_csv_module_cannot_judge_are_read_as_before(tmp_path):
    """The header is read with the csv module (pandas took seconds on wide tables); blank lines
    before it are skipped for the rows too, whatever ends the lines (the header became a row of
    values); a name holding a line break is read, and lines are counted as they are; a header read
    with the wrong separator past the csv module's field limit, or a quote never closed, is
    pandas' to judge, as before (a raw _csv.Error; 'the header names 2 columns')."""
    expected = np.array([[1, 0], [0, 3]], dtype=np.float32)
    for name, end in (("blank.csv", "\n"), ("mac.csv", "\r"), ("dos.csv", "\r\n")):  # bare CR: old Excel for Mac
        (tmp_path / name).write_bytes(end.join(["", "", ",g1,g2", "c1,1,0", "c2,0,3", ""]).encode())
        _check(read(tmp_path / name), expected, ["c1", "c2"], ["g1", "g2"])  # pandas' skiprows lost c1 after \r\r
    (tmp_path / "break.csv").write_text('cell,"g\n1",g2\nc1,1,0\nc2,0,3\n')  # a quoted name holding a line break
    _check(read(tmp_path / "break.csv"), expected, ["c1", "c2"], ["g\n1", "g2"])  # a ParserError before
    (tmp_path / "cr_kept.csv").write_bytes(b'cell,"g\r1",g2\r\n"c\r\n1",1,0\r\nc2,0,3\r\n')  # as pandas keeps them
    _check(read(tmp_path / "cr_kept.csv"), expected, ["c\r\n1", "c2"], ["g\r1", "g2"])
    for text in ("\n\ncell,g1,g2\n", "\r\r,0,1,2\r", 'cell,"g\n1",g2\n'):  # a header alone, after blank lines
        (tmp_path / "alone.csv").write_bytes(text.encode())  # or over two lines: it read as a row of values
        with pytest.raises(DataError, match="holds a header row and no rows of values: 0 cells"):
            read(tmp_path / "alone.csv")
    # a header the csv module refuses (a space after a closing quote) that also holds a quoted break: pandas reads
    # it, and the rows start after its last line (they started on its second: an error, or a row of its numbers)
    (tmp_path / "refused.csv").write_text('cell,"g1" ,"g\n2"\nc1,1,0\nc2,0,3\n')
    _check(read(tmp_path / "refused.csv"), expected, ["c1", "c2"], ["g1 ", "g\n2"])
    (tmp_path / "refused_title.csv").write_text('"cell\nid"x,10,20\nc1,1,0\nc2,0,3\n')
    _check(read(tmp_path / "refused_title.csv"), expected, ["c1", "c2"], ["10", "20"])
    (tmp_path / "break_short.csv").write_text('cell,"g\n1",g2\nc1,1,0\nc2,0\nc3,1,1\n')
    with pytest.raises(DataError, match=r"line 4 holds 2 fields where the other rows hold 3"):  # it said line 3
        read(tmp_path / "break_short.csv")
    genes = [f"GENE{i}" for i in range(20_000)]  # R write.table's defaults: a space between quoted names
    (tmp_path / "r_default.txt").write_text(" ".join(f'"{g}"' for g in genes) + "\n" + '"c0" ' + " ".join(
        ["0"] * 20_000) + "\n")
    with pytest.raises(DataError, match=r"its first line holds one column: no tab separates its values \(a space "
                                        r"does\)"):
        read(tmp_path / "r_default.txt")
    (tmp_path / "quote.csv").write_text(',"g1,g2,g3\nc1,1,0,2\nc2,0,3,1\n')  # a quote never closed
    with pytest.raises(DataError, match=r"cannot read .*quote\.csv as csv \(ParserError"):
        read(tmp_path / "quote.csv")


def test_a_malformed_line_is_named_not_taken_for_a_file_cut_short(tmp_path):
    (tmp_path / "odd.csv").write_text(",A,B\nc0,1,2,7\nc1,2,3\nc2,4,5\n")
    with pytest.raises(DataError, match=r"odd\.csv: line 2 holds 4 fields where the other rows hold 3; fix: correct "
                                        r"that line \(a stray separator or value\?\)"):
        read(tmp_path / "odd.csv")
    (tmp_path / "tie.csv").write_text(",GeneA,GeneB\nc1,1\nc2,0,5\n")  # a tie: the header says 3 fields a row
    with pytest.raises(DataError, match=r"tie\.csv: line 2 holds 2 fields where the other rows hold 3; fix: correct "
                                        r"that line \(a missing separator"):
        read(tmp_path / "tie.csv")
    (tmp_path / "cut2.csv").write_text("G1,G2,G3\nc1,1,2,3\nc2,4,5\n")  # a tie between the header's two widths
    with pytest.raises(DataError, match=r"cut2\.csv: its last line holds 3 of the 4 fields .* looks cut short"):
        read(tmp_path / "cut2.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv is empty; fix"):
        read(tmp_path / "empty.csv")


def test_upper_case_gz_tables_are_read(tmp_path, counts):
    X, cells, genes = counts
    pd.DataFrame(X, index=cells, columns=genes).to_csv(tmp_path / "UP.CSV.GZ", compression="gzip")
    _check(read(tmp_path / "UP.CSV.GZ"), X, cells, genes)


def test_a_named_matrix_file_is_the_one_read(tmp_path, counts):
    """A path to a matrix file reads that file: not a matrix.mtx beside another name, not a
    matrix.mtx.gz beside the plain file; a name that cannot name its siblings is refused."""
    X, cells, genes = counts
    _mtx_folder(tmp_path / "d", X, cells, genes)
    scipy.io.mmwrite(str(tmp_path / "d" / "other.mtx"), sp.coo_matrix(X.T * 100))
    scipy.io.mmwrite(str(tmp_path / "gz.mtx"), sp.coo_matrix(X.T * 10))
    with open(tmp_path / "gz.mtx", "rb") as src, gzip.open(tmp_path / "d" / "matrix.mtx.gz", "wb") as dst:
        dst.write(src.read())
    _check(read(tmp_path / "d" / "matrix.mtx"), X, cells, genes)
    _check(read(tmp_path / "d" / "matrix.mtx.gz"), X * 10, cells, genes)
    with pytest.raises(DataError, match=r"other\.mtx: a 10x matrix file's name ends in matrix\.mtx\[\.gz\]"):
        read(tmp_path / "d" / "other.mtx")


def test_a_damaged_file_of_an_mtx_folder_is_named(tmp_path, counts):
    X, cells, genes = counts
    _mtx_folder(tmp_path / "d", X, cells, genes)
    (tmp_path / "d" / "barcodes.tsv").write_text("")
    with pytest.raises(DataError, match=r"d/barcodes\.tsv is empty; fix: copy it again"):
        read(tmp_path / "d")
    _mtx_folder(tmp_path / "latin", X, cells, genes)
    (tmp_path / "latin" / "features.tsv").write_bytes("".join(f"ENSG{j}\tgène{j}\tGene Expression\n"
                                                             for j in range(12)).encode("latin-1"))
    with pytest.raises(DataError, match=r"latin/features\.tsv is not UTF-8 text .*; fix: save it as UTF-8"):
        read(tmp_path / "latin")
    _mtx_folder(tmp_path / "e", X, cells, genes)
    whole = gzip.compress((tmp_path / "e" / "matrix.mtx").read_bytes())
    (tmp_path / "e" / "matrix.mtx").unlink()
    (tmp_path / "e" / "matrix.mtx.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cannot read .*e/matrix\.mtx\.gz \(EOFError"):
        read(tmp_path / "e")


def test_10x_features_keep_their_types_and_genome_as_scanpy_does(tmp_path, counts):
    """var holds gene_ids, feature_types (and genome for an .h5) as scanpy's readers give them; a
    file with no Gene Expression features is read whole with a warning (scanpy gives no genes);
    UTF-8 names are decoded."""
    import scanpy as sc
    X, cells, genes = counts
    types = ["Gene Expression"] * 10 + ["Antibody Capture"] * 2
    write_10x_h5(tmp_path / "m.h5", X, cells, genes, feature_types=types)
    got, ref = read(tmp_path / "m.h5"), sc.read_10x_h5(tmp_path / "m.h5")
    assert list(got.var_names) == list(ref.var_names) == genes[:10]
    for column in ("gene_ids", "feature_types", "genome"):
        assert list(got.var[column]) == list(ref.var[column])
    write_10x_h5(tmp_path / "adt.h5", X, cells, genes, feature_types=["Antibody Capture"] * 12)
    with pytest.warns(UserWarning, match=r"holds no 'Gene Expression' features \(only \['Antibody Capture'\]\); "
                                         r"reading all 12"):
        assert read(tmp_path / "adt.h5").shape == (30, 12)
    _mtx_folder(tmp_path / "d", X, cells, genes)
    assert list(read(tmp_path / "d").var["feature_types"]) == ["Gene Expression"] * 12
    accented = [f"gène{j}" for j in range(12)]
    write_10x_h5(tmp_path / "u.h5", X, cells, [g.encode() for g in accented])
    write_10x_h5(tmp_path / "latin.h5", X, cells, [g.encode("latin-1") for g in accented])
    assert list(read(tmp_path / "u.h5").var_names) == list(open_source(tmp_path / "u.h5").var_names) == accented
    names = [g.encode() for g in accented]
    names[3] = "gène3".encode("latin-1")  # one name written in another encoding: that one is read as Latin-1
    write_10x_h5(tmp_path / "latin.h5", X, cells, names)
    for reader in (read, open_source):
        with pytest.warns(UserWarning, match=r"1 names are not UTF-8 text, read as Latin-1 \(e\.g\. 'gène3'\)"):
            assert list(reader(tmp_path / "latin.h5").var_names) == accented  # the others stay UTF-8
    with pytest.warns(UserWarning, match=r"holds no 'Gene Expression' features"):
        assert open_source(tmp_path / "adt.h5").n_vars == 12


def test_a_format_the_file_contradicts_names_the_one_it_holds(tmp_path, counts):
    X, cells, genes = counts
    ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)).write_h5ad(
        tmp_path / "a.h5ad")
    with pytest.raises(DataError, match=r"format='10x_h5' \(--format\), but .*a\.h5ad holds an AnnData; fix: "
                                        r"format='h5ad' \(--format h5ad\), or drop format="):
        read(tmp_path / "a.h5ad", format="10x_h5")
    write_10x_h5(tmp_path / "renamed.h5ad", X, cells, genes)  # a Cell Ranger file named .h5ad
    _check(read(tmp_path / "renamed.h5ad"), X, cells, genes)
    with pytest.raises(DataError, match=r"format='h5ad' \(--format\), but .*holds a 10x Cell Ranger matrix"):
        read(tmp_path / "renamed.h5ad", format="h5ad")
    with h5py.File(tmp_path / "old.h5ad", "w") as f:  # anndata < 0.7, dense: laid out as an scDeepCluster pair
        f["X"] = X
        f["obs"] = np.array([(c.encode(),) for c in cells], dtype=[("index", "S10")])
        f["var"] = np.array([(g.encode(),) for g in genes], dtype=[("index", "S10")])
    _check(read(tmp_path / "old.h5ad", format="h5ad"), X, cells, genes)
    with pytest.raises(DataError, match=r"format='scdeepcluster' \(--format\), but .*old\.h5ad holds an AnnData; "
                                        r"fix: format='h5ad'"):
        read(tmp_path / "old.h5ad", format="scdeepcluster")
    dense = tmp_path / "dense.h5ad"  # X a dataset, like an scDeepCluster file's: read as one, its names were lost
    ad.AnnData(X=X, obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)).write_h5ad(dense)
    with pytest.raises(DataError, match=r"format='scdeepcluster' \(--format\), but .*dense\.h5ad holds an AnnData"):
        read(dense, format="scdeepcluster")
    with pytest.raises(DataError, match=r"format='csv' \(--format\), but .*dense\.h5ad holds an AnnData; fix: "
                                        r"format='h5ad'"):
        read(dense, format="csv")
    with h5py.File(tmp_path / "pair.h5", "w") as f:
        f["X"], f["Y"] = X, np.arange(30) % 3
    with pytest.raises(DataError, match=r"format='h5ad' \(--format\), but .*pair\.h5 holds an scDeepCluster X / Y "
                                        r"pair; fix: format='scdeepcluster'"):
        read(tmp_path / "pair.h5", format="h5ad")


@pytest.mark.parametrize("bad_index", [10**6, -3])
def test_a_corrupt_10x_h5_with_other_features_is_refused_before_features_are_dropped(tmp_path, counts, bad_index):
    """Dropping antibody features slices the matrix, which on out-of-range indices lost a count
    silently (10**6), reported garbage bounds (-3) or crashed the process (far out of range)."""
    X, cells, genes = counts
    path = tmp_path / "bad.h5"
    write_10x_h5(path, X, cells, genes, ["Gene Expression"] * 10 + ["Antibody Capture"] * 2)
    with h5py.File(path, "r+") as f:
        indices = f["matrix/indices"][()]
        indices[5] = bad_index
        del f["matrix/indices"]
        f["matrix/indices"] = indices
    with pytest.raises(DataError, match=rf"X is a corrupt sparse matrix in bad\.h5: it holds gene "
                                        rf"indices from {min(bad_index, 0)} to {max(bad_index, 11)}, outside 0..11"):
        read(path)


def test_an_anndata_written_before_0_7_is_read_as_one_whatever_its_suffix(tmp_path, counts):
    """A dense one's X is a dataset, as an scDeepCluster pair's: as .h5 it was read as one, losing
    its cell and gene names; a pair with some other group named obs stays a pair."""
    X, cells, genes = counts
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f["X"] = X
        f["obs"] = np.array([(c.encode(),) for c in cells], dtype=[("index", "S10")])
        f["var"] = np.array([(g.encode(),) for g in genes], dtype=[("index", "S10")])
    _check(read(tmp_path / "old.h5"), X, cells, genes)
    with h5py.File(tmp_path / "pair.h5", "w") as f:
        f["X"], f["Y"] = X, np.arange(30) % 3
        f.create_group("obs")
    assert read(tmp_path / "pair.h5", format="scdeepcluster").n_obs == 30
