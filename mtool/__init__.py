"""mtool: the match pipeline toolkit.

Importing the package is cheap on purpose: pyarrow, psycopg, faiss, cupy and confluent_kafka
are imported by the modules that use them, so `mtool --help` starts fast.
"""

__version__ = "0.1.0"
