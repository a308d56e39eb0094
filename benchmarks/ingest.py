"""Ingest throughput: mtool against the physical limit and the plain psycopg path, one run.

    python benchmarks/ingest.py [--rows 5000000] [--groups 20] [--users 250000]

Prints rows/s for (a) the server loading the same rows with COPY ... FROM 'file' (FORMAT binary)
into the indexed target table, (b) psycopg `write_row` COPY into a temp table plus
INSERT ... ON CONFLICT, (c) `mtool ingest` end to end (a subprocess, process start included),
the ratios (c)/(a) and (c)/(b), and the peak RSS of mtool's whole process tree.
All three run on one throwaway PostgreSQL started here with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
from _util import BENCH_SETTINGS, run_measured, scratch_dir, start_postgres  # noqa: E402

from mtool.io import copy as pgcopy  # noqa: E402
from mtool import samples  # noqa: E402
from mtool.db import migrations  # noqa: E402
from mtool.db import matches as pm  # noqa: E402

COLS = ("group_id", "domain_id", "processing_cycle_id", "reference_id", "matched_reference_id",
        "compatibility_score", "matched_at")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_db(server, name: str) -> str:
    """An empty migrated database on a quiet server: the previous contenders' databases are
    dropped (else autovacuum would be processing their millions of new rows during this run)
    and a checkpoint flushes their WAL."""
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        for (other,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench_%'").fetchall():
            conn.execute(f"DROP DATABASE {other} WITH (FORCE)")
        conn.execute("CHECKPOINT")
        conn.execute(f"CREATE DATABASE {name}")
    dsn = server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn)
    return dsn


def create_partitions(dsn: str, groups: list[str]) -> None:
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        for g in groups:
            conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF potential_matches FOR VALUES IN ({})").format(
                pm.partition_ident(g), sql.Literal(g)))


def write_binary_copy_file(parquet_path: str, out_path: str) -> None:
    """The file's rows in PostgreSQL binary COPY format, for the server-side COPY."""
    import uuid

    pf = pq.ParquetFile(parquet_path)
    now_us = int(time.time() * 1e6) - pgcopy.PG_EPOCH_OFFSET_US
    with open(out_path, "wb") as out:
        out.write(pgcopy.COPY_HEADER)
        for batch in pf.iter_batches(batch_size=500_000):
            n = batch.num_rows
            enc = pc.dictionary_encode(batch.column("group_id"))
            gbytes = np.frombuffer(b"".join(uuid.UUID(g).bytes for g in enc.dictionary.to_pylist()), np.uint8)
            gbytes = gbytes.reshape(-1, 16)[enc.indices.to_numpy()]
            dbytes = np.tile(np.frombuffer(uuid.UUID(samples.DEMO_DOMAIN).bytes, np.uint8), (n, 1))
            fields = [pgcopy.uuid_bytes(gbytes), pgcopy.uuid_bytes(dbytes), pgcopy.text(pa.array(["bench"] * n)),
                      pgcopy.text(batch.column("reference_id")), pgcopy.text(batch.column("matched_reference_id")),
                      pgcopy.fixed(batch.column("compatibility_score").to_numpy(), ">f4"),
                      pgcopy.fixed(np.full(n, now_us), ">i8")]
            out.write(pgcopy.encode_rows(fields, n, with_header=False))
        out.write(pgcopy.COPY_TRAILER)
    os.chmod(out_path, 0o644)


def bench_server_copy(server, copy_file: str, groups: list[str]) -> float:
    dsn = fresh_db(server, "bench_a")
    create_partitions(dsn, groups)
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        conn.execute(f"COPY potential_matches ({', '.join(COLS)}) FROM '{copy_file}' (FORMAT binary)")
        return time.perf_counter() - t0


SEED_TABLE = """CREATE TABLE seed_potential_matches (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(), group_id uuid NOT NULL, domain_id uuid NOT NULL,
    processing_cycle_id varchar(36) NOT NULL, reference_id varchar(255) NOT NULL,
    matched_reference_id varchar(255) NOT NULL, compatibility_score real NOT NULL, matched_at timestamptz NOT NULL,
    UNIQUE (group_id, reference_id, matched_reference_id))"""


