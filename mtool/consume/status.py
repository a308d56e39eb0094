"""Status events (DESIGN.md section 3), keyed by job id: what an import job ended as."""

from __future__ import annotations

import json
from datetime import datetime, timezone


def _iso(ts) -> str | None:
    if ts is None:
        return None
    if isinstance(ts, (int, float)):
        ts = datetime.fromtimestamp(ts, timezone.utc)
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def event(job_id: str, group_id: str, domain_id: str, status: str, processed: int, rejected: int,
          started_at, finished_at, error: str | None = None) -> bytes:
    body = {"jobId": job_id, "groupId": group_id, "domainId": domain_id, "status": status,
            "processedRows": int(processed), "rejectedRows": int(rejected),
            "startedAt": _iso(started_at), "finishedAt": _iso(finished_at)}
    if error:
        body["error"] = error
    return json.dumps(body).encode("utf-8")
