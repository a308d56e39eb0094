"""Match engine quality and speed against FAISS exact flat search and pynndescent, one run.

    python benchmarks/match.py [--nodes 1000000] [--k 20] [--sample 300] [--repeat 1] [--target-recall 0.99]
    python benchmarks/match.py --family [--nodes 100000] [--seed 1] [--members today,required,...] [--sample 3000]

Makes a clustered population in one group (city, age, interests and a 64-dim embedding), then
prints for mtool's engine (candidate search + exact rescoring + top-K, through the same code
path as `mtool match`) and for two baselines on the same encoded vectors (FAISS IndexFlatIP
top-K; pynndescent's k-NN graph with the dot metric): nodes/s, recall@K against the exact
top-K by the true compatibility score (computed on --sample random query nodes), and the
process's peak RSS after each step. --repeat N runs mtool and pynndescent N times each,
alternated, and compares their medians.

--family runs one member of each kind of mtool.match.population.FAMILY (parameters drawn from
--seed) and prints for each: recall@K against the exact top K (its own sample, independent of
the engine's), the engine's own estimate, the search width calibration chose per plan, nodes/s
and peak RSS; and the worst member.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _util import scratch_dir  # noqa: E402
from mtool.device import Device  # noqa: E402
from mtool.kernels import compat  # noqa: E402
from mtool.match import calibrate  # noqa: E402
from mtool.match import encode as enc  # noqa: E402
from mtool.match import engine, staging  # noqa: E402
from mtool.match import population as popm  # noqa: E402
from mtool.match import profile as prof  # noqa: E402
from mtool.match.nodes import GroupNodes  # noqa: E402


def peak_rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def exact_top_k(features, queries, n, k):
    rank = np.arange(n)
    out = []
    for q in queries:
        s = compat.pair_scores(features, np.array([q]), np.arange(n)[None, :])
        s[0, q] = -np.inf
        out.append(compat.top_k(s, np.arange(n)[None, :], rank, k)[0][0])
    return out


def recall(found, exact, queries) -> float:
    return float(np.mean([len(set(found[q][found[q] >= 0]) & set(e)) / len(e) for q, e in zip(queries, exact)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--target-recall", type=float, default=engine.MatchOptions.target_recall)
    ap.add_argument("--family", action="store_true", help="the family of populations instead (see above)")
    ap.add_argument("--seed", type=int, default=1, help="--family: the seed its parameters are drawn from")
    ap.add_argument("--members", default=",".join(popm.FAMILY), help="--family: the kinds to run")
    ap.add_argument("--share", type=float, default=None, help="--family: fix the drawn share where a kind has one "
                    "(the rare value, the missing values, the smaller bipartite side)")
    ap.add_argument("--sample", type=int, default=None, help="queries the benchmark checks recall on (default: 300; --family 3000, whose members sit near 0.99: 300 gave a 95%% interval of about +-0.004)")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="mtool and pynndescent runs, alternated; the "
                    "throughput ratio is of their medians (this machine's timings vary by 10-20%%)")
    args = ap.parse_args()
    if args.sample is None:
        args.sample = 3000 if args.family else 300
    n, k = args.nodes, args.k
    if args.family:
        return run_family(args)

    t = time.perf_counter()
    p = popm.population(n)
    nodes = GroupNodes("bench", "bench", p["reference_id"], {c: p[c] for c in ("city", "age", "interests")},
                       p["embedding"])
    profile = prof.parse({**popm.PROFILE, "k": k})
    features = enc.encode(profile, nodes)
    print(f"population: {n:,} nodes, 64-dim embedding + city/age/interests, built in {time.perf_counter() - t:.1f} s; "
          f"{os.cpu_count()} CPUs", flush=True)
    queries = np.random.default_rng(7).choice(n, min(args.sample, n), replace=False)
    t = time.perf_counter()
    exact = exact_top_k(features, queries, n, k)
    print(f"exact top-{k} of {len(queries)} sample queries by true compatibility: {time.perf_counter() - t:.1f} s",
          flush=True)

    import faiss  # noqa: F401  imported before any timing, as pynndescent's JIT is warmed up below
    import zarr  # noqa: F401

    def run_mtool() -> float:
        opts = engine.MatchOptions(profile, Device.CPU, target_recall=args.target_recall,
                                   staging_dir=scratch_dir("mtool-bench-match-"))
        t = time.perf_counter()
        nb, _, stats = staging.stage_in_passes(opts, profile, nodes, features, os.path.join(opts.staging_dir, "bench"))
        passes = stats["passes"]
        dt = time.perf_counter() - t
        plan = stats["quality"]["plans"][0]
        print(f"mtool (vectors + calibrated list-join candidates + exact rescoring): {n / dt:>9,.0f} nodes/s "
              f"({dt:.1f} s)  recall@{k} {recall(nb, exact, queries):.4f}  peak RSS {peak_rss_mib()} MiB  [engine: "
              f"estimate {plan['recall']:.4f} (lower {plan['lower_95']:.4f}, {plan['sample']} queries), level "
              f"{plan['level']}, passes {passes}, calibration and check {stats.get('calibration_s', 0):.1f} + "
              f"{stats.get('check_s', 0):.1f} s, lists {stats.get('graph_build_s', 0):.1f} s]", flush=True)
        return dt

    mtool_s = [run_mtool()]  # first, so that its peak RSS is its own
    if args.skip_baselines:
        for _ in range(args.repeat - 1):
            run_mtool()
        return
    vecs = enc.vectors(profile, features, n)
    flat_baseline(vecs, features, exact, queries, n, k)
    try:
        import pynndescent
    except ImportError:
        print("pynndescent not installed (pip install pynndescent): baseline skipped")
        return
    # Compile its numba kernels first, so the timing below is the algorithm, not the JIT.
    pynndescent.NNDescent(vecs[:3000], metric="dot", n_neighbors=k + 1, random_state=0).neighbor_graph
    pynn_s = []
    for r in range(args.repeat):  # alternated, so that both see the machine in the same states
        if r:
            mtool_s.append(run_mtool())
        t = time.perf_counter()
        graph = pynndescent.NNDescent(vecs, metric="dot", n_neighbors=k + 1, random_state=0, low_memory=True)
        ids, _ = graph.neighbor_graph
        dt = time.perf_counter() - t
        pynn_s.append(dt)
        rec = recall({q: ids[q][ids[q] != q][:k] for q in queries}, exact, queries)
        print(f"pynndescent k-NN graph (dot) on the same vectors:        {n / dt:>9,.0f} nodes/s ({dt:.1f} s)  "
              f"recall@{k} {rec:.4f}  peak RSS {peak_rss_mib()} MiB", flush=True)
        del graph, ids
    m, p = float(np.median(mtool_s)), float(np.median(pynn_s))
    label = f"median of {args.repeat} runs each: " if args.repeat > 1 else ""
    print(f"mtool / pynndescent throughput: {label}{p / m:.2f}x (mtool {n / m:,.0f} nodes/s, pynndescent "
          f"{n / p:,.0f} nodes/s)")


def run_family(args) -> None:
    """Each member: the engine through stage_matches (the same code as `mtool match`), then
    recall on --sample queries against their exact top K by the compatibility kernel."""
    worst = None
    for kind in args.members.split(","):
        cols, spec = popm.member(kind, args.nodes, args.seed, args.share)
        spec = {**spec, "k": args.k}
        keys = list(spec["keys"]) + (["gender"] if "partition" in spec else [])
        nodes = GroupNodes(kind, kind, cols["reference_id"], {c: cols[c] for c in keys}, cols["embedding"])
        profile = prof.parse(spec, kind)
        features = enc.encode(profile, nodes)
        opts = engine.MatchOptions(profile, Device.CPU, target_recall=args.target_recall,
                                   staging_dir=scratch_dir("mtool-bench-family-"))
        t = time.perf_counter()
        nb, _, stats = staging.stage_in_passes(opts, profile, nodes, features, os.path.join(opts.staging_dir, kind))
        dt = time.perf_counter() - t
        rec, lower, same = family_recall(profile, nodes, features, nb, args.sample)
        q = stats["quality"]
        plans = "; ".join(f"{p['queries']}q/{p['pool']}p level {p['level']} ({p['candidates']} cand."
                          + {True: ", required filter", False: ", no filter needed", None: ""}[p["required_filter"]]
                          + (f", check {p['sample']} q. incl. {p['confirmation']} confirming" if p["confirmation"] else "")
                          + ")"
                          for p in q["plans"][:4]) + (f"; +{len(q['plans']) - 4} plans" if len(q["plans"]) > 4 else "")
        print(f"{kind:<10} recall@{args.k} {rec:.4f} (benchmark's sample, 95% interval +-{rec - lower:.4f}; same nodes {same:.4f}) | estimate {q['recall_estimate']:.4f} "
              f"(lower {q['recall_lower_95']:.4f}) | {args.nodes / dt:>8,.0f} nodes/s ({dt:.1f} s, {stats['passes']} pass(es), calibration "
              f"{stats.get('calibration_s', 0):.1f} s, check {stats.get('check_s', 0):.1f} s) | peak RSS "
              f"{peak_rss_mib()} MiB | {plans}" + (f" | WARNING {q['warning']}" if q["warning"] else ""), flush=True)
        if worst is None or rec < worst[1]:
            worst = (kind, rec)
    print(f"worst member: {worst[0]} recall@{args.k} {worst[1]:.4f} (seed {args.seed}, {args.nodes:,} nodes)")


def family_recall(profile, nodes, features, found, sample: int) -> tuple[float, float, float]:
    """Recall of `found` on sampled queries against the exact top K by the compatibility kernel,
    honouring sides (bipartite) and required keys (the kernel excludes those pairs itself): a
    match counts when its score reaches the K-th best exact score (population.reference_hits);
    its 95% lower bound by the same rule as the engine's (calibrate.recall_bounds: misses come
    together, so the spread is taken between queries); and the share of the exact top K's very
    nodes found (lower where scores tie)."""
    n = len(nodes)
    hits, totals, same = [], [], 0
    for q in np.random.default_rng(99).choice(n, min(sample, n), replace=False):
        counted = popm.reference_hits(profile, nodes, features, q, found[q][found[q] >= 0])
        if counted is not None:
            hits.append(counted[0])
            totals.append(counted[1])
            same += counted[2]
    if not sum(totals):
        return 1.0, 1.0, 1.0
    rec, lower = calibrate.recall_bounds(np.array(hits, np.float64), np.array(totals, np.float64))
    return rec, lower, same / sum(totals)


def flat_baseline(vecs, features, exact, queries, n, k) -> None:
    """FAISS exact flat search of the vectors (a 20,000-query slice, extrapolated, above 200k)."""
    import faiss

    t = time.perf_counter()
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    if n > 200_000:  # exact search of everyone would take hours: time a slice, extrapolate
        part = vecs[:20_000]
        _, ids_part = index.search(part, k + 1)
        dt = (time.perf_counter() - t) * n / len(part)
        found = {q: ids for q, ids in zip(range(len(part)), ids_part)}
        sample = [q for q in queries if q < len(part)] or list(range(min(50, len(part))))
        exact_part = exact_top_k(features, sample, n, k) if sample else []
        rec = recall({q: found[q][found[q] != q][:k] for q in sample}, exact_part, sample)
        note = " (extrapolated from 20,000 queries)"
    else:
        _, ids = index.search(vecs, k + 1)
        dt = time.perf_counter() - t
        rec = recall({q: ids[q][ids[q] != q][:k] for q in queries}, exact, queries)
        note = ""
    print(f"FAISS IndexFlatIP on the same vectors:                   {n / dt:>9,.0f} nodes/s ({dt:.1f} s){note}  "
          f"recall@{k} {rec:.4f}  peak RSS {peak_rss_mib()} MiB", flush=True)


if __name__ == "__main__":
    main()
