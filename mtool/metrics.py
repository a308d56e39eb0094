"""Prometheus metrics, named as in the seed designs (declared once, here).

Batch commands fill a private registry and, when asked, write it as a node-exporter textfile
(`--metrics-textfile`) or push it to a Pushgateway (`--pushgateway`); long-running modes serve it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, write_to_textfile

STORAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _BatchMetrics:
    """A private registry that a batch run exports once, at its end."""

    registry: CollectorRegistry

    def export(self, textfile: str | None = None, pushgateway: str | None = None, job: str = "mtool") -> None:
        if textfile:
            write_to_textfile(textfile, self.registry)
        if pushgateway:
            push_to_gateway(pushgateway, job=job, registry=self.registry)


class IngestMetrics(_BatchMetrics):
    """Storage and job metrics of the import module (seed HLD section 12)."""

    def __init__(self, group_label: str = "", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.group = group_label or "mixed"
        # End-to-end save time of a job's rows (commit phase), by group.
        self.storage_duration = Histogram("match_suggestions_storage_duration", "Time to store a job's matches",
                                          ["groupId"], registry=self.registry, buckets=STORAGE_BUCKETS)
        # Latency of one committed chunk (COPY into staging + checkpoint).
        self.batch_duration = Histogram("match_suggestions_storage_batch_duration", "Time to store one batch",
                                        ["groupId"], registry=self.registry, buckets=STORAGE_BUCKETS)
        # Rows committed to staging.
        self.saved = Counter("match_suggestions_storage_matches_saved", "Matches saved", ["groupId"],
                             registry=self.registry)
        # Failures, by error class.
        self.errors = Counter("match_suggestions_storage_errors", "Storage errors", ["groupId", "error_type"],
                              registry=self.registry)
        # Whole-job duration by final status (SLA monitoring).
        self.job_duration = Histogram("import_job_duration_seconds", "Import job duration", ["status"],
                                      registry=self.registry, buckets=STORAGE_BUCKETS)

    def chunk_written(self, rows: int, seconds: float) -> None:
        self.batch_duration.labels(self.group).observe(seconds)
        self.saved.labels(self.group).inc(rows)

    def storage_finished(self, rows: int, seconds: float) -> None:
        self.storage_duration.labels(self.group).observe(seconds)

    def job_finished(self, status: str, seconds: float, error_type: str | None = None) -> None:
        self.job_duration.labels(status).observe(seconds)
        if error_type:
            self.errors.labels(self.group, error_type).inc()


class MatchMetrics(_BatchMetrics):
    """Metrics of the matching engine (seed LLD names)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        # Candidate-index (graph) build time per group.
        self.graph_build = Histogram("graph_build_duration", "Candidate index build time", ["groupId"],
                                     registry=self.registry, buckets=STORAGE_BUCKETS)
        # Time per block of query nodes (search + rescoring + top-K + staging).
        self.batch = Histogram("batch_matches_duration", "Time per block of matched nodes", ["groupId"],
                               registry=self.registry, buckets=STORAGE_BUCKETS)
        # Top-K edges written.
        self.generated = Counter("matches_generated", "Matches generated", ["groupId"], registry=self.registry)
        # The recall@K each group's last cycle measured on its verification sample (1.0: exact).
        self.recall = Gauge("match_recall_estimate", "Recall@K estimate of the group's cycle", ["groupId"],
                            registry=self.registry)
        # Group cycles by final status.
        self.cycles = Counter("match_cycles", "Group match cycles", ["status"], registry=self.registry)


class ConsumeMetrics:
    """`mtool consume`'s metrics, served on --metrics-port: the seed's consumer errors, events by
    fate, lag per partition, and the import jobs' storage metrics (IngestMetrics, same registry)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.storage = IngestMetrics("consume", registry=self.registry)
        self.errors = Counter("kafka_consumer_errors", "Kafka consumer errors", ["topic"], registry=self.registry)
        self.consumed = Counter("mtool_events_consumed", "Events consumed", ["topic"], registry=self.registry)
        self.dead_lettered = Counter("mtool_events_dead_lettered", "Events sent to the dead-letter topic", ["topic"],
                                     registry=self.registry)
        self.imported = Counter("mtool_events_imported", "Events whose import job completed", ["topic"],
                                registry=self.registry)
        self.failed = Counter("mtool_import_jobs_failed", "Import jobs of events that ended FAILED",
                              registry=self.registry)
        self.lag = Gauge("kafka_consumer_lag", "Messages behind the partition's end", ["topic", "partition"],
                         registry=self.registry)

    def on_stats(self, stats_json: str) -> None:
        """librdkafka's statistics callback: each assigned partition's consumer lag."""
        import json

        stats = json.loads(stats_json)
        for topic, body in stats.get("topics", {}).items():
            for partition, p in body.get("partitions", {}).items():
                if partition != "-1" and p.get("consumer_lag", -1) >= 0:
                    self.lag.labels(topic, partition).set(p["consumer_lag"])
