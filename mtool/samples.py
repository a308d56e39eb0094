"""Synthetic match files in the import contract, for the demo, tests and benchmarks."""

from __future__ import annotations

import uuid

import numpy as np

DEMO_DOMAIN = "0b5e7a52-2f3c-4f0e-9d0a-6d1f6c2b9a01"


def group_ids(n: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]


def match_table(rows: int, groups: int = 20, users: int = 250_000, seed: int = 7, domain_id: str = DEMO_DOMAIN,
                start: int = 0):
    """`rows` unique (group, reference, matched) rows: each row i is user (i // k) of its group
    matched with a distinct partner, so keys never repeat; groups are contiguous blocks."""
    import pyarrow as pa

    rng = np.random.default_rng(seed + start)
    idx = np.arange(start, start + rows, dtype=np.int64)
    per_group = max(1, -(-(start + rows) // groups)) if groups else rows
    gids = np.array(group_ids(groups, seed), dtype=object)
    g = np.minimum(idx // per_group, groups - 1)
    users_per_group = max(2, users // groups)
    k = max(1, -(-per_group // users_per_group))  # matches per user
    local = idx % per_group
    ref = local // k
    partner = (ref + 1 + (local % k) * 7919) % max(users_per_group, k * 7919 + 2)
    ref_ids = pa.array(np.char.add("u", ref.astype(str)).astype(object)) if rows else pa.array([], pa.string())
    part_ids = pa.array(np.char.add("u", partner.astype(str)).astype(object)) if rows else pa.array([], pa.string())
    return pa.table({
        "group_id": pa.array(gids[g].tolist() if rows else [], pa.string()),
        "domain_id": pa.array([domain_id] * rows, pa.string()),
        "reference_id": ref_ids,
        "matched_reference_id": part_ids,
        "compatibility_score": pa.array(rng.random(rows, dtype=np.float32)),
    })


def write_match_file(path: str, rows: int, groups: int = 20, users: int = 250_000, seed: int = 7,
                     row_group_rows: int = 1_000_000, slice_rows: int = 1_000_000) -> None:
    """Write a match file slice by slice, so that files larger than memory can be made."""
    import pyarrow.parquet as pq

    writer = None
    try:
        for start in range(0, max(rows, 1), slice_rows):
            n = min(slice_rows, rows - start)
            table = match_table(n, groups, users, seed, start=start) if rows else match_table(0, groups, users, seed)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=row_group_rows)
            if not rows:
                break
    finally:
        if writer is not None:
            writer.close()
