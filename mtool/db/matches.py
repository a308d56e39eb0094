"""Writing `potential_matches` one group at a time, so that readers never see a mix.

`potential_matches` is partitioned by group. A job's new rows for a group arrive by binary COPY
in a load table shaped like a partition plus a `seq` column (the row's position in the job, for
"last row wins"), with no index. Committing takes one of two paths, chosen by measured cost:
- build: the load table itself becomes the partition. Its primary key is built once (only if
  that finds duplicate keys are superseded rows deleted first), `seq` is dropped, and in the
  committing transaction the old partition is detached and the load table attached in its
  place. Used by --replace, for a group with no rows yet, and when the new rows are a large
  share of the group (then the group's existing rows are first copied in, ranked below).
- merge: INSERT ... ON CONFLICT DO UPDATE, key-sorted, into the existing partition: for a
  small update to a large group.
Every writer of a group holds its advisory lock (`group_lock_key`) from preparing to committing.
"""

from __future__ import annotations

import uuid

from psycopg import errors, sql

from mtool.db.connection import advisory_key

PARENT = "potential_matches"
PART_SCHEMA = "mtool_part"
STAGE_SCHEMA = "mtool_stage"
# Rebuild instead of merging when the new rows are at least this share of the group's rows:
# a bulk upsert costs several times a key build per row (random index inserts, WAL, bloat).
REBUILD_SHARE = 0.25
COLUMNS = ("group_id", "domain_id", "processing_cycle_id", "reference_id", "matched_reference_id",
           "compatibility_score", "matched_at")
KEY = ("group_id", "reference_id", "matched_reference_id")
EXISTING_ROW_SEQ = -1  # existing rows copied into a rebuild rank below every new row


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


def partition_exists(conn, group_id: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                        (f"{PART_SCHEMA}.{partition_name(group_id)}",)).fetchone()[0]


def any_cycle_id(conn, group_id: str) -> str | None:
    """The processing_cycle_id of one row of the group's partition (None: no row). Read from the
    partition itself, no WHERE: the same question through the parent with `group_id = ...` was
    planned, on a fresh partition without statistics, as a bitmap scan of the whole primary key
    (20M entries, 1.5-1.9 s, twice a run of an unchanged 1M-node group)."""
    if not partition_exists(conn, group_id):
        return None
    row = conn.execute(sql.SQL("SELECT processing_cycle_id FROM {} LIMIT 1").format(partition_ident(group_id))).fetchone()
    return row[0] if row else None


def stage_ident(table: str) -> sql.Identifier:
    return sql.Identifier(STAGE_SCHEMA, table)


def create_load_table(conn, table: str) -> None:
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (seq bigint NOT NULL, LIKE {} INCLUDING DEFAULTS)")
                 .format(stage_ident(table), sql.Identifier(PARENT)))


# A match cycle's load table holds only what differs between its rows, and its group: the
# columns that are one value for the whole cycle are added when it is complete, as catalog
# defaults that need no rewrite (PostgreSQL's "fast default"): its COPY parses and writes half
# the bytes (10M edges: 574 MB of heap instead of 1,347 MB, the server's COPY 6.6 s instead of
# 12.4 s). The group is stored and checked row by row as the COPY goes, so that the swap needs
# no scan to prove the partition constraint (the scan had cost 1 s per 10M edges at the end).
# No `seq` either: a cycle's edges are unique by construction (each node's top K holds a node
# once), so there are no superseded rows to tell apart, and the column's 8 bytes a row would stay
# in the partition after the swap (a dropped column is not rewritten).
EDGE_LOAD_COLUMNS = ("reference_id", "matched_reference_id", "compatibility_score")


def create_edge_load_table(conn, table: str, group_id: str) -> None:
    g = sql.Literal(str(group_id))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (group_id uuid NOT NULL DEFAULT {}::uuid "
                         "CHECK (group_id = {}::uuid), reference_id varchar(255) COLLATE \"C\" NOT NULL, "
                         "matched_reference_id varchar(255) COLLATE \"C\" NOT NULL, compatibility_score real NOT NULL)"
                         ).format(stage_ident(table), g, g))


def complete_edge_columns(conn, table: str, domain_id: str, cycle_id: str, matched_at) -> None:
    """Add the cycle's constant columns to its edge load table: catalog-only (each row reads
    the value stored with the column); the defaults are dropped again, the values stay."""
    load = stage_ident(table)
    values = (("domain_id", "uuid", domain_id), ("processing_cycle_id", "varchar(36)", cycle_id),
              ("matched_at", "timestamptz", matched_at))
    conn.execute(sql.SQL("ALTER TABLE {} ").format(load) + sql.SQL(", ").join(
        sql.SQL("ADD COLUMN IF NOT EXISTS {} {} NOT NULL DEFAULT {}").format(
            sql.Identifier(name), sql.SQL(kind), sql.Literal(value)) for name, kind, value in values))
    conn.execute(sql.SQL("ALTER TABLE {} ").format(load) + sql.SQL(", ").join(
        sql.SQL("ALTER COLUMN {} DROP DEFAULT").format(sql.Identifier(name))
        for name in ("group_id",) + tuple(name for name, _, _ in values)))


