"""The load-table layout both jobs write (an import job's rows, a match cycle's edges): its
columns and their binary COPY encoding, and UUIDs as the bytes COPY takes."""

from __future__ import annotations

import uuid

import numpy as np

from mtool.io import copy as pgcopy

# Columns of a job's load table, in COPY order: `seq` then the columns of potential_matches, so
# that the load table, keyed and with `seq` dropped, becomes the group's partition as it is.
LOAD_COLUMNS = ("seq", "group_id", "domain_id", "processing_cycle_id", "reference_id", "matched_reference_id",
                "compatibility_score", "matched_at")


def encode_load_rows(seq, group_id: str, domain_bytes, cycle, reference_ids, matched_ids, scores,
                     matched_at_us) -> bytes:
    """Binary COPY of rows for a load table, in LOAD_COLUMNS order: the one place that knows
    that layout. `cycle` is a string array or one string for every row; `domain_bytes` is
    (m, 16) uint8 or one row for all; `matched_at_us` counts microseconds since 1970."""
    import pyarrow as pa

    m = len(seq)
    if isinstance(cycle, str):
        cycle = pa.repeat(pa.scalar(cycle, pa.large_string()), m)
    fields = [
        pgcopy.fixed(seq, ">i8"),
        pgcopy.uuid_bytes(np.broadcast_to(uuid_matrix([group_id]), (m, 16))),
        pgcopy.uuid_bytes(np.broadcast_to(domain_bytes, (m, 16))),
        pgcopy.text(cycle),
        pgcopy.text(reference_ids),
        pgcopy.text(matched_ids),
        pgcopy.fixed(scores, ">f4"),
        pgcopy.fixed(np.asarray(matched_at_us, np.int64) - pgcopy.PG_EPOCH_OFFSET_US, ">i8"),
    ]
    return pgcopy.encode_rows(fields, m)


def uuid_matrix(values) -> np.ndarray:
    """(len(values), 16) uint8 of UUID strings (None -> zeros)."""
    raw = np.array([uuid.UUID(v).bytes if v else bytes(16) for v in values], dtype="S16")
    return raw.view(np.uint8).reshape(len(values), 16)
