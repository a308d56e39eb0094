"""Remote sources through real servers: S3 (moto_server over HTTP) and HTTP with and without
byte ranges."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_mtool
from tests.integration.helpers import G1, G2, matches, rows_for, write

pytestmark = [pytest.mark.postgres]


def parquet_bytes(rows, row_group_size=None):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


@pytest.mark.s3
def test_s3_object_and_prefix_of_shards(dsn, s3):
    s3.put_object(Bucket=s3.bucket, Key="one/matches.parquet", Body=parquet_bytes(rows_for(G1, 300), 64))
    for i in range(3):
        s3.put_object(Bucket=s3.bucket, Key=f"shards/part-{i}.parquet", Body=parquet_bytes(rows_for(G2, 100, start=100 * i)))
    s3.put_object(Bucket=s3.bucket, Key="shards/_SUCCESS", Body=b"")
    proc = run_mtool(["ingest", f"s3://{s3.bucket}/one/matches.parquet", "--json", "--workers", "2"], dsn, check_rc=0)
    assert json.loads(proc.stdout)["written_rows"] == 300
    proc = run_mtool(["ingest", f"s3://{s3.bucket}/shards/", "--json"], dsn, check_rc=0)
    assert json.loads(proc.stdout)["files"] == 3
    assert len(matches(dsn, G1)) == 300 and len(matches(dsn, G2)) == 300


@pytest.mark.s3
def test_s3_missing_object_exits_66(dsn, s3):
    proc = run_mtool(["ingest", f"s3://{s3.bucket}/nope.parquet"], dsn)
    assert proc.returncode == 66 and "no such object" in proc.stderr


def test_http_with_byte_ranges(dsn, http_dir, http_ranges):
    write(http_dir / "m.parquet", rows_for(G1, 500), row_group_size=100)
    proc = run_mtool(["ingest", f"{http_ranges}/m.parquet", "--json", "--workers", "2"], dsn, check_rc=0)
    assert json.loads(proc.stdout)["written_rows"] == 500
    assert len(matches(dsn)) == 500


def test_http_without_ranges_falls_back_to_a_local_copy(dsn, http_dir, http_plain):
    write(http_dir / "m.parquet", rows_for(G1, 500), row_group_size=100)
    proc = run_mtool(["ingest", f"{http_plain}/m.parquet", "--json"], dsn, check_rc=0)
    assert json.loads(proc.stdout)["written_rows"] == 500


def test_http_404_exits_66(dsn, http_ranges):
    proc = run_mtool(["ingest", f"{http_ranges}/missing.parquet"], dsn)
    assert proc.returncode == 66 and "404" in proc.stderr
