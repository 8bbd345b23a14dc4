"""AnnData-level API in scanpy's conventions: results are stored on the object.

- ``fit(adata, preset=...)`` -> a trained ``MaskSCModel``
- ``embed(adata, model)`` -> ``adata.obsm["X_masksc"]``
- ``cluster(adata, k=None)`` -> ``adata.obs["masksc_cluster"]``
- ``evaluate(adata, label_key="label")`` -> ARI / NMI / silhouette (also in ``adata.uns["masksc"]``)

Parameters of each step are recorded under ``adata.uns["masksc"]``. The expression matrix of
``adata`` is never modified.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from masksc import cluster as _cluster
from masksc.errors import DataError
from masksc.pipeline import MaskSCModel
from masksc.pipeline import fit as _fit

EMBEDDING_KEY = "X_masksc"
CLUSTER_KEY = "masksc_cluster"


def _uns(adata) -> dict:
    return adata.uns.setdefault("masksc", {})


def fit(adata, preset: str = "cpu", **kwargs) -> MaskSCModel:
    """Train mask-sc on ``adata`` (see ``masksc.pipeline.fit`` for the keyword arguments:
    ``model_dir``, ``epochs``, ``seed``, ``device``, ``resume``, config overrides).
    Records the preset and per-epoch losses in ``adata.uns["masksc"]``; returns the model."""
    model, result = _fit(adata, preset, **kwargs)
    _uns(adata)["fit"] = {"preset": preset, "epochs": result.epochs, "losses": list(result.losses),
                          "wall_s": result.wall_s, "model_dir": model.path}
    return model


def embed(adata, model: MaskSCModel | str | os.PathLike, *, key_added: str = EMBEDDING_KEY,
          batch_size: int = 1024, device: str | None = None, progress: bool = True) -> None:
    """Embed every cell of ``adata`` with ``model`` (a MaskSCModel or its directory) into
    ``adata.obsm[key_added]`` (float32 [n_cells, config.embedding_dim])."""
    if not isinstance(model, MaskSCModel):
        model = MaskSCModel.load(model, device=device or "cpu")
    adata.obsm[key_added] = model.embed(adata, batch_size=batch_size, device=device, progress=progress)
    _uns(adata)["embed"] = {"model": model.path, "key": key_added, "config": model.config.to_dict()}


def _embedding(adata, use_rep: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise DataError(f"adata.obsm has no {use_rep!r}; fix: run masksc.tl.embed(adata, model) first "
                        f"(or pass use_rep= one of {list(adata.obsm)}).")
    return np.asarray(adata.obsm[use_rep], dtype=np.float32)


def cluster(adata, k: int | None = None, *, use_rep: str = EMBEDDING_KEY, key_added: str = CLUSTER_KEY,
            seed: int = 0, **kwargs) -> None:
    """Cluster the embedding ``adata.obsm[use_rep]``: k-means (FAISS) when ``k`` is given,
    kNN graph + Leiden otherwise; labels go to ``adata.obs[key_added]`` (categorical)."""
    labels = _cluster.cluster_embedding(_embedding(adata, use_rep), k=k, seed=seed, **kwargs)
    adata.obs[key_added] = pd.Categorical(np.asarray(labels).astype(str))
    _uns(adata)["cluster"] = {"k": k, "use_rep": use_rep, "key": key_added, "seed": seed,
                              "n_clusters": int(len(np.unique(labels)))}


def evaluate(adata, label_key: str | None = "label", *, use_rep: str = EMBEDDING_KEY,
             cluster_key: str = CLUSTER_KEY, silhouette_sample: int | None = 10_000, seed: int = 0) -> dict:
    """ARI and NMI of ``adata.obs[cluster_key]`` against ``adata.obs[label_key]`` (when given and
    present) and the silhouette of the embedding under the predicted clusters."""
    if cluster_key not in adata.obs:
        raise DataError(f"adata.obs has no {cluster_key!r}; fix: run masksc.tl.cluster(adata) first.")
    truth = None
    if label_key is not None:
        if label_key not in adata.obs:
            raise DataError(f"adata.obs has no {label_key!r} labels; fix: pass label_key= one of "
                            f"{list(adata.obs.columns)}, or label_key=None for silhouette only.")
        truth = adata.obs[label_key].to_numpy()
    scores = _cluster.evaluate(_embedding(adata, use_rep), adata.obs[cluster_key].to_numpy(), truth,
                               silhouette_sample=silhouette_sample, seed=seed)
    _uns(adata)["metrics"] = dict(scores)
    return scores
