"""Import jobs: Parquet match files into `potential_matches`, exactly once, resumable.

Plan (parent): resolve the URIs, pin each file's fingerprint, find or create the job, take its
lock, check every file's schema before writing anything.
Load (pipeline): reader processes decode row groups in chunks of `batch_rows`, validate rows and
encode binary COPY per group; writer processes COPY each chunk into the job's unindexed load
tables and record the chunk's checkpoint (and its rejects) in the same transaction.
Commit (parent): per group, build-and-swap or merge (see `mtool.db.matches`) and mark the job
COMPLETED in one transaction, so readers see all of a job's groups change at once.

A crash at any point leaves committed chunks and their checkpoints; the next run of the same
command (same fingerprint) or `mtool jobs retry` skips them and ends with the same rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from mtool import faults
from mtool.ingest import contract
from mtool.io import sources
from mtool.db import jobs
from mtool.db import matches as pm
from mtool.db.connection import Database, Session, advisory_key
from mtool.errors import InvalidInput, Interrupted, JobBusy, MtoolError, TooManyRejects, UsageError
from mtool.io.pipeline import Stage
from mtool.io import pipeline

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 100_000  # rows per chunk: ~5-8 MB of COPY data, ~0.3 s of server work
DEFAULT_MAX_REJECTS = 1000
INLINE_MAX_ROWS = 200_000  # jobs with at most this many rows left run without worker processes
PROGRESS_SECONDS = 1.0


def default_workers() -> int:
    return max(2, min(4, os.cpu_count() or 2))


@dataclass(frozen=True)
class IngestOptions:
    uris: tuple
    group_id: str | None = None
    domain_id: str | None = None
    job_id: str | None = None
    mapping: tuple = ()
    max_rejects: int = DEFAULT_MAX_REJECTS
    rejects_file: str | None = None
    workers: int = field(default_factory=default_workers)
    batch_rows: int = DEFAULT_BATCH_ROWS
    replace: bool = False
    dry_run: bool = False
    kafka: dict | None = None  # origin of a job started by an event: topic, partition, offset
    expected_rows: int | None = None  # an event's rowCount: the files must hold exactly this many rows
    checksum: str | None = None  # an event's checksum of the files' bytes, in order: sha256:HEX or md5:HEX
    allowed: object = None  # allowed(sources) raises where a resolved file may not be read (mtool consume)

    def validate(self) -> None:
        from mtool.config import uuid_value

        for name in ("group_id", "domain_id", "job_id"):
            if getattr(self, name) is not None:
                uuid_value(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.batch_rows < 1 or self.workers < 1 or self.max_rejects < 0:
            raise UsageError("--batch-rows and --workers must be positive and --max-rejects not negative")
        if not self.uris:
            raise UsageError("give at least one URI to import")


@dataclass
class ImportResult:
    job_id: str | None
    status: str
    files: int
    total_rows: int
    processed_rows: int
    rejected_rows: int
    written_rows: int | None
    duration_s: float
    already_imported: bool = False
    dry_run: bool = False
    rejects_file: str | None = None
    error: str | None = None

    @property
    def rows_per_s(self) -> float:
        return self.processed_rows / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["rows_per_s"] = round(self.rows_per_s, 1)
        return out


# -- planning ------------------------------------------------------------------------------

@dataclass(frozen=True)
class FilePlan:
    source: sources.Source
    columns: contract.ColumnPlan
    row_group_rows: tuple


def fingerprint(srcs, opts: IngestOptions) -> str:
    """What makes two imports the same import: the pinned files and every option that changes
    the rows written."""
    ident = {"files": [s.fingerprint_part for s in srcs], "group": opts.group_id, "domain": opts.domain_id,
             "replace": opts.replace, "map": sorted(opts.mapping)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def inspect(srcs, opts: IngestOptions) -> list[FilePlan]:
    """Open every file and check its schema against the contract before anything is written."""
    plans = []
    for src in srcs:
        pf = sources.open_parquet(src)
        try:
            plan = contract.check_schema(pf.schema_arrow, opts.mapping, src.uri, opts.group_id, opts.domain_id)
            rows = tuple(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups))
        finally:
            pf.close(force=True)
        plans.append(FilePlan(src, plan, rows))
    return plans


# -- reader stage ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ReaderArgs:
    plans: tuple
    batch_rows: int
    defaults: contract.RowDefaults


@dataclass(frozen=True)
class ReadTask:
    """Chunks [first_chunk, end_chunk) of one row group, less those already committed."""

    file_index: int
    row_group: int
    first_chunk: int
    end_chunk: int
    skip_chunks: frozenset


@dataclass
class ChunkItem:
    file_index: int
    row_group: int
    chunk: int
    rows_in: int
    groups: list
    rejects: list


class ChunkReader:
    """Decodes a row group chunk by chunk into ChunkItems; keeps one file open at a time."""

    def __init__(self, args: ReaderArgs):
        self.args = args
        self.file_index = None
        self.file = None

    def _open(self, file_index: int):
        if self.file_index != file_index:
            self.close()
            self.file = sources.open_parquet(self.args.plans[file_index].source)
            self.file_index = file_index
        return self.file

    def __call__(self, task: ReadTask):
        plan = self.args.plans[task.file_index]
        pf = self._open(task.file_index)
        first_row = sum(plan.row_group_rows[: task.row_group])
        for chunk, batch in enumerate(sources.iter_row_group(pf, task.row_group, self.args.batch_rows,
                                                             plan.source.uri)):
            if chunk >= task.end_chunk:
                break
            rows = batch.num_rows
            if chunk >= task.first_chunk and chunk not in task.skip_chunks:
                prepared = contract.prepare_chunk(batch, plan.columns, task.file_index, first_row,
                                                  self.args.defaults)
                yield ChunkItem(task.file_index, task.row_group, chunk, rows, prepared.groups, prepared.rejects)
            first_row += rows

    def close(self) -> None:
        if self.file is not None:
            self.file.close(force=True)
        self.file, self.file_index = None, None


# -- writer stage ----------------------------------------------------------------------------

@dataclass(frozen=True)
class WriterArgs:
    db: Database | None  # None: dry run, nothing is written
    job_id: str | None


@dataclass
class ChunkResult:
    rows_in: int
    rows_loaded: int
    rows_rejected: int
    rejects: list  # only filled in dry runs (real runs keep them in import_rejects)
    write_s: float
    duplicate: bool = False


def load_table_name(job_id: str, group_id: str) -> str:
    return "l_" + hashlib.blake2b(f"{job_id}:{group_id}".encode(), digest_size=12).hexdigest()


def _epoch_us(ts) -> int:
    """Microseconds since 1970 of a timestamptz, exactly (no float rounding)."""
    from datetime import datetime, timezone

    delta = ts - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class ChunkWriter:
    """Commits chunks into a job's load tables over one connection, reconnecting on
    transient errors; a chunk's rows, rejects and checkpoint commit together or not at all."""

    def __init__(self, args: WriterArgs):
        self.args = args
        self.conn = None
        self.tables: dict[str, str] = {}

    def __call__(self, item: ChunkItem) -> ChunkResult:
        loaded = sum(g.rows for g in item.groups)
        if self.args.db is None:
            return ChunkResult(item.rows_in, loaded, len(item.rejects), item.rejects, 0.0)
        t0 = time.perf_counter()
        try:
            self.args.db.retry(lambda: self._attempt(item), what="commit chunk")
        except _AlreadyCommitted:
            return ChunkResult(item.rows_in, 0, 0, [], 0.0, duplicate=True)
        return ChunkResult(item.rows_in, loaded, len(item.rejects), [], time.perf_counter() - t0)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _attempt(self, item: ChunkItem) -> bool:
        try:
            if self.conn is None or self.conn.closed:
                import psycopg

                self.conn = psycopg.connect(self.args.db.dsn, connect_timeout=10)
                self.conn.execute("SET synchronous_commit = off")  # the checkpoint row is the truth
            for g in item.groups:
                self._ensure_load_table(g.group_id)
            return self._commit(item)
        except _AlreadyCommitted:
            self.conn.rollback()
            raise
        except Exception:
            self.close()
            raise

    def _ensure_load_table(self, group_id: str) -> None:
        if group_id in self.tables:
            return
        conn, job_id = self.conn, self.args.job_id
        name = load_table_name(job_id, group_id)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("job-tables", job_id),))
            conn.execute("INSERT INTO import_job_groups (job_id, group_id, load_table) VALUES (%s, %s, %s) "
                         "ON CONFLICT DO NOTHING", (job_id, group_id, name))
            pm.create_load_table(conn, name)
        conn.commit()
        self.tables[group_id] = f'{pm.STAGE_SCHEMA}."{name}"'

    def _commit(self, item: ChunkItem) -> bool:
        from mtool.io import copy as pgcopy
        from mtool.io.load_rows import LOAD_COLUMNS

        conn = self.conn
        with conn.transaction():
            claimed = conn.execute(
                "INSERT INTO import_checkpoints (job_id, file_index, row_group, chunk, rows_loaded, rows_rejected) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                (self.args.job_id, item.file_index, item.row_group, item.chunk,
                 sum(g.rows for g in item.groups), len(item.rejects))).fetchone()
            if claimed is None:
                raise _AlreadyCommitted()
            with conn.cursor() as cur:
                for g in item.groups:
                    pgcopy.copy_bytes(cur, self.tables[g.group_id], LOAD_COLUMNS, g.payload)
                if item.rejects:
                    cur.executemany(
                        "INSERT INTO import_rejects (job_id, file_index, row_number, reason, record) "
                        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        [(self.args.job_id, item.file_index, row, reason, json.dumps(rec))
                         for row, reason, rec in item.rejects])
        conn.commit()
        faults.crash_point("chunk-committed")
        return True


