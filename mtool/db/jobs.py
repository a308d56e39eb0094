"""Import-job repository: the `import_jobs` row and its checkpoints, rejects and groups."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime

from mtool.db.connection import advisory_key

STATUSES = ("PENDING", "PROCESSING", "COMPLETED", "FAILED")
JOB_COLUMNS = ("job_id", "source_uris", "fingerprint", "group_id", "domain_id", "mode", "options", "status",
               "total_rows", "processed_rows", "rejected_rows", "written_rows", "error", "attempts",
               "kafka_topic", "kafka_partition", "kafka_offset", "created_at", "started_at", "finished_at")


@dataclass
class ImportJob:
    job_id: str
    source_uris: list
    fingerprint: str
    group_id: str | None
    domain_id: str | None
    mode: str
    options: dict
    status: str
    total_rows: int | None
    processed_rows: int
    rejected_rows: int
    written_rows: int | None
    error: str | None
    attempts: int
    kafka_topic: str | None
    kafka_partition: int | None
    kafka_offset: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def to_json(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = value.isoformat()
            elif key in ("job_id", "group_id", "domain_id") and value is not None:
                out[key] = str(value)
        return out


def _row_to_job(row) -> ImportJob:
    values = dict(zip(JOB_COLUMNS, row))
    for key in ("job_id", "group_id", "domain_id"):
        if values[key] is not None:
            values[key] = str(values[key])
    return ImportJob(**values)


SELECT_JOB = f"SELECT {', '.join(JOB_COLUMNS)} FROM import_jobs"


def get(conn, job_id: str) -> ImportJob | None:
    row = conn.execute(SELECT_JOB + " WHERE job_id = %s", (job_id,)).fetchone()
    return _row_to_job(row) if row else None


def find_by_fingerprint(conn, fingerprint: str) -> ImportJob | None:
    row = conn.execute(SELECT_JOB + " WHERE fingerprint = %s ORDER BY (status = 'COMPLETED') DESC, created_at DESC "
                       "LIMIT 1", (fingerprint,)).fetchone()
    return _row_to_job(row) if row else None


def list_jobs(conn, status: str | None = None, limit: int = 50) -> list[ImportJob]:
    if status:
        rows = conn.execute(SELECT_JOB + " WHERE status = %s ORDER BY created_at DESC LIMIT %s", (status, limit))
    else:
        rows = conn.execute(SELECT_JOB + " ORDER BY created_at DESC LIMIT %s", (limit,))
    return [_row_to_job(r) for r in rows.fetchall()]


def find_or_create(conn, job_id: str, uris: list, fingerprint: str, group_id, domain_id, mode: str,
                   options: dict, kafka: dict | None = None) -> tuple[ImportJob, bool]:
    """The job for this fingerprint (or this job id), created PENDING if none; (job, created)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("fingerprint", fingerprint),))
        existing = get(conn, job_id) or find_by_fingerprint(conn, fingerprint)
        if existing:
            return existing, False
        kafka = kafka or {}
        conn.execute(
            "INSERT INTO import_jobs (job_id, source_uris, fingerprint, group_id, domain_id, mode, options, "
            "kafka_topic, kafka_partition, kafka_offset) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (job_id, list(uris), fingerprint, group_id, domain_id, mode, json.dumps(options),
             kafka.get("topic"), kafka.get("partition"), kafka.get("offset")),
        )
        return get(conn, job_id), True


def try_lock(conn, job_id: str) -> bool:
    """Session-level lock: one process runs a job at a time; released when the connection ends."""
    return conn.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key("job", job_id),)).fetchone()[0]


def is_locked_elsewhere(conn, job_id: str) -> bool:
    key = advisory_key("job", job_id)
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = %s", (key,)
    ).fetchone()
    return bool(row[0])


