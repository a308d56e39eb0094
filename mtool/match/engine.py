"""`mtool match`: per group, one match cycle.

For each selected group (all groups by default, `--shard i/N` takes those whose hash falls in
its shard): take the group's advisory lock (a group another process holds is skipped), load and
encode its nodes, then for each block of query nodes: candidates (exact or FAISS), exact
rescoring with the compatibility kernel, deterministic top-K, written to Zarr staging arrays
`neighbors[N,K]`, `scores[N,K]` chunked by block, with a done-marker per block. A killed run
resumes from the done blocks (the unfinished cycle's id is reused). The group's top-K edges
are COPYed into a load table as blocks finish (writer.py) and that table replaces the group's
partition in one transaction with the cycle's COMPLETED row (output.py): readers see the old
cycle until then, only the new one after.
A failing group is retried with backoff, then marked FAILED while the others go on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from mtool import faults
from mtool.db import matches as pm
from mtool.db.connection import Database, Session
from mtool.errors import InvalidInput, MtoolError
from mtool.match import calibrate, costs, cycles
from mtool.match import encode as enc
from mtool.match import nodes as node_repo
from mtool.match.output import cycle_completed, drop_load_table, open_load_table, swap_cycle, write_parquet
from mtool.match.rescore import SCAN_QUERIES, top_k_for, work_features_on
from mtool.match.search import ListJoin, PatternJoin, RequiredKeys, compute_pool, reuse_freed_memory, take_rows
from mtool.match.writer import EdgeWriter

log = logging.getLogger(__name__)
GROUP_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0


@dataclass(frozen=True)
class MatchOptions:
    profile: object
    device: object
    domain_ids: tuple = ()
    group_ids: tuple = ()
    shard: tuple = (0, 1)
    cycle_id: str | None = None
    output: str | None = None  # a .parquet path: write matches there instead of the database
    target_recall: float = calibrate.DEFAULT_TARGET  # recall@K each approximate plan is calibrated and checked for
    max_candidates: int | None = None  # candidates per query at most (a ceiling on the search's work)
    recall_sample: int = calibrate.DEFAULT_SAMPLE  # queries of the check's sample at least (calibrate.sample_size)
    block_rows: int = 16384  # staging chunk (resume unit); search batches join up to 4 (SEARCH_ROWS)
    staging_dir: str = "."
    threads: int | None = None  # compute threads per group process (default: CPUs / workers)
    workers: int = 1  # groups processed at once, each in its own process (1: inline)
    allow_empty: bool = False  # let a cycle with no edge replace the group's matches (else SKIPPED)
    force: bool = False  # compute a group whose nodes, profile and options are its last COMPLETED cycle's
    metrics: object = None  # mtool.metrics.MatchMetrics (kept in the parent)
    on_nodes: object = None  # on_nodes(count) as each block of `count` query nodes is done (inline runs only)


@dataclass
class GroupResult:
    group_id: str
    status: str  # COMPLETED, FAILED, SKIPPED, UNCHANGED (nothing changed since its last cycle: no work)
    cycle_id: str | None = None
    nodes: int = 0
    edges: int = 0
    seconds: float = 0.0
    error: str | None = None
    empty: bool = False  # SKIPPED because the cycle found no edge (exit 3), not for a lock
    quality: dict | None = None  # the recall estimate and the search each plan used (calibrate.py)
    timings: dict = field(default_factory=dict)  # seconds per stage (load, encode, ..., key, swap)
    graph_build_s: float | None = None
    block_seconds: list = field(default_factory=list)


@dataclass
class MatchSummary:
    groups: list = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(g.status == "FAILED" for g in self.groups)

    @property
    def empty(self) -> int:
        return sum(g.empty for g in self.groups)

    def to_json(self) -> dict:
        return {"groups": [g.__dict__ for g in self.groups], "failed": self.failed,
                "completed": sum(g.status == "COMPLETED" for g in self.groups),
                "skipped": sum(g.status == "SKIPPED" for g in self.groups), "empty": self.empty,
                "unchanged": sum(g.status == "UNCHANGED" for g in self.groups)}


def in_shard(group_id: str, shard: tuple) -> bool:
    index, count = shard
    digest = hashlib.blake2b(uuid.UUID(group_id).bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


def run(db: Database, opts: MatchOptions, on_group=None, on_plan=None) -> MatchSummary:
    """Match every selected group; on_plan({group_id: nodes}) once the groups are known,
    on_group(result) after each (and opts.on_nodes as blocks finish, when groups run inline)."""
    from mtool.db import migrations

    summary = MatchSummary()
    reuse_freed_memory()  # for the loading and encoding too
    session = Session(db)
    try:
        session.run(migrations.check, "check schema")
        groups = session.run(lambda c: node_repo.list_groups(c, opts.domain_ids, opts.group_ids), "list groups")
        if opts.group_ids and not groups:
            raise InvalidInput(f"no nodes in group(s) {', '.join(opts.group_ids)}", hint="import them with "
                               "`mtool nodes import`")
        mine = [g for g in groups if in_shard(g[0], opts.shard)]
        if on_plan:
            on_plan({gid: count for gid, _, count in mine})
        # A group unchanged since a COMPLETED cycle with this profile passed these checks then:
        # only the others are checked (the numeric keys' scan took 1.3 s per 1M nodes). Each
        # group asks again under its lock (_run_group_with_retries): its nodes may change between.
        changed = [g for g, _, _ in mine] if opts.force else session.run(
            lambda c: [g for g, _, _ in mine if not cycles.unchanged_since(
                c, g, cycles.option_inputs(opts), node_repo.node_version(c, g))], "find changed groups")
        if changed:
            session.run(lambda c: check_profile_fits(c, opts.profile, changed), "check profile")
    finally:
        session.close()

    def record(result: GroupResult) -> None:
        summary.groups.append(result)
        if opts.metrics:
            opts.metrics.cycles.labels(result.status).inc()
            opts.metrics.generated.labels(result.group_id).inc(result.edges)
            if result.quality:
                opts.metrics.recall.labels(result.group_id).set(result.quality["recall_estimate"])
            if result.graph_build_s is not None:
                opts.metrics.graph_build.labels(result.group_id).observe(result.graph_build_s)
            for seconds in result.block_seconds:
                opts.metrics.batch.labels(result.group_id).observe(seconds)
        if on_group:
            on_group(result)

    if opts.workers <= 1 or len(mine) <= 1:
        for gid, did, _ in mine:
            record(match_group(db, opts, gid, did))
        return summary
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from dataclasses import replace

    per_process = replace(opts, metrics=None, on_nodes=None,
                          threads=opts.threads or max(1, (os.cpu_count() or 1) // opts.workers))
    with ProcessPoolExecutor(max_workers=opts.workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(match_group, db, per_process, gid, did) for gid, did, _ in mine]
        for future in as_completed(futures):
            record(future.result())
    return summary


def match_group(db: Database, opts: MatchOptions, gid: str, did: str) -> GroupResult:
    """One group's cycle (locked, retried); a process entry point, so it takes plain values."""
    session = Session(db)
    try:
        return _run_group_with_retries(session, db, opts, gid, did)
    finally:
        session.close()


