"""A group's top K, computed block by block into Zarr staging arrays, in passes.

stage_matches builds the plans (plans.py), calibrates each approximate plan's search width
(calibrate.py), searches and rescores the nodes in blocks on the compute threads, stages each
block's top K with a done-marker (a killed run resumes from the done blocks), and checks the
delivered recall on an independent sample. stage_in_passes computes again, wider, the plans
whose check fell short.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from mtool import faults
from mtool.match import calibrate, costs
from mtool.match.plans import build_plans, work_order
from mtool.match.rescore import SCAN_QUERIES, top_k_for, work_features_on
from mtool.match.search import compute_pool, reuse_freed_memory, scanned_pairs, take_rows


class Kept(NamedTuple):
    """What a pass takes over from the previous one: the plans that met the target there (plan
    numbers), the previous pass's processing order and its staged neighbours and scores."""
    plans: frozenset
    order: np.ndarray
    neighbors: object
    scores: object

    @classmethod
    def of(cls, previous: str, redo: dict, plans: int) -> "Kept":
        import zarr

        return cls(frozenset(range(plans)) - set(redo), np.load(os.path.join(previous, "order.npy")),
                   zarr.open_array(os.path.join(previous, "neighbors.zarr"), mode="r"),
                   zarr.open_array(os.path.join(previous, "scores.zarr"), mode="r"))


def saved_order(staging: str, plans: list) -> np.ndarray:
    """The processing order of the nodes, saved before the first block (a resumed run reads it:
    its blocks and done-markers must mean the same nodes)."""
    path = os.path.join(staging, "order.npy")
    if os.path.exists(path):
        return np.load(path)
    order = np.concatenate([plan.queries for plan in plans]) if plans else np.zeros(0, np.int64)
    np.save(path + ".tmp.npy", order)
    os.replace(path + ".tmp.npy", path)
    return order


def staging_array(staging: str, name: str, rows: int, k: int, block: int, dtype: str, fill):
    import zarr
    from zarr.codecs import BloscCodec

    path = os.path.join(staging, name)
    if os.path.exists(os.path.join(path, "zarr.json")):  # resuming: keep the done chunks
        return zarr.open_array(path, mode="r+")
    # blosc lz4 + shuffle: smallest and fastest for int32/float32 edge arrays (TESTING.md).
    return zarr.create_array(path, shape=(max(1, rows), k), chunks=(block, k), dtype=dtype, fill_value=fill,
                             compressors=[BloscCodec(cname="lz4", shuffle="shuffle")])


def stage_matches(opts, profile, group, features, staging: str, stats: dict | None = None, on_block=None,
                  want_result: bool = True, redo: dict | None = None, previous: str | None = None):
    """Top-K of every node into Zarr arrays under `staging`, block by block, resumable.

    Nodes are processed in a fixed order (by side, then by first probed list for large pools),
    saved as `order.npy` before the first block, so that blocks (and their done-markers) mean
    the same nodes when a killed run resumes. The arrays are indexed by processing position.
    Blocks run on `opts.threads` threads (NumPy, BLAS and FAISS release the GIL), each owning
    its Zarr chunk; `on_block(b)` is called as each block is done (the commit's COPY feed).
    Each approximate plan is calibrated first (its search width) and checked after
    (calibrate.py): stats["quality"] gets the recall estimate, and stats["redo"] the plans to
    compute again in a next pass, where one fell short and a wider search is allowed (plan
    number: (lowest level, required keys' filter)), else None. A next pass gets that `redo` and
    the `previous` pass's staging folder: the other plans' rows are copied from there.
    Returns the (n, k) neighbours and scores by node when `want_result`, else (None, None)."""
    stats = {} if stats is None else stats
    reuse_freed_memory()
    one = _Pass(opts, profile, group, features, staging, stats, redo, previous)
    checks = one.calibrate()
    neighbors, scores = one.compute_blocks(on_block, want_result)
    one.check(checks)
    summarise_quality(opts, one.plans, stats)
    return neighbors, scores