def start(conn, job_id: str, total_rows: int) -> None:
    conn.execute(
        "UPDATE import_jobs SET status = 'PROCESSING', total_rows = %s, attempts = attempts + 1, error = NULL, "
        "started_at = coalesce(started_at, now()), finished_at = NULL, updated_at = now() WHERE job_id = %s",
        (total_rows, job_id),
    )


def record_progress(conn, job_id: str) -> tuple[int, int]:
    """Refresh processed/rejected rows and the checkpoint summary from the committed chunks."""
    row = conn.execute(
        "WITH c AS (SELECT coalesce(sum(rows_loaded + rows_rejected), 0) AS processed, "
        "coalesce(sum(rows_rejected), 0) AS rejected, count(*) AS chunks FROM import_checkpoints WHERE job_id = %s) "
        "UPDATE import_jobs j SET processed_rows = c.processed, rejected_rows = c.rejected, "
        "checkpoint = jsonb_build_object('chunks_done', c.chunks), updated_at = now() FROM c "
        "WHERE j.job_id = %s RETURNING j.processed_rows, j.rejected_rows", (job_id, job_id)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def done_chunks(conn, job_id: str) -> set[tuple[int, int, int]]:
    rows = conn.execute("SELECT file_index, row_group, chunk FROM import_checkpoints WHERE job_id = %s", (job_id,))
    return {tuple(r) for r in rows.fetchall()}


def fail(conn, job_id: str, error: str) -> None:
    conn.execute("UPDATE import_jobs SET status = 'FAILED', error = %s, finished_at = now(), updated_at = now() "
                 "WHERE job_id = %s AND status <> 'COMPLETED'", (error[:4000], job_id))


def record_failure(conn, job_id: str, uris: list, group_id, domain_id, error: str, kafka: dict | None = None) -> None:
    """The job ends FAILED with `error`: its row is created FAILED where the import failed before
    it existed (a missing file: no fingerprint to give it), else set FAILED unless COMPLETED."""
    kafka = kafka or {}
    conn.execute(
        "INSERT INTO import_jobs (job_id, source_uris, fingerprint, group_id, domain_id, status, error, kafka_topic, "
        "kafka_partition, kafka_offset, finished_at) VALUES (%s, %s, %s, %s, %s, 'FAILED', %s, %s, %s, %s, now()) "
        "ON CONFLICT (job_id) DO UPDATE SET status = 'FAILED', error = EXCLUDED.error, finished_at = now() "
        "WHERE import_jobs.status <> 'COMPLETED'",
        (job_id, list(uris), f"unresolved:{job_id}", group_id, domain_id, error, kafka.get("topic"),
         kafka.get("partition"), kafka.get("offset")))


def note_interrupted(conn, job_id: str, error: str) -> None:
    """Interrupted jobs stay PROCESSING (they resume); the note says how."""
    conn.execute("UPDATE import_jobs SET error = %s, updated_at = now() WHERE job_id = %s", (error[:4000], job_id))


def complete(conn, job_id: str, written_rows: int) -> None:
    conn.execute("UPDATE import_jobs SET status = 'COMPLETED', error = NULL, written_rows = %s, "
                 "finished_at = now(), updated_at = now() WHERE job_id = %s", (written_rows, job_id))


def groups(conn, job_id: str) -> list[tuple[str, str]]:
    rows = conn.execute("SELECT group_id, load_table FROM import_job_groups WHERE job_id = %s ORDER BY group_id",
                        (job_id,))
    return [(str(g), t) for g, t in rows.fetchall()]


def iter_rejects(conn, job_id: str):
    sources = get(conn, job_id).source_uris
    with conn.cursor(name="rejects") as cur:
        cur.execute("SELECT file_index, row_number, reason, record FROM import_rejects WHERE job_id = %s "
                    "ORDER BY file_index, row_number", (job_id,))
        for file_index, row_number, reason, record in cur:
            yield {"file": sources[file_index] if file_index < len(sources) else file_index,
                   "row": row_number, "reason": reason, "record": record}
