"""`mtool consume` against `mtool ingest` of the same files, through a real broker (tansu), a
real S3-compatible server (moto) and a throwaway PostgreSQL.

    python benchmarks/consume.py [--events 1000] [--small-rows 100] [--large 3] [--large-rows 1000000]
                                 [--latency-events 50]

Prints:
- large files: `mtool ingest s3://...` of each by hand, then the same files (copies under
  other keys and groups, so that neither run finds the other's job) as events through `mtool
  consume`: rows/s of each, side by side;
- small files: --events events produced at once, consumed: events/s and rows/s;
- event-to-status latency: --latency-events events produced one at a time, each once the
  previous one's status arrived (an idle consumer): the median and p99 of the time from the
  event's produce timestamp to its COMPLETED status event's (both stamped by their producers'
  clocks on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _util import scratch_dir, start_postgres  # noqa: E402

MTOOL = [sys.executable, "-m", "mtool.cli"]
DOMAIN = "dddddddd-0000-4000-8000-000000000001"
LATENCY_CONFIG = [a for kv in os.environ.get("BENCH_KAFKA_CONFIG", "").split() for a in ("--kafka-config", kv)]
ENV_S3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def matches_file(rows: int, group: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    users = max(10, rows // 20)
    table = pa.table({"reference_id": [f"u{i}" for i in rng.integers(0, users, rows)],
                      "matched_reference_id": [f"m{i}" for i in range(rows)],
                      "compatibility_score": rng.random(rows).astype(np.float32),
                      "group_id": [group] * rows, "domain_id": [DOMAIN] * rows})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--small-rows", type=int, default=100)
    ap.add_argument("--large", type=int, default=3)
    ap.add_argument("--large-rows", type=int, default=1_000_000)
    ap.add_argument("--latency-events", type=int, default=50)
    args = ap.parse_args()

    import boto3
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.conftest import Broker, free_port

    work = scratch_dir("mtool-bench-consume-")
    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in ENV_S3.items()
                                                      if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    s3.create_bucket(Bucket="drop")
    broker = Broker().start()
    server = start_postgres(free_port())
    env = {**os.environ, **ENV_S3, "AWS_ENDPOINT_URL": endpoint, "MTOOL_DSN": server.dsn("postgres"),
           "MTOOL_HOME": work}
    topic, status_topic = "matches.import.bench", "matches-import-status"
    try:
        subprocess.run(MTOOL + ["db", "init"], env=env, check=True, capture_output=True)
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for f in admin.create_topics([NewTopic(t, 1, 1) for t in (topic, status_topic, "matches-import-dlq")]).values():
            f.result(30)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})

        def consume(count: int, idle: float = 15.0) -> float:
            t = time.perf_counter()
            proc = subprocess.run(MTOOL + ["--log-format", "json", "consume", "--bootstrap-servers", broker.bootstrap,
                                           "--topic-pattern", rf"^{topic}$", "--max-messages", str(count),
                                           "--idle-timeout", str(idle), "--json", "--kafka-config",
                                           "session.timeout.ms=6000"], env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return time.perf_counter() - t

        # -- large files: ingest by hand, then the same files as events ---------------------------
        if args.large:
            groups = {}
            for copy in ("hand", "event"):
                for i in range(args.large):
                    groups[copy, i] = str(uuid.uuid4())
                    s3.put_object(Bucket="drop", Key=f"large/{copy}-{i}.parquet",
                                  Body=matches_file(args.large_rows, groups[copy, i], i))
            t = time.perf_counter()
            for i in range(args.large):
                proc = subprocess.run(MTOOL + ["ingest", f"s3://drop/large/hand-{i}.parquet", "--json"], env=env,
                                      capture_output=True, text=True)
                assert proc.returncode == 0, proc.stderr[-2000:]
            hand = time.perf_counter() - t
            for i in range(args.large):
                producer.produce(topic, json.dumps({"fileUri": f"s3://drop/large/event-{i}.parquet",
                                                    "groupId": groups["event", i], "domainId": DOMAIN}).encode())
            producer.flush(30)
            events_s = consume(args.large)
            rows = args.large * args.large_rows
            import psycopg

            with psycopg.connect(server.dsn("postgres")) as conn:
                spans = dict(conn.execute(
                    "SELECT kafka_topic IS NOT NULL, sum(extract(epoch FROM finished_at - created_at)) FROM import_jobs "
                    "GROUP BY 1").fetchall())
            print(f"large files, the jobs' own time (created to finished): mtool ingest {rows / spans[False]:,.0f} "
                  f"rows/s, mtool consume {rows / spans[True]:,.0f} rows/s: {spans[False] / spans[True]:.2f}x",
                  flush=True)
            print(f"large files ({args.large} x {args.large_rows:,} rows, s3://): mtool ingest {rows / hand:,.0f} rows/s "
                  f"({hand:.1f} s, one process per file); mtool consume {rows / events_s:,.0f} rows/s ({events_s:.1f} s, "
                  f"one process, consumer start and group join included): {hand / events_s:.2f}x ingest's rate",
                  flush=True)

        # -- small files: throughput ------------------------------------------------------------------
        for i in range(args.events + args.latency_events):
            s3.put_object(Bucket="drop", Key=f"small/{i}.parquet", Body=matches_file(args.small_rows, str(uuid.uuid4()),
                                                                                     1000 + i))
        for i in range(args.events):
            producer.produce(topic, json.dumps({"fileUri": f"s3://drop/small/{i}.parquet", "groupId": str(uuid.uuid4()),
                                                "domainId": DOMAIN}).encode())
        producer.flush(30)
        took = consume(args.events) if args.events else float("nan")
        if args.events:
            print(f"small files ({args.events:,} events of {args.small_rows} rows): {args.events / took:,.1f} events/s, "
                  f"{args.events * args.small_rows / took:,.0f} rows/s ({took:.1f} s, consumer start included)",
                  flush=True)

        # -- latency: one event at a time to an idle consumer -------------------------------------
        if not args.latency_events:
            return
        log = open(os.path.join(work, "consume-latency.log"), "w+")
        from confluent_kafka import TopicPartition

        # The status topic from its current end, without a group (nothing to time out while idle).
        statuses = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                             "enable.auto.commit": False})
        _, end = statuses.get_watermark_offsets(TopicPartition(status_topic, 0), timeout=10)
        statuses.assign([TopicPartition(status_topic, 0, end)])
        proc = subprocess.Popen(MTOOL + ["--log-format", "json", "consume", "--bootstrap-servers", broker.bootstrap,
                                         "--topic-pattern", rf"^{topic}$", "--max-messages",
                                         str(args.latency_events), "--idle-timeout", "60", "--kafka-config",
                                         "session.timeout.ms=6000", *LATENCY_CONFIG], env=env, stdout=subprocess.DEVNULL,
                                stderr=log, text=True)  # a pipe nobody reads fills at 64 KB and stops it
        time.sleep(5)  # joined its group
        gaps = []
        for i in range(args.latency_events):
            job = str(uuid.uuid4())
            producer.produce(topic, key=job, value=json.dumps({
                "fileUri": f"s3://drop/small/{args.events + i}.parquet", "groupId": str(uuid.uuid4()),
                "domainId": DOMAIN, "jobId": job}).encode())
            producer.flush(10)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                message = statuses.poll(1.0)
                if message is None or message.error() or message.key().decode() != job:
                    continue
                body = json.loads(message.value())
                assert body["status"] == "COMPLETED", body
                gaps.append(message.timestamp()[1])
                break
            else:
                proc.kill()
                low_high = statuses.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
                log.seek(0)
                raise SystemExit(f"no status for event {i} within 60 s; input topic offsets {low_high}; consumer log: "
                                 + log.read()[-3000:])
        proc.communicate(timeout=120)
        # The events' own timestamps, read back from the input topic.
        reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"bench-{uuid.uuid4()}",
                           "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
        reader.subscribe([topic])
        produced, deadline = [], time.monotonic() + 60
        while len(produced) < args.events + args.large + args.latency_events and time.monotonic() < deadline:
            message = reader.poll(1.0)
            if message is not None and not message.error():
                produced.append(message.timestamp()[1])
        gaps = (np.array(gaps, np.float64) - np.array(produced[-args.latency_events:], np.float64)) / 1000
        print(f"event to COMPLETED status ({args.latency_events} events, one at a time): median {np.median(gaps):.3f} s, "
              f"p99 {np.percentile(gaps, 99):.3f} s, min {gaps.min():.3f} s, max {gaps.max():.3f} s", flush=True)
    finally:
        server.stop()
        broker.stop()
        moto.stop()


if __name__ == "__main__":
    main()
