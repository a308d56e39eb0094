"""A cycle is exactly what its inputs say, and bad input never costs a user their matches
(issue 12): each numbered finding of the hostile test, against a real PostgreSQL."""

from __future__ import annotations

import json
import time

import psycopg
import pyarrow as pa
import pytest

from tests.conftest import run_mtool
from tests.integration.helpers import write
from tests.integration.match_helpers import PROFILE, brute_force, make_nodes, stored_matches
from tests.integration.test_match import DOMAIN, assert_same, group, nodes_file, profile_file

pytestmark = pytest.mark.postgres


def cycles_of(dsn, g):
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT cycle_id, status, error, fingerprint FROM match_cycles WHERE group_id = %s "
                            "ORDER BY started_at", (g,)).fetchall()


def clean_result(dsn_factory, files, rows, args):
    """The rows of a clean run of `args` on `rows`, in a database of their own."""
    dsn = dsn_factory()
    run_mtool(["nodes", "import", nodes_file(files, rows, "clean.parquet")], dsn, check_rc=0)
    run_mtool(args, dsn, check_rc=0)
    return stored_matches(dsn, rows[0]["group_id"])[0]


@pytest.fixture
def fresh_dsn(pg_server):
    """More databases for one test (a clean reference run beside the test's own)."""
    import itertools
    import os

    made, counter = [], itertools.count()

    def make():
        name = f"r{os.getpid()}_{int(time.time() * 1000) % 10**8}_{next(counter)}"
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE mtool_template")
        made.append(name)
        return pg_server.dsn(name)

    yield make
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        for name in made:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- 1. a resumed cycle resumes only the same work -------------------------------------------

@pytest.mark.parametrize("change", ["block-rows", "profile", "more-nodes", "k"])
def test_killed_run_rerun_with_other_inputs_gives_a_clean_run_of_the_new_inputs(dsn, files, fresh_dsn, change):
    g = group(60)
    rows = make_nodes(5_500, g, DOMAIN, seed=60)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    killed = ["match", "--profile", profile_file(files), "--block-rows", "1024", "--k", "20"]
    assert run_mtool(killed, dsn, env={"MTOOL_CRASH_AT": "match-block-done:2"}).returncode == -9
    rerun = ["match", "--profile", profile_file(files), "--block-rows", "1024", "--k", "20"]
    if change == "block-rows":
        rerun[4] = "16384"
    elif change == "profile":
        other = {**PROFILE, "keys": {**PROFILE["keys"], "city": {"type": "categorical", "weight": 5.0}}}
        rerun[2] = profile_file(files, other, "other.yaml")
    elif change == "k":
        rerun[-1] = "10"
    elif change == "more-nodes":
        extra = make_nodes(6_500, g, DOMAIN, seed=61)[-1000:]
        for i, r in enumerate(extra):
            r["reference_id"] = f"x{i:05d}"
        run_mtool(["nodes", "import", nodes_file(files, extra, "extra.parquet")], dsn, check_rc=0)
        rows = rows + extra
    run_mtool(rerun, dsn, check_rc=0)
    got, cycle_ids = stored_matches(dsn, g)
    assert len(cycle_ids) == 1
    expected = clean_result(fresh_dsn, files, rows, rerun)
    assert got == expected
    statuses = [s for _, s, _, _ in cycles_of(dsn, g)]
    assert statuses == ["ABANDONED", "COMPLETED"]


def test_killed_run_rerun_with_the_same_inputs_resumes_its_cycle(dsn, files):
    g = group(61)
    rows = make_nodes(5_500, g, DOMAIN, seed=62)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    args = ["match", "--profile", profile_file(files), "--block-rows", "1024"]
    assert run_mtool(args, dsn, env={"MTOOL_CRASH_AT": "match-block-done:2"}).returncode == -9
    killed = cycles_of(dsn, g)
    proc = run_mtool(args, dsn, check_rc=0)
    assert f"resuming cycle {killed[0][0]}" in proc.stderr
    assert [(c, s) for c, s, _, _ in cycles_of(dsn, g)] == [(killed[0][0], "COMPLETED")]


# -- 2. one failed cycle does not break its group --------------------------------------------

