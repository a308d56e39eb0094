"""Nodes: importing them from Parquet into `nodes`, and loading one group for matching.

Input contract (DESIGN.md section 3): reference_id, group_id, domain_id (each may come from the
command line), optional type and embedding (list of floats, one length per group), and metadata
as one `metadata` column (map<string,string> or a JSON object string) or, without one, every
other column. Values are strings. Rows are staged and upserted on (group_id, reference_id) in
one transaction (the last row read wins a duplicated key): past --max-rejects nothing is
written, and re-running an import is safe.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass

import numpy as np

from mtool.io import sources
from mtool.errors import InvalidInput, MtoolError, UsageError

log = logging.getLogger(__name__)
NODE_COLUMNS = ("reference_id", "group_id", "domain_id", "type", "embedding", "metadata")
BATCH_ROWS = 50_000
FLOAT4_OID, FLOAT4_ARRAY_OID = 700, 1021
MAX_ID_CHARS = 255


@dataclass
class NodesResult:
    files: int
    rows: int
    imported: int
    rejected: int
    rejects_file: str | None

    def to_json(self) -> dict:
        return self.__dict__.copy()


def import_nodes(db, uris, group_id=None, domain_id=None, mapping=(), max_rejects=1000,
                 rejects_file=None) -> NodesResult:
    import pyarrow as pa

    from mtool.db import migrations

    from mtool.config import uuid_value

    group_id = uuid_value(group_id, "--group-id") if group_id else None
    domain_id = uuid_value(domain_id, "--domain-id") if domain_id else None
    srcs = sources.resolve(uris)
    renamed = dict(mapping)
    plans = []
    for src in srcs:  # every file's schema before any write
        pf = sources.open_parquet(src)
        names = [renamed.get(n, n) for n in pf.schema_arrow.names]
        pf.close(force=True)
        if "reference_id" not in names:
            raise InvalidInput(f"{src.uri}: required column 'reference_id' is missing",
                               hint="--map SRC=reference_id renames a column")
        for name, flag, have in (("group_id", "--group-id", group_id), ("domain_id", "--domain-id", domain_id)):
            if name not in names and not have:
                raise UsageError(f"{src.uri} has no {name} column and no {flag} was given", hint=f"pass {flag} UUID")
        if "embedding" in names:
            t = pf.schema_arrow.field(pf.schema_arrow.names[names.index("embedding")]).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or \
                    not pa.types.is_floating(t.value_type):
                raise InvalidInput(f"{src.uri}: column 'embedding' has type {t}, expected a list of floats")
        if "metadata" in names:
            t = pf.schema_arrow.field(pf.schema_arrow.names[names.index("metadata")]).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_map(t)):
                raise InvalidInput(f"{src.uri}: column 'metadata' has type {t}, expected a JSON object as a string, "
                                   "or a map<string, string>", hint="or leave out a metadata column: every other "
                                   "column is then a metadata key")
        plans.append(src)
    counts: dict = {}

    def load(conn) -> None:
        """Every file's good rows into a staging table, then one upsert, in one transaction:
        past --max-rejects nothing is written, as with ingest. Retried as a whole (re-reading
        the files) on a transient error."""
        counts.update(rows=0, imported=0, rejects=[])
        dims = _GroupDims(conn)  # one embedding length per group: across batches, files and imports
        migrations.check(conn)
        conn.execute("CREATE TEMP TABLE nodes_staging (LIKE nodes INCLUDING DEFAULTS, seq bigserial) ON COMMIT DROP")
        for src in plans:
            pf = sources.open_parquet(src)
            file_rows = file_mismatches = 0
            try:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                    batch = batch.rename_columns([renamed.get(n, n) for n in batch.schema.names])
                    good, bad = _node_rows(batch, src.uri, counts["rows"], group_id, domain_id, dims)
                    file_rows += batch.num_rows
                    file_mismatches += sum(r.get("kind") == "embedding length" for r in bad)
                    counts["rejects"] += bad
                    if len(counts["rejects"]) > max_rejects:
                        first = counts["rejects"][0]
                        raise InvalidInput(f"more than --max-rejects {max_rejects} node rows were rejected; "
                                           f"nothing was imported (first: row {first['row']}: {first['reason']})")
                    _stage(conn, good)
                    counts["rows"] += batch.num_rows
                    counts["imported"] += len(good)
            finally:
                pf.close(force=True)
            if file_rows and file_mismatches == file_rows:
                raise InvalidInput(f"{src.uri}: every row's embedding has another length than its group's "
                                   f"({dims.describe()}); nothing was imported",
                                   hint="a group keeps one embedding length: re-embed the file, or import it "
                                        "into another group")
        _merge(conn)

    db.run(load, "import nodes")
    rows, imported, rejects = counts["rows"], counts["imported"], counts["rejects"]
    path = None
    if rejects:
        import os

        from mtool.config import state_dir

        path = rejects_file or os.path.join(state_dir(), "rejects", f"nodes-{uuid.uuid4()}.jsonl")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as out:
            for r in rejects:
                out.write(json.dumps(r) + "\n")
    return NodesResult(len(plans), rows, imported, len(rejects), path)


class _GroupDims:
    """Each group's embedding length: the first one this import sees, or the one its nodes
    already have in the database (read once per group)."""

    def __init__(self, conn):
        self.conn, self.dims = conn, {}

    def check(self, gid, length: int) -> None:
        if gid not in self.dims:
            row = self.conn.execute("SELECT array_length(embedding, 1) FROM nodes WHERE group_id = %s AND "
                                    "embedding IS NOT NULL LIMIT 1", (gid,)).fetchone()
            self.dims[gid] = row[0] if row and row[0] else length
        if self.dims[gid] != length:
            raise _LengthMismatch(f"embedding has {length} values, group {gid}'s have {self.dims[gid]}")

    def describe(self) -> str:
        return ", ".join(f"group {g}: {d}" for g, d in self.dims.items())


class _LengthMismatch(ValueError):
    pass


def _meta_value(value):
    """A metadata value as text: strings as they are, anything else (numbers, booleans, nested
    objects and lists) as JSON, never Python's repr."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def _node_rows(batch, uri, first_row, group_id, domain_id, dims):
    """(rows to upsert, rejects) of one batch. Embeddings are checked and encoded for COPY per
    batch with NumPy (_embeddings): converting them to Python floats and dumping them one by
    one had taken about half of the import time (4.8 of 8.3 s for 50,000 nodes, profiled)."""
    from psycopg.types.json import Jsonb

    names = batch.schema.names
    meta_cols = [n for n in names if n not in NODE_COLUMNS]
    embeddings = broken = None
    if "embedding" in names:
        embeddings, broken = _embeddings(batch.column("embedding"))
        data = batch.drop_columns(["embedding"]).to_pylist()
    else:
        data = batch.to_pylist()
    uuids: dict = {}  # each distinct group or domain id parsed once

    def uuid_of(value):
        key = str(value)
        if key not in uuids:
            uuids[key] = uuid.UUID(key)
        return uuids[key]

    good, bad = [], []
    for i, rec in enumerate(data):
        try:
            ref = rec.get("reference_id")
            if ref is None or ref == "":
                raise ValueError("reference_id is null or empty")
            if len(ref) > MAX_ID_CHARS or "\x00" in ref:
                raise ValueError(f"reference_id is longer than {MAX_ID_CHARS} characters or has a NUL")
            gid = uuid_of(rec.get("group_id") or group_id)
            did = uuid_of(rec.get("domain_id") or domain_id)
            if "metadata" in names:
                meta = rec["metadata"]
                if isinstance(meta, str):
                    meta = json.loads(meta)
                    if not isinstance(meta, dict):
                        raise ValueError("metadata is not a JSON object")
                elif isinstance(meta, list):  # a map column arrives as (key, value) pairs
                    meta = dict(meta)
                meta = {str(k): _meta_value(v) for k, v in (meta or {}).items()}
            else:
                meta = {k: _meta_value(rec[k]) for k in meta_cols if rec.get(k) is not None}
            emb = None if embeddings is None else embeddings[i]
            if emb is not None:
                if broken[i]:
                    raise ValueError("embedding has a null, NaN or infinite value")
                if emb.values == 0:
                    raise ValueError("embedding is empty ([]); leave it null for a node without one")
                dims.check(gid, emb.values)
            good.append((did, gid, ref, rec.get("type"), Jsonb(meta), emb))
        except (ValueError, TypeError) as exc:
            reason = "group_id or domain_id is not a valid UUID" if "badly formed" in str(exc) else str(exc)
            record = batch.slice(i, 1).to_pylist()[0]  # as the file has it, embedding included
            bad.append({"file": uri, "row": first_row + i, "reason": reason,
                        **({"kind": "embedding length"} if isinstance(exc, _LengthMismatch) else {}),
                        "record": {k: None if v is None else str(v) for k, v in record.items()}})
    return good, bad


