"""`mtool nodes import` as a job: killed imports resume to exactly the nodes of an uninterrupted
one, files already imported do no work, metadata columns are encoded as Python's json would."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_mtool

pytestmark = pytest.mark.postgres
DOMAIN = "dddddddd-0000-4000-8000-00000000000e"


def group(i):
    return f"cccccccc-0000-4000-8000-{i:012d}"


def node_files(tmp, g, n=4500, seed=5):
    """Two files, metadata as columns (strings with characters JSON escapes, integers, nulls),
    embeddings with some nulls; the second file repeats 300 keys of the first with other values
    (the last row read must win)."""
    rng = random.Random(seed)
    cities = ["Berlin", 'Quote"d', "back\\slash", "new\nline", "Zürich", ""]

    def rows(ids, tag):
        return {"reference_id": [f"n{i:05d}" for i in ids], "group_id": [g] * len(ids),
                "domain_id": [DOMAIN] * len(ids),
                "city": [rng.choice(cities) if rng.random() < 0.9 else None for _ in ids],
                "age": pa.array([rng.randint(18, 70) if rng.random() < 0.9 else None for _ in ids], pa.int32()),
                "tag": [tag] * len(ids),
                "embedding": pa.array([[rng.gauss(0, 1) for _ in range(8)] if rng.random() < 0.95 else None
                                       for _ in ids], pa.list_(pa.float32()))}
    first, second = tmp / f"{g}-a.parquet", tmp / f"{g}-b.parquet"
    pq.write_table(pa.table(rows(range(n), "first")), first, row_group_size=1700)
    pq.write_table(pa.table(rows(range(n - 300, n + 500), "second")), second)
    return [str(first), str(second)]


def expected_nodes(paths):
    """What the files say, key by key, the last row read winning."""
    out = {}
    for path in paths:
        for rec in pq.read_table(path).to_pylist():
            meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in rec.items()
                    if k not in ("reference_id", "group_id", "domain_id", "embedding") and v is not None}
            out[rec["reference_id"]] = (meta, None if rec["embedding"] is None else np.float32(rec["embedding"]))
    return out


def stored_nodes(dsn, g):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT reference_id, metadata, embedding FROM nodes WHERE group_id = %s", (g,)).fetchall()
    return {ref: (meta, None if emb is None else np.float32(emb)) for ref, meta, emb in rows}


def assert_nodes(got, expected):
    assert set(got) == set(expected)
    for ref, (meta, emb) in expected.items():
        assert got[ref][0] == meta, ref
        assert (got[ref][1] is None and emb is None) or np.array_equal(got[ref][1], emb), ref


def job_rows(dsn, g):
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT job_id, status, mode FROM import_jobs WHERE group_id = %s OR "
                            "source_uris[1] LIKE %s", (g, f"%{g}%")).fetchall()


def test_nodes_import_matches_the_files_and_a_second_run_does_no_work(dsn, tmp_path):
    g = group(1)
    paths = node_files(tmp_path, g)
    out = json.loads(run_mtool(["nodes", "import", *paths, "--batch-rows", "1000", "--json"], dsn,
                               check_rc=0).stdout)
    assert out["imported"] == 4500 + 800 and out["rejected"] == 0 and not out["already_imported"]
    assert_nodes(stored_nodes(dsn, g), expected_nodes(paths))
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SELECT version FROM node_versions WHERE group_id = %s", (g,)).fetchone()[0]
    again = run_mtool(["nodes", "import", *paths, "--batch-rows", "1000"], dsn, check_rc=0)
    assert "already imported by job " + out["job_id"] in again.stdout
    with psycopg.connect(dsn) as conn:  # no work: the nodes' version did not move
        assert conn.execute("SELECT version FROM node_versions WHERE group_id = %s", (g,)).fetchone()[0] == version
    assert [(s, m) for _, s, m in job_rows(dsn, g)] == [("COMPLETED", "nodes")]


CRASHES = ["nodes-batch-committed:3", "nodes-before-commit", "nodes-commit"]


@pytest.mark.parametrize("repeats", [True, False], ids=["keys-read-twice", "new-keys-forwarded"])
@pytest.mark.parametrize("crash_at", CRASHES)
def test_killed_nodes_import_resumes_to_the_uninterrupted_nodes(dsn, tmp_path, crash_at, repeats):
    """Killed with its batches forwarded into `nodes` in an open transaction (new keys), or
    after the forward gave up (a key read twice), at each point."""
    g = group(10 + CRASHES.index(crash_at) + (0 if repeats else 30))
    paths = node_files(tmp_path, g, seed=11)
    if not repeats:
        paths = paths[:1] + [write_rows(tmp_path / f"{g}-c.parquet", g, range(4500, 5300), 12)]
    args = ["nodes", "import", *paths, "--batch-rows", "1000"]
    assert run_mtool(args, dsn, env={"MTOOL_CRASH_AT": crash_at}).returncode == -9
    assert stored_nodes(dsn, g) == {}  # nothing reaches `nodes` before the job's commit
    assert [s for _, s, _ in job_rows(dsn, g)] == ["PROCESSING"]
    run_mtool(args, dsn, check_rc=0)  # the same command resumes the job
    assert_nodes(stored_nodes(dsn, g), expected_nodes(paths))
    (job_id, status, _), = job_rows(dsn, g)
    with psycopg.connect(dsn) as conn:
        batches = conn.execute("SELECT count(*) FROM import_checkpoints WHERE job_id = %s", (job_id,)).fetchone()[0]
        leftover = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'mtool_stage' AND tablename = %s",
                                ("n_" + job_id.hex,)).fetchone()[0]
    # 4,500 rows (row groups of 1,700) read in batches of 1,000, then 800 rows: each batch once
    assert status == "COMPLETED" and batches == 5 + 1 and leftover == 0
    with psycopg.connect(dsn) as conn:  # nor the batches' own tables
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'mtool_stage' AND tablename LIKE %s",
                            ("n\\_" + job_id.hex + "%",)).fetchone()[0] == 0


def write_rows(path, g, ids, seed, tag="third"):
    """A nodes file of keys `ids` (metadata as columns, an 8-dim embedding)."""
    rng = random.Random(seed)
    ids = list(ids)
    pq.write_table(pa.table({
        "reference_id": [f"n{i:05d}" for i in ids], "group_id": [g] * len(ids), "domain_id": [DOMAIN] * len(ids),
        "city": [rng.choice(["Oslo", "Lyon"]) for _ in ids], "tag": [tag] * len(ids),
        "embedding": pa.array([[rng.gauss(0, 1) for _ in range(8)] for _ in ids], pa.list_(pa.float32()))}), path)
    return str(path)


def test_new_groups_go_into_nodes_as_batches_load_and_updates_take_the_classic_commit(dsn, tmp_path):
    """Batches of new keys are forwarded into `nodes` while the next ones load, in one open
    transaction: the result is the files' rows, one version bump visible at the commit. An
    import into a group with nodes already (an update) gives the forward up and commits the
    load table as a whole: rows as the later file says, rows it does not hold unchanged."""
    g = group(50)
    first = [write_rows(tmp_path / "a.parquet", g, range(0, 2500), 50),
             write_rows(tmp_path / "b.parquet", g, range(2500, 3100), 51)]
    proc = run_mtool(["nodes", "import", *first, "--batch-rows", "1000"], dsn, check_rc=0)
    assert "went into nodes as they loaded" in proc.stderr and "no longer forwarded" not in proc.stderr
    assert_nodes(stored_nodes(dsn, g), expected_nodes(first))
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SELECT version FROM node_versions WHERE group_id = %s", (g,)).fetchone()[0]
    update = write_rows(tmp_path / "c.parquet", g, range(3000, 3400), 52, tag="update")
    proc = run_mtool(["nodes", "import", update, "--batch-rows", "1000"], dsn, check_rc=0)
    assert f"group {g} has nodes already" in proc.stderr and "went into nodes as they loaded" not in proc.stderr
    assert_nodes(stored_nodes(dsn, g), expected_nodes(first + [update]))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT version FROM node_versions WHERE group_id = %s", (g,)).fetchone()[0] > version
        # rows the update did not touch keep their stamp (not rewritten)
        assert conn.execute("SELECT count(DISTINCT updated_at) FROM nodes WHERE group_id = %s AND reference_id < "
                            "'n03000'", (g,)).fetchone()[0] == 1


def test_a_load_table_emptied_by_a_server_crash_makes_the_job_start_over(dsn, tmp_path):
    """The load table is UNLOGGED: crash recovery empties it while the checkpoint (logged) stays.
    The state after such a crash is made here with TRUNCATE; the resumed job must notice and
    import every batch again, not complete with the batches the checkpoint claims."""
    g = group(20)
    paths = node_files(tmp_path, g, seed=21)
    args = ["nodes", "import", *paths, "--batch-rows", "1000"]
    assert run_mtool(args, dsn, env={"MTOOL_CRASH_AT": "nodes-batch-committed:4"}).returncode == -9
    (job_id, _, _), = job_rows(dsn, g)
    with psycopg.connect(dsn) as conn:
        conn.execute(f"TRUNCATE mtool_stage.n_{job_id.hex}")
    proc = run_mtool(args, dsn, check_rc=0)
    assert "starting over" in proc.stderr
    assert_nodes(stored_nodes(dsn, g), expected_nodes(paths))


def test_concurrent_imports_into_the_same_new_groups_both_land(dsn, tmp_path):
    """Two imports at once, each holding new keys of the same two new groups in opposite order
    (one forward waits for the other's group lock, or PostgreSQL breaks the deadlock and one
    gives its forward up): both complete and `nodes` holds every row of both, once."""
    g1, g2 = group(60), group(61)
    a = pq.read_table(write_rows(tmp_path / "a1.parquet", g1, range(0, 1500), 60))
    b = pq.read_table(write_rows(tmp_path / "b1.parquet", g2, range(0, 1500), 61))
    first = str(tmp_path / "first.parquet")
    pq.write_table(pa.concat_tables([a, b]), first)  # g1's rows, then g2's
    c = pq.read_table(write_rows(tmp_path / "c1.parquet", g2, range(1500, 3000), 62))
    d = pq.read_table(write_rows(tmp_path / "d1.parquet", g1, range(1500, 3000), 63))
    second = str(tmp_path / "second.parquet")
    pq.write_table(pa.concat_tables([c, d]), second)  # g2's rows, then g1's
    results = {}

    def run(path):
        results[path] = run_mtool(["nodes", "import", path, "--batch-rows", "1000"], dsn)

    threads = [threading.Thread(target=run, args=(p,)) for p in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[p].returncode for p in (first, second)] == [0, 0], [results[p].stderr[-2000:] for p in results]
    for g, parts in ((g1, ["a1", "d1"]), (g2, ["b1", "c1"])):
        assert_nodes(stored_nodes(dsn, g), expected_nodes([str(tmp_path / f"{p}.parquet") for p in parts]))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'mtool_stage' AND tablename LIKE "
                            "'n\\_%'").fetchone()[0] == 0
