"""`mtool nodes import` as a tracked, resumable job.

Plan: resolve the files, check every schema, find or create the job by the files' fingerprint
(an import that already COMPLETED does no work), take the job's lock.
Load: each file is read in batches of BATCH_ROWS rows; a batch is validated and encoded for
binary COPY column by column (Arrow compute and NumPy, no per-row Python but for a `metadata`
column of JSON text or maps); its good rows go into the batch's own table under the job's load
table (INHERITS) and its rejects into import_rejects, with the batch's checkpoint, in one
transaction. A killed import resumes after its last committed batch. Batches of new groups are
inserted into `nodes` as they load, in one transaction held open to the commit (node_forward).
Commit: that transaction with the job COMPLETED; else (an update, a key read twice, a resumed
run) in one transaction the load table's rows replace (upsert) the nodes, a key read twice
keeping its last row, and the job is COMPLETED. Past --max-rejects the job FAILS and nothing
reaches `nodes`, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
import uuid
from dataclasses import dataclass

import numpy as np

from mtool import faults
from mtool.db import jobs
from mtool.db.connection import Database, Session, advisory_key
from mtool.errors import InvalidInput, JobBusy, UsageError
from mtool.io import copy as pgcopy
from mtool.io import sources
from mtool.io.pipeline import prefetched
from mtool.match.node_forward import COLUMNS, Forward
from mtool.match.nodes import FLOAT4_OID, MAX_ID_CHARS, NODE_COLUMNS, NodesResult

log = logging.getLogger(__name__)
BATCH_ROWS = 100_000  # rows per committed batch (the unit of resume)
MODE = "nodes"  # import_jobs.mode of a nodes import (migration 0005)
LOAD_COLUMNS = (*COLUMNS, "seq")
JSON_NEEDS_ESCAPE = r'["\\\x00-\x1f]'  # characters a JSON string must escape (RE2 syntax)


def import_nodes(db: Database, uris, group_id=None, domain_id=None, mapping=(), max_rejects=1000,
                 rejects_file=None, state_dir: str | None = None, batch_rows: int = BATCH_ROWS) -> NodesResult:
    from mtool.config import uuid_value
    from mtool.db import migrations

    t0 = time.monotonic()
    group_id = uuid_value(group_id, "--group-id") if group_id else None
    domain_id = uuid_value(domain_id, "--domain-id") if domain_id else None
    srcs = sources.resolve(uris)
    renamed = dict(mapping)
    row_counts = [_check_schema(src, renamed, group_id, domain_id) for src in srcs]
    ident = {"files": [s.fingerprint_part for s in srcs], "group": group_id, "domain": domain_id,
             "map": sorted(renamed.items())}
    fingerprint = "nodes:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    plain = Session(db)
    try:
        plain.run(migrations.check, "check schema")
        job, created = plain.run(lambda c: jobs.find_or_create(
            c, str(uuid.uuid4()), [s.uri for s in srcs], fingerprint, group_id, domain_id, MODE,
            {"map": sorted(renamed.items()), "max_rejects": max_rejects, "batch_rows": batch_rows}), "create job")
    finally:
        plain.close()
    if job.status == "COMPLETED":
        log.info("nodes import job %s: these files were imported already (%s): nothing to do", job.job_id,
                 job.finished_at, extra={"job_id": job.job_id})
        return NodesResult(len(srcs), job.total_rows or 0, job.written_rows or 0, job.rejected_rows, None,
                           job.job_id, already_imported=True)

    def take_lock(conn):
        if not jobs.try_lock(conn, job.job_id):
            raise JobBusy(f"nodes import job {job.job_id} is being run by another process")

    session = Session(db, on_connect=take_lock)
    try:
        session.run(lambda c: None, "lock job")
        # a resumed job keeps its own batches: a checkpoint names a batch by its number
        run = _Run(db, session, job, srcs, renamed, group_id, domain_id, int(job.options.get("batch_rows", batch_rows)))
        try:
            # a lost connection (a server restart) resumes from the checkpoint, within --db-retry-seconds
            t_load = time.monotonic()
            imported, rejected = db.retry(lambda: run.load(sum(row_counts)), "load nodes")
            t_commit = time.monotonic()
            load_s = t_commit - t_load
            rejects_path = _write_rejects(session, job.job_id, rejects_file, state_dir) if rejected else None
            if rejected > max_rejects:
                first = session.run(lambda c: c.execute(
                    "SELECT row_number, reason FROM import_rejects WHERE job_id = %s ORDER BY file_index, row_number "
                    "LIMIT 1", (job.job_id,)).fetchone(), "read rejects")
                raise InvalidInput(f"more than --max-rejects {max_rejects} node rows were rejected; nothing was "
                                   f"imported (first: row {first[0]}: {first[1]})"
                                   + (f"; rejected rows are in {rejects_path}" if rejects_path else ""))
            run.check_files()
            faults.crash_point("nodes-before-commit")
            db.retry(lambda: run.commit(imported), "commit nodes")
            commit_s = time.monotonic() - t_commit
        except Exception as exc:
            run.close()
            if not getattr(exc, "retryable", False):
                message = str(exc)
                session.run(lambda c: (jobs.fail(c, job.job_id, message), _drop_load_table(c, job.job_id)),
                            "fail job")
            raise
    finally:
        session.close()
    log.info("nodes import job %s: %d nodes in %.1f s (load %.1f s, commit %.1f s)", job.job_id, imported,
             time.monotonic() - t0, load_s, commit_s, extra={"job_id": job.job_id})
    return NodesResult(len(srcs), sum(row_counts), imported, rejected, rejects_path, job.job_id)


def _check_schema(src, renamed: dict, group_id, domain_id) -> int:
    """The file's rows; its schema checked against the nodes contract first (before any write)."""
    import pyarrow as pa

    pf = sources.open_parquet(src)
    try:
        schema = pf.schema_arrow
        names = [renamed.get(n, n) for n in schema.names]
        if "reference_id" not in names:
            raise InvalidInput(f"{src.uri}: required column 'reference_id' is missing",
                               hint="--map SRC=reference_id renames a column")
        for name, flag, have in (("group_id", "--group-id", group_id), ("domain_id", "--domain-id", domain_id)):
            if name not in names and not have:
                raise UsageError(f"{src.uri} has no {name} column and no {flag} was given", hint=f"pass {flag} UUID")
        if "embedding" in names:
            t = schema.field(schema.names[names.index("embedding")]).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or \
                    not pa.types.is_floating(t.value_type):
                raise InvalidInput(f"{src.uri}: column 'embedding' has type {t}, expected a list of floats")
        if "metadata" in names:
            t = schema.field(schema.names[names.index("metadata")]).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_map(t)):
                raise InvalidInput(f"{src.uri}: column 'metadata' has type {t}, expected a JSON object as a string, "
                                   "or a map<string, string>", hint="or leave out a metadata column: every other "
                                   "column is then a metadata key")
        return pf.metadata.num_rows
    finally:
        pf.close(force=True)


