"""`mtool match` against a real PostgreSQL: exact results equal a brute-force reference, cycles
swap atomically, killed runs resume, shards never process a group twice, bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import psycopg
import pyarrow as pa
import pytest
import yaml

from tests.conftest import run_mtool
from tests.integration.helpers import write
from tests.integration.match_helpers import PROFILE, brute_force, make_nodes, stored_matches

pytestmark = pytest.mark.postgres
DOMAIN = "dddddddd-0000-4000-8000-00000000000d"


def group(i):
    return f"cccccccc-0000-4000-8000-{i:012d}"


def nodes_file(files, rows, name="nodes.parquet"):
    schema = pa.schema([("reference_id", pa.string()), ("group_id", pa.string()), ("domain_id", pa.string()),
                        ("metadata", pa.string()), ("embedding", pa.list_(pa.float32()))])
    return write(files / name, rows, schema=schema)


def profile_file(files, profile=PROFILE, name="profile.yaml"):
    path = files / name
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def assert_same(got, expected):
    assert set(got) == set(expected)
    for ref, exp in expected.items():
        assert [m for m, _ in got[ref]] == [m for m, _ in exp], ref
        assert [round(s, 4) for _, s in got[ref]] == [round(s, 4) for _, s in exp], ref


def test_exact_symmetric_equals_brute_force(dsn, files):
    rows = make_nodes(300, group(1), DOMAIN)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    proc = run_mtool(["match", "--profile", profile_file(files), "--json", "--block-rows", "64"], dsn, check_rc=0)
    assert json.loads(proc.stdout)["completed"] == 1
    got, cycles = stored_matches(dsn, group(1))
    assert_same(got, brute_force(PROFILE, rows))
    assert len(cycles) == 1
    assert all(ref != m for ref, lst in got.items() for m, _ in lst)


def test_exact_bipartite_equals_brute_force(dsn, files):
    rows = make_nodes(250, group(2), DOMAIN, seed=2, with_gender=True)
    profile = dict(PROFILE, partition={"key": "gender", "left": "M", "right": "F"})
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    run_mtool(["match", "--profile", profile_file(files, profile)], dsn, check_rc=0)
    got, _ = stored_matches(dsn, group(2))
    assert_same(got, brute_force(profile, rows, partition=("gender", "M", "F")))
    gender = {r["reference_id"]: json.loads(r["metadata"])["gender"] for r in rows}
    assert all(gender[ref] != gender[m] for ref, lst in got.items() for m, _ in lst)


def test_new_cycle_replaces_the_old_and_readers_never_see_two(dsn, files):
    rows = make_nodes(400, group(3), DOMAIN, seed=3)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    prof = profile_file(files)
    run_mtool(["match", "--profile", prof], dsn, check_rc=0)
    seen, stop = [], threading.Event()

    def reader():
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                seen.append(conn.execute("SELECT count(DISTINCT processing_cycle_id), count(*) FROM potential_matches "
                                         "WHERE group_id = %s", (group(3),)).fetchone())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(2):
            run_mtool(["match", "--profile", prof, "--force"], dsn, check_rc=0)
    finally:
        stop.set()
        thread.join()
    assert seen and all(cycles == 1 for cycles, _ in seen)
    assert {count for _, count in seen} == {400 * 5}
    with psycopg.connect(dsn) as conn:
        done = conn.execute("SELECT count(*) FROM match_cycles WHERE group_id = %s AND status = 'COMPLETED'",
                            (group(3),)).fetchone()[0]
        participation = conn.execute("SELECT count(*) FROM node_participation WHERE group_id = %s",
                                     (group(3),)).fetchone()[0]
    assert done == 3 and participation == 3 * 400


def test_readers_are_not_held_while_the_swap_records_participation(dsn, files):
    """The swap's DETACH PARTITION holds every reader of potential_matches until its commit, so
    the cycle's node_participation rows go in before it. With the swap's transaction paused for
    3 s right after those rows (MTOOL_DELAY_AT), readers of the group never wait a second."""
    import time

    rows = make_nodes(300, group(31), DOMAIN, seed=31)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    prof = profile_file(files)
    run_mtool(["match", "--profile", prof], dsn, check_rc=0)
    waits, errors, stop = [], [], threading.Event()

    def reader():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '5s'")
            while not stop.is_set():
                t = time.monotonic()
                try:
                    conn.execute("SELECT count(*) FROM potential_matches WHERE group_id = %s", (group(31),)).fetchone()
                except psycopg.Error as exc:
                    errors.append(exc)
                waits.append(time.monotonic() - t)
                time.sleep(0.02)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        t = time.monotonic()
        run_mtool(["match", "--profile", prof, "--force"], dsn, env={"MTOOL_DELAY_AT": "match-participated:3"},
                  check_rc=0)
        elapsed = time.monotonic() - t
    finally:
        stop.set()
        thread.join()
    assert elapsed >= 3 and not errors and len(waits) > 50
    assert max(waits) < 1.0, max(waits)
    with psycopg.connect(dsn) as conn:
        participation = conn.execute("SELECT count(*) FROM node_participation WHERE group_id = %s",
                                     (group(31),)).fetchone()[0]
    assert participation == 2 * 300


@pytest.mark.parametrize("crash_at", ["match-block-done:2", "match-before-swap"])
def test_killed_run_resumes_to_the_same_result(dsn, files, crash_at):
    rows = make_nodes(300, group(4), DOMAIN, seed=4)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    args = ["match", "--profile", profile_file(files), "--block-rows", "50"]
    assert run_mtool(args, dsn, env={"MTOOL_CRASH_AT": crash_at}).returncode == -9
    with psycopg.connect(dsn) as conn:
        cycle = conn.execute("SELECT cycle_id, status FROM match_cycles WHERE group_id = %s", (group(4),)).fetchall()
    assert [s for _, s in cycle] == ["PROCESSING"]
    run_mtool(args, dsn, check_rc=0)
    got, cycles = stored_matches(dsn, group(4))
    assert_same(got, brute_force(PROFILE, rows))
    assert cycles == {cycle[0][0]}  # the unfinished cycle was resumed, not restarted


def test_concurrent_shards_process_every_group_exactly_once(dsn, files):
    rows = []
    for g in range(6):
        rows += make_nodes(120, group(10 + g), DOMAIN, seed=10 + g)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    prof = profile_file(files)
    procs = [subprocess.Popen([sys.executable, "-m", "mtool.cli", "--dsn", dsn, "match", "--profile", prof,
                               "--shard", f"{i}/3", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    # And an overlapping unsharded run at the same time: advisory locks keep groups single-owner.
    procs.append(subprocess.Popen([sys.executable, "-m", "mtool.cli", "--dsn", dsn, "match", "--profile", prof,
                                   "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    completed = [g["group_id"] for out in outs for g in out["groups"] if g["status"] == "COMPLETED"]
    sharded = [g["group_id"] for out in outs[:3] for g in out["groups"]]
    assert sorted(sharded) == sorted(group(10 + g) for g in range(6))  # the shards partition the groups
    with psycopg.connect(dsn) as conn:
        per_group = dict(conn.execute("SELECT group_id::text, count(*) FROM match_cycles WHERE status = 'COMPLETED' "
                                      "GROUP BY group_id").fetchall())
    assert len(per_group) == 6
    # A group is computed twice only by runs that did not overlap in time, never concurrently.
    assert sum(per_group.values()) == len(completed)


def test_bad_profile_and_bad_nodes_are_refused_before_any_work(dsn, files):
    rows = make_nodes(50, group(5), DOMAIN, seed=5)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    unknown = dict(PROFILE, keys={**PROFILE["keys"], "height": {"type": "numeric", "scale": 5}})
    proc = run_mtool(["match", "--profile", profile_file(files, unknown, "u.yaml")], dsn)
    assert proc.returncode == 65 and "no node of the selected groups has key 'height'" in proc.stderr
    not_numeric = dict(PROFILE, keys={"city": {"type": "numeric", "scale": 5}})
    proc = run_mtool(["match", "--profile", profile_file(files, not_numeric, "n.yaml")], dsn)
    assert proc.returncode == 65 and "numeric key 'city' has value" in proc.stderr
    proc = run_mtool(["match", "--profile", profile_file(files, {"k": 0, "keys": {}}, "k.yaml")], dsn)
    assert proc.returncode == 78 and "k must be an integer from 1 to 1000, not 0" in proc.stderr
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM potential_matches").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM match_cycles").fetchone()[0] == 0  # refused before any group
    bad = files / "bad-nodes.parquet"
    write(bad, [{"reference_id": "a", "group_id": group(5), "domain_id": DOMAIN, "embedding": "not a list"}])
    proc = run_mtool(["nodes", "import", str(bad)], dsn)
    assert proc.returncode == 65 and "column 'embedding' has type string" in proc.stderr


def test_output_parquet_is_importable(dsn, files):
    rows = make_nodes(200, group(6), DOMAIN, seed=6)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    out = files / "matches.parquet"
    run_mtool(["match", "--profile", profile_file(files), "--output", str(out)], dsn, check_rc=0)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM potential_matches").fetchone()[0] == 0
    run_mtool(["ingest", str(files / "matches")], dsn, check_rc=0)
    got, _ = stored_matches(dsn, group(6))
    assert_same(got, brute_force(PROFILE, rows))


def test_groups_in_parallel_processes_with_metrics(dsn, files):
    rows, per_group = [], {}
    for g in range(4):
        per_group[g] = make_nodes(150, group(20 + g), DOMAIN, seed=20 + g)
        rows += per_group[g]
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    prom = files / "match.prom"
    proc = run_mtool(["match", "--profile", profile_file(files), "--workers", "2", "--json",
                      "--metrics-textfile", str(prom)], dsn, check_rc=0)
    assert json.loads(proc.stdout)["completed"] == 4
    for g in range(4):
        got, _ = stored_matches(dsn, group(20 + g))
        assert_same(got, brute_force(PROFILE, per_group[g]))
    text = prom.read_text()
    assert 'match_cycles_total{status="COMPLETED"} 4.0' in text
    assert f'matches_generated_total{{groupId="{group(20)}"}} 750.0' in text
    assert "batch_matches_duration_count" in text


def test_killed_approximate_run_resumes_to_the_uninterrupted_result(dsn, files):
    """A group above the exact threshold (list join + rescoring, edges streamed by the writer
    process): killed after some blocks, resumed, it ends with exactly the uninterrupted rows."""
    rows = make_nodes(6_000, group(9), DOMAIN, seed=9)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    args = ["match", "--profile", profile_file(files), "--block-rows", "1000", "--force"]
    proc = run_mtool(args, dsn, check_rc=0)
    assert f"progress: 1000/{len(rows)} nodes" in proc.stderr  # progress within the group, block by block
    uninterrupted, first_cycle = stored_matches(dsn, group(9))
    assert len(uninterrupted) == len(rows)
    assert all(len(lst) == PROFILE["k"] and ref not in {m for m, _ in lst} for ref, lst in uninterrupted.items())
    assert run_mtool(args, dsn, env={"MTOOL_CRASH_AT": "match-block-done:3"}).returncode == -9
    assert stored_matches(dsn, group(9)) == (uninterrupted, first_cycle)  # readers still see the old cycle
    run_mtool(args, dsn, check_rc=0)
    resumed, cycles = stored_matches(dsn, group(9))
    assert resumed == uninterrupted and cycles != first_cycle and len(cycles) == 1


def test_nodes_import_rejects_bad_rows_and_keeps_the_good_ones_exactly(dsn, files):
    g = group(40)
    good = [{"reference_id": f"n{i}", "group_id": g, "domain_id": DOMAIN, "metadata": json.dumps({"city": "x"}),
             "embedding": [0.25 * i, -1.5, 3e-8]} for i in range(4)]
    good.append({"reference_id": "n-none", "group_id": g, "domain_id": DOMAIN, "metadata": "{}", "embedding": None})
    bad = [
        {"reference_id": "", "group_id": g, "domain_id": DOMAIN, "metadata": "{}", "embedding": [1.0, 2.0, 3.0]},
        {"reference_id": "b-uuid", "group_id": "nope", "domain_id": DOMAIN, "metadata": "{}", "embedding": None},
        {"reference_id": "b-nan", "group_id": g, "domain_id": DOMAIN, "metadata": "{}",
         "embedding": [1.0, float("nan"), 0.0]},
        {"reference_id": "b-null", "group_id": g, "domain_id": DOMAIN, "metadata": "{}", "embedding": [1.0, None, 0.0]},
        {"reference_id": "b-dims", "group_id": g, "domain_id": DOMAIN, "metadata": "{}", "embedding": [1.0, 2.0]},
        {"reference_id": "b-json", "group_id": g, "domain_id": DOMAIN, "metadata": "[1]", "embedding": None},
    ]
    rejects = files / "node-rejects.jsonl"
    proc = run_mtool(["nodes", "import", nodes_file(files, good[:2] + bad + good[2:], "mixed.parquet"),
                      "--rejects-file", str(rejects), "--json"], dsn, check_rc=3)  # 3: some rows rejected
    out = json.loads(proc.stdout)
    assert (out["imported"], out["rejected"]) == (5, 6)
    reasons = {json.loads(line)["record"]["reference_id"]: json.loads(line)["reason"]
               for line in rejects.read_text().splitlines()}
    assert reasons == {"": "reference_id is null or empty", "b-uuid": "group_id or domain_id is not a valid UUID",
                       "b-nan": "embedding has a null, NaN or infinite value",
                       "b-null": "embedding has a null, NaN or infinite value",
                       "b-dims": f"embedding has 2 values, group {g}'s have 3",
                       "b-json": "metadata is not a JSON object"}
    with psycopg.connect(dsn) as conn:
        stored = dict(conn.execute("SELECT reference_id, embedding FROM nodes WHERE group_id = %s", [g]).fetchall())
    assert set(stored) == {r["reference_id"] for r in good}
    for r in good:  # float4 values exactly as the file's float32 values
        if r["embedding"] is None:
            assert stored[r["reference_id"]] is None
        else:
            assert np.array_equal(np.float32(stored[r["reference_id"]]), np.float32(r["embedding"]))


def test_nodes_import_past_max_rejects_writes_nothing_and_last_duplicate_wins(dsn, files):
    """As with ingest, an import that rejects more than --max-rejects rows writes none of its
    rows (also not the batches read before the limit); a key read twice keeps its last row."""
    g = group(41)
    rows = [{"reference_id": f"n{i}", "group_id": g, "domain_id": DOMAIN, "metadata": json.dumps({"v": str(i)}),
             "embedding": None} for i in range(3)]
    bad = [{"reference_id": "", "group_id": g, "domain_id": DOMAIN, "metadata": "{}", "embedding": None}] * 2
    proc = run_mtool(["nodes", "import", nodes_file(files, rows, "good.parquet"), nodes_file(files, bad, "bad.parquet"),
                      "--max-rejects", "1"], dsn, check_rc=65)
    assert "more than --max-rejects 1" in proc.stderr and "nothing was imported" in proc.stderr
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM nodes WHERE group_id = %s", [g]).fetchone()[0] == 0
    again = dict(rows[0], metadata=json.dumps({"v": "last"}))
    run_mtool(["nodes", "import", nodes_file(files, rows, "first.parquet"),
               nodes_file(files, [again], "second.parquet")], dsn)
    with psycopg.connect(dsn) as conn:
        stored = dict(conn.execute("SELECT reference_id, metadata->>'v' FROM nodes WHERE group_id = %s", [g]).fetchall())
    assert stored == {"n0": "last", "n1": "1", "n2": "2"}


def test_unchanged_group_does_no_work_until_its_nodes_profile_or_options_change(dsn, files):
    g = group(15)
    rows = make_nodes(300, g, DOMAIN, seed=15)
    nodes = nodes_file(files, rows)
    prof = profile_file(files)
    run_mtool(["nodes", "import", nodes], dsn, check_rc=0)
    first = json.loads(run_mtool(["match", "--profile", prof, "--json"], dsn, check_rc=0).stdout)["groups"][0]
    stages = ("load_s", "encode_s", "match_s", "write_s", "key_s", "swap_s")
    assert first["status"] == "COMPLETED" and all(first["timings"][s] >= 0 for s in stages)
    with psycopg.connect(dsn) as conn:
        recorded = conn.execute("SELECT timings FROM match_cycles WHERE cycle_id = %s", (first["cycle_id"],)).fetchone()
    assert set(stages) <= set(recorded[0])
    matches_before = stored_matches(dsn, g)

    def run(*extra):
        proc = run_mtool(["match", "--profile", prof, "--json", *extra], dsn, check_rc=0)
        return json.loads(proc.stdout)["groups"][0], proc

    again, proc = run()  # nothing changed: no work, no new cycle, the matches stay
    assert again["status"] == "UNCHANGED" and again["cycle_id"] == first["cycle_id"]
    assert "unchanged since cycle" in proc.stderr and "--force" in again["error"]
    run_mtool(["nodes", "import", nodes], dsn, check_rc=0)  # the same rows again: still unchanged
    assert run()[0]["status"] == "UNCHANGED"
    assert run("--k", "7")[0]["status"] == "COMPLETED"  # another option: computed
    assert run("--k", "7")[0]["status"] == "UNCHANGED"
    forced = run("--k", "7", "--force")[0]
    assert forced["status"] == "COMPLETED" and forced["cycle_id"] != first["cycle_id"]
    with psycopg.connect(dsn) as conn:  # a node changed by plain SQL counts as a change
        conn.execute("UPDATE nodes SET metadata = metadata || '{\"city\": \"elsewhere\"}' WHERE group_id = %s AND "
                     "reference_id = 'n00003'", (g,))
    changed = run("--k", "7")[0]
    assert changed["status"] == "COMPLETED"
    with psycopg.connect(dsn) as conn:
        statuses = [s for s, in conn.execute("SELECT status FROM match_cycles WHERE group_id = %s", (g,))]
    assert sorted(statuses) == ["COMPLETED"] * 4 and stored_matches(dsn, g) != matches_before


def test_ingest_upserts_and_replaces_a_partition_that_a_cycle_wrote(dsn, files):
    """A cycle's partition stores its one-value columns (group, domain, cycle, matched_at) in
    the catalog, not in its rows: an ingest upsert into it and a replace of it still read and
    write every column."""
    g = group(16)
    rows = make_nodes(200, g, DOMAIN, seed=16)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    cycle = json.loads(run_mtool(["match", "--profile", profile_file(files), "--json"], dsn,
                                 check_rc=0).stdout)["groups"][0]["cycle_id"]
    got, _ = stored_matches(dsn, g)
    ref, (matched, _) = next(iter(got.items()))[0], next(iter(got.values()))[0]
    edits = [{"reference_id": ref, "matched_reference_id": matched, "compatibility_score": 0.5, "group_id": g,
              "domain_id": DOMAIN, "processing_cycle_id": "upsert-1"},
             {"reference_id": "new-node", "matched_reference_id": ref, "compatibility_score": 0.25, "group_id": g,
              "domain_id": DOMAIN, "processing_cycle_id": "upsert-1"}]
    run_mtool(["ingest", write(files / "upsert.parquet", edits)], dsn, check_rc=0)
    with psycopg.connect(dsn) as conn:
        by_cycle = dict(conn.execute("SELECT processing_cycle_id, count(*) FROM potential_matches WHERE group_id = %s "
                                     "AND domain_id = %s GROUP BY 1", (g, DOMAIN)).fetchall())
        edited = conn.execute("SELECT compatibility_score, processing_cycle_id FROM potential_matches WHERE "
                              "group_id = %s AND reference_id = %s AND matched_reference_id = %s",
                              (g, ref, matched)).fetchone()
        old_stamp = conn.execute("SELECT count(DISTINCT matched_at) FROM potential_matches WHERE group_id = %s AND "
                                 "processing_cycle_id = %s", (g, cycle)).fetchone()[0]
    edges = sum(len(v) for v in got.values())
    assert by_cycle == {cycle: edges - 1, "upsert-1": 2} and edited == (0.5, "upsert-1") and old_stamp == 1
    run_mtool(["ingest", "--replace", write(files / "replace.parquet", edits[1:])], dsn, check_rc=0)
    with psycopg.connect(dsn) as conn:
        left = conn.execute("SELECT reference_id, processing_cycle_id, domain_id::text FROM potential_matches "
                            "WHERE group_id = %s", (g,)).fetchall()
    assert left == [("new-node", "upsert-1", DOMAIN)]
