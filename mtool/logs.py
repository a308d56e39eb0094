"""Logging: text lines on a terminal, one JSON object per line otherwise; always on stderr.

Records carry `job_id` / `cycle_id` / `group_id` when the caller passes them in `extra`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

CONTEXT_FIELDS = ("job_id", "cycle_id", "group_id", "file", "topic", "partition", "offset")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for key in CONTEXT_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(fmt: str | None, verbosity: int) -> None:
    """fmt: 'text', 'json' or None (text on a terminal, else json); verbosity -1 quiet .. 2 debug."""
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}.get(max(-1, min(verbosity, 1)))
    root = logging.getLogger("mtool")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