def check_profile_fits(conn, profile, group_ids) -> None:
    """Refuse a profile that does not fit the selected groups' nodes, before any work: a key no
    node carries, or a numeric key with a value that does not parse as a finite number."""
    where = f"profile {profile.source}"
    for spec in profile.keys:
        has = conn.execute("SELECT EXISTS (SELECT 1 FROM nodes WHERE group_id = ANY(%s::uuid[]) AND metadata ? %s)",
                           (group_ids, spec.name)).fetchone()[0]
        if not has:
            raise InvalidInput(f"{where}: no node of the selected groups has key {spec.name!r}",
                               hint="fix the key's name in the profile, or import nodes that carry it")
        if spec.type == "numeric":
            bad = conn.execute(
                "SELECT metadata->>%s FROM nodes WHERE group_id = ANY(%s::uuid[]) AND metadata ? %s AND NOT "
                "(metadata->>%s ~ '^\\s*[-+]?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][-+]?[0-9]+)?\\s*$') LIMIT 1",
                (spec.name, group_ids, spec.name, spec.name)).fetchone()
            if bad:
                raise InvalidInput(f"{where}: numeric key {spec.name!r} has value {bad[0]!r}, which does not parse as "
                                   "a number", hint="make the key categorical, or fix the node data")
    if not profile.keys and not conn.execute(
            "SELECT EXISTS (SELECT 1 FROM nodes WHERE group_id = ANY(%s::uuid[]) AND embedding IS NOT NULL)",
            (group_ids,)).fetchone()[0]:
        raise InvalidInput(f"{where}: the profile compares embeddings only and no node has one")
    if profile.bipartite:
        key = profile.partition.key
        if not conn.execute("SELECT EXISTS (SELECT 1 FROM nodes WHERE group_id = ANY(%s::uuid[]) AND metadata ? %s)",
                            (group_ids, key)).fetchone()[0]:
            raise InvalidInput(f"{where}: no node of the selected groups has the partition key {key!r}")


