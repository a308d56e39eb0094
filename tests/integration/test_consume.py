"""`mtool consume` against a real Kafka-protocol broker (tansu), a real PostgreSQL and, for s3://
events, a real S3-compatible server: what a user checks is the rows in potential_matches, the
job rows, the status events on the status topic and the dead letters on the DLQ topic."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
import pytest

from tests.conftest import run_mtool
from tests.integration.helpers import DOMAIN, job_row, matches, rows_for, write
from tests.integration.kafka_helpers import FAST, create_topics, event, produce, read_all, statuses, topic_names

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def group(n: int) -> str:
    return f"aaaaaaaa-0000-4000-8000-{n:012d}"


def consume(broker, dsn, files, topics, *extra, env=None, check_rc=None, timeout=120):
    topic, status_topic, dlq_topic, consumer_group = topics
    args = ["consume", "--bootstrap-servers", broker.bootstrap, "--topic-pattern", f"^{topic}$",
            "--consumer-group", consumer_group, "--status-topic", status_topic, "--dlq-topic", dlq_topic,
            "--allow-scheme", "file", "--allow-scheme", "s3", "--file-root", str(files), "--workers", "1",
            "--idle-timeout", "8", "--json", *FAST, *extra]
    return run_mtool(args, dsn, env=env, check_rc=check_rc, timeout=timeout)


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
