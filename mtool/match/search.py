"""Candidate search: which pool nodes each query node is rescored against.

- Pools the cost model (costs.py) finds cheaper to score whole: every pool node is a candidate
  (the result equals brute force).
- Larger pools, a *list join*: k-means splits the pool into lists of ~LIST_SIZE nodes; each
  query probes its own nearest lists (per query, as an IVF index does: that is what keeps
  recall above 0.99), *adaptively*: its PROBE_MIN nearest always, then further ones (up to
  PROBE_MAX) only while the list's centroid scores within PROBE_MARGIN x |q|^2 of its best
  list's. A query deep inside a cluster scans few lists, one on a boundary many: on
  benchmarks/match.py (1M nodes) 8.5 lists per query on average reached recall@20 0.9940
  where a fixed 14 reached 0.9907. Then, for a block of queries, every list probed by any of
  them is scored against exactly the queries that probe it with one matrix product (BLAS),
  and a FAISS result heap keeps each query's best `count` by inner product. Lists a query
  ranks first go in first and seed its heap in one partial sort (_seed), so the heap starts
  from good candidates (splitting the later lists into more tiers did not help: smaller
  products, same heap time).
  Probes come from one matrix product of the queries with all centroids and a threshold, not
  a top-PROBE_MAX search. Searching them among a neighbourhood of the query's nearest list
  (the 256 lists a sample of its members probed most) was 1.5x faster but missed 0.24 of a
  query's exact probes on average and cut recall@20 to 0.985 at 1M.
  Measured while building it (population of benchmarks/match.py, 1M nodes): FAISS IndexIVFFlat
  scanning the same lists was ~5x slower per scored pair (no BLAS); grouping queries by
  cluster and scoring the union of their lists needed ~6x more pairs for the same recall (100k
  nodes); a cluster join without per-query probes (one product per cluster against its
  centroid's nearest clusters) reached only 0.947 recall@20; lists of 1024 nodes were slower
  for the same recall; PCA of the vectors to 64 dims cut recall to 0.957.
- On a GPU the same lists and each query's own probes feed a FAISS GPU IVF index
  (`search_preassigned`: its scan is the fast path there; required numeric and multi-value keys
  are then excluded at rescoring only).
Candidates are then rescored exactly by the caller.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

LIST_SIZE = 512  # nodes per k-means list (256 with 16 probes: recall 0.9917 but 1.3x slower at 1M)
PROBE_MIN = 5  # lists every query scans
PROBE_MAX = 24  # lists a query scans at most
# A further list is scanned while its centroid's inner product with the query is at least the
# best list's minus this fraction of |q|^2 (the query's score with itself). Recall@20 / lists
# per query on benchmarks/match.py at 1M (PROBE_MIN 6): 0.16: 0.9940 / 9.1, 0.18: 0.9942 / 10.5;
# with PROBE_MIN 4: 0.10: 0.985 / 4.9, 0.14: 0.9925 / 6.7, 0.16: 0.9940 / 8.0, but 0.9893 on the
# 12,000-node recall test. PROBE_MIN 5 (0.16): 0.9940 / 8.5 at 1M (6% fewer scored pairs than 6),
# 0.9937 on the 12,000-node test as with 6. PROBE_MAX 16: 0.9920, 12: 0.9887 at 1M.
PROBE_MARGIN = 0.16
PROBE_BOUND_LISTS = 32  # lists near a query's best whose PROBE_MIN-th best bounds its own (16: 1.3x more
# candidate lists to sort, 8: 1.8x)
PROBE_ROWS = 2048  # queries a compute thread takes at once
# ...scored against the centroids PROBE_SLICE at a time, into one buffer: the selection's passes
# over the scores then run in cache (2 MB at 2,000 lists), and no fresh pages are faulted in for
# each product. At 1M nodes, per core: 2048 rows at once into fresh arrays, the bound by a sort,
# 11.7 s; 256 rows into a reused buffer, the bound by a partition, 7.8 s (the product itself 6.3 s
# against 4.5 s). The pool's probes at 1M with slices of 256, 512, 1024 rows, alternated, 3 runs
# each on 2 cores: 3.5-3.6, 3.5-3.7, 3.4-4.5 s (no gain from larger slices).
PROBE_SLICE = 256


@dataclass(frozen=True)
class Setting:
    """How wide a query searches: candidates kept per match, and the probe rule's parameters."""

    oversample: int  # candidates per kept match
    probe_min: int
    probe_margin: float
    probe_max: int

    def to_json(self) -> dict:
        return asdict(self)