def partition_rows(conn, group_id: str) -> int:
    """Rows in the group's partition (0 when it has none): an estimate when large."""
    row = conn.execute("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname = %s AND c.relname = %s", (PART_SCHEMA, partition_name(group_id))).fetchone()
    if row is None:
        return 0
    if row[0] is None or row[0] < 10_000:  # never analysed (-1) or small: count it
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(partition_ident(group_id))).fetchone()[0]
    return int(row[0])


def is_prepared(conn, table: str) -> bool:
    """Whether the load table already has its key (a commit phase ran before and was cut off)."""
    return bool(conn.execute("SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = %s::regclass AND indisprimary)",
                             (f'{STAGE_SCHEMA}."{table}"',)).fetchone()[0])


KEY_BUILD_MEMORY = "512MB"


def prepare_for_swap(conn, group_id: str, table: str, include_existing: bool, edges: bool = False) -> int | None:
    """Turn a load table into a ready partition (key, partition check), in one transaction;
    returns its row count (None for a cycle's edge load table, `edges`: its writer counted them,
    and its partition check came with the table). Idempotent: a prepared table is left as it is."""
    load = stage_ident(table)

    def count():
        return None if edges else conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE seq >= 0").format(load)).fetchone()[0]

    with conn.transaction():
        if is_prepared(conn, table):
            return count()
        if include_existing:
            cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
            conn.execute(sql.SQL("INSERT INTO {} (seq, {}) SELECT {}, {} FROM {}").format(
                load, cols, sql.Literal(EXISTING_ROW_SEQ), cols, partition_ident(group_id)))
        # The key's sort in memory, not in temporary files (the server default is 64MB); a server
        # configured higher keeps its setting.
        conn.execute("SELECT set_config('maintenance_work_mem', %s, true) WHERE "
                     "pg_size_bytes(current_setting('maintenance_work_mem')) < pg_size_bytes(%s)",
                     (KEY_BUILD_MEMORY, KEY_BUILD_MEMORY))
        add_key = sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (group_id, reference_id, matched_reference_id)").format(load)
        try:
            with conn.transaction():  # a savepoint: duplicates are the exception, found by the key build
                conn.execute(add_key)
        except errors.UniqueViolation:
            if edges:  # a cycle's edges are unique by construction: a duplicate is a bug, not input
                raise
            delete_superseded(conn, load)
            conn.execute(add_key)
        if not edges:  # matches the partition constraint, so ATTACH PARTITION skips its validation scan
            conn.execute(sql.SQL("ALTER TABLE {} ADD CHECK (group_id = {}::uuid)").format(load,
                                                                                        sql.Literal(str(group_id))))
        return count()


def delete_superseded(conn, load: sql.Identifier) -> int:
    """Keep only the last row (highest seq) of every key."""
    return conn.execute(sql.SQL(
        "DELETE FROM {load} l USING (SELECT ctid AS row_ctid, row_number() OVER (PARTITION BY reference_id, "
        "matched_reference_id ORDER BY seq DESC) AS rank FROM {load}) r WHERE l.ctid = r.row_ctid AND r.rank > 1"
    ).format(load=load)).rowcount


def swap_in(conn, group_id: str, table: str) -> None:
    """Make the prepared load table the group's partition; call inside the committing
    transaction: readers see the old partition until it commits, then only the new one."""
    part = partition_ident(group_id)
    exists = partition_exists(conn, group_id)
    conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS seq").format(stage_ident(table)))  # catalog-only
    if exists:
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(sql.Identifier(PARENT), part))
        conn.execute(sql.SQL("DROP TABLE {}").format(part))
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(stage_ident(table),
                                                               sql.Identifier(partition_name(group_id))))
    conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
        stage_ident(partition_name(group_id)), sql.Identifier(PART_SCHEMA)))
    conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
        sql.Identifier(PARENT), part, sql.Literal(str(group_id))))


def merge_into(conn, group_id: str, table: str) -> int:
    """Upsert the load table's new rows into the group's partition, last row per key, key order
    (index locality); creates the partition if the group has none."""
    load = stage_ident(table)
    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    updates = sql.SQL(", ").join(
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in COLUMNS if c not in KEY)
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES IN ({})").format(
        partition_ident(group_id), sql.Identifier(PARENT), sql.Literal(str(group_id))))
    return conn.execute(sql.SQL(
        "INSERT INTO {part} ({cols}) SELECT DISTINCT ON (reference_id, matched_reference_id) {cols} FROM {load} "
        "WHERE seq >= 0 ORDER BY reference_id, matched_reference_id, seq DESC "
        "ON CONFLICT (group_id, reference_id, matched_reference_id) DO UPDATE SET {updates}"
    ).format(part=partition_ident(group_id), cols=cols, load=load, updates=updates)).rowcount


def delete_existing_copies(conn, table: str) -> None:
    """Drop rows a rebuild copied from the partition (used when that partition is gone now)."""
    conn.execute(sql.SQL("DELETE FROM {} WHERE seq < 0").format(stage_ident(table)))
