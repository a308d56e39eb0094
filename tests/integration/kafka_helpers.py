"""Producing events and reading topics back for the consume tests (confluent-kafka clients on the
suite's tansu broker)."""

from __future__ import annotations

import itertools
import json
import time
import uuid

_counter = itertools.count()
FAST = ["--kafka-config", "session.timeout.ms=6000", "--kafka-config", "heartbeat.interval.ms=1000"]


def topic_names():
    """A fresh (input topic, status topic, dlq topic, consumer group) for one test."""
    n = f"{int(time.time() * 1000) % 10**8}-{next(_counter)}"
    return f"matches.import.t{n}", f"status-t{n}", f"dlq-t{n}", f"group-t{n}"


def create_topics(bootstrap: str, *topics, partitions: int = 1) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics])
    for future in futures.values():
        future.result(30)


def produce(bootstrap: str, topic: str, messages) -> None:
    """messages: (key, value bytes or dict, headers or None[, partition]) tuples, acknowledged."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    errors = []
    for item in messages:
        key, value, headers = item[:3]
        extra = {"partition": item[3]} if len(item) > 3 else {}
        if isinstance(value, dict):
            value = json.dumps(value).encode()
        producer.produce(topic, key=key, value=value, headers=headers, on_delivery=lambda e, m: e and errors.append(e),
                         **extra)
    assert producer.flush(30) == 0 and not errors, errors


def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list:
    """Every message of `topic` from the beginning, once `expect` arrived (or the timeout)."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    out, end = [], time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < end:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                out.append(message)
        if len(out) >= expect:  # anything more arrives within a short grace
            grace = time.monotonic() + 1.0
            while time.monotonic() < grace:
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    out.append(message)
    finally:
        consumer.close()
    return out


def statuses(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list:
    return [json.loads(m.value()) for m in read_all(bootstrap, topic, expect, timeout)]


def event(path_or_uri, group_id: str, domain_id: str, **extra) -> dict:
    return {"fileUri": str(path_or_uri), "groupId": group_id, "domainId": domain_id, **extra}