def _run_group_with_retries(session, db, opts, gid, did) -> GroupResult:
    lock_key = pm.group_lock_key(gid)
    if not session.run(lambda c: c.execute("SELECT pg_try_advisory_lock(%s)", (lock_key,)).fetchone()[0], "lock"):
        log.info("group %s is being processed by another process: skipped", gid, extra={"group_id": gid})
        return GroupResult(gid, "SKIPPED", error="locked by another process")

    def relock(conn):
        # A reconnect (server restart) loses session locks: take it back, or give the group up.
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key,)).fetchone()[0]:
            raise MtoolError(f"group {gid}: lost its lock to another process after a reconnect")

    session.on_connect = relock
    try:
        if not opts.force:
            version = session.run(lambda c: node_repo.node_version(c, gid), "read node version")
            done = session.run(lambda c: cycles.unchanged_since(c, gid, cycles.option_inputs(opts), version),
                               "check unchanged")
            if done:
                reason = (f"unchanged since cycle {done[0]}: same nodes (version {version}), profile and options; "
                          "its matches stay (--force computes the group again)")
                log.info("group %s: %s", gid, reason, extra={"group_id": gid, "cycle_id": done[0]})
                return GroupResult(gid, "UNCHANGED", done[0], done[1], error=reason)
        t0 = time.monotonic()
        timings = {}
        profile = opts.profile
        keys = [s.name for s in profile.keys] + ([profile.partition.key] if profile.partition else [])
        try:
            group = session.run(lambda c: node_repo.load_group(c, gid, keys, db.connect), "load nodes")
            timings["load_s"] = round(time.monotonic() - t0, 3)
            t_encode = time.monotonic()
            features = enc.encode(profile, group)
            timings["encode_s"] = round(time.monotonic() - t_encode, 3)
            cycle_inputs = cycles.inputs(opts, group)
            fp = cycles.fingerprint(cycle_inputs)
            resume, stale = session.run(lambda c: cycles.choose(c, gid, fp, opts.cycle_id), "choose cycle")
            cycles.remove_leftovers(db, opts.staging_dir, gid, stale)
        except Exception as exc:  # noqa: BLE001 - the group's nodes cannot be matched; the others go on
            error = str(exc) if isinstance(exc, MtoolError) else f"{type(exc).__name__}: {exc}"
            cycle_id = opts.cycle_id or str(uuid.uuid4())
            log.warning("group %s: loading its nodes failed: %s", gid, error, extra={"group_id": gid})
            session.run(lambda c: cycles.started(c, gid, did, cycle_id, None, {}), "start cycle")
            session.run(lambda c: cycles.failed(c, gid, cycle_id, error), "fail cycle")
            return GroupResult(gid, "FAILED", cycle_id, error=error)
        cycle_id = resume or opts.cycle_id or str(uuid.uuid4())
        if resume:
            log.info("group %s: resuming cycle %s (same inputs)", gid, cycle_id, extra={"group_id": gid})
        error = None
        for attempt in range(1, GROUP_ATTEMPTS + 1):
            t_attempt = time.monotonic()
            try:
                session.run(lambda c: cycles.started(c, gid, did, cycle_id, fp, cycle_inputs), "start cycle")
                stats: dict = {}
                attempt_timings = dict(timings)  # per stage, in seconds (README "Where a cycle's time goes")
                edges, empty = _run_group(session, db, opts, group, features, cycle_id, stats, attempt_timings)
                status = "SKIPPED" if empty else "COMPLETED"
                return GroupResult(gid, status, cycle_id, len(group), edges, time.monotonic() - t_attempt,
                                   error=empty, empty=bool(empty), quality=stats.get("quality"),
                                   timings=attempt_timings,
                                   graph_build_s=stats.get("graph_build_s"),
                                   block_seconds=stats.get("block_seconds", []))
            except MtoolError as exc:
                error = str(exc)
                if not exc.retryable:
                    break
            except Exception as exc:  # noqa: BLE001 - one group's failure must not stop the others
                error = f"{type(exc).__name__}: {exc}"
            log.warning("group %s attempt %d failed: %s", gid, attempt, error, extra={"group_id": gid})
            if attempt < GROUP_ATTEMPTS:
                time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        session.run(lambda c: cycles.failed(c, gid, cycle_id, error), "fail cycle")
        return GroupResult(gid, "FAILED", cycle_id, error=error)
    finally:
        session.run(lambda c: c.execute("SELECT pg_advisory_unlock(%s)", (lock_key,)), "unlock")


