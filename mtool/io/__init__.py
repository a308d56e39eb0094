"""What the jobs share: opening Parquet sources (local, http(s), s3), the binary COPY encoder,
the load-table layout, and the reader/writer process pipeline. No job's package is imported
from here, and no job imports another's."""
