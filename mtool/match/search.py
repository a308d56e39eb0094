"""Candidate search: which pool nodes each query node is rescored against.

- Pools up to EXACT_MAX nodes: every pool node is a candidate (the result equals brute force).
- Larger pools: a FAISS IVF index over the encoded vectors (inner product; ~4 sqrt(n) lists
  trained by k-means on a sample; NPROBE lists scanned per query), on the GPU when the device
  is one. Queries are processed grouped by their nearest list (`assign`) for cache locality.
  Measured here: at 100k nodes a cluster join (one matrix product per query cluster against its
  centroid's nearest clusters) was 1.7x faster but reached only 0.965 recall@20; probing each
  query's own nearest lists, as IVF does, is what keeps recall above 0.99.
Candidates are then rescored exactly by the caller.
"""

from __future__ import annotations

import numpy as np

EXACT_MAX = 4_000  # pools up to this size: all pairs, rescored exactly
NPROBE = 24
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 points per centroid
KMEANS_ITERATIONS = 10
SEED = 1234


class CandidateIndex:
    def __init__(self, pool_vectors: np.ndarray, device=None, threads: int | None = None, nprobe: int | None = None):
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        n, d = pool_vectors.shape
        nlist = max(1, int(4 * np.sqrt(n)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = SEED
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        rng = np.random.default_rng(SEED)
        index.train(np.ascontiguousarray(pool_vectors[rng.choice(n, min(n, nlist * TRAIN_POINTS_PER_LIST),
                                                                  replace=False)]))
        index.add(pool_vectors)
        index.nprobe = min(nprobe or NPROBE, nlist)
        self.quantizer = quantizer
        if device is not None and device.value == "gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        self.index = index

    def assign(self, query_vectors: np.ndarray) -> np.ndarray:
        """Nearest list of each query: the processing order groups queries by it."""
        _, c = self.quantizer.search(np.ascontiguousarray(query_vectors), 1)
        return c[:, 0]

    def search(self, query_vectors: np.ndarray, clusters, count: int, xp=None) -> np.ndarray:
        _, ids = self.index.search(np.ascontiguousarray(query_vectors), count)
        return ids