def test_a_failed_cycle_is_followed_by_good_runs(dsn, files):
    g = group(62)
    rows = make_nodes(300, g, DOMAIN, seed=63)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    # A failure the profile check cannot see: a node whose embedding breaks the loader.
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE nodes SET embedding = '{1,2}' WHERE group_id = %s AND reference_id = 'n00007'", (g,))
    proc = run_mtool(["match", "--profile", profile_file(files)], dsn)
    assert proc.returncode == 3 and [s for _, s, _, _ in cycles_of(dsn, g)] == ["FAILED"]
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE nodes SET embedding = %s WHERE group_id = %s AND reference_id = 'n00007'",
                     (rows[7]["embedding"], g))
    for _ in range(2):
        run_mtool(["match", "--profile", profile_file(files), "--force"], dsn, check_rc=0)
        got, cycle_ids = stored_matches(dsn, g)
        assert_same(got, brute_force(PROFILE, rows)) and len(cycle_ids) == 1
    assert [s for _, s, _, _ in cycles_of(dsn, g)] == ["FAILED", "COMPLETED", "COMPLETED"]


# -- 3. no silent wipe -------------------------------------------------------------------------

def test_an_empty_bipartite_side_keeps_the_previous_matches(dsn, files):
    g = group(63)
    rows = make_nodes(200, g, DOMAIN, seed=64, with_gender=True)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    bip = {**PROFILE, "partition": {"key": "gender", "left": "M", "right": "F"}}
    run_mtool(["match", "--profile", profile_file(files, bip, "bip.yaml")], dsn, check_rc=0)
    before = stored_matches(dsn, g)
    assert before[0]
    # Every F becomes an X: the right side is empty.
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE nodes SET metadata = metadata || '{\"gender\": \"X\"}' WHERE group_id = %s "
                     "AND metadata->>'gender' = 'F'", (g,))
    proc = run_mtool(["match", "--profile", profile_file(files, bip, "bip.yaml"), "--json"], dsn)
    assert proc.returncode == 3 and "one side is empty" in proc.stdout
    assert json.loads(proc.stdout)["empty"] == 1
    assert stored_matches(dsn, g) == before
    assert cycles_of(dsn, g)[-1][1] == "SKIPPED"
    # Asked for, the empty cycle replaces them.
    run_mtool(["match", "--profile", profile_file(files, bip, "bip.yaml"), "--allow-empty"], dsn, check_rc=0)
    assert stored_matches(dsn, g)[0] == {}


def test_a_group_without_comparable_data_gets_no_score_0_edges(dsn, files):
    normal, sparse = group(64), group(65)
    rows = make_nodes(120, normal, DOMAIN, seed=65)
    # Every node of the sparse group has one key that no other node has: nothing in common.
    lonely = [{"reference_id": f"s{i:03d}", "group_id": sparse, "domain_id": DOMAIN,
               "metadata": json.dumps({"city" if i % 2 else "age": "paris" if i % 2 else "30"}), "embedding": None}
              for i in range(2)]
    schema = pa.schema([("reference_id", pa.string()), ("group_id", pa.string()), ("domain_id", pa.string()),
                        ("metadata", pa.string()), ("embedding", pa.list_(pa.float32()))])
    run_mtool(["nodes", "import", nodes_file(files, rows), write(files / "s.parquet", lonely, schema=schema)],
              dsn, check_rc=0)
    profile = {**PROFILE, "keys": {k: v for k, v in PROFILE["keys"].items() if k != "smoker"}}
    proc = run_mtool(["match", "--profile", profile_file(files, profile, "p.yaml"), "--json"], dsn)
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    assert out["completed"] == 1 and out["empty"] == 1
    assert stored_matches(dsn, sparse)[0] == {}
    got = stored_matches(dsn, normal)[0]
    assert_same(got, brute_force(profile, rows))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM potential_matches WHERE group_id = %s", (sparse,)).fetchone()[0] == 0


# -- 4 and 5. profile values and options are refused before any work ---------------------------

