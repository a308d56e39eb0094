"""Nodes of new groups forwarded into `nodes` batch by batch as a nodes import loads them, in
one transaction that stays open for the whole load and commits with the job.

Why: inserting the load table into `nodes` after the last batch was a third of an import's
time (5 s of 1M nodes), with one core idle. Each batch is loaded into its own table (under
the load table, by INHERITS); a thread with its own connection (a second server process)
inserts it from there into `nodes` while the next batch is read, encoded and COPYed. (COPYing
each batch from the client a second time, into `nodes`, was tried and rejected: parsing and
encoding twice made the import no faster on 2 cores, 12.2 s of 1M nodes against 12-13 s; a COPY
into `nodes` costs the server about what this INSERT does, 6.7 s against 5.6-8.2 s of 1M rows in
a warm server, against 3.6-4.5 s into a plain table: `nodes`' indexes and version trigger
are the cost.) Nothing is visible in `nodes` before the job
commits, as before; a killed run loses the open transaction, and the resumed job commits its
load table as a whole (Forward is only used by a run that loads every batch itself).

Only new groups are forwarded: the first batch that holds a group with nodes already (an
update, which keeps unchanged rows as they are), or a key read twice, or any other error
abandons the forward (rolled back) and the job commits the classic way.
"""

from __future__ import annotations

import logging
import queue
import threading

from mtool.db.connection import advisory_key

log = logging.getLogger(__name__)
COLUMNS = ("domain_id", "group_id", "reference_id", "type", "metadata", "embedding")  # of `nodes`, as imported


class Forward:
    """`send(...)` after each committed batch (main thread); `finish()` at the commit: the open
    connection when every batch went into `nodes`, else None (rolled back)."""

    def __init__(self, db, table: str):
        self.table = table
        self.conn = db.connect()  # not autocommit: one transaction for the whole load
        self.abandoned: str | None = None
        self.forwarded = 0
        self.groups: set[str] = set()
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="mtool-nodes-forward", daemon=True)
        self.thread.start()

    def send(self, part: str, rows: int, groups) -> None:
        """A committed batch: the table holding its good rows, their count, their groups."""
        if self.abandoned is None:
            self.queue.put((part, rows, groups))

    def _run(self) -> None:
        import psycopg

        while (item := self.queue.get()) is not None:
            if self.abandoned is not None:
                continue
            part, rows, groups = item
            try:
                for g in sorted(set(groups) - self.groups):
                    # held to the commit: no other import inserts this group's keys meanwhile
                    self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("nodes", g),))
                    if self.conn.execute("SELECT EXISTS (SELECT 1 FROM nodes WHERE group_id = %s)",
                                         (g,)).fetchone()[0]:
                        raise _GiveUp(f"group {g} has nodes already")
                    self.groups.add(g)
                cols = ", ".join(COLUMNS)
                cur = self.conn.execute(f"INSERT INTO nodes ({cols}) SELECT {cols} FROM ONLY {part}")
                if cur.rowcount != rows:
                    raise _GiveUp(f"{part} holds {cur.rowcount} rows, its checkpoint {rows}")
                self.forwarded += rows
            except (psycopg.Error, _GiveUp) as exc:
                self._abandon(f"{type(exc).__name__}: {exc}".strip())

    def _abandon(self, why: str) -> None:
        self.abandoned = why
        log.info("nodes import: batches are no longer forwarded into nodes as they load (%s); the job commits "
                 "its load table as a whole", why)
        try:
            self.conn.rollback()
        except Exception:  # noqa: BLE001 - a lost connection has rolled back already
            pass

    def finish(self, loaded: int):
        """The connection holding every loaded row in `nodes` (the caller completes the job on
        it and commits), or None when the forward was abandoned or missed rows."""
        self.queue.put(None)
        self.thread.join()
        if self.abandoned is None and self.forwarded != loaded:
            self._abandon(f"{self.forwarded} rows forwarded of {loaded} loaded")
        if self.abandoned is not None:
            self.close()
            return None
        return self.conn

    def close(self) -> None:
        if self.thread.is_alive():
            self.abandoned = self.abandoned or "closed"
            self.queue.put(None)
            self.thread.join()
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


class _GiveUp(Exception):
    """A reason to commit the classic way: a group with nodes already, a batch short of rows."""
