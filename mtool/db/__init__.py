"""PostgreSQL: connections with retries, schema migrations, the embedded server, repositories."""