BAD_PROFILES = [
    ({"keys": {"age": {"type": "numeric", "scale": 10, "weight": float("inf")}}}, "weight must be a finite positive"),
    ({"keys": {"age": {"type": "numeric", "scale": float("nan")}}}, "scale must be a finite positive"),
    ({"keys": {"age": {"type": "numeric", "scale": 10, "weight": float("nan")}}}, "weight must be a finite positive"),
    ({"keys": {"city": {"type": "categorical"}}, "partition": {"key": "smoker", "left": "no", "right": "no"}},
     "partition left and right must differ"),
    ({"k": 0, "keys": {"city": {"type": "categorical"}}}, "k must be an integer from 1 to 1000"),
    ({"k": True, "keys": {"city": {"type": "categorical"}}}, "k must be an integer from 1 to 1000, not True"),
    ({"k": 100000, "keys": {"city": {"type": "categorical"}}}, "k must be an integer from 1 to 1000"),
    ({"keys": {"city": {"type": "categorical", "wieght": 9}}}, "unknown field 'wieght' (did you mean 'weight'?)"),
    ({"keys": {"city": {"type": "categorical"}}, "kk": 1}, "unknown field 'kk'"),
    ({"keys": {"city": {"type": "categorical", "required": "no"}}}, "required must be true or false"),
    ({"keys": {"interests": {"type": "multi", "separator": ""}}}, "separator must be a non-empty string"),
    ({"keys": ["city"]}, "keys must be a mapping"),
    ({"embedding": 3}, "embedding must be a mapping"),
]


@pytest.mark.parametrize("profile,message", BAD_PROFILES, ids=[m for _, m in BAD_PROFILES])
def test_bad_profile_values_are_refused_before_any_work(dsn, files, profile, message):
    g = group(66)
    rows = make_nodes(60, g, DOMAIN, seed=66)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    path = files / "bad.json"
    path.write_text(json.dumps(profile))  # JSON: NaN and Infinity survive as values
    t0 = time.monotonic()
    proc = run_mtool(["match", "--profile", str(path)], dsn)
    assert proc.returncode == 78 and message in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 30 and cycles_of(dsn, g) == []


BAD_OPTIONS = [
    (["--block-rows", "0"], "--block-rows"), (["--block-rows", "-5"], "--block-rows"), (["--k", "-1"], "--k"),
    (["--k", "0"], "--k"), (["--workers", "0"], "--workers"), (["--cycle-id", "x" * 37], "--cycle-id"),
    (["--cycle-id", "../../etc"], "--cycle-id"),
]


@pytest.mark.parametrize("option,name", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_options_exit_2_naming_the_option_and_keep_the_matches(dsn, files, option, name):
    g = group(67)
    rows = make_nodes(80, g, DOMAIN, seed=67)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    run_mtool(["match", "--profile", profile_file(files)], dsn, check_rc=0)
    before = stored_matches(dsn, g)
    proc = run_mtool(["match", "--profile", profile_file(files), *option], dsn)
    assert proc.returncode == 2 and name in proc.stderr, proc.stderr
    assert stored_matches(dsn, g) == before and len(cycles_of(dsn, g)) == 1


def test_nodes_import_max_rejects_below_zero_is_a_usage_error(files):
    proc = run_mtool(["nodes", "import", str(files / "x.parquet"), "--max-rejects", "-1"])
    assert proc.returncode == 2 and "--max-rejects" in proc.stderr


def test_k_above_the_group_size_keeps_every_candidate(dsn, files):
    g = group(68)
    rows = make_nodes(12, g, DOMAIN, seed=68)
    run_mtool(["nodes", "import", nodes_file(files, rows)], dsn, check_rc=0)
    run_mtool(["match", "--profile", profile_file(files), "--k", "50"], dsn, check_rc=0)
    assert_same(stored_matches(dsn, g)[0], brute_force({**PROFILE, "k": 50}, rows))


# -- 6. one embedding length per group ---------------------------------------------------------

def _emb_rows(g, n, dim, prefix="e", start=0):
    return [{"reference_id": f"{prefix}{i:05d}", "group_id": g, "domain_id": DOMAIN,
             "metadata": json.dumps({"city": "paris"}), "embedding": [float(i % 7) + 0.5] * dim}
            for i in range(start, start + n)]


def test_embedding_length_is_kept_per_group_across_files_and_imports(dsn, files):
    g = group(69)
    run_mtool(["nodes", "import", nodes_file(files, _emb_rows(g, 5, 4), "a.parquet")], dsn, check_rc=0)
    # another import, another length: every row differs, the file is refused
    proc = run_mtool(["nodes", "import", nodes_file(files, _emb_rows(g, 3, 6, "b"), "b.parquet")], dsn)
    assert proc.returncode == 65 and "b.parquet" in proc.stderr and "another length" in proc.stderr
    # one file of mixed lengths, after row 50,000 too: the odd rows are rejected with the reason
    big = _emb_rows(g, 50_010, 4, "c")
    big[50_005]["embedding"] = [1.0] * 3
    big[3]["embedding"] = []
    proc = run_mtool(["nodes", "import", nodes_file(files, big, "c.parquet"), "--json"], dsn)
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    assert out["rejected"] == 2 and out["imported"] == 50_008
    with open(out["rejects_file"]) as fh:
        reasons = [json.loads(line)["reason"] for line in fh]
    assert any("embedding has 3 values" in r and "have 4" in r for r in reasons)
    assert any("embedding is empty" in r for r in reasons)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT DISTINCT array_length(embedding, 1) FROM nodes WHERE group_id = %s",
                            (g,)).fetchall() == [(4,)]


