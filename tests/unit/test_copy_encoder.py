"""The vectorised binary COPY encoder against a straightforward per-row decoder of the format."""

import struct
import uuid

import numpy as np
import pyarrow as pa
import pytest

from mtool.io import copy as pgcopy


def decode(buf: bytes, kinds):
    """Reference decoder of PostgreSQL's binary COPY format (per row, per field)."""
    assert buf[:11] == b"PGCOPY\n\xff\r\n\x00"
    pos = 19
    rows = []
    while True:
        (count,) = struct.unpack_from(">h", buf, pos)
        pos += 2
        if count == -1:
            assert pos == len(buf)
            return rows
        assert count == len(kinds)
        row = []
        for kind in kinds:
            (length,) = struct.unpack_from(">i", buf, pos)
            pos += 4
            if length == -1:
                row.append(None)
                continue
            raw = buf[pos : pos + length]
            pos += length
            row.append({"i8": lambda b: struct.unpack(">q", b)[0], "f4": lambda b: struct.unpack(">f", b)[0],
                        "text": lambda b: b.decode(), "uuid": lambda b: str(uuid.UUID(bytes=b))}[kind](raw))
        rows.append(row)


def test_encodes_every_field_kind_with_nulls():
    ids = pa.array(["a", None, "ünïcode", "", "x" * 300], pa.large_string())
    nums = np.array([1, -2, 3, 2**40, 0], np.int64)
    scores = np.array([0.5, 1.25, -3.0, 0.0, 7.5], np.float32)
    uuids = [uuid.uuid4() for _ in range(5)]
    ubytes = np.frombuffer(b"".join(u.bytes for u in uuids), np.uint8).reshape(5, 16)
    valid = np.array([True, False, True, True, False])
    fields = [pgcopy.fixed(nums, ">i8"), pgcopy.text(ids), pgcopy.fixed(scores, ">f4", valid),
              pgcopy.uuid_bytes(ubytes), pgcopy.null_field(5)]
    rows = decode(pgcopy.encode_rows(fields, 5), ["i8", "text", "f4", "uuid", "text"])
    assert rows == [
        [1, "a", 0.5, str(uuids[0]), None],
        [-2, None, None, str(uuids[1]), None],
        [3, "ünïcode", -3.0, str(uuids[2]), None],
        [2**40, "", 0.0, str(uuids[3]), None],
        [0, "x" * 300, None, str(uuids[4]), None],
    ]


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_sliced_arrow_arrays_and_sizes(n):
    base = pa.array([f"id-{i}" for i in range(n + 7)], pa.string())
    sliced = base.slice(3, n)  # a non-zero array offset must be honoured
    rows = decode(pgcopy.encode_rows([pgcopy.text(sliced)], n), ["text"])
    assert [r[0] for r in rows] == [f"id-{i}" for i in range(3, 3 + n)]


@pytest.mark.parametrize("ids", [[str(uuid.UUID(int=i * 7919)) for i in range(50)],  # one width: fixed records
                                 [f"é{i:03d}" for i in range(50)],  # one byte width, multibyte UTF-8
                                 [f"n{i}" for i in range(50)]])  # widths differ: the general encoder
def test_edge_payload_decodes_to_the_edges_of_the_block(ids):
    """The edge writer's payload (fixed-width records where every id has one byte width) decodes
    to the block's edges in order: the query's id, the neighbour's id, the score; slots without
    a neighbour (-1) give no row."""
    from mtool.match.writer import _edges_payload, fixed_width_ids

    refs = pa.array(ids, pa.string())
    fixed = fixed_width_ids(refs)
    assert (fixed is None) == (len({len(i.encode()) for i in ids}) > 1)
    rng = np.random.default_rng(4)
    rows = rng.permutation(50)[:12]
    neighbors = rng.integers(0, 50, (12, 5)).astype(np.int32)
    neighbors[::3, 3:] = -1
    scores = rng.random((12, 5), dtype=np.float32)
    payload, m = _edges_payload({"refs": refs, "fixed_ids": fixed}, rows, neighbors, scores)
    want = [(rows[r], neighbors[r, c], scores[r, c]) for r in range(12) for c in range(5) if neighbors[r, c] >= 0]
    got = decode(payload, ["text", "text", "f4"])
    assert m == len(want) == len(got)
    assert got == [[ids[q], ids[nb], float(sc)] for q, nb, sc in want]
