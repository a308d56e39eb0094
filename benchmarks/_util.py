"""Shared helpers for benchmarks: a throwaway PostgreSQL and peak-RSS sampling of a process tree."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from mtool.db.embedded import FAST_SETTINGS, LocalPostgres

# Bulk-load friendly server settings, the same for every contender in a run.
BENCH_SETTINGS = {**FAST_SETTINGS, "max_wal_size": "8GB", "maintenance_work_mem": "1GB", "shared_buffers": "1GB",
                  "work_mem": "256MB", "checkpoint_timeout": "30min"}


def scratch_dir(prefix: str) -> str:
    """A temporary directory removed when the benchmark exits (data directories of a few GB
    each otherwise pile up in /tmp run after run)."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    atexit.register(shutil.rmtree, path, True)
    return path


def start_postgres(port: int) -> LocalPostgres:
    """A throwaway server; its data directory goes at exit (stop the server before)."""
    root = Path(scratch_dir("mtool-bench-pg-"))
    os.chmod(root, 0o755)
    server = LocalPostgres(root, tcp_port=port, settings=BENCH_SETTINGS)
    server.start()
    return server


def _tree_rss_kb(pid: int) -> int:
    """Sum of RSS over pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid = int(fields[1])
            with open(f"/proc/{entry}/status") as fh:
                kb = next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
        except (OSError, StopIteration, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kb
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run cmd; returns (process, wall seconds, peak RSS in MiB of its whole process tree)."""
    peak = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kb(proc.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    thread.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, peak // 1024
