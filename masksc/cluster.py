"""Clustering of cell embeddings: FAISS k-means, FAISS kNN graph + Leiden, and metrics.

Everything here takes an embedding ``Z`` (``np.ndarray`` float32 ``[n, d]``, one row per
cell) and never modifies it. FAISS runs on the GPU(s) when its build has GPU support and a
GPU is visible (``use_gpu=None``), otherwise on the CPU.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import random
import sys

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.sparse.csgraph  # noqa: F401  (sp.csgraph)
from threadpoolctl import threadpool_limits

from masksc.checks import check_flags, check_seed, is_integer, is_number
from masksc.data.validate import beyond_float32, check_count
from masksc.errors import DataError, MaskscError, warn
from masksc.progress import progress_bar

logger = logging.getLogger(__name__)

# Above this many cells knn_graph(index="auto") uses an IVF index instead of exact search.
IVF_MIN_CELLS = 100_000
_SEARCH_CHUNK = 65_536
_DISTANCE_BUDGET = 1 << 23  # floats in a block of cells' neighbour vectors (and their differences): 2 x 32 MB
_SMALL_WORK = 5e7  # below this many multiply-adds per pass FAISS runs on one thread


def _faiss():
    """Import FAISS (lazily: the rest of masksc does not need it).

    OpenMP's default busy-waiting made FAISS k-means 10-40x slower on a machine whose cores
    are busy with other work (measured: 2 threads, 200k x 64, 17-45 s vs 1.7 s with
    OMP_WAIT_POLICY=PASSIVE). The policy is read once, when the OpenMP runtime loads. So unless
    the user chose one, FAISS is imported with PASSIVE set and the variable is then restored.
    This only helps when FAISS's bundled runtime is the first OpenMP loaded: after
    ``import torch`` FAISS's OpenMP calls bind to torch's runtime, already initialised; set
    OMP_WAIT_POLICY before importing torch for the same effect there."""
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    chosen = "OMP_WAIT_POLICY" in os.environ
    if not chosen:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import faiss
    finally:
        if not chosen:
            del os.environ["OMP_WAIT_POLICY"]
    return faiss


@contextlib.contextmanager
def _faiss_threads(work: float):
    """Run FAISS single-threaded for small jobs (``work`` ~ multiply-adds per pass): there,
    OpenMP start-up and barrier waits cost more than they save, and on busy cores far more
    (see :func:`_faiss`)."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    if work < _SMALL_WORK:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def check_embedding(Z, name: str = "Z", distances: bool = True, centre: bool = False) -> np.ndarray:
    """Return ``Z`` as a C-contiguous float32 [n, d] array (a copy only when needed); a DataError
    naming the problem and fix when it is sparse, not 2-D, empty, not real-valued, NaN or
    infinite, or holds values float32 cannot, or (``distances``) values whose squared distances
    float32 cannot (``name`` is what the message calls it). ``centre``: for a use that euclidean
    distances alone decide, subtract the column means before casting a ``Z`` of another dtype
    (float64 1e6 + 0.5 spread keeps its digits: the cast of the raw values lost them, recall@10
    0.93)."""
    if sp.issparse(Z):
        raise DataError(f"{name} is a sparse matrix; pass a dense embedding (e.g. adata.obsm['X_masksc']).")
    Z = np.asarray(Z)
    if Z.ndim != 2:
        raise DataError(f"{name} must be 2-D [n_cells, n_dims], got shape {Z.shape}; "
                        "reshape it or pass one row per cell.")
    if Z.shape[0] == 0 or Z.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {Z.shape}); it needs at least one cell and one dimension.")
    if not np.issubdtype(Z.dtype, np.number) or np.issubdtype(Z.dtype, np.complexfloating):
        raise DataError(f"{name} must hold real numbers, got dtype {Z.dtype}.")
    # checked before the cast, which would turn a finite value beyond float32's range into inf
    if not np.isfinite(Z).all():
        bad = (~np.isfinite(Z)).any(axis=1)
        keep = (f"adata = adata[np.isfinite({name}).all(axis=1)].copy()" if name.startswith("adata.obsm[")
                else f"keep the rows where np.isfinite({name}).all(axis=1)")
        raise DataError(f"{name} has NaN or infinite values in {int(bad.sum())} row(s), the first row "
                        f"{int(np.argmax(bad))}; fix: leave those cells out ({keep}). A masksc model whose "
                        "preprocessor drops cells (min_counts) embeds them as NaN rows.")
    big = beyond_float32(Z)
    if big.any():
        raise DataError(f"{name} has values too large for float32 (max 3.4e38; largest magnitude "
                        f"{np.abs(Z[big]).max():.3g}) in {int(big.any(axis=1).sum())} row(s); fix: rescale it, "
                        "e.g. divide it by its largest magnitude (all distances shrink alike, so the clusters "
                        "stay), or drop those cells.")
    centred = centre and Z.dtype != np.float32
    if centred:
        Z = Z - Z.mean(axis=0, dtype=np.float64)
    Z = np.ascontiguousarray(Z, dtype=np.float32)
    if not distances:
        return Z
    # FAISS, sklearn and the UMAP weights square distances in float32: 16x headroom below overflow
    limit = np.sqrt(np.finfo(np.float32).max / (64.0 * Z.shape[1]))
    largest = max(abs(float(Z.max())), abs(float(Z.min())))  # without an |Z| copy
    if largest > limit:
        about = " about their column means" if centred else ""
        raise DataError(f"{name} has values up to {largest:.3g} in magnitude{about}, too large for squared distances "
                        f"in float32 at {Z.shape[1]} dimensions (at most {limit:.3g}); fix: rescale it, e.g. divide "
                        "it by its largest magnitude (all distances shrink alike, so the clusters stay).")
    return Z