class _AlreadyCommitted(Exception):
    """The chunk's checkpoint exists: another (orphaned or earlier) writer committed it."""


# -- the job ---------------------------------------------------------------------------------

class Progress:
    """Counts rows as chunks commit; calls back and refreshes the job row now and then."""

    def __init__(self, total: int, done: int, max_rejects: int, callback, refresh, metrics):
        self.total, self.processed, self.rejected = total, done, 0
        self.max_rejects, self.callback, self.refresh, self.metrics = max_rejects, callback, refresh, metrics
        self.dry_rejects: list = []
        self.last = 0.0

    def __call__(self, result: ChunkResult) -> None:
        self.processed += result.rows_in
        self.rejected += result.rows_rejected
        self.dry_rejects += result.rejects
        if self.metrics and not result.duplicate:
            self.metrics.chunk_written(result.rows_loaded, result.write_s)
        if self.callback:
            self.callback(self.processed, self.total)
        now = time.monotonic()
        if self.refresh and now - self.last >= PROGRESS_SECONDS:
            self.last = now
            _, self.rejected = self.refresh()
        if self.rejected > self.max_rejects:
            raise TooManyRejects(f"more than --max-rejects {self.max_rejects} rows were rejected "
                                 f"(at least {self.rejected})", hint="see the rejects file; fix the producer "
                                 "or raise --max-rejects")