def load_table(job_id: str) -> str:
    return f"mtool_stage.n_{uuid.UUID(job_id).hex}"


def _drop_load_table(conn, job_id: str) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {load_table(job_id)} CASCADE")  # with its batches' tables


class _Run:
    """One run of a nodes import job: its batches into the load table, then the commit."""

    def __init__(self, db, session, job, srcs, renamed, group_id, domain_id, batch_rows: int):
        self.db, self.session, self.job, self.srcs = db, session, job, srcs
        self.renamed, self.group_id, self.domain_id, self.batch_rows = renamed, group_id, domain_id, batch_rows
        self.table = load_table(job.job_id)
        self.mismatched = {}  # file index: (rows read this run, rows whose embedding length mismatched)
        self.dims = None
        self.keys = None  # this run's keys (load), when it saw every batch
        self.groups: set[str] = set()  # and their groups
        self.forward: Forward | None = None  # this run's batches into `nodes` as they load (node_forward)

    def load(self, total: int) -> tuple[int, int]:
        """Every batch not committed yet; returns (rows loaded, rows rejected) of the whole job.
        Batches are encoded on a thread while the previous one is COPYed (Arrow and NumPy
        release the GIL; the server works on the COPY meanwhile)."""
        job_id = self.job.job_id
        self.session.run(lambda c: (jobs.start(c, job_id, total), c.execute(
            f"CREATE UNLOGGED TABLE IF NOT EXISTS {self.table} (LIKE nodes INCLUDING DEFAULTS, seq bigint NOT NULL)")),
            "start job")
        done = self.session.run(self._checked_checkpoint, "read checkpoint")
        # the keys this run loads, to know at the commit whether any was read twice; a resumed
        # run has not seen its earlier batches' keys, and leaves that to the server
        self.keys, self.groups = (None, set()) if done else ([], set())
        self.close()  # a load retried after a lost connection: its forward, if any, is gone
        self.forward = None if done else Forward(self.db, self.table)
        with self.db.connect() as conn, self.db.connect(autocommit=True) as lookup:
            self.dims = _GroupDims(lookup, self.table)
            for fi, bi, rows, encoded in prefetched(self._encoded(done)):
                if encoded is not None:
                    payload, good, rejects, keys = encoded
                    part = self._commit_batch(conn, fi, bi, payload, good, rejects)
                    if self.keys is not None:  # a run that sees every batch (the forward's too)
                        groups = _groups_of(keys)
                        self.keys.append(keys)
                        self.groups.update(groups)
                        if self.forward is not None:
                            self.forward.send(part, good, groups)
                    read, mismatched = self.mismatched.get(fi, (0, 0))
                    self.mismatched[fi] = (read + rows, mismatched + sum(r.get("kind") == "embedding length"
                                                                         for r in rejects))
                    faults.crash_point("nodes-batch-committed")
            _, rejected = jobs.record_progress(conn, job_id)
            loaded = conn.execute("SELECT coalesce(sum(rows_loaded), 0) FROM import_checkpoints WHERE job_id = %s",
                                  (job_id,)).fetchone()[0]
            conn.commit()
        return int(loaded), int(rejected)

    def _encoded(self, done: set):
        """(file index, batch number, rows, (payload, good rows, rejects) or None when committed before)."""
        for fi, src in enumerate(self.srcs):
            pf = sources.open_parquet(src)
            first_row = 0
            try:
                for bi, batch in enumerate(pf.iter_batches(batch_size=self.batch_rows)):
                    encoded = None
                    if (fi, 0, bi) not in done:
                        batch = batch.rename_columns([self.renamed.get(n, n) for n in batch.schema.names])
                        encoded = encode_batch(batch, src.uri, first_row, self.group_id, self.domain_id, self.dims,
                                               (fi << 40) + first_row)
                    yield fi, bi, batch.num_rows, encoded
                    first_row += batch.num_rows
            finally:
                pf.close(force=True)

    def _checked_checkpoint(self, conn) -> set:
        """The committed batches, when the load table still holds their rows. It is UNLOGGED
        (its rows are written once, not also to the WAL): a server crash empties it, and then
        the job starts over from its first batch."""
        done = jobs.done_chunks(conn, self.job.job_id)
        if done:
            held = conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]
            loaded = conn.execute("SELECT coalesce(sum(rows_loaded), 0) FROM import_checkpoints WHERE job_id = %s",
                                  (self.job.job_id,)).fetchone()[0]
            if held != loaded:
                log.warning("nodes import job %s: its load table holds %d of the %d rows its checkpoint counts (a "
                            "server restart empties it): starting over", self.job.job_id, held, loaded,
                            extra={"job_id": self.job.job_id})
                with conn.transaction():
                    conn.execute(f"TRUNCATE {self.table}")
                    conn.execute("DELETE FROM import_checkpoints WHERE job_id = %s", (self.job.job_id,))
                    conn.execute("DELETE FROM import_rejects WHERE job_id = %s", (self.job.job_id,))
                done = set()
        return done

    def _commit_batch(self, conn, fi, bi, payload, good: int, rejects: list) -> str:
        """The batch into its own table under the load table (INHERITS: the load table reads
        as all of them), with its rejects and checkpoint; returns that table's name."""
        part = f"{self.table}_{fi}_{bi}"
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(f"CREATE UNLOGGED TABLE IF NOT EXISTS {part} () INHERITS ({self.table})")
            pgcopy.copy_bytes(cur, part, LOAD_COLUMNS, payload)
            if rejects:
                cur.executemany("INSERT INTO import_rejects (job_id, file_index, row_number, reason, record) VALUES "
                                "(%s, %s, %s, %s, %s)", [(self.job.job_id, fi, r["row"], r["reason"],
                                                          json.dumps(r["record"])) for r in rejects])
            cur.execute("INSERT INTO import_checkpoints (job_id, file_index, row_group, chunk, rows_loaded, "
                        "rows_rejected) VALUES (%s, %s, 0, %s, %s, %s)", (self.job.job_id, fi, bi, good, len(rejects)))
        return part

    def check_files(self) -> None:
        """A file every row of which has another embedding length than its group's is a wrong
        file (another model), not a few bad rows: the import fails."""
        for fi, (read, mismatched) in self.mismatched.items():
            if read and mismatched == read:
                raise InvalidInput(f"{self.srcs[fi].uri}: every row's embedding has another length than its group's "
                                   f"({self.dims.describe()}); nothing was imported",
                                   hint="a group keeps one embedding length: re-embed the file, or import it "
                                        "into another group")

    def close(self) -> None:
        if self.forward is not None:
            self.forward.close()
            self.forward = None

    def _keys_seen(self) -> tuple[bool, list | None]:
        """(whether some key may have been loaded twice, the groups loaded or None when not
        known). A resumed run has not seen its earlier batches' keys and asks the server. Arrow's
        hash table takes 0.1 s of 1M keys, where the server's GROUP BY over the load table took
        1.2 s and its DISTINCT groups 0.3 s."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.keys is None:
            return True, None
        keys = pa.chunked_array(self.keys, pa.binary())
        return len(pc.unique(keys)) < len(keys), sorted(uuid.UUID(g) for g in self.groups)

    def commit(self, imported: int) -> None:
        """The load table into `nodes` with the job COMPLETED, in one transaction. A key read
        twice keeps its last row (highest seq); a row that is already as imported is not updated
        (the group's node version stays: `mtool match` sees nothing changed)."""
        forwarded = self.forward.finish(imported) if self.forward is not None else None
        self.forward = None
        if forwarded is not None:  # every batch is in `nodes` already, in this open transaction
            with forwarded as conn:
                faults.crash_point("nodes-commit")
                jobs.complete(conn, self.job.job_id, imported)
                _drop_load_table(conn, self.job.job_id)
                conn.commit()
            log.info("nodes import job %s: its batches went into nodes as they loaded", self.job.job_id,
                     extra={"job_id": self.job.job_id})
            return
        read_twice, groups = self._keys_seen()
        with self.db.connect() as conn:
            if read_twice:
                conn.execute(f"DELETE FROM {self.table} l USING (SELECT group_id, reference_id, max(seq) AS keep "
                             f"FROM {self.table} GROUP BY 1, 2 HAVING count(*) > 1) d WHERE l.group_id = d.group_id "
                             "AND l.reference_id = d.reference_id AND l.seq < d.keep")
            # An UPDATE of the keys that exist and a plain INSERT of the others: INSERT ... ON
            # CONFLICT inserted row by row speculatively (1.6 s of 200k new nodes). The groups'
            # locks keep another import from inserting the same keys in between.
            if groups is None:
                groups = [g for g, in conn.execute(f"SELECT DISTINCT group_id FROM {self.table} ORDER BY 1")]
            for gid in groups:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("nodes", str(gid)),))
            cols = ", ".join(COLUMNS)
            insert = f"INSERT INTO nodes ({cols}) SELECT {cols} FROM {self.table} l"
            if conn.execute("SELECT EXISTS (SELECT 1 FROM nodes WHERE group_id = ANY(%s))", (groups,)).fetchone()[0]:
                conn.execute(
                    f"UPDATE nodes n SET domain_id = l.domain_id, type = l.type, metadata = l.metadata, "
                    f"embedding = l.embedding, updated_at = now() FROM {self.table} l WHERE n.group_id = l.group_id "
                    "AND n.reference_id = l.reference_id AND (n.domain_id, n.type, n.metadata, n.embedding) IS "
                    "DISTINCT FROM (l.domain_id, l.type, l.metadata, l.embedding)")
                insert += (" WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.group_id = l.group_id AND "
                           "n.reference_id = l.reference_id)")
            conn.execute(insert)  # new groups (the first import of a group): a plain INSERT
            faults.crash_point("nodes-commit")
            jobs.complete(conn, self.job.job_id, imported)
            _drop_load_table(conn, self.job.job_id)
            conn.commit()


