"""Recall that a cycle measures and keeps, on whatever population it is given.

For every approximate search plan (costs.py chose the search), two independent samples of its
queries are drawn (seeded: the same inputs draw the same nodes) and their exact top K is
computed by the compatibility kernel over the whole pool (required keys and sides honoured):
- calibration: sample A is searched at each width of `LEVELS` in turn, narrowest first, and the
  first whose recall on A reaches the target is kept for the whole plan;
- verification: after the plan's blocks are computed, sample B's delivered matches are compared
  with their exact top K. That is the estimate the cycle records, with a 95% lower bound (from
  the spread between the sample's queries: recall_bounds). Where the target lies within that
  estimate's 95% interval (`ambiguous`), the check adds queries (confirmation_sample) as far as
  costs.confirmation_queries allows, and the estimate is over both. When it falls short
  of the target and a wider level is allowed, the engine computes the group again from that
  level (staging.stage_in_passes). That pass calibrates on every query of the earlier passes'
  samples (their exact top K known), strictly (`calibrate(strict=True)`), and is checked on a
  fresh sample (fresh_sample) that none of them holds.
A plan whose widest allowed level stays short (the pool too large for the exact fallback, or
`--max-candidates`) ends with a warning naming the estimate, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mtool.match.search import LADDER, Setting

EXACT = len(LADDER)  # the level past the ladder: every pool node is a candidate
LEVELS = (*LADDER, None)
# The exact fallback scores every pair of a plan: allowed up to this pool size (1.6 x 10^9 pairs
# at most, a minute or two on 2 cores). Above it the widest ladder level is the last resort.
EXACT_FALLBACK_MAX = 40_000
DEFAULT_TARGET = 0.99
DEFAULT_SAMPLE = 128  # queries of a plan's check sample at least (sample_size); calibration draws a quarter
CHECK_PAIRS = 100_000_000  # sample x pool pairs a check may score to draw more than the minimum
# A delivered match is as good as the K-th best exact one when its score is at least that one's
# minus this: the check's exact scores come from matrix products, the delivered ones from the
# rescoring's gathered products, and their rounding to SCORE_DECIMALS can differ by one unit.
SCORE_TOLERANCE = 1.5e-6
SEED = 7_412_021


@dataclass
class PlanQuality:
    """One search plan's chosen width and its measured recall."""

    queries: int
    pool: int
    level: int  # index into LEVELS (EXACT: all pairs)
    candidates: int  # candidates per query at that level
    calibration_recall: float | None = None
    recall: float = 1.0
    lower_95: float = 1.0
    sample: int = 0
    widest: bool = False  # no wider level is allowed for this plan
    tried: list = field(default_factory=list)  # (level, recall on sample A) in calibration order
    # required numeric / multi-value keys: whether the search drops their excluded pairs
    # (search.RequiredKeys), and the recall on sample A of the narrowest level without it
    filtered: bool | None = None
    unfiltered_recall: float | None = None
    confirmation: int = 0  # queries added to the check's sample where its estimate was ambiguous

    def to_json(self) -> dict:
        setting = LEVELS[self.level]
        return {"queries": self.queries, "pool": self.pool, "level": self.level,
                "search": "exact" if setting is None else setting.to_json(), "candidates": self.candidates,
                "calibration_recall": self.calibration_recall, "recall": self.recall, "lower_95": self.lower_95,
                "sample": self.sample, "tried": self.tried, "required_filter": self.filtered,
                "unfiltered_recall": self.unfiltered_recall,
                "confirmation": self.confirmation}


def upper(recall: float, lower: float) -> float:
    """The upper end of the symmetric 95% interval whose lower end recall_bounds gives."""
    return min(1.0, 2 * recall - lower)


def recall_bounds(hits: np.ndarray, totals: np.ndarray) -> tuple[float, float]:
    """Recall over the sample's match slots (sum of hits / sum of slots) and its 95% lower bound.
    The bound comes from the spread between queries (a ratio estimator's standard error), not
    from slots taken as independent: a query's misses come together (a query on a cluster's
    edge misses several), so a bound over slots would be too narrow."""
    total = int(totals.sum())
    if total == 0:
        return 1.0, 1.0
    recall = float(hits.sum()) / total
    q = len(hits)
    if q < 2:
        return recall, 0.0
    spread = float(np.sqrt(np.sum((hits - recall * totals) ** 2) / (q * (q - 1)))) / float(totals.mean())
    return recall, max(0.0, recall - 1.96 * spread)