def test_metadata_of_the_wrong_type_is_a_file_error_and_nested_values_are_json(dsn, files):
    g = group(70)
    bad = write(files / "m.parquet", [{"reference_id": "a", "group_id": g, "domain_id": DOMAIN, "metadata": 5}])
    proc = run_mtool(["nodes", "import", bad], dsn)
    assert proc.returncode == 65 and "column 'metadata' has type int64" in proc.stderr
    assert "attribute" not in proc.stderr
    nested = write(files / "n.parquet", [{"reference_id": "a", "group_id": g, "domain_id": DOMAIN,
                                          "metadata": json.dumps({"tags": ["x", "y"], "flag": True, "city": "lyon"})}])
    run_mtool(["nodes", "import", nested], dsn, check_rc=0)
    with psycopg.connect(dsn) as conn:
        meta = conn.execute("SELECT metadata FROM nodes WHERE group_id = %s", (g,)).fetchone()[0]
    assert meta == {"tags": '["x", "y"]', "flag": "true", "city": "lyon"}


# -- 8. configuration errors are not outages ---------------------------------------------------

def test_connection_mistakes_exit_78_at_once(pg_server, files):
    base = pg_server.dsn("postgres")
    for dsn, words in ((base.replace("dbname=postgres", "dbname=no_such_db"), "does not exist"),
                       (base.replace(f"port={pg_server.port}", "port=abc"), "malformed"),
                       (base + " frobnicate=1 password=hunter2-secret", 'invalid connection option "frobnicate"')):
        t0 = time.monotonic()
        proc = run_mtool(["jobs", "list"], dsn)
        assert proc.returncode == 78 and words in proc.stderr, proc.stderr
        assert time.monotonic() - t0 < 20 and "hunter2-secret" not in proc.stderr


@pytest.mark.s3
def test_missing_s3_credentials_exit_78_naming_the_variables(dsn, s3_endpoint, files, monkeypatch):
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
           "AWS_SHARED_CREDENTIALS_FILE": str(files / "none"), "AWS_CONFIG_FILE": str(files / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    proc = run_mtool(["ingest", "s3://bucket/x.parquet", "--group-id", group(71)], dsn,
                     env={k: v for k, v in env.items() if v})
    assert proc.returncode == 78 and "AWS_ACCESS_KEY_ID" in proc.stderr, proc.stderr


def test_an_s3_endpoint_that_never_answers_times_out(dsn, files):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections, never answers
    held = []

    def accept_forever():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1", "MTOOL_READ_TIMEOUT": "1",
           "MTOOL_CONNECT_TIMEOUT": "1"}
    t0 = time.monotonic()
    proc = run_mtool(["ingest", "s3://bucket/x.parquet", "--group-id", group(72)], dsn, env=env, timeout=120)
    server.close()
    for conn in held:
        conn.close()
    assert proc.returncode == 75 and "did not answer in time" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60


# -- help --------------------------------------------------------------------------------------

def test_help_names_every_job_and_what_skipped_means():
    top = run_mtool(["--help"]).stdout
    for job in ("ingest", "jobs", "nodes import", "match", "db", "demo"):
        assert f"\n  {job} " in top
    match_help = " ".join(run_mtool(["match", "--help"]).stdout.split())
    assert "SKIPPED" in match_help and "exit code is 3" in match_help
    assert "one per group" in match_help and "MTOOL_MATCH_WORKERS" in match_help
