"""Input files: resolving URIs (local path, directory, glob, http(s), s3) into a fixed list of
sources with fingerprints, opening them for Parquet reads, and streaming row groups.

Local files are read by pyarrow directly; s3 and http(s) go through smart-open's seekable
readers (range requests). An HTTP server that does not advertise byte ranges is read once into
a local temporary copy by the planning process, so reader processes can still seek.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mtool.db.connection import first_line
from mtool.errors import ConfigError, DependencyUnavailable, InputNotFound, InvalidInput

log = logging.getLogger(__name__)

# pyarrow reads column chunks through a buffer of this size instead of whole row groups at once:
# what keeps memory bounded on files with huge row groups.
READ_BUFFER_BYTES = 8 << 20
DOWNLOAD_CHUNK_BYTES = 8 << 20
WILDCARDS = "*?["


@dataclass(frozen=True)
class Source:
    """One input file, pinned: its URI, size and version (mtime or ETag) at planning time."""

    uri: str
    size: int
    version: str
    local_path: str | None = None  # a local copy, for servers that cannot serve byte ranges

    @property
    def fingerprint_part(self) -> str:
        return f"{self.uri}|{self.size}|{self.version}"


def scheme(uri: str) -> str:
    parsed = urlparse(uri)
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else "file"


def resolve(uris, download_dir: str | None = None) -> list[Source]:
    """Expand directories, globs and s3 prefixes; pin every file's size and version."""
    out: list[Source] = []
    for uri in uris:
        kind = scheme(uri)
        if kind == "file":
            out += _resolve_local(uri)
        elif kind == "s3":
            out += _resolve_s3(uri)
        elif kind in ("http", "https"):
            out.append(_resolve_http(uri, download_dir))
        else:
            raise InputNotFound(f"{uri}: unsupported scheme {kind!r}", hint="use a path, http(s):// or s3://")
    seen, unique = set(), []
    for src in out:
        if src.uri not in seen:
            seen.add(src.uri)
            unique.append(src)
    return unique


def _resolve_local(uri: str) -> list[Source]:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if any(c in path for c in WILDCARDS):
        paths = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not paths:
            raise InputNotFound(f"{uri}: no file matches this pattern")
    elif os.path.isdir(path):
        paths = sorted(str(p) for p in Path(path).rglob("*.parquet") if p.is_file())
        if not paths:
            raise InputNotFound(f"{uri}: the directory holds no *.parquet file")
    elif os.path.isfile(path):
        paths = [path]
    else:
        raise InputNotFound(f"{uri}: no such file or directory")
    result = []
    for p in paths:
        st = os.stat(p)
        result.append(Source(os.path.abspath(p), st.st_size, str(st.st_mtime_ns)))
    return result


# S3 and HTTP reads give up on a server that accepts connections and never answers: seconds
# to connect and to wait for each read (MTOOL_CONNECT_TIMEOUT, MTOOL_READ_TIMEOUT).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


def timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds, from MTOOL_CONNECT_TIMEOUT / MTOOL_READ_TIMEOUT."""
    out = []
    for name, default in (("MTOOL_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S), ("MTOOL_READ_TIMEOUT", READ_TIMEOUT_S)):
        raw = os.environ.get(name)
        try:
            value = float(raw) if raw else default
            assert value > 0
        except (ValueError, AssertionError):
            raise ConfigError(f"{name}={raw!r} is not a positive number of seconds") from None
        out.append(value)
    return out[0], out[1]


def s3_client():
    """A boto3 S3 client; endpoint and credentials come from the usual AWS_* variables
    (AWS_ENDPOINT_URL points it at MinIO, Ceph or another S3-compatible server), with connect
    and read timeouts and two retries (botocore's default waits 60 s per read, 5 times)."""
    import boto3
    from botocore.config import Config

    connect, read = timeouts()
    return boto3.client("s3", config=Config(connect_timeout=connect, read_timeout=read,
                                            retries={"max_attempts": 3, "mode": "standard"}))


def _resolve_s3(uri: str) -> list[Source]:
    import botocore.exceptions

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    client = s3_client()
    log.info("%s: asking S3 (%s) for the object(s)", uri, client.meta.endpoint_url)
    try:
        if key and not key.endswith("/") and not any(c in key for c in WILDCARDS):
            head = client.head_object(Bucket=bucket, Key=key)
            return [Source(uri, head["ContentLength"], head.get("ETag", "").strip('"'))]
        prefix = key.split("*")[0].split("?")[0].split("[")[0]
        pattern = key if any(c in key for c in WILDCARDS) else key + "*.parquet"
        result = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if fnmatch.fnmatchcase(obj["Key"], pattern) or (not any(c in key for c in WILDCARDS)
                                                                and obj["Key"].endswith(".parquet")):
                    result.append(Source(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"].strip('"')))
        if not result:
            raise InputNotFound(f"{uri}: no object matches")
        return sorted(result, key=lambda s: s.uri)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise InputNotFound(f"{uri}: no such object ({code})") from None
        raise DependencyUnavailable(f"{uri}: S3 error {code}: {exc}") from None
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError(f"{uri}: no S3 credentials found",
                          hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a role), "
                               "and AWS_ENDPOINT_URL for an S3-compatible server") from None
    except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError) as exc:
        raise DependencyUnavailable(f"{uri}: S3 at {client.meta.endpoint_url} did not answer in time ({exc})",
                                    hint="MTOOL_CONNECT_TIMEOUT / MTOOL_READ_TIMEOUT set the limits") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise DependencyUnavailable(f"{uri}: S3 unreachable: {exc}") from None


def _resolve_http(uri: str, download_dir: str | None) -> Source:
    import requests

    try:
        log.info("%s: asking the HTTP server for the file", uri)
        head = requests.head(uri, allow_redirects=True, timeout=timeouts())
    except requests.RequestException as exc:
        raise DependencyUnavailable(f"{uri}: HTTP server unreachable: {exc}") from None
    if head.status_code == 404:
        raise InputNotFound(f"{uri}: HTTP 404 Not Found")
    if head.status_code >= 400:
        raise DependencyUnavailable(f"{uri}: HTTP {head.status_code}")
    size = int(head.headers.get("Content-Length", -1))
    version = head.headers.get("ETag") or head.headers.get("Last-Modified") or ""
    if head.headers.get("Accept-Ranges", "").lower() == "bytes":
        return Source(uri, size, version)
    # No byte ranges: Parquet needs to seek to its footer, so read the file once into a local copy.
    local = _download(uri, download_dir)
    return Source(uri, os.path.getsize(local), version or f"sha-less:{os.path.getsize(local)}", local)


def _download(uri: str, download_dir: str | None) -> str:
    import smart_open

    os.makedirs(download_dir or tempfile.gettempdir(), exist_ok=True)
    fd, path = tempfile.mkstemp(suffix=".parquet", prefix="mtool-dl-", dir=download_dir)
    try:
        with os.fdopen(fd, "wb") as out, smart_open.open(uri, "rb", transport_params={"timeout": timeouts()}) as src:
            shutil.copyfileobj(src, out, DOWNLOAD_CHUNK_BYTES)
    except Exception as exc:
        os.unlink(path)
        raise DependencyUnavailable(f"{uri}: download failed: {exc}") from None
    return path


# Remote files up to this size are read whole, in one request, into memory: a Parquet reader
# seeks (footer, metadata, each column chunk), and every seek of a remote stream is one more
# request. A 100-row file on the suite's S3 server took 6 requests and ~1.5 s that way.
WHOLE_READ_MAX = 8 << 20


def open_stream(src: Source):
    """A seekable binary file object (or local path) for the source."""
    if src.local_path:
        return src.local_path
    kind = scheme(src.uri)
    if kind == "file":
        return src.uri
    import smart_open

    params = {"client": s3_client()} if kind == "s3" else {"timeout": timeouts()}
    stream = smart_open.open(src.uri, "rb", transport_params=params)
    if src.size <= WHOLE_READ_MAX:
        import io

        with stream:
            return io.BytesIO(stream.read())
    return stream


def open_parquet(src: Source):
    """A ParquetFile over the source; a file that is not readable Parquet is invalid input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if src.size == 0:
        raise InvalidInput(f"{src.uri}: the file is empty (0 bytes)", hint="check the producer's output")
    try:
        return pq.ParquetFile(open_stream(src), buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
    except (pa.ArrowInvalid, pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise InputNotFound(f"{src.uri}: no such file") from None
        raise InvalidInput(f"{src.uri}: not a readable Parquet file ({first_line(exc)})",
                           hint="the file is truncated, corrupt or not Parquet") from None


def iter_row_group(pf, row_group: int, batch_rows: int, where: str):
    """The row group as consecutive record batches of exactly batch_rows rows (the last one may
    be shorter): chunk c is always rows [c * batch_rows, (c + 1) * batch_rows), whatever sizes
    the decoder produces, so that checkpoints name the same rows on every run."""
    import pyarrow as pa

    pending, have = [], 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[row_group], use_threads=False):
            pending.append(batch)
            have += batch.num_rows
            while have >= batch_rows:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, batch_rows).combine_chunks().to_batches()[0]
                rest = table.slice(batch_rows)
                pending, have = rest.combine_chunks().to_batches() if rest.num_rows else [], rest.num_rows
        if have:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidInput(f"{where}: row group {row_group} cannot be decoded ({first_line(exc)})",
                           hint="the file is truncated or corrupt") from None
