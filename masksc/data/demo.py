"""The embedded demo dataset: scanpy's bundled ``pbmc68k_reduced`` (700 cells, 10 labelled types)."""
from __future__ import annotations

import anndata as ad
import pandas as pd

from masksc.data.io import set_labels, to_csr32


def load_demo() -> ad.AnnData:
    """scanpy's ``pbmc68k_reduced`` as masksc input: AnnData [700, 765] whose ``X`` is CSR
    float32 of the log-normalised values in its ``.raw`` (so :class:`Preprocessor` detects it as
    log-normalised), ``var_names`` from ``.raw`` and ``obs["label"]`` = ``bulk_labels``.
    Ships inside scanpy: no download."""
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(X=to_csr32(src.raw.X), obs=pd.DataFrame(index=src.obs_names.copy()),
                       var=pd.DataFrame(index=src.raw.var_names.copy()))
    set_labels(adata, src.obs["bulk_labels"].astype(str).to_numpy())
    return adata
