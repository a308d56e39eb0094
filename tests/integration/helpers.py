"""Helpers shared by the integration tests: writing match files, reading the table back."""

from __future__ import annotations

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

G1 = "aaaaaaaa-0000-4000-8000-000000000001"
G2 = "aaaaaaaa-0000-4000-8000-000000000002"
DOMAIN = "dddddddd-0000-4000-8000-000000000001"


def write(path, rows, schema=None, row_group_size=None, **kw):
    """rows: list of dicts (contract column names) or a pyarrow Table."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path), row_group_size=row_group_size, **kw)
    return str(path)


def matches(dsn, group=None):
    """{(group, ref, matched): score} of potential_matches, scores rounded like float4."""
    with psycopg.connect(dsn) as conn:
        q = "SELECT group_id::text, reference_id, matched_reference_id, compatibility_score FROM potential_matches"
        rows = conn.execute(q + (" WHERE group_id = %s" if group else ""), (group,) if group else ()).fetchall()
    return {(g, r, m): round(s, 5) for g, r, m, s in rows}


def full_rows(dsn):
    with psycopg.connect(dsn) as conn:
        return sorted(conn.execute(
            "SELECT group_id::text, domain_id::text, processing_cycle_id, reference_id, matched_reference_id, "
            "compatibility_score, matched_at FROM potential_matches").fetchall())


def job_row(dsn, job_id=None):
    with psycopg.connect(dsn) as conn:
        conn.row_factory = psycopg.rows.dict_row
        q = "SELECT * FROM import_jobs" + (" WHERE job_id = %s" if job_id else " ORDER BY created_at DESC LIMIT 1")
        return conn.execute(q, (job_id,) if job_id else ()).fetchone()


def rows_for(group, n, start=0, score=0.5, prefix="u"):
    return [{"group_id": group, "domain_id": DOMAIN, "reference_id": f"{prefix}{i}",
             "matched_reference_id": f"m{i}", "compatibility_score": score} for i in range(start, start + n)]