def run_import(opts: IngestOptions, db: Database | None, on_progress=None, metrics=None,
               state_dir: str | None = None) -> ImportResult:
    """Import opts.uris as one job; returns the result or raises an MtoolError."""
    opts.validate()
    t0 = time.monotonic()
    srcs = sources.resolve(opts.uris, download_dir=os.path.join(state_dir, "downloads") if state_dir else None)
    if opts.allowed is not None:
        opts.allowed(srcs)
    if opts.dry_run:
        return _dry_run(opts, srcs, on_progress, t0)
    from mtool.db import migrations

    plain = Session(db)
    try:
        plain.run(migrations.check, "check schema")
        options = {"uris": list(opts.uris), "map": [list(m) for m in opts.mapping], "batch_rows": opts.batch_rows,
                   "max_rejects": opts.max_rejects, "replace": opts.replace}
        job, created = plain.run(lambda c: jobs.find_or_create(
            c, opts.job_id or str(uuid.uuid4()), [s.uri for s in srcs], fingerprint(srcs, opts), opts.group_id,
            opts.domain_id, "replace" if opts.replace else "upsert", options, opts.kafka), "create job")
    finally:
        plain.close()
    log.info("import job %s %s", job.job_id, "created" if created else f"found ({job.status})",
             extra={"job_id": job.job_id})
    if job.status == "COMPLETED":
        return _result(job, len(srcs), time.monotonic() - t0, already=True)

    def take_lock(conn):
        if not jobs.try_lock(conn, job.job_id):
            raise JobBusy(f"import job {job.job_id} is being run by another process",
                          hint=f"wait for it, or check `mtool jobs show {job.job_id}`")

    session = Session(db, on_connect=take_lock)
    try:
        session.run(lambda c: None, "lock job")
        result = _run_job(session, db, job, srcs, opts, on_progress, metrics, state_dir, t0)
    except KeyboardInterrupt:
        _best_effort(session, lambda c: jobs.note_interrupted(
            c, job.job_id, f"interrupted; run the same command or `mtool jobs retry {job.job_id}` to resume"))
        raise Interrupted(f"import job {job.job_id} interrupted; it resumes from its checkpoint",
                          hint=f"run the same command again or `mtool jobs retry {job.job_id}`") from None
    except BaseException as exc:
        if isinstance(exc, JobBusy):
            raise
        error = str(exc) if isinstance(exc, MtoolError) else f"{type(exc).__name__}: {exc}"
        if not getattr(exc, "retryable", False):
            _best_effort(session, lambda c: jobs.fail(c, job.job_id, error))
        if metrics:
            metrics.job_finished("FAILED", time.monotonic() - t0, error_type=type(exc).__name__)
        raise
    finally:
        session.close()
    if metrics:
        metrics.job_finished("COMPLETED", result.duration_s)
    return result