class _Pass:
    """One pass of stage_matches over a group: its plans, processing order and staging arrays.
    Its stages, in the order stage_matches calls them: calibrate (each approximate plan's
    width, and the check samples' exact top K), compute_blocks (search, rescoring, staging),
    check (the delivered recall)."""

    def __init__(self, opts, profile, group, features, staging: str, stats: dict, redo, previous):
        self.opts, self.staging, self.stats = opts, staging, stats
        self.xp = xp = opts.device.xp
        self.n, self.k = n, k = len(group), profile.k
        os.makedirs(os.path.join(staging, "done"), exist_ok=True)
        self.block = block = opts.block_rows
        self.redo = redo
        self.kept = kept = None if redo is None else Kept.of(previous, redo, len(stats["plan_qualities"]))
        self.plans, self.vecs, self.presence = build_plans(opts, profile, group, features, stats, kept)
        self.work = work = work_order(self.plans, n)
        self.position = np.empty(n, np.int64)
        self.position[work] = np.arange(n)
        self.order = order = saved_order(staging, self.plans)
        if kept is not None and not np.array_equal(order, kept.order):
            raise RuntimeError("a pass's processing order differs from the previous pass's: its plans cannot be kept")
        self.plan_starts = np.cumsum([0] + [len(plan.queries) for plan in self.plans])
        self.staged_nb = staging_array(staging, "neighbors.zarr", len(order), k, block, "int32", -1)
        self.staged_sc = staging_array(staging, "scores.zarr", len(order), k, block, "float32", float("-inf"))
        self.rank = xp.asarray(work)  # nodes are sorted by reference_id: a node's index is its rank
        # Only rescoring reads the features in work order: they are copied while the first batches
        # search (at 1M nodes the copy took 0.2-1 s, most of it first touches of fresh memory).
        loader = ThreadPoolExecutor(1)
        self.work_features = loader.submit(work_features_on, features, work, xp)
        loader.shutdown(wait=False)
        self.slot = np.zeros(n, np.int64)  # a query's row in its plan's probes (plans' queries are disjoint)
        for plan in self.plans:
            self.slot[plan.queries] = np.arange(len(plan.queries))
        self.symmetric = not profile.bipartite
        self.threads = 1 if xp is not np else max(1, opts.threads or os.cpu_count() or 1)
        self.neighbors = self.scores = None  # the caller's (n, k) arrays, indexed by node
        self.todo: set = set()  # blocks this run computes (a resumed run skips the done ones)
        self.thread_seconds: list = []  # (search, rescoring) seconds of each batch, on its thread
        self.calibrated_on: dict = {}  # plans computed again: the earlier samples' queries they calibrated on

    # -- search and exact top K of a plan's queries (calibration, check and blocks share them)

    def query_vectors(self, plan, nodes):
        # one symmetric pool: the queries are the pool, whose vectors the join holds in list order
        if self.vecs is not None:
            return self.vecs[nodes]
        return take_rows(plan.join.vectors, self.position[nodes] - plan.offset)

    def to_nodes(self, nb):
        return np.where(nb >= 0, self.work[np.maximum(nb, 0)], -1)

    def top_k(self, plan, nodes, candidates):
        """The plan's top K of `nodes` by the kernel over `candidates` (None: the whole pool), in
        positions of the work order."""
        return top_k_for(self.position[nodes], candidates, plan.offset, len(plan.pool), self.work_features.result(),
                         self.rank, self.k, self.xp, self.symmetric)

    def exact_top_k(self, plan, nodes):
        """The exact top K (nodes, scores) of a sample of queries over the whole pool, on the
        compute threads (every pair of the sample is scored: the recall check's main cost)."""
        threads = self.threads
        # a chunk per thread at least, SCAN_QUERIES a chunk at most (pool_top_k's matrix products)
        chunks = np.array_split(nodes, min(len(nodes), max(threads, -(-len(nodes) // SCAN_QUERIES)))) \
            if len(nodes) else [nodes]
        with compute_pool(threads) as pool:
            parts = list(pool.map(lambda chunk: self.top_k(plan, chunk, None), chunks))
        return self.to_nodes(np.concatenate([nb for nb, _ in parts])), np.concatenate([sc for _, sc in parts])

    def sample_top_k(self, plan, p, name, sample):
        """A sample's exact top K, computed once a cycle (kept with the sample: a pass that
        computes the plan again calibrates on them, earlier_samples)."""
        cache = self.stats["search_cache"]["samples"].setdefault(p, {})
        if name not in cache:
            cache[name] = (sample, self.exact_top_k(plan, sample))
        return cache[name][1]

    def earlier_samples(self, p):
        """Every query of plan p's samples so far (calibration, checks, confirmations of the
        earlier passes) with their exact top K, as one sample: (nodes, (nodes, scores))."""
        held = list(self.stats["search_cache"]["samples"].get(p, {}).values())
        if not held:
            return None
        return (np.concatenate([sample for sample, _ in held]),
                tuple(np.concatenate([exact[i] for _, exact in held]) for i in (0, 1)))

    def terms(self, nodes):
        return None if self.presence is None else self.presence.query_terms(nodes)

    def allowed(self, plan, nodes):
        return None if plan.required is None else plan.required.queries(nodes)

    def candidates(self, plan, level: int) -> int:
        return calibrate.candidates_of(level, self.k, len(plan.pool), self.symmetric, self.opts.max_candidates)

    def searched_top_k(self, plan, nodes, level, filtered=True):
        qv = self.query_vectors(plan, nodes)
        terms = self.terms(nodes)
        with compute_pool(1):  # one BLAS/OpenMP thread: the same arithmetic as the blocks'
            found = plan.join.search(qv, plan.join.probes(qv, calibrate.LEVELS[level], terms),
                                     self.candidates(plan, level), terms,
                                     self.allowed(plan, nodes) if filtered else None)
        nb, sc = self.top_k(plan, nodes, found)
        return self.to_nodes(nb), sc

    # -- stage 1: calibration

    def calibrate(self) -> dict:
        """Each approximate plan's search width (calibrate.py), and its check sample with that
        sample's exact top K: {plan number: (sample, exact top K)}."""
        opts, stats = self.opts, self.stats
        t_cal = time.monotonic()
        check_exact_s = 0.0  # the check sample's exact top K, computed here but the check's cost
        checks = {}
        for p, plan in enumerate(self.plans):
            if plan.kept:
                plan.quality = stats["plan_qualities"][p]
                continue
            plan.quality = calibrate.PlanQuality(len(plan.queries), len(plan.pool), calibrate.EXACT, len(plan.pool))
            if plan.join is None:
                continue
            floor, filtered = (self.redo or {}).get(p, (0, False))
            levels = calibrate.allowed_levels(self.k, len(plan.pool), floor, opts.max_candidates)
            size = calibrate.sample_size(opts.recall_sample, len(plan.pool))
            earlier = self.earlier_samples(p) if p in (self.redo or {}) else None
            if earlier is None:
                sample_a, sample_b = calibrate.samples(plan.queries, size, salt=p)
                exact_a = self.sample_top_k(plan, p, "calibration", sample_a)
            else:
                # A pass computed again: its width is read off every query of the earlier passes'
                # samples (their exact top K known: 5x the first pass's sample A and more, no new
                # exact work) and must reach the target there itself, not only within the interval:
                # each pass short costs the plan a whole computation (population.FAMILY's
                # missing-values member, seed 7, 100k nodes: four passes, from the narrowest
                # width to the fourth, 88 s). It is checked on queries none of those hold.
                sample_a, exact_a = earlier
                self.calibrated_on[p] = sample_a
                sample_b = calibrate.fresh_sample(plan.queries, size, sample_a, salt=(p, self.stats["passes"], 0))
            level = None
            if plan.required is not None and filtered:
                plan.quality.filtered = True  # an earlier pass fell short without the filter
            elif plan.required is not None and calibrate.LEVELS[levels[0]] is not None and not calibrate.needs_filter(
                    levels[0], opts.target_recall, sample_a, exact_a,
                    lambda nodes, lv, plan=plan: self.searched_top_k(plan, nodes, lv, filtered=False), plan.quality):
                plan.required, level = None, levels[0]  # the narrowest reached the target unfiltered
            if level is None:
                level = calibrate.calibrate(levels, opts.target_recall, sample_a, exact_a,
                                            lambda nodes, lv, plan=plan: self.searched_top_k(plan, nodes, lv),
                                            plan.quality, strict=earlier is not None)
            plan.level = plan.quality.level = level
            plan.quality.candidates = self.candidates(plan, level)
            plan.quality.widest = level == levels[-1]
            if calibrate.LEVELS[level] is None:
                plan.join = plan.probes = None  # exact fallback: the whole (contiguous) pool
            else:
                t_exact = time.monotonic()
                if earlier is not None and len(sample_b) < max(1, size // 4):
                    checks[p] = (sample_a, exact_a)  # nearly every query sampled already: measured on them
                else:
                    checks[p] = (sample_b, self.sample_top_k(plan, p, self.sample_name("check", p), sample_b))
                check_exact_s += time.monotonic() - t_exact
                if level > 0:
                    plan.probes = plan.join.probes(self.query_vectors(plan, plan.queries), calibrate.LEVELS[level],
                                                   self.terms(plan.queries))
        stats["calibration_s"] = stats.get("calibration_s", 0.0) + time.monotonic() - t_cal - check_exact_s
        stats["check_s"] = stats.get("check_s", 0.0) + check_exact_s
        return checks

    # -- stage 2: the blocks

    def span(self, b: int) -> tuple[int, int]:
        """Block b's rows of the order."""
        return b * self.block, min(len(self.order), (b + 1) * self.block)

    def plan_rows(self, first: int, last: int):
        """(plan number, plan, lo, hi) for each plan holding rows of first..last of the order."""
        for p, plan in enumerate(self.plans):
            lo, hi = max(first, self.plan_starts[p]), min(last, self.plan_starts[p + 1])
            if lo < hi:
                yield p, plan, lo, hi

    def search(self, first: int, last: int) -> dict:
        """Candidates of the rows first..last of the order: {plan: (its first row, candidates)}."""
        found = {}
        for p, plan, lo, hi in self.plan_rows(first, last):
            if plan.join is not None:
                queries = self.order[lo:hi]  # the saved order: a resumed run's blocks mean the same nodes
                found[p] = (lo, plan.join.search(self.query_vectors(plan, queries), plan.probes[self.slot[queries]],
                                                 self.candidates(plan, plan.level), self.terms(queries),
                                                 self.allowed(plan, queries)))
        return found

    def stage_block(self, b: int, found: dict, on_block) -> None:
        """Rescore block b's candidates, stage its top K and mark it done."""
        start, stop = self.span(b)
        out_nb = np.full((stop - start, self.k), -1, np.int32)
        out_sc = np.full((stop - start, self.k), -np.inf, np.float32)
        for p, plan, lo, hi in self.plan_rows(start, stop):
            if plan.kept:  # as the previous pass staged them (the same order)
                out_nb[lo - start:hi - start] = self.kept.neighbors[lo:hi]
                out_sc[lo - start:hi - start] = self.kept.scores[lo:hi]
                continue
            candidates = None  # an exact pool: all of it
            if p in found:
                at, rows = found[p]
                candidates = rows[lo - at:hi - at]
            nb, sc = self.top_k(plan, self.order[lo:hi], candidates)
            out_nb[lo - start:hi - start] = self.to_nodes(nb)
            out_sc[lo - start:hi - start] = sc
        self.staged_nb[start:stop] = out_nb
        self.staged_sc[start:stop] = out_sc
        if self.neighbors is not None:  # kept in memory too: reading 1M nodes' arrays back took ~1 s
            self.neighbors[self.order[start:stop]] = out_nb
            self.scores[self.order[start:stop]] = out_sc
        with open(os.path.join(self.staging, "done", f"{b}"), "w"):
            pass
        if on_block:
            on_block(b)
        if self.opts.on_nodes:
            self.opts.on_nodes(stop - start)
        faults.crash_point("match-block-done")

    def run_batch(self, batch: list, on_block) -> list:
        """Consecutive blocks searched as one (bigger list-join matrix products: at 1M nodes,
        65,536 query rows searched together took 0.75x the time of 16,384), then staged block
        by block. A query's candidates depend on its own probes only, so the grouping of blocks
        does not change the result. Returns each block's seconds (the batch's time shared out)."""
        t_batch = time.monotonic()
        found = self.search(self.span(batch[0])[0], self.span(batch[-1])[1])
        t_found = time.monotonic()
        batch = [b for b in batch if b in self.todo]  # resuming: the batch is searched whole, as before
        for b in batch:
            self.stage_block(b, found, on_block)
        self.thread_seconds.append((t_found - t_batch, time.monotonic() - t_found))
        return [(time.monotonic() - t_batch) / len(batch)] * len(batch)

    def compute_blocks(self, on_block, want_result: bool):
        """Every block not done yet, in search batches on the compute threads; returns the
        (n, k) neighbours and scores by node when `want_result`, else (None, None)."""
        stats, opts = self.stats, self.opts
        if want_result:
            self.neighbors = np.full((self.n, self.k), -1, np.int32)
            self.scores = np.full((self.n, self.k), -np.inf, np.float32)
        blocks = range(-(-len(self.order) // self.block))
        todo = [b for b in blocks if not os.path.exists(os.path.join(self.staging, "done", f"{b}"))]
        self.todo = set(todo)
        finished = sorted(set(blocks) - self.todo)  # by a killed run
        if on_block:  # resuming: blocks a killed run finished are fed again (the load table is new)
            for b in finished:
                on_block(b)
        if opts.on_nodes and finished:  # and count as progress
            opts.on_nodes(sum(stop - start for start, stop in map(self.span, finished)))
        batches = [batch for batch in search_batches(len(blocks), self.block) if self.todo.intersection(batch)]
        seconds = stats.setdefault("block_seconds", [])
        t_blocks = time.monotonic()
        if self.xp is not np:
            for batch in batches:
                seconds.extend(self.run_batch(batch, on_block))
        else:  # through the pool also with one thread (compute_pool says why)
            with compute_pool(self.threads) as pool:
                for done in pool.map(lambda batch: self.run_batch(batch, on_block), batches):
                    seconds.extend(done)
        # The blocks' wall time shared out by their threads' seconds: search and rescoring overlap
        # on the compute threads, so each stage's share of the wall time is what a reader can add up.
        blocks_s = time.monotonic() - t_blocks
        searched, rescored = (sum(x) for x in zip(*self.thread_seconds)) if self.thread_seconds else (0.0, 0.0)
        share = blocks_s / (searched + rescored) if searched + rescored else 0.0
        stats["search_s"] = stats.get("search_s", 0.0) + searched * share
        stats["rescore_s"] = stats.get("rescore_s", 0.0) + rescored * share
        if self.neighbors is not None:
            for start, stop in map(self.span, finished):  # blocks of a killed run: from the staging arrays
                self.neighbors[self.order[start:stop]] = self.staged_nb[start:stop]
                self.scores[self.order[start:stop]] = self.staged_sc[start:stop]
        return self.neighbors, self.scores

    # -- stage 3: the check

    def check(self, checks: dict) -> None:
        """Each checked plan's delivered recall on its sample, confirmed on more queries where
        ambiguous (calibrate.ambiguous), into its quality."""
        t_check = time.monotonic()
        at = np.empty(self.n, np.int64)
        at[self.order] = np.arange(len(self.order))

        def hits(sample, exact):
            """Per query of `sample`: its delivered matches as good as its exact top K's, and slots."""
            rows = (at[sample], slice(None))
            delivered = (self.staged_nb.get_orthogonal_selection(rows), self.staged_sc.get_orthogonal_selection(rows))
            return calibrate.recall_hits(delivered, exact)

        for p, (sample_b, exact_b) in checks.items():  # what was delivered, against the exact top K
            q = self.plans[p].quality
            found, slots = hits(sample_b, exact_b)
            q.recall, q.lower_95 = calibrate.recall_bounds(found, slots)
            q.sample = len(sample_b)
            if calibrate.ambiguous(q.recall, q.lower_95, self.opts.target_recall) and (
                    more := self.confirmation(p, self.plans[p], len(sample_b), sample_b)) is not None:
                more_found, more_slots = hits(*more)
                q.recall, q.lower_95 = calibrate.recall_bounds(np.concatenate([found, more_found]),
                                                               np.concatenate([slots, more_slots]))
                q.confirmation = len(more[0])
                q.sample += q.confirmation
        self.stats["check_s"] = self.stats.get("check_s", 0.0) + time.monotonic() - t_check

    def confirmation(self, p, plan, size: int, sample_b):
        """Queries added to plan p's check where its estimate is ambiguous, as many as
        costs.confirmation_queries allows (calibrate.confirmation_floor at least), and their
        exact top K; None where too few."""
        dims = (self.vecs if self.vecs is not None else plan.join.vectors).shape[1]
        rescored = len(plan.queries) * self.candidates(plan, plan.level)
        spent = size + calibrate.calibration_size(size)
        extra = max(costs.confirmation_queries(scanned_pairs(plan.join, plan.probes), dims, rescored,
                                               len(plan.pool), spent),
                    calibrate.confirmation_floor(size, spent, len(plan.pool)))
        if p in self.calibrated_on:  # a pass computed again: none of its calibration's or check's queries
            sample_c = calibrate.fresh_sample(plan.queries, extra, np.concatenate([self.calibrated_on[p], sample_b]),
                                              salt=(p, self.stats["passes"], 1))
        else:
            sample_c = calibrate.confirmation_sample(plan.queries, size, extra, salt=p)
        if len(sample_c) < max(1, size // 4):  # too few to narrow the interval much
            return None
        return sample_c, self.sample_top_k(plan, p, self.sample_name(f"confirmation-{len(sample_c)}", p), sample_c)

    def sample_name(self, name: str, p) -> str:
        """A sample's name in the cycle's cache: a pass computed again draws its own."""
        return f"{name}-pass-{self.stats['passes']}" if p in self.calibrated_on else name


def stage_in_passes(opts, profile, group, features, root: str, stats: dict | None = None,
                    want_result: bool = True, open_pass=None, on_short=None):
    """stage_matches in passes, as a cycle runs it: a pass whose check falls short of the target
    while a wider search is allowed is computed again wider (the plans that met it kept), each
    pass under its own folder of `root`, so that a killed run resumes the pass it was in.
    `open_pass(staging)` gives the pass's on_block (the cycle's edge writer), `on_short(stats)`
    hears of a pass that fell short. Returns the last pass's (neighbours, scores) and `stats`
    (its "passes" counted)."""
    stats = {} if stats is None else stats
    stats.update(passes=1)
    previous = None
    while True:
        staging = pass_staging(root, stats["passes"])
        on_block = open_pass(staging) if open_pass else None
        nb, sc = stage_matches(opts, profile, group, features, staging, stats, on_block=on_block,
                               want_result=want_result, redo=stats.get("redo") if previous else None,
                               previous=previous)
        if stats["redo"] is None:
            return nb, sc, stats
        if on_short:
            on_short(stats)
        stats["passes"] += 1
        previous = staging


def pass_staging(root: str, number: int) -> str:
    """The staging folder of a group's pass `number` (from 1), so that a killed run resumes the
    pass it was in (the passes before it are found complete and give the same decisions)."""
    return os.path.join(root, f"pass-{number}")


def summarise_quality(opts, plans, stats: dict) -> None:
    """The group's recall: its worst plan's estimate (both sides of a bipartite group, every
    value of a required key must keep the target); where it fell short, the level to redo from
    or, at the widest allowed, a warning."""
    qualities = [plan.quality for plan in plans]
    worst = min(qualities, key=lambda q: q.recall, default=None)
    short = [q for q in qualities if q.recall < opts.target_recall]
    # The check is strict where calibration was lenient: below the target on sample B, a plan is
    # computed again wider where a wider search is allowed (seen: 0.982 on A at the narrowest,
    # 0.971 delivered); the plans that met it are kept. A plan that searched without its
    # required keys' filter gets the filter first, at the same level (strict member of
    # population.FAMILY at 100,000 nodes: 0.970 delivered unfiltered at the narrowest level
    # after 0.981 on A; widening unfiltered took three more passes).
    redo = {}
    for p, q in enumerate(qualities):
        if q.recall >= opts.target_recall:
            continue
        if q.filtered is False:
            redo[p] = (q.level, True)
        elif not q.widest:
            redo[p] = (q.level + 1, bool(q.filtered))
    stats["redo"] = redo or None
    stats["plan_qualities"] = qualities
    if redo:  # only the plans computed again need their lists and samples
        for by_plan in (stats["search_cache"]["plans"], stats["search_cache"]["samples"]):
            for p in set(by_plan) - set(redo):
                del by_plan[p]
    else:
        stats.pop("search_cache", None)
    warning = None
    if short and not redo:
        warning = (f"recall estimate {worst.recall:.4f} (95% lower bound {worst.lower_95:.4f}) is below the target "
                   f"{opts.target_recall} at the widest search allowed"
                   + (f" (--max-candidates {opts.max_candidates})" if opts.max_candidates else
                      f" (pool of {worst.pool} nodes, above the exact fallback's {calibrate.EXACT_FALLBACK_MAX})"))
    stats["quality"] = {
        "recall_estimate": round(worst.recall, 5) if worst else 1.0,
        "recall_lower_95": round(worst.lower_95, 5) if worst else 1.0,
        "target_recall": opts.target_recall, "exact": all(q.level == calibrate.EXACT for q in qualities),
        "warning": warning, "plans": [q.to_json() for q in qualities],
    }


SEARCH_ROWS = 65_536  # query rows searched at once at most (consecutive staging blocks)


BATCHES_MIN = 4  # a group is cut into at least this many search batches where it has the blocks


def search_batches(blocks: int, block_rows: int) -> list:
    """The search batches: runs of consecutive blocks, fixed by the group's size and the block
    size alone. A query's candidates come from matrix products shared with the other queries
    of its batch, whose rounding depends on their shapes (a list probed by one query of a
    batch is a vector product), so the batches must not depend on the thread count or on
    which blocks a killed run had finished: a near-tie would fall the other way. At most
    SEARCH_ROWS rows a batch, and BATCHES_MIN batches at least (two per thread on 2 cores)."""
    per_batch = max(1, min(SEARCH_ROWS // block_rows, -(-blocks // BATCHES_MIN)))
    return [list(range(first, min(blocks, first + per_batch))) for first in range(0, blocks, per_batch)]