def _no_edge_reason(profile, group) -> str | None:
    """Why a cycle cannot find any edge, known before computing: a bipartite side is empty."""
    if len(group) < 2:
        return f"{len(group)} node(s): nobody to match"
    if profile.bipartite:
        p = profile.partition
        side = group.metadata[p.key]
        for value in (p.left, p.right):
            if not any(v == value for v in side):
                return f"bipartite: no node has {p.key} = {value!r}, so one side is empty"
    return None


def _run_group(session, db, opts, group, features, cycle_id, stats: dict, timings: dict) -> tuple[int, str | None]:
    """One attempt at the cycle: (edges, None) when the edges replaced the group's, or (0,
    reason) when there was no edge and nothing was replaced (SKIPPED; --allow-empty swaps an
    empty cycle in instead). The cycle is computed in passes (stage_in_passes): a pass that falls
    short of the target computes the plans that fell short again wider, and its load table is
    dropped for the next pass's."""
    profile, gid, n = opts.profile, group.group_id, len(group)
    reason = None if opts.allow_empty else _no_edge_reason(profile, group)
    if reason:
        return _skip(session, gid, cycle_id, n, reason, timings)
    t = time.monotonic()
    root = cycles.staging_path(opts.staging_dir, cycle_id, gid)
    writer = load = None

    def open_pass(staging: str):
        """Edges stream into a fresh load table as blocks finish (mtool/match/writer.py); a
        pass computed again starts a new one (the previous pass's writer is stopped)."""
        nonlocal writer, load
        if writer is not None:
            writer.abort()
            writer = None
        if opts.output:
            return None
        load = db.retry(lambda: open_load_table(db, gid, cycle_id), "create load table")
        writer = EdgeWriter(db, load, group, staging, opts.block_rows)
        return writer.send

    def short(stats: dict) -> None:
        log.warning("group %s: recall estimate %.4f is below the target %s: computing %d of its %d search plans "
                    "again with a wider search (%s), keeping the others", gid, stats["quality"]["recall_estimate"],
                    opts.target_recall, len(stats["redo"]), len(stats["plan_qualities"]), ", ".join(
                        f"plan {p}: level {lv}" + (", required keys filtered" if f else "")
                        for p, (lv, f) in sorted(stats["redo"].items())),
                    extra={"group_id": gid, "cycle_id": cycle_id})

    try:
        neighbors, scores, _ = stage_in_passes(opts, profile, group, features, root, stats,
                                               want_result=bool(opts.output), open_pass=open_pass, on_short=short)
        quality = dict(stats["quality"], passes=stats["passes"])
        for key, name in (("graph_build_s", "lists_s"), ("calibration_s", "calibration_s"),
                          ("search_s", "search_s"), ("rescore_s", "rescore_s"), ("check_s", "check_s")):
            timings[name] = round(stats.get(key, 0.0), 3)
        timings["match_s"] = round(time.monotonic() - t, 3)  # compute: the stages above and the vectors
        t = time.monotonic()
        if opts.output:
            edges = int(np.count_nonzero(neighbors >= 0))
            if edges or opts.allow_empty:
                edges = write_parquet(opts.output, group, cycle_id, neighbors, scores)
                session.run(lambda c: cycle_completed(c, gid, cycle_id, n, edges, timings, group, quality),
                            "complete cycle")
        else:
            edges = writer.finish()
            writer = None
            timings["write_s"] = round(time.monotonic() - t, 3)  # the COPY's tail after the last block
            if edges or opts.allow_empty:
                db.retry(lambda: swap_cycle(db, group, cycle_id, load, edges, timings, quality), "commit cycle")
            else:
                db.retry(lambda: drop_load_table(db, load), "drop load table")
    finally:
        if writer is not None:
            writer.abort()
    shutil.rmtree(root, ignore_errors=True)
    stats["quality"] = quality
    if not edges and not opts.allow_empty:
        return _skip(session, gid, cycle_id, n, "no pair of nodes could be compared: every pair lacks a common key "
                     "or is excluded by a required key", timings)
    if opts.output:
        timings["write_s"] = round(time.monotonic() - t, 3)
    if quality["warning"]:
        log.warning("group %s: %s", gid, quality["warning"], extra={"group_id": gid, "cycle_id": cycle_id})
    log.info("group %s: %d nodes, %d edges, recall estimate %.4f (95%% lower bound %.4f, target %s), cycle %s (%s)",
             gid, n, edges, quality["recall_estimate"], quality["recall_lower_95"], opts.target_recall, cycle_id,
             timings, extra={"group_id": gid, "cycle_id": cycle_id})
    return edges, None