class _Float4Array(bytes):
    """A float4[] value already in PostgreSQL's binary array format; `values`: its length."""

    values: int


def _embeddings(column) -> tuple[list, np.ndarray]:
    """Each row's embedding as a binary float4[] (None where the row has none), and whether it
    holds a null, NaN or infinite value: for a whole batch at once."""
    import struct

    import pyarrow as pa
    import pyarrow.compute as pc

    has = np.asarray(column.is_valid())
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column).cast(pa.float32()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    broken = np.zeros(len(lengths), bool)
    broken[np.searchsorted(ends, np.flatnonzero(~np.isfinite(values)), side="right")] = True
    pairs = np.empty(len(values), dtype=[("size", ">i4"), ("value", ">f4")])  # per element: length, value
    pairs["size"], pairs["value"] = 4, values
    raw = pairs.tobytes()
    out, headers = [], {}
    for row, (end, length) in enumerate(zip(ends.tolist(), lengths.tolist())):
        if not has[row]:
            out.append(None)
            continue
        if length not in headers:  # dimensions, flags, element type, then length and lower bound
            headers[length] = struct.pack("!iiIii", 1, 0, FLOAT4_OID, length, 1) if length else \
                struct.pack("!iiI", 0, 0, FLOAT4_OID)
        value = _Float4Array(headers[length] + raw[8 * (end - length):8 * end])
        value.values = length
        out.append(value)
    return out, broken


@functools.cache
def _float4_array_dumper():
    """A psycopg dumper that sends a _Float4Array as it is (one class, made once)."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class Float4ArrayDumper(Dumper):
        format = Format.BINARY
        oid = FLOAT4_ARRAY_OID

        def dump(self, obj):
            return obj

    return Float4ArrayDumper


def _stage(conn, rows) -> None:
    with conn.cursor() as cur:
        cur.adapters.register_dumper(_Float4Array, _float4_array_dumper())
        with cur.copy("COPY nodes_staging (domain_id, group_id, reference_id, type, metadata, embedding) "
                      "FROM STDIN (FORMAT binary)") as cp:
            cp.set_types(["uuid", "uuid", "varchar", "text", "jsonb", "float4[]"])
            for row in rows:
                cp.write_row(row)


def _merge(conn) -> None:
    """Upsert the staged rows; of rows with the same (group_id, reference_id), the last one read."""
    conn.execute("INSERT INTO nodes (domain_id, group_id, reference_id, type, metadata, embedding) "
                 "SELECT DISTINCT ON (group_id, reference_id) domain_id, group_id, reference_id, type, "
                 "metadata, embedding FROM nodes_staging ORDER BY group_id, reference_id, seq DESC "
                 "ON CONFLICT (group_id, reference_id) DO UPDATE SET domain_id = EXCLUDED.domain_id, "
                 "type = EXCLUDED.type, metadata = EXCLUDED.metadata, embedding = EXCLUDED.embedding, "
                 "updated_at = now() WHERE (nodes.domain_id, nodes.type, nodes.metadata, nodes.embedding) IS DISTINCT "
                 "FROM (EXCLUDED.domain_id, EXCLUDED.type, EXCLUDED.metadata, EXCLUDED.embedding)")
    # (a row that is already as imported is not updated: the group's node version stays, and
    # `mtool match` can tell that nothing changed)


# -- loading a group ------------------------------------------------------------------------

@dataclass
class GroupNodes:
    """One group's nodes, sorted by reference_id in byte order (so index == tie-break rank)."""

    group_id: str
    domain_id: str
    reference_ids: list
    metadata: dict  # key -> list of str | None, for the profile's keys (and the partition key)
    embedding: np.ndarray | None  # (N, D) float32, NaN rows where a node has none
    digest: str = ""  # of the loaded data (load_group): the node part of a cycle's fingerprint
    version: int | None = None  # the group's node version when it was loaded (node_version)

    def __len__(self) -> int:
        return len(self.reference_ids)


def list_groups(conn, domain_ids=(), group_ids=()) -> list[tuple[str, str, int]]:
    """(group_id, domain_id, node count) of the selected groups (all when none selected)."""
    where, params = [], []
    if domain_ids:
        where.append("domain_id = ANY(%s::uuid[])")
        params.append(list(domain_ids))
    if group_ids:
        where.append("group_id = ANY(%s::uuid[])")
        params.append(list(group_ids))
    sql = "SELECT group_id, min(domain_id::text), count(*) FROM nodes"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " GROUP BY group_id ORDER BY group_id", params).fetchall()
    return [(str(g), str(d), n) for g, d, n in rows]


