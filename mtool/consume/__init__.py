"""`mtool consume`: file events from Kafka become import jobs (the same jobs as `mtool ingest`),
status events go out, invalid events go to a dead-letter topic.

events.py (validation and the source allow-list), deadletter.py (dead letters and the brake),
status.py (status events), service.py (metrics and the health endpoint), loop.py (the consumer
loop: poll, import, publish, commit, in that order).
"""
