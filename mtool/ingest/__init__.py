"""`mtool ingest`: Parquet files of match suggestions into PostgreSQL as resumable import jobs
(jobs.py: plan, load, commit, resume; contract.py: the import-file contract)."""
