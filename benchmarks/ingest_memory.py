"""Peak memory of `mtool ingest` on a Parquet file larger than 1 GB with large row groups.

    python benchmarks/ingest_memory.py [--gib 1.2] [--row-group-rows 2000000]

Writes incompressible rows (random 32-hex ids, no dictionary, no compression) until the file
passes --gib, imports it, and prints the file size, rows/s and the peak RSS summed over mtool's
whole process tree: memory should follow --batch-rows and --workers, not the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
from _util import run_measured, scratch_dir, start_postgres  # noqa: E402

from mtool import samples  # noqa: E402
from mtool.db import migrations  # noqa: E402

SLICE = 500_000


def hex_ids(rng, n):
    raw = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).view(np.uint64)
    return pa.array(np.char.add(np.char.mod("%016x", raw[:, 0]), np.char.mod("%016x", raw[:, 1])).astype(object))


def write_big_file(path: str, gib: float, row_group_rows: int) -> int:
    rng = np.random.default_rng(1)
    groups = samples.group_ids(20)
    writer, rows = None, 0
    while True:
        g = np.array(groups, dtype=object)[rng.integers(0, 20, SLICE)]
        table = pa.table({"group_id": pa.array(g.tolist()), "domain_id": pa.array([samples.DEMO_DOMAIN] * SLICE),
                          "reference_id": hex_ids(rng, SLICE), "matched_reference_id": hex_ids(rng, SLICE),
                          "compatibility_score": pa.array(rng.random(SLICE, dtype=np.float32))})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="none", use_dictionary=False)
        writer.write_table(table, row_group_size=row_group_rows)
        rows += SLICE
        if os.path.getsize(path) > gib * 2**30 - 64 * 2**20:  # the footer and last buffers follow
            break
    writer.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.2)
    ap.add_argument("--row-group-rows", type=int, default=2_000_000)
    args = ap.parse_args()
    work = scratch_dir("mtool-bench-mem-")
    path = os.path.join(work, "big.parquet")
    t0 = time.perf_counter()
    rows = write_big_file(path, args.gib, args.row_group_rows)
    size = os.path.getsize(path)
    print(f"file: {size / 2**30:.2f} GiB, {rows:,} rows, row groups of {args.row_group_rows:,} rows "
          f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_postgres(port)
    try:
        import psycopg

        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            migrations.migrate(conn)
        for label, extra in (("dry run (decode + validate + encode only)", ["--dry-run"]), ("import", [])):
            cmd = [sys.executable, "-m", "mtool.cli", "--dsn", server.dsn(), "--log-format", "json", "ingest", path,
                   "--json", *extra]
            proc, wall, peak = run_measured(cmd, {"MTOOL_HOME": work})
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            result = json.loads(proc.stdout)
            print(f"{label}: {result['processed_rows']:,} rows in {wall:.1f} s ({rows / wall:,.0f} rows/s), "
                  f"peak RSS {peak} MiB over all mtool processes (file {size / 2**20:,.0f} MiB)", flush=True)
    finally:
        server.stop()
        os.remove(path)


if __name__ == "__main__":
    main()
