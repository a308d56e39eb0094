"""Candidate search: which pool nodes each query node is rescored against.

- Pools up to EXACT_MAX nodes: every pool node is a candidate (the result equals brute force).
- Larger pools, a *list join*: k-means splits the pool into lists of ~LIST_SIZE nodes; each
  query probes its own nearest lists (per query, as an IVF index does: that is what keeps
  recall above 0.99), *adaptively*: its PROBE_MIN nearest always, then further ones (up to
  PROBE_MAX) only while the list's centroid scores within PROBE_MARGIN x |q|^2 of its best
  list's. A query deep inside a cluster scans few lists, one on a boundary many: on
  benchmarks/match.py (1M nodes) 9.1 lists per query on average reached recall@20 0.9940
  where a fixed 14 reached 0.9907. Then, for a block of queries, every list probed by any of
  them is scored against exactly the queries that probe it with one matrix product (BLAS),
  and a FAISS result heap keeps each query's best `count` by inner product. Lists a query
  ranks first go in first, so the heaps fill with good candidates early (splitting the later
  lists into more tiers did not help: smaller products, same heap time).
  Measured while building it (population of benchmarks/match.py, 1M nodes): FAISS IndexIVFFlat
  scanning the same lists was ~5x slower per scored pair (no BLAS); grouping queries by
  cluster and scoring the union of their lists needed ~6x more pairs for the same recall (100k
  nodes); a cluster join without per-query probes (one product per cluster against its
  centroid's nearest clusters) reached only 0.947 recall@20; lists of 1024 nodes were slower
  for the same recall; PCA of the vectors to 64 dims cut recall to 0.957.
- On a GPU the same lists and probes feed a FAISS GPU IVF index (its scan is the fast path there).
Candidates are then rescored exactly by the caller.
"""

from __future__ import annotations

import numpy as np

EXACT_MAX = 4_000  # pools up to this size: all pairs, rescored exactly
LIST_SIZE = 512  # nodes per k-means list (256 with 16 probes: recall 0.9917 but 1.3x slower at 1M)
PROBE_MIN = 6  # lists every query scans
PROBE_MAX = 24  # lists a query scans at most
# A further list is scanned while its centroid's inner product with the query is at least the
# best list's minus this fraction of |q|^2 (the query's score with itself). Recall@20 / lists
# per query on benchmarks/match.py at 1M (PROBE_MIN 6): 0.16: 0.9940 / 9.1, 0.18: 0.9942 / 10.5;
# with PROBE_MIN 4: 0.10: 0.985 / 4.9, 0.14: 0.9925 / 6.7. PROBE_MIN 4 failed the 12,000-node
# recall test (0.989); PROBE_MAX 16: 0.9920, 12: 0.9887 at 1M.
PROBE_MARGIN = 0.16
TRAIN_POINTS_PER_LIST = 16  # k-means sample; 40 cost 2.6x the training time for +0.003 recall at 1M
KMEANS_ITERATIONS = 10
SEED = 1234


class ListJoin:
    """The pool split into k-means lists, stored list by list (`order`: pool positions)."""

    def __init__(self, pool_vectors: np.ndarray, device=None):
        """Also keeps `pool_probes`, the pool's own probes: in symmetric mode (the pool is the
        query set) the caller reuses them instead of searching every node a second time."""
        import faiss

        # Brute-force FAISS search uses BLAS only from this many queries up; the wheel's default is
        # far higher, and the centroid search below is 2x faster with BLAS.
        faiss.cvar.distance_compute_blas_threshold = 20
        n, d = pool_vectors.shape
        self.nlist = max(1, n // LIST_SIZE)
        self.probe_max = min(PROBE_MAX, self.nlist)
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
        """(nq, probe_max) lists each query scans, nearest first, -1 past the ones it skips."""
        x = np.ascontiguousarray(query_vectors)
        scores, lists = self.centroids.search(x, self.probe_max)
        reach = scores[:, :1] - np.float32(PROBE_MARGIN) * np.einsum("ij,ij->i", x, x)[:, None]
        skip = scores < reach
        skip[:, :PROBE_MIN] = False
        lists[skip] = -1
        return lists

    def search(self, query_vectors: np.ndarray, probes: np.ndarray, count: int) -> np.ndarray:
        """(nq, count) each query's best candidates by inner product as positions in list
        order (pool position `order[i]`), -1 where the probed lists hold fewer. Thread-safe:
        blocks may run concurrently."""
        import faiss

        if self.gpu_index is not None:
            _, found = self.gpu_index.search(np.ascontiguousarray(query_vectors), count)
            return found
        nq = len(query_vectors)
        heap = faiss.ResultHeap(nq, count, keep_max=True)
        scanned = probes >= 0
        lists = probes[scanned]
        rows = np.broadcast_to(np.arange(nq)[:, None], probes.shape)[scanned]
        later = np.broadcast_to(np.arange(probes.shape[1]) > 0, probes.shape)[scanned]
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
        return heap.I  # in heap order, not sorted: the caller rescores them all anyway

    def _gpu_ivf(self, d):
        import faiss

        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(self.centroids.reconstruct_n(0, self.nlist))
        index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        index.add_with_ids(self.vectors, np.arange(len(self.vectors), dtype=np.int64))  # list-order ids
        index.nprobe = self.probe_max  # FAISS GPU takes one nprobe for all queries
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