def _skip(session, gid, cycle_id, n, reason: str, timings: dict) -> tuple[int, str]:
    reason = f"no edge to write, previous matches kept: {reason} (--allow-empty replaces them with none)"
    session.run(lambda c: cycles.skipped(c, gid, cycle_id, n, reason, timings), "skip cycle")
    log.warning("group %s: SKIPPED, %s", gid, reason, extra={"group_id": gid, "cycle_id": cycle_id})
    return 0, reason


# -- compute -------------------------------------------------------------------------------

def _sides(profile, group, features) -> list[tuple[np.ndarray, np.ndarray]]:
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


def _plans(opts, profile, group, features, stats: dict, kept: Kept | None = None) -> tuple[list, np.ndarray | None,
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
    for queries, pool in _sides(profile, group, features):
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


def exact_plan(queries: int, pool: int, dims: int, k: int, sample: int) -> bool:
    """Whether a plan scores its whole pool (costs.py: the cheaper path by counted work)."""
    return costs.exact_is_cheaper(queries, pool, dims, k, sample)


def _work_order(plans: list, n: int) -> np.ndarray:
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


def _saved_order(staging: str, plans: list) -> np.ndarray:
    """The processing order of the nodes, saved before the first block (a resumed run reads it:
    its blocks and done-markers must mean the same nodes)."""
    path = os.path.join(staging, "order.npy")
    if os.path.exists(path):
        return np.load(path)
    order = np.concatenate([plan.queries for plan in plans]) if plans else np.zeros(0, np.int64)
    np.save(path + ".tmp.npy", order)
    os.replace(path + ".tmp.npy", path)
    return order


def _staging_array(staging: str, name: str, rows: int, k: int, block: int, dtype: str, fill):
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
    xp = opts.device.xp
    stats = {} if stats is None else stats
    reuse_freed_memory()
    n, k = len(group), profile.k
    os.makedirs(os.path.join(staging, "done"), exist_ok=True)
    block = opts.block_rows
    kept = None if redo is None else Kept.of(previous, redo, len(stats["plan_qualities"]))
    plans, vecs, presence = _plans(opts, profile, group, features, stats, kept)
    work = _work_order(plans, n)
    position = np.empty(n, np.int64)
    position[work] = np.arange(n)
    order = _saved_order(staging, plans)
    if kept is not None and not np.array_equal(order, kept.order):
        raise RuntimeError("a pass's processing order differs from the previous pass's: its plans cannot be kept")
    plan_starts = np.cumsum([0] + [len(plan.queries) for plan in plans])
    staged_nb = _staging_array(staging, "neighbors.zarr", len(order), k, block, "int32", -1)
    staged_sc = _staging_array(staging, "scores.zarr", len(order), k, block, "float32", float("-inf"))
    rank = xp.asarray(work)  # nodes are sorted by reference_id: a node's index is its rank
    # Only rescoring reads the features in work order: they are copied while the first batches
    # search (at 1M nodes the copy took 0.2-1 s, most of it first touches of fresh memory).
    loader = ThreadPoolExecutor(1)
    work_features = loader.submit(work_features_on, features, work, xp)
    loader.shutdown(wait=False)
    slot = np.zeros(n, np.int64)  # a query's row in its plan's probes (plans' queries are disjoint)
    for plan in plans:
        slot[plan.queries] = np.arange(len(plan.queries))
    symmetric = not profile.bipartite

    def query_vectors(plan, nodes):
        # one symmetric pool: the queries are the pool, whose vectors the join holds in list order
        return vecs[nodes] if vecs is not None else take_rows(plan.join.vectors, position[nodes] - plan.offset)

    def to_nodes(nb):
        return np.where(nb >= 0, work[np.maximum(nb, 0)], -1)

    def exact_top_k(plan, nodes):
        """The exact top K (nodes, scores) of a sample of queries over the whole pool, on the
        compute threads (every pair of the sample is scored: the recall check's main cost)."""
        def part(chunk):
            return top_k_for(position[chunk], None, plan.offset, len(plan.pool), work_features.result(), rank, k,
                             xp, symmetric)
        threads = 1 if xp is not np else max(1, opts.threads or os.cpu_count() or 1)
        # a chunk per thread at least, SCAN_QUERIES a chunk at most (pool_top_k's matrix products)
        chunks = np.array_split(nodes, min(len(nodes), max(threads, -(-len(nodes) // SCAN_QUERIES)))) \
            if len(nodes) else [nodes]
        with compute_pool(threads) as pool:
            parts = list(pool.map(part, chunks))
        return to_nodes(np.concatenate([nb for nb, _ in parts])), np.concatenate([sc for _, sc in parts])

    def sample_top_k(plan, p, name, sample):
        """A sample's exact top K, computed once a cycle: a pass that computes the plan again
        draws the same sample."""
        cache = stats["search_cache"]["samples"].setdefault(p, {})
        if name not in cache:
            cache[name] = exact_top_k(plan, sample)
        return cache[name]

    def terms(nodes):
        return None if presence is None else presence.query_terms(nodes)

    def allowed(plan, nodes):
        return None if plan.required is None else plan.required.queries(nodes)

    def searched_top_k(plan, nodes, level, filtered=True):
        qv = query_vectors(plan, nodes)
        count = calibrate.candidates_of(level, k, len(plan.pool), symmetric, opts.max_candidates)
        with compute_pool(1):  # one BLAS/OpenMP thread: the same arithmetic as the blocks'
            found = plan.join.search(qv, plan.join.probes(qv, calibrate.LEVELS[level], terms(nodes)), count,
                                     terms(nodes), allowed(plan, nodes) if filtered else None)
        nb, sc = top_k_for(position[nodes], found, plan.offset, len(plan.pool), work_features.result(), rank, k, xp,
                           symmetric)
        return to_nodes(nb), sc

    t_cal = time.monotonic()
    checks = {}  # plan number: (verification sample, its exact top K)
    for p, plan in enumerate(plans):
        if plan.kept:
            plan.quality = stats["plan_qualities"][p]
            continue
        plan.quality = calibrate.PlanQuality(len(plan.queries), len(plan.pool), calibrate.EXACT, len(plan.pool))
        if plan.join is None:
            continue
        floor, filtered = (redo or {}).get(p, (0, False))
        levels = calibrate.allowed_levels(k, len(plan.pool), floor, opts.max_candidates)
        sample_a, sample_b = calibrate.samples(plan.queries, calibrate.sample_size(opts.recall_sample, len(plan.pool)),
                                               salt=p)
        exact_a = sample_top_k(plan, p, "calibration", sample_a)
        level = None
        if plan.required is not None and filtered:
            plan.quality.filtered = True  # an earlier pass fell short without the filter
        elif plan.required is not None and calibrate.LEVELS[levels[0]] is not None and not calibrate.needs_filter(
                levels[0], opts.target_recall, sample_a, exact_a,
                lambda nodes, lv, plan=plan: searched_top_k(plan, nodes, lv, filtered=False), plan.quality):
            plan.required, level = None, levels[0]  # the narrowest reached the target unfiltered
        if level is None:
            level = calibrate.calibrate(levels, opts.target_recall, sample_a, exact_a,
                                        lambda nodes, lv, plan=plan: searched_top_k(plan, nodes, lv), plan.quality)
        plan.level = plan.quality.level = level
        plan.quality.candidates = calibrate.candidates_of(level, k, len(plan.pool), symmetric, opts.max_candidates)
        plan.quality.widest = level == levels[-1]
        if calibrate.LEVELS[level] is None:
            plan.join = plan.probes = None  # exact fallback: the whole (contiguous) pool
        else:
            checks[p] = (sample_b, sample_top_k(plan, p, "check", sample_b))
            if level > 0:
                plan.probes = plan.join.probes(query_vectors(plan, plan.queries), calibrate.LEVELS[level],
                                               terms(plan.queries))
    stats["calibration_s"] = stats.get("calibration_s", 0.0) + time.monotonic() - t_cal

    def span(b: int) -> tuple[int, int]:
        """Block b's rows of the order."""
        return b * block, min(len(order), (b + 1) * block)

    def plan_rows(first: int, last: int):
        """(plan number, plan, lo, hi) for each plan holding rows of first..last of the order."""
        for p, plan in enumerate(plans):
            lo, hi = max(first, plan_starts[p]), min(last, plan_starts[p + 1])
            if lo < hi:
                yield p, plan, lo, hi

    def search(first: int, last: int) -> dict:
        """Candidates of the rows first..last of the order: {plan: (its first row, candidates)}."""
        found = {}
        for p, plan, lo, hi in plan_rows(first, last):
            if plan.join is not None:
                queries = order[lo:hi]  # the saved order: a resumed run's blocks mean the same nodes
                count = calibrate.candidates_of(plan.level, k, len(plan.pool), symmetric, opts.max_candidates)
                found[p] = (lo, plan.join.search(query_vectors(plan, queries), plan.probes[slot[queries]], count,
                                                 terms(queries), allowed(plan, queries)))
        return found

    def stage_block(b: int, found: dict) -> None:
        """Rescore block b's candidates, stage its top K and mark it done."""
        start, stop = span(b)
        out_nb = np.full((stop - start, k), -1, np.int32)
        out_sc = np.full((stop - start, k), -np.inf, np.float32)
        for p, plan, lo, hi in plan_rows(start, stop):
            if plan.kept:  # as the previous pass staged them (the same order)
                out_nb[lo - start:hi - start] = kept.neighbors[lo:hi]
                out_sc[lo - start:hi - start] = kept.scores[lo:hi]
                continue
            candidates = None  # an exact pool: all of it
            if p in found:
                at, rows = found[p]
                candidates = rows[lo - at:hi - at]
            nb, sc = top_k_for(position[order[lo:hi]], candidates, plan.offset, len(plan.pool),
                                work_features.result(), rank, k, xp, not profile.bipartite)
            out_nb[lo - start:hi - start] = np.where(nb >= 0, work[np.maximum(nb, 0)], -1)
            out_sc[lo - start:hi - start] = sc
        staged_nb[start:stop] = out_nb
        staged_sc[start:stop] = out_sc
        if neighbors is not None:  # kept in memory too: reading 1M nodes' arrays back took ~1 s
            neighbors[order[start:stop]] = out_nb
            scores[order[start:stop]] = out_sc
        with open(os.path.join(staging, "done", f"{b}"), "w"):
            pass
        if on_block:
            on_block(b)
        if opts.on_nodes:
            opts.on_nodes(stop - start)
        faults.crash_point("match-block-done")

    def run_batch(batch: list) -> list:
        """Consecutive blocks searched as one (bigger list-join matrix products: at 1M nodes,
        65,536 query rows searched together took 0.75x the time of 16,384), then staged block
        by block. A query's candidates depend on its own probes only, so the grouping of blocks
        does not change the result. Returns each block's seconds (the batch's time shared out)."""
        t_batch = time.monotonic()
        found = search(span(batch[0])[0], span(batch[-1])[1])
        t_found = time.monotonic()
        batch = [b for b in batch if b in todo_set]  # resuming: the batch is searched whole, as before
        for b in batch:
            stage_block(b, found)
        thread_seconds.append((t_found - t_batch, time.monotonic() - t_found))
        return [(time.monotonic() - t_batch) / len(batch)] * len(batch)

    neighbors = scores = None
    if want_result:  # the caller's (n, k) arrays, indexed by node
        neighbors = np.full((n, k), -1, np.int32)
        scores = np.full((n, k), -np.inf, np.float32)
    blocks = range(-(-len(order) // block))
    todo = [b for b in blocks if not os.path.exists(os.path.join(staging, "done", f"{b}"))]
    todo_set = set(todo)
    finished = sorted(set(blocks) - set(todo))  # by a killed run
    if on_block:  # resuming: blocks a killed run finished are fed again (the load table is new)
        for b in finished:
            on_block(b)
    if opts.on_nodes and finished:  # and count as progress
        opts.on_nodes(sum(stop - start for start, stop in map(span, finished)))
    threads = 1 if xp is not np else max(1, opts.threads or os.cpu_count() or 1)
    batches = [batch for batch in _batches(len(blocks), block) if todo_set.intersection(batch)]
    seconds = stats.setdefault("block_seconds", [])
    thread_seconds = []  # (search, rescoring) seconds of each batch, on its thread
    t_blocks = time.monotonic()
    if xp is not np:
        for batch in batches:
            seconds.extend(run_batch(batch))
    else:  # through the pool also with one thread (compute_pool says why)
        with compute_pool(threads) as pool:
            for done in pool.map(run_batch, batches):
                seconds.extend(done)
    # The blocks' wall time shared out by their threads' seconds: search and rescoring overlap
    # on the compute threads, so each stage's share of the wall time is what a reader can add up.
    blocks_s = time.monotonic() - t_blocks
    searched, rescored = (sum(x) for x in zip(*thread_seconds)) if thread_seconds else (0.0, 0.0)
    share = blocks_s / (searched + rescored) if searched + rescored else 0.0
    stats["search_s"] = stats.get("search_s", 0.0) + searched * share
    stats["rescore_s"] = stats.get("rescore_s", 0.0) + rescored * share
    if neighbors is not None:
        for start, stop in map(span, finished):  # blocks of a killed run: from the staging arrays
            neighbors[order[start:stop]] = staged_nb[start:stop]
            scores[order[start:stop]] = staged_sc[start:stop]
    t_check = time.monotonic()
    at = np.empty(n, np.int64)
    at[order] = np.arange(len(order))
    for p, (sample_b, exact_b) in checks.items():  # what was delivered, against the exact top K
        rows = (at[sample_b], slice(None))
        delivered = (staged_nb.get_orthogonal_selection(rows), staged_sc.get_orthogonal_selection(rows))
        q = plans[p].quality
        q.recall, q.lower_95 = calibrate.recall_bounds(*calibrate.recall_hits(delivered, exact_b))
        q.sample = len(sample_b)
    stats["check_s"] = stats.get("check_s", 0.0) + time.monotonic() - t_check
    _summarise_quality(opts, plans, stats)
    return neighbors, scores


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


def _summarise_quality(opts, plans, stats: dict) -> None:
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


def _batches(blocks: int, block_rows: int) -> list:
    """The search batches: runs of consecutive blocks, fixed by the group's size and the block
    size alone. A query's candidates come from matrix products shared with the other queries
    of its batch, whose rounding depends on their shapes (a list probed by one query of a
    batch is a vector product), so the batches must not depend on the thread count or on
    which blocks a killed run had finished: a near-tie would fall the other way. At most
    SEARCH_ROWS rows a batch, and BATCHES_MIN batches at least (two per thread on 2 cores)."""
    per_batch = max(1, min(SEARCH_ROWS // block_rows, -(-blocks // BATCHES_MIN)))
    return [list(range(first, min(blocks, first + per_batch))) for first in range(0, blocks, per_batch)]
