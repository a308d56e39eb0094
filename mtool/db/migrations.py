"""Versioned schema migrations: numbered SQL files applied in order, each in one transaction."""

from __future__ import annotations

from importlib import resources

from mtool.errors import ConfigError

MIGRATION_LOCK_KEY = 7_412_020_001  # serialises concurrent `db migrate` runs


def available() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in order."""
    out = []
    for entry in resources.files("mtool.db").joinpath("migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            out.append((version, entry.name, entry.read_text()))
    return sorted(out)


def latest_version() -> int:
    return available()[-1][0]


def current_version(conn) -> int:
    """The applied version; 0 for a database mtool has never touched."""
    exists = conn.execute("SELECT to_regclass('mtool_schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM mtool_schema_version").fetchone()
    return row[0] or 0


def migrate(conn) -> list[str]:
    """Apply every pending migration; returns the names applied."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS mtool_schema_version "
            "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        have = current_version(conn)
        for version, name, sql in available():
            if version > have:
                conn.execute(sql)
                conn.execute("INSERT INTO mtool_schema_version (version, name) VALUES (%s, %s)", (version, name))
                applied.append(name)
    return applied


def check(conn) -> None:
    """Refuse to work on a schema that is behind (or ahead of) this mtool."""
    have, want = current_version(conn), latest_version()
    if have == 0:
        raise ConfigError("the database has no mtool schema", hint="run `mtool db init`")
    if have < want:
        raise ConfigError(f"the database schema is at version {have}, this mtool needs {want}",
                          hint="run `mtool db migrate`")
    if have > want:
        raise ConfigError(f"the database schema is at version {have}, newer than this mtool ({want})",
                          hint="upgrade mtool")
