"""Cycle bookkeeping in `match_cycles`: what a cycle is, which one a run resumes, how it ends.

A cycle records its *inputs* (node count and a digest of the loaded node data, the profile, k,
mode, device, block size and the engine's own version) and their fingerprint. A run resumes
the group's newest unfinished (PROCESSING or FAILED) cycle only when that cycle is the newest of
the group and its fingerprint is the run's; otherwise a new cycle starts, PROCESSING cycles left
behind are marked ABANDONED, and every left-behind cycle's staging and load table are removed.
So a resumed run computes exactly what a clean run of the same inputs would, and one failed
cycle never holds its group back.

The block size is part of the fingerprint (a decision, README "How a group is matched"): the
staging arrays, done-markers and search batches are cut by it, and a query's candidate search
shares its matrix products with the other queries of its batch, so another cut may round a
near-tie the other way. Workers and threads are not: they only choose who computes a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from mtool.db import matches as pm

ENGINE_VERSION = 4  # bump when the same inputs would give other results (search, scoring)
RESUMABLE = ("PROCESSING", "FAILED")


def option_inputs(opts) -> dict:
    """What decides a cycle's result besides its nodes: the profile and the options."""
    return {"profile": opts.profile.describe(), "device": getattr(opts.device, "value", str(opts.device)),
            "block_rows": opts.block_rows, "target_recall": opts.target_recall,
            "max_candidates": opts.max_candidates, "recall_sample": opts.recall_sample, "output": opts.output,
            "engine": ENGINE_VERSION}


def inputs(opts, group) -> dict:
    """Everything that decides a cycle's result: the loaded nodes (their count, the digest of
    the data read, the group's node version then) and option_inputs."""
    return {"nodes": len(group), "nodes_digest": group.digest, "nodes_version": group.version,
            **option_inputs(opts)}


def unchanged_since(conn, gid: str, options: dict, version: int | None) -> tuple[str, int] | None:
    """(cycle id, node count) of the group's last COMPLETED cycle when nothing it computed from
    has changed since: the group's node version (migration 0004, bumped by any statement that
    writes its nodes), the profile and the options are the same, and the group's matches are
    still that cycle's (no import replaced them since). Else None: the group must be computed."""
    if version is None:
        return None
    row = conn.execute("SELECT cycle_id, inputs, edge_count FROM match_cycles WHERE group_id = %s AND "
                       "status = 'COMPLETED' ORDER BY finished_at DESC NULLS LAST LIMIT 1", (gid,)).fetchone()
    if row is None or options.get("output") is not None:  # a Parquet output is not checked: computed again
        return None
    cycle_id, recorded, edges = row
    if recorded.get("nodes_version") != version or {k: recorded.get(k) for k in options} != options:
        return None
    if pm.any_cycle_id(conn, gid) != (cycle_id if edges else None):
        return None
    return cycle_id, recorded.get("nodes", 0)


def fingerprint(cycle_inputs: dict) -> str:
    return hashlib.sha256(json.dumps(cycle_inputs, sort_keys=True).encode()).hexdigest()[:32]


def staging_path(staging_dir: str, cycle_id: str, gid: str) -> str:
    return os.path.join(staging_dir, cycle_id, gid)


def load_table_name(gid: str, cycle_id: str) -> str:
    """The cycle's load table in the stage schema (one per group and cycle)."""
    return "m_" + hashlib.blake2b(f"{cycle_id}:{gid}".encode(), digest_size=12).hexdigest()


def choose(conn, gid: str, fp: str, requested: str | None) -> tuple[str | None, list[str]]:
    """(the cycle to resume or None for a new one, the cycles whose leftovers must go).

    With `requested` (--cycle-id): that cycle, resumed when it is unfinished with the same
    fingerprint, else started afresh under that id."""
    rows = conn.execute("SELECT cycle_id, status, fingerprint FROM match_cycles WHERE group_id = %s "
                        "ORDER BY started_at DESC, cycle_id", (gid,)).fetchall()
    resume = None
    if requested is not None:
        mine = [r for r in rows if r[0] == requested]
        if mine and mine[0][1] in RESUMABLE and mine[0][2] == fp:
            resume = requested
    elif rows and rows[0][1] in RESUMABLE and rows[0][2] == fp:
        resume = rows[0][0]
    # Cycles before the newest finished one were cleaned up by the run that made it: only the
    # unfinished ones since then can have staging or a load table left (not every FAILED cycle
    # in the group's history, on every run).
    finished = next((i for i, (_, status, _) in enumerate(rows) if status in ("COMPLETED", "SKIPPED")), len(rows))
    stale = [cid for cid, status, _ in rows[:finished] if status in RESUMABLE and cid != resume]
    if requested is not None and requested != resume and requested not in stale:
        stale.append(requested)  # a finished cycle's id given again: nothing of its old run may stay
    abandoned = [cid for cid, status, _ in rows if status == "PROCESSING" and cid != resume]
    if abandoned:
        conn.execute("UPDATE match_cycles SET status = 'ABANDONED', finished_at = now(), error = coalesce(error, "
                     "'left unfinished; a later run had other inputs or newer work') "
                     "WHERE group_id = %s AND cycle_id = ANY(%s)", (gid, abandoned))
    return resume, stale


