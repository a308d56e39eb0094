"""Synthetic match files in the import contract, for the demo, tests and benchmarks."""

from __future__ import annotations

import uuid

import numpy as np

DEMO_DOMAIN = "0b5e7a52-2f3c-4f0e-9d0a-6d1f6c2b9a01"


def group_ids(n: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]


def user_ids(numbers: np.ndarray):
    """Opaque 16-character ids, like a platform's user ids: 'u' + 15 hex digits of a hash."""
    import pyarrow as pa

    mixed = (numbers.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(4)
    return pa.array(np.char.mod("u%015x", mixed).astype(object), pa.string())


def match_table(rows: int, groups: int = 20, users: int = 250_000, seed: int = 7, domain_id: str = DEMO_DOMAIN,
                start: int = 0, total: int | None = None):
    """Rows [start, start + rows) of a `total`-row match set with unique (group, reference,
    matched) keys: groups are contiguous blocks; each user of a group gets k distinct partners."""
    import pyarrow as pa

    total = max(total or start + rows, 1)
    rng = np.random.default_rng(seed + start)
    idx = np.arange(start, start + rows, dtype=np.int64)
    per_group = -(-total // groups)
    users_per_group = max(2, users // groups)
    k = max(1, -(-per_group // users_per_group))  # matches per user
    step = max(1, users_per_group // k)
    g = np.minimum(idx // per_group, groups - 1)
    local = idx % per_group
    ref = local // k
    partner = (ref + 1 + (local % k) * step) % max(users_per_group, k * step + 1)
    gids = np.array(group_ids(groups, seed), dtype=object)
    return pa.table({
        "group_id": pa.array(gids[g].tolist(), pa.string()),
        "domain_id": pa.array([domain_id] * rows, pa.string()),
        "reference_id": user_ids(ref),
        "matched_reference_id": user_ids(partner),
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
            table = match_table(n, groups, users, seed, start=start, total=rows)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="snappy")
            writer.write_table(table, row_group_size=row_group_rows)
            if not rows:
                break
    finally:
        if writer is not None:
            writer.close()
