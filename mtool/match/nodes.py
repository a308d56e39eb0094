"""Nodes: their contract, and loading one group for matching (node_import.py imports them).

Input contract (DESIGN.md section 3): reference_id, group_id, domain_id (each may come from the
command line), optional type and embedding (list of floats, one length per group), and metadata
as one `metadata` column (map<string,string> or a JSON object string) or, without one, every
other column. Values are strings. Rows are upserted on (group_id, reference_id) in one
transaction (the last row read wins a duplicated key): past --max-rejects nothing is written,
and re-running an import is safe.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from mtool.errors import InvalidInput, MtoolError

log = logging.getLogger(__name__)
NODE_COLUMNS = ("reference_id", "group_id", "domain_id", "type", "embedding", "metadata")
FLOAT4_OID, FLOAT4_ARRAY_OID = 700, 1021
MAX_ID_CHARS = 255


@dataclass
class NodesResult:
    files: int
    rows: int
    imported: int
    rejected: int
    rejects_file: str | None
    job_id: str | None = None
    already_imported: bool = False  # the same files were imported by a COMPLETED job: no work

    def to_json(self) -> dict:
        return self.__dict__.copy()


# -- loading a group ------------------------------------------------------------------------

def _meta_value(value):
    """A metadata value as text: strings as they are, anything else (numbers, booleans, nested
    objects and lists) as JSON, never Python's repr."""
    import json

    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


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


def load_group(conn, group_id: str, keys, connect=None) -> GroupNodes:
    """The group's nodes, read in one snapshot (REPEATABLE READ) with their node version: ids
    and the profile's keys in one COPY (CSV) parsed by Arrow's C++ reader; embeddings in a
    second, binary COPY streamed into the (N, D) float32 array (_read_embeddings). Formatting
    embeddings as text had cost the server most of the load (7.5 s of 200k nodes' 64 floats),
    and holding their text, its Arrow copy and the array at once most of the peak memory.
    With `connect` (a new connection), the embeddings are read at the same time on a second
    connection in the same snapshot (pg_export_snapshot): both COPYs keep a server process busy."""
    import io
    from concurrent.futures import ThreadPoolExecutor

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
        emb_digest = hashlib.blake2b(digest_size=16)
        embeddings = None
        if dims and connect is not None:
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            reader = ThreadPoolExecutor(1)
            embeddings = reader.submit(_read_embeddings_in_snapshot, connect, snapshot, group_id, n, dims, emb_digest)
            reader.shutdown(wait=False)
        buffer = io.BytesIO()
        with conn.cursor() as cur:
            with cur.copy(f"COPY (SELECT {cols} FROM nodes WHERE group_id = %s ORDER BY reference_id) TO STDOUT "
                          "(FORMAT csv)", [*keys, group_id]) as cp:
                for data in cp:
                    buffer.write(data)
            digest.update(buffer.getbuffer())
            if embeddings is not None:
                embedding = embeddings.result()  # inside the exporting transaction: its snapshot stays valid
            else:
                embedding = _read_embeddings(cur, group_id, n, dims, emb_digest) if dims else None
            digest.update(emb_digest.digest())
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


def _read_embeddings_in_snapshot(connect, snapshot: str, group_id, n, dims, digest) -> np.ndarray:
    from psycopg import IsolationLevel, sql

    with connect() as conn:
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        with conn.cursor() as cur:
            return _read_embeddings(cur, group_id, n, dims, digest)


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