def _best_effort(session: Session, fn) -> None:
    try:
        session.run(fn, "record job state")
    except Exception as exc:
        log.error("could not record the job's state: %s", exc)


# A large row group is split into tasks of this many chunks so that every reader has work; a
# reader decodes (without encoding) the chunks before its range, which costs ~15% of encoding them.
CHUNKS_PER_TASK = 3


def _tasks(plans, batch_rows: int, done: set) -> list[ReadTask]:
    tasks = []
    for fi, plan in enumerate(plans):
        for rg, rows in enumerate(plan.row_group_rows):
            chunks = -(-rows // batch_rows)
            for first in range(0, chunks, CHUNKS_PER_TASK):
                end = min(chunks, first + CHUNKS_PER_TASK)
                skip = frozenset(c for c in range(first, end) if (fi, rg, c) in done)
                if len(skip) < end - first:
                    tasks.append(ReadTask(fi, rg, first, end, skip))
    return tasks


def _run_job(session: Session, db, job, srcs, opts, on_progress, metrics, state_dir, t0) -> ImportResult:
    batch_rows = int(job.options.get("batch_rows", opts.batch_rows))  # resume with the job's own chunking
    plans = inspect(srcs, opts)
    total = sum(sum(p.row_group_rows) for p in plans)
    check_announced(srcs, opts, total)
    session.run(lambda c: jobs.start(c, job.job_id, total), "start job")
    refresh = lambda: session.run(lambda c: jobs.record_progress(c, job.job_id), "record progress")  # noqa: E731
    done = session.run(lambda c: jobs.done_chunks(c, job.job_id), "read checkpoint")
    processed_before, _ = refresh()
    tasks = _tasks(plans, batch_rows, done)
    log.info("job %s: %d files, %d rows, %d read tasks (%d chunks already committed)",
             job.job_id, len(plans), total, len(tasks), len(done), extra={"job_id": job.job_id})
    progress = Progress(total, processed_before, opts.max_rejects, on_progress, refresh, metrics)
    defaults = contract.RowDefaults(opts.group_id, opts.domain_id, job.job_id, _epoch_us(job.created_at))
    reader = Stage(ChunkReader, ReaderArgs(tuple(plans), batch_rows, defaults))
    writer = Stage(ChunkWriter, WriterArgs(db, job.job_id))
    try:
        # A small job runs inline: starting reader and writer processes (spawn: each imports
        # NumPy and Arrow) costs more than it saves below INLINE_MAX_ROWS.
        workers = opts.workers if total - processed_before > INLINE_MAX_ROWS else 1
        pipeline.run(tasks, reader, writer, progress, workers=workers)
        processed, rejected = refresh()
        if rejected > opts.max_rejects:
            raise TooManyRejects(f"{rejected} rows were rejected, more than --max-rejects {opts.max_rejects}",
                                 hint="see the rejects file; fix the producer or raise --max-rejects")
    except TooManyRejects as exc:
        refresh()
        path = session.run(lambda c: _write_rejects(c, job.job_id, opts, state_dir), "write rejects")
        raise TooManyRejects(f"{exc.message}; rejected rows are in {path}", exc.hint) from None
    faults.crash_point("before-commit")
    t_commit = time.monotonic()
    log.info("job %s: loaded in %.1f s", job.job_id, t_commit - t0, extra={"job_id": job.job_id})
    written = db.retry(lambda: commit_job(db, job, opts.replace, opts.workers), "commit job")
    if metrics:
        metrics.storage_finished(written, time.monotonic() - t_commit)
    rejects_path = session.run(lambda c: _write_rejects(c, job.job_id, opts, state_dir), "write rejects") \
        if rejected else None
    final = session.run(lambda c: jobs.get(c, job.job_id), "read job")
    return _result(final, len(srcs), time.monotonic() - t0, rejects_file=rejects_path)


def check_announced(srcs, opts: IngestOptions, total: int) -> None:
    """What an event announced of its files (rowCount, checksum) must hold, before any row is written."""
    where = ", ".join(s.uri for s in srcs[:3]) + (f" and {len(srcs) - 3} more" if len(srcs) > 3 else "")
    if opts.expected_rows is not None and total != opts.expected_rows:
        raise InvalidInput(f"{where}: the files hold {total} rows, the event's rowCount says {opts.expected_rows}",
                           hint="the producer announced other files than these; nothing was imported")
    if opts.checksum:
        verify_checksum(srcs, opts.checksum, where)


def verify_checksum(srcs, checksum: str, where: str) -> None:
    """The files' bytes, in order, must hash to `checksum` (sha256:HEX, bare HEX for sha256, or
    md5:HEX). It reads every file once more: the price of an event that names one."""
    algorithm, _, expected = checksum.partition(":") if ":" in checksum else ("sha256", "", checksum)
    digest = hashlib.new(algorithm.lower())
    for src in srcs:
        stream = sources.open_stream(src)
        with (open(stream, "rb") if isinstance(stream, str) else stream) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise InvalidInput(f"{where}: {algorithm} checksum {digest.hexdigest()} differs from the event's {expected}",
                           hint="the file changed or was cut short; nothing was imported")


def commit_job(db: Database, job, replace: bool, workers: int) -> int:
    """Apply the job's load tables to potential_matches and mark it COMPLETED, atomically.
    Safe to repeat after a crash: preparing is idempotent, and a job already COMPLETED
    returns its count."""
    from psycopg import sql

    with db.connect(autocommit=True) as conn:
        current = jobs.get(conn, job.job_id)
        if current.status == "COMPLETED":  # the commit landed but its answer was lost
            return current.written_rows or 0
        groups = jobs.groups(conn, job.job_id)
        pm.lock_groups(conn, [g for g, _ in groups])
        plan = []
        for gid, table in groups:
            existing = 0 if replace else pm.partition_rows(conn, gid)
            if not existing:
                how = "build"
            elif pm.is_prepared(conn, table):
                how = "merge"  # prepared by a run that was cut off; the group changed since
            else:
                staged = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(pm.stage_ident(table))).fetchone()[0]
                how = "rebuild" if staged >= pm.REBUILD_SHARE * existing else "merge"
            plan.append((gid, table, how))
        log.info("job %s: committing %d groups (%s)", job.job_id, len(plan),
                 ", ".join(f"{sum(1 for p in plan if p[2] == h)} {h}" for h in ("build", "rebuild", "merge")
                           if any(p[2] == h for p in plan)), extra={"job_id": job.job_id})

        def prepare(entry):
            gid, table, how = entry
            if how == "merge":
                return 0
            t = time.monotonic()
            count = db.run(lambda c: pm.prepare_for_swap(c, gid, table, include_existing=(how == "rebuild")),
                           f"prepare group {gid}")
            log.debug("group %s: %d rows prepared in %.2f s", gid, count, time.monotonic() - t,
                      extra={"job_id": job.job_id, "group_id": gid})
            return count

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            counts = list(pool.map(prepare, plan))
        log.info("job %s: groups prepared in %.1f s", job.job_id, time.monotonic() - t0, extra={"job_id": job.job_id})
        faults.crash_point("after-prepare")
        written = 0
        with conn.transaction():
            for (gid, table, how), count in zip(plan, counts):
                if how == "merge":
                    written += pm.merge_into(conn, gid, table)
                    conn.execute(sql.SQL("DROP TABLE {}").format(pm.stage_ident(table)))
                else:
                    if how == "build" and not replace:
                        pm.delete_existing_copies(conn, table)  # only after a cut-off rebuild of a group now empty
                    pm.swap_in(conn, gid, table)
                    written += count
            conn.execute("DELETE FROM import_job_groups WHERE job_id = %s", (job.job_id,))
            jobs.complete(conn, job.job_id, written)
        log.info("job %s: committed in %.1f s", job.job_id, time.monotonic() - t0, extra={"job_id": job.job_id})
        faults.crash_point("after-commit")
        pm.unlock_groups(conn, [g for g, _ in groups])
        return written


