"""Input events (DESIGN.md section 3): parsed, checked and turned into an import, or refused
with a reason that the dead letter carries.

`{"jobId"?: uuid, "fileUri": str | "fileUris": [str], "groupId": uuid, "domainId": uuid,
"rowCount"?: int, "checksum"?: str}`; unknown fields are ignored. The URIs an event may name are
allow-listed (AllowList): by default s3:// and https:// only.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

# An event without a jobId gets one from where it sits in the log, so that a redelivered event
# is the same job (its import resumes or, completed, is not done twice).
JOB_NAMESPACE = uuid.UUID("6f1d7f53-3a52-4b8e-9a55-2c1e0c7a9d11")
CHECKSUM = re.compile(r"^(sha256:)?[0-9a-fA-F]{64}$|^md5:[0-9a-fA-F]{32}$")
MAX_URIS = 10_000


class InvalidEvent(Exception):
    """The event breaks the contract: it goes to the dead-letter topic with this reason."""


@dataclass(frozen=True)
class FileEvent:
    job_id: str
    uris: tuple
    group_id: str
    domain_id: str
    row_count: int | None = None
    checksum: str | None = None


def _uuid(value, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a UUID string, got {type(value).__name__}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidEvent(f"{name} is not a valid UUID: {value[:80]!r}") from None


def parse(value: bytes | None, topic: str, partition: int, offset: int, allow: "AllowList") -> FileEvent:
    """The event in a message value, or InvalidEvent naming the first problem."""
    if value is None:
        raise InvalidEvent("empty message (no value)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"value is not UTF-8: {exc}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"value is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidEvent(f"value must be a JSON object, got {type(body).__name__}")
    if "fileUri" in body and "fileUris" in body:
        raise InvalidEvent("give fileUri or fileUris, not both")
    if "fileUri" in body:
        uris = [body["fileUri"]]
    elif "fileUris" in body:
        uris = body["fileUris"]
        if not isinstance(uris, list) or not uris:
            raise InvalidEvent("fileUris must be a non-empty list of strings")
        if len(uris) > MAX_URIS:
            raise InvalidEvent(f"fileUris holds {len(uris)} URIs, more than {MAX_URIS}")
    else:
        raise InvalidEvent("missing field fileUri (or fileUris)")
    for uri in uris:
        if not isinstance(uri, str) or not uri.strip():
            raise InvalidEvent("every file URI must be a non-empty string")
        allow.check(uri)
    for name in ("groupId", "domainId"):
        if name not in body:
            raise InvalidEvent(f"missing field {name}")
    row_count = body.get("rowCount")
    if row_count is not None and (isinstance(row_count, bool) or not isinstance(row_count, int) or row_count < 0):
        raise InvalidEvent(f"rowCount must be a non-negative integer, got {row_count!r}")
    checksum = body.get("checksum")
    if checksum is not None and (not isinstance(checksum, str) or not CHECKSUM.match(checksum)):
        raise InvalidEvent("checksum must be 'sha256:HEX' (or 64 hex digits) or 'md5:HEX'")
    job_id = _uuid(body["jobId"], "jobId") if body.get("jobId") is not None else \
        str(uuid.uuid5(JOB_NAMESPACE, f"{topic}/{partition}/{offset}"))
    return FileEvent(job_id, tuple(uris), _uuid(body["groupId"], "groupId"), _uuid(body["domainId"], "domainId"),
                     row_count, checksum)


class AllowList:
    """Which sources an event may name. s3:// and https:// by default; http:// only when
    allowed; file:// (or a bare path) only when allowed and only under `roots`: the path must be
    absolute, free of `..`, percent-escapes and wildcards, and its real path (symlinks followed)
    inside a root's real path. Files found under an allowed directory are checked again after
    resolution (allowed_files), so a symlink inside a root cannot lead out of it."""

    def __init__(self, schemes=("s3", "https"), roots=()):
        self.schemes = {s.lower() for s in schemes}
        self.roots = tuple(os.path.realpath(r) for r in roots)
        if "file" in self.schemes and not self.roots:
            raise ValueError("file:// sources need at least one allowed root (--file-root)")

    def check(self, uri: str) -> None:
        parsed = urlparse(uri)
        kind = parsed.scheme.lower() if len(parsed.scheme) > 1 else "file"
        if kind not in self.schemes:
            raise InvalidEvent(f"URI scheme {kind!r} is not allowed ({uri[:200]}); allowed: "
                               f"{', '.join(sorted(self.schemes))}")
        if kind == "file":
            self._check_path(uri)
        elif not parsed.netloc:
            raise InvalidEvent(f"URI has no host or bucket: {uri[:200]}")

    def _check_path(self, uri: str) -> None:
        path = uri[len("file://"):] if uri.lower().startswith("file://") else uri
        if not path.startswith("/"):
            raise InvalidEvent(f"file URI must be an absolute path: {uri[:200]}")
        if "%" in path or any(c in path for c in "*?[") or ".." in path.split("/") or "\x00" in path:
            raise InvalidEvent(f"file URI may not hold '..', '%' escapes or wildcards: {uri[:200]}")
        if not self.inside_roots(path):
            raise InvalidEvent(f"file URI is outside the allowed roots: {uri[:200]}")

    def inside_roots(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == root or real.startswith(root.rstrip("/") + "/") for root in self.roots)

    def allowed_files(self, sources) -> None:
        """After resolution: every local file found is inside a root (else InvalidEvent)."""
        for src in sources:
            if src.uri.startswith("/") and not self.inside_roots(src.uri):
                raise InvalidEvent(f"{src.uri} resolves outside the allowed roots")
