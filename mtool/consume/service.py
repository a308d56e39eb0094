"""The consumer's HTTP endpoint (--metrics-port): `/metrics` for Prometheus and `/healthz` for a
liveness probe, which answers 200 while the poll loop (or, during an import, the keep-alive
poll) ran within STALE_S seconds, else 503."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STALE_S = 60.0


class Health:
    def __init__(self):
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.last < STALE_S


def serve(port: int, registry, health: Health, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; returns the server (its `server_port`, `shutdown()`)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] == "/metrics":
                body, code, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path.split("?")[0] in ("/healthz", "/health"):
                ok = health.alive
                body = (b"ok\n" if ok else b"poll loop stalled\n")
                code, kind = (200 if ok else 503), "text/plain"
            else:
                body, code, kind = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
