"""Whether a plan's pool is cheaper to score whole (every pair, exact) than to search.

A cost model in counted work, so that the choice depends on the inputs only (same inputs,
same outputs), never on how fast the machine happened to be: each path's work is counted in
the units below and weighed by its cost per unit, measured on one core by
`benchmarks/match_costs.py` (which also checks the model's choice against both paths' wall
time at several pool sizes). Costs are in nanoseconds on this project's 2-core machine; only
their ratios matter for the choice, and those hold on machines of one kind (CPU-bound NumPy and
BLAS on both paths).

- exact: queries x pool pairs through the kernel (rescore.pool_top_k / top_k_for's exact path);
- approximate: the list join's build (k-means and the pool's probes: pool x lists x dims
  multiply-adds), each query's probes (lists x dims) and scanned pairs (LEVEL0_LISTS lists of
  LIST_SIZE, each pair dims multiply-adds plus its heap work), its candidates' exact rescoring,
  and the recall check's samples (sample x pool pairs through the kernel).
"""

from __future__ import annotations

from mtool.match.search import LIST_SIZE, PROBE_MIN

# `python benchmarks/match_costs.py` at 200,000 nodes, one core:
PAIR_NS = 44.0  # one pair of an exact pool scan through the kernel (the benchmark population's profile)
RESCORE_NS = 70.0  # one candidate pair rescored (gathered features)
MULTIPLY_ADD_NS = 0.024  # one float32 multiply-add of the join's matrix products
HEAP_NS = 4.2  # heap and selection work per scanned pair
LEVEL0_LISTS = 6.6  # lists a query scans at the narrowest width (8.5 at 1M nodes)
OVERSAMPLE = 4  # candidates per kept match at the narrowest width
# Pools up to this size are scored whole: there both paths take under 0.2 s (measured at 500
# and 1,000 nodes: 0.03-0.15 s exact, 0.05-0.10 s approximate, fixed costs such as k-means and
# thread pools being most of the approximate path's), and the exact one has recall 1.
SMALLEST = 1_000


def exact_ns(queries: int, pool: int) -> float:
    return queries * pool * PAIR_NS


def approximate_ns(queries: int, pool: int, dims: int, k: int, sample: int) -> float:
    lists = max(1, pool // LIST_SIZE)
    scanned = min(pool, max(PROBE_MIN, LEVEL0_LISTS) * LIST_SIZE)
    build = pool * lists * dims * MULTIPLY_ADD_NS
    per_query = (lists * dims * MULTIPLY_ADD_NS + scanned * (dims * MULTIPLY_ADD_NS + HEAP_NS)
                 + min(pool, OVERSAMPLE * k) * RESCORE_NS)
    return build + queries * per_query + sample * pool * PAIR_NS


def exact_is_cheaper(queries: int, pool: int, dims: int, k: int, sample: int) -> bool:
    """True where scoring every pair costs no more than the narrowest search with its recall
    check (the calibration may still widen the search, or fall back to exact, afterwards)."""
    return pool <= SMALLEST or exact_ns(queries, pool) <= approximate_ns(queries, pool, dims, k, sample)


# The recall check's exact pairs may cost up to this share of what its plan's search and
# rescoring cost (the budget for calibration and check: 10% of a cycle's compute).
CHECK_SHARE = 0.10


def search_ns(scanned_pairs: int, dims: int, rescored_pairs: int) -> float:
    """A plan's counted search and rescoring work: the pairs its queries' probed lists hold
    (dims multiply-adds and heap work each) and the candidates rescored. Against the measured
    search and rescoring (2 cores): 1M nodes of benchmarks/match.py (96 dims, 4.6 x 10^9 scanned
    pairs) 35.7 CPU-s modelled, 29.8 measured; the wide member of population.FAMILY (seed 1,
    100,000 nodes, 750 dims, 2.4 x 10^9 pairs at its third width) 55.1 modelled, 68 measured."""
    return scanned_pairs * (dims * MULTIPLY_ADD_NS + HEAP_NS) + rescored_pairs * RESCORE_NS


def confirmation_queries(scanned_pairs: int, dims: int, rescored_pairs: int, pool: int, spent_queries: int) -> int:
    """Queries the check may add where its estimate is ambiguous: what CHECK_SHARE of the plan's
    work pays for in exact pool scans (pool pairs each), less the queries its samples scanned
    already. Counted work, not time: the same inputs add the same queries. At 1M nodes of the
    benchmark population the samples' 160 queries already spend more than the share (none is
    added); that wide member adds 611 to its 640."""
    budget = CHECK_SHARE * search_ns(scanned_pairs, dims, rescored_pairs) / PAIR_NS
    return max(0, int(budget // max(1, pool)) - spent_queries)