def load_group(conn, group_id: str, keys) -> GroupNodes:
    """The group's nodes, read in one snapshot (REPEATABLE READ) with their node version: ids
    and the profile's keys in one COPY (CSV) parsed by Arrow's C++ reader; embeddings in a
    second, binary COPY streamed into the (N, D) float32 array (_read_embeddings). Formatting
    embeddings as text had cost the server most of the load (7.5 s of 200k nodes' 64 floats),
    and holding their text, its Arrow copy and the array at once most of the peak memory."""
    import io

    import pyarrow as pa
    from pyarrow import csv

    keys = list(dict.fromkeys(keys))
    digest = hashlib.blake2b(digest_size=16)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        version = node_version(conn, group_id)
        head = conn.execute("SELECT count(*), min(domain_id::text), max(array_length(embedding, 1)) FROM nodes "
                            "WHERE group_id = %s", (group_id,)).fetchone()
        n, domain, dims = head[0], head[1] or "", head[2]
        cols = ", ".join(["reference_id"] + ["metadata->>%s" for _ in keys])
        buffer = io.BytesIO()
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT {cols} FROM nodes WHERE group_id = %s ORDER BY reference_id) TO STDOUT "
                          "(FORMAT csv)", [*keys, group_id]) as cp:
                for data in cp:
                    buffer.write(data)
            digest.update(buffer.getbuffer())
            embedding = _read_embeddings(cur, group_id, n, dims, digest) if dims else None
    names = ["reference_id"] + [f"k{i}" for i in range(len(keys))]
    buffer.seek(0)
    table = csv.read_csv(
        buffer, read_options=csv.ReadOptions(column_names=names),
        convert_options=csv.ConvertOptions(column_types={c: pa.string() for c in names}, null_values=[""],
                                           strings_can_be_null=True, quoted_strings_can_be_null=False))
    del buffer
    refs = table.column("reference_id").to_pylist()
    values = {k: table.column(f"k{i}").to_pylist() for i, k in enumerate(keys)}
    # What the cycle computes from, byte for byte (ids, the profile's keys, embeddings): its
    # digest is the node part of the cycle's fingerprint (mtool/match/cycles.py).
    return GroupNodes(group_id, domain, refs, values, embedding, digest.hexdigest(), version)


