"""Candidate search: which pool nodes each query node is rescored against.

Small pools are searched exactly (every pool node is a candidate, so the result equals brute
force); larger ones with FAISS over the encoded vectors: exact inner-product search up to
FLAT_MAX nodes, an IVF index above (nlist ~ 4 sqrt(n), nprobe NPROBE), on the GPU when the
device is one. Returns candidate indices into the pool, -1 where FAISS found fewer."""

from __future__ import annotations

import numpy as np

EXACT_MAX = 4_000  # pools up to this size: all pairs, rescored exactly
FLAT_MAX = 50_000  # up to this size: FAISS exact inner-product search
NPROBE = 32


class CandidateIndex:
    def __init__(self, pool_vectors: np.ndarray, device, threads: int | None = None):
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        n, d = pool_vectors.shape
        if n <= FLAT_MAX:
            index = faiss.IndexFlatIP(d)
        else:
            nlist = int(4 * np.sqrt(n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = pool_vectors[np.random.default_rng(0).choice(n, min(n, nlist * 64), replace=False)]
            index.train(sample)
            index.nprobe = NPROBE
        if device.value == "gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(pool_vectors)
        self.index = index

    def search(self, query_vectors: np.ndarray, count: int) -> np.ndarray:
        _, ids = self.index.search(query_vectors, count)
        return ids
