"""Crashes and restarts: a killed import resumes to exactly the rows of an uninterrupted run,
and a PostgreSQL restart in the middle of an import still ends COMPLETED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from tests.conftest import run_mtool
from tests.integration.helpers import DOMAIN, G1, G2, job_row, write

pytestmark = pytest.mark.postgres


def make_file(files, name="big.parquet", n=6000, dup_every=7):
    """n rows over two groups in row groups of 500; every dup_every-th row repeats an earlier key
    with a new score, so 'last row wins' is exercised across chunks and row groups."""
    rows = []
    for i in range(n):
        key = i // 2 if i % dup_every == 0 and i else i
        rows.append({"group_id": G1 if key % 3 else G2, "domain_id": DOMAIN, "reference_id": f"r{key}",
                     "matched_reference_id": f"m{key % 97}-{key}", "compatibility_score": float(i) / n})
    expected = {}
    for r in rows:
        expected[(r["group_id"], r["reference_id"], r["matched_reference_id"])] = round(r["compatibility_score"], 5)
    return write(files / name, rows, row_group_size=500), expected


def table_state(dsn, job_id):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT group_id::text, reference_id, matched_reference_id, compatibility_score, "
                            "processing_cycle_id FROM potential_matches").fetchall()
        stage = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'mtool_stage'").fetchone()[0]
    assert all(cycle == job_id for *_, cycle in rows)
    return {(g, r, m): round(s, 5) for g, r, m, s, _ in rows}, stage


@pytest.mark.parametrize("crash_at", ["chunk-committed:3", "before-commit", "after-prepare", "after-commit"])
def test_killed_import_resumes_to_the_uninterrupted_result(dsn, files, crash_at):
    path, expected = make_file(files)
    args = ["ingest", path, "--batch-rows", "200", "--workers", "2", "--json"]
    crashed = run_mtool(args, dsn, env={"MTOOL_CRASH_AT": crash_at})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    job = job_row(dsn)
    assert job["status"] == ("COMPLETED" if crash_at == "after-commit" else "PROCESSING")
    if crash_at != "after-commit":  # nothing is visible before the job commits
        assert table_state(dsn, str(job["job_id"]))[0] == {}
    resumed = json.loads(run_mtool(args, dsn, check_rc=0).stdout)
    assert resumed["job_id"] == str(job["job_id"]) and resumed["status"] == "COMPLETED"
    assert resumed["already_imported"] == (crash_at == "after-commit")
    rows, leftover_stage_tables = table_state(dsn, resumed["job_id"])
    assert rows == expected
    assert leftover_stage_tables == 0
    final = job_row(dsn, resumed["job_id"])
    assert final["processed_rows"] == 6000 and final["written_rows"] == len(expected)
    with psycopg.connect(dsn) as conn:
        chunks = conn.execute("SELECT count(*) FROM import_checkpoints WHERE job_id = %s",
                              (resumed["job_id"],)).fetchone()[0]
    assert chunks == (6000 // 500) * 3  # 12 row groups of 500 rows in chunks of 200, 200, 100: each once


def test_kill_9_of_the_parent_stops_its_workers_and_resumes(dsn, files):
    path, expected = make_file(files, n=20000)
    cmd = [sys.executable, "-m", "mtool.cli", "--dsn", dsn, "ingest", path, "--batch-rows", "100", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            done = conn.execute("SELECT count(*) FROM import_checkpoints").fetchone()[0]
            if done >= 5:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)  # EOF on its pipes: no worker outlived it
        time.sleep(1.0)  # orphans would keep committing chunks: there must be none
        settled = conn.execute("SELECT count(*) FROM import_checkpoints").fetchone()[0]
        time.sleep(1.0)
        assert conn.execute("SELECT count(*) FROM import_checkpoints").fetchone()[0] == settled
        assert settled < 200
    run_mtool(["ingest", path, "--batch-rows", "100", "--workers", "2"], dsn, check_rc=0)
    assert table_state(dsn, str(job_row(dsn)["job_id"]))[0] == expected


def test_postgres_restart_during_import_ends_completed(pg_server, dsn, files):
    path, expected = make_file(files, n=30000)
    cmd = [sys.executable, "-m", "mtool.cli", "--dsn", dsn, "--log-format", "json", "ingest", path,
           "--batch-rows", "100", "--workers", "2", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    with psycopg.connect(dsn, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM import_checkpoints").fetchone()[0] < 5:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    pg_server.restart()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["status"] == "COMPLETED" and result["processed_rows"] == 30000
    assert "transient PostgreSQL error" in err
    assert table_state(dsn, result["job_id"])[0] == expected


def test_interrupt_leaves_a_resumable_job(dsn, files):
    path, expected = make_file(files, n=20000)
    cmd = [sys.executable, "-m", "mtool.cli", "--dsn", dsn, "ingest", path, "--batch-rows", "100", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while conn.execute("SELECT count(*) FROM import_checkpoints").fetchone()[0] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "resumes from its checkpoint" in err
    job = job_row(dsn)
    assert job["status"] == "PROCESSING" and "resume" in job["error"]
    proc = run_mtool(["jobs", "retry", str(job["job_id"]), "--json"], dsn, check_rc=0)
    assert json.loads(proc.stdout)["status"] == "COMPLETED"
    assert table_state(dsn, str(job["job_id"]))[0] == expected
