"""Candidate search: which pool nodes each query node is rescored against.

- Pools up to EXACT_MAX nodes: every pool node is a candidate (the result equals brute force).
- Larger pools, a *list join*: k-means splits the pool into lists of ~LIST_SIZE nodes; each
  query probes its NPROBE nearest lists (per query, as an IVF index does: that is what keeps
  recall above 0.99); then, for a block of queries, every list probed by any of them is scored
  against exactly the queries that probe it with one matrix product (BLAS), and a FAISS result
  heap keeps each query's best `count` by inner product. Lists a query ranks first go in first,
  so the heaps fill with good candidates early and later lists are mostly rejected.
  Measured while building it (population of benchmarks/match.py, 1M nodes): FAISS IndexIVFFlat
  scanning the same lists was ~5x slower per scored pair (no BLAS); grouping queries by cluster
  and scoring the union of their lists needed ~6x more pairs for the same recall (100k nodes); a cluster join without per-query probes (one
  product per cluster against its centroid's nearest clusters) reached only 0.947 recall@20.
- On a GPU the same lists and probes feed a FAISS GPU IVF index (its scan is the fast path there).
Candidates are then rescored exactly by the caller.
"""

from __future__ import annotations

import numpy as np

EXACT_MAX = 4_000  # pools up to this size: all pairs, rescored exactly
LIST_SIZE = 512  # nodes per k-means list (256 with 16 probes: recall 0.9917 but 1.3x slower at 1M)
NPROBE = 14  # lists each query scans: recall@20 0.9907 at 1M nodes on benchmarks/match.py (10: 0.9857)
TRAIN_POINTS_PER_LIST = 16  # k-means sample; 40 cost 2.6x the training time for +0.003 recall at 1M
KMEANS_ITERATIONS = 10
SEED = 1234


class ListJoin:
    """The pool split into k-means lists, stored list by list (`order`: pool positions)."""

    def __init__(self, pool_vectors: np.ndarray, device=None, nprobe: int | None = None):
        """Also keeps `pool_probes`, the pool's own probes: in symmetric mode (the pool is the
        query set) the caller reuses them instead of searching every node a second time."""
        import faiss

        # Brute-force FAISS search uses BLAS only from this many queries up; the wheel's default is
        # far higher, and the centroid search below is 2x faster with BLAS.
        faiss.cvar.distance_compute_blas_threshold = 20
        n, d = pool_vectors.shape
        self.nlist = max(1, n // LIST_SIZE)
        self.nprobe = min(nprobe or NPROBE, self.nlist)
        kmeans = faiss.Kmeans(d, self.nlist, niter=KMEANS_ITERATIONS, seed=SEED,
                              max_points_per_centroid=TRAIN_POINTS_PER_LIST, min_points_per_centroid=1)
        rng = np.random.default_rng(SEED)
        kmeans.train(np.ascontiguousarray(
            pool_vectors[np.sort(rng.choice(n, min(n, self.nlist * TRAIN_POINTS_PER_LIST), replace=False))]))
        self.centroids = faiss.IndexFlatIP(d)
        self.centroids.add(kmeans.centroids)
        self.pool_probes = self.probes(pool_vectors)
        nearest = self.pool_probes[:, 0]
        self.order = np.argsort(nearest, kind="stable")
        self.starts = np.searchsorted(nearest[self.order], np.arange(self.nlist + 1))
        self.vectors = np.ascontiguousarray(pool_vectors[self.order])
        self.gpu_index = None
        if device is not None and device.value == "gpu":
            self.gpu_index = self._gpu_ivf(d)

    def probes(self, query_vectors: np.ndarray) -> np.ndarray:
        """(nq, nprobe) lists each query scans, nearest first."""
        _, lists = self.centroids.search(np.ascontiguousarray(query_vectors), self.nprobe)
        return lists

    def search(self, query_vectors: np.ndarray, probes: np.ndarray, count: int) -> np.ndarray:
        """(nq, count) pool positions of each query's best candidates by inner product, -1
        where the probed lists hold fewer. Thread-safe: blocks may run concurrently."""
        import faiss

        if self.gpu_index is not None:
            _, found = self.gpu_index.search(np.ascontiguousarray(query_vectors), count)
            return found
        nq = len(query_vectors)
        heap = faiss.ResultHeap(nq, count, keep_max=True)
        lists = probes.ravel()
        rows = np.repeat(np.arange(nq), probes.shape[1])
        later = np.tile(np.arange(probes.shape[1]) > 0, nq)
        key = lists + later * self.nlist  # each query's first list before any later one
        by_key = np.argsort(key, kind="stable")
        cuts = np.flatnonzero(np.diff(key[by_key])) + 1
        for chunk in np.split(by_key, cuts):
            lst = lists[chunk[0]]
            a, b = self.starts[lst], self.starts[lst + 1]
            if a == b:
                continue
            r = rows[chunk]
            heap.add_result_subset(r, query_vectors[r] @ self.vectors[a:b].T, np.arange(a, b, dtype=np.int64))
        heap.finalize()
        found = heap.I
        return np.where(found >= 0, self.order[np.maximum(found, 0)], -1)

    def _gpu_ivf(self, d):
        import faiss

        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(self.centroids.reconstruct_n(0, self.nlist))
        index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        index.add_with_ids(self.vectors, self.order.astype(np.int64))
        index.nprobe = self.nprobe
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
