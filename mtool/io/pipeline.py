"""The multiprocess stage runner: reader processes -> bounded queue -> writer processes.

The parent plans and watches; readers turn small task messages into encoded payloads; writers
commit them. The queue between them is bounded, so a slow writer stalls the readers
(backpressure) and memory stays at about `queue_depth` payloads whatever the input size.
Workers are started with `spawn` (CUDA and open connections are not fork-safe), get plain
frozen arguments, ignore SIGINT (the parent decides) and die with the parent (PDEATHSIG),
so a killed run leaves no orphan writing behind its back.

Any worker error cancels the run: the parent terminates every worker (a writer's open
transaction is rolled back by the server) and re-raises the first error.
With `workers == 1` the same reader and writer run inline in the calling process.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Stage:
    """A stage factory: `factory(args)` is called once per worker process and returns the
    callable that handles one message (reader: task -> iterable of payloads; writer:
    payload -> small result). Factories are module-level functions (picklable by name)."""

    factory: Callable[[Any], Callable]
    args: Any


class WorkerFailed(Exception):
    """A worker process died without reporting an error (killed, segfault, OOM)."""


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _worker_setup(parent_pid: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before PDEATHSIG was armed
        os._exit(1)
    return parent_pid


def _report_error(result_q, role: str, exc: BaseException) -> None:
    try:
        result_q.put(("error", role, exc, traceback.format_exc()))
    except Exception:  # an unpicklable exception: send its text
        result_q.put(("error", role, RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc()))


def _close(handler) -> None:
    """Handlers may hold connections or open files: close them when the stage ends."""
    close = getattr(handler, "close", None)
    if close is not None:
        close()


def reader_main(stage: Stage, task_q, item_q, result_q, parent_pid: int) -> None:
    parent = _worker_setup(parent_pid)
    try:
        handle = stage.factory(stage.args)
        while (task := task_q.get()) is not None:
            for item in handle(task):
                while True:
                    try:
                        item_q.put(item, timeout=1.0)
                        break
                    except queue.Full:
                        if os.getppid() != parent:
                            return
        _close(handle)
        # put() only hands items to a feeder thread: flush them into the pipe before saying
        # "done" on another queue, or the writers could be told to stop before they arrive.
        item_q.close()
        item_q.join_thread()
        result_q.put(("done", "reader", None, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        _report_error(result_q, "reader", exc)


def writer_main(stage: Stage, item_q, result_q, parent_pid: int) -> None:
    _worker_setup(parent_pid)
    try:
        handle = stage.factory(stage.args)
        while (item := item_q.get()) is not None:
            result_q.put(("result", "writer", handle(item), None))
        _close(handle)
        result_q.put(("done", "writer", None, None))
    except BaseException as exc:  # noqa: BLE001
        _report_error(result_q, "writer", exc)


def run(tasks: Iterable, reader: Stage, writer: Stage, on_result: Callable[[Any], None],
        workers: int, queue_depth: int | None = None) -> None:
    """Run every task through reader then writer; on_result gets each writer result in the
    parent (it may raise to cancel the run)."""
    tasks = list(tasks)
    if workers <= 1:
        read, write = reader.factory(reader.args), writer.factory(writer.args)
        try:
            for task in tasks:
                for item in read(task):
                    on_result(write(item))
        finally:
            _close(read)
            _close(write)
        return

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n_readers = max(1, min(workers, len(tasks)))
    n_writers = workers
    task_q, item_q, result_q = ctx.Queue(), ctx.Queue(maxsize=queue_depth or 2 * n_writers), ctx.Queue()
    for task in tasks:
        task_q.put(task)
    for _ in range(n_readers):
        task_q.put(None)
    me = os.getpid()
    readers = [ctx.Process(target=reader_main, args=(reader, task_q, item_q, result_q, me), daemon=True,
                           name=f"mtool-reader-{i}") for i in range(n_readers)]
    writers = [ctx.Process(target=writer_main, args=(writer, item_q, result_q, me), daemon=True,
                           name=f"mtool-writer-{i}") for i in range(n_writers)]
    procs = readers + writers
    for p in procs:
        p.start()
    done = {"reader": 0, "writer": 0}
    try:
        while done["writer"] < n_writers:
            try:
                kind, role, payload, tb = result_q.get(timeout=POLL_SECONDS)
            except queue.Empty:
                _check_alive(procs)
                continue
            if kind == "result":
                on_result(payload)
            elif kind == "error":
                log.debug("worker %s failed:\n%s", role, tb)
                raise payload
            elif kind == "done":
                done[role] += 1
                if role == "reader" and done["reader"] == n_readers:
                    for _ in range(n_writers):
                        _put_until_accepted(item_q, None, writers)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        for q in (task_q, item_q, result_q):
            q.cancel_join_thread()
            q.close()


def _check_alive(procs) -> None:
    for p in procs:
        if not p.is_alive() and p.exitcode not in (0, None):
            raise WorkerFailed(f"worker {p.name} exited with code {p.exitcode}")


def _put_until_accepted(q, item, consumers) -> None:
    while True:
        try:
            q.put(item, timeout=1.0)
            return
        except queue.Full:
            if not any(p.is_alive() for p in consumers):
                raise WorkerFailed("every writer process has exited") from None
            time.sleep(0.05)


def prefetched(items, depth: int = 2):
    """`items` produced on a thread, up to `depth` ahead of the consumer; its error re-raised.
    For an encoder (Arrow, NumPy: they release the GIL) feeding a COPY, so that the client
    encodes the next payload while the server takes the current one."""
    import threading

    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="mtool-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)  # a producer blocked on its own input is a daemon: it goes with the process
