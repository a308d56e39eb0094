"""A group's search plans: which pool each query node is matched against, and how.

One plan per search direction: the whole group (symmetric), each side against the other
(bipartite), each split by the values of the required categorical keys (`sides`). Each plan's
pool is scored whole where that costs less (costs.py), else searched through a list join
(search.py) whose width calibrate.py chooses. `work_order` lays the pools out contiguously in
list order, the order the rescoring reads the features in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from mtool.match import calibrate, costs
from mtool.match import encode as enc
from mtool.match.search import ListJoin, PatternJoin, RequiredKeys

if TYPE_CHECKING:
    from mtool.match.staging import Kept


def sides(profile, group, features) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query node indices, pool node indices) pairs: one for symmetric, two for bipartite, each
    split by the values of the required categorical keys. A pair that differs on such a key is
    excluded anyway, so each value is searched on its own and no candidate slot goes to a pair
    the filter drops (a rare value gets its own exact or calibrated search). Nodes lacking a
    required categorical key can match nobody and are in no pair."""
    n = len(group)
    everyone = np.arange(n)
    if profile.bipartite:
        side = np.array(group.metadata[profile.partition.key], dtype=object)
        left = np.flatnonzero(side == profile.partition.left)
        right = np.flatnonzero(side == profile.partition.right)
        sides = [(left, right), (right, left)]
    else:
        sides = [(everyone, everyone)]
    required = [codes for codes, _, req in features.categorical if req]
    if not required:
        return sides
    codes = np.stack(required, axis=1)
    valid = (codes >= 0).all(axis=1)
    _, value = np.unique(codes[valid], axis=0, return_inverse=True)
    bucket = np.full(n, -1, np.int64)
    bucket[valid] = value.reshape(-1)
    out = []
    for v in range(int(bucket.max()) + 1):
        if not profile.bipartite:
            members = np.flatnonzero(bucket == v)
            out.append((members, members))
            continue
        left_v, right_v = left[bucket[left] == v], right[bucket[right] == v]
        if len(left_v) and len(right_v):
            out += [(left_v, right_v), (right_v, left_v)]
    return out


@dataclass
class Plan:
    """One search direction: `queries` (node indices, in processing order) matched against
    `pool` (node indices; in list order when `join` is set). `probes` (None for an exact pool)
    has a row per query in `queries`' order; `offset` is the pool's first row in the work
    order; `level` the search width calibration chose (calibrate.LEVELS)."""
    queries: np.ndarray
    pool: np.ndarray
    join: ListJoin | PatternJoin | None = None
    probes: np.ndarray | None = None
    offset: int = 0
    level: int = calibrate.EXACT
    quality: calibrate.PlanQuality | None = None
    required: RequiredKeys | None = None  # the search's filter of required numeric and multi-value keys
    kept: bool = False  # met the target in the previous pass: its rows are copied from there


def build_plans(opts, profile, group, features, stats: dict, kept: Kept | None = None) -> tuple[list, np.ndarray | None,
                                                                                           object]:
    """The search plans; the search vectors by node where the queries need them (bipartite
    mode, pools split by a required key, nodes lacking keys; for one symmetric pool the join's
    list-order copy serves, 376 MB less at 1M nodes); and the enc.Presence the joins normalise
    with where nodes lack keys (else None). The plans `kept` names build no search: their
    queries keep the previous pass's order, their rows are copied from it. A plan computed
    again takes its lists and probes from stats["search_cache"] (they do not depend on the
    level; at 1M nodes they take 7-10 s)."""
    n = len(group)
    vecs = missing = None  # missing: an enc.Presence where nodes lack keys (else the plain vectors rank right)
    cache = stats.setdefault("search_cache", {"vectors": (None, None), "plans": {}, "samples": {}})
    vecs, missing = cache["vectors"]
    plans = []
    blocks = enc.layout(features)  # computed once: the spans and the vectors share it
    spans = enc.key_spans(features, blocks)
    dims = spans[-1][1] if spans else 0  # of the search vectors
    first = 0  # the plan's first row of the order
    for queries, pool in sides(profile, group, features):
        if len(queries) == 0 or len(pool) == 0:
            continue
        plan = Plan(queries, pool)
        sample = calibrate.sample_size(opts.recall_sample, len(pool))
        first += len(queries)
        if kept is not None and len(plans) in kept.plans:
            plan = Plan(kept.order[first - len(queries):first], pool, kept=True)
        elif len(plans) in cache["plans"]:
            plan = replace(cache["plans"][len(plans)])
        elif not exact_plan(len(queries), len(pool), dims, profile.k, sample + calibrate.calibration_size(sample)):
            t_build = time.monotonic()
            if vecs is None:
                vecs = enc.vectors(profile, features, n, blocks)
                presence = enc.Presence(features, n)
                # nodes lack keys: the formula's constant share and denominator depend on the keys both
                # nodes have, so the pool is searched pattern by pattern (search.PatternJoin)
                if not presence.complete:
                    missing = presence
            if missing is not None:
                join = PatternJoin(vecs, missing, pool, spans, profile.missing == "zero", opts.threads, opts.device)
                probes = join.probes(vecs[queries], None, missing.query_terms(queries))
            else:
                join = ListJoin(vecs if len(pool) == n else vecs[pool], opts.device, opts.threads)  # no copy
                probes = join.pool_probes if queries is pool else join.probes(vecs[queries])
            by_list = np.argsort(probes[:, 0], kind="stable")  # neighbours share lists: cache-friendly blocks
            plan = Plan(queries[by_list], pool[join.order], join, probes[by_list], level=0)
            plan.required = RequiredKeys.of(features, plan.pool)
            cache["plans"][len(plans)] = replace(plan)
            stats["graph_build_s"] = stats.get("graph_build_s", 0.0) + time.monotonic() - t_build
        plans.append(plan)
    whole = len(plans) == 1 and len(plans[0].pool) == n and not profile.bipartite and missing is None
    cache["vectors"] = (None if whole else vecs), missing
    return plans, (None if whole else vecs), missing


def exact_plan(queries: int, pool: int, dims: int, k: int, sample: int) -> bool:
    """Whether a plan scores its whole pool (costs.py: the cheaper path by counted work)."""
    return costs.exact_is_cheaper(queries, pool, dims, k, sample)


def work_order(plans: list, n: int) -> np.ndarray:
    """The nodes renumbered so that each pool is contiguous and in list order (sets each plan's
    offset). A query's candidates (a few lists) are then a few runs of adjacent rows of the
    features: at 1M nodes, gathering them from random rows made rescoring ~4x slower."""
    parts, placed = [], np.zeros(n, bool)
    for plan in plans:
        if not placed[plan.pool].any():  # symmetric: one pool; bipartite: two disjoint ones
            plan.offset = sum(len(w) for w in parts)
            parts.append(plan.pool)
            placed[plan.pool] = True
    return np.concatenate(parts + [np.flatnonzero(~placed)])
