"""Writing `potential_matches` one group at a time, so that readers never see a mix.

`potential_matches` is partitioned by group. New rows for a group arrive in an unindexed load
table (binary COPY, no index maintenance); committing them takes one of two paths, chosen by
measured cost:
- build: dedupe-sort the rows into a fresh table, build its primary key once over sorted
  data, then swap it in for the group's partition (DETACH old, ATTACH new) in the committing
  transaction. Used by --replace, for a group with no rows yet, and when the new rows are a
  large share of the group (then existing rows are merged into the fresh table).
- merge: INSERT ... ON CONFLICT DO UPDATE, key-sorted, into the existing partition: for a
  small update to a large group.
Both keep the last row for a key (highest `seq`). Every writer of a group holds its advisory
lock (`group_lock_key`) from preparing to committing.
"""

from __future__ import annotations

import uuid

from psycopg import sql

from mtool.db.connection import advisory_key

PARENT = "potential_matches"
PART_SCHEMA = "mtool_part"
STAGE_SCHEMA = "mtool_stage"
# Rebuild instead of merging when the new rows are at least this share of the group's rows:
# a bulk upsert costs about 3-5x a sorted rebuild per row (random index inserts, WAL, bloat).
REBUILD_SHARE = 0.25
COLUMNS = ("group_id", "domain_id", "processing_cycle_id", "reference_id", "matched_reference_id",
           "compatibility_score", "matched_at")
KEY = ("group_id", "reference_id", "matched_reference_id")


def group_lock_key(group_id: str) -> int:
    return advisory_key("group", str(uuid.UUID(str(group_id))))


def lock_groups(conn, group_ids) -> None:
    """Session-level advisory locks on groups, taken in one global order to avoid deadlocks."""
    for gid in sorted(str(g) for g in group_ids):
        conn.execute("SELECT pg_advisory_lock(%s)", (group_lock_key(gid),))


def unlock_groups(conn, group_ids) -> None:
    for gid in sorted(str(g) for g in group_ids):
        conn.execute("SELECT pg_advisory_unlock(%s)", (group_lock_key(gid),))


def partition_name(group_id: str) -> str:
    return f"{PARENT}_{uuid.UUID(str(group_id)).hex}"


def partition_ident(group_id: str) -> sql.Identifier:
    return sql.Identifier(PART_SCHEMA, partition_name(group_id))


def partition_rows_estimate(conn, group_id: str) -> int | None:
    """None when the group has no partition; else its row count (exact when small)."""
    row = conn.execute("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname = %s AND c.relname = %s", (PART_SCHEMA, partition_name(group_id))).fetchone()
    if row is None:
        return None
    if row[0] is None or row[0] < 10_000:  # never analysed (-1) or small: count it
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(partition_ident(group_id))).fetchone()[0]
    return int(row[0])


def deduped_select(load_table: sql.Composable, group_id: str, cycle_default: str, matched_at_default,
                   include_existing: bool) -> sql.Composed:
    """SELECT of the group's rows after 'last row wins' (existing rows rank below new ones)."""
    new_rows = sql.SQL(
        "SELECT seq, domain_id, coalesce(processing_cycle_id, {cycle}) AS processing_cycle_id, reference_id, "
        "matched_reference_id, compatibility_score, coalesce(matched_at, {at}) AS matched_at FROM {load}"
    ).format(cycle=sql.Literal(cycle_default), at=sql.Literal(matched_at_default), load=load_table)
    if include_existing:
        new_rows = sql.SQL(
            "{new} UNION ALL SELECT -1, domain_id, processing_cycle_id, reference_id, matched_reference_id, "
            "compatibility_score, matched_at FROM {part}"
        ).format(new=new_rows, part=partition_ident(group_id))
    return sql.SQL(
        "SELECT DISTINCT ON (reference_id, matched_reference_id) {g}::uuid, domain_id, processing_cycle_id, "
        "reference_id, matched_reference_id, compatibility_score, matched_at FROM ({rows}) s "
        "ORDER BY reference_id, matched_reference_id, seq DESC"
    ).format(g=sql.Literal(str(group_id)), rows=new_rows)


def build_prepared(conn, group_id: str, prepared: str, select: sql.Composed) -> int:
    """Materialise `select` into mtool_stage.<prepared> with its key and partition check; row count.
    Rows arrive in key order, so the key is built over sorted data in one pass."""
    target = sql.Identifier(STAGE_SCHEMA, prepared)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
    # Logged from the start: measured faster than building unlogged and then SET LOGGED (a rewrite).
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(target, sql.Identifier(PARENT)))
    count = conn.execute(sql.SQL("INSERT INTO {} ({}) {}").format(
        target, sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), select)).rowcount
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (group_id, reference_id, matched_reference_id)")
                 .format(target))
    # Matches the partition constraint, so ATTACH PARTITION skips its validation scan.
    conn.execute(sql.SQL("ALTER TABLE {} ADD CHECK (group_id = {}::uuid)").format(target, sql.Literal(str(group_id))))
    # No ANALYZE: building the key already set reltuples; autovacuum gathers statistics later.
    return count


def swap_in(conn, group_id: str, prepared: str) -> None:
    """Replace the group's partition with the prepared table; call inside the committing
    transaction: readers see the old partition until it commits, then only the new one."""
    part = partition_ident(group_id)
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                          (f"{PART_SCHEMA}.{partition_name(group_id)}",)).fetchone()[0]
    if exists:
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(sql.Identifier(PARENT), part))
        conn.execute(sql.SQL("DROP TABLE {}").format(part))
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
        sql.Identifier(STAGE_SCHEMA, prepared), sql.Identifier(partition_name(group_id))))
    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
        sql.Identifier(STAGE_SCHEMA, partition_name(group_id)), sql.Identifier(PART_SCHEMA)))
    conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
        sql.Identifier(PARENT), part, sql.Literal(str(group_id))))


def merge_into(conn, group_id: str, select: sql.Composed) -> int:
    """Upsert the deduped rows into the group's existing partition (key order: index locality)."""
    updates = sql.SQL(", ").join(
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in COLUMNS if c not in KEY)
    return conn.execute(sql.SQL("INSERT INTO {} ({}) {} ON CONFLICT (group_id, reference_id, matched_reference_id) "
                                "DO UPDATE SET {}").format(
        partition_ident(group_id), sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), select, updates)).rowcount