def _write_rejects(conn, job_id: str, opts: IngestOptions, state_dir: str | None) -> str | None:
    """Write the job's rejected rows (JSON lines) to --rejects-file or <state>/rejects/<job>.jsonl."""
    path = opts.rejects_file or os.path.join(state_dir or ".", "rejects", f"{job_id}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    count = 0
    with open(tmp, "w") as out, conn.transaction():  # a server-side cursor needs a transaction
        for rec in jobs.iter_rejects(conn, job_id):
            out.write(json.dumps(rec) + "\n")
            count += 1
    os.replace(tmp, path)
    return path if count else None


def _result(job, files: int, duration: float, already: bool = False, rejects_file=None) -> ImportResult:
    return ImportResult(job.job_id, job.status, files, job.total_rows or 0, job.processed_rows, job.rejected_rows,
                        job.written_rows, duration, already_imported=already, rejects_file=rejects_file,
                        error=job.error)


def _dry_run(opts: IngestOptions, srcs, on_progress, t0) -> ImportResult:
    plans = inspect(srcs, opts)
    total = sum(sum(p.row_group_rows) for p in plans)
    check_announced(srcs, opts, total)
    progress = Progress(total, 0, opts.max_rejects, on_progress, None, None)
    reader = Stage(ChunkReader, ReaderArgs(tuple(plans), opts.batch_rows,
                                           contract.RowDefaults(opts.group_id, opts.domain_id)))
    writer = Stage(ChunkWriter, WriterArgs(None, None))
    pipeline.run(_tasks(plans, opts.batch_rows, set()), reader, writer, progress, workers=opts.workers)
    rejects_file = None
    if progress.dry_rejects and opts.rejects_file:
        with open(opts.rejects_file, "w") as out:
            for row, reason, rec in progress.dry_rejects:
                out.write(json.dumps({"row": row, "reason": reason, "record": rec}) + "\n")
        rejects_file = opts.rejects_file
    return ImportResult(None, "DRY_RUN", len(srcs), total, progress.processed, progress.rejected, None,
                        time.monotonic() - t0, dry_run=True, rejects_file=rejects_file)
