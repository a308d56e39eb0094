"""Connections, transient-error classification and retry with backoff.

Errors are classified by SQLSTATE class, never by message text: connection loss (08), admin
shutdown and cannot-connect-now (57P), resource exhaustion (53) and serialization/deadlock
(40) are transient and retried; anything else is terminal.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from mtool.errors import DependencyUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P")
# Long enough to ride out a PostgreSQL restart or a managed-database failover (typically
# 10-60 s); short enough that a CronJob fails visibly instead of hanging.
DEFAULT_RETRY_SECONDS = 120.0
FIRST_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, safe to print."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**params)


def describe_target(dsn: str) -> str:
    """host:port/dbname of a DSN, for messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        p = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable DSN>"
    return f"{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '')}"


# Connection failures carry no SQLSTATE (libpq reports them as text before any session
# exists), so these are told apart by libpq's and the server's fixed wording: a DSN that can
# never work is a configuration error (exit 78 at once), not an outage to wait out.
CONFIG_MESSAGES = (
    ("does not exist", "the database or role does not exist"),  # FATAL 3D000 / 28000
    ("password authentication failed", "authentication failed"),  # 28P01
    ("no pg_hba.conf entry", "the server does not accept this client (pg_hba.conf)"),  # 28000
    ("authentication method", "the server asks for an authentication method this client cannot use"),
    ("invalid connection option", "the DSN has an unknown parameter"),
    ("invalid integer value", "the DSN has a malformed value"),
    ("invalid sslmode value", "the DSN has a malformed value"),
    ("missing \"=\" after", "the DSN is malformed"),
    ("invalid URI", "the DSN is malformed"),
    ("unterminated quoted string", "the DSN is malformed"),
)


def configuration_problem(exc: BaseException) -> str | None:
    """What is wrong with the connection settings, when the error says they can never work."""
    import psycopg

    if not isinstance(exc, psycopg.Error) or getattr(exc, "sqlstate", None):
        return None
    text = str(exc)
    if isinstance(exc, psycopg.ProgrammingError):
        return "the DSN is malformed"
    for needle, what in CONFIG_MESSAGES:
        if needle in text:
            return what
    return None


def check_dsn(dsn: str) -> None:
    """Refuse a DSN that does not parse (unknown parameter, bad quoting) before any work."""
    from psycopg.conninfo import conninfo_to_dict

    from mtool.errors import ConfigError

    try:
        conninfo_to_dict(dsn)
    except Exception as exc:  # noqa: BLE001 - psycopg raises ProgrammingError for every parse problem
        raise ConfigError(f"the DSN is malformed: {first_line(exc)}",
                          hint="key=value pairs or a postgresql:// URI; see --dsn / MTOOL_DSN") from None


def is_transient(exc: BaseException) -> bool:
    import psycopg

    if isinstance(exc, psycopg.Error):
        state = getattr(exc, "sqlstate", None)
        if state:
            return state.startswith(TRANSIENT_SQLSTATE_PREFIXES)
        # No SQLSTATE: the connection itself broke (server gone, socket closed).
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    return isinstance(exc, (ConnectionError, TimeoutError))


@dataclass(frozen=True)
class Database:
    """Where PostgreSQL is: plain data, safe to hand to worker processes."""

    dsn: str
    retry_seconds: float = DEFAULT_RETRY_SECONDS

    def connect(self, autocommit: bool = False):
        """A new connection, retried while the server is unreachable."""
        import psycopg

        return self.retry(
            lambda: psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=10),
            what="connect",
        )

    def retry(self, fn: Callable[[], T], what: str) -> T:
        """Run fn, retrying transient PostgreSQL errors with jittered exponential backoff."""
        deadline = time.monotonic() + self.retry_seconds
        delay = FIRST_BACKOFF_SECONDS
        while True:
            try:
                return fn()
            except Exception as exc:
                problem = configuration_problem(exc)
                if problem:
                    from mtool.errors import ConfigError

                    raise ConfigError(f"PostgreSQL at {describe_target(self.dsn)}: {problem}: {_redacted(exc, self.dsn)}",
                                      hint="fix --dsn / MTOOL_DSN (or create the database: `createdb`, then "
                                           "`mtool db init`)") from None
                if not is_transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise DependencyUnavailable(
                        f"PostgreSQL at {describe_target(self.dsn)} stayed unavailable for "
                        f"{self.retry_seconds:.0f} s ({what}): {first_line(exc)}",
                        hint="check the server, or raise --db-retry-seconds",
                    ) from None
                log.warning("transient PostgreSQL error during %s, retrying in %.1f s: %s",
                            what, delay, first_line(exc))
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    def run(self, fn: Callable, what: str, autocommit: bool = False):
        """fn(conn) in a fresh connection and one transaction, retried as a whole."""

        def attempt():
            with self.connect(autocommit=autocommit) as conn:
                result = fn(conn)
                if not autocommit:
                    conn.commit()
                return result

        return self.retry(attempt, what)


def _redacted(exc: BaseException, dsn: str) -> str:
    """The error's text without the DSN's password (libpq may echo option values)."""
    from psycopg.conninfo import conninfo_to_dict

    text = " ".join(str(exc).split())
    try:
        password = conninfo_to_dict(dsn).get("password")
    except Exception:  # noqa: BLE001
        password = None
    return text.replace(password, "***") if password else text


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def advisory_key(namespace: str, value: str) -> int:
    """A stable signed 64-bit advisory-lock key: every process that works on the same group
    or job derives the same key."""
    import hashlib

    digest = hashlib.blake2b(f"{namespace}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Session:
    """A long-lived autocommit connection for the planning process: `run(fn)` retries fn with a
    fresh connection after a transient error (a server restart), calling `on_connect` on each
    new connection to restore session state such as advisory locks."""

    def __init__(self, db: Database, on_connect: Callable | None = None):
        self.db = db
        self.on_connect = on_connect
        self._conn = None

    @property
    def conn(self):
        if self._conn is None or self._conn.closed:
            import psycopg

            conn = psycopg.connect(self.db.dsn, autocommit=True, connect_timeout=10)
            try:
                if self.on_connect:
                    self.on_connect(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def run(self, fn: Callable, what: str):
        def attempt():
            try:
                return fn(self.conn)
            except Exception as exc:
                if is_transient(exc):
                    self.close()
                raise

        return self.db.retry(attempt, what)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
