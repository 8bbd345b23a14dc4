"""AnnData-level API in scanpy's conventions: results are stored on the object.

- ``fit(adata, preset=...)`` -> a trained ``MaskSCModel``
- ``embed(adata, model)`` -> ``adata.obsm["X_masksc"]``
- ``neighbors(adata)`` -> the embedding's kNN graph in ``adata.obsp`` / ``adata.uns["masksc_neighbors"]``,
  stored as scanpy's ``pp.neighbors`` stores one (``sc.tl.umap(adata, neighbors_key="masksc_neighbors")``)
- ``cluster(adata, k=None)`` -> ``adata.obs["masksc_cluster"]``
- ``evaluate(adata, label_key="label")`` -> ARI / NMI / silhouette (also in ``adata.uns["masksc"]``)

Parameters of each step are recorded under ``adata.uns["masksc"]``. The expression matrix of
``adata`` is never modified. ``embed``, ``neighbors`` and ``cluster`` take scanpy's ``copy=``:
True leaves ``adata`` as it is and returns a copy holding the result.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from masksc import cluster as _cluster
from masksc.checks import check_flags
from masksc.data.stream import SCALED_SAMPLE_CELLS, check_not_backed_view, check_not_scaled_beside_raw, with_layer
from masksc.data.validate import _as_matrix, no_x_matrix
from masksc.errors import DataError, warn
from masksc.pipeline import MaskSCModel
from masksc.pipeline import fit as _fit

EMBEDDING_KEY = "X_masksc"
CLUSTER_KEY = "masksc_cluster"
NEIGHBORS_KEY = "masksc_neighbors"


_WRAP = "wrap the cells x genes matrix as anndata.AnnData(X) with var_names set to the gene names"
# The fix for each step given a path, and given a bare matrix.
_FIXES = {"fit": ("masksc.pipeline.fit(path, ...) or `masksc fit DATA -o DIR` to stream the file", _WRAP),
          "embed": ("model.embed_file(path, OUT) or `masksc embed DATA --model DIR -o OUT.h5ad` to stream it",
                    _WRAP),
          "neighbors": ("`masksc cluster EMBEDDED.h5ad -o OUT.h5ad` (without -k it stores the graph)",
                        "for an embedding matrix Z use masksc.cluster.knn_graph(Z)"),
          "cluster": ("`masksc cluster EMBEDDED.h5ad -o OUT.h5ad`",
                      "for an embedding matrix Z use masksc.cluster.cluster_embedding(Z, k)"),
          "evaluate": ("`masksc evaluate CLUSTERED.h5ad`",
                       "for an embedding matrix Z use masksc.cluster.evaluate(Z, pred, truth)")}


def _record(adata, step: str, info: dict) -> None:
    """Store ``info`` as ``adata.uns["masksc"][step]``, by assignment so that on a view anndata
    makes it a copy (with its ImplicitModificationWarning) instead of the record being lost."""
    runs = dict(adata.uns.get("masksc", {}))
    runs[step] = info
    adata.uns["masksc"] = runs


def _target(adata, copy: bool):
    """The AnnData a step writes into: ``adata`` itself, or (``copy``) a copy of it in memory."""
    if not copy:
        return adata
    if adata.isbacked:
        raise DataError("copy=True on an AnnData opened backed would read the whole file into memory; fix: "
                        "adata = adata.to_memory() first, or copy=False to store the result on the backed object.")
    return adata.copy()


def _check_adata(adata, step: str) -> None:
    """Raise DataError unless ``adata`` is an AnnData the tl functions can store their results on
    (a path or a bare matrix cannot be used) and, when backed, not a view: ``fit`` and ``embed``
    would stream the cells of the whole file, and anndata cannot store a result on such a view."""
    if isinstance(adata, (str, os.PathLike)):
        raise DataError(f"masksc.tl.{step} takes an AnnData (its results are stored on it), got the path "
                        f"{os.fspath(adata)!r}; fix: adata = masksc.read(path) first, or {_FIXES[step][0]}.")
    if not isinstance(adata, ad.AnnData):
        raise DataError(f"masksc.tl.{step} takes an AnnData (its results are stored on it), got a "
                        f"{type(adata).__name__}; fix: {_FIXES[step][1]}.")
    if step in ("fit", "embed"):
        check_not_backed_view(adata)
    elif adata.isbacked and adata.is_view:
        raise DataError(f"this is a view ({adata.n_obs} cells) of the backed file {adata.filename}, and anndata "
                        f"cannot store masksc.tl.{step}'s result on it (it would have to copy the backed selection); "
                        "fix: adata[mask].to_memory() first, or run it on the whole backed object.")


def _check_key(key_added) -> None:
    """Refuse a ``key_added`` that cannot name a result (None, a number): anndata stores it, and
    writing the object fails later."""
    if not isinstance(key_added, str) or not key_added:
        raise DataError(f"key_added={key_added!r}; fix: pass a name for the result, a non-empty string.")


def _check_expression(adata, step: str, layer: str | None) -> None:
    """Raise DataError unless ``adata`` has the expression matrix to read, ``X`` or the layer
    ``layer``; scaled values in ``X`` with ``adata.raw`` set get the fix ``use_raw=True``."""
    # backed: the first cells stand for the file (scaled values are negative in almost every cell)
    try:
        X = _as_matrix(with_layer(adata, layer)[:SCALED_SAMPLE_CELLS].X if adata.isbacked else with_layer(adata, layer))
    except KeyError as exc:  # a backed file without X: h5py's raw KeyError
        if layer is None and adata.isbacked and not _file_has_x(adata.filename):
            raise no_x_matrix(adata) from exc
        raise
    if layer is None and adata.raw is not None:
        check_not_scaled_beside_raw(X, f"masksc.tl.{step}(..., use_raw=True), or layer= a counts layer")


def _file_has_x(path) -> bool:
    import h5py
    with h5py.File(path, "r") as f:
        return "X" in f


def fit(adata, preset: str = "cpu", *, layer: str | None = None, use_raw: bool = False, **kwargs) -> MaskSCModel:
    """Train mask-sc on ``adata`` (an AnnData, in memory or opened ``backed="r"``), on its ``X``
    or, with ``layer`` (e.g. ``"counts"``), on ``adata.layers[layer]``, or with ``use_raw`` on
    ``adata.raw`` (its genes); see ``masksc.pipeline.fit`` for the keyword arguments:
    ``model_dir``, ``epochs``, ``seed``, ``device``, ``resume``, config overrides. Records the
    preset, matrix read and per-epoch losses in ``adata.uns["masksc"]``; returns the model.
    Raises DataError when ``adata`` is a path or a bare matrix, before any work."""
    _check_adata(adata, "fit")
    check_flags(use_raw=use_raw)
    if not use_raw:
        _check_expression(adata, "fit", layer)
    model, result = _fit(adata, preset, layer=layer, use_raw=use_raw, **kwargs)  # streamed when backed
    model_dir = kwargs.get("model_dir")
    _record(adata, "fit", {"preset": preset, "layer": layer, "use_raw": use_raw, "epochs": result.epochs,
                           "losses": list(result.losses), "wall_s": result.wall_s,
                           "model_dir": None if model_dir is None else str(Path(model_dir).resolve()),
                           "checkpoint": None if model.path is None else str(Path(model.path).resolve())})
    return model


def embed(adata, model: MaskSCModel | str | os.PathLike, *, layer: str | None = None, use_raw: bool = False,
          key_added: str = EMBEDDING_KEY, batch_size: int = 1024, device: str | None = None,
          progress: bool = True, amp: bool = True, copy: bool = False):
    """Embed every cell of ``adata`` (an AnnData; its ``X``, ``adata.layers[layer]`` or, with
    ``use_raw``, ``adata.raw``: read what the model was fitted on) with ``model`` (a
    MaskSCModel or its directory) into ``adata.obsm[key_added]`` (float32 [n_cells,
    config.embedding_dim]).

    ``batch_size``: cells per forward pass. ``device``: where to run; None runs a MaskSCModel
    where its weights are, and loads a directory onto CUDA when there is a GPU, else the CPU
    (as ``masksc embed`` and ``tl.fit`` do). ``progress``: show a progress bar. ``amp``: bf16
    autocast on CUDA, as ``masksc embed`` runs (False: float32 there too). ``copy``: return a
    copy of ``adata`` with the embedding and leave ``adata`` as it is (else None is returned)."""
    from masksc.train import resolve_device
    _check_adata(adata, "embed")
    check_flags(use_raw=use_raw, progress=progress, amp=amp, copy=copy)
    _check_key(key_added)
    if not isinstance(model, (MaskSCModel, str, os.PathLike)):
        raise DataError(f"model must be a MaskSCModel or the directory `fit` wrote it to, got a {type(model).__name__}; "
                        "fix: pass tl.fit's return value or its model_dir.")
    if not isinstance(model, MaskSCModel):
        model = MaskSCModel.load(model, device=resolve_device(device))
    if not use_raw:
        with model.noting_fitted_input(layer, use_raw):  # another matrix than the model's is the likely cause
            _check_expression(adata, "embed", layer)
    adata = _target(adata, copy)
    adata.obsm[key_added] = model.embed(adata, batch_size=batch_size, device=device, progress=progress, layer=layer,
                                        use_raw=use_raw, amp=amp)
    _record(adata, "embed", {"model": model.path, "layer": layer, "use_raw": use_raw, "key": key_added,
                             "config": model.config.to_dict()})
    return adata if copy else None


def _embedding(adata, use_rep: str, distances: bool = True) -> np.ndarray:
    """``adata.obsm[use_rep]`` checked as ``masksc.cluster.check_embedding`` checks it (``distances``:
    for euclidean distances, checked for their squares and centred before a cast to float32; a
    cosine graph takes any scale and is never centred)."""
    if use_rep not in adata.obsm:
        others = f" (or pass use_rep= (--use-rep) one of {list(adata.obsm)})" if len(adata.obsm) else ""
        raise DataError(f"adata.obsm has no {use_rep!r}; fix: run masksc.tl.embed(adata, model) first, or "
                        f"`masksc embed DATA --model DIR -o OUT.h5ad` on the command line{others}.")
    return _cluster.check_embedding(_obsm_matrix(adata, use_rep), f"adata.obsm[{use_rep!r}]", distances,
                                    centre=distances)


def _obsm_matrix(adata, use_rep: str):
    """``adata.obsm[use_rep]`` as a dense array-like (a sparse one densified)."""
    Z = adata.obsm[use_rep]
    return Z.toarray() if sp.issparse(Z) else Z


def _graph_keys(adata, key: str) -> tuple[str, str]:
    """The ``obsp`` keys (connectivities, distances) of the graph under ``uns[key]``, found as
    scanpy finds them: its defaults for ``"neighbors"``, else the keys ``uns[key]`` names, else
    ``key + "_connectivities"`` / ``key + "_distances"``."""
    if key == "neighbors":
        return "connectivities", "distances"
    stored = adata.uns.get(key)
    stored = stored if isinstance(stored, Mapping) else {}
    return stored.get("connectivities_key", f"{key}_connectivities"), stored.get("distances_key", f"{key}_distances")


def _embedding_digest(adata, use_rep: str) -> str:
    """A digest of ``adata.obsm[use_rep]``'s values as stored (a float64 change below float32's
    resolution counts; float32, the usual dtype, gives earlier releases' digest), so a stored
    graph is reused only for the embedding it was built from (a re-embedding keeps ``use_rep``
    but changes every row). Called after :func:`_embedding` has checked them."""
    return hashlib.blake2b(np.ascontiguousarray(_obsm_matrix(adata, use_rep)).data, digest_size=16).hexdigest()


def _params(adata, key: str) -> Mapping:
    """The settings (``params``) of the graph stored under ``uns[key]``, empty when it has none."""
    stored = adata.uns.get(key)
    return stored.get("params", {}) if isinstance(stored, Mapping) else {}


def _own_params(adata, key: str) -> Mapping | None:
    """The settings of the graph masksc stored under ``uns[key]``, or None when there is none."""
    params = _params(adata, key)
    return params if params.get("computed_by") == "masksc" else None


def _foreign_graph(adata, key: str) -> str | None:
    """What holds a graph masksc did not compute under ``key`` (e.g. scanpy's), or None."""
    if _own_params(adata, key) is not None:
        return None
    held = ([f"adata.uns[{key!r}]"] if key in adata.uns else []) + \
        [f"adata.obsp[{name!r}]" for name in _graph_keys(adata, key) if name in adata.obsp]
    return " and ".join(held) or None


def neighbors(adata, n_neighbors: int = _cluster.N_NEIGHBORS, *, use_rep: str = EMBEDDING_KEY,
              metric: str = "euclidean", key_added: str = NEIGHBORS_KEY, seed: int = 0, use_gpu: bool | None = None,
              copy: bool = False, **search_kw):
    """kNN graph of the embedding ``adata.obsm[use_rep]`` (FAISS, see ``masksc.cluster.knn_search``),
    stored as scanpy's ``pp.neighbors(key_added=...)`` stores one, so scanpy's tools read it
    (``sc.tl.umap(adata, neighbors_key="masksc_neighbors")``, ``sc.tl.leiden``, ``sc.tl.paga``):

    - ``adata.obsp[key_added + "_connectivities"]``: UMAP fuzzy weights, symmetric float32 [n, n];
    - ``adata.obsp[key_added + "_distances"]``: each cell's ``n_neighbors - 1`` nearest other cells,
      float32 [n, n];
    - ``adata.uns[key_added]``: the two keys and the settings (``params``).

    ``key_added="neighbors"`` writes scanpy's default keys (``connectivities``, ``distances``).
    ``n_neighbors`` counts the cell itself, as scanpy's does; more than there are cells becomes
    scanpy's ``1 + n_cells // 2``, with a warning. ``seed`` seeds an approximate (IVF)
    index, used above 100k cells. ``search_kw`` go to ``masksc.cluster.knn_search`` (``index``,
    ``nlist``, ``nprobe``, ``target_recall``: e.g. ``target_recall=0.8`` for a faster, rougher
    graph) and are recorded with the settings. A graph there that masksc did not compute (e.g.
    scanpy's) is not replaced: a DataError names the fix. ``copy``: return a copy of ``adata``
    with the graph and leave ``adata`` as it is (else None is returned)."""
    _check_adata(adata, "neighbors")
    check_flags(("use_gpu",), copy=copy, use_gpu=use_gpu)
    _check_key(key_added)
    _check_search_settings(search_kw)
    foreign = _foreign_graph(adata, key_added)
    if foreign:
        raise DataError(f"{foreign} hold a graph masksc did not compute (e.g. scanpy's pp.neighbors); fix: "
                        f"key_added= another name (default {NEIGHBORS_KEY!r}), or delete that graph first.")
    Z = _embedding(adata, use_rep, distances=metric != "cosine")
    n_neighbors = _fewer_for_few_cells(n_neighbors, Z.shape[0])
    digest = _embedding_digest(adata, use_rep)
    adata = _target(adata, copy)  # before the search, which can take minutes
    _store_graph(adata, key_added, Z, digest, use_rep, n_neighbors, metric, seed, use_gpu, search_kw)
    return adata if copy else None


def _fewer_for_few_cells(n_neighbors, n_cells: int):
    """``n_neighbors``, or scanpy's ``1 + n_cells // 2`` with a warning when it exceeds the
    ``n_cells`` there are (a bad value, and fewer than 2 cells, are left for ``knn_search`` to refuse)."""
    if isinstance(n_neighbors, (int, np.integer)) and not isinstance(n_neighbors, bool) and n_neighbors > n_cells >= 2:
        lowered = 1 + n_cells // 2
        warn(f"n_neighbors={n_neighbors} is more than the {n_cells} cells; lowered to {lowered}, as scanpy's "
             "pp.neighbors does (pass n_neighbors= (--n-neighbors) at most the number of cells to choose it)")
        return lowered
    return n_neighbors


SEARCH_SETTINGS = ("index", "nlist", "nprobe", "target_recall", "ngpu")  # knn_search's, beside neighbors' own
_SCANPY_NEIGHBORS = {"random_state": "seed= seeds masksc's index",
                     "method": "masksc's connectivities are always UMAP's ('umap')",
                     "n_pcs": "use_rep's embedding is used whole: store the components you want in obsm and pass "
                              "that key as use_rep",
                     "knn": "the graph is always a kNN graph", "transformer": "the search is FAISS's"}


_NEIGHBORS_ARGS = ("n_neighbors", "use_rep", "metric", "key_added", "seed", "use_gpu", "copy")  # neighbors' own


def _check_search_settings(search_kw: dict) -> None:
    """TypeError, before any work, for a keyword ``tl.neighbors`` does not take, saying what
    masksc does instead for scanpy's ``pp.neighbors`` arguments and naming a close match else."""
    import difflib
    unknown = sorted(set(search_kw) - set(SEARCH_SETTINGS))
    if not unknown:
        return
    why = []
    for name in unknown:
        match = difflib.get_close_matches(name, [*_NEIGHBORS_ARGS, *SEARCH_SETTINGS], n=1)
        why.append(f"{name}: {_SCANPY_NEIGHBORS[name]}" if name in _SCANPY_NEIGHBORS else
                   f"{name}: did you mean {match[0]!r}?" if match else name)
    raise TypeError(f"masksc.tl.neighbors got unexpected keyword argument(s) {unknown} ({'; '.join(why)}); it takes "
                    f"{', '.join(_NEIGHBORS_ARGS)} and, for the FAISS search, {list(SEARCH_SETTINGS)}.")


def _store_graph(adata, key: str, Z: np.ndarray, digest: str, use_rep: str, n_neighbors: int, metric: str,
                 seed: int, use_gpu: bool | None, search_kw: dict) -> str:
    """Search the kNN graph of ``Z`` (``adata.obsm[use_rep]``, whose digest is ``digest``) and store
    it under ``key`` in scanpy's layout; returns the connectivities' ``obsp`` key."""
    indices, distances = _cluster.knn_search(Z, n_neighbors, metric, use_gpu=use_gpu, seed=seed, **search_kw)
    conn_key, dist_key = _graph_keys(adata, key)
    adata.obsp[conn_key] = _cluster.fuzzy_connectivities(indices, distances)
    adata.obsp[dist_key] = _cluster.knn_distances(indices, distances)
    adata.uns[key] = {"connectivities_key": conn_key, "distances_key": dist_key,
                      "params": {"n_neighbors": int(n_neighbors), "method": "umap", "metric": metric,
                                 "use_rep": use_rep, "random_state": seed, "search": dict(search_kw),
                                 "computed_by": "masksc", "embedding_digest": digest}}
    return conn_key


def _stored_graph(adata, key: str, kwargs: dict):
    """The connectivities of the graph stored under ``uns[key]`` and the embedding it was built
    from (None when its settings do not say)."""
    given = sorted({"n_neighbors", "metric"} & set(kwargs))
    if given:
        raise TypeError(f"{given} set the graph built here, but neighbors_key={key!r} names a stored one; fix: "
                        "drop them, or drop neighbors_key to build the graph.")
    if key not in adata.uns:
        raise DataError(f"adata.uns has no {key!r} graph; fix: masksc.tl.neighbors(adata, key_added={key!r}) (or "
                        "scanpy's pp.neighbors) first, or drop neighbors_key.")
    conn_key = _graph_keys(adata, key)[0]
    if conn_key not in adata.obsp:
        raise DataError(f"adata.uns[{key!r}] names connectivities {conn_key!r}, which adata.obsp lacks; fix: recompute "
                        "the graph (masksc.tl.neighbors or sc.pp.neighbors).")
    own = _own_params(adata, key)
    if own is not None and own.get("use_rep") in adata.obsm and own.get("embedding_digest") is not None:
        use_rep = own["use_rep"]
        _embedding(adata, use_rep, distances=False)  # an embedding masksc could not have built a graph of
        if _embedding_digest(adata, use_rep) != own["embedding_digest"]:
            raise DataError(f"the graph adata.uns[{key!r}] was built from an earlier adata.obsm[{use_rep!r}] (it has "
                            "changed since: embedded again, or its cells subset or reordered), so its clusters would "
                            f"not be this embedding's; fix: masksc.tl.neighbors(adata, use_rep={use_rep!r}, "
                            f"key_added={key!r}) again first.")
    return adata.obsp[conn_key], _params(adata, key).get("use_rep")


def _own_graph(adata, use_rep: str, seed: int, kwargs: dict):
    """The connectivities of masksc's own graph of ``adata.obsm[use_rep]``: the stored one when it
    was built from this embedding (with the ``n_neighbors`` / ``metric`` in ``kwargs``, if given),
    else a new one, built as :func:`neighbors` builds it and stored in its place."""
    foreign = _foreign_graph(adata, NEIGHBORS_KEY)
    if foreign:
        raise DataError(f"{foreign} hold a graph masksc did not compute, where tl.cluster keeps its own; fix: "
                        f"neighbors_key={NEIGHBORS_KEY!r} to cluster that graph, or delete it first.")
    Z = _embedding(adata, use_rep, distances=kwargs.get("metric", "euclidean") != "cosine")
    digest = _embedding_digest(adata, use_rep)
    asked = {name: kwargs[name] for name in ("n_neighbors", "metric") if name in kwargs}
    if "n_neighbors" in asked:
        asked["n_neighbors"] = _fewer_for_few_cells(asked["n_neighbors"], Z.shape[0])
    params = _own_params(adata, NEIGHBORS_KEY)
    if params is not None and params.get("use_rep") == use_rep and params.get("embedding_digest") == digest \
            and all(params.get(name) == value for name, value in asked.items()):
        stored = _graph_keys(adata, NEIGHBORS_KEY)[0]
        if stored in adata.obsp:
            return adata.obsp[stored]
        # the record outlived its matrices (an AnnData rebuilt without obsp): the same graph again
        conn_key = _store_graph(adata, NEIGHBORS_KEY, Z, digest, use_rep, int(params["n_neighbors"]),
                                str(params["metric"]), int(params.get("random_state", seed)), kwargs.get("use_gpu"),
                                dict(params.get("search") or {}))
        return adata.obsp[conn_key]
    if params is not None and params.get("use_rep") != use_rep:
        warn(f"replacing the graph in adata.uns[{NEIGHBORS_KEY!r}], built from adata.obsm[{params.get('use_rep')!r}], "
             f"with one of adata.obsm[{use_rep!r}]; to keep both, build one with masksc.tl.neighbors(adata, "
             "key_added=...) and pass it as neighbors_key")
    n_neighbors = asked["n_neighbors"] if "n_neighbors" in asked else \
        _fewer_for_few_cells(_cluster.N_NEIGHBORS, Z.shape[0])
    conn_key = _store_graph(adata, NEIGHBORS_KEY, Z, digest, use_rep, n_neighbors, asked.get("metric", "euclidean"),
                            seed, kwargs.get("use_gpu"), {})
    return adata.obsp[conn_key]


def cluster(adata, k: int | None = None, *, use_rep: str = EMBEDDING_KEY, key_added: str = CLUSTER_KEY,
            neighbors_key: str | None = None, seed: int = 0, copy: bool = False, **kwargs):
    """Cluster the embedding ``adata.obsm[use_rep]``: k-means (FAISS) when ``k`` is given,
    kNN graph + Leiden otherwise; labels go to ``adata.obs[key_added]`` (categorical).

    Leiden's graph: with ``neighbors_key``, the one stored under ``adata.uns[neighbors_key]``
    (by :func:`neighbors` or scanpy's ``pp.neighbors``; the embedding is then read only to check
    that a graph :func:`neighbors` built is of it as it is now); without,
    masksc's own graph ``adata.uns["masksc_neighbors"]``, reused when it was built from this
    embedding (with the ``n_neighbors`` / ``metric`` passed, if any; so a graph built with
    :func:`neighbors` is the one clustered), else built by :func:`neighbors` and stored there
    (``sc.tl.umap(adata, neighbors_key="masksc_neighbors")`` can then draw it).

    ``seed``: seeds k-means / Leiden. ``kwargs``: ``method``, ``n_neighbors``, ``resolution``,
    ``metric``, ``use_gpu`` and k-means settings such as ``n_init``, as
    ``masksc.cluster.cluster_embedding`` takes them (Leiden's graph is built by :func:`neighbors`
    and clustered by ``masksc.cluster.cluster_graph``); settings the method would ignore are
    refused before any work. ``copy``: return a copy of ``adata`` with the clusters and leave ``adata``
    as it is (else None is returned)."""
    _check_adata(adata, "cluster")
    check_flags(copy=copy)
    _check_key(key_added)
    _cluster.check_settings(kwargs, allowed=[name for name in _cluster.CLUSTER_SETTINGS + _cluster.KMEANS_SETTINGS
                                             if name not in ("seed", "graph")])
    earlier = adata.uns.get("masksc", {}).get("cluster", {})
    written = earlier.get("keys_written", [])
    if key_added in adata.obs and key_added != CLUSTER_KEY and key_added not in written:
        raise DataError(f"adata.obs[{key_added!r}] exists and was not written by masksc.tl.cluster (it may be your "
                        "labels); fix: key_added= a new column name (--key-added), or delete that column first.")
    method = kwargs.get("method", "auto")
    leiden = method == "leiden" or (method == "auto" and k is None)
    if neighbors_key is not None and not leiden:
        raise TypeError(f"neighbors_key= names Leiden's graph, but k-means clusters here (k={k}); fix: drop "
                        "neighbors_key, or pass method='leiden' to search the graph's resolution for k clusters.")
    if leiden:  # before a graph is built
        _cluster.check_leiden_settings(k, kwargs.get("resolution"), {name: value for name, value in kwargs.items()
                                                                    if name in _cluster.KMEANS_SETTINGS})
    adata = _target(adata, copy)
    if not leiden:
        labels = _cluster.cluster_embedding(_embedding(adata, use_rep), k=k, seed=seed, **kwargs)
        graph_key, clustered = None, use_rep
    else:
        if neighbors_key is not None:
            graph, clustered = _stored_graph(adata, neighbors_key, kwargs)
        else:
            graph, clustered = _own_graph(adata, use_rep, seed, kwargs), use_rep
        graph_key = neighbors_key or NEIGHBORS_KEY
        settings = {name: value for name, value in kwargs.items()
                    if name not in ("n_neighbors", "metric", "method", "use_gpu")}
        labels, resolution = _cluster.cluster_graph(graph, k, seed=seed, **settings)
    names = [str(c) for c in np.unique(labels)]  # numeric order ("2" before "10"), as scanpy's leiden
    adata.obs[key_added] = pd.Categorical(np.asarray(labels).astype(str), categories=names)
    recorded = {"method": "leiden" if leiden else "kmeans", **{name: value for name, value in kwargs.items()
                                                                if name != "method"}}
    if leiden:
        recorded["resolution"] = resolution
    # each column's embedding, for evaluate's advice; a graph of scanpy's default representation names none.
    # Columns as values, not keys: an h5ad turns a "/" in a key into nested groups
    made_from = [made for made in _made_from(earlier) if made[0] != key_added]
    if clustered is not None:
        made_from.append((key_added, clustered, len(names)))
    _record(adata, "cluster", {"k": k, "use_rep": clustered, "key": key_added, "seed": seed, "n_clusters": len(names),
                               "neighbors_key": graph_key, "settings": recorded,
                               "keys_written": sorted({*written, key_added}),
                               "made_from": {"key": [key for key, _, _ in made_from],
                                             "use_rep": [str(rep) for _, rep, _ in made_from],
                                             "n_clusters": [n for _, _, n in made_from]}})
    return adata if copy else None


def _made_from(record: dict) -> list[tuple[str, str, int]]:
    """(column, embedding, number of clusters) of each column ``tl.cluster`` recorded in ``record``
    (``uns["masksc"]["cluster"]``); a record of a release before ``made_from`` names its last column."""
    if "made_from" in record:
        made = record["made_from"]
        return [(str(k), str(r), int(n)) for k, r, n in zip(made["key"], made["use_rep"], made["n_clusters"])]
    if record.get("key") is not None and record.get("use_rep") is not None:
        return [(str(record["key"]), str(record["use_rep"]), int(record.get("n_clusters", -1)))]
    return []


def evaluate(adata, label_key: str | None = "label", *, use_rep: str = EMBEDDING_KEY,
             cluster_key: str = CLUSTER_KEY, silhouette_sample: int | None = 10_000, seed: int = 0) -> dict:
    """ARI and NMI of ``adata.obs[cluster_key]`` against ``adata.obs[label_key]`` (None: no labels,
    silhouette only; a missing column is a DataError) and the silhouette of the embedding ``adata.obsm[use_rep]`` under the predicted
    clusters (a warning names the embedding :func:`cluster` recorded making them from when that is
    another one of ``adata.obsm``), on a ``seed``-ed random sample of ``silhouette_sample`` cells when there are more
    (None: all cells). Cells without a label (NaN) are left out of ARI / NMI, with a warning.
    Returns ``masksc.cluster.evaluate``'s dict (ari, nmi, silhouette, n_clusters), also stored
    in ``adata.uns["masksc"]["metrics"]`` with the keys it was computed from, the number of cells
    the silhouette was computed on (``silhouette_cells``: the sample's, or every cell) and the seed
    (``silhouette_seed``): passed back as ``silhouette_sample`` and ``seed`` they give it again."""
    _check_adata(adata, "evaluate")
    if cluster_key not in adata.obs:
        made = adata.uns.get("masksc", {}).get("cluster", {}).get("key")
        if made in adata.obs:
            raise DataError(f"adata.obs has no {cluster_key!r}; masksc.tl.cluster wrote its clusters to {made!r}; fix: "
                            f"cluster_key={made!r} (--cluster-key {made}).")
        raise DataError(f"adata.obs has no {cluster_key!r}; fix: run masksc.tl.cluster(adata) first "
                        "(`masksc cluster` on the command line).")
    if label_key == cluster_key:
        raise DataError(f"label_key and cluster_key are both {label_key!r}: the clusters would be scored against "
                        "themselves; fix: pass the column of true labels as label_key (--label-key).")
    Z, pred = _embedding(adata, use_rep), adata.obs[cluster_key].to_numpy()
    made = {key: (rep, n) for key, rep, n in _made_from(adata.uns.get("masksc", {}).get("cluster", {}))}
    made_from, n_made = made.get(cluster_key, (None, None))
    # a column rewritten since (scanpy's leiden into it) no longer has the recorded number of clusters
    still_theirs = n_made == adata.obs[cluster_key].nunique()
    if made_from is not None and made_from != use_rep and made_from in adata.obsm and still_theirs:
        warn(f"the clusters in adata.obs[{cluster_key!r}] were made from adata.obsm[{made_from!r}] (as "
             f"masksc.tl.cluster recorded), and the silhouette is of adata.obsm[{use_rep!r}]; pass use_rep="
             f"{made_from!r} (--use-rep {made_from}) for theirs")
    unclustered = int(adata.obs[cluster_key].isna().sum())
    if unclustered:
        raise DataError(f"{unclustered} of {adata.n_obs} cells have no cluster in adata.obs[{cluster_key!r}] (e.g. "
                        "cells joined by ad.concat after clustering); fix: run masksc.tl.cluster on this object, or "
                        f"evaluate the clustered cells: adata[adata.obs[{cluster_key!r}].notna()].copy().")
    n_labelled, agreement = None, {}
    if label_key is not None:
        if label_key not in adata.obs:
            others = [c for c in adata.obs.columns if c != cluster_key]
            raise DataError(f"adata.obs has no {label_key!r} labels; fix: pass label_key= (--label-key) one of "
                            f"{others}, or label_key=None (--no-labels) for silhouette only.")
        labelled = adata.obs[label_key].notna().to_numpy()
        n_labelled = int(labelled.sum())
        if n_labelled == 0:
            raise DataError(f"no cell has a {label_key!r} label; fix: pass label_key= (--label-key) a labelled "
                            "column, or label_key=None (--no-labels) for silhouette only.")
        if n_labelled < len(labelled):
            warn(f"{len(labelled) - n_labelled} of {len(labelled)} cells have no {label_key!r} label; ARI "
                 "and NMI are computed on the labelled cells")
        agreement = _cluster.agreement(adata.obs[label_key].to_numpy()[labelled], pred[labelled])
    scores = {**_cluster.evaluate(Z, pred, None, silhouette_sample=silhouette_sample, seed=seed), **agreement}
    sampled = silhouette_sample is not None and Z.shape[0] > silhouette_sample
    cells = int(silhouette_sample) if sampled else int(Z.shape[0])
    _record(adata, "metrics", {**scores, "label_key": label_key, "cluster_key": cluster_key, "use_rep": use_rep,
                               "n_labelled": n_labelled,
                               # silhouette_sample= and seed= these give the same silhouette again
                               "silhouette_cells": cells, "silhouette_seed": int(seed)})
    return scores
