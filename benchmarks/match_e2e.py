"""`mtool nodes import` and `mtool match` end to end through PostgreSQL, one group, beside the
engine's own compute on the same population.

    python benchmarks/match_e2e.py [--nodes 200000 1000000]

For each size: writes the benchmark population as a nodes Parquet file, starts a throwaway
PostgreSQL, then times the commands as a user runs them: `nodes import` (nodes/s, peak RSS of
its process tree), the same import again (a COMPLETED job: no work), `match` (wall, peak RSS,
and the stages the cycle records: load, encode, lists, calibration, search, rescore, check,
write, key, swap, each with its share of the wall time), `match` again (UNCHANGED: no work),
`nodes import` three times more into the same server after TRUNCATE nodes (a warm server: its
WAL files recycled; median and spread),
the server's key build alone on the same rows (a copy of the partition, in the order the
cycle wrote it), and the engine alone (population in memory, encode, stage_matches: the
compute a cycle cannot avoid) with its wall time and peak RSS, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _util import run_measured, scratch_dir, start_postgres  # noqa: E402

from mtool.match import population as popm  # noqa: E402

MTOOL = [os.path.join(os.path.dirname(sys.executable), "mtool")]
GROUP = "cccccccc-0000-4000-8000-00000000e2e0"
DOMAIN = "dddddddd-0000-4000-8000-00000000e2e0"
STAGES = ("load_s", "encode_s", "lists_s", "calibration_s", "search_s", "rescore_s", "check_s", "write_s", "key_s",
          "participation_s", "swap_s")


def engine_only(n: int) -> None:
    """The engine on the same population, no database (run in its own process by main)."""
    from mtool.device import Device
    from mtool.match import encode as enc
    from mtool.match import engine, staging
    from mtool.match import profile as prof
    from mtool.match.nodes import GroupNodes

    p = popm.population(n)
    nodes = GroupNodes(GROUP, DOMAIN, p["reference_id"], {c: p[c] for c in ("city", "age", "interests")},
                       p["embedding"])
    del p
    profile = prof.parse(popm.PROFILE)
    t = time.perf_counter()
    features = enc.encode(profile, nodes)
    opts = engine.MatchOptions(profile, Device.CPU, staging_dir=scratch_dir("mtool-bench-e2e-engine-"))
    staging.stage_in_passes(opts, profile, nodes, features, opts.staging_dir, want_result=False)
    print(json.dumps({"compute_s": time.perf_counter() - t}))


def one_size(n: int, port: int) -> None:
    work = scratch_dir("mtool-bench-e2e-")
    p = popm.population(n)
    table = pa.table({"reference_id": p["reference_id"], "group_id": [GROUP] * n, "domain_id": [DOMAIN] * n,
                      "city": p["city"], "age": p["age"], "interests": p["interests"],
                      "embedding": pa.array(list(p["embedding"]), pa.list_(pa.float32()))})
    del p
    nodes_path = os.path.join(work, "nodes.parquet")
    pq.write_table(table, nodes_path)
    del table
    profile_path = os.path.join(work, "profile.json")
    with open(profile_path, "w") as fh:
        json.dump(popm.PROFILE, fh)
    print(f"--- {n:,} nodes ({os.cpu_count()} CPUs)", flush=True)
    server = start_postgres(port)
    try:
        env = {"MTOOL_DSN": server.dsn("postgres"), "MTOOL_HOME": work}  # staging under MTOOL_HOME

        def mtool(*args):
            proc, wall, peak = run_measured(MTOOL + list(args), env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc, wall, peak

        mtool("db", "init")
        _, import_wall, peak = mtool("nodes", "import", nodes_path)
        print(f"nodes import:        {import_wall:6.1f} s = {n / import_wall:>9,.0f} nodes/s, peak RSS {peak} MiB",
              flush=True)
        _, wall, _ = mtool("nodes", "import", nodes_path)
        print(f"nodes import again:  {wall:6.1f} s (already imported: no work)", flush=True)
        proc, wall, peak = mtool("match", "--profile", profile_path, "--json")
        group = json.loads(proc.stdout)["groups"][0]
        timings = group["timings"]
        import psycopg

        with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
            edges = conn.execute("SELECT count(*) FROM potential_matches").fetchone()[0]
            assert edges == group["edges"], (edges, group)
            part = conn.execute("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = "
                                "'potential_matches'::regclass").fetchone()[0]
            # in the layout of the cycle's load table (matches.create_edge_load_table): the columns
            # that are one value for the cycle are not in its rows
            conn.execute(f"CREATE TABLE key_alone AS SELECT group_id, reference_id, "
                         f"matched_reference_id, compatibility_score FROM {part}")
            conn.execute("SET maintenance_work_mem = '512MB'")  # as the cycle's key build (matches.KEY_BUILD_MEMORY)
            t = time.perf_counter()
            conn.execute("ALTER TABLE key_alone ADD PRIMARY KEY (group_id, reference_id, matched_reference_id)")
            key_alone = time.perf_counter() - t
            conn.execute("DROP TABLE key_alone")
        print(f"match:               {wall:6.1f} s = {n / wall:>9,.0f} nodes/s end to end, {edges:,} edges, "
              f"peak RSS {peak} MiB", flush=True)
        staged = sum(timings.get(s, 0.0) for s in STAGES)
        for stage in STAGES:
            print(f"  {stage[:-2]:<12} {timings.get(stage, 0.0):6.1f} s  {timings.get(stage, 0.0) / wall:5.1%}")
        print(f"  {'other':<12} {wall - staged:6.1f} s  {(wall - staged) / wall:5.1%}  (process start, vectors, "
              "schema and profile checks, cycle bookkeeping)")
        print(f"  key build alone on the same rows: {key_alone:.1f} s (the cycle's: {timings.get('key_s', 0):.1f} s)")
        _, again, _ = mtool("match", "--profile", profile_path)
        print(f"match again:         {again:6.1f} s (unchanged: no work)", flush=True)
        # A server that has run a while recycles its WAL files and reuses freed space; the first
        # import above also paid for a fresh cluster's first WAL segments and file extensions.
        warm = []
        for _ in range(3):
            with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
                conn.execute("TRUNCATE nodes")
                conn.execute("DELETE FROM import_jobs WHERE mode = 'nodes'")
                conn.execute("CHECKPOINT")
            warm.append(mtool("nodes", "import", nodes_path)[1])
        warm.sort()
        print(f"nodes import, warm server (after TRUNCATE nodes), 3 runs: median {warm[1]:.1f} s = "
              f"{n / warm[1]:,.0f} nodes/s (spread {warm[0]:.1f}-{warm[2]:.1f} s)", flush=True)
    finally:
        server.stop()
    proc, engine_wall, engine_peak = run_measured([sys.executable, __file__, "--engine-only", str(n)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    compute = json.loads(proc.stdout.strip().splitlines()[-1])["compute_s"]
    print(f"engine alone:        {compute:6.1f} s compute (encode + stage_matches), peak RSS {engine_peak} MiB "
          f"(population in memory, as after a load)")
    print(f"=> match end to end {wall / compute:.2f}x the engine's compute (target <= 2), peak RSS "
          f"{peak / engine_peak:.2f}x the engine's (target <= 1.25); nodes import {n / import_wall:,.0f} nodes/s "
          "(target >= 200,000)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[200_000])
    ap.add_argument("--port", type=int, default=55441)
    ap.add_argument("--engine-only", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_only:
        return engine_only(args.engine_only)
    for n in args.nodes:
        one_size(n, args.port)


if __name__ == "__main__":
    main()
