"""The command line on a fresh machine: the embedded PostgreSQL from nothing, help, and a
light `import mtool`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pytest

from mtool.db import migrations
from tests.conftest import run_mtool
from tests.integration.helpers import G1, rows_for, write


@pytest.mark.postgres
def test_embedded_default_starts_from_nothing(files):
    home = tempfile.mkdtemp(prefix="mtool-embedded-", dir="/tmp")
    env = {"MTOOL_HOME": home}
    try:
        init = run_mtool(["db", "init"], env=env, check_rc=0)
        assert f"started embedded PostgreSQL in {home}/postgres" in init.stderr
        latest = migrations.latest_version()
        assert f"schema at version {latest}" in init.stdout
        status = json.loads(run_mtool(["db", "status", "--json"], env=env, check_rc=0).stdout)
        assert status["running"] is True and status["schema_version"] == latest and status["pending"] == 0
        path = write(files / "e.parquet", rows_for(G1, 50))
        result = json.loads(run_mtool(["ingest", path, "--json"], env=env, check_rc=0).stdout)
        assert result["status"] == "COMPLETED" and result["written_rows"] == 50
        # Reused, not recreated, on the next command.
        again = run_mtool(["jobs", "list", "--json"], env=env, check_rc=0)
        assert "started embedded" not in again.stderr and len(json.loads(again.stdout)) == 1
        assert "stopped" in run_mtool(["db", "stop"], env=env, check_rc=0).stdout
    finally:
        run_mtool(["db", "stop"], env=env)
        shutil.rmtree(home, ignore_errors=True)


def test_import_mtool_and_help_import_nothing_heavy():
    code = ("import sys, mtool, mtool.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(mtool.cli.cli, ['ingest', '--help']); assert r.exit_code == 0, r.output; "
            "print([m for m in ('pyarrow', 'psycopg', 'numpy', 'faiss', 'cupy', 'confluent_kafka', 'zarr') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_usage_errors_exit_2():
    proc = run_mtool(["ingest", "x.parquet", "--group-id", "not-a-uuid", "--dry-run"])
    assert proc.returncode == 2 and "--group-id 'not-a-uuid' is not a UUID" in proc.stderr
    assert run_mtool(["ingest"]).returncode == 2
    assert run_mtool(["ingest", "x.parquet", "--map", "nonsense"]).returncode == 2
    proc = run_mtool(["nodes", "import", "x.parquet", "--map", "=reference_id"])
    assert proc.returncode == 2 and "--map '=reference_id' is not SRC=DST" in proc.stderr


def test_dsn_password_never_printed(files):
    path = write(files / "p.parquet", rows_for(G1, 1))
    proc = run_mtool(["--db-retry-seconds", "1", "ingest", path],
                     dsn="host=127.0.0.1 port=1 user=u password=s3cret-pw dbname=x connect_timeout=1")
    assert proc.returncode == 75, proc.stderr
    assert "s3cret-pw" not in proc.stderr + proc.stdout and "127.0.0.1:1" in proc.stderr


@pytest.mark.postgres
def test_demo_runs_the_whole_pipeline(dsn):
    proc = run_mtool(["demo", "--rows", "20000", "--json"], dsn, check_rc=0)
    out = json.loads(proc.stdout)
    assert out["match"]["status"] == "COMPLETED" and out["match"]["edges"] == 3000 * 10
    assert out["import"]["status"] == "COMPLETED" and out["imported_rows"] == 20000
    users = {t["user"] for t in out["top_matches"]}
    assert len(users) == 3 and all(t["user"] != t["match"] for t in out["top_matches"])


@pytest.mark.skipif(__import__("mtool.device", fromlist=["x"]).gpu_available(), reason="a GPU is present")
def test_device_gpu_without_a_gpu_is_a_configuration_error():
    proc = run_mtool(["match", "--device", "gpu"])
    assert proc.returncode == 78 and "no usable CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr
