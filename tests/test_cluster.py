"""masksc.cluster against sklearn / scanpy oracles: k-means, kNN graph, Leiden, metrics."""
import logging
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits, make_blobs
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

from threadpoolctl import threadpool_limits

from masksc import cluster
from masksc.cluster import cluster_embedding, evaluate, kmeans, knn_graph, knn_search, leiden, leiden_for_k
from masksc.errors import DataError, MaskscError


@pytest.fixture(autouse=True)
def _one_thread():
    """Small shapes: OpenMP threads only add waiting, and on the shared CI cores a lot of it."""
    with threadpool_limits(1):
        yield


def _blobs(n=600, d=8, k=5, std=1.0, seed=0):
    X, y = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=std, random_state=seed)
    return X.astype(np.float32), y


def _inertia(X, labels):
    X = X.astype(np.float64)
    return sum(((X[labels == c] - X[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))


# ---------------------------------------------------------------- k-means
def test_kmeans_separated_blobs_match_truth_and_sklearn():
    X, y = _blobs()
    labels = kmeans(X, 5, seed=0)
    sk = KMeans(5, n_init=10, random_state=0).fit(X)
    assert labels.dtype == np.int64 and labels.shape == (600,)
    assert adjusted_rand_score(y, labels) == 1.0
    assert adjusted_rand_score(sk.labels_, labels) == 1.0
    assert _inertia(X, labels) == pytest.approx(sk.inertia_, rel=1e-4)


def test_kmeans_realistic_digits_parity_with_sklearn():
    X = load_digits().data.astype(np.float32)  # 1797 x 64, overlapping classes
    for seed in (0, 1):
        labels = kmeans(X, 10, seed=seed)
        sk = KMeans(10, n_init=10, random_state=seed).fit(X)
        assert _inertia(X, labels) <= sk.inertia_ * 1.005  # within 0.5% (or better)
        assert adjusted_rand_score(sk.labels_, labels) > 0.9


def test_kmeans_subsampled_training_still_recovers_clusters():
    X, y = _blobs(n=4000, d=16, k=6, std=1.5, seed=3)
    labels = kmeans(X, 6, seed=0, max_points_per_centroid=40)  # trains on 240 of 4000 cells
    assert adjusted_rand_score(y, labels) == 1.0


def test_kmeans_deterministic_sorted_by_size_and_input_untouched():
    X, _ = _blobs(n=500, std=3.0)
    X64 = X.astype(np.float64)
    before, before64 = X.copy(), X64.copy()
    a = kmeans(X, 4, seed=7)
    b = kmeans(X64, 4, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(X, before)
    np.testing.assert_array_equal(X64, before64)
    sizes = np.bincount(a)
    assert set(np.unique(a)) == {0, 1, 2, 3} and (np.diff(sizes) <= 0).all()


def test_kmeans_k1_and_k_equals_n():
    X, _ = _blobs(n=30)
    np.testing.assert_array_equal(kmeans(X, 1), np.zeros(30, dtype=np.int64))
    assert len(np.unique(kmeans(X, 30))) == 30


@pytest.mark.parametrize("bad, k", [
    (np.zeros(10, np.float32), 2),                       # 1-D
    (np.zeros((0, 3), np.float32), 1),                   # empty
    (np.array([[0.0, np.nan], [1.0, 2.0]]), 1),          # NaN
    (np.array([[0.0, np.inf], [1.0, 2.0]]), 1),          # inf
    (np.ones((5, 2), np.float32), 0),                    # k < 1
    (np.ones((5, 2), np.float32), 6),                    # k > n
    (np.ones((5, 2), np.float32), 2.5),                  # k not an int
    (sp.random(5, 3, density=0.5, format="csr"), 2),     # sparse
    (np.array([["a", "b"], ["c", "d"]]), 1),             # not numbers
])
def test_kmeans_rejects_bad_input(bad, k):
    with pytest.raises(DataError):
        kmeans(bad, k)


def test_more_clusters_than_cells_is_refused_with_the_fix():
    with pytest.raises(DataError, match=r"k must be an integer in \[1, n_cells=5\], got 6; fix: ask for at most as "
                                        r"many clusters as there are cells"):
        kmeans(np.ones((5, 2), np.float32), 6)


@pytest.mark.skipif(cluster._faiss().get_num_gpus() > 0, reason="a GPU is visible, so use_gpu=True is valid here")
def test_kmeans_use_gpu_true_without_gpu_is_a_clear_error():
    X, _ = _blobs(n=50)
    with pytest.raises(MaskscError, match="faiss-gpu"):
        kmeans(X, 2, use_gpu=True)
    kmeans(X, 2, use_gpu=None)  # auto falls back to the CPU


# ---------------------------------------------------------------- kNN graph
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_search_flat_matches_sklearn_exact(metric):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 12)).astype(np.float32)
    I, D = knn_search(X, 10, metric=metric, index="flat")
    nn = NearestNeighbors(n_neighbors=10, metric=metric, algorithm="brute").fit(X)
    dref, iref = nn.kneighbors(X)
    assert I.dtype == np.int64 and D.dtype == np.float32 and I.shape == (400, 10)
    np.testing.assert_array_equal(I[:, 0], np.arange(400))
    for row, ref in zip(I, iref):
        assert set(row) == set(ref)
    np.testing.assert_allclose(D, dref, atol=2e-4)


def test_knn_search_duplicates_keep_self_first():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    X = np.concatenate([X, X[:10]])  # cells 60..69 duplicate cells 0..9
    I, D = knn_search(X, 5, index="flat")
    np.testing.assert_array_equal(I[:, 0], np.arange(70))
    for i in range(10):
        assert i + 60 in I[i] and i in I[i + 60]
    assert (D[:, 0] == 0).all() and (np.diff(D, axis=1) >= 0).all()


@pytest.mark.slow
def test_knn_graph_equals_scanpy_umap_connectivities():
    import anndata
    import scanpy as sc

    X, _ = _blobs(n=500, d=10, k=4, std=2.5, seed=2)
    G = knn_graph(X, n_neighbors=15, index="flat")
    ad = anndata.AnnData(np.zeros((500, 1), np.float32))
    ad.obsm["Z"] = X
    sc.pp.neighbors(ad, n_neighbors=15, use_rep="Z")  # exact kNN at this size + umap weights
    ref = ad.obsp["connectivities"]
    assert isinstance(G, sp.csr_matrix) and G.dtype == np.float32
    assert (G != G.T).nnz == 0 and G.diagonal().sum() == 0
    np.testing.assert_array_equal((G > 0).toarray(), (ref > 0).toarray())
    np.testing.assert_allclose(G.toarray(), ref.toarray(), atol=1e-4)


def _recall(approx, exact) -> float:
    """Mean share of each row's exact neighbours that the approximate search returned."""
    return np.mean([len(np.intersect1d(a, e)) / exact.shape[1] for a, e in zip(approx, exact)])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("target", [0.8, 0.97])
def test_ivf_index_reaches_its_target_recall(metric, target):
    X, _ = _blobs(n=20_000, d=32, k=30, std=4.0, seed=4)
    exact, _ = knn_search(X, 15, metric=metric, index="flat")
    approx, _ = knn_search(X, 15, metric=metric, index="ivf", target_recall=target)  # nlist ~ 4 sqrt(n) = 565
    assert _recall(approx, exact) >= target - 0.02


def test_ivf_nprobe_tuning_stops_at_the_first_sufficient_setting(caplog):
    X, _ = _blobs(n=20_000, d=32, k=30, std=4.0, seed=4)
    exact, _ = knn_search(X, 15, index="flat")
    with caplog.at_level(logging.INFO, logger="masksc.cluster"):
        knn_search(X, 15, index="ivf", target_recall=0.97)
    chosen = int(re.search(r"IVF nprobe (\d+) of", caplog.text).group(1))
    assert chosen >= 16  # on this data nprobe 8 is below 0.97 (checked next), so tuning went on
    below, _ = knn_search(X, 15, index="ivf", nprobe=chosen // 2)
    assert _recall(below, exact) < 0.97
    with pytest.raises(ValueError, match="target_recall"):
        knn_search(X, 15, index="ivf", target_recall=1.5)


def test_ivf_missing_neighbours_are_marked_and_graph_stays_valid():
    X, _ = _blobs(n=300, d=4, k=3, std=2.0, seed=11)
    I, D = knn_search(X, 40, index="ivf", nlist=30, nprobe=1)  # ~10 cells per list: rows run short
    missing = I < 0
    assert missing.any() and np.isinf(D[missing]).all() and np.isfinite(D[~missing]).all()
    np.testing.assert_array_equal(I[:, 0], np.arange(300))
    G = knn_graph(X, 40, index="ivf", nlist=30, nprobe=1)
    assert np.isfinite(G.data).all() and (G.data > 0).all() and G.diagonal().sum() == 0
    assert abs(G - G.T).max() < 1e-6
    with pytest.raises(DataError, match=r"nlist=301 IVF lists for 300 cells; fix: pass 1 <= nlist <= n_cells"):
        knn_search(X, 5, index="ivf", nlist=301)


def test_knn_rejects_bad_arguments():
    X = np.ones((10, 3), np.float32)
    with pytest.raises(DataError, match=r"got 11; fix: pass n_neighbors= an integer in that range \(e.g. n_neighbors=10"):
        knn_search(X, 11)
    with pytest.raises(DataError):
        knn_search(X, 1)
    with pytest.raises(DataError, match="fix: pass at least 2 cells"):
        knn_search(X[:1], 2)
    with pytest.raises(ValueError, match="metric"):
        knn_search(X, 3, metric="manhattan")
    with pytest.raises(ValueError, match="index"):
        knn_search(X, 3, index="hnsw")
    Xz = np.vstack([np.zeros((1, 3), np.float32), np.ones((4, 3), np.float32)])
    with pytest.raises(DataError, match="cosine"):
        knn_search(Xz, 2, metric="cosine")


# ---------------------------------------------------------------- Leiden
def test_leiden_matches_scanpy_and_recovers_blobs():
    import anndata
    import scanpy as sc

    X, y = _blobs(n=400, d=8, k=4, std=1.0, seed=5)
    G = knn_graph(X, 15)
    labels = leiden(G, resolution=1.0, seed=0, flavor="leidenalg")
    ad = anndata.AnnData(np.zeros((400, 1), np.float32))
    with pytest.warns(FutureWarning):  # scanpy's notice about its future default flavour
        sc.tl.leiden(ad, adjacency=G, resolution=1.0, random_state=0, flavor="leidenalg")
    assert adjusted_rand_score(ad.obs["leiden"].astype(int), labels) == 1.0
    assert adjusted_rand_score(y, labels) == 1.0
    assert labels.dtype == np.int64 and (np.diff(np.bincount(labels)) <= 0).all()


def _modularity(G, labels, resolution=1.0):
    """Weighted modularity of a symmetric graph, from its definition (the oracle)."""
    A = sp.csr_matrix(G)
    deg, two_m = np.asarray(A.sum(1)).ravel(), A.sum()
    inside = sum(A[labels == c][:, labels == c].sum() for c in np.unique(labels))
    return (inside - resolution * sum(deg[labels == c].sum() ** 2 for c in np.unique(labels)) / two_m) / two_m


def test_igraph_leiden_recovers_blobs_and_matches_scanpy():
    import anndata
    import scanpy as sc

    X, y = _blobs(n=400, d=8, k=4, std=1.0, seed=5)
    G = knn_graph(X, 15)
    labels = leiden(G, resolution=1.0, seed=0)  # default flavor: igraph
    ad = anndata.AnnData(np.zeros((400, 1), np.float32))
    sc.tl.leiden(ad, adjacency=G, resolution=1.0, random_state=0, flavor="igraph", n_iterations=2, directed=False)
    assert adjusted_rand_score(ad.obs["leiden"].astype(int), labels) == 1.0
    assert adjusted_rand_score(y, labels) == 1.0
    assert labels.dtype == np.int64 and (np.diff(np.bincount(labels)) <= 0).all()


def test_igraph_leidens_graph_scores_partitions_as_scanpys_with_self_loops():
    """A user's graph with self-loops (neighbors_key= / graph=) had each loop weighed twice against
    scanpy's graph of the same matrix: another modularity (0.221 against 0.133 for one partition)."""
    from scanpy._utils import get_igraph_from_adjacency

    from masksc.cluster import _undirected_graph
    X, _ = _blobs(n=200, d=8, k=4, std=2.0, seed=3)
    G = knn_graph(X, 10)
    looped = (G + sp.identity(200, format="csr") * 2.0).tocsr()
    members = np.random.default_rng(0).integers(0, 4, 200)
    for graph in (G, looped):
        ours, weights = _undirected_graph(graph)
        theirs = get_igraph_from_adjacency(graph, directed=False)
        assert ours.modularity(members, weights=weights) == pytest.approx(
            theirs.modularity(members, weights="weight"), rel=1e-9)


@pytest.mark.parametrize("resolution", [0.5, 1.0, 2.0])
def test_igraph_leiden_reaches_leidenalg_modularity(resolution):
    X, _ = _blobs(n=600, d=8, k=6, std=3.5, seed=6)  # overlapping blobs: the partition is not obvious
    G = knn_graph(X, 15)
    fast = leiden(G, resolution=resolution, seed=0)
    exact = leiden(G, resolution=resolution, seed=0, flavor="leidenalg", directed=False)
    q_fast, q_exact = _modularity(G, fast, resolution), _modularity(G, exact, resolution)
    assert q_fast > 0.3 and q_fast >= q_exact - 0.01


def test_igraph_leiden_is_seeded_and_restores_igraphs_rng():
    import random

    import igraph as ig

    X, _ = _blobs(n=600, d=8, k=6, std=3.5, seed=6)
    G = knn_graph(X, 15)
    np.testing.assert_array_equal(leiden(G, seed=3), leiden(G, seed=3))
    ig.set_random_number_generator(random.Random(0))  # something leiden must not leave in place
    leiden(G, seed=3)
    random.seed(11)
    first = ig.Graph.Erdos_Renyi(50, 0.1).get_edgelist()
    random.seed(11)
    assert ig.Graph.Erdos_Renyi(50, 0.1).get_edgelist() == first  # igraph draws from `random` again
    with pytest.raises(ValueError, match="flavor"):
        leiden(G, flavor="louvain")


def test_leiden_for_k_finds_the_target_count():
    X, y = _blobs(n=600, d=8, k=6, std=3.5, seed=6)
    G = knn_graph(X, 15)
    assert sp.csgraph.connected_components(G)[0] == 1
    for k in (3, 6, 9):
        labels, res = leiden_for_k(G, k, seed=0)
        assert len(np.unique(labels)) == k and res > 0
    assert adjusted_rand_score(y, leiden_for_k(G, 6)[0]) > 0.9
    with pytest.raises(DataError, match="max_steps=0; fix: pass a positive whole number of Leiden runs"):
        leiden_for_k(G, 6, max_steps=0)


def test_leiden_for_k_warns_when_components_outnumber_k_after_one_run(monkeypatch):
    X, _ = _blobs(n=300, d=8, k=3, std=0.5, seed=6)  # three disconnected blobs
    runs = []
    real = cluster.leiden
    monkeypatch.setattr(cluster, "leiden", lambda G, resolution, **kw: runs.append(resolution) or real(G, resolution,
                                                                                                        **kw))
    with pytest.warns(UserWarning, match="3 connected components, more than k=2"):
        labels, resolution = leiden_for_k(knn_graph(X, 15), 2, max_steps=5)
    assert len(np.unique(labels)) == 3
    assert runs == [resolution] == [1e-3]  # no search can join components: one run, at the lowest resolution


def _counting_leiden(count_at):
    """A stand-in for cluster.leiden giving ``count_at(resolution)`` clusters, and the resolutions it was asked."""
    asked = []

    def leiden(G, resolution, **kw):
        asked.append(resolution)
        return np.arange(G.shape[0]) % count_at(resolution)
    return leiden, asked


def test_leiden_for_k_says_whether_the_count_skips_k_the_steps_ran_out_or_k_lies_past_the_range(monkeypatch):
    G = sp.csr_matrix(np.ones((1000, 1000)))
    fake, asked = _counting_leiden(lambda r: 27 if r < 4.46 else 29)
    monkeypatch.setattr(cluster, "leiden", fake)
    with pytest.warns(UserWarning, match=r"gave 28 clusters; returning 27 .* The count skips 28 between 27 clusters "
                                         r"at resolution 4\.4599\d+ and 29 at 4\.4600\d+; another seed"):
        leiden_for_k(G, 28, max_steps=80)
    assert len(asked) == 24  # converged: no runs spent inside a bracket whose ends print alike
    fake, asked = _counting_leiden(lambda r: 2 * int(10 * r) + 1)  # odd counts only, 401 at the top of the range
    monkeypatch.setattr(cluster, "leiden", fake)
    with pytest.warns(UserWarning, match=r"Every count tried was below 500; a wider resolution_range of "
                                         r"masksc.cluster.leiden_for_k or more max_steps may find it"):
        leiden_for_k(G, 500, max_steps=3)
    with pytest.warns(UserWarning, match=r"The search stopped \(max_steps=5\) before closing in on it"):
        leiden_for_k(G, 60, max_steps=5)


def test_leiden_rejects_bad_graphs():
    with pytest.raises(DataError):
        leiden(np.eye(3))
    with pytest.raises(DataError):
        leiden(sp.random(3, 4, density=0.5, format="csr"))
    with pytest.raises(DataError):
        leiden(sp.csr_matrix(-np.ones((3, 3))))
    with pytest.raises(DataError):
        leiden_for_k(sp.csr_matrix(np.ones((3, 3))), 4)


def test_cluster_embedding_dispatch():
    X, y = _blobs(n=300, d=6, k=3, std=1.0, seed=8)
    np.testing.assert_array_equal(cluster_embedding(X, k=3, seed=1), kmeans(X, 3, seed=1))
    np.testing.assert_array_equal(cluster_embedding(X, seed=0), leiden(knn_graph(X, 15), seed=0))
    assert len(np.unique(cluster_embedding(X, k=3, method="leiden"))) == 3
    with pytest.raises(ValueError, match="needs k"):
        cluster_embedding(X, method="kmeans")


def test_cluster_embedding_refuses_kmeans_arguments_leiden_would_ignore():
    X, _ = _blobs(n=300, d=6, k=3, std=1.0, seed=8)
    with pytest.raises(TypeError, match=r"\['max_iter', 'n_init'\] are k-means arguments.*k=None"):
        cluster_embedding(X, n_init=3, max_iter=5)
    with pytest.raises(TypeError, match=r"\['n_init'\] are k-means arguments.*k=3"):
        cluster_embedding(X, k=3, method="leiden", n_init=3)
    np.testing.assert_array_equal(cluster_embedding(X, k=3, n_init=3, seed=1), kmeans(X, 3, n_init=3, seed=1))


def test_an_unknown_keyword_is_named_as_such_with_the_closest_known_one():
    """A typo is not "a k-means argument": it is refused as unknown, under either method."""
    import inspect
    X, _ = _blobs(n=300, d=6, k=3, std=1.0, seed=8)
    for kwargs in ({"resolutoin": 0.5}, {"k": 3, "resolutoin": 0.5}):
        with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['resolutoin'\] \(resolutoin: did you "
                                            r"mean 'resolution'\?\)"):
            cluster_embedding(X, **kwargs)
    with pytest.raises(TypeError, match=r"\['bogus'\]; clustering takes"):
        cluster_embedding(X, k=3, bogus=1)
    # the names the refusal lists are the functions' own
    assert set(cluster.KMEANS_SETTINGS) == set(inspect.signature(kmeans).parameters) - {"Z", "k", "seed", "use_gpu"}
    assert set(cluster.CLUSTER_SETTINGS) == set(inspect.signature(cluster_embedding).parameters) - {
        "Z", "k", "kmeans_kw"}


def test_kmeans_warns_when_the_embedding_has_fewer_distinct_cells_than_k():
    """Two distinct points asked for 5 clusters: 2 come back, with a warning (as sklearn warns)."""
    X = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0]], np.float32), 50, axis=0)
    with pytest.warns(UserWarning, match=r"k-means found 2 distinct clusters, fewer than k=5"):
        labels = kmeans(X, 5, seed=0)
    assert sorted(np.unique(labels)) == [0, 1]
    np.testing.assert_array_equal(labels[:50], labels[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kmeans(_blobs(n=300, d=6, k=3, std=1.0, seed=8)[0], 3)


# ---------------------------------------------------------------- metrics
def test_evaluate_matches_sklearn():
    X, y = _blobs(n=800, d=5, k=4, std=3.0, seed=9)
    pred = kmeans(X, 4)
    out = evaluate(X, pred, y)
    assert out["ari"] == pytest.approx(adjusted_rand_score(y, pred))
    assert out["nmi"] == pytest.approx(normalized_mutual_info_score(y, pred, average_method="arithmetic"))
    assert out["silhouette"] == pytest.approx(silhouette_score(X, pred), abs=1e-6)  # exact below the sample size
    assert out["n_clusters"] == 4
    names = np.array(["T", "B", "NK", "Mono"])[y]  # string truth labels work
    assert evaluate(X, pred, names)["ari"] == pytest.approx(out["ari"])


def test_evaluate_sampled_silhouette_close_to_exact():
    X, y = _blobs(n=5000, d=8, k=5, std=4.0, seed=10)
    exact = evaluate(X, y, silhouette_sample=None)["silhouette"]
    sampled = evaluate(X, y, silhouette_sample=1500, seed=0)["silhouette"]
    assert exact == pytest.approx(silhouette_score(X, y), abs=1e-6)
    assert abs(sampled - exact) < 0.02 and sampled != exact


def test_evaluate_edge_cases_and_validation():
    X, y = _blobs(n=50, k=2)
    out = evaluate(X, np.zeros(50, int))
    assert out["ari"] is None and out["nmi"] is None and out["silhouette"] is None
    one_outlier = np.r_[np.zeros(49, int), 1]  # 2 clusters, but a 3-cell sample holding only cluster 0
    seed = next(s for s in range(100) if 49 not in np.random.default_rng(s).choice(50, size=3, replace=False))
    out = evaluate(X, one_outlier, silhouette_sample=3, seed=seed)
    assert out["n_clusters"] == 2 and out["silhouette"] is None
    with pytest.raises(DataError, match=r"silhouette_sample=2; fix: .* >= 3 \(a silhouette needs 2 clusters and a "):
        evaluate(X, y, silhouette_sample=2)  # sklearn needs 2 <= clusters <= cells - 1: never on 2 cells
    with pytest.raises(DataError, match="one label per cell"):
        evaluate(X, y[:-1])
    with pytest.raises(DataError, match="truth"):
        evaluate(X, y, np.full(50, np.nan))
    pairs = np.arange(50) // 2  # 25 clusters; a 10-cell sample with one cell of each of 10 is too few for a silhouette
    seed = next(s for s in range(100)
                if len(np.unique(pairs[np.random.default_rng(s).choice(50, size=10, replace=False)])) == 10)
    assert evaluate(X, pairs, silhouette_sample=10, seed=seed)["silhouette"] is None
    with pytest.raises(DataError, match="truth contains missing values"):
        evaluate(X, y, pd.array([None] + ["a"] * 49, dtype="string"))
    mixed = np.array([1, "1"] * 25, dtype=object)  # one label written two ways compares as text
    assert evaluate(X, y, mixed)["ari"] == pytest.approx(adjusted_rand_score(np.zeros(50), y))


def test_cluster_embedding_takes_a_built_graph_for_leiden_only():
    X, _ = _blobs(n=300, d=8, k=3, std=1.0, seed=6)
    G = knn_graph(X, n_neighbors=10)
    np.testing.assert_array_equal(cluster_embedding(X, graph=G, seed=4), leiden(G, seed=4))
    with pytest.raises(TypeError, match="graph= is Leiden's input, but k-means clusters here"):
        cluster_embedding(X, k=3, graph=G)
    with pytest.raises(DataError, match="graph is 300 x 300 but Z has 200 cells"):
        cluster_embedding(X[:200], graph=G)
    np.testing.assert_array_equal(cluster_embedding(None, graph=G, seed=4), leiden(G, seed=4))
    with pytest.raises(TypeError, match=r"\['n_neighbors'\] set the graph built from Z, but graph= is given"):
        cluster_embedding(X, graph=G, n_neighbors=5)


# ---------------------------------------------------------------- argument checks shared by the functions
@pytest.mark.parametrize("seed", [-1, 1.5, True, 2**63, "0", None])
def test_seeded_functions_refuse_seeds_their_generators_cannot_take(seed):
    """numpy refuses negative and non-integer seeds, leidenalg those beyond 2**63 - 1: each
    function names the problem and the fix instead of passing on a generator's own error."""
    X, y = _blobs(n=60, k=3)
    graph = knn_graph(X, 5)
    calls = {"kmeans": lambda: kmeans(X, 3, seed=seed), "knn_search": lambda: knn_search(X, 5, seed=seed),
             "knn_graph": lambda: knn_graph(X, 5, seed=seed), "leiden": lambda: leiden(graph, seed=seed),
             "leidenalg": lambda: leiden(graph, seed=seed, flavor="leidenalg"),
             "leiden_for_k": lambda: leiden_for_k(graph, 3, seed=seed),
             "cluster_embedding kmeans": lambda: cluster_embedding(X, 3, seed=seed),
             "cluster_embedding leiden": lambda: cluster_embedding(X, seed=seed),
             "evaluate": lambda: evaluate(X, y, seed=seed)}
    for name, call in calls.items():
        with pytest.raises(DataError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\], got .*; fix: pass a "
                                            r"non-negative integer"):
            call()
            pytest.fail(f"{name} took seed={seed!r}")


def test_seeds_at_the_ends_of_the_range_work():
    X, y = _blobs(n=60, k=3)
    for seed in (0, np.int64(2**63 - 1)):
        labels = kmeans(X, 3, seed=seed)
        assert adjusted_rand_score(y, labels) == 1.0
        assert len(np.unique(leiden(knn_graph(X, 5, seed=seed), seed=seed, flavor="leidenalg"))) >= 2


def test_embedding_values_beyond_float32_are_named_apart_from_nan_and_inf():
    """A finite float64 value float32 cannot hold would read as inf after the cast: it is named
    as too large, with the fix, and NaN / inf keep their own message."""
    X, y = _blobs(n=50, k=2)
    Z = X.astype(np.float64)
    Z[3, 1], Z[7, 0] = 1e39, -2e39
    for call in (lambda z: kmeans(z, 2), lambda z: knn_search(z, 5), lambda z: evaluate(z, y),
                 lambda z: cluster_embedding(z)):
        with pytest.raises(DataError, match=r"Z has values too large for float32 \(max 3.4e38; largest magnitude "
                                            r"2e\+39\) in 2 row\(s\); fix: rescale it") as exc:
            call(Z)
        assert "NaN" not in str(exc.value) and "infinite" not in str(exc.value)
    Z[3, 1] = np.inf
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 row\(s\)"):
        kmeans(Z, 2)


# ---------------------------------------------------------------- numerics of large values, duplicates, labels
def test_kmeans_finds_a_small_spread_far_from_the_origin_as_sklearn_does():
    """Two clusters 4 apart around an offset of 1e6 (float32 keeps their spread): k-means works on
    the centred cells, as sklearn does; uncentred, FAISS's distances lost the spread (ARI 0.62)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 32))
    X[:1500, :3] += 4
    y = np.r_[np.zeros(1500), np.ones(1500)]
    for offset in (1e6, 3e6):
        shifted = (X + offset).astype(np.float32)
        ref = KMeans(2, n_init=3, random_state=0).fit(shifted).labels_
        assert adjusted_rand_score(kmeans(shifted, 2, n_init=3), ref) == 1.0 == adjusted_rand_score(ref, y)


def test_values_too_large_for_float32_distances_are_refused_and_below_that_clustered_right():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(200, 8))
    Z[:100] += 10
    y = np.r_[np.zeros(100), np.ones(100)]
    for step in (lambda Z: kmeans(Z, 2), lambda Z: knn_search(Z, 5), lambda Z: evaluate(Z, y)):
        with pytest.raises(DataError, match=r"values up to \d\.\d+e\+1[89] in magnitude about their column means, "
                                            r"too large for squared distances "
                                            r"in float32 at 8 dimensions .*fix: rescale it"):
            step(Z * 1e18)  # these were NaN / -1 neighbours, 118 Leiden clusters, or a FAISS abort
    big = Z * 1e16
    assert adjusted_rand_score(kmeans(big, 2), y) == 1.0
    assert evaluate(big, y)["silhouette"] == pytest.approx(silhouette_score(big, y), abs=1e-5)
    np.testing.assert_array_equal(knn_search(big, 5)[0][:, 1:], knn_search(Z, 5)[0][:, 1:])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_distances_are_exact_for_duplicates_and_brute_force(metric):
    """Duplicate cells are 0 apart (cosine's 1 - x.y gave up to 2.4e-7, which became UMAP's rho),
    and every distance is brute force's in float64."""
    from sklearn.metrics import pairwise_distances
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(250, 16)).astype(np.float32)
    I, D = knn_search(np.vstack([Z, Z]), 5, metric=metric)
    assert (I[:, 0] == np.arange(500)).all() and (D[:, 1] == 0).all()
    assert ((I[:, 1] - np.arange(500)) % 250 == 0).all()  # each cell's twin
    X = rng.normal(size=(1500, 8)).astype(np.float32)
    I, D = knn_search(X, 10, metric=metric)
    P = pairwise_distances(X.astype(np.float64), metric=metric)
    expected = np.argsort(P, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(I, expected)
    np.testing.assert_allclose(D, np.take_along_axis(P, expected, 1), rtol=1e-5, atol=1e-6)


def test_cosine_ivf_tunes_nprobe_to_the_recall_asked():
    """Cells far from the origin have cosine similarities near 1: a slack of 1e-3 on similarity
    counted every neighbour as found (sampled recall 1.0 at nprobe 8, true recall 0.77)."""
    X, _ = make_blobs(n_samples=20_000, n_features=32, centers=20, random_state=0)
    X = (X + 30).astype(np.float32)
    I, _ = knn_search(X, 15, metric="cosine", index="ivf", seed=0)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    exact = NearestNeighbors(n_neighbors=15).fit(Xn).kneighbors(Xn[:2000], return_distance=False)
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(I[:2000], exact)])
    assert recall >= 0.9, recall


def test_connectivities_store_no_zero_weights():
    """Weights that underflow float32 are dropped, not stored as 0 (the docstring's (0, 1])."""
    rng = np.random.default_rng(2)
    G = knn_graph(np.vstack([rng.normal(size=(500, 8)).astype(np.float32)] * 3), 15)
    assert G.nnz and (G.data > 0).all() and (G.data <= 1).all()


def test_labels_equal_in_python_are_one_label():
    """1, 1.0 and True (and "1", as text) are the same label; 2 and 2.0 too."""
    truth = np.array([1, 1.0, True, "1", 2, 2.0] * 50, dtype=object)
    pred = np.array([0, 0, 0, 0, 1, 1] * 50)
    assert cluster.agreement(truth, pred)["ari"] == 1.0
    assert adjusted_rand_score(np.array([1, 1, 1, 1, 2, 2] * 50), pred) == 1.0


def test_leiden_for_k_checks_its_range_and_says_when_the_count_skips_k():
    G = knn_graph(_blobs(300, k=3)[0], 15)
    for bad in [(0, 20), (-1, 2), (20, 0.001), (1, np.inf), (1,), (1, 2, 3), ("1", 2), 5,
                [[0.1, 5]]]:
        with pytest.raises(ValueError, match=r"resolution_range must be \(lowest, highest\) with 0 < lowest < "):
            leiden_for_k(G, 3, resolution_range=bad)
    with pytest.raises(ValueError, match=r"nprobe must be an integer >= 1 or None .*got 0"):
        knn_search(_blobs(300)[0], 5, index="ivf", nprobe=0)
    graph = knn_graph(_blobs(1000, k=10, std=3.0, seed=3)[0], 15)
    with pytest.warns(UserWarning, match=r"Every count tried was below 100; a wider resolution_range of "
                                         r"masksc.cluster.leiden_for_k may find it"):
        leiden_for_k(graph, 100, resolution_range=(1e-3, 0.01))


def test_kmeans_and_knn_hold_blocks_not_copies_of_the_embedding(monkeypatch):
    """Centring for k-means copied the whole embedding, and the exact kNN distances gathered
    4096 cells' neighbour vectors whatever k and d (839 MB at k=50, d=512): both now work in
    blocks of _DISTANCE_BUDGET floats, with the same results."""
    import tracemalloc
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100_000, 64)).astype(np.float32)
    X[:50_000, 0] += 6
    expected_labels = kmeans(X, 2, n_init=1)
    expected_I, expected_D = knn_search(X[:20_000], 50)
    monkeypatch.setattr(cluster, "_DISTANCE_BUDGET", 1 << 16)
    tracemalloc.start()
    labels = kmeans(X, 2, n_init=1)
    kmeans_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    I, D = knn_search(X[:20_000], 50)
    knn_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(I, expected_I)
    np.testing.assert_array_equal(D, expected_D)
    assert kmeans_peak < X.nbytes / 2, kmeans_peak
    assert knn_peak < 4 * I.nbytes, knn_peak  # the search and its result, not [4096, 50, 64] gathers


def test_cosine_neighbours_ignore_the_scale_of_the_embedding():
    Z = np.random.default_rng(3).normal(size=(500, 32))
    I, _ = knn_search(Z, 15, metric="cosine")
    np.testing.assert_array_equal(knn_search(Z * 1e18, 15, metric="cosine")[0], I)
    with pytest.raises(DataError, match="too large for squared distances"):
        knn_search(Z * 1e18, 15)  # euclidean squares them
    import anndata
    from masksc import tl
    a = anndata.AnnData(obsm={"X_masksc": (Z * 1e30).astype(np.float32)})
    tl.neighbors(a, 15, metric="cosine")
    np.testing.assert_array_equal(np.sort(a.obsp["masksc_neighbors_distances"][0].indices), np.sort(I[0, 1:]))


@pytest.mark.parametrize("graph", [np.array(3.0), np.float64(1.0), np.ones((3, 3)), [[0, 1], [1, 0]],
                                   sp.csr_matrix((2, 3))])
def test_clustering_a_graph_that_is_not_a_square_sparse_matrix_is_refused_by_name(graph):
    """The log line naming the graph's size used to index a 0-d shape and raise IndexError first."""
    from masksc.cluster import cluster_graph
    for k in (None, 2):
        with pytest.raises(DataError, match=r"^graph must be a square scipy\.sparse matrix \[n_cells, n_cells\]"):
            cluster_graph(graph, k)


def test_float64_input_keeps_its_digits_at_a_large_offset():
    """A float64 embedding far from the origin was cast to float32 before centring, losing the
    spread: the kNN and the silhouette must match sklearn's in float64."""
    X, y = make_blobs(3000, centers=5, n_features=8, random_state=0, cluster_std=0.5)
    exact = X - X.mean(axis=0)  # the oracle: sklearn's |x|^2 + |y|^2 - 2x.y at an offset of 1e6 loses digits too
    X = X + 1e6
    ref = NearestNeighbors(n_neighbors=10).fit(exact).kneighbors(exact, return_distance=False)
    I, _ = knn_search(X, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, ref)]) > 0.995
    assert evaluate(X, y, silhouette_sample=None)["silhouette"] == pytest.approx(silhouette_score(exact, y), abs=1e-4)
    assert adjusted_rand_score(kmeans(X, 5), y) == 1.0
    cos, _ = knn_search(X, 10, metric="cosine")  # angles are not translation-invariant: never centred
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos_ref = NearestNeighbors(n_neighbors=10).fit(unit).kneighbors(unit, return_distance=False)
    assert np.mean(cos[:, 0] == cos_ref[:, 0]) == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda X, G: kmeans(X, 3, n_init=2.5), r"n_init=2\.5; fix: pass a positive whole number of restarts"),
    (lambda X, G: kmeans(X, 3, n_init=None), r"n_init=None; fix"),
    (lambda X, G: kmeans(X, 3, max_iter=1.5), r"max_iter=1\.5; fix: pass a positive whole number of iterations"),
    (lambda X, G: evaluate(X, np.arange(300) % 3, silhouette_sample=10.5), r"silhouette_sample=10\.5; fix"),
    (lambda X, G: evaluate(X, np.arange(300) % 3, silhouette_sample="50"), r"silhouette_sample='50'; fix"),
    (lambda X, G: leiden(G, resolution="1"), r"resolution must be a finite number > 0, got '1'"),
    (lambda X, G: leiden(G, resolution=np.float32(-1)), r"resolution must be a finite number > 0, got -1\.0;"),
    (lambda X, G: kmeans(X, 3, max_points_per_centroid=2.5), r"max_points_per_centroid=2\.5; fix: pass a positive "
                                                             r"whole number of cells, or None"),
    (lambda X, G: kmeans(X, 3, max_points_per_centroid=np.nan), r"max_points_per_centroid=nan; fix"),
    (lambda X, G: kmeans(X, 3, max_points_per_centroid="10"), r"max_points_per_centroid='10'; fix"),
    (lambda X, G: leiden_for_k(G, 301), r"got 301; fix: .*, or k=None for Leiden's own number\.$"),
    (lambda X, G: cluster.cluster_embedding(X, k=301, method="leiden"), r"or k=None for Leiden's own number\.$"),
    (lambda X, G: kmeans(X, 301), r"got 301; fix: .*, or cluster with Leiden, which needs no k\.$"),
    (lambda X, G: leiden(G, n_iterations=0), r"n_iterations=0; fix"),
    (lambda X, G: leiden(G, n_iterations=1.5), r"n_iterations=1\.5; fix"),
    (lambda X, G: leiden(sp.csr_matrix((0, 0))), r"graph has no cells"),
    (lambda X, G: cluster.agreement(np.arange(300) % 3, 3), r"pred must be 1-D with one label per cell"),
    (lambda X, G: cluster.agreement(np.arange(4) % 3, np.arange(300) % 3), r"truth holds 4 labels but pred 300"),
    (lambda X, G: cluster.agreement(np.r_[np.inf, np.ones(299)], np.arange(300) % 3), r"truth contains NaN or "
                                                                                         r"infinite values"),
    (lambda X, G: evaluate(X, np.arange(300) % 3, truth=np.ones(299)), r"truth must be 1-D with one label per cell "
                                                                        r"\(300\)"),
])
def test_clustering_settings_and_labels_of_the_wrong_kind_are_refused_by_name(call, message):
    X, _ = _blobs(300, k=3)
    with pytest.raises((DataError, ValueError), match=message):
        call(X, knn_graph(X, 15))


