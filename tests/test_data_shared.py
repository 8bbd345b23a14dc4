"""The paper's datasets in ../shared/data read with their labels (skipped when absent)."""
from functools import lru_cache

import numpy as np
import pytest

from masksc.data import read

pytestmark = pytest.mark.data


@lru_cache(maxsize=1)
def _read(path):
    return read(path)  # the full worm file takes seconds to decompress: read it once


@pytest.mark.parametrize("name,shape,n_labels", [
    ("10X_PBMC_top2000.h5", (4271, 2000), 8),
    ("worm_neuron_cell.h5", (4186, 13488), 10),
    ("worm_neuron_cell_top2000.h5", (4186, 2000), 10),
])
def test_shared_dataset(shared_data, name, shape, n_labels):
    a = _read(shared_data / name)
    assert a.shape == shape
    assert a.X.format == "csr" and a.X.dtype == np.float32
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() > 0
    assert a.obs["label"].nunique() == n_labels
    assert a.var_names.is_unique and a.var_names[0].startswith("gene_000")


def test_worm_full_needs_gene_filter_for_seurat_v3(shared_data):
    from masksc.data import Preprocessor
    from masksc.errors import DataError

    worm = _read(shared_data / "worm_neuron_cell.h5")
    with pytest.raises(DataError, match=r"raise min_cells \(now 0; tl.fit and masksc fit use 3"):  # as scanpy's fails
        Preprocessor(n_top_genes=2000).fit(worm)
    p = Preprocessor(n_top_genes=2000, min_cells=3).fit(worm)
    assert len(p.genes_) == 2000 and p.flavor_ == "seurat_v3"


def test_fit_runs_on_all_worm_genes_with_its_default_gene_filter(shared_data):
    from masksc.pipeline import fit

    worm = _read(shared_data / "worm_neuron_cell.h5")
    model, _ = fit(worm, "demo", epochs=1, teacher_overrides={"epochs": 1}, progress=False, grid_shape=(16, 16), embed_dim=32,
                   depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2, batch_size=256)
    assert model.preprocessor.flavor_ == "seurat_v3" and len(model.genes) == 256
    detected = np.asarray((worm[:, model.genes].X > 0).sum(axis=0)).ravel()
    assert detected.min() >= 3
