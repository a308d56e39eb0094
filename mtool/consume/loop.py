"""The consumer loop: poll an event, validate it, run its import job, publish its status event,
commit its offset, in that order (DESIGN.md section 3, Delivery).

- An invalid event goes to the dead-letter topic (acknowledged by the broker) before its
  offset is committed; the brake stops the loop when too many recent events were invalid.
- An import that fails on its input (a missing or unreadable file, a file breaking the
  contract, too many rejected rows) is a FAILED job and a FAILED status event; the loop goes on.
- A transient failure (PostgreSQL, S3 or the broker unreachable, the job locked by another
  consumer) is retried with backoff; the offset is not committed before the job is settled.
- While an import runs, the consumer's partitions are paused and a keep-alive thread polls, so
  a long import does not make the consumer leave its group (max.poll.interval.ms); the import
  itself runs on the main thread, where SIGTERM/SIGINT interrupt it: the chunk in flight is
  finished or rolled back, the job left resumable, the offset not committed (exit 130).
- Exactly-once effect: an event's job id is its `jobId`, or one derived from its topic,
  partition and offset, so a redelivered event finds its job: an unfinished one resumes from its
  checkpoint, a completed one does no work and its status is sent again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from mtool import faults
from mtool.consume import deadletter, events, status
from mtool.errors import DependencyUnavailable, ExitCode, Interrupted, JobBusy, MtoolError, UsageError

log = logging.getLogger(__name__)
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
POLL_S = 0.5
KEEP_ALIVE_AFTER_S = 1.0  # an import running longer than this pauses the partitions and polls meanwhile
KEEP_ALIVE_POLL_S = 0.1
SECRET_KEYS = ("password", "secret", "sasl.oauthbearer.config", "ssl.key.pem", "token")
# Settings of the consumer only: the producer (status events, dead letters) does not take them.
_CONSUMER_ONLY = ("group.", "enable.auto.commit", "auto.offset.reset", "session.timeout.ms",
                  "heartbeat.interval.ms", "max.poll.interval.ms", "enable.partition.eof", "partition.assignment",
                  "fetch.", "isolation.level", "auto.commit", "group.instance.id")


@dataclass(frozen=True)
class ConsumeOptions:
    bootstrap_servers: str
    topic_pattern: str
    consumer_group: str = "mtool-import"
    status_topic: str = "matches-import-status"
    dlq_topic: str = "matches-import-dlq"
    max_messages: int | None = None  # stop after this many events
    idle_timeout: float | None = None  # stop after this many seconds without an event
    kafka_config: tuple = ()  # (key, value) pairs passed to the consumer and the producer
    allow: events.AllowList = field(default_factory=events.AllowList)
    brake_share: float = 0.5  # stop when more than this share of the last brake_window events was invalid
    brake_window: int = 20
    workers: int = 2  # reader/writer processes per import
    batch_rows: int = 100_000
    max_rejects: int = 1000


@dataclass
class ConsumeSummary:
    consumed: int = 0
    imported: int = 0
    failed: int = 0
    dead_lettered: int = 0
    already: int = 0
    rows: int = 0
    stopped_by: str = "end"

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.PARTIAL if self.failed or self.dead_lettered else ExitCode.OK


class BrakeStop(MtoolError):
    exit_code = ExitCode.DATAERR


def redact(config: dict) -> dict:
    """The configuration with secrets masked, for log lines."""
    return {k: ("***" if any(s in k.lower() for s in SECRET_KEYS) else v) for k, v in config.items()}


def kafka_settings(opts: ConsumeOptions) -> tuple[dict, dict]:
    """(consumer, producer) configurations: ours, then the user's --kafka-config over them."""
    common = {"bootstrap.servers": opts.bootstrap_servers}
    user = dict(opts.kafka_config)
    consumer = {**common, "group.id": opts.consumer_group, "enable.auto.commit": False,
                "auto.offset.reset": "earliest", "enable.partition.eof": False, **user}
    producer_user = {k: v for k, v in user.items() if not k.startswith(_CONSUMER_ONLY)}
    producer = {**common, "enable.idempotence": True, "acks": "all", **producer_user}
    return consumer, producer



