"""Arrow columns -> PostgreSQL binary COPY, built column-wise instead of row by row.

psycopg's `Copy.write_row` costs a few microseconds of Python per row. Here every field becomes
an Arrow binary column holding each row's length word and value bytes, and Arrow's C++
`binary_join_element_wise` concatenates them per row: its data buffer is the COPY stream's
body. Measured about 2x faster than scattering bytes with NumPy fancy indexing, which was
itself several times faster than write_row. Binary COPY applies no casts: the field encodings
here must match the target column types exactly (int8, uuid, text/varchar, float4, timestamptz).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"
# PostgreSQL timestamps count microseconds from 2000-01-01 UTC.
PG_EPOCH_OFFSET_US = 946_684_800_000_000


@dataclass
class FixedField:
    """A fixed-width field: `data` is (n, width) uint8 already in network byte order."""

    data: np.ndarray
    valid: np.ndarray | None = None  # bool mask; None: all rows present


@dataclass
class TextField:
    """A variable-width field: a pyarrow string/binary array (nulls allowed)."""

    array: object


def fixed(values: np.ndarray, be_dtype: str, valid: np.ndarray | None = None) -> FixedField:
    """Values converted to a big-endian dtype such as '>i8' or '>f4', viewed as bytes."""
    arr = np.ascontiguousarray(values, dtype=be_dtype)
    return FixedField(arr.view(np.uint8).reshape(len(arr), arr.dtype.itemsize), valid)


def uuid_bytes(rows: np.ndarray) -> FixedField:
    """(n, 16) uint8 of UUIDs in RFC 4122 byte order, which is PostgreSQL's binary format."""
    return FixedField(np.ascontiguousarray(rows, dtype=np.uint8))


def text(array) -> TextField:
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return TextField(array)


def null_field(n: int) -> FixedField:
    return FixedField(np.zeros((n, 0), np.uint8), np.zeros(n, bool))


def _word(value: int, dtype: str):
    import pyarrow as pa

    return pa.scalar(np.array(value, dtype=dtype).tobytes(), pa.binary())


def _binary_rows(rows: np.ndarray):
    """(n, w) uint8 -> pyarrow binary array of n w-byte values."""
    import pyarrow as pa

    n, width = rows.shape
    fsb = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(np.ascontiguousarray(rows))])
    return fsb.cast(pa.binary())


def _parts(field, n: int) -> list:
    """Length word and value of one field, as Arrow binary arrays or scalars, nulls as b''."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(field, FixedField):
        width = field.data.shape[1]
        if field.valid is None:
            return [_word(width, ">i4"), _binary_rows(field.data)]
        if not field.valid.any():
            return [_word(-1, ">i4")]
        lengths = np.where(field.valid, width, -1).astype(">i4")
        values = pc.if_else(pa.array(field.valid), _binary_rows(field.data), pa.scalar(b"", pa.binary()))
        return [_binary_rows(lengths.view(np.uint8).reshape(n, 4)), values]
    array = field.array
    values = array.cast(pa.binary()) if not pa.types.is_binary(array.type) else array
    lengths = pc.fill_null(pc.binary_length(values), -1).to_numpy(zero_copy_only=False).astype(">i4")
    if values.null_count:
        values = pc.fill_null(values, b"")
    return [_binary_rows(lengths.view(np.uint8).reshape(n, 4)), values]


def encode_rows(fields: list, n: int, with_header: bool = True) -> bytes:
    """One binary COPY stream (header, n rows of the fields, trailer)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    head, tail = (COPY_HEADER, COPY_TRAILER) if with_header else (b"", b"")
    if n == 0:
        return head + tail
    parts = [_word(len(fields), ">i2")]
    for field in fields:
        parts += _parts(field, n)
    if not any(isinstance(p, pa.Array) for p in parts):  # every field constant: give the join an array
        parts[0] = pa.repeat(parts[0], n)
    rows = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.binary()))
    bufs = rows.buffers()
    offsets = np.frombuffer(bufs[1], np.int32, n + 1, offset=rows.offset * 4)
    return b"".join((head, memoryview(bufs[2])[offsets[0]:offsets[n]], tail))


def copy_bytes(cursor, table: str, columns: tuple[str, ...], payload: bytes) -> None:
    """Stream one encoded binary COPY payload into `table`."""
    sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT binary)"
    with cursor.copy(sql) as cp:
        cp.write(payload)
