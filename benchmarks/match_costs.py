"""The unit costs of mtool.match.costs, measured on one core, and the model's exact/approximate
choice checked against both paths' wall time.

    python benchmarks/match_costs.py [--nodes 200000] [--sizes 1000,2000,4000,8000,16000]

Prints, on the benchmark population (mtool.match.population, its profile): ns per exact pair
of a pool scan, per rescored candidate pair, per float32 multiply-add of the list join's
products, and per scanned pair of heap work; then for each pool size the time of the exact
path and of the approximate path (with its calibration and check) through staging.stage_matches,
and the model's choice beside the faster one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _util import scratch_dir  # noqa: E402
from mtool.device import Device  # noqa: E402
from mtool.kernels import compat  # noqa: E402
from mtool.match import costs, engine, plans, search, staging  # noqa: E402
from mtool.match import encode as enc  # noqa: E402
from mtool.match import population as popm  # noqa: E402
from mtool.match import profile as prof  # noqa: E402
from mtool.match import rescore  # noqa: E402
from mtool.match.nodes import GroupNodes  # noqa: E402


def group(n: int, seed: int = 1):
    p = popm.population(n, seed=seed)
    nodes = GroupNodes("g", "d", p["reference_id"], {c: p[c] for c in ("city", "age", "interests")}, p["embedding"])
    profile = prof.parse(popm.PROFILE)
    return nodes, profile, enc.encode(profile, nodes)


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def unit_costs(n: int) -> None:
    from threadpoolctl import threadpool_limits

    nodes, profile, features = group(n)
    compat.prepare(features, np)
    rank = np.arange(n)
    vecs = enc.vectors(profile, features, n)
    d = vecs.shape[1]
    with threadpool_limits(1):
        queries = np.arange(0, n, n // 64)[:64]
        s = best_of(lambda: rescore.pool_top_k(queries, 0, n, features, rank, profile.k, np, True), 2)
        print(f"exact pool scan:         {s / (len(queries) * n) * 1e9:6.1f} ns a pair   (costs.PAIR_NS {costs.PAIR_NS})")
        join = search.ListJoin(vecs, threads=1)
        q = join.order[:20_000]  # queries of consecutive lists, as the engine's blocks take them
        found = join.search(vecs[q], join.pool_probes[q], 4 * profile.k)
        in_lists = features.take(join.order)  # the engine rescores features in list order (plans.work_order)
        compat.prepare(in_lists, np)
        first = np.argsort(join.order)[q]  # the queries' positions in that order
        s = best_of(lambda: rescore.top_k_for(first, found, 0, n, in_lists, rank[join.order], profile.k, np, True), 1)
        print(f"candidate rescoring:     {s / found.size * 1e9:6.1f} ns a pair   (costs.RESCORE_NS {costs.RESCORE_NS})")
        a, b = vecs[:4096], vecs[:512]
        s = best_of(lambda: a @ b.T)
        print(f"list join product:       {s / (4096 * 512 * d) * 1e9:6.3f} ns a multiply-add "
              f"(costs.MULTIPLY_ADD_NS {costs.MULTIPLY_ADD_NS})")
        probes = join.pool_probes[q]
        scanned = int(sum(join.starts[lst + 1] - join.starts[lst] for lst in probes[probes >= 0]))
        s = best_of(lambda: join.search(vecs[q], probes, 4 * profile.k), 1)
        heap = s / scanned * 1e9 - d * costs.MULTIPLY_ADD_NS
        print(f"search, beyond products: {heap:6.1f} ns a scanned pair (costs.HEAP_NS {costs.HEAP_NS}); "
              f"{scanned / len(q) / search.LIST_SIZE:.1f} lists a query (costs.LEVEL0_LISTS {costs.LEVEL0_LISTS})")


def choices(sizes) -> None:
    for size in sizes:
        nodes, profile, features = group(size, seed=size)
        dims = enc.vectors(profile, features, size).shape[1]
        times = {}
        for path, exact_max in (("exact", size), ("approximate", 0)):
            opts = engine.MatchOptions(profile, Device.CPU, staging_dir=scratch_dir("mtool-bench-costs-"))
            saved = plans.exact_plan
            plans.exact_plan = lambda queries, pool, dims_, k, sample, m=exact_max: pool <= m
            try:
                times[path] = best_of(lambda: staging.stage_matches(opts, profile, nodes, features, os.path.join(
                    opts.staging_dir, f"{path}-{time.monotonic_ns()}"), {}), 2)
            finally:
                plans.exact_plan = saved
        faster = min(times, key=times.get)
        model = "exact" if costs.exact_is_cheaper(size, size, dims, profile.k,
                                                  5 * engine.calibrate.sample_size(engine.calibrate.DEFAULT_SAMPLE,
                                                                                    size) // 4) else "approximate"
        print(f"pool {size:>6,}: exact {times['exact']:6.2f} s, approximate {times['approximate']:6.2f} s; faster: "
              f"{faster:<11} model: {model}" + ("" if model == faster else "  (differs)"), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=200_000)
    ap.add_argument("--sizes", default="1000,2000,4000,8000,16000")
    args = ap.parse_args()
    unit_costs(args.nodes)
    choices([int(s) for s in args.sizes.split(",")])


if __name__ == "__main__":
    main()
