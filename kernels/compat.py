"""Exact compatibility of node pairs and deterministic top-K, over any array module.

Pure functions: no I/O, no device flags. `xp` is numpy or cupy, derived from the inputs; only
operations both share are used, but for the embedding's inner products on the CPU (_cosines).
A `Features` bundle holds a group's encoded metadata:
- categorical keys: int32 codes (N,), -1 where the node lacks the key;
- numeric keys: float32 values (N,), NaN where missing;
- multi-value keys: item sets as bitsets (N, W) uint64 (bit i: item code i), and a has-key
  mask (N,); Jaccard = popcount(a & b) / popcount(a | b);
- embedding: float32 unit vectors (N, D) and a has-embedding mask (N,).
Compatibility of a pair = sum(weight x key score over keys both have) / sum(those weights); a
pair with no key in common scores 0; a pair failing a required key is excluded (-inf).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXCLUDED = float("-inf")
# Scores are rounded to this many decimals before ranking: pairs whose scores are equal in exact
# arithmetic then tie exactly (and break by reference id) on every device, whatever the float
# rounding or fused multiply-adds of the platform.
SCORE_DECIMALS = 6
WHOLE_ROW_SORT_MAX = 512  # top_k sorts rows up to this long whole (the column fits the key's 12 low bits)


@dataclass
class Features:
    categorical: list = field(default_factory=list)  # (codes, weight, required)
    numeric: list = field(default_factory=list)  # (values, scale, weight, required)
    multi: list = field(default_factory=list)  # (bitsets, has_key, weight, required)
    embedding: tuple | None = None  # (unit vectors, has, weight)
    missing_zero: bool = False  # profile `missing: zero`: a key either node lacks scores 0, its weight kept

    def take(self, index) -> "Features":
        """The nodes `index` (an array of node indices) as a new bundle, in that order. The
        engine renumbers a pool list by list with it, so that a query's candidates (a few
        lists) are read from a few contiguous rows instead of all over memory: gathering
        64-dim embeddings at random positions of a 1M-node group cost ~215 ns per pair."""
        return Features(
            [(codes[index], w, r) for codes, w, r in self.categorical],
            [(values[index], s, w, r) for values, s, w, r in self.numeric],
            [(bits[index], has[index], w, r) for bits, has, w, r in self.multi],
            None if self.embedding is None else  # take: NumPy's fancy indexing of rows is 2x slower
            (array_module(index).take(self.embedding[0], index, axis=0), self.embedding[1][index], self.embedding[2]),
            self.missing_zero)


def array_module(array):
    try:
        import cupy

        return cupy.get_array_module(array)
    except ImportError:
        import numpy

        return numpy


def popcount(words, xp):
    """Set bits summed over the last axis of a uint64 array: the bitwise_count ufunc where the
    array module has one (NumPy 2, recent CuPy), else a byte lookup table (same result)."""
    if hasattr(xp, "bitwise_count"):
        return xp.bitwise_count(words).sum(axis=-1, dtype=xp.int32).astype(xp.float32)
    table = xp.asarray(_POPCOUNT_8)
    return table[words.view(xp.uint8)].sum(axis=-1, dtype=xp.int32).astype(xp.float32)


def _popcount_table():
    import numpy as np

    return np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


_POPCOUNT_8 = _popcount_table()


def prepare(f: Features, xp):
    """Per-bundle facts computed once, not per call: whether each key has gaps (a key every
    node has needs no per-pair mask) and the item count of each multi-value set."""
    cached = f.__dict__.get("_derived")
    if cached is None:
        cached = {
            "cat_gaps": [bool((codes < 0).any()) for codes, _, _ in f.categorical],
            "num_gaps": [bool(xp.isnan(values).any()) for values, _, _, _ in f.numeric],
            "multi_gaps": [not bool(has.all()) for _, has, _, _ in f.multi],
            "multi_sizes": [popcount(bits, xp) for bits, _, _, _ in f.multi],
            "emb_gaps": f.embedding is not None and not bool(f.embedding[1].all()),
        }
        f.__dict__["_derived"] = cached
    return cached


def pair_scores(f: Features, q, c):
    """Scores (B, C) of queries q (B,) against candidates c (B, C), node indices into f."""
    xp = array_module(c)
    d = prepare(f, xp)
    full = c
    if c.ndim == 2 and len(c) > 1 and c.strides[0] == 0:
        # Every query against the same candidates (the exact path's whole pool, broadcast): the
        # candidates' features are gathered once, not once per query (the same arithmetic).
        c = c[:1]
    num = xp.zeros(full.shape, dtype=xp.float32)
    den = xp.zeros(full.shape, dtype=xp.float32)  # weights of keys only some pairs share
    den_all = 0.0  # weights of keys every pair shares
    ok = None
    qc = q[:, None]

    def add(score, both, weight, required):
        nonlocal num, den, den_all, ok
        if both is None:
            num += score * xp.float32(weight)
            den_all += weight
        else:
            num += xp.where(both, score, xp.float32(0)) * xp.float32(weight)
            den += both.astype(xp.float32) * xp.float32(weight)
        if required:
            passed = score > 0 if both is None else both & (score > 0)
            ok = passed if ok is None else ok & passed

    for (codes, weight, required), gaps in zip(f.categorical, d["cat_gaps"]):
        a, b = codes[qc], codes[c]
        add((a == b).astype(xp.float32), ((a >= 0) & (b >= 0)) if gaps else None, weight, required)
    for (values, scale, weight, required), gaps in zip(f.numeric, d["num_gaps"]):
        a, b = values[qc], values[c]
        if gaps:
            both = ~xp.isnan(a) & ~xp.isnan(b)
            a, b = xp.nan_to_num(a), xp.nan_to_num(b)
        else:
            both = None
        score = xp.maximum(xp.float32(0), xp.float32(1) - xp.abs(a - b) / xp.float32(scale))
        add(score, both, weight, required)
    for (bits, has, weight, required), gaps, sizes in zip(f.multi, d["multi_gaps"], d["multi_sizes"]):
        inter = popcount(bits[q][:, None, :] & bits[c], xp)  # (B, C)
        union = sizes[qc] + sizes[c] - inter
        score = inter / xp.maximum(union, xp.float32(1))  # 0 where both sets are empty
        add(score, (has[qc] & has[c]) if gaps else None, weight, required)
    if f.embedding is not None:
        vectors, has, weight = f.embedding
        if c is full:
            cos = _cosines(vectors, q, full, xp)
        else:  # one candidate row for every query: one matrix product (BLAS), 10x faster per pair
            cos = vectors[q] @ vectors[c[0]].T
        add((1 + cos) / 2, (has[qc] & has[c]) if d["emb_gaps"] else None, weight, False)
    den = den + xp.float32(den_all)
    shared = den  # the weights of the keys both nodes have
    if f.missing_zero:  # every key the profile names counts, had or not
        den = xp.float32(total_weight(f))
    score = xp.where(den > 0, num / xp.maximum(den, xp.float32(1e-30)), xp.float32(0))
    score = (xp.round(score.astype(xp.float64) * 10**SCORE_DECIMALS) / 10**SCORE_DECIMALS).astype(xp.float32)
    # A pair with no key in common was not compared: not a candidate (never a score-0 edge).
    comparable = shared > 0 if den_all == 0 else None
    ok = comparable if ok is None else (ok if comparable is None else ok & comparable)
    return score if ok is None else xp.where(ok, score, xp.float32(EXCLUDED))


def total_weight(f: Features) -> float:
    """The weights of every key of the profile (the denominator of `missing: zero`)."""
    return (sum(w for _, w, _ in f.categorical) + sum(w for _, _, w, _ in f.numeric)
            + sum(w for _, _, w, _ in f.multi) + (f.embedding[2] if f.embedding is not None else 0.0))


def _cosines(vectors, q, c, xp):
    """Inner products (B, C) of the unit vectors of q (B,) and c (B, C). On the CPU FAISS
    computes them in place (`fvec_inner_products_by_idx`): gathering the candidates' rows
    first, as einsum needs, took 2x as long. Elsewhere (CuPy, or vectors FAISS cannot read in
    place), einsum: the same products, summed in another order (the scores' rounding to
    SCORE_DECIMALS absorbs the difference but at its boundaries)."""
    if xp.__name__ == "numpy" and vectors.flags.c_contiguous and vectors.dtype == xp.float32:
        import faiss
        import numpy as np

        out = np.empty(c.shape, np.float32)
        xq = np.ascontiguousarray(vectors[q])
        ids = np.ascontiguousarray(c, dtype=np.int64)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(xq), faiss.swig_ptr(vectors),
                                         faiss.swig_ptr(ids), vectors.shape[1], len(xq), c.shape[1])
        return out
    return xp.einsum("bd,bcd->bc", vectors[q], vectors[c])


def top_k(scores, candidates, rank, k: int):
    """The k best candidates per row: highest score, ties by lower `rank` (the rank of the
    candidate's reference_id in byte order), so every device returns the same answer.
    Returns (indices, scores), each (B, k), with -1 / -inf where fewer than k remain.

    One sort key per pair: scores are rounded to SCORE_DECIMALS in [0, 1], so the score in
    millionths (descending) and the rank fit one 64-bit integer. Short rows (the approximate
    path's candidates) sort it whole; long ones (the exact path's) partition it first."""
    xp = array_module(scores)
    units = 10**SCORE_DECIMALS
    excluded = xp.isinf(scores)
    behind = xp.where(excluded, units + 1, units - xp.rint(scores.astype(xp.float64) * units)).astype(xp.int64)
    columns = scores.shape[1]
    if columns <= WHOLE_ROW_SORT_MAX:
        # The column packed below score and rank (20 + 32 + 12 bits): one SIMD sort of the row
        # (0.44 us at 81 candidates) where a partition and an argsort of the k best took 2.2 us.
        key = (behind.astype(xp.uint64) << 44) | (rank[candidates].astype(xp.uint64) << 12) | \
            xp.arange(columns, dtype=xp.uint64)
        key.sort(axis=1)
        by_key = (key[:, :k] & 0xFFF).astype(xp.int64)
    else:
        key = (behind << 32) | rank[candidates].astype(xp.int64)
        if key.shape[1] > k:
            part = xp.argpartition(key, k - 1, axis=1)[:, :k]
            key_k = xp.take_along_axis(key, part, axis=1)
            by_key = xp.take_along_axis(part, xp.argsort(key_k, axis=1), axis=1)
        else:
            by_key = xp.argsort(key, axis=1)
    best = xp.take_along_axis(candidates, by_key, axis=1)
    best_scores = xp.take_along_axis(scores, by_key, axis=1)
    if best.shape[1] < k:  # fewer candidates than k: pad
        pad = k - best.shape[1]
        best = xp.concatenate([best, xp.full((best.shape[0], pad), -1, best.dtype)], axis=1)
        best_scores = xp.concatenate([best_scores, xp.full((best.shape[0], pad), EXCLUDED, xp.float32)], axis=1)
    return xp.where(xp.isinf(best_scores), -1, best), best_scores