def bench_plain_psycopg(server, parquet_path: str, groups: list[str], seed_table: bool = False) -> float:
    """The seed's approach in its simplest Python form: per-row write_row into a temp table, then
    upsert; into our potential_matches, or (seed_table) into the seed LLD's table as designed."""
    import uuid
    from datetime import datetime, timezone

    dsn = fresh_db(server, "bench_b")
    target = "potential_matches"
    if seed_table:
        target = "seed_potential_matches"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SEED_TABLE)
    else:
        create_partitions(dsn, groups)
    now = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        for batch in pq.ParquetFile(parquet_path).iter_batches(batch_size=100_000):
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS staging (LIKE potential_matches) ON COMMIT DELETE ROWS")
            with conn.cursor() as cur:
                with cur.copy(f"COPY staging ({', '.join(COLS)}) FROM STDIN (FORMAT binary)") as cp:
                    cp.set_types(["uuid", "uuid", "varchar", "varchar", "varchar", "float4", "timestamptz"])
                    g, r, m, s = (batch.column(c).to_pylist() for c in
                                  ("group_id", "reference_id", "matched_reference_id", "compatibility_score"))
                    domain = uuid.UUID(samples.DEMO_DOMAIN)
                    as_uuid = {x: uuid.UUID(x) for x in set(g)}
                    for i in range(batch.num_rows):
                        cp.write_row((as_uuid[g[i]], domain, "bench", r[i], m[i], s[i], now))
                cur.execute(f"INSERT INTO {target} ({', '.join(COLS)}) SELECT {', '.join(COLS)} FROM staging "
                            "ON CONFLICT (group_id, reference_id, matched_reference_id) DO UPDATE SET "
                            "compatibility_score = EXCLUDED.compatibility_score, matched_at = EXCLUDED.matched_at")
            conn.commit()
    return time.perf_counter() - t0


def bench_mtool(server, parquet_path: str, workers: int | None) -> tuple[float, int, dict]:
    dsn = fresh_db(server, "bench_c")
    cmd = [sys.executable, "-m", "mtool.cli", "--dsn", dsn, "--log-format", "json", "ingest", parquet_path, "--json"]
    if workers:
        cmd += ["--workers", str(workers)]
    proc, wall, peak_mb = run_measured(cmd, {"MTOOL_HOME": scratch_dir("mtool-bench-home-")})
    if proc.returncode != 0:
        raise SystemExit(f"mtool ingest failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    with psycopg.connect(dsn) as conn:
        landed = conn.execute("SELECT count(*) FROM potential_matches").fetchone()[0]
    rows = pq.ParquetFile(parquet_path).metadata.num_rows
    if not landed == result["written_rows"] == result["processed_rows"] == rows:  # the sample keys are unique
        raise SystemExit(f"row count mismatch: file {rows}, read {result['processed_rows']}, "
                         f"written {result['written_rows']}, in table {landed}")
    return wall, peak_mb, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--users", type=int, default=250_000)
    ap.add_argument("--workers", type=int, default=None, help="mtool --workers (default: its own)")
    ap.add_argument("--skip-plain", action="store_true", help="skip (b), the slowest contender")
    args = ap.parse_args()

    work = scratch_dir("mtool-bench-")
    os.chmod(work, 0o755)
    parquet_path = os.path.join(work, "matches.parquet")
    t0 = time.perf_counter()
    samples.write_match_file(parquet_path, args.rows, groups=args.groups, users=args.users)
    size_mb = os.path.getsize(parquet_path) / 2**20
    print(f"generated {args.rows:,} rows, {args.groups} groups, {args.users:,} users: {size_mb:.0f} MiB Parquet "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    groups = samples.group_ids(args.groups)
    copy_file = os.path.join(work, "matches.pgcopy")
    write_binary_copy_file(parquet_path, copy_file)

    server = start_postgres(free_port())
    print(f"PostgreSQL {server.data_dir} with {BENCH_SETTINGS}; {os.cpu_count()} CPUs", flush=True)
    try:
        t_a = bench_server_copy(server, copy_file, groups)
        print(f"(a) server COPY FROM file (binary) into indexed target: {args.rows / t_a:>10,.0f} rows/s "
              f"({t_a:.1f} s)", flush=True)
        t_b = None
        if not args.skip_plain:
            t_b = bench_plain_psycopg(server, parquet_path, groups)
            print(f"(b) psycopg write_row + temp table + upsert:           {args.rows / t_b:>10,.0f} rows/s "
                  f"({t_b:.1f} s)", flush=True)
            t_seed = bench_plain_psycopg(server, parquet_path, groups, seed_table=True)
            print(f"    (b) into the seed LLD's table (uuid id + unique):  {args.rows / t_seed:>10,.0f} rows/s "
                  f"({t_seed:.1f} s)  [context: the issue's 40-70k baseline]", flush=True)
        t_c, peak_mb, result = bench_mtool(server, parquet_path, args.workers)
        print(f"(c) mtool ingest, end to end:                          {args.rows / t_c:>10,.0f} rows/s "
              f"({t_c:.1f} s wall; job {result['duration_s']:.1f} s; peak RSS {peak_mb} MiB over all processes)")
        print(f"(c)/(a) = {t_a / t_c:.2f}" + (f"   (c)/(b) = {t_b / t_c:.2f}   (c)/(b seed table) = "
                                              f"{t_seed / t_c:.2f}" if t_b else ""))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