def _resolve_gpus(use_gpu: bool | None, ngpu: int | None) -> int:
    """Number of GPUs FAISS should use (0 = CPU)."""
    check_flags(("use_gpu",), use_gpu=use_gpu)
    use_gpu = None if use_gpu is None else bool(use_gpu)  # np.False_ is not False
    available = _faiss().get_num_gpus()
    if use_gpu is False:
        return 0
    if use_gpu and available == 0:
        raise MaskscError("use_gpu=True but FAISS sees no GPU: install the GPU build in place of the CPU one "
                          "(pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12) "
                          "on a machine with CUDA, or pass use_gpu=None to fall back to the CPU.")
    if available == 0:
        return 0
    if ngpu is None:
        return available
    if not 1 <= ngpu <= available:
        raise MaskscError(f"ngpu={ngpu} but FAISS sees {available} GPU(s); pass 1..{available} or None for all.")
    return ngpu


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0.. by decreasing size (ties by old id), so labels are comparable across runs."""
    ids, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, -counts))
    mapping = np.empty(ids.max() + 1, dtype=np.int64)
    mapping[ids[order]] = np.arange(len(ids), dtype=np.int64)
    return mapping[labels]


def _sq_dists(X: np.ndarray, C: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Squared euclidean distances [len(C), len(X)] (float64, clipped at 0)."""
    d = x_sq[None, :] + (C.astype(np.float64) ** 2).sum(1)[:, None] - 2.0 * (X @ C.T).T
    return np.maximum(d, 0.0)