def _write_rejects(session, job_id: str, path: str | None, state_dir: str | None) -> str:
    from mtool.config import state_dir as default_state_dir

    path = path or os.path.join(state_dir or default_state_dir(), "rejects", f"nodes-{job_id}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(conn):
        with open(path + ".tmp", "w") as out, conn.transaction():
            for rec in jobs.iter_rejects(conn, job_id):
                out.write(json.dumps(rec) + "\n")
    session.run(write, "write rejects")
    os.replace(path + ".tmp", path)
    return path


class _GroupDims:
    """Each group's embedding length: the one its nodes already have in the database, else the
    one of this job's rows loaded before, else the first this run sees (read once per group)."""

    def __init__(self, conn, table: str):
        self.conn, self.table, self.dims = conn, table, {}

    def of(self, gid: str, first_seen: int) -> int:
        if gid not in self.dims:
            found = None
            for source in ("nodes", self.table):
                row = self.conn.execute(f"SELECT array_length(embedding, 1) FROM {source} WHERE group_id = %s AND "
                                        "embedding IS NOT NULL LIMIT 1", (gid,)).fetchone()
                if row and row[0]:
                    found = row[0]
                    break
            self.dims[gid] = found or first_seen
        return self.dims[gid]

    def describe(self) -> str:
        return ", ".join(f"group {g}: {d}" for g, d in self.dims.items())


# -- one batch, column by column -------------------------------------------------------------

@dataclass
class _Reasons:
    """The first failing check of each row (the order of the checks is the order of the
    reasons a user reads), and a kind for some."""

    n: int

    def __post_init__(self):
        self.reason = np.full(self.n, None, object)
        self.kind = {}

    def fail(self, mask: np.ndarray, message, kind: str | None = None) -> None:
        rows = np.flatnonzero(mask & (self.reason == None))  # noqa: E711 - elementwise
        for r in rows:
            self.reason[r] = message(r) if callable(message) else message
            if kind:
                self.kind[r] = kind

    @property
    def ok(self) -> np.ndarray:
        return self.reason == None  # noqa: E711


def encode_batch(batch, uri: str, first_row: int, group_id, domain_id, dims: _GroupDims, seq0: int):
    """(binary COPY payload of the good rows, their count, rejects, their (group, id) keys as
    binary) of one batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    names = batch.schema.names
    why = _Reasons(n)
    refs = pc.cast(batch.column("reference_id"), pa.string())
    why.fail(_mask(pc.or_kleene(pc.is_null(refs), pc.equal(refs, ""))), "reference_id is null or empty")
    why.fail(_mask(pc.or_(pc.greater(pc.utf8_length(refs), MAX_ID_CHARS), pc.match_substring(refs, "\x00"))),
             f"reference_id is longer than {MAX_ID_CHARS} characters or has a NUL")
    groups = _uuid_column(batch, "group_id", group_id, n)
    domains = _uuid_column(batch, "domain_id", domain_id, n)
    why.fail((groups[0] < 0) | (domains[0] < 0), "group_id or domain_id is not a valid UUID")
    metadata = _metadata_json(batch, names, why)
    embedding = None
    if "embedding" in names:
        embedding = _embedding_arrays(batch.column("embedding"), groups, why, dims)
    good = np.flatnonzero(why.ok)
    rejects = []
    if len(good) < n:
        bad = np.flatnonzero(~why.ok)
        records = batch.take(pa.array(bad)).to_pylist()
        for r, record in zip(bad.tolist(), records):  # as the file has it, embedding included
            rejects.append({"file": uri, "row": first_row + r, "reason": why.reason[r],
                            **({"kind": why.kind[r]} if r in why.kind else {}),
                            "record": {k: None if v is None else str(v) for k, v in record.items()}})
    take = pa.array(good)
    m = len(good)
    good_refs = refs.take(take)
    # (group, reference_id) as one binary key: the group's 16 bytes, then the id
    group_bytes = pa.array([row.tobytes() for row in groups[1]], pa.binary())
    keys = pc.binary_join_element_wise(group_bytes.take(pa.array(groups[0][good])), good_refs.cast(pa.binary()),
                                       pa.scalar(b""))
    fields = [pgcopy.uuid_bytes(domains[1][domains[0][good]]), pgcopy.uuid_bytes(groups[1][groups[0][good]]),
              pgcopy.text(good_refs),
              pgcopy.text(pc.cast(batch.column("type"), pa.string()).take(take)) if "type" in names
              else pgcopy.null_field(m),
              pgcopy.text(pc.binary_join_element_wise(pa.scalar(b"\x01"), metadata.take(take).cast(pa.binary()),
                                                      pa.scalar(b""))),
              pgcopy.text(_float4_arrays(embedding, good)) if embedding is not None else pgcopy.null_field(m),
              pgcopy.fixed(seq0 + good.astype(np.int64), ">i8")]
    return pgcopy.encode_rows(fields, m), m, rejects, keys


def _groups_of(keys) -> list[str]:
    """The groups of a batch's (group, id) keys."""
    import pyarrow.compute as pc

    return [str(uuid.UUID(bytes=g)) for g in pc.unique(pc.binary_slice(keys, 0, 16)).to_pylist()]


def _mask(array) -> np.ndarray:
    return np.asarray(array.fill_null(False).to_numpy(zero_copy_only=False), bool)


def _uuid_column(batch, name: str, default, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, -1 where not a valid UUID; (distinct, 16) bytes): each distinct value
    parsed once. A null or empty value takes the command line's id, as before."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name in batch.schema.names:
        values = pc.cast(batch.column(name), pa.string())
        values = pc.if_else(pc.or_kleene(pc.is_null(values), pc.equal(values, "")), pa.scalar(default, pa.string()),
                            values) if default else values
    else:
        values = pa.repeat(pa.scalar(default, pa.string()), n)
    encoded = pc.dictionary_encode(values).combine_chunks() if isinstance(values, pa.ChunkedArray) else \
        pc.dictionary_encode(values)
    table, valid = [], []
    for text in encoded.dictionary.to_pylist():
        try:
            table.append(np.frombuffer(uuid.UUID(text).bytes, np.uint8))
            valid.append(True)
        except (ValueError, TypeError, AttributeError):
            table.append(np.zeros(16, np.uint8))
            valid.append(False)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    valid = np.array(valid + [False], bool)  # code -1 (null): not valid
    codes = np.where(valid[codes], codes, -1)
    return codes, np.array(table, np.uint8).reshape(-1, 16)


def _metadata_json(batch, names, why: _Reasons):
    """Each row's metadata as a JSON object text (Arrow string array). Without a `metadata`
    column, every other column is a key: the text is assembled column-wise (values that JSON
    must escape, and values that are neither strings nor integers, go through json.dumps)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from mtool.match.nodes import _meta_value

    n = batch.num_rows
    if "metadata" in names:  # JSON text or a map per row: parsed and normalised row by row
        out = []
        for r, meta in enumerate(batch.column("metadata").to_pylist()):
            try:
                if isinstance(meta, str):
                    meta = json.loads(meta)
                    if not isinstance(meta, dict):
                        raise ValueError("metadata is not a JSON object")
                elif isinstance(meta, list):  # a map column arrives as (key, value) pairs
                    meta = dict(meta)
                out.append(json.dumps({str(k): _meta_value(v) for k, v in (meta or {}).items()}))
            except (ValueError, TypeError) as exc:
                why.fail(np.arange(n) == r, f"metadata is not valid JSON: {exc}" if isinstance(exc, json.JSONDecodeError)
                         else str(exc))
                out.append("{}")
        return pa.array(out, pa.string())
    pieces = []
    for name in names:
        if name in NODE_COLUMNS:
            continue
        column = batch.column(name)
        t = column.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            values = pc.cast(column, pa.string())
        elif pa.types.is_integer(t) or pa.types.is_boolean(t):
            values = pc.cast(column, pa.string())  # as json.dumps writes them
        else:
            values = pa.array([_meta_value(v) for v in column.to_pylist()], pa.string())
        quoted = pc.binary_join_element_wise(pa.scalar('"'), values, pa.scalar('"'), pa.scalar(""))
        escape = np.flatnonzero(_mask(pc.match_substring_regex(values, JSON_NEEDS_ESCAPE)))
        if len(escape):
            fixed = quoted.to_pylist()
            for r in escape.tolist():
                fixed[r] = json.dumps(values[r].as_py())
            quoted = pa.array(fixed, pa.string())
        pieces.append(pc.binary_join_element_wise(pa.scalar(json.dumps(str(name)) + ":"), quoted, pa.scalar("")))
    if not pieces:
        return pa.repeat(pa.scalar("{}"), n)
    body = pc.binary_join_element_wise(*pieces, pa.scalar(","), null_handling="skip")
    return pc.binary_join_element_wise(pa.scalar("{"), body, pa.scalar("}"), pa.scalar(""))


def _embedding_arrays(column, groups, why: _Reasons, dims: _GroupDims):
    """(values float32 flat, starts, lengths, present) of the batch's embeddings, rows failing
    their checks marked in `why`: a null, NaN or infinite value, an empty list, a length other
    than the group's."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    present = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).cast(pa.float32()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    broken = np.zeros(len(lengths), bool)
    broken[np.searchsorted(ends, np.flatnonzero(~np.isfinite(values)), side="right")] = True
    why.fail(present & broken, "embedding has a null, NaN or infinite value")
    why.fail(present & (lengths == 0), "embedding is empty ([]); leave it null for a node without one")
    codes, table = groups
    checked = present & why.ok
    for code in np.unique(codes[checked]).tolist():
        rows = checked & (codes == code)
        gid = str(uuid.UUID(bytes=table[code].tobytes()))
        want = dims.of(gid, int(lengths[np.flatnonzero(rows)[0]]))
        why.fail(rows & (lengths != want), lambda r, gid=gid, want=want:
                 f"embedding has {lengths[r]} values, group {gid}'s have {want}", kind="embedding length")
    return values, starts, lengths, present


def _float4_arrays(embedding, rows: np.ndarray):
    """PostgreSQL's binary float4[] of `rows` (null where a row has none), built per length
    class with NumPy: header, then (length 4, value) per element."""
    import pyarrow as pa

    values, starts, lengths, present = embedding
    out = [None] * len(rows)
    parts, order = [], []
    has = present[rows]
    for length in np.unique(lengths[rows][has]).tolist():
        at = np.flatnonzero(has & (lengths[rows] == length))
        src = rows[at]
        pairs = np.empty((len(src), length), dtype=[("size", ">i4"), ("value", ">f4")])
        pairs["size"] = 4
        pairs["value"] = values[starts[src][:, None] + np.arange(length)]
        head = np.frombuffer(struct.pack("!iiIii", 1, 0, FLOAT4_OID, length, 1), np.uint8)
        block = np.concatenate([np.broadcast_to(head, (len(src), 20)), pairs.view(np.uint8).reshape(len(src), -1)],
                               axis=1)
        parts.append(pgcopy._binary_rows(block))
        order.append(at)
    if not parts:
        return pa.nulls(len(rows), pa.binary())
    joined = pa.concat_arrays(parts)
    position = np.full(len(rows), -1, np.int64)
    position[np.concatenate(order)] = np.arange(len(joined))
    del out
    return joined.take(pa.array(position, mask=position < 0))
