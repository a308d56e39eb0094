"""`mtool ingest` end to end against a real PostgreSQL: what lands in potential_matches and
import_jobs, through the CLI (exit codes, messages) and through the library."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtool.ingest import jobs as ingest
from tests.conftest import run_mtool
from tests.integration.helpers import DOMAIN, G1, G2, full_rows, job_row, matches, rows_for, write

pytestmark = pytest.mark.postgres


def test_local_file_lands_row_for_row(dsn, files):
    path = write(files / "m.parquet", rows_for(G1, 500) + rows_for(G2, 300, score=0.25), row_group_size=128)
    proc = run_mtool(["ingest", path, "--json", "--batch-rows", "100"], dsn, check_rc=0)
    result = json.loads(proc.stdout)
    assert result["status"] == "COMPLETED" and result["processed_rows"] == 800 and result["written_rows"] == 800
    got = matches(dsn)
    assert len(got) == 800
    assert got[(G1, "u7", "m7")] == 0.5 and got[(G2, "u7", "m7")] == 0.25
    job = job_row(dsn, result["job_id"])
    assert job["status"] == "COMPLETED" and job["total_rows"] == 800 and job["processed_rows"] == 800
    # Defaults for optional columns: the job id as cycle, the job's creation time as matched_at.
    row = full_rows(dsn)[0]
    assert row[1] == DOMAIN and row[2] == result["job_id"] and row[6] == job["created_at"]


def test_multi_file_job_directory_and_glob_last_row_wins(dsn, files):
    shards = files / "shards"
    shards.mkdir()
    write(shards / "part-0.parquet", rows_for(G1, 50, score=0.1))
    # The later file repeats keys u40..u49 with new scores; inside it, u45 appears twice.
    later = rows_for(G1, 20, start=40, score=0.9) + [dict(rows_for(G1, 1, start=45)[0], compatibility_score=0.7)]
    write(shards / "part-1.parquet", later)
    proc = run_mtool(["ingest", str(shards), "--json"], dsn, check_rc=0)
    assert json.loads(proc.stdout)["files"] == 2
    got = matches(dsn)
    assert len(got) == 60
    assert got[(G1, "u10", "m10")] == 0.1 and got[(G1, "u41", "m41")] == 0.9 and got[(G1, "u45", "m45")] == 0.7
    # A glob over the same shards is the same import (same fingerprint): nothing to do.
    proc = run_mtool(["ingest", str(shards / "part-*.parquet")], dsn, check_rc=0)
    assert "already imported" in proc.stdout


def test_physical_variants_of_every_column(db, dsn, files):
    n = 4
    ids = pa.array([f"r{i}" for i in range(n)])
    ts = [datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)] * n
    variants = {
        "string_view": (ids.cast(pa.string_view()), pa.array([0.5] * n, pa.float32()),
                        pa.array(ts, pa.timestamp("ms"))),
        "dictionary": (ids.dictionary_encode(), pa.array([0.5] * n, pa.float64()),
                       pa.array(ts, pa.timestamp("us", tz="Europe/Paris"))),
        "large_string": (ids.cast(pa.large_string()), pa.array([__import__("decimal").Decimal("0.5")] * n, pa.decimal128(5, 3)),
                         pa.array(ts, pa.timestamp("ns", tz="UTC"))),
        "string": (ids, pa.array([0.5] * n, pa.float32()), pa.array(ts, pa.timestamp("s"))),
    }
    for i, (name, (col, score, at)) in enumerate(variants.items()):
        group = f"bbbbbbbb-0000-4000-8000-00000000000{i}"
        table = pa.table({"reference_id": col, "matched_reference_id": col, "compatibility_score": score,
                          "matched_at": at, "processing_cycle_id": pa.array([f"cycle-{name}"] * n)})
        path = write(files / f"{name}.parquet", table)
        result = ingest.run_import(ingest.IngestOptions((path,), group_id=group, domain_id=DOMAIN, workers=1), db)
        assert result.status == "COMPLETED" and result.written_rows == n, name
    # int96 timestamps, as older Spark/Hive writers produce them.
    table = pa.table({"reference_id": ids, "matched_reference_id": ids, "compatibility_score": pa.array([0.5] * n),
                      "matched_at": pa.array(ts, pa.timestamp("ns"))})
    path = write(files / "int96.parquet", table, use_deprecated_int96_timestamps=True)
    assert pq.ParquetFile(path).schema.column(3).physical_type == "INT96"
    ingest.run_import(ingest.IngestOptions((path,), group_id="bbbbbbbb-0000-4000-8000-000000000009",
                                           domain_id=DOMAIN, workers=1), db)
    rows = full_rows(dsn)
    assert len(rows) == 5 * n
    expected_at = {"string_view": ts[0].replace(microsecond=123000), "dictionary": ts[0], "large_string": ts[0],
                   "string": ts[0].replace(microsecond=0)}
    for g, _, cycle, ref, mref, score, at in rows:
        assert score == 0.5 and ref == mref
        if cycle.startswith("cycle-"):
            assert at == expected_at[cycle[6:]], cycle
        else:
            assert at == ts[0]


BAD_ROWS = [
    ({"reference_id": None}, "reference_id is null"),
    ({"matched_reference_id": None}, "matched_reference_id is null"),
    ({"compatibility_score": float("nan")}, "compatibility_score is NaN or infinite"),
    ({"compatibility_score": float("-inf")}, "compatibility_score is NaN or infinite"),
    ({"reference_id": "x" * 256}, "reference_id is longer than 255 characters"),
    ({"group_id": "not-a-uuid"}, "group_id is not a valid UUID"),
    ({"domain_id": "1234"}, "domain_id is not a valid UUID"),
]


def test_bad_rows_go_to_the_rejects_file_and_count_on_the_job(dsn, files):
    good = rows_for(G1, 10)
    bad = [dict(rows_for(G1, 1, start=100 + i)[0], **change) for i, (change, _) in enumerate(BAD_ROWS)]
    path = write(files / "mixed.parquet", good + bad)
    rejects = files / "rejects.jsonl"
    proc = run_mtool(["ingest", path, "--json", "--rejects-file", str(rejects)], dsn)
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout)
    assert result["rejected_rows"] == len(BAD_ROWS) and result["written_rows"] == 10
    assert result["rejects_file"] == str(rejects)
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(ln["row"], ln["reason"]) for ln in lines] == [(10 + i, reason) for i, (_, reason) in enumerate(BAD_ROWS)]
    assert all(ln["file"] == path for ln in lines)
    assert len(matches(dsn)) == 10
    assert job_row(dsn)["rejected_rows"] == len(BAD_ROWS)


def test_too_many_rejects_fails_the_job_and_writes_nothing(dsn, files):
    write_ok = write(files / "before.parquet", rows_for(G1, 5, score=0.3))
    run_mtool(["ingest", write_ok], dsn, check_rc=0)
    before = full_rows(dsn)
    bad = [dict(r, compatibility_score=float("nan")) for r in rows_for(G1, 5, start=50)]
    path = write(files / "bad.parquet", rows_for(G1, 20, score=0.9) + bad)
    proc = run_mtool(["ingest", path, "--max-rejects", "3"], dsn)
    assert proc.returncode == 65, proc.stderr
    assert "more than --max-rejects 3" in proc.stderr and "rejects" in proc.stderr
    assert full_rows(dsn) == before
    job = job_row(dsn)
    assert job["status"] == "FAILED" and "max-rejects" in job["error"]


@pytest.mark.parametrize("kind", ["truncated", "not_parquet", "empty", "missing_column", "wrong_type"])
def test_bad_files_fail_with_65_and_leave_the_table_unchanged(dsn, files, kind):
    run_mtool(["ingest", write(files / "seed.parquet", rows_for(G1, 5))], dsn, check_rc=0)
    before = full_rows(dsn)
    path = files / f"{kind}.parquet"
    if kind == "truncated":
        good = write(files / "full.parquet", rows_for(G1, 1000, score=0.9))
        path.write_bytes(Path(good).read_bytes()[:-100])
    elif kind == "not_parquet":
        path.write_text("reference_id,matched_reference_id\na,b\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing_column":
        write(path, [{"group_id": G1, "domain_id": DOMAIN, "reference_id": "a", "compatibility_score": 0.5}])
    else:
        write(path, [{"group_id": G1, "domain_id": DOMAIN, "reference_id": "a", "matched_reference_id": "b",
                      "compatibility_score": "0.5"}])
    proc = run_mtool(["ingest", str(path)], dsn)
    assert proc.returncode == 65, proc.stderr
    expected = {
        "truncated": "not a readable Parquet file",
        "not_parquet": "not a readable Parquet file",
        "empty": "the file is empty (0 bytes)",
        "missing_column": "required column 'matched_reference_id' is missing",
        "wrong_type": "column 'compatibility_score' has type string, expected a number",
    }[kind]
    assert f"Error: {path}: {expected}" in proc.stderr
    assert full_rows(dsn) == before
    assert job_row(dsn)["status"] == "FAILED"


def test_missing_input_exits_66(dsn, files):
    proc = run_mtool(["ingest", str(files / "nope.parquet")], dsn)
    assert proc.returncode == 66 and "no such file or directory" in proc.stderr


def test_missing_group_is_a_usage_error_naming_the_flag(dsn, files):
    path = write(files / "nogroup.parquet", [{"reference_id": "a", "matched_reference_id": "b",
                                              "compatibility_score": 0.5}])
    proc = run_mtool(["ingest", path, "--domain-id", DOMAIN], dsn)
    assert proc.returncode == 2 and "--group-id" in proc.stderr


def test_upsert_updates_and_keeps_other_rows_replace_removes_absent_rows(dsn, files):
    run_mtool(["ingest", write(files / "v1.parquet", rows_for(G1, 100, score=0.1) + rows_for(G2, 10))], dsn,
              check_rc=0)
    # A small update (merge path): 5 rows changed, 2 new; the rest stays.
    upd = rows_for(G1, 5, score=0.8) + rows_for(G1, 2, start=1000, score=0.6)
    run_mtool(["ingest", write(files / "v2.parquet", upd)], dsn, check_rc=0)
    got = matches(dsn, G1)
    assert len(got) == 102 and got[(G1, "u3", "m3")] == 0.8 and got[(G1, "u50", "m50")] == 0.1
    # A large update (rebuild path) keeps the rows it does not mention too.
    big = rows_for(G1, 60, start=40, score=0.7)
    run_mtool(["ingest", write(files / "v3.parquet", big)], dsn, check_rc=0)
    got = matches(dsn, G1)
    assert len(got) == 102 and got[(G1, "u0", "m0")] == 0.8 and got[(G1, "u45", "m45")] == 0.7
    # --replace: the file is the complete set for G1; G2 is untouched.
    run_mtool(["ingest", write(files / "v4.parquet", rows_for(G1, 3, score=0.2)), "--replace"], dsn, check_rc=0)
    assert matches(dsn, G1) == {(G1, f"u{i}", f"m{i}"): 0.2 for i in range(3)}
    assert len(matches(dsn, G2)) == 10


def test_reimport_of_a_completed_file_does_nothing(dsn, files):
    path = write(files / "once.parquet", rows_for(G1, 10))
    first = json.loads(run_mtool(["ingest", path, "--json"], dsn, check_rc=0).stdout)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE potential_matches SET compatibility_score = 0.99")  # would be overwritten by a re-run
    proc = run_mtool(["ingest", path, "--json"], dsn, check_rc=0)
    second = json.loads(proc.stdout)
    assert second["already_imported"] and second["job_id"] == first["job_id"]
    assert set(matches(dsn).values()) == {0.99}
    # A changed file is a new import.
    os.utime(path, ns=(1, 1))
    third = json.loads(run_mtool(["ingest", path, "--json"], dsn, check_rc=0).stdout)
    assert third["job_id"] != first["job_id"] and set(matches(dsn).values()) == {0.5}


def test_dry_run_validates_and_counts_without_writing(dsn, files):
    path = write(files / "dry.parquet", rows_for(G1, 10) + [dict(rows_for(G1, 1, start=99)[0], reference_id=None)])
    proc = run_mtool(["ingest", path, "--dry-run", "--json"], None, check_rc=3)
    result = json.loads(proc.stdout)
    assert result["dry_run"] and result["processed_rows"] == 11 and result["rejected_rows"] == 1
    assert matches(dsn) == {} and job_row(dsn) is None


def test_column_mapping(dsn, files):
    table = pa.table({"user": ["a", "b"], "candidate": ["c", "d"], "score": [0.5, 0.75]})
    path = write(files / "mapped.parquet", table)
    run_mtool(["ingest", path, "--group-id", G1, "--domain-id", DOMAIN, "--map", "user=reference_id",
               "--map", "candidate=matched_reference_id", "--map", "score=compatibility_score"], dsn, check_rc=0)
    assert matches(dsn) == {(G1, "a", "c"): 0.5, (G1, "b", "d"): 0.75}


def test_metrics_textfile(dsn, files):
    path = write(files / "metrics.parquet", rows_for(G1, 10))
    prom = files / "mtool.prom"
    run_mtool(["ingest", path, "--group-id", G1, "--metrics-textfile", str(prom)], dsn, check_rc=0)
    text = prom.read_text()
    assert 'match_suggestions_storage_matches_saved_total{groupId="' + G1 + '"} 10.0' in text
    assert 'import_job_duration_seconds_count{status="COMPLETED"} 1.0' in text
    assert "match_suggestions_storage_batch_duration_count" in text


def test_jobs_list_show_retry(dsn, files):
    path = write(files / "j.parquet", rows_for(G1, 10))
    job_id = json.loads(run_mtool(["ingest", path, "--json"], dsn, check_rc=0).stdout)["job_id"]
    listed = json.loads(run_mtool(["jobs", "list", "--json"], dsn, check_rc=0).stdout)
    assert [j["job_id"] for j in listed] == [job_id]
    shown = json.loads(run_mtool(["jobs", "show", job_id, "--json"], dsn, check_rc=0).stdout)
    assert shown["status"] == "COMPLETED" and shown["running"] is False and shown["processed_rows"] == 10
    proc = run_mtool(["jobs", "retry", job_id], dsn, check_rc=0)
    assert "already imported" in proc.stdout
    assert run_mtool(["jobs", "show", "00000000-0000-4000-8000-000000000000"], dsn).returncode == 66


def test_schema_behind_is_refused_with_the_fix(pg_server, files):
    import psycopg as pg

    with pg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS blank")
        conn.execute("CREATE DATABASE blank")
    proc = run_mtool(["ingest", write(files / "x.parquet", rows_for(G1, 1))], pg_server.dsn("blank"))
    assert proc.returncode == 78 and "mtool db init" in proc.stderr


def test_metrics_pushed_to_a_pushgateway(dsn, files):
    """A Pushgateway is an HTTP endpoint taking PUT /metrics/job/<job>: receive one for real."""
    import http.server
    import threading

    received = {}

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            received["path"] = self.path
            received["body"] = self.rfile.read(int(self.headers["Content-Length"])).decode()
            self.send_response(202)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = write(files / "push.parquet", rows_for(G1, 7))
        run_mtool(["ingest", path, "--pushgateway", f"http://127.0.0.1:{server.server_address[1]}"], dsn, check_rc=0)
    finally:
        server.shutdown()
        server.server_close()
    assert received["path"] == "/metrics/job/mtool_ingest"
    assert "match_suggestions_storage_matches_saved_total" in received["body"]