# The settings a cycle's calibration chooses from, narrowest first (the first is the one tuned
# on benchmarks/match.py). Each step from the third roughly doubles the work per query; the
# second is a half step, because the benchmark's own population sits near 0.99 at the first
# (0.990-0.994 at 1M nodes) and a check that falls short computes the group again at the next.
# A group whose sample recall stays below the target at the widest falls back to exact search
# where the pool is small enough (calibrate.EXACT_FALLBACK_MAX), else ends with a warning.
LADDER = (
    Setting(4, PROBE_MIN, PROBE_MARGIN, PROBE_MAX),
    Setting(6, 6, 0.22, 32),
    Setting(8, 8, 0.30, 48),
    Setting(16, 12, 0.50, 96),
    Setting(32, 24, 1.00, 192),
)
TRAIN_POINTS_PER_LIST = 16  # k-means sample; 40 cost 2.6x the training time for +0.003 recall at 1M
KMEANS_ITERATIONS = 10
SEED = 1234


class ListJoin:
    """The pool split into k-means lists, stored list by list (`order`: pool positions)."""

    def __init__(self, pool_vectors: np.ndarray, device=None, threads: int | None = None):
        """`threads` (default: one per CPU) score the probes. Also keeps `pool_probes`, the
        pool's own probes: in symmetric mode (the pool is the query set) the caller reuses them
        instead of searching every node a second time."""
        import faiss

        # Brute-force FAISS search (k-means' assignment step) uses BLAS only from this many
        # queries up; the wheel's default is far higher.
        faiss.cvar.distance_compute_blas_threshold = 20
        n, d = pool_vectors.shape
        self.threads = threads or os.cpu_count() or 1
        self.nlist = max(1, n // LIST_SIZE)
        self.probe_max = min(PROBE_MAX, self.nlist)  # of pool_probes (the first setting)
        kmeans = faiss.Kmeans(d, self.nlist, niter=KMEANS_ITERATIONS, seed=SEED,
                              max_points_per_centroid=TRAIN_POINTS_PER_LIST, min_points_per_centroid=1)
        rng = np.random.default_rng(SEED)
        kmeans.train(np.ascontiguousarray(
            pool_vectors[np.sort(rng.choice(n, min(n, self.nlist * TRAIN_POINTS_PER_LIST), replace=False))]))
        self.centroid_vectors = kmeans.centroids
        self.centroid_columns = np.ascontiguousarray(self.centroid_vectors.T)  # the probes' product operand
        # each list's nearest lists by centroid inner product: _probe_rows' bound
        centroids = faiss.IndexFlatIP(d)
        centroids.add(self.centroid_vectors)
        _, self.centroid_neighbours = centroids.search(self.centroid_vectors, min(PROBE_BOUND_LISTS, self.nlist))
        self.pool_probes = self.probes(pool_vectors)
        nearest = self.pool_probes[:, 0]
        self.order = np.argsort(nearest, kind="stable")
        self.starts = np.searchsorted(nearest[self.order], np.arange(self.nlist + 1))
        self.vectors = np.take(pool_vectors, self.order, axis=0)  # 2x faster than fancy indexing here
        self.ivf_index = None  # a FAISS IVF index of these lists (the GPU's scan)
        self.presence = None
        self.denominator = None
        if device is not None and device.value == "gpu":
            self.ivf_index = self.faiss_ivf(gpu=True)

    def normalise(self, has: np.ndarray, total: np.ndarray, constant: np.ndarray,
                  denominator: float | None = None) -> None:
        """Score pairs by the formula where nodes lack keys (encode.Presence): the pool's vectors
        were divided by each node's `total`; search() then takes each pair's inner product back to
        the keys both have, adds their constant share and divides by their weights. Per pool
        node, in pool order: `has` (n, K), `total` and `constant` (the constant share of its
        own keys, which its last vector column holds). `denominator`: one for every pair
        (`missing: zero`) instead of the weights of the keys both have."""
        self.denominator = denominator
        self.presence = (np.ascontiguousarray(has[self.order]), total[self.order].astype(np.float32),
                         constant[self.order].astype(np.float32))

    def probes(self, query_vectors: np.ndarray, setting: Setting | None = None, terms=None) -> np.ndarray:
        """(nq, probe_max) lists each query scans, nearest first, -1 past the ones it skips:
        its PROBE_MIN nearest, and those within PROBE_MARGIN x |q|^2 of its nearest, at most
        probe_max. Rows are scored against every centroid (one matrix product per chunk), then
        selected with one comparison and a sort of the few lists above a bound (_probe_rows; a
        FAISS search for the probe_max best cost 2x: its heaps saw ~100 replacements per
        query). Chunks run on a compute_pool."""
        setting = setting or LADDER[0]
        x = np.ascontiguousarray(query_vectors)
        out = np.full((len(x), min(setting.probe_max, self.nlist)), -1, np.int32)
        with compute_pool(self.threads) as pool:
            list(pool.map(lambda at: self._probe_rows(x[at:at + PROBE_ROWS], out[at:at + PROBE_ROWS], setting),
                          range(0, len(x), PROBE_ROWS)))
        return out

    def _probe_rows(self, x: np.ndarray, out: np.ndarray, setting: Setting) -> None:
        """The rule of `probes` without a pass of a heap over all the scores: each row's
        PROBE_MIN-th best score is at least the PROBE_MIN-th best among the centroids nearest
        its best list (`centroid_neighbours`), so every list at or above the rule's threshold
        is among those scoring at least min(that bound, reach). Those few (1.2x the lists kept,
        at 1M nodes) are sorted by row, best first, which gives the exact PROBE_MIN-th best.
        Same lists as the heap it replaces, 7% less probe time at 1M."""
        least, most = min(setting.probe_min, self.nlist), out.shape[1]
        width = self.centroid_neighbours.shape[1]
        buffer = np.empty((min(PROBE_SLICE, len(x)), self.nlist), np.float32)
        for at in range(0, len(x), PROBE_SLICE):
            xs = x[at:at + PROBE_SLICE]
            scores = np.matmul(xs, self.centroid_columns, out=buffer[:len(xs)])
            rows = np.arange(len(xs))
            best_list = scores.argmax(axis=1)
            reach = scores[rows, best_list] - np.float32(setting.probe_margin) * np.einsum("ij,ij->i", xs, xs)
            near = np.take_along_axis(scores, self.centroid_neighbours[best_list], axis=1)
            bound = np.partition(near, width - least, axis=1)[:, width - least]
            row, lst = np.divmod(np.flatnonzero(scores >= np.minimum(bound, reach)[:, None]), self.nlist)
            score = scores[row, lst]
            # best first within each row: rows ascending, scores descending (|score| << 2**20)
            by_row = np.argsort(row * np.float64(2**21) - score, kind="stable")
            row, lst, score = row[by_row], lst[by_row], score[by_row]
            first = np.searchsorted(row, rows)  # each row has at least `least` entries
            place = np.arange(len(row)) - first[row]
            threshold = np.minimum(score[first + least - 1], reach)
            keep = (place < most) & (score >= threshold[row])
            out[at + row[keep], place[keep]] = lst[keep]

    def list_sizes(self) -> np.ndarray:
        """Pool nodes in each list, by list number (probes' numbering)."""
        return np.diff(self.starts)

    def search(self, query_vectors: np.ndarray, probes: np.ndarray, count: int, terms=None,
               allowed=None) -> np.ndarray:
        """(nq, count) each query's best candidates by inner product as positions in list
        order (pool position `order[i]`), -1 where the probed lists hold fewer. `allowed`: a
        RequiredKeys.Queries of the same queries, whose excluded pairs never enter the heap.
        Thread-safe: blocks may run concurrently."""
        if self.ivf_index is not None:  # required keys exclude at rescoring only here
            return self.ivf_search(query_vectors, probes, count)[1]
        heap = result_heap(len(query_vectors), count)
        self.scan(heap, query_vectors, probes, count, terms, allowed=allowed)
        return heap.I.astype(np.int32)  # in heap order, not sorted: the caller rescores them all anyway

    def scan(self, heap, query_vectors: np.ndarray, probes: np.ndarray, count: int, terms=None, affine=None,
             base: int = 0, fresh: bool = True, allowed=None) -> None:
        """Score the probed lists into `heap` (ids: list-order positions + `base`). `affine` (a,
        b), one value per query, maps a row's inner products to a * score + b (PatternJoin: the
        formula's weight and constant for the query and this join's pattern). `fresh`: the heap
        is still empty, so each query's first list may seed it at once (_seed). `allowed`: the
        pairs a required key excludes score below every other pair."""
        nq = len(query_vectors)
        scanned = probes >= 0
        lists = probes[scanned]
        rows = np.broadcast_to(np.arange(nq)[:, None], probes.shape)[scanned]
        later = np.broadcast_to(np.arange(probes.shape[1]) > 0, probes.shape)[scanned]
        key = lists + later * self.nlist  # each query's first list before any later one
        if 2 * self.nlist <= np.iinfo(np.uint16).max:
            key = key.astype(np.uint16)  # NumPy's stable sort of 16-bit keys is a radix sort (4x faster)
        by_key = np.argsort(key, kind="stable")
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(key[by_key])) + 1, [len(by_key)]])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            chunk = by_key[lo:hi]
            lst = lists[chunk[0]]
            a, b = self.starts[lst], self.starts[lst + 1]
            if a == b:
                continue
            r = rows[chunk]
            scores = take_rows(query_vectors, r) @ self.vectors[a:b].T
            if self.presence is not None:  # (q . c + constant of both) / weight of both
                has, total, constant = (x[a:b] for x in self.presence)
                both = terms[1][r] @ has.T
                denominator = both if self.denominator is None else self.denominator
                scores = (scores * total - constant + terms[0][r] @ has.T) / np.where(both > 0, denominator, 1)
                scores[both <= 0] = -np.inf
                scores = scores.astype(np.float32, copy=False)
            if affine is not None:
                scores = (scores * affine[0][r][:, None] + affine[1][r][:, None]).astype(np.float32, copy=False)
            if allowed is not None:
                allowed.exclude(scores, r, a + base, b + base)
            if fresh and key[chunk[0]] < self.nlist and b - a > count:
                _seed(heap, r, scores, a + base, count)
            else:
                # Only rows with a score above their heap's k-th best (its root) can change: at 1M
                # nodes 37% of them per later list. Skipping the rest saved ~2% of search time.
                hit = scores.max(axis=1) > heap.D[r, 0]
                if not hit.all():
                    r, scores = r[hit], scores[hit]
                heap.add_result_subset(r, scores, np.arange(a + base, b + base, dtype=np.int64))

    def faiss_ivf(self, gpu: bool):
        """The same lists as a FAISS IndexIVFFlat (on the GPU where `gpu`): each node added to its
        own list (not assigned again by the quantizer), with its list-order position as id."""
        import faiss

        quantizer = faiss.IndexFlatIP(self.vectors.shape[1])
        quantizer.add(self.centroid_vectors)
        index = faiss.IndexIVFFlat(quantizer, self.vectors.shape[1], self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        lists = np.repeat(np.arange(self.nlist, dtype=np.int64), np.diff(self.starts))
        ids = np.arange(len(self.vectors), dtype=np.int64)
        # add_core, not faiss.contrib's add_preassigned: that one drops its last reference to
        # the ids before FAISS reads them (seen: garbage ids in every list but the first few)
        index.add_core(len(ids), faiss.swig_ptr(self.vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        if gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        return index

    def ivf_search(self, query_vectors: np.ndarray, probes: np.ndarray, count: int):
        """ListJoin.search through the FAISS IVF index: each query scans exactly its own probes
        (its adaptive lists at the calibrated width, -1 past them, which FAISS skips), as the CPU
        join does. Returns (inner products, list-order positions), -1 past the lists' nodes.
        Called from one thread at a time (the GPU path runs its blocks in turn)."""
        from faiss.contrib import ivf_tools

        self.ivf_index.nprobe = probes.shape[1]
        return ivf_tools.search_preassigned(self.ivf_index, np.ascontiguousarray(query_vectors, np.float32), count,
                                            np.ascontiguousarray(probes, np.int64))


PATTERN_MIN = LIST_SIZE  # pool nodes a presence pattern needs for a join of its own


class _Part(NamedTuple):
    """One join of a PatternJoin: its pattern's keys (K,) as 0/1 (None: the rare patterns' join),
    their columns of the vectors, the join, and its first list and first position in the whole."""
    pattern: np.ndarray | None
    columns: np.ndarray | None
    join: "ListJoin"
    first_list: int
    first_position: int


class PatternJoin:
    """The pool split by presence pattern (which keys a node has), for pools where nodes lack
    keys. The formula divides a pair's weighted key scores by the weights of the keys *both*
    nodes have, so no fixed vector's inner product ranks such a pool: a node with one key can
    score 1.0 on it. But for one query and the pool nodes of one pattern, the constant share
    and the denominator are the same for every pair: within a pattern the formula ranks by the
    inner product with the query *restricted to the pattern's columns*, a plain search. Each
    pattern of at least PATTERN_MIN nodes gets its own ListJoin (over its columns only); the
    rare patterns share one join scored pair by pair (ListJoin.normalise). Every join feeds one
    heap per query by the formula's score (`scan`'s affine map), so the best candidates of any
    pattern compete. Measured on the missing-values member of population.FAMILY (30,000 nodes,
    10-30% of each key missing): one normalised join reached recall@20 0.64 at its widest
    setting; see the README for this one. On a GPU each pattern's join is a FAISS IVF index
    (search() says how its results merge); the rare patterns' join is scanned on the CPU."""

    def __init__(self, vectors: np.ndarray, presence, pool: np.ndarray, spans: list, missing_zero: bool,
                 threads: int | None = None, device=None):
        """`vectors`: every node's search vectors (a key's block is zero where the node lacks it);
        `presence`: encode.Presence of every node; `pool`: the pool's node indices; `spans`: each
        key's (start, stop) columns, in `presence`'s key order."""
        has = presence.has[pool] > 0
        patterns, inverse = np.unique(has, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        counts = np.bincount(inverse, minlength=len(patterns))
        self.presence = presence
        self.denominator = float(presence.weight.sum()) if missing_zero else None
        self.parts: list[_Part] = []
        order, rare, first_list = [], [], 0
        for p in np.argsort(-counts, kind="stable"):
            if not patterns[p].any():
                continue  # no key at all: comparable with nobody
            members = np.flatnonzero(inverse == p)
            if counts[p] < PATTERN_MIN:
                rare.append(members)
                continue
            columns = np.concatenate([np.arange(*spans[key]) for key in np.flatnonzero(patterns[p])])
            join = ListJoin(vectors[np.ix_(pool[members], columns)], device, threads)  # GPU: a FAISS IVF index
            self.parts.append(_Part(patterns[p].astype(np.float32), columns, join, first_list, sum(map(len, order))))
            order.append(members[join.order])
            first_list += join.nlist
        if rare:
            members = np.sort(np.concatenate(rare))
            nodes = pool[members]
            join = ListJoin(presence.pool_vectors(vectors, nodes), None, threads)
            join.normalise(presence.has[nodes], presence.total()[nodes], presence.has[nodes] @ presence.constant,
                           self.denominator)
            self.parts.append(_Part(None, None, join, first_list, sum(map(len, order))))
            order.append(members[join.order])
            first_list += join.nlist
        self.order = np.concatenate(order) if order else np.zeros(0, np.int64)
        self.nlist = first_list

    def _query(self, part: _Part, query_vectors):
        if part.pattern is None:
            return self.presence.query_vectors(query_vectors)
        return np.ascontiguousarray(query_vectors[:, part.columns])

    def _affine(self, part, terms):
        """Per query: (1 / weight, constant / weight) of the keys it shares with the part's
        pattern (or with the profile, `missing: zero`); None for the rare patterns' join."""
        pattern = part.pattern
        if pattern is None:
            return None, None
        shared = terms[1] @ pattern
        weight = shared if self.denominator is None else np.full(len(shared), self.denominator, np.float32)
        scale = np.where(shared > 0, 1 / np.where(weight > 0, weight, 1), 0).astype(np.float32)
        return (scale, (terms[0] @ pattern) * scale), shared > 0

    def probes(self, query_vectors: np.ndarray, setting: Setting | None = None, terms=None) -> np.ndarray:
        """Each part's probes side by side (list numbers made global), -1 where a query shares
        no key with the part's pattern."""
        out = []
        has = None if terms is None else terms[1] > 0
        for part in self.parts:
            probes = part.join.probes(self._query(part, query_vectors), setting)
            probes = np.where(probes >= 0, probes + part.first_list, -1).astype(np.int32)
            if part.pattern is not None and has is not None:
                probes[~(has @ (part.pattern > 0))] = -1
            out.append(probes)
        return np.concatenate(out, axis=1) if out else np.zeros((len(query_vectors), 0), np.int32)

    def search(self, query_vectors: np.ndarray, probes: np.ndarray, count: int, terms=None,
               allowed=None) -> np.ndarray:
        """As ListJoin.search, over every part, one heap per query by the formula's score. A part
        with a FAISS IVF index (GPU) gives its own best `count` by inner product, which within a
        part ranks as the formula does (the part's affine map has a positive slope), mapped to
        the formula's score and merged into the heap: the same candidates as scanning it here."""
        heap = result_heap(len(query_vectors), count)
        widths, column = self._widths(probes.shape[1]), 0
        for i, part in enumerate(self.parts):
            pattern, _, join, first_list, first_position = part
            width = widths[i]
            mine = probes[:, column:column + width]
            column += width
            mine = np.where(mine >= 0, mine - first_list, -1)
            affine, shares = self._affine(part, terms)
            if shares is not None:
                mine = np.where(shares[:, None], mine, -1)
            if not (mine >= 0).any():
                continue
            if join.ivf_index is not None:
                inner, found = join.ivf_search(self._query(part, query_vectors), mine, count)
                scores = inner * affine[0][:, None] + affine[1][:, None]
                heap.add_result(np.where(found >= 0, scores, -np.inf).astype(np.float32),
                                np.where(found >= 0, found + first_position, -1))
                continue
            join.scan(heap, self._query(part, query_vectors), mine, count, terms, affine, first_position,
                      fresh=i == 0, allowed=allowed)
        return heap.I.astype(np.int32)

    def list_sizes(self) -> np.ndarray:
        """Pool nodes in each list, by global list number (probes' numbering)."""
        return np.concatenate([part.join.list_sizes() for part in self.parts]) if self.parts else np.zeros(0, np.int64)

    def _widths(self, total: int) -> list:
        """Each part's columns in a probes array `total` wide: min(probe_max, its lists) for the
        setting's probe_max, which `total` determines (the sum grows with it until every part is
        whole, and equal sums mean equal columns)."""
        nlists = [part.join.nlist for part in self.parts]
        for most in range(1, max(nlists, default=0) + 1):
            widths = [min(most, nl) for nl in nlists]
            if sum(widths) == total:
                return widths
        raise ValueError(f"no probe width gives {total} columns over lists {nlists}")

class RequiredKeys:
    """A plan's required numeric and multi-value keys, for its pool in list order: the search
    drops a pair that fails one before the pair reaches the query's heap, so no candidate slot
    goes to a pair the kernel excludes (required categorical keys split the pool instead:
    plans.sides). The kernel's own tests, not a bound: a numeric pair passes when
    1 - |a - b| / scale > 0 in float32 (a node lacking the value passes nothing), a
    multi-value pair when the two sets share an item. On population.FAMILY's strict member
    (100,000 nodes, required age with scale 3 and required interests) the search without this
    needed the fourth width (321 candidates a query) for 0.99."""

    def __init__(self, numeric: list, multi: list):
        self.numeric = numeric  # (every node's values, the pool's values in list order, scale)
        self.multi = multi  # (every node's bitsets, the pool's bitsets in list order)

    @classmethod
    def of(cls, features, pool: np.ndarray) -> "RequiredKeys | None":
        """None where the profile has no required numeric or multi-value key."""
        numeric = [(values, values[pool], np.float32(scale)) for values, scale, _, req in features.numeric if req]
        held = [np.where(has[:, None], bits, np.uint64(0)) for bits, has, _, req in features.multi if req]
        multi = [(bits, np.ascontiguousarray(bits[pool])) for bits in held]
        return cls(numeric, multi) if numeric or multi else None

    def queries(self, nodes: np.ndarray) -> "RequiredKeys.Queries":
        """The filter of one search call, whose query rows are `nodes` (node indices)."""
        return RequiredKeys.Queries([(values[nodes], pool, scale) for values, pool, scale in self.numeric],
                                    [(bits[nodes], pool) for bits, pool in self.multi])

    class Queries(NamedTuple):
        numeric: list
        multi: list

        def exclude(self, scores: np.ndarray, rows: np.ndarray, lo: int, hi: int) -> None:
            """Push the pairs of the query rows and the pool positions lo..hi (list order) that
            a required key excludes below every other score (scores: (len(rows), hi - lo)).
            They are not set to -inf: a masked store of random positions cost 4-5 ns a pair,
            adding EXCLUDED_SHIFT x the failed mask 0.3 ns. A heap with fewer allowed pairs
            than slots may then keep some, which the kernel drops at rescoring.
            |a - b| < scale in float32 is the kernel's 1 - |a - b| / scale > 0 exactly (a
            quotient below 1 never rounds up to 1); a node lacking the value (NaN) fails."""
            for query, pool, scale in self.numeric:
                gap = np.subtract(query[rows][:, None], pool[None, lo:hi])
                np.abs(gap, out=gap)
                passed = gap < scale
                scores += np.logical_not(passed, out=passed) * EXCLUDED_SHIFT
            for query, pool in self.multi:
                q, p = query[rows], pool[lo:hi]
                disjoint = (q[:, 0, None] & p[None, :, 0]) == 0
                for word in range(1, q.shape[1]):  # one word at a time: no (rows, lists, words) temporary
                    disjoint &= (q[:, word, None] & p[None, :, word]) == 0
                scores += disjoint * EXCLUDED_SHIFT


EXCLUDED_SHIFT = np.float32(-1e30)  # added to a pair a required key excludes (|search scores| << 1e30)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 1 << 30  # free memory a process keeps before it gives any back to the kernel
OWN_PAGES_BYTES = 32 << 20  # allocations from this size get their own pages (glibc's maximum)


@functools.cache
def reuse_freed_memory() -> None:
    """Let the engine's many temporaries of a few MB (products, gathered features, sort keys)
    reuse memory freed by the previous ones. With glibc's defaults many of them are mapped
    afresh, or given back to the kernel when freed, and each new one is then faulted in page by
    page. At 1M nodes this cut the kernel's time in page faults from 13.6 s to 5.8 s (both
    cores) and a cycle from 32.8 to 29.8 s (one run each); peak RSS unchanged. Process-wide, for
    the process's life, set once (called by `mtool match` only); a no-op where the C library has
    no mallopt (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(M_MMAP_THRESHOLD, OWN_PAGES_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    except (OSError, AttributeError, TypeError):
        pass


@contextmanager
def compute_pool(threads: int):
    """A thread pool whose threads are the parallelism (NumPy, BLAS and FAISS release the GIL):
    BLAS and FAISS's OpenMP (a per-thread setting) stay at one thread inside it. With their own
    threads on small products and heaps, one block thread ran 4.5x slower at 1M nodes."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1), ThreadPoolExecutor(threads, initializer=faiss.omp_set_num_threads,
                                                  initargs=(1,)) as pool:
        yield pool


_heap_memory = threading.local()


def result_heap(nq: int, count: int):
    """A FAISS ResultHeap (keep_max) of `nq` x `count` on this thread's reused arrays: a search
    batch's heaps are 63 MB at 1M nodes (65,536 x 80), above the size glibc maps afresh for each
    allocation, and a fresh heap's first touches cost up to 90 ms a batch here. The heap's
    arrays are only valid until this thread's next call: searches return a copy of its ids."""
    import faiss

    size = nq * count
    if getattr(_heap_memory, "size", 0) < size:
        _heap_memory.D = np.empty(size, np.float32)
        _heap_memory.I = np.empty(size, np.int64)
        _heap_memory.size = size
    heap = faiss.ResultHeap.__new__(faiss.ResultHeap)
    heap.nq, heap.k = nq, count
    heap.D = _heap_memory.D[:size].reshape(nq, count)
    heap.I = _heap_memory.I[:size].reshape(nq, count)
    heap.heaps = faiss.float_minheap_array_t()
    heap.heaps.k, heap.heaps.nh = count, nq
    heap.heaps.val, heap.heaps.ids = faiss.swig_ptr(heap.D), faiss.swig_ptr(heap.I)
    heap.heaps.heapify()
    return heap


def scanned_pairs(join, probes: np.ndarray) -> int:
    """(query, pool node) pairs the search scans for these probes: the sizes of the lists probed."""
    return int(join.list_sizes()[probes[probes >= 0]].sum())


def take_rows(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """array[index], as a view when `index` is a run of consecutive rows (the queries of one
    list in symmetric mode: their first list's product then needs no gathered copy)."""
    return array[consecutive(index)]


def consecutive(index: np.ndarray):
    """`index` as a slice when it is a run of consecutive integers (indexing, reading or
    writing, then needs no gather), else `index` itself."""
    if len(index) and index[-1] - index[0] == len(index) - 1 and (len(index) < 2 or (np.diff(index) == 1).all()):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _seed(heap, rows, scores, first, count: int) -> None:
    """Fill the (still empty) heaps of `rows` with the best `count` of their first list at once.
    Pushed one by one, about half of a list's 512 scores each replaced the heap's top (~9 us
    per query); each row's threshold (_kth_largest) and one comparison take ~2 us.
    Rows with ties at the threshold go through the heap as before. Ascending order is a valid
    FAISS min-heap."""
    threshold = _kth_largest(scores, count)
    flat = np.flatnonzero(scores >= threshold[:, None])  # row by row: each row's `count` best
    if len(flat) != len(rows) * count:  # some rows have ties at their threshold
        plain = np.count_nonzero(scores >= threshold[:, None], axis=1) == count
        heap.add_result_subset(rows[~plain], scores[~plain], np.arange(first, first + scores.shape[1], dtype=np.int64))
        rows, scores = rows[plain], scores[plain]
        flat = np.flatnonzero(scores >= threshold[plain][:, None])
    # Ascending by score (a valid FAISS min-heap): one SIMD sort of int64 keys, the score's
    # order-preserving int32 above its column; the scores come back from the keys' high bits
    # (an argsort and gathers of the sorted scores took up to 2x as long).
    bits = scores.reshape(-1)[flat].view(np.int32)
    key = (_sortable(bits).astype(np.int64) << 32 | flat % scores.shape[1]).reshape(len(rows), count)
    key.sort(axis=1)
    at = consecutive(rows)
    heap.D[at] = _sortable((key >> 32).astype(np.int32)).view(np.float32)
    heap.I[at] = first + (key & 0xFFFFFFFF)


def _sortable(bits: np.ndarray) -> np.ndarray:
    """float32 bits (as int32) to int32s in the floats' order, and back (it is its own inverse)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _kth_largest(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's k-th largest value. NumPy sorts rows of up to 512 float32 with one SIMD
    network (0.7 us) but a 600-wide row takes 2.7 us: rows are cut into 512-wide pieces,
    each piece's k best kept, and those merged."""
    pieces = [np.sort(scores[:, at:at + 512], axis=1)[:, -k:] for at in range(0, scores.shape[1], 512)]
    best = pieces[0] if len(pieces) == 1 else np.sort(np.concatenate(pieces, axis=1), axis=1)
    return best[:, -k]
