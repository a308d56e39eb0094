"""Exact compatibility of node pairs and deterministic top-K, over any array module.

Pure functions: no I/O, no device flags. `xp` is numpy or cupy, derived from the inputs; only
operations both share are used. A `Features` bundle holds a group's encoded metadata:
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


@dataclass
class Features:
    categorical: list = field(default_factory=list)  # (codes, weight, required)
    numeric: list = field(default_factory=list)  # (values, scale, weight, required)
    multi: list = field(default_factory=list)  # (bitsets, has_key, weight, required)
    embedding: tuple | None = None  # (unit vectors, has, weight)


def array_module(array):
    try:
        import cupy

        return cupy.get_array_module(array)
    except ImportError:
        import numpy

        return numpy


def popcount(words, xp):
    """Set bits summed over the last axis of a uint64 array, via a byte lookup table (works the
    same in NumPy and CuPy, with no dependence on a popcount ufunc)."""
    table = xp.asarray(_POPCOUNT_8)
    return table[words.view(xp.uint8)].sum(axis=-1, dtype=xp.int32).astype(xp.float32)


def _popcount_table():
    import numpy as np

    return np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


_POPCOUNT_8 = _popcount_table()


def pair_scores(f: Features, q, c):
    """Scores (B, C) of queries q (B,) against candidates c (B, C), node indices into f."""
    xp = array_module(c)
    num = xp.zeros(c.shape, dtype=xp.float32)
    den = xp.zeros(c.shape, dtype=xp.float32)
    ok = xp.ones(c.shape, dtype=bool)
    qc = q[:, None]

    def add(score, both, weight, required):
        nonlocal num, den, ok
        num += xp.where(both, score, 0).astype(xp.float32) * weight
        den += both.astype(xp.float32) * weight
        if required:
            ok &= both & (score > 0)

    for codes, weight, required in f.categorical:
        a, b = codes[qc], codes[c]
        both = (a >= 0) & (b >= 0)
        add((a == b).astype(xp.float32), both, weight, required)
    for values, scale, weight, required in f.numeric:
        a, b = values[qc], values[c]
        both = ~xp.isnan(a) & ~xp.isnan(b)
        score = xp.maximum(0.0, 1.0 - xp.abs(xp.nan_to_num(a) - xp.nan_to_num(b)) / scale)
        add(score, both, weight, required)
    for bits, has, weight, required in f.multi:
        a, b = bits[q][:, None, :], bits[c]  # (B, 1, W), (B, C, W)
        inter = popcount(a & b, xp)
        union = popcount(a | b, xp)
        score = xp.where(union > 0, inter / xp.maximum(union, 1), 0)
        add(score, has[qc] & has[c], weight, required)
    if f.embedding is not None:
        vectors, has, weight = f.embedding
        cos = xp.einsum("bd,bcd->bc", vectors[q], vectors[c])
        add((1 + cos) / 2, has[qc] & has[c], weight, False)
    score = xp.where(den > 0, num / xp.maximum(den, 1e-30), 0)
    score = (xp.round(score.astype(xp.float64) * 10**SCORE_DECIMALS) / 10**SCORE_DECIMALS).astype(xp.float32)
    return xp.where(ok, score, xp.float32(EXCLUDED))


def top_k(scores, candidates, rank, k: int):
    """The k best candidates per row: highest score, ties by lower `rank` (the rank of the
    candidate's reference_id in byte order), so every device returns the same answer.
    Returns (indices, scores), each (B, k), with -1 / -inf where fewer than k remain."""
    xp = array_module(scores)
    by_rank = xp.argsort(rank[candidates], axis=1)
    candidates = xp.take_along_axis(candidates, by_rank, axis=1)
    scores = xp.take_along_axis(scores, by_rank, axis=1)
    by_score = xp.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = xp.take_along_axis(candidates, by_score, axis=1)
    best_scores = xp.take_along_axis(scores, by_score, axis=1)
    missing = xp.isinf(best_scores)
    if best.shape[1] < k:  # fewer candidates than k: pad
        pad = k - best.shape[1]
        best = xp.concatenate([best, xp.full((best.shape[0], pad), -1, best.dtype)], axis=1)
        best_scores = xp.concatenate([best_scores, xp.full((best.shape[0], pad), EXCLUDED, xp.float32)], axis=1)
        missing = xp.isinf(best_scores)
    return xp.where(missing, -1, best), best_scores
