"""Exact rescoring: the compatibility kernel over a query's candidates (or its whole pool), and
its deterministic top K. Shared by the cycle's blocks and by the recall check (calibrate.py)."""

from __future__ import annotations

import numpy as np

from mtool.kernels import compat

PAIR_BUDGET = 2_000_000  # query x candidate pairs scored at once: bounds memory per block
RESCORE_ROWS = 1024  # queries rescored at once: keeps the gathered candidate features in cache
SCAN_QUERIES = 64  # pool_top_k: queries scored against each slice of a large pool at once
# pool_top_k's slices: the kernel's ~30 passes over a slice's scores then run in the core's cache
# (a 2 MB slice of float32); at 1M nodes, 64 queries, one core: 17-18 ns a pair at 250k-1M
# pairs a slice against 20-21.5 at 2M.
SCAN_PAIRS = 500_000


def top_k_for(queries, found, offset, pool_size, features, rank, k, xp, symmetric):
    """Top-K of `queries` (work positions) among their candidates: the whole pool (the rows
    offset..offset+pool_size) when `found` is None, else `found`, list-order positions in the
    pool (-1: none). Returns work positions and scores."""
    from mtool.device import to_host

    nbs, scs = [], []
    if found is None and pool_size > PAIR_BUDGET // max(1, min(len(queries), SCAN_QUERIES)):
        return pool_top_k(queries, offset, pool_size, features, rank, k, xp, symmetric)
    if found is None:
        step = max(1, PAIR_BUDGET // max(1, pool_size))
        pool = xp.arange(offset, offset + pool_size)
        for s in range(0, len(queries), step):
            q = xp.asarray(queries[s:s + step])
            nb, sc = _rescore(q, xp.broadcast_to(pool[None, :], (len(q), pool_size)), features, rank, k, xp, symmetric)
            nbs.append(to_host(nb))
            scs.append(to_host(sc))
        return np.concatenate(nbs), np.concatenate(scs)
    # Sorted by row, each query reads its candidates' features in address order (3x faster).
    cand = np.sort(np.where(found >= 0, offset + found, -1), axis=1)
    for s in range(0, len(queries), RESCORE_ROWS):
        nb, sc = _rescore(xp.asarray(queries[s:s + RESCORE_ROWS]), xp.asarray(cand[s:s + RESCORE_ROWS]), features,
                          rank, k, xp, symmetric)
        nbs.append(to_host(nb))
        scs.append(to_host(sc))
    return np.concatenate(nbs), np.concatenate(scs)


def _rescore(q, c, features, rank, k, xp, symmetric):
    missing = c < 0
    c = xp.where(missing, 0, c)
    if xp is not np and not features.multi:  # GPU: the fused CUDA kernel, same formula and rounding
        from mtool.kernels.cuda import pair_scores_gpu

        scores = pair_scores_gpu(features, q, c)
    else:
        scores = compat.pair_scores(features, q, c)
    excluded = missing | (c == q[:, None]) if symmetric else missing
    scores = xp.where(excluded, xp.float32(compat.EXCLUDED), scores)
    return compat.top_k(scores, c, rank, k)


def work_features_on(features, work, xp):
    """The features in work order on the device, with compat's per-bundle facts computed once
    (before the block threads share them)."""
    taken = _to_device(features.take(work), xp)
    compat.prepare(taken, xp)
    return taken


def _to_device(f, xp):
    if xp is np:
        return f
    return compat.Features(
        [(xp.asarray(c), w, r) for c, w, r in f.categorical],
        [(xp.asarray(v), s, w, r) for v, s, w, r in f.numeric],
        [(xp.asarray(i), xp.asarray(h), w, r) for i, h, w, r in f.multi],
        None if f.embedding is None else (xp.asarray(f.embedding[0]), xp.asarray(f.embedding[1]), f.embedding[2]),
        f.missing_zero)


def pool_top_k(queries, offset, pool_size, features, rank, k, xp, symmetric):
    """The exact top K of a few queries (the recall check's samples) over a pool too large to
    score against one query at a time cheaply: the pool is scanned in column slices, each
    scored against SCAN_QUERIES queries at once (the embedding's cosines as one matrix product,
    the slice's features gathered once), and a query keeps from a slice only the pairs that
    reach its K-th best so far (one comparison; the few kept are merged with compat.top_k, so
    ties are broken by rank exactly as a whole-row top K would). One query against the whole
    pool at a time took 63 ns a pair at 1M nodes; this takes ~11 (benchmarks/match.py
    population, one thread). Rejected: skipping pairs whose score bound from their cosine alone
    (every other key scoring 1) is below the K-th best. It left 8% of the pairs, but gathering
    those for the rest of the kernel cost more than scoring every pair in place (12.8 ns a pair)."""
    from mtool.device import to_host

    nbs, scs = [], []
    for at in range(0, len(queries), SCAN_QUERIES):
        q = xp.asarray(queries[at:at + SCAN_QUERIES])
        best_nb = xp.full((len(q), k), -1, xp.int64)
        best_sc = xp.full((len(q), k), compat.EXCLUDED, xp.float32)
        width = max(1024, SCAN_PAIRS // len(q))
        for lo in range(offset, offset + pool_size, width):
            cols = xp.arange(lo, min(offset + pool_size, lo + width))
            scores = compat.pair_scores(features, q, xp.broadcast_to(cols[None, :], (len(q), len(cols))))
            # Only the pairs reaching the K-th best so far, as flat positions (a 2-D nonzero and a
            # masked copy of the slice for the query itself took half the scan's time).
            least = best_sc[:, -1:]
            if len(cols) > k + 1 and bool(xp.isinf(least).any()):
                # A query with fewer than K so far (the first slice): the slice's own K-th best
                # bounds what it keeps (K+1-th where the query itself may be among them), so
                # that the merge sorts a few pairs, not the whole slice (at 1M nodes those
                # 31,250-wide merges were 1.6 of the samples' 5.7 thread-seconds).
                th = k + 1 if symmetric else k
                at = len(cols) - th
                least = xp.maximum(least, xp.partition(scores, at, axis=1)[:, at:at + 1])
            flat = xp.flatnonzero((scores >= least) & ~xp.isinf(scores))  # ties: top_k decides
            row, col = xp.divmod(flat, len(cols))
            score = scores.reshape(-1)[flat]
            if symmetric:  # not the query itself
                kept = cols[col] != q[row]
                row, col, score = row[kept], col[kept], score[kept]
            if len(row) == 0:
                continue
            counts = xp.bincount(row, minlength=len(q))
            place = xp.arange(len(row)) - (xp.cumsum(counts) - counts)[row]
            width_kept = int(counts.max())
            cand = xp.full((len(q), width_kept), -1, xp.int64)
            cand_sc = xp.full((len(q), width_kept), compat.EXCLUDED, xp.float32)
            cand[row, place] = cols[col]
            cand_sc[row, place] = score
            merged = xp.concatenate([best_nb, cand], axis=1)
            best_nb, best_sc = compat.top_k(xp.concatenate([best_sc, cand_sc], axis=1), xp.maximum(merged, 0), rank, k)
        nbs.append(to_host(best_nb))
        scs.append(to_host(best_sc))
    return np.concatenate(nbs), np.concatenate(scs)