def node_version(conn, group_id: str) -> int | None:
    """The group's node version (migration 0004: set anew by every statement that changes its
    nodes), None for a group without nodes."""
    row = conn.execute("SELECT version FROM node_versions WHERE group_id = %s", (group_id,)).fetchone()
    return row[0] if row else None


EMBEDDING_READ_BYTES = 8 << 20  # binary COPY data parsed at once


def _read_embeddings(cur, group_id: str, n: int, dims: int, digest) -> np.ndarray:
    """The group's embeddings by reference_id, NaN rows where a node has none: a binary COPY of
    one float4[] per row, every row padded to `dims` NaNs where null, so that each row has the
    same size and a slice of rows is read with one NumPy view (no per-row Python). A row of
    another length or with a null element (written around `mtool nodes import`) is an error."""
    import struct

    row_bytes = 2 + 4 + 20 + 8 * dims  # field count, length, array header, (length, value) per element
    head = struct.pack("!hiiiIii", 1, 20 + 8 * dims, 1, 0, FLOAT4_OID, dims, 1)
    out = np.empty((n, dims), np.float32)
    pending = bytearray()
    at = 0
    signature = 19  # the binary COPY header: signature, flags, extension length

    def parse(data) -> int:
        rows = np.frombuffer(data, np.uint8).reshape(-1, row_bytes)
        if rows.shape[0] + at > n or not (rows[:, :26] == np.frombuffer(head, np.uint8)).all() or \
                not (rows[:, 26:].view(">i4")[:, 0::2] == 4).all():
            raise InvalidInput(f"group {group_id}: a node's embedding has another length than {dims} or a null "
                               "value", hint="every node of a group needs an embedding of the same length, or none")
        out[at:at + len(rows)] = rows[:, 26:].view(">f4")[:, 1::2]
        return len(rows)

    with cur.copy("COPY (SELECT coalesce(embedding, array_fill('NaN'::real, ARRAY[%s])) FROM nodes WHERE "
                  "group_id = %s ORDER BY reference_id) TO STDOUT (FORMAT binary)", [dims, group_id]) as cp:
        for data in cp:
            digest.update(data)
            pending += data
            if len(pending) >= EMBEDDING_READ_BYTES + signature:
                usable = (len(pending) - signature) // row_bytes * row_bytes
                at += parse(memoryview(pending)[signature:signature + usable])
                del pending[signature:signature + usable]
    body = memoryview(pending)[signature:len(pending) - 2]  # the trailer: -1 as int16
    if len(body) % row_bytes:
        raise InvalidInput(f"group {group_id}: nodes' embeddings have different lengths",
                           hint="every node of a group needs an embedding of the same length, or none")
    at += parse(body)
    if at != n:
        raise MtoolError(f"group {group_id}: read {at} embeddings of {n} nodes")
    return out
