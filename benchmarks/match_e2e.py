"""`mtool nodes import` and `mtool match` end to end through PostgreSQL, one group.

    python benchmarks/match_e2e.py [--nodes 200000]

Writes the benchmark population as a nodes Parquet file, starts a throwaway PostgreSQL, then
times the two commands as a user runs them and prints nodes/s, edges/s, peak RSS of each
command's process tree and the phase timings the match cycle records (load, match, write).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(__file__))
from _util import run_measured, scratch_dir, start_postgres  # noqa: E402

from mtool.match import population as popm  # noqa: E402

MTOOL = [os.path.join(os.path.dirname(sys.executable), "mtool")]
GROUP = "cccccccc-0000-4000-8000-00000000e2e0"
DOMAIN = "dddddddd-0000-4000-8000-00000000e2e0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=200_000)
    ap.add_argument("--port", type=int, default=55441)
    args = ap.parse_args()
    n = args.nodes
    work = scratch_dir("mtool-bench-e2e-")
    p = popm.population(n)
    table = pa.table({"reference_id": p["reference_id"], "group_id": [GROUP] * n, "domain_id": [DOMAIN] * n,
                      "city": p["city"], "age": p["age"], "interests": p["interests"],
                      "embedding": pa.array(list(p["embedding"]), pa.list_(pa.float32()))})
    nodes_path = os.path.join(work, "nodes.parquet")
    pq.write_table(table, nodes_path)
    profile_path = os.path.join(work, "profile.json")
    with open(profile_path, "w") as fh:
        json.dump(popm.PROFILE, fh)
    server = start_postgres(args.port)
    try:
        env = {"MTOOL_DSN": server.dsn("postgres"), "MTOOL_HOME": work}  # staging under MTOOL_HOME
        proc, wall, peak = run_measured(MTOOL + ["db", "init"], env)
        assert proc.returncode == 0, proc.stderr
        proc, wall, peak = run_measured(MTOOL + ["nodes", "import", nodes_path], env)
        assert proc.returncode == 0, proc.stderr
        print(f"nodes import: {n:,} nodes in {wall:.1f} s = {n / wall:,.0f} nodes/s, peak RSS {peak} MiB", flush=True)
        proc, wall, peak = run_measured(MTOOL + ["match", "--profile", profile_path, "--json",
                                         ], env)
        assert proc.returncode == 0, proc.stderr
        group = json.loads(proc.stdout)["groups"][0]
        import psycopg

        with psycopg.connect(server.dsn("postgres")) as conn:
            timings, edges = conn.execute("SELECT timings, edge_count FROM match_cycles WHERE status = 'COMPLETED'"
                                          ).fetchone()
            stored = conn.execute("SELECT count(*) FROM potential_matches").fetchone()[0]
        assert stored == edges == group["edges"], (stored, edges, group)
        print(f"match: {n:,} nodes, {edges:,} edges in {wall:.1f} s = {n / wall:,.0f} nodes/s end to end "
              f"({edges / wall:,.0f} edges/s), peak RSS {peak} MiB; phases {timings}, then the edge COPY's tail, "
              f"key build and swap {group['seconds'] - timings['load_s'] - timings['match_s']:.1f} s (group "
              f"{group['seconds']:.1f} s; the rest is process start, schema and profile checks)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
