"""Exact rescoring: the compatibility kernel over a query's candidates (or its whole pool), and
its deterministic top K. Shared by the cycle's blocks and by the recall check (calibrate.py)."""

from __future__ import annotations

import numpy as np

from mtool.kernels import compat

PAIR_BUDGET = 2_000_000  # query x candidate pairs scored at once: bounds memory per block
RESCORE_ROWS = 1024  # queries rescored at once: keeps the gathered candidate features in cache


def top_k_for(queries, found, offset, pool_size, features, rank, k, xp, symmetric):
    """Top-K of `queries` (work positions) among their candidates: the whole pool (the rows
    offset..offset+pool_size) when `found` is None, else `found`, list-order positions in the
    pool (-1: none). Returns work positions and scores."""
    from mtool.device import to_host

    nbs, scs = [], []
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
