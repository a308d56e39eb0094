"""The group's edge writer: a process that COPYs finished Zarr blocks into the cycle's load
table while the compute threads go on with the next blocks.

Why a process: encoding and COPY of millions of edges would otherwise wait until the last
block (tens of seconds at 1M nodes) or steal the compute threads' GIL time. Each block is one
COPY in its own transaction. Exactly once without checkpoints: the load table is created
afresh for every attempt of a group, and every done block (including those a killed run left)
is sent to the writer again, so the table ends with each block's edges exactly once; it only
becomes visible at the swap.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue

import numpy as np

from mtool.db import matches as pm
from mtool.io.pipeline import WorkerFailed, _worker_setup, prefetched

POLL_SECONDS = 0.2


def edge_columns(refs, rows, neighbors, scores):
    """(reference ids, matched reference ids, scores) of the kept edges of query nodes `rows`
    (node indices) whose top-K are `neighbors`/`scores`; `refs`: the group's ids (Arrow)."""
    import pyarrow as pa

    src, pos = np.nonzero(neighbors >= 0)
    return refs.take(pa.array(rows[src])), refs.take(pa.array(neighbors[src, pos])), scores[src, pos]


def _edges_payload(args, rows, neighbors, scores) -> tuple[bytes, int]:
    """Binary COPY of a block's edges for the cycle's load table (matches.EDGE_LOAD_COLUMNS:
    the columns that are one value for the whole cycle are added at its end)."""
    from mtool.io import copy as pgcopy

    if args.get("fixed_ids") is not None:
        return _fixed_width_payload(args["fixed_ids"], rows, neighbors, scores)
    sources, targets, kept = edge_columns(args["refs"], rows, neighbors, scores)
    m = len(kept)
    fields = [pgcopy.text(sources), pgcopy.text(targets), pgcopy.fixed(kept, ">f4")]
    return pgcopy.encode_rows(fields, m), m


def fixed_width_ids(refs) -> np.ndarray | None:
    """The group's ids as one NumPy bytes array (no copy) where every id has the same UTF-8
    length (UUIDs and other fixed formats), else None."""
    import pyarrow as pa

    refs = refs.cast(pa.binary()) if not pa.types.is_binary(refs.type) else refs
    if len(refs) == 0 or refs.null_count:
        return None
    offsets = np.frombuffer(refs.buffers()[1], np.int32, len(refs) + 1, offset=refs.offset * 4)
    width = int(offsets[1] - offsets[0])
    if width == 0 or not (np.diff(offsets) == width).all():
        return None
    return np.frombuffer(refs.buffers()[2], f"S{width}", len(refs), offset=int(offsets[0]))


def _fixed_width_payload(ids: np.ndarray, rows, neighbors, scores) -> tuple[bytes, int]:
    """_edges_payload's bytes where every id has one width: each row is a fixed record, filled
    column by column. The general encoder joins nine Arrow parts a row (edges of 1M nodes, 316k
    a block: median 92 ms, ~5.8 CPU-s for 20M edges beside the compute; this, median 42 ms)."""
    from mtool.io.copy import COPY_HEADER, COPY_TRAILER

    width = ids.dtype.itemsize
    src, pos = np.nonzero(neighbors >= 0)
    record = np.dtype([("fields", ">i2"), ("source_len", ">i4"),
                       ("source", f"S{width}"), ("target_len", ">i4"), ("target", f"S{width}"),
                       ("score_len", ">i4"), ("score", ">f4")])
    # the constant words from one template record repeated (setting them field by field into
    # unaligned big-endian fields cost more than the rest together)
    template = np.array([(3, width, b"", width, b"", 4, 0)], record).tobytes()
    out = np.frombuffer(bytearray(template * len(src)), record)
    out["source"] = ids[rows[src]]
    out["target"] = ids[neighbors[src, pos]]
    out["score"] = scores[src, pos]
    return COPY_HEADER + out.tobytes() + COPY_TRAILER, len(src)


def writer_main(args: dict, block_q, result_q, parent_pid: int) -> None:
    """Block numbers in, ('done', edges) or ('error', message) out."""
    _worker_setup(parent_pid)
    try:
        import pyarrow as pa
        import zarr

        from mtool.io import copy as pgcopy

        refs = pa.array(args["reference_ids"], pa.string())
        args = dict(args, refs=refs, fixed_ids=fixed_width_ids(refs))
        block, edges = args["block_rows"], 0
        target = f"{pm.STAGE_SCHEMA}.{args['table']}"
        order = None
        def payloads():
            nonlocal order
            while (b := block_q.get()) is not None:
                if order is None:  # the staging arrays exist once the first block is done
                    order = np.load(os.path.join(args["staging"], "order.npy"))
                    staged = [zarr.open_array(os.path.join(args["staging"], name), mode="r")
                              for name in ("neighbors.zarr", "scores.zarr")]
                start, stop = b * block, min(len(order), (b + 1) * block)
                yield _edges_payload(args, order[start:stop], staged[0][start:stop], staged[1][start:stop])

        with args["db"].connect(autocommit=True) as conn, conn.cursor() as cur:
            # the next block is read and encoded while the server takes this one's COPY: alternating,
            # the writer and its server process had kept one core busy between them after the compute
            for payload, m in prefetched(payloads(), depth=1):
                pgcopy.copy_bytes(cur, target, pm.EDGE_LOAD_COLUMNS, payload)
                edges += m
        result_q.put(("done", edges))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        result_q.put(("error", f"{type(exc).__name__}: {exc}"))


class EdgeWriter:
    """Parent side: `send(b)` from any thread as blocks finish, `finish()` for the edge count."""

    def __init__(self, db, table: str, group, staging: str, block_rows: int):
        ctx = mp.get_context("spawn")
        self.block_q, self.result_q = ctx.Queue(), ctx.Queue()
        args = {"db": db, "table": table, "reference_ids": list(group.reference_ids), "staging": staging,
                "block_rows": block_rows}
        self.process = ctx.Process(target=writer_main, args=(args, self.block_q, self.result_q, os.getpid()),
                                   name="mtool-edge-writer", daemon=True)
        self.process.start()

    def send(self, block: int) -> None:
        self.block_q.put(block)

    def finish(self) -> int:
        self.block_q.put(None)
        while True:
            try:
                kind, value = self.result_q.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise WorkerFailed(f"edge writer exited with code {self.process.exitcode}") from None
        self.process.join()
        if kind == "error":
            raise RuntimeError(f"edge writer: {value}")
        return value

    def abort(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