def test_leiden_for_k_says_the_steps_ran_out_while_bisection_had_not_converged(monkeypatch):
    """A bracket 1% wide after 10 steps was called a skip of k ("another seed may hit it"), where
    more steps found k inside it."""
    G = sp.csr_matrix(np.ones((100, 100)))
    fake, _ = _counting_leiden(lambda r: 38 if 7.2181 < r < 7.2183 else 37 if r < 7.2182 else 39)
    monkeypatch.setattr(cluster, "leiden", fake)
    with pytest.warns(UserWarning, match=r"The search stopped \(max_steps=12\) before closing in on it; more "
                                         r"max_steps may hit it"):
        leiden_for_k(G, 38, max_steps=12)
    labels, resolution = leiden_for_k(G, 38)
    assert len(np.unique(labels)) == 38 and 7.2181 < resolution < 7.2183


def test_settings_of_the_wrong_type_are_named():
    """target_recall="0.9" failed comparing a str and True searched as 1.0; an array of initial
    centroids (sklearn's init=) failed as "the truth value of an array is ambiguous"."""
    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    for recall in ("0.9", True, None):
        with pytest.raises(ValueError, match=rf"^target_recall must be a number in \(0, 1\], got {recall!r}\.$"):
            knn_search(X, 5, index="ivf", target_recall=recall)
    with pytest.raises(ValueError, match=r"^init must be 'k-means\+\+' or 'random' \(initial centroids are not "
                                         r"taken\), got a ndarray\.$"):
        kmeans(X, 3, init=X[:3])
