"""`mtool consume` against a real Kafka-protocol broker (tansu), a real PostgreSQL and, for s3://
events, a real S3-compatible server: what a user checks is the rows in potential_matches, the
job rows, the status events on the status topic and the dead letters on the DLQ topic."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
import pytest

from tests.conftest import mtool_command, run_mtool
from tests.integration.helpers import DOMAIN, job_row, matches, rows_for, write
from tests.integration.kafka_helpers import FAST, create_topics, event, produce, read_all, statuses, topic_names

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def group(n: int) -> str:
    return f"aaaaaaaa-0000-4000-8000-{n:012d}"


def consume_args(broker, files, topics, *extra, idle=8) -> list:
    """`consume` and its options on the test's topics: until --max-messages or `idle` seconds
    without an event (after a killed consumer, the group waits out its session timeout first:
    give more)."""
    topic, status_topic, dlq_topic, consumer_group = topics
    return ["consume", "--bootstrap-servers", broker.bootstrap, "--topic-pattern", f"^{topic}$",
            "--consumer-group", consumer_group, "--status-topic", status_topic, "--dlq-topic", dlq_topic,
            "--allow-scheme", "file", "--allow-scheme", "s3", "--file-root", str(files), "--workers", "1",
            "--idle-timeout", str(idle), "--json", *FAST, *extra]


def consume(broker, dsn, files, topics, *extra, env=None, check_rc=None, timeout=120, idle=8):
    """Run `mtool consume` (consume_args) to its end."""
    return run_mtool(consume_args(broker, files, topics, *extra, idle=idle), dsn, env=env, check_rc=check_rc,
                     timeout=timeout)


def test_valid_events_import_their_rows_and_emit_completed(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g1, g2 = group(1), group(2)
    f1 = write(files / "a.parquet", rows_for(g1, 500))
    f2 = write(files / "b.parquet", rows_for(g2, 300, prefix="v"))
    job = str(uuid.uuid4())
    produce(kafka_broker.bootstrap, topics[0], [(b"k1", event(f1, g1, DOMAIN, jobId=job, rowCount=500), None),
                                                 (b"k2", {"fileUris": [f2], "groupId": g2, "domainId": DOMAIN}, None)])
    proc = consume(kafka_broker, dsn, files, topics, "--max-messages", "2", check_rc=0)
    summary = json.loads(proc.stdout)
    assert summary["imported"] == 2 and summary["failed"] == 0 and summary["dead_lettered"] == 0
    assert len(matches(dsn, g1)) == 500 and len(matches(dsn, g2)) == 300
    got = statuses(kafka_broker.bootstrap, topics[1], 2)
    assert [s["status"] for s in got] == ["COMPLETED", "COMPLETED"]
    assert got[0]["jobId"] == job and got[0]["processedRows"] == 500 and got[0]["rejectedRows"] == 0
    assert got[1]["groupId"] == g2 and got[1]["processedRows"] == 300
    assert got[0]["startedAt"] and got[0]["finishedAt"]
    row = job_row(dsn, job)
    assert row["status"] == "COMPLETED" and row["kafka_topic"] == topics[0] and row["kafka_offset"] == 0
    assert read_all(kafka_broker.bootstrap, topics[2], 0, timeout=2) == []


def test_invalid_events_are_dead_lettered_with_their_origin_and_the_consumer_goes_on(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(3)
    good = write(files / "good.parquet", rows_for(g, 50))
    secret = "/etc/passwd"
    bad = [
        (b"utf8", b"\xff\xfe not utf-8", [("trace", b"t1")]),
        (b"json", b"{not json", None),
        (b"array", b"[1, 2]", None),
        (b"missing", {"groupId": g, "domainId": DOMAIN}, None),
        (b"type", {"fileUri": 42, "groupId": g, "domainId": DOMAIN}, None),
        (b"uuid", event(good, "not-a-uuid", DOMAIN), None),
        (b"rowcount", event(good, g, DOMAIN, rowCount="many"), None),
        (b"scheme", event("ftp://host/x.parquet", g, DOMAIN), None),
        (b"outside", event(secret, g, DOMAIN), None),
        (b"dotdot", event(f"{files}/../../etc/passwd", g, DOMAIN), None),
        (b"escaped", event(f"{files}/%2e%2e/%2e%2e/etc/passwd", g, DOMAIN), None),
    ]
    os.symlink("/etc", files / "link")
    bad.append((b"symlink", event(f"{files}/link/passwd", g, DOMAIN), None))
    produce(kafka_broker.bootstrap, topics[0], bad + [(b"good", event(good, g, DOMAIN), None)])
    proc = consume(kafka_broker, dsn, files, topics, "--max-messages", str(len(bad) + 1), "--brake-window", "100",
                   check_rc=3)
    summary = json.loads(proc.stdout)
    assert summary["dead_lettered"] == len(bad) and summary["imported"] == 1
    assert len(matches(dsn, g)) == 50  # the consumer went on to the valid event
    letters = read_all(kafka_broker.bootstrap, topics[2], len(bad))
    assert [m.key() for m in letters] == [k for k, _, _ in bad]
    for message, (key, value, headers) in zip(letters, bad):
        assert message.value() == (value if isinstance(value, bytes) else json.dumps(value).encode())
        got = dict(message.headers())
        assert got["mtool.source.topic"] == topics[0].encode() and got["mtool.error"]
        assert int(got["mtool.source.offset"]) == letters.index(message) and got["mtool.source.partition"] == b"0"
        for name, val in headers or []:
            assert got[name] == val  # the original headers travel with it
    errors = [dict(m.headers())["mtool.error"].decode() for m in letters]
    assert "UTF-8" in errors[0] and "JSON" in errors[1] and "fileUri" in errors[3] and "groupId" in errors[5]
    assert "ftp" in errors[7] and all("allowed roots" in e or "'..'" in e for e in errors[8:])
    assert statuses(kafka_broker.bootstrap, topics[1], 1)[0]["status"] == "COMPLETED"
    assert "passwd" not in "".join(str(r) for r in matches(dsn))


def test_a_failing_import_is_a_failed_job_and_a_failed_status_and_the_consumer_goes_on(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(4)
    missing = files / "nowhere.parquet"
    broken = files / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    no_score = write(files / "noscore.parquet", [{"reference_id": "a", "matched_reference_id": "b"}])
    short = write(files / "short.parquet", rows_for(g, 10))
    good = write(files / "good.parquet", rows_for(g, 20, start=100))
    jobs = [str(uuid.uuid4()) for _ in range(5)]
    produce(kafka_broker.bootstrap, topics[0], [
        (b"1", event(missing, g, DOMAIN, jobId=jobs[0]), None),
        (b"2", event(broken, g, DOMAIN, jobId=jobs[1]), None),
        (b"3", event(no_score, g, DOMAIN, jobId=jobs[2]), None),
        (b"4", event(short, g, DOMAIN, jobId=jobs[3], rowCount=11), None),
        (b"5", event(good, g, DOMAIN, jobId=jobs[4]), None),
    ])
    proc = consume(kafka_broker, dsn, files, topics, "--max-messages", "5", check_rc=3)
    summary = json.loads(proc.stdout)
    assert summary["failed"] == 4 and summary["imported"] == 1 and summary["dead_lettered"] == 0
    got = {s["jobId"]: s for s in statuses(kafka_broker.bootstrap, topics[1], 5)}
    for job, needle in zip(jobs[:4], ("nowhere.parquet", "broken.parquet", "compatibility_score", "rowCount")):
        assert got[job]["status"] == "FAILED" and needle in got[job]["error"], got[job]
        row = job_row(dsn, job)
        assert row["status"] == "FAILED" and needle in row["error"]
    assert got[jobs[4]]["status"] == "COMPLETED"
    assert set(r for _, r, _ in matches(dsn, g)) == {f"u{i}" for i in range(100, 120)}  # nothing of the failed ones


def test_a_redelivered_event_does_no_work_and_sends_its_status_again(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(5)
    f = write(files / "r.parquet", rows_for(g, 100))
    job = str(uuid.uuid4())
    produce(kafka_broker.bootstrap, topics[0], [(b"k", event(f, g, DOMAIN, jobId=job), None)])
    consume(kafka_broker, dsn, files, topics, "--max-messages", "1", check_rc=0)
    with psycopg.connect(dsn) as conn:  # a user edits a row: a repeated import would overwrite it
        conn.execute("UPDATE potential_matches SET compatibility_score = 0.99 WHERE reference_id = 'u1'")
    produce(kafka_broker.bootstrap, topics[0], [(b"k", event(f, g, DOMAIN, jobId=job), None)])  # redelivered
    proc = consume(kafka_broker, dsn, files, topics, "--max-messages", "1", check_rc=0)
    assert json.loads(proc.stdout)["already"] == 1
    got = statuses(kafka_broker.bootstrap, topics[1], 2)
    assert [s["jobId"] for s in got] == [job, job] and got[1]["status"] == "COMPLETED" and got[1]["processedRows"] == 100
    assert matches(dsn, g)[(g, "u1", "m1")] == 0.99  # not imported twice


def test_the_brake_stops_the_consumer(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    produce(kafka_broker.bootstrap, topics[0], [(None, b"garbage %d" % i, None) for i in range(30)])
    proc = consume(kafka_broker, dsn, files, topics, "--brake-window", "10", "--brake-share", "0.5", check_rc=65)
    assert "brake" in proc.stderr and "10 of the last 10" in proc.stderr
    # it stopped at the 10th: 10 dead letters, not 30
    assert len(read_all(kafka_broker.bootstrap, topics[2], 10, timeout=10)) == 10


def test_status_or_dlq_topic_inside_the_pattern_is_refused(kafka_broker, dsn, files):
    proc = run_mtool(["consume", "--bootstrap-servers", kafka_broker.bootstrap, "--topic-pattern", r"^matches\..*",
                      "--status-topic", "matches.status"], dsn, check_rc=2)
    assert "--status-topic 'matches.status' matches --topic-pattern" in proc.stderr


def many_chunks(files, name, g, n=4000, prefix="u"):
    """A file of n rows in row groups of 500: with --batch-rows 500, 8 chunks to checkpoint."""
    return write(files / name, rows_for(g, n, prefix=prefix), row_group_size=500)


def test_killed_mid_import_the_restarted_consumer_completes_the_job_once(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(6)
    f = many_chunks(files, "big.parquet", g)
    produce(kafka_broker.bootstrap, topics[0], [(b"k", event(f, g, DOMAIN), None)])
    killed = consume(kafka_broker, dsn, files, topics, "--batch-rows", "500", env={"MTOOL_CRASH_AT": "chunk-committed:3"})
    assert killed.returncode == -9
    job = job_row(dsn)
    assert job["status"] == "PROCESSING" and 0 < job["processed_rows"] < 4000  # stopped in the middle
    assert read_all(kafka_broker.bootstrap, topics[1], 0, timeout=2) == []  # no status yet
    proc = consume(kafka_broker, dsn, files, topics, "--batch-rows", "500", "--max-messages", "1", check_rc=0,
                   idle=30)
    assert json.loads(proc.stdout)["imported"] == 1
    assert len(matches(dsn, g)) == 4000
    done = job_row(dsn, job["job_id"])
    assert done["status"] == "COMPLETED" and done["processed_rows"] == 4000 and done["written_rows"] == 4000
    got = statuses(kafka_broker.bootstrap, topics[1], 1)
    assert len(got) == 1 and got[0]["status"] == "COMPLETED" and got[0]["processedRows"] == 4000


def test_killed_after_the_status_before_the_commit_redelivery_sends_it_again(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(7)
    f = write(files / "s.parquet", rows_for(g, 200))
    produce(kafka_broker.bootstrap, topics[0], [(b"k", event(f, g, DOMAIN), None)])
    assert consume(kafka_broker, dsn, files, topics, env={"MTOOL_CRASH_AT": "consume-status-sent"}).returncode == -9
    proc = consume(kafka_broker, dsn, files, topics, "--max-messages", "1", check_rc=0, idle=30)
    assert json.loads(proc.stdout)["already"] == 1, proc.stdout + proc.stderr[-3000:]  # delivered again, no work
    got = statuses(kafka_broker.bootstrap, topics[1], 2)
    assert len(got) == 2 and got[0]["jobId"] == got[1]["jobId"] and got[1]["processedRows"] == 200
    assert len(matches(dsn, g)) == 200


def test_sigterm_leaves_the_job_resumable_and_the_offset_uncommitted(kafka_broker, dsn, files):
    import signal
    import subprocess
    import time

    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(8)
    f = many_chunks(files, "slow.parquet", g)
    produce(kafka_broker.bootstrap, topics[0], [(b"k", event(f, g, DOMAIN), None)])
    topic, status_topic, dlq_topic, consumer_group = topics
    cmd = mtool_command(consume_args(kafka_broker, files, topics, "--batch-rows", "500", idle=8), dsn)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MTOOL_DELAY_AT": "chunk-committed:0.7"}, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = job_row(dsn)
        if row and row["processed_rows"] >= 1000:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    row = job_row(dsn)
    assert row["status"] != "COMPLETED" and 0 < row["processed_rows"] < 4000
    assert read_all(kafka_broker.bootstrap, status_topic, 0, timeout=2) == []
    again = consume(kafka_broker, dsn, files, topics, "--batch-rows", "500", "--max-messages", "1", check_rc=0,
                    idle=30)
    assert json.loads(again.stdout)["imported"] == 1  # the uncommitted offset brought the event back
    assert len(matches(dsn, g)) == 4000 and job_row(dsn, row["job_id"])["status"] == "COMPLETED"
    assert len(statuses(kafka_broker.bootstrap, status_topic, 1)) == 1


def test_a_long_import_does_not_make_the_consumer_leave_its_group(kafka_broker, dsn, files):
    """max.poll.interval.ms of 7 s and an import of ~10 s: the keep-alive poll holds the group,
    so the offset commit after the import succeeds and the next event follows."""
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(9)
    slow = many_chunks(files, "long.parquet", g, n=3000)
    quick = write(files / "quick.parquet", rows_for(g, 10, prefix="q"))
    produce(kafka_broker.bootstrap, topics[0], [(b"1", event(slow, g, DOMAIN), None),
                                                 (b"2", event(quick, g, DOMAIN), None)])
    proc = consume(kafka_broker, dsn, files, topics, "--batch-rows", "500", "--max-messages", "2",
                   "--kafka-config", "max.poll.interval.ms=7000", env={"MTOOL_DELAY_AT": "chunk-committed:1.7"},
                   check_rc=0)
    assert json.loads(proc.stdout)["imported"] == 2
    assert "left uncommitted" not in proc.stderr
    assert proc.stderr.count('"msg": "revoked') == 1  # only when it closed: never during the import
    assert len(matches(dsn, g)) == 3010
    # committed: a new consumer of the group finds nothing left
    again = consume(kafka_broker, dsn, files, topics, "--idle-timeout", "6", check_rc=0)
    assert json.loads(again.stdout)["consumed"] == 0


def test_two_consumers_in_one_group_share_the_partitions_and_import_each_event_once(kafka_broker, dsn, files):
    import subprocess

    topics = topic_names()
    create_topics(kafka_broker.bootstrap, topics[0], partitions=4)
    create_topics(kafka_broker.bootstrap, *topics[1:3])
    g = group(10)
    names = [write(files / f"p{i}.parquet", rows_for(g, 100, prefix=f"p{i}-")) for i in range(12)]
    produce(kafka_broker.bootstrap, topics[0], [(f"{i}".encode(), event(n, g, DOMAIN), None, i % 4)
                                                 for i, n in enumerate(names)])
    topic, status_topic, dlq_topic, consumer_group = topics
    cmd = mtool_command(consume_args(kafka_broker, files, topics, idle=10), dsn)
    env = {**os.environ, "MTOOL_DELAY_AT": "chunk-committed:1.0"}  # slow imports: both get to work
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    summaries = [json.loads(out) for out, _ in results]
    assert all(s["imported"] > 0 for s in summaries), summaries  # both made progress
    assert sum(s["imported"] for s in summaries) >= 12
    got = statuses(kafka_broker.bootstrap, status_topic, 12)
    assert len(got) == 12 and len({s["jobId"] for s in got}) == 12  # each event's job once
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM import_jobs WHERE status = 'COMPLETED'").fetchone()[0] == 12
        assert conn.execute("SELECT sum(attempts) FROM import_jobs").fetchone()[0] == 12
    assert len(matches(dsn, g)) == 1200


def test_no_secret_in_logs_status_events_or_dead_letters(kafka_broker, dsn, files):
    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(11)
    f = write(files / "x.parquet", rows_for(g, 5))
    produce(kafka_broker.bootstrap, topics[0], [(b"1", event(f, g, DOMAIN), None), (b"2", b"junk", None)])
    secret = "Sup3r-S3cret-value"
    props = files / "client.properties"
    props.write_text(f"# a properties file\nsasl.oauthbearer.client.secret={secret}-file\n")
    dsn_with_password = dsn.replace("postgresql://", f"postgresql://postgres:{secret}-db@", 1) \
        if dsn.startswith("postgresql://") else f"{dsn} password={secret}-db"
    proc = consume(kafka_broker, dsn_with_password, files, topics, "--max-messages", "2", "--kafka-config",
                   f"sasl.password={secret}", "--kafka-config-file", str(props), check_rc=3)
    assert secret not in proc.stdout + proc.stderr
    assert "***" in proc.stderr  # the settings line shows the key, masked
    for message in read_all(kafka_broker.bootstrap, topics[1], 1) + read_all(kafka_broker.bootstrap, topics[2], 1):
        assert secret.encode() not in message.value() + b"".join(v for _, v in message.headers() or [])


def test_metrics_and_health_endpoints(kafka_broker, dsn, files):
    import subprocess
    import time
    import urllib.request

    from tests.conftest import free_port

    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(12)
    f = write(files / "m.parquet", rows_for(g, 30))
    produce(kafka_broker.bootstrap, topics[0], [(b"1", event(f, g, DOMAIN), None), (b"2", b"junk", None)])
    port = free_port()
    topic, status_topic, dlq_topic, consumer_group = topics
    cmd = mtool_command(consume_args(kafka_broker, files, topics, "--metrics-port", str(port), idle=12), dsn)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        text, deadline = "", time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if 'mtool_events_dead_lettered_total{topic="' in text and "mtool_events_imported_total{" in text \
                        and "kafka_consumer_lag{" in text:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
        assert health.status == 200
    finally:
        proc.communicate(timeout=60)
    assert f'mtool_events_consumed_total{{topic="{topic}"}} 2.0' in text
    assert f'mtool_events_dead_lettered_total{{topic="{topic}"}} 1.0' in text
    assert f'mtool_events_imported_total{{topic="{topic}"}} 1.0' in text
    assert "match_suggestions_storage_matches_saved_total" in text and "kafka_consumer_errors" in text
    assert f'kafka_consumer_lag{{partition="0",topic="{topic}"}} 0.0' in text  # librdkafka's statistics, caught up
    assert proc.returncode == 3


@pytest.mark.s3
def test_an_s3_event_is_imported(kafka_broker, dsn, files, s3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = topic_names()
    create_topics(kafka_broker.bootstrap, *topics[:3])
    g = group(13)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows_for(g, 250)), sink)
    s3.put_object(Bucket=s3.bucket, Key="drop/m.parquet", Body=sink.getvalue().to_pybytes())
    produce(kafka_broker.bootstrap, topics[0], [(b"1", event(f"s3://{s3.bucket}/drop/m.parquet", g, DOMAIN), None),
                                                 (b"2", event("http://example.org/m.parquet", g, DOMAIN), None)])
    proc = consume(kafka_broker, dsn, files, topics, "--max-messages", "2", check_rc=3)
    summary = json.loads(proc.stdout)
    assert summary["imported"] == 1 and summary["dead_lettered"] == 1  # http:// is not allowed by default
    assert len(matches(dsn, g)) == 250


@pytest.mark.s3
def test_a_broker_restart_mid_run_loses_no_event_and_doubles_no_row(dsn, files, s3, s3_endpoint):
    """tansu on S3 storage (the suite's moto server) keeps topics, messages and committed
    offsets across a restart (TESTING.md): the consumer rides it out."""
    import subprocess
    import time

    from tests.conftest import Broker

    s3.create_bucket(Bucket=f"{s3.bucket}-tansu")
    broker = Broker(storage=f"s3://{s3.bucket}-tansu/", env={
        "AWS_ENDPOINT": s3_endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}).start()
    try:
        topics = topic_names()
        create_topics(broker.bootstrap, *topics[:3])
        g = group(14)
        names = [many_chunks(files, f"r{i}.parquet", g, n=1000, prefix=f"r{i}-") for i in range(6)]
        produce(broker.bootstrap, topics[0], [(f"{i}".encode(), event(n, g, DOMAIN), None)
                                              for i, n in enumerate(names)])
        topic, status_topic, dlq_topic, consumer_group = topics
        cmd = mtool_command(consume_args(broker, files, topics, "--batch-rows", "500", idle=20), dsn)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "MTOOL_DELAY_AT": "chunk-committed:0.5"})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with psycopg.connect(dsn) as conn:
                done = conn.execute("SELECT count(*) FROM import_jobs WHERE status = 'COMPLETED'").fetchone()[0]
            if done >= 2:
                break
            time.sleep(0.2)
        broker.stop()  # mid-run: jobs 3.. not yet imported
        time.sleep(2)
        broker.start()
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM import_jobs WHERE status = 'COMPLETED'").fetchone()[0] == 6
        assert len(matches(dsn, g)) == 6000
        got = statuses(broker.bootstrap, status_topic, 6)
        assert len({s["jobId"] for s in got}) == 6 and all(s["status"] == "COMPLETED" for s in got)
        # and every offset was committed: a new consumer of the group finds nothing left
        again = consume(broker, dsn, files, topics, "--idle-timeout", "8", check_rc=0)
        assert json.loads(again.stdout)["consumed"] == 0
    finally:
        broker.stop()