def check_topics(opts: ConsumeOptions) -> None:
    """The status and dead-letter topics must not match the pattern: the consumer would read
    its own output (a dead letter dead-lettered again, forever)."""
    import re

    try:
        pattern = re.compile(opts.topic_pattern)
    except re.error as exc:
        raise UsageError(f"--topic-pattern {opts.topic_pattern!r} is not a regular expression: {exc}") from None
    for flag, topic in (("--status-topic", opts.status_topic), ("--dlq-topic", opts.dlq_topic)):
        if pattern.search(topic):
            raise UsageError(f"{flag} {topic!r} matches --topic-pattern {opts.topic_pattern!r}: the consumer would "
                             "read its own output", hint="name the status and dead-letter topics outside the pattern")


class Consumer:
    """One consumer process: `run()` until --max-messages, --idle-timeout, the brake or a signal."""

    def __init__(self, opts: ConsumeOptions, db, importer, metrics=None, health=None):
        """`importer(event, origin)` runs an event's import job (the same jobs as `mtool ingest`;
        the command line passes mtool.ingest's runner in, so that this job imports no other
        job's package) and returns its result: job_id, processed_rows, rejected_rows,
        already_imported. It raises MtoolError subclasses as `mtool ingest` does, and
        events.InvalidEvent for a resolved file outside the allowed roots."""
        from confluent_kafka import Consumer as KafkaConsumer
        from confluent_kafka import Producer

        check_topics(opts)
        self.opts, self.db, self.importer = opts, db, importer
        self.metrics, self.health = metrics, health
        consumer_conf, producer_conf = kafka_settings(opts)
        log.info("consumer settings: %s", redact(consumer_conf))
        consumer_conf["error_cb"] = self._on_error
        if metrics is not None:
            consumer_conf.setdefault("statistics.interval.ms", 5000)
            consumer_conf["stats_cb"] = metrics.on_stats
        producer_conf["error_cb"] = self._on_error
        self.consumer = KafkaConsumer(consumer_conf)
        self.producer = Producer(producer_conf)
        self.brake = deadletter.Brake(opts.brake_share, opts.brake_window)
        self.summary = ConsumeSummary()
        self.lock = threading.Lock()  # the consumer is used by one thread at a time
        self.importing = threading.Event()
        self.stash: list = []  # messages the keep-alive poll received during an import
        self._origin: dict = {}  # topic, partition and offset of the event being imported

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> ConsumeSummary:
        pattern = self.opts.topic_pattern if self.opts.topic_pattern.startswith("^") else "^" + self.opts.topic_pattern
        self.consumer.subscribe([pattern], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_event = time.monotonic()
        try:
            while True:
                if self.opts.max_messages is not None and self.summary.consumed >= self.opts.max_messages:
                    self.summary.stopped_by = "max-messages"
                    break
                message = self.stash.pop(0) if self.stash else self._poll(POLL_S)
                if self.health:
                    self.health.beat()
                if message is None:
                    if self.opts.idle_timeout is not None and time.monotonic() - last_event >= self.opts.idle_timeout:
                        self.summary.stopped_by = "idle-timeout"
                        break
                    continue
                if message.error():
                    self._on_error(message.error(), topic=message.topic())
                    continue
                last_event = time.monotonic()
                if message.topic() in (self.opts.status_topic, self.opts.dlq_topic):
                    self._commit(message)  # our own output: never an input (check_topics refuses this anyway)
                    continue
                self._handle(message)
        finally:
            self._close()
        log.info("consumer stopped (%s): %d events, %d imported (%d already), %d failed, %d dead-lettered, %d rows",
                 self.summary.stopped_by, self.summary.consumed, self.summary.imported, self.summary.already,
                 self.summary.failed, self.summary.dead_lettered, self.summary.rows)
        return self.summary

    def _poll(self, timeout: float):
        with self.lock:
            return self.consumer.poll(timeout)

    def _handle(self, message) -> None:
        where = {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()}
        self.summary.consumed += 1
        if self.metrics:
            self.metrics.consumed.labels(message.topic()).inc()
        try:
            event = events.parse(message.value(), message.topic(), message.partition(), message.offset(),
                                 self.opts.allow)
        except events.InvalidEvent as exc:
            self._dead_letter(message, str(exc), where)
            return
        log.info("event %s/%d@%d: import job %s of %d file(s)", *where.values(), event.job_id, len(event.uris),
                 extra={"job_id": event.job_id, "group_id": event.group_id})
        try:
            outcome = self._import(event, where)
        except events.InvalidEvent as exc:  # a resolved file outside the allowed roots: nothing was read
            self._dead_letter(message, str(exc), where)
            return
        self.brake.record(False)
        self._send_status(event, outcome)
        faults.crash_point("consume-status-sent")
        self._commit(message)
        kind = "already imported" if outcome["already"] else outcome["status"]
        log.info("event %s/%d@%d: job %s %s, %d rows processed, %d rejected", *where.values(), event.job_id, kind,
                 outcome["processed"], outcome["rejected"], extra={"job_id": event.job_id, "group_id": event.group_id})

    # -- dead letters -------------------------------------------------------------------------

    def _dead_letter(self, message, error: str, where: dict) -> None:
        log.warning("event %s/%d@%d is invalid, sent to %s: %s", *where.values(), self.opts.dlq_topic, error)
        self._produce_acked(self.opts.dlq_topic, message.key(), message.value(), deadletter.headers(message, error))
        self.summary.dead_lettered += 1
        if self.metrics:
            self.metrics.dead_lettered.labels(message.topic()).inc()
        stop = self.brake.record(True)
        self._commit(message)
        if stop:
            self.summary.stopped_by = "brake"
            raise BrakeStop(stop, hint="fix the producer of these events; the dead letters say what is wrong")

    # -- the import -----------------------------------------------------------------------------

    def _import(self, event: events.FileEvent, where: dict) -> dict:
        """Run the event's import job to a settled end (COMPLETED or FAILED), retrying transient
        failures with backoff, while the keep-alive thread polls."""
        from mtool.db import jobs as job_repo

        delay = RETRY_FIRST_S
        started = time.time()
        self._origin = where
        with self._keep_alive():
            while True:
                try:
                    result = self.importer(event, where)
                    self.summary.imported += 1
                    self.summary.already += bool(result.already_imported)
                    self.summary.rows += 0 if result.already_imported else result.processed_rows
                    if self.metrics:
                        self.metrics.imported.labels(where["topic"]).inc()
                    job = self._job(event.job_id) or self._job(result.job_id)
                    return {"status": "COMPLETED", "processed": result.processed_rows,
                            "rejected": result.rejected_rows, "already": result.already_imported, "error": None,
                            "started": (job.started_at if job else None) or started,
                            "finished": (job.finished_at if job else None) or time.time()}
                except (events.InvalidEvent, Interrupted, KeyboardInterrupt):
                    raise
                except (DependencyUnavailable, JobBusy) as exc:
                    self._transient(exc, where, delay)
                except MtoolError as exc:
                    if not exc.retryable:
                        return self._failed(event, str(exc), started, job_repo)
                    self._transient(exc, where, delay)
                except Exception as exc:  # noqa: BLE001 - a bug in one import must not stop the consumer
                    log.exception("import job %s failed unexpectedly", event.job_id, extra={"job_id": event.job_id})
                    return self._failed(event, f"{type(exc).__name__}: {exc}", started, job_repo)
                delay = min(RETRY_MAX_S, delay * 2)

    def _transient(self, exc, where: dict, delay: float) -> None:
        log.warning("event %s/%d@%d: %s; retrying in %.0f s (the offset stays uncommitted)", *where.values(),
                    str(exc).splitlines()[0], delay)
        if self.metrics:
            self.metrics.errors.labels(where["topic"]).inc()
        time.sleep(delay)

    def _failed(self, event, error: str, started: float, job_repo) -> dict:
        """The job ended FAILED on its input: make sure its row says so (an import that failed
        before its job existed, such as a missing file, gets a FAILED row too)."""
        self.summary.failed += 1
        if self.metrics:
            self.metrics.failed.inc()

        def record(conn):
            job_repo.record_failure(conn, event.job_id, list(event.uris), event.group_id, event.domain_id, error,
                                    self._origin)
            return job_repo.get(conn, event.job_id)

        job = self.db.retry(lambda: self._with_conn(record), "record failed job")
        log.warning("import job %s FAILED: %s", event.job_id, error, extra={"job_id": event.job_id})
        return {"status": "FAILED", "processed": job.processed_rows, "rejected": job.rejected_rows, "already": False,
                "error": error, "started": job.started_at or started, "finished": job.finished_at or time.time()}

    def _with_conn(self, fn):
        with self.db.connect(autocommit=True) as conn:
            return fn(conn)

    def _job(self, job_id):
        from mtool.db import jobs as job_repo

        if not job_id:
            return None
        return self.db.retry(lambda: self._with_conn(lambda c: job_repo.get(c, job_id)), "read job")

    # -- output -------------------------------------------------------------------------------

    def _send_status(self, event, outcome: dict) -> None:
        value = status.event(event.job_id, event.group_id, event.domain_id, outcome["status"], outcome["processed"],
                             outcome["rejected"], outcome["started"], outcome["finished"], outcome["error"])
        self._produce_acked(self.opts.status_topic, event.job_id.encode(), value, None)

    def _produce_acked(self, topic: str, key, value, headers) -> None:
        """Produce one message and wait until the broker acknowledged it; retried with backoff
        (the caller commits the offset only after this returns)."""
        delay = RETRY_FIRST_S
        while True:
            outcome = {}
            self.producer.produce(topic, key=key, value=value, headers=headers,
                                  on_delivery=lambda err, msg: outcome.update(error=err))
            self.producer.flush(60)
            if outcome.get("error") is None and outcome:
                return
            log.warning("could not deliver to %s: %s; retrying in %.0f s", topic, outcome.get("error", "timed out"),
                        delay)
            if self.metrics:
                self.metrics.errors.labels(topic).inc()
            self._sleep_polling(delay)
            delay = min(RETRY_MAX_S, delay * 2)

    def _commit(self, message) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = [TopicPartition(message.topic(), message.partition(), message.offset() + 1)]
        delay = RETRY_FIRST_S
        for _ in range(8):
            try:
                with self.lock:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
                return
            except KafkaException as exc:
                log.warning("offset commit of %s/%d@%d failed: %s", message.topic(), message.partition(),
                            message.offset(), exc.args[0])
                if self.metrics:
                    self.metrics.errors.labels(message.topic()).inc()
                self._sleep_polling(delay)
                delay = min(RETRY_MAX_S, delay * 2)
        # Not committed (the partition may have moved to another consumer): the event is
        # delivered again, and its job, settled, does no work twice.
        log.warning("offset of %s/%d@%d left uncommitted: it will be delivered again (its job is settled)",
                    message.topic(), message.partition(), message.offset())

    def _sleep_polling(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.importing.is_set():
                time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))
            else:
                message = self._poll(min(POLL_S, max(0.0, end - time.monotonic())))
                if message is not None and not message.error():
                    self.stash.append(message)

    # -- keeping the group membership during an import ----------------------------------------

    def _keep_alive(self):
        """While an import runs on the main thread: after KEEP_ALIVE_AFTER_S, pause the
        consumer's partitions and poll (serving the group protocol and max.poll.interval.ms)
        until it ends, then resume them. A quick import never pauses: pausing drops the
        prefetched messages, and fetching them again cost ~0.5 s per small event."""
        consumer = self

        class KeepAlive:
            def __enter__(self):
                self.stop, self.paused = threading.Event(), False
                self.thread = threading.Thread(target=self._run, name="kafka-keep-alive", daemon=True)
                self.thread.start()

            def _run(self):
                if self.stop.wait(KEEP_ALIVE_AFTER_S):
                    return
                with consumer.lock:
                    consumer.consumer.pause(consumer.consumer.assignment())
                    consumer.importing.set()
                    self.paused = True
                while not self.stop.is_set():
                    message = consumer._poll(KEEP_ALIVE_POLL_S)
                    if consumer.health:
                        consumer.health.beat()
                    if message is not None and not message.error():
                        consumer.stash.append(message)  # from a partition assigned meanwhile

            def __exit__(self, *exc):
                self.stop.set()
                self.thread.join()
                if self.paused:
                    with consumer.lock:
                        consumer.consumer.resume(consumer.consumer.assignment())
                        consumer.importing.clear()
                return False

        return KeepAlive()

    def _on_assign(self, consumer, partitions) -> None:
        log.info("assigned %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions))
        if self.importing.is_set():
            consumer.pause(partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        log.info("revoked %s", ", ".join(f"{p.topic}/{p.partition}" for p in partitions))
        revoked = {(p.topic, p.partition) for p in partitions}
        self.stash = [m for m in self.stash if (m.topic(), m.partition()) not in revoked]

    def _on_error(self, error, topic: str = "") -> None:
        log.warning("kafka: %s", error)
        if self.metrics:
            self.metrics.errors.labels(topic or "").inc()

    def _close(self) -> None:
        try:
            self.producer.flush(10)
        finally:
            with self.lock:
                self.consumer.close()