def remove_leftovers(db, staging_dir: str, gid: str, cycle_ids) -> None:
    """Staging files and load tables of cycles that will not be resumed."""

    if not cycle_ids:
        return
    with db.connect(autocommit=True) as conn:
        for cid in cycle_ids:
            conn.execute(f"DROP TABLE IF EXISTS {pm.STAGE_SCHEMA}.{load_table_name(gid, cid)}")
    for cid in cycle_ids:
        path = staging_path(staging_dir, cid, gid)
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(path))  # the cycle's folder, once no group is left in it
        except OSError:
            pass


def started(conn, gid, did, cycle_id, fp: str, cycle_inputs: dict) -> None:
    conn.execute("INSERT INTO match_cycles (cycle_id, group_id, domain_id, status, attempts, fingerprint, inputs) "
                 "VALUES (%s, %s, %s, 'PROCESSING', 1, %s, %s) ON CONFLICT (group_id, cycle_id) DO UPDATE "
                 "SET status = 'PROCESSING', attempts = match_cycles.attempts + 1, error = NULL, "
                 "fingerprint = EXCLUDED.fingerprint, inputs = EXCLUDED.inputs, started_at = "
                 "CASE WHEN match_cycles.fingerprint IS DISTINCT FROM EXCLUDED.fingerprint THEN now() "
                 "ELSE match_cycles.started_at END",
                 (cycle_id, gid, did, fp, json.dumps(cycle_inputs)))


def failed(conn, gid, cycle_id, error: str) -> None:
    conn.execute("UPDATE match_cycles SET status = 'FAILED', error = %s, finished_at = now() "
                 "WHERE group_id = %s AND cycle_id = %s", (error[:4000], gid, cycle_id))


def skipped(conn, gid, cycle_id, nodes: int, reason: str, timings: dict) -> None:
    """A cycle that found no edge: recorded, and the group's matches left as they were."""
    conn.execute("UPDATE match_cycles SET status = 'SKIPPED', node_count = %s, edge_count = 0, error = %s, "
                 "timings = %s, finished_at = now() WHERE group_id = %s AND cycle_id = %s",
                 (nodes, reason, json.dumps(timings), gid, cycle_id))


def completed(conn, gid, cycle_id, nodes, edges, timings: dict, quality: dict) -> None:
    """COMPLETED with counts, timings and quality, in the caller's transaction (the swap's, so
    readers see the new cycle and its row at once)."""
    conn.execute("UPDATE match_cycles SET status = 'COMPLETED', node_count = %s, edge_count = %s, timings = %s, "
                 "quality = %s, error = NULL, finished_at = now() WHERE group_id = %s AND cycle_id = %s",
                 (nodes, edges, json.dumps(timings), json.dumps(quality), gid, cycle_id))


def participated(conn, gid, cycle_id, group) -> None:
    """The group's node_participation rows for this cycle, in the caller's transaction. The swap
    writes them before its DDL: DETACH PARTITION holds ACCESS EXCLUSIVE on potential_matches to
    the commit, and this COPY (2.2 s of 1M nodes) would hold every reader of every group."""
    import numpy as np
    import pyarrow as pa

    from mtool.io import load_rows
    from mtool.io import copy as pgcopy

    conn.execute("DELETE FROM node_participation WHERE group_id = %s AND cycle_id = %s", (gid, cycle_id))  # an id reused
    m = len(group.reference_ids)
    payload = pgcopy.encode_rows([pgcopy.uuid_bytes(np.broadcast_to(load_rows.uuid_matrix([gid]), (m, 16))),
                                  pgcopy.text(pa.array(group.reference_ids, pa.string())),
                                  pgcopy.text(pa.repeat(pa.scalar(cycle_id, pa.string()), m))], m)
    with conn.cursor() as cur:
        pgcopy.copy_bytes(cur, "node_participation", ("group_id", "reference_id", "cycle_id"), payload)
