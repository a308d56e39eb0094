"""`mtool match`: per group, one match cycle.

For each selected group (all groups by default, `--shard i/N` takes those whose hash falls in
its shard): take the group's advisory lock (a group another process holds is skipped), load and
encode its nodes, then compute its top K block by block into Zarr staging arrays, each block
with a done-marker (staging.py: the search plans of plans.py, candidates, exact rescoring,
deterministic top K, the recall check, passes). A killed run
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
from dataclasses import dataclass, field

import numpy as np

from mtool.db import matches as pm
from mtool.db.connection import Database, Session
from mtool.errors import InvalidInput, MtoolError
from mtool.match import calibrate, cycles
from mtool.match import encode as enc
from mtool.match import nodes as node_repo
from mtool.match.output import cycle_completed, drop_load_table, open_load_table, swap_cycle, write_parquet
from mtool.match.search import reuse_freed_memory
from mtool.match.staging import stage_in_passes
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