def allowed_levels(k: int, pool: int, floor: int, max_candidates: int | None) -> list[int]:
    """Levels a plan may use, from `floor` up: within `--max-candidates` (candidates per query),
    and exact only for a pool up to EXACT_FALLBACK_MAX. Where the cap excludes every level, the
    narrowest runs with its candidates cut to the cap (candidates_of)."""
    def fits(level: int) -> bool:
        setting = LEVELS[level]
        count = pool if setting is None else min(pool, k * setting.oversample)
        if setting is None and pool > EXACT_FALLBACK_MAX:
            return False
        return max_candidates is None or count <= max_candidates

    return [level for level in range(floor, len(LEVELS)) if fits(level)] or [min(floor, EXACT - 1)]


def sample_size(minimum: int, pool: int) -> int:
    """Queries of a plan's check sample: `minimum` (--recall-sample), and more where the pool is
    small enough for CHECK_PAIRS (up to 4x: 512 by default, a 95% interval of about +-0.002 at
    0.99). The check's cost is the sample's exact top K, sample x pool pairs (rescore.pool_top_k,
    ~30 ns a pair on one core): at 1M nodes the minimum, 128, costs ~4 CPU-seconds, about a
    tenth of the cycle, and gives about +-0.005."""
    return int(np.clip(CHECK_PAIRS // max(1, pool), minimum, 4 * minimum))


def calibration_size(size: int) -> int:
    """Queries of the calibration sample beside a check sample of `size`."""
    return max(1, min(size, max(16, size // 4)))


def samples(queries: np.ndarray, size: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded samples of the plan's queries (node indices): calibration (a quarter
    of `size`: it only has to tell a width far from the target, 0.6 against 0.99, and its rule is
    lenient anyway) and the check (`size`: the estimate the cycle records)."""
    pick, small, size = _drawn(queries, size, salt)
    return np.sort(queries[pick[:small]]), np.sort(queries[pick[small:small + size]])


def confirmation_sample(queries: np.ndarray, size: int, extra: int, salt: int) -> np.ndarray:
    """`extra` more queries for the check, disjoint from both of `samples(queries, size, salt)`
    (the same seeded draw, its next queries): fewer where the plan has no more."""
    pick, small, size = _drawn(queries, size, salt)
    return np.sort(queries[pick[small + size:small + size + extra]])


def _drawn(queries: np.ndarray, size: int, salt: int) -> tuple[np.ndarray, int, int]:
    """The seeded order samples are drawn in, and the calibration and check samples' sizes."""
    size = max(1, min(size, len(queries) // 2))
    return np.random.default_rng([SEED, salt]).permutation(len(queries)), calibration_size(size), size


def fresh_sample(queries: np.ndarray, count: int, exclude: np.ndarray, salt: tuple) -> np.ndarray:
    """`count` of the plan's queries outside `exclude`, seeded by `salt`: a pass computed again
    is checked (and confirmed) on queries none of its calibration's samples hold."""
    rest = queries[~np.isin(queries, exclude)]
    return np.sort(rest[np.random.default_rng([SEED, *salt]).permutation(len(rest))[:count]])


def confirmation_floor(size: int, spent: int, pool: int) -> int:
    """Queries an ambiguous check adds at least, whatever its plan's search cost: up to `size`
    more, while all the samples' exact pairs stay within CHECK_PAIRS (the pairs sample_size
    allows the check alone). A cheap search buys no confirmation by its budget, and seed 5's
    strict member of population.FAMILY (level 0, 100,000 nodes) was delivered at an estimate of
    0.9904 on 512 queries (lower bound 0.9861) where 12,000 queries measured 0.9879. At 100,000
    nodes this adds 360 queries (about 0.8 s on 2 cores by costs.PAIR_NS); at 1M none (the samples' 160 queries are
    past CHECK_PAIRS already), so the 1M cycle's check stays within its tenth."""
    return int(max(0, min(size, CHECK_PAIRS // max(1, pool) - spent)))


def ambiguous(recall: float, lower: float, target: float) -> bool:
    """The target lies within the check's 95% interval: a larger sample would tell better
    whether the plan is short (staging confirms it where the budget allows). Both sides: above
    the target, a plan just short would be delivered; below it, a plan that met it would be
    computed again wider, a whole pass more."""
    return lower < target <= upper(recall, lower)


def recall_hits(found: np.ndarray, exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: how many of its exact top K's match slots `found` fills with a match as good,
    and how many slots there are. Both are (nodes, scores) pairs of (q, K) arrays (node -1: no
    match; scores: the kernel's exact, rounded scores). A delivered match counts when its score
    reaches the K-th best exact score: among nodes of equal score the exact top K's choice (by
    reference id) is arbitrary, and a population where many nodes share a score (sparse nodes
    scoring 1.0 on the one key they share with the query, few distinct values) would otherwise
    count an equally good match as a miss. Without ties this is the set overlap."""
    (_, found_scores), (exact_nodes, exact_scores) = found, exact
    totals = (exact_nodes >= 0).sum(axis=1)
    kth = np.where(totals > 0, np.min(np.where(exact_nodes >= 0, exact_scores, np.inf), axis=1), np.inf)
    good = (found[0] >= 0) & (found_scores >= kth[:, None] - SCORE_TOLERANCE)
    return np.minimum(good.sum(axis=1), totals).astype(np.float64), totals.astype(np.float64)


def calibrate(levels: list[int], target: float, sample_a: np.ndarray, exact_a, search_top_k,
              quality: PlanQuality, strict: bool = False) -> int:
    """The first level whose recall on sample A is consistent with the target (its 95% upper
    bound reaches it; else the widest allowed). `search_top_k(nodes, level)` gives the plan's
    top K of those nodes at that level, and `exact_a` sample A's exact top K (both as
    recall_hits takes them). Consistent, not proven: on 128 queries the bound is
    about +-0.005 at 0.99, and demanding the lower bound cost a 1M-node group of the benchmark's
    population (true recall 0.994 at the narrowest width, 0.986 on its sample A) a width twice
    as costly. The check on sample B is strict (staging.summarise_quality): below the target,
    the group is computed again wider. `strict`: the recall on A itself must reach the target
    (a pass computed again, whose A is every sample of its earlier passes: see staging)."""
    for level in levels:
        if LEVELS[level] is None:  # exact: recall 1 by construction
            quality.tried.append((level, 1.0))
            return level
        recall, reached = sample_recall(level, target, sample_a, exact_a, search_top_k)
        reached = recall >= target if strict else reached
        quality.tried.append((level, recall))
        quality.calibration_recall = recall
        if reached:
            return level
    return levels[-1]


def sample_recall(level: int, target: float, sample_a: np.ndarray, exact_a, search_top_k) -> tuple[float, bool]:
    """Recall of `level` on sample A (rounded to 4 decimals), and whether it is consistent with
    the target (its 95% upper bound reaches it)."""
    recall, lower = recall_bounds(*recall_hits(search_top_k(sample_a, level), exact_a))
    return round(recall, 4), upper(recall, lower) >= target


def needs_filter(level: int, target: float, sample_a: np.ndarray, exact_a, unfiltered_top_k,
                 quality: PlanQuality) -> bool:
    """Whether a plan with required numeric or multi-value keys searches with their filter
    (search.RequiredKeys): only where its narrowest level falls short of the target without
    it. The filter makes each scanned pair ~30% dearer (strict member of population.FAMILY,
    100,000 nodes, scale 10: 3.3-3.4 s against 4.3-4.6 s); where it is needed it saves widths
    (the same member with scale 3: the fourth width without it, 21.9 s; the first with it, 4.1 s).
    Stricter than calibrate's rule (the sample's recall itself must reach the target, not its
    upper bound): a search wrongly filtered costs that 30%, one wrongly unfiltered a second
    pass when the check falls short (the scale-3 member: 0.981 on A, 0.970 delivered, 7.5 s)."""
    recall, _ = sample_recall(level, target, sample_a, exact_a, unfiltered_top_k)
    quality.unfiltered_recall = recall
    quality.filtered = recall < target
    if not quality.filtered:  # the level is this one (calibrate would search the same sample again)
        quality.tried.append((level, recall))
        quality.calibration_recall = recall
    return quality.filtered


def candidates_of(level: int, k: int, pool: int, symmetric: bool, max_candidates: int | None) -> int:
    """Candidates per query at `level` (the node itself among them in symmetric mode)."""
    setting: Setting | None = LEVELS[level]
    if setting is None:
        return pool
    count = k * setting.oversample + (1 if symmetric else 0)
    return min(pool, count if max_candidates is None else min(count, max_candidates))
