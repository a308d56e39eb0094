"""A cycle's output: its edges as Parquet shards (`--output`), or through the cycle's load
table (filled by the writer process, mtool/match/writer.py) into the group's partition, swapped
in with the cycle's COMPLETED row in one transaction."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone

import numpy as np

from mtool import faults
from mtool.db import matches as pm
from mtool.db.connection import Database
from mtool.match import cycles
from mtool.match.writer import edge_columns


def edge_table(group, cycle_id, neighbors, scores):
    """The top-K edges as an Arrow table in the import contract."""
    import pyarrow as pa

    refs = pa.array(group.reference_ids, pa.string())
    sources, targets, kept = edge_columns(refs, np.arange(len(neighbors)), neighbors, scores)
    m = len(sources)
    return pa.table({
        "group_id": pa.array([group.group_id] * m, pa.string()),
        "domain_id": pa.array([group.domain_id] * m, pa.string()),
        "processing_cycle_id": pa.array([cycle_id] * m, pa.string()),
        "reference_id": sources,
        "matched_reference_id": targets,
        "compatibility_score": pa.array(kept, pa.float32()),
    })


def write_parquet(path: str, group, cycle_id, neighbors, scores) -> int:
    """Append this group's edges to <path> as <path>/<group>.parquet (a directory of shards that
    `mtool ingest <path>` imports), written to a temporary name and renamed."""
    import pyarrow.parquet as pq

    table = edge_table(group, cycle_id, neighbors, scores)
    target = path[:-len(".parquet")] if path.endswith(".parquet") else path
    os.makedirs(target, exist_ok=True)
    final = os.path.join(target, f"{group.group_id}.parquet")
    pq.write_table(table, final + ".tmp")
    os.replace(final + ".tmp", final)
    return table.num_rows


def open_load_table(db: Database, gid: str, cycle_id: str) -> str:
    """A fresh (empty) load table for this cycle of the group: every attempt starts a new one."""
    load = cycles.load_table_name(gid, cycle_id)
    with db.connect(autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {pm.STAGE_SCHEMA}.{load}")
        pm.create_edge_load_table(conn, load, gid)
    return load


def drop_load_table(db: Database, load: str) -> None:
    with db.connect(autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {pm.STAGE_SCHEMA}.{load}")


def swap_cycle(db: Database, group, cycle_id: str, load: str, edges: int, timings, quality: dict) -> None:
    """The loaded edges replace the group's partition, with the cycle's row, in one transaction."""
    with db.connect(autocommit=True) as conn:
        t = time.monotonic()
        pm.complete_edge_columns(conn, load, group.domain_id, cycle_id, datetime.now(timezone.utc))
        pm.prepare_for_swap(conn, group.group_id, load, include_existing=False, edges=True)
        timings["key_s"] = round(time.monotonic() - t, 3)
        faults.crash_point("match-before-swap")
        with conn.transaction():
            _participated(conn, group, cycle_id, timings)  # before the DDL's locks (cycles.participated)
            faults.delay_point("match-participated")
            t = time.monotonic()
            pm.swap_in(conn, group.group_id, load)
            timings["swap_s"] = round(time.monotonic() - t, 3)  # recorded with the cycle: up to its row
            cycles.completed(conn, group.group_id, cycle_id, len(group), edges, timings, quality)


def cycle_completed(conn, gid, cycle_id, nodes, edges, timings, group, quality: dict) -> None:
    with conn.transaction():
        _participated(conn, group, cycle_id, timings)
        cycles.completed(conn, gid, cycle_id, nodes, edges, timings, quality)


def _participated(conn, group, cycle_id: str, timings: dict) -> None:
    t = time.monotonic()
    cycles.participated(conn, group.group_id, cycle_id, group)
    timings["participation_s"] = round(time.monotonic() - t, 3)
