"""Crash hooks for resume tests (as faiss contrib's `crash_at`).

MTOOL_CRASH_AT=<point>[:<n>] kills the whole process group with SIGKILL the n-th time a
process reaches <point>, as a node failure would: no cleanup, no rollback on our side. The
tests then rerun the command and compare with an uninterrupted run. MTOOL_DELAY_AT=<point>:<s>
sleeps s seconds each time a process reaches <point> (a slow import, for the consumer's
keep-alive and signal tests). Unset, both are no-ops.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_seen: Counter = Counter()


def crash_point(name: str) -> None:
    delay_point(name)
    spec = os.environ.get("MTOOL_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] >= int(nth or 1):
        os.killpg(os.getpgrp(), signal.SIGKILL)


def delay_point(name: str) -> None:
    spec = os.environ.get("MTOOL_DELAY_AT")
    if not spec:
        return
    point, _, seconds = spec.partition(":")
    if point == name:
        time.sleep(float(seconds or 1))
