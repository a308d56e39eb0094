"""The multiprocess stage runner: every item reaches a writer exactly once, errors and dead
workers cancel the run."""

import pytest

from mtool.io import pipeline
from mtool.io.pipeline import Stage
from tests.unit import pipeline_stages as stages


def run(tasks, workers, writer_args=None, payload_bytes=10):
    seen = []
    pipeline.run(tasks, Stage(stages.numbers_reader, {"payload_bytes": payload_bytes}),
                 Stage(stages.summing_writer, writer_args or {}), seen.append, workers=workers, queue_depth=2)
    return seen


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_item_is_written_exactly_once(workers):
    tasks = [(i * 50, 50) for i in range(40)]
    assert sorted(run(tasks, workers, payload_bytes=20_000)) == list(range(2000))


def test_last_items_of_readers_are_not_overtaken_by_their_done_message():
    # Multi-MB payloads and slow writers keep the readers' last items in their feeder threads
    # when they report "done": without a flush the writers are stopped before those arrive.
    tasks = [(i * 3, 3) for i in range(8)]
    for _ in range(3):
        assert sorted(run(tasks, 2, {"sleep": 0.02}, payload_bytes=8 << 20)) == list(range(24))


def test_a_writer_error_cancels_the_run_and_reraises():
    with pytest.raises(ValueError, match="cannot write item 77"):
        run([(0, 200)], 2, {"fail_at": 77})


def test_a_dead_worker_is_detected():
    with pytest.raises(pipeline.WorkerFailed, match="exited with code 9"):
        run([(0, 200)], 2, {"die_at": 50})