def _kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; the greedy variant sklearn uses): each
    new centre is the best, by resulting potential, of 2 + log(k) D^2-sampled candidates.
    FAISS's own k-means++ option (one candidate per step) left k-means in clearly worse local
    optima on an unequal-size mixture (ARI 0.54 vs 0.94 against the truth, n_init=1).
    Returns float32 [k, d]."""
    n = X.shape[0]
    trials = 2 + int(np.log(k))
    x_sq = (X.astype(np.float64) ** 2).sum(1)
    centers = np.empty((k, X.shape[1]), dtype=np.float32)
    centers[0] = X[rng.integers(n)]
    closest = _sq_dists(X, centers[:1], x_sq)[0]
    for c in range(1, k):
        pot = closest.sum()
        if pot <= 0:  # fewer distinct points than k: any remaining point will do
            centers[c] = X[rng.integers(n)]
            continue
        cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * pot).clip(max=n - 1)
        dist = np.minimum(closest[None, :], _sq_dists(X, X[cand], x_sq))
        best = int(np.argmin(dist.sum(1)))
        centers[c] = X[cand[best]]
        closest = dist[best]
    return centers


def _bad_k(k, n: int, method: str = "kmeans") -> str:
    other = "cluster with Leiden, which needs no k" if method == "kmeans" else "k=None for Leiden's own number"
    return (f"k must be an integer in [1, n_cells={n}], got {k!r}; fix: ask for at most as many clusters as there "
            f"are cells (e.g. the number of cell types expected), or {other}.")


def kmeans(Z, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 100, init: str = "k-means++",
           max_points_per_centroid: int | None = 1024, use_gpu: bool | None = None,
           ngpu: int | None = None) -> np.ndarray:
    """k-means through FAISS, keeping the best of ``n_init`` restarts (lowest objective), like sklearn.

    Each restart seeds the centroids on the CPU (greedy k-means++ as in sklearn, or random
    cells) and runs up to ``max_iter`` Lloyd iterations in FAISS (``faiss.Clustering``, which
    stops early only when the objective no longer changes, and refills an empty cluster by
    splitting a large one). Every cell is then assigned to its nearest centroid of the best
    restart.

    Args:
        Z: embedding, array-like [n, d] (float32; other real dtypes are converted, a copy).
        k: number of clusters, 1 <= k <= n.
        seed: seeds sampling and seeding; same seed and device -> same labels.
        n_init: restarts; the one with the lowest objective on the training cells is kept.
        max_iter: Lloyd iterations per restart.
        init: "k-means++" (greedy, sklearn's default) or "random" (k distinct random cells).
        max_points_per_centroid: centroids are trained on a uniform sample of at most
            ``k * max_points_per_centroid`` cells (FAISS's scheme); ``None`` trains on all cells.
            The default (1024) trains on every cell of a dataset of at most k * 1024 cells
            (8192 at PBMC's k = 8) and keeps 10^6-cell runs fast.
        use_gpu: None = GPU when FAISS has GPU support and sees a GPU; False = CPU; True = GPU or error.
        ngpu: GPUs to use when on GPU (None = all visible); search work is split over them.

    Returns:
        np.int64 [n] cluster labels in 0..k-1, numbered by decreasing cluster size.
    """
    faiss = _faiss()
    X = check_embedding(Z, centre=True)
    n, d = X.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise DataError(_bad_k(k, n))
    n_init, max_iter = check_count("n_init", n_init, "restarts"), check_count("max_iter", max_iter, "iterations")
    if not isinstance(init, str) or init not in ("k-means++", "random"):  # an array (sklearn's centroids) failed
        shown = repr(init) if isinstance(init, str) else f"a {type(init).__name__}"  # as "ambiguous truth value"
        raise ValueError(f"init must be 'k-means++' or 'random' (initial centroids are not taken), got {shown}.")
    if max_points_per_centroid is not None:
        max_points_per_centroid = check_count("max_points_per_centroid", max_points_per_centroid, "cells, or None")
    seed = check_seed(seed)
    k = int(k)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    # centred, as sklearn does: the ||x||^2 + ||c||^2 - 2 x.c distances lose every digit of a
    # small spread around a large offset (ARI 0.62 instead of 1.0 at an offset of 1e6); the
    # training cells and each search block are centred copies, never the whole embedding again
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    gpus = _resolve_gpus(use_gpu, ngpu)
    rng = np.random.default_rng(seed)
    if max_points_per_centroid is not None and n > k * max_points_per_centroid:
        train = X[np.sort(rng.choice(n, size=k * max_points_per_centroid, replace=False))]
        train -= mean
    else:
        train = X - mean
    index = faiss.IndexFlatL2(d)
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=gpus)  # replicas: queries split across GPUs
    cp = faiss.ClusteringParameters()
    cp.niter = int(max_iter)
    cp.min_points_per_centroid = 1
    cp.max_points_per_centroid = -(-train.shape[0] // k)  # sampling is done above, never again in FAISS
    with _faiss_threads(float(train.shape[0]) * k * d):
        best_centroids, best_obj = _lloyd_restarts(train, k, n_init, init, index, cp, rng)
    index.reset()
    index.add(best_centroids)
    labels = np.empty(n, dtype=np.int64)
    with _faiss_threads(float(n) * k * d):
        step = max(1, min(_SEARCH_CHUNK * 4, _DISTANCE_BUDGET // d))  # a centred block of at most 32 MB
        for s in range(0, n, step):
            labels[s:s + step] = index.search(X[s:s + step] - mean, 1)[1][:, 0]
    logger.debug("faiss k-means n=%d d=%d k=%d objective %.6g on %s", n, d, k, best_obj,
                 f"{gpus} GPU(s)" if gpus else "CPU")
    found = len(np.unique(labels))
    if found < k:  # centroids that coincide (duplicate cells) or that no cell is nearest to
        warn(f"k-means found {found} distinct clusters, fewer than k={k}: the embedding has too few distinct "
             "cells for k clusters (e.g. duplicates, or an untrained model); the labels are 0.."
             f"{found - 1}")
    return _relabel_by_size(labels)


def _lloyd_restarts(train, k, n_init, init, index, cp, rng):
    """Run the restarts; return (centroids float32 [k, d], objective) of the best one."""
    faiss = _faiss()
    d = train.shape[1]
    best_obj, best_centroids = np.inf, None
    for _ in progress_bar(range(n_init), desc="k-means restarts", disable=n_init < 2 or train.shape[0] < 200_000,
                          leave=False):
        if init == "k-means++":
            # thin [n, 2 + log k] products: BLAS threads only add waiting (16 ms vs 0.2 ms
            # for 5000 cells on busy cores)
            with threadpool_limits(1, user_api="blas"):
                start = _kmeans_plusplus(train, k, rng)
        else:
            start = train[rng.choice(train.shape[0], size=k, replace=False)]
        clus = faiss.Clustering(d, k, cp)
        faiss.copy_array_to_vector(np.ascontiguousarray(start).ravel(), clus.centroids)
        index.reset()
        clus.train(train, index)
        stats = clus.iteration_stats
        obj = stats.at(stats.size() - 1).obj
        if obj < best_obj:
            best_obj, best_centroids = obj, faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    return best_centroids, best_obj


def _build_index(X: np.ndarray, metric: str, index: str, nlist: int | None, nprobe: int | None,
                 gpus: int, seed: int, k: int, target_recall: float):
    """FAISS index holding X: exact flat, or IVFFlat trained on X whose ``nprobe`` is the given
    one or tuned by :func:`_tune_nprobe`. On GPU(s) an IVF's coarse quantizer is trained with a
    GPU clustering index and the filled CPU index is cloned (sharded across GPUs when there are
    several), so every shard shares one quantizer."""
    faiss = _faiss()
    n, d = X.shape
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if index == "flat":
        idx = faiss.IndexFlat(d, faiss_metric)
    else:
        nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39))
        if not 1 <= nlist <= n:
            raise DataError(f"nlist={nlist} IVF lists for {n} cells; fix: pass 1 <= nlist <= n_cells (or None for "
                            "~4*sqrt(n)), or index='flat' for so few cells.")
        idx = faiss.IndexIVFFlat(faiss.IndexFlat(d, faiss_metric), d, int(nlist), faiss_metric)  # SWIG: no np.int64
        idx.cp.seed = int(seed) & 0x7FFFFFFF
        idx.cp.min_points_per_centroid = 1
        # Coarse centroids from <= 64 cells each: at 1M x 128, 24 s instead of FAISS's 256
        # (97 s), recall@15 unchanged (0.996 at nprobe 32).
        idx.cp.max_points_per_centroid = 64
        if gpus:
            idx.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(d, faiss_metric), ngpu=gpus)
        logger.info("training an IVF index of %d lists on %d cells", nlist, n)  # tens of seconds from ~1M cells
        idx.train(X)
        idx.add(X)
        if nprobe:
            idx.nprobe = min(nlist, int(nprobe))
        else:
            _tune_nprobe(idx, X, k, target_recall, faiss_metric, seed)
    if gpus:
        co = faiss.GpuMultipleClonerOptions()
        co.shard = gpus > 1  # split the cells across GPUs rather than copying them to each
        idx = faiss.index_cpu_to_all_gpus(idx, co=co, ngpu=gpus)
    if index == "flat":
        idx.add(X)
    return idx


def _tune_nprobe(idx, X: np.ndarray, k: int, target_recall: float, faiss_metric, seed: int,
                 n_queries: int = 1000) -> None:
    """Set ``idx.nprobe`` to the smallest of 8, 16, 32, ... (up to nlist) whose recall@k on
    ``n_queries`` sampled cells reaches ``target_recall`` against exact search. A returned
    neighbour counts as found when exact search returned it too or when it is no farther than
    the exact k-th neighbour (ties among identical cells; the two searches round distances
    differently, hence the 1e-3 relative slack, on the cosine distance 1 - similarity for the
    inner product: similarities near 1 would make a slack on them wider than the distances)."""
    faiss = _faiss()
    n = X.shape[0]
    q = X[np.random.default_rng(seed).choice(n, size=min(n, n_queries), replace=False)]
    exact_d, exact_i = faiss.knn(q, X, k, metric=faiss_metric)
    kth = exact_d[:, -1:]
    if faiss_metric == faiss.METRIC_INNER_PRODUCT:  # similarities of unit vectors: at least the k-th's
        tied = lambda d: 1.0 - d <= (1.0 - kth) * (1 + 1e-3) + 1e-6
    else:
        tied = lambda d: d <= kth * (1 + 1e-3)
    found = lambda d, i: (i >= 0) & (tied(d) | (i[:, :, None] == exact_i[:, None, :]).any(2))
    nprobe = 8
    while True:
        idx.nprobe = min(nprobe, idx.nlist)
        d, i = idx.search(q, k)
        recall = float(found(d, i).sum()) / d.size
        if recall >= target_recall or idx.nprobe == idx.nlist:
            break
        nprobe *= 2
    logger.info("IVF nprobe %d of %d lists: sampled recall@%d %.3f (target %.2f)", idx.nprobe, idx.nlist, k,
                recall, target_recall)


N_NEIGHBORS = 15  # neighbours per cell of a kNN graph when not given (scanpy's pp.neighbors default)


def knn_search(Z, n_neighbors: int = N_NEIGHBORS, metric: str = "euclidean", index: str = "auto",
               nlist: int | None = None, nprobe: int | None = None, target_recall: float = 0.95,
               use_gpu: bool | None = None, ngpu: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every cell among all cells, through FAISS.

    Args:
        Z: embedding [n, d], a real-valued array (searched as float32).
        n_neighbors: neighbours per cell **including the cell itself** (scanpy's convention),
            2 <= n_neighbors <= n.
        metric: "euclidean" or "cosine" (distance 1 - cosine similarity).
        index: "flat" (exact), "ivf" (IndexIVFFlat, approximate) or "auto" (flat below
            ``IVF_MIN_CELLS`` cells, IVF above).
        nlist: IVF lists (default ~4*sqrt(n)).
        nprobe: lists an IVF search visits per query. None: the smallest of 8, 16, 32, ...
            whose recall@n_neighbors, measured on 1000 sampled cells against exact search,
            reaches ``target_recall`` (the scale benchmark's 1M-cell embedding needs 16 or 32;
            an isotropic 64-D Gaussian mixture ~80 at 100k). Logged at INFO.
        use_gpu, ngpu: as in :func:`kmeans`; with several GPUs the database is sharded across them.

    Returns:
        (indices int64 [n, n_neighbors], distances float32 [n, n_neighbors]), each row sorted by
        distance with the cell itself in column 0 (distance 0). A neighbour an approximate
        index failed to return is index -1 with distance +inf.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
    if index not in ("auto", "flat", "ivf"):
        raise ValueError(f"index must be 'auto', 'flat' or 'ivf', got {index!r}.")
    # cosine: of the unit rows, whatever the scale (and never centred, which would change the angles)
    X = check_embedding(Z, distances=metric == "euclidean", centre=metric == "euclidean")
    n = X.shape[0]
    if not is_number(target_recall) or not 0 < target_recall <= 1:  # "0.9" failed comparing a str, True was 1.0
        raise ValueError(f"target_recall must be a number in (0, 1], got {target_recall!r}.")
    for name, value in (("nlist", nlist), ("nprobe", nprobe)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None (chosen for you), got {value!r}.")
    if n < 2:
        raise DataError(f"a kNN graph needs at least 2 cells, got {n}; fix: pass at least 2 cells.")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or not 2 <= n_neighbors <= n:
        raise DataError(f"n_neighbors (including the cell itself) must be an integer in [2, n_cells={n}], got "
                        f"{n_neighbors!r}; fix: pass n_neighbors= an integer in that range (e.g. n_neighbors="
                        f"{min(n, N_NEIGHBORS)}; tl.cluster, cluster_embedding and `masksc cluster --n-neighbors` take "
                        "it too).")
    seed = check_seed(seed)
    if metric == "cosine":
        peak = np.abs(X).max(axis=1, keepdims=True)  # scaled first, so squaring large values cannot overflow
        if (peak == 0).any():
            raise DataError(f"{int((peak == 0).sum())} row(s) of Z are all zeros, so cosine distance is undefined; "
                            "drop them or use metric='euclidean'.")
        X = X / peak
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    if index == "auto":
        index = "flat" if n < IVF_MIN_CELLS else "ivf"
    gpus = _resolve_gpus(use_gpu, ngpu)
    k = int(n_neighbors)
    I = np.empty((n, k), dtype=np.int64)
    D = np.empty((n, k), dtype=np.float32)
    starts = range(0, n, _SEARCH_CHUNK)
    with _faiss_threads(float(n) * X.shape[1] * (n if index == "flat" else 8 * np.sqrt(n))):
        idx = _build_index(X, metric, index, nlist, nprobe, gpus, seed, k, target_recall)
        for s in progress_bar(starts, desc=f"kNN ({index})", disable=len(starts) < 2, leave=False):
            D[s:s + _SEARCH_CHUNK], I[s:s + _SEARCH_CHUNK] = idx.search(X[s:s + _SEARCH_CHUNK], k)
    step = max(1, _DISTANCE_BUDGET // (k * X.shape[1]))
    for s in range(0, n, step):
        _exact_distances(X, I[s:s + step], D[s:s + step], s, metric)
    _put_self_first(I, D)
    return I, D


def _exact_distances(X: np.ndarray, I: np.ndarray, D: np.ndarray, start: int, metric: str) -> None:
    """Recompute, in place, the distances of rows ``start``.. (``I`` int64 / ``D`` float32 [m, k])
    from the vectors ``X`` [n, d] and re-sort each row by them. FAISS's ``|x|^2 + |y|^2 - 2 x.y``
    (or ``1 - x.y``) loses the digits of small distances: duplicate cells came out 2e-7 apart
    under cosine, which became UMAP's rho and distorted every weight of the row. A neighbour
    the index did not return (-1) gets +inf."""
    missing = I < 0
    rows = X[start:start + I.shape[0], None, :]
    diff = X[np.where(missing, 0, I)] - rows
    sq = np.einsum("mkd,mkd->mk", diff, diff, dtype=np.float64)
    dist = sq / 2.0 if metric == "cosine" else np.sqrt(sq)  # unit vectors: 1 - cos = |x - y|^2 / 2
    dist[missing] = np.inf
    order = np.argsort(dist, axis=1, kind="stable")
    I[:] = np.take_along_axis(I, order, 1)
    D[:] = np.take_along_axis(dist, order, 1)


def _put_self_first(I: np.ndarray, D: np.ndarray) -> None:
    """Make column 0 the query cell itself, in place. FAISS may rank an exact duplicate of a
    cell before the cell (or, approximately, miss it); those rows are fixed one by one."""
    rows = np.arange(I.shape[0])
    for i in np.flatnonzero(I[:, 0] != rows):
        others = [(j, dist) for j, dist in zip(I[i], D[i]) if j != i]
        others = others[:I.shape[1] - 1]
        I[i, 0], D[i, 0] = i, 0.0
        I[i, 1:] = [j for j, _ in others]
        D[i, 1:] = [dist for _, dist in others]
    D[:, 0] = 0.0


def _smooth_knn(dists: np.ndarray, n_iter: int = 64, tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's per-cell (sigma, rho): rho = distance to the nearest non-identical neighbour,
    sigma by bisection so that sum_j exp(-(d_ij - rho)/sigma) = log2(k) over the non-self
    neighbours. Vectorised over cells; same rules as umap-learn's smooth_knn_dist."""
    n, k = dists.shape
    target = np.log2(k)
    finite = np.isfinite(dists)
    positive = np.where((dists > 0) & finite, dists, np.inf)
    rho = positive.min(axis=1)
    rho[~np.isfinite(rho)] = 0.0
    excess = dists[:, 1:] - rho[:, None]
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    mid = np.ones(n)
    active = np.ones(n, dtype=bool)
    for _ in range(n_iter):
        if not active.any():
            break
        a = np.flatnonzero(active)
        ex = excess[a]
        with np.errstate(over="ignore", invalid="ignore"):
            psum = np.where(ex > 0, np.exp(-ex / mid[a, None]), 1.0).sum(axis=1)
        done = np.abs(psum - target) < tol
        active[a[done]] = False
        a, psum = a[~done], psum[~done]
        high = psum > target
        hi[a[high]] = mid[a[high]]
        lo[a[~high]] = mid[a[~high]]
        unbounded = np.isinf(hi[a])
        mid[a] = np.where(unbounded, mid[a] * 2.0, (lo[a] + hi[a]) / 2.0)
    masked = np.where(finite, dists, np.nan)
    row_mean = np.nanmean(masked, axis=1)
    floor = np.where(rho > 0, 1e-3 * row_mean, 1e-3 * np.nanmean(masked))
    return np.maximum(mid, floor), rho


def fuzzy_connectivities(indices: np.ndarray, distances: np.ndarray) -> sp.csr_matrix:
    """UMAP fuzzy-simplicial-set connectivities from a kNN result, as scanpy's
    ``pp.neighbors(method="umap")`` computes them: w_ij = exp(-(d_ij - rho_i) / sigma_i)
    (1 for the nearest neighbour), then the fuzzy union W + W^T - W*W^T.

    Args: indices int64 [n, k] and distances [n, k] from :func:`knn_search` (self in column 0).
    Returns: symmetric scipy.sparse.csr_matrix float32 [n, n] with weights in (0, 1], zero diagonal.
    """
    n, k = indices.shape
    sigma, rho = _smooth_knn(distances.astype(np.float64))
    d = distances.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        w = np.where(d - rho[:, None] <= 0, 1.0, np.exp(-(d - rho[:, None]) / sigma[:, None]))
    rows = np.repeat(np.arange(n), k)
    keep = (indices.ravel() >= 0) & (indices.ravel() != rows)
    W = sp.csr_matrix((w.ravel()[keep], (rows[keep], indices.ravel()[keep])), shape=(n, n))
    W.eliminate_zeros()
    Wt = W.T.tocsr()
    G = (W + Wt - W.multiply(Wt)).tocsr().astype(np.float32)
    G.eliminate_zeros()  # after the cast, which makes weights below float32's range 0
    return G


def knn_distances(indices: np.ndarray, distances: np.ndarray) -> sp.csr_matrix:
    """The kNN distances as scanpy's ``pp.neighbors`` stores them in ``obsp["distances"]``: row i
    holds cell i's neighbours other than itself (and none an approximate index failed to return).

    Args: indices int64 [n, k] and distances [n, k] from :func:`knn_search` (self in column 0).
    Returns: scipy.sparse.csr_matrix float32 [n, n], not symmetric, at most k - 1 entries a row.
    """
    n, k = indices.shape
    others, dists = indices[:, 1:], distances[:, 1:].astype(np.float32)
    # explicit zeros are kept: a duplicate cell is a neighbour at distance 0
    if (indices[:, 0] == np.arange(n)).all() and (others >= 0).all():  # the usual case: k - 1 entries every row
        order = np.argsort(others, axis=1, kind="stable")
        return sp.csr_matrix((np.take_along_axis(dists, order, 1).ravel(),
                              np.take_along_axis(others, order, 1).ravel(), np.arange(n + 1) * (k - 1)), shape=(n, n))
    rows = np.repeat(np.arange(n), k)
    cols = indices.ravel()
    keep = (cols >= 0) & (cols != rows)
    return sp.csr_matrix((distances.ravel()[keep].astype(np.float32), (rows[keep], cols[keep])), shape=(n, n))


def knn_graph(Z, n_neighbors: int = N_NEIGHBORS, metric: str = "euclidean", index: str = "auto",
              nlist: int | None = None, nprobe: int | None = None, target_recall: float = 0.95,
              use_gpu: bool | None = None, ngpu: int | None = None, seed: int = 0) -> sp.csr_matrix:
    """kNN graph of the cells with UMAP-style fuzzy connectivities (scanpy's default graph).

    Neighbours come from :func:`knn_search` (FAISS: exact ``IndexFlat`` below ``IVF_MIN_CELLS``
    cells, ``IndexIVFFlat`` above, GPU when present); weights from :func:`fuzzy_connectivities`.
    ``n_neighbors`` counts the cell itself, as in ``scanpy.pp.neighbors``. Other arguments as in
    :func:`knn_search`.

    Returns: symmetric scipy.sparse.csr_matrix float32 [n, n], the input of :func:`leiden`.
    """
    I, D = knn_search(Z, n_neighbors, metric, index, nlist=nlist, nprobe=nprobe, target_recall=target_recall,
                      use_gpu=use_gpu, ngpu=ngpu, seed=seed)
    return fuzzy_connectivities(I, D)


def _check_graph(graph) -> sp.csr_matrix:
    if not sp.issparse(graph) or graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise DataError("graph must be a square scipy.sparse matrix [n_cells, n_cells] (e.g. from knn_graph), "
                        f"got {type(graph).__name__} of shape {getattr(graph, 'shape', None)}.")
    if graph.shape[0] == 0:
        raise DataError("graph has no cells (0 x 0); fix: build it from an embedding with cells (knn_graph(Z)).")
    G = sp.csr_matrix(graph)
    if G.nnz and (not np.isfinite(G.data).all() or (G.data < 0).any()):
        raise DataError("graph weights must be finite and non-negative; rebuild it with knn_graph.")
    return G


LEIDEN_FLAVORS = ("igraph", "leidenalg")


LEIDEN_RESOLUTION = 1.0  # Leiden's resolution when k is not given (scanpy's default)


def _undirected_graph(G: sp.csr_matrix):
    """(igraph.Graph, float64 weights [edges]) of ``G`` [n, n] as an undirected graph with each
    edge once. G + G.T keeps a non-symmetric graph's weight in both directions and, for a
    symmetric one, doubles every weight, which leaves modularity as is, as scanpy's graph of both
    directions does; a self-loop, stored once, is kept once (doubling it would weigh it twice
    against the other edges)."""
    import igraph as ig
    U = (sp.triu(G + G.T, k=1) + sp.diags(G.diagonal())).tocoo()
    U.eliminate_zeros()
    g = ig.Graph(n=G.shape[0], edges=np.column_stack([U.row, U.col]).astype(np.int64), directed=False)
    return g, U.data.astype(np.float64)


def leiden(graph, resolution: float = LEIDEN_RESOLUTION, seed: int = 0, n_iterations: int | None = None,
           flavor: str = "igraph", directed: bool = True) -> np.ndarray:
    """Leiden communities of a weighted graph (modularity with a resolution parameter).

    Two implementations of the same objective, as ``scanpy.tl.leiden``'s two flavours:

    - ``"igraph"`` (default): igraph's C ``community_leiden`` on the undirected graph, 2
      iterations (scanpy's recommended setting). 100k cells, 15-NN graph, 2 cores: 1.7-3.9 s
      against 282 s for ``leidenalg`` until convergence; 16-18 clusters and ARI 0.73-0.77 to
      the truth depending on the seed, against 17 and 0.773.
    - ``"leidenalg"``: ``leidenalg.RBConfigurationVertexPartition``, iterated until no
      improvement; builds the igraph graph exactly as ``scanpy.tl.leiden(flavor="leidenalg")``
      does (every stored entry an edge, ``directed=True`` by default), so the same graph and
      seed give scanpy's labels.

    Args:
        graph: square scipy.sparse [n, n] of non-negative weights (e.g. :func:`knn_graph`).
        resolution: resolution of the modularity; higher -> more clusters.
        seed: random seed (for ``igraph``, a ``random.Random(seed)`` set as igraph's RNG for the
            call; igraph's default, Python's ``random`` module, is set back after it).
        n_iterations: passes over the graph; -1 = until no improvement. None: 2 for
            ``igraph``, -1 for ``leidenalg``.
        flavor: ``"igraph"`` or ``"leidenalg"``. directed: ``leidenalg`` only.

    Returns: np.int64 [n] labels 0.., numbered by decreasing cluster size.
    """
    import igraph as ig

    G = _check_graph(graph)
    _check_resolution(resolution)
    if flavor not in LEIDEN_FLAVORS:
        raise ValueError(f"flavor must be one of {LEIDEN_FLAVORS}, got {flavor!r}.")
    seed = check_seed(seed)
    check_flags(directed=directed)
    if n_iterations is not None and (not is_integer(n_iterations) or not (n_iterations == -1 or n_iterations >= 1)):
        raise DataError(f"n_iterations={n_iterations!r}; fix: pass a whole number of passes >= 1, -1 to iterate "
                        "until no improvement, or None for the flavour's default.")
    if flavor == "igraph":
        g, weights = _undirected_graph(G)
        ig.set_random_number_generator(random.Random(seed))
        try:
            part = g.community_leiden(objective_function="modularity", weights=weights,
                                      resolution=float(resolution), n_iterations=2 if n_iterations is None
                                      else n_iterations)
        finally:
            ig.set_random_number_generator(random)  # igraph's default; it has no getter for the current one
        return _relabel_by_size(np.asarray(part.membership, dtype=np.int64))

    import leidenalg
    coo = G.tocoo()  # same edge order as scanpy's adjacency.nonzero(), which leidenalg's RNG sees
    nz = coo.data != 0
    g = ig.Graph(n=G.shape[0], edges=np.column_stack([coo.row[nz], coo.col[nz]]).astype(np.int64), directed=directed)
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights=coo.data[nz].astype(np.float64),
                                    resolution_parameter=float(resolution),
                                    n_iterations=-1 if n_iterations is None else n_iterations, seed=seed)
    return _relabel_by_size(np.asarray(part.membership, dtype=np.int64))


def leiden_for_k(graph, k: int, seed: int = 0, resolution_range: tuple[float, float] = (1e-3, 20.0),
                 max_steps: int = 30, **leiden_kw) -> tuple[np.ndarray, float]:
    """Leiden with the resolution searched (bisection on log-resolution) for exactly ``k`` clusters.

    The cluster count is not strictly monotone in the resolution; when no tried resolution
    gives ``k`` within ``max_steps``, the closest count found is returned with a warning saying
    why: the count skips ``k`` where bisection converged, the steps ran out first, or every
    count tried was on one side of ``k``. A graph of more than ``k`` connected components, which Leiden never joins, is
    clustered once, at the lowest resolution, with a warning. (Bisection on into a bracket
    already 1% wide hit k on 232 of 234 (graph, seed, k) cases of PBMC and worm kNN graphs,
    k = 2..40; trying points spread through that bracket instead hit 226.)

    Args:
        graph: square scipy.sparse [n, n] of non-negative weights (e.g. :func:`knn_graph`).
        k: number of clusters wanted, 1 <= k <= n.
        seed: random seed of every :func:`leiden` call.
        resolution_range: (lowest, highest) resolution searched, both > 0.
        max_steps: bisection steps (Leiden runs) at most; it stops sooner once the bracket is a
            millionth wide in log-resolution (24 steps on the default range).
        leiden_kw: other arguments of :func:`leiden` (``n_iterations``, ``flavor``, ``directed``).

    Returns: (labels np.int64 [n], resolution used).
    """
    G = _check_graph(graph)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= G.shape[0]:
        raise DataError(_bad_k(k, G.shape[0], "leiden"))
    max_steps = check_count("max_steps", max_steps, "Leiden runs")
    bounds = list(resolution_range) if isinstance(resolution_range, (tuple, list, np.ndarray)) else []
    low, high = (float(r) if is_number(r) else np.nan for r in bounds) if len(bounds) == 2 else (np.nan, np.nan)
    if not 0 < low < high < np.inf:
        raise ValueError(f"resolution_range must be (lowest, highest) with 0 < lowest < highest, finite, got "
                         f"{resolution_range!r}; fix: e.g. the default (0.001, 20.0).")
    n_comp = sp.csgraph.connected_components(G, directed=False)[0]
    if n_comp > k:
        labels = leiden(G, resolution=low, seed=seed, **leiden_kw)
        warn(f"leiden_for_k: the graph has {n_comp} connected components, more than k={k}, and Leiden never joins "
             f"them; returning {int(labels.max()) + 1} clusters (resolution {low:.4g}). Use k-means for an exact k, "
             "or build the graph with more neighbours (n_neighbors).")
        return labels, low
    lo, hi = np.log(low), np.log(high)
    best, below, above = None, None, None  # the best try, and the tries nearest k from below and above
    converged = 1e-6  # bracket width in log-resolution where the ends give the same partitions (24 steps by default)
    for _ in range(max_steps):
        if below is not None and above is not None and hi - lo <= converged:
            break
        r = float(np.exp((lo + hi) / 2))
        labels = leiden(G, resolution=r, seed=seed, **leiden_kw)
        found = int(labels.max()) + 1
        logger.debug("leiden resolution %.8g -> %d clusters (target %d)", r, found, k)
        if best is None or abs(found - k) < abs(best[2] - k):
            best = (labels, r, found)
        if found == k:
            return labels, r
        if found < k:
            lo, below = np.log(r), (r, found)
        else:
            hi, above = np.log(r), (r, found)
    labels, r, found = best
    closed_in, bracketed = hi - lo <= converged, below is not None and above is not None
    if closed_in and bracketed:
        why = (f" The count skips {k} between {below[1]} clusters at resolution {below[0]:.12g} and {above[1]} at "
               f"{above[0]:.12g}; another seed may hit it.")
    elif bracketed:
        why = f" The search stopped (max_steps={max_steps}) before closing in on it; more max_steps may hit it."
    else:
        side = "below" if above is None else "above"
        why = (f" Every count tried was {side} {k}; a wider resolution_range of masksc.cluster.leiden_for_k"
               f"{'' if closed_in else ' or more max_steps'} may find it.")
    warn(f"leiden_for_k: no resolution tried in {resolution_range} gave {k} clusters; returning {found} "
         f"(resolution {r:.4g}).{why} Use k-means for an exact k.")
    return labels, r


# keywords of cluster_embedding / tl.cluster, named in the refusal of an unknown one
CLUSTER_SETTINGS = ("method", "seed", "n_neighbors", "resolution", "metric", "use_gpu", "graph")
KMEANS_SETTINGS = ("n_init", "max_iter", "init", "max_points_per_centroid", "ngpu")


def check_settings(settings, allowed=CLUSTER_SETTINGS + KMEANS_SETTINGS) -> None:
    """Raise TypeError for a keyword in ``settings`` that clustering does not take (a typo such as
    ``resolutoin``), naming the closest one it does, before any search runs."""
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        close = {name: difflib.get_close_matches(name, list(allowed), n=1) for name in unknown}
        hint = "".join(f" ({name}: did you mean {match[0]!r}?)" for name, match in close.items() if match)
        raise TypeError(f"unexpected keyword argument(s) {unknown}{hint}; clustering takes "
                        f"{[n for n in CLUSTER_SETTINGS if n in allowed]} and, for k-means, "
                        f"{[n for n in KMEANS_SETTINGS if n in allowed]}.")


def cluster_embedding(Z, k: int | None = None, method: str = "auto", seed: int = 0, n_neighbors: int | None = None,
                      resolution: float | None = None, metric: str | None = None, use_gpu: bool | None = None,
                      graph=None, **kmeans_kw) -> np.ndarray:
    """Cluster an embedding: k-means when ``k`` is given, kNN graph + Leiden when it is not.

    Args:
        Z: embedding [n, d], a real-valued array (clustered as float32); None when ``graph`` is
            given. k: number of clusters or None.
        method: "auto" (k-means if k else Leiden), "kmeans" (needs k), or "leiden" (with k, the
            resolution is searched for k clusters via :func:`leiden_for_k`; without, ``resolution``).
        seed: seeds k-means, the kNN search and Leiden.
        n_neighbors, metric: the kNN graph Leiden builds from ``Z`` (default ``N_NEIGHBORS``, "euclidean").
        resolution: Leiden's when k is None (default ``LEIDEN_RESOLUTION``); with k it is searched,
            so passing one is a TypeError. use_gpu: as in :func:`kmeans`.
        graph: a kNN graph of these cells already built (e.g. :func:`knn_graph`, or a stored
            ``adata.obsp`` graph) for Leiden to cluster instead of building one; ``n_neighbors``
            and ``metric`` are then refused (TypeError), as they would be ignored.
        kmeans_kw: passed to :func:`kmeans` (``n_init``, ``max_iter``, ...); a TypeError when
            Leiden is used, which would ignore them.

    Returns: np.int64 [n] labels.
    """
    if method not in ("auto", "kmeans", "leiden"):
        raise ValueError(f"method must be 'auto', 'kmeans' or 'leiden', got {method!r}.")
    check_settings(kmeans_kw)  # the named settings are parameters, so only k-means' and unknown ones are here
    if method == "auto":
        method = "kmeans" if k is not None else "leiden"
    if method == "kmeans":
        if k is None:
            raise ValueError("method='kmeans' needs k; pass k or use method='leiden' to find clusters from the graph.")
        if graph is not None:
            raise TypeError("graph= is Leiden's input, but k-means clusters here; fix: drop graph=, or pass "
                            "method='leiden' to search the graph's resolution for k clusters.")
        leiden_only = [name for name, value in (("n_neighbors", n_neighbors), ("resolution", resolution),
                                                ("metric", metric)) if value is not None]
        if leiden_only:
            raise TypeError(f"{leiden_only} are Leiden's settings, but k-means clusters here (k={k}), which would "
                            "ignore them; fix: drop them, or pass method='leiden' to cluster a graph.")
        return kmeans(Z, k, seed=seed, use_gpu=use_gpu, **kmeans_kw)
    check_leiden_settings(k, resolution, kmeans_kw)
    if graph is None:
        graph = knn_graph(Z, n_neighbors=N_NEIGHBORS if n_neighbors is None else n_neighbors,
                          metric="euclidean" if metric is None else metric, use_gpu=use_gpu, seed=seed)
    else:
        given = [name for name, value in (("n_neighbors", n_neighbors), ("metric", metric)) if value is not None]
        if given:
            raise TypeError(f"{given} set the graph built from Z, but graph= is given; fix: drop them.")
        if Z is not None and graph.shape != (len(Z), len(Z)):
            raise DataError(f"graph is {graph.shape[0]} x {graph.shape[1]} but Z has {len(Z)} cells; fix: pass the "
                            "graph built from these cells (knn_graph(Z)).")
    return cluster_graph(graph, k, seed=seed, resolution=resolution)[0]


def cluster_graph(graph, k: int | None = None, seed: int = 0, resolution: float | None = None,
                  **kmeans_kw) -> tuple[np.ndarray, float]:
    """Leiden on a kNN graph already built: at ``resolution`` (default ``LEIDEN_RESOLUTION``)
    when ``k`` is None, else at the resolution :func:`leiden_for_k` finds for k clusters.
    ``kmeans_kw`` and a resolution given with k are refused (TypeError), as Leiden would ignore
    them. graph: square scipy.sparse [n, n]. Returns (labels np.int64 [n], resolution used)."""
    check_settings(kmeans_kw)  # an unknown name is a typo, not "a k-means argument"
    check_leiden_settings(k, resolution, kmeans_kw)
    logger.info("Leiden on a graph of %s cells%s", (getattr(graph, "shape", None) or ("?",))[0],
                "" if k is None else f", resolution searched for {k} clusters")
    if k is None:
        resolution = LEIDEN_RESOLUTION if resolution is None else resolution
        return leiden(graph, resolution=resolution, seed=seed), resolution
    return leiden_for_k(graph, k, seed=seed)


def _check_resolution(resolution: float) -> None:
    if not is_number(resolution) or not 0 < resolution < np.inf:  # also NaN
        shown = float(resolution) if is_number(resolution) else repr(resolution)  # the text "1" is not 1
        raise ValueError(f"resolution must be a finite number > 0, got {shown}; fix: e.g. 0.5 for fewer, larger "
                         "clusters or 2 for more, smaller ones.")


def check_leiden_settings(k: int | None, resolution: float | None, kmeans_kw: dict) -> None:
    """Refuse (TypeError) what Leiden would ignore: a ``resolution`` beside ``k`` (searched
    instead) and k-means settings ``kmeans_kw``, and (ValueError) a resolution that is not a
    finite number > 0; called before any graph is built."""
    if resolution is not None:
        _check_resolution(resolution)
    if k is not None and resolution is not None:
        raise TypeError(f"resolution={resolution} would be ignored: with k={k} Leiden searches the resolution that "
                        "gives k clusters; fix: drop resolution, or drop k to cluster at that resolution.")
    if kmeans_kw:
        raise TypeError(f"{sorted(kmeans_kw)} are k-means arguments, but Leiden clusters here (k={k!r}, "
                        "method='leiden'), which would ignore them; fix: drop them, or pass k (with "
                        "method='auto' or 'kmeans') to use k-means.")


def _as_labels(labels, n: int | None, name: str) -> np.ndarray:
    """``labels`` as a 1-D array of ``n`` (None: any number of) comparable labels, or a DataError."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (n is not None and labels.shape[0] != n):
        raise DataError(f"{name} must be 1-D with one label per cell{f' ({n})' if n is not None else ''}, got shape "
                        f"{labels.shape}.")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise DataError(f"{name} contains NaN or infinite values; remove unlabelled cells before evaluating.")
    if labels.dtype == object:
        if pd.isna(labels).any():  # None, NaN, pd.NA
            raise DataError(f"{name} contains missing values; remove unlabelled cells before evaluating.")
        if len({type(v) for v in labels}) > 1:  # e.g. 1 and "1" mixed: compared as text, 1.0 and True as 1
            labels = np.array([_comparable_label(v) for v in labels])
    return labels


def _comparable_label(value) -> str:
    """A label as text, numbers equal in Python written alike (1, 1.0, np.int64(1) and True as "1")."""
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def agreement(truth, pred) -> dict:
    """{"ari", "nmi"} (sklearn; NMI with arithmetic-mean normalisation) of predicted labels
    ``pred`` [n] against true labels ``truth`` [n] (any hashable dtypes)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth, pred = _as_labels(truth, None, "truth"), _as_labels(pred, None, "pred")
    if len(truth) != len(pred):
        raise DataError(f"truth holds {len(truth)} labels but pred {len(pred)}; fix: pass one label per cell in "
                        "each, for the same cells.")
    return {"ari": float(adjusted_rand_score(truth, pred)), "nmi": float(normalized_mutual_info_score(truth, pred))}


def evaluate(Z, pred, truth=None, silhouette_sample: int | None = 10_000, seed: int = 0) -> dict:
    """Clustering metrics.

    Args:
        Z: embedding [n, d], a real-valued array, the silhouette is computed in (euclidean).
        pred: predicted labels [n] (any hashable dtype). truth: true labels [n] or None.
        silhouette_sample: silhouette on a uniform random sample of this many cells when n is
            larger (sklearn ``sample_size``); exact when n <= it or when None.
        seed: sample seed.

    Returns: {"ari", "nmi", "silhouette", "n_clusters"}; ari/nmi (sklearn; NMI with arithmetic
    mean normalisation) are None without ``truth``; silhouette is None when pred has fewer than
    2 or more than n-1 clusters, or when the silhouette sample holds fewer than 2 or more than
    sample-1 of them.
    """
    from sklearn.metrics import silhouette_score

    X = check_embedding(Z, centre=True)
    seed = check_seed(seed)
    if silhouette_sample is not None and (not is_integer(silhouette_sample) or silhouette_sample < 3):
        raise DataError(f"silhouette_sample={silhouette_sample!r}; fix: pass a whole number of cells >= 3 (a "
                        "silhouette needs 2 clusters and a cell more), or None to score every cell.")
    n = X.shape[0]
    pred = _as_labels(pred, n, "pred")
    n_clusters = len(np.unique(pred))
    out = {"ari": None, "nmi": None, "silhouette": None, "n_clusters": n_clusters}
    if truth is not None:
        out.update(agreement(_as_labels(truth, n, "truth"), pred))
    if 2 <= n_clusters <= n - 1:
        sample = int(silhouette_sample) if silhouette_sample is not None and n > silhouette_sample else None
        if sample is not None:
            rng = np.random.default_rng(seed)
            idx = rng.choice(n, size=sample, replace=False)
            if 2 <= len(np.unique(pred[idx])) <= sample - 1:
                out["silhouette"] = float(silhouette_score(X[idx], pred[idx]))
        else:
            out["silhouette"] = float(silhouette_score(X, pred))
    return out
