"""The bounded pool: bounded queue, stop requests, failure aggregation."""

from __future__ import annotations

import threading
import time

import pytest

from hbp_image_tasks import errors
from hbp_image_tasks.pool import QUEUE_PER_JOB, BoundedPool, run_bounded


def test_runs_every_item_and_calls_done_in_the_callers_thread():
    seen: dict[int, int] = {}
    done_threads = set()

    def done(item: int, result: int) -> None:
        seen[item] = result
        done_threads.add(threading.current_thread())

    completed = run_bounded(range(50), lambda n: n * n, jobs=4, what="squaring", done=done)
    assert completed == 50
    assert seen == {n: n * n for n in range(50)}
    assert done_threads == {threading.current_thread()}


@pytest.mark.parametrize("jobs", [1, 3])
def test_takes_items_from_the_iterator_only_as_workers_free_up(jobs):
    taken = 0
    finished = 0
    most_ahead = 0
    lock = threading.Lock()

    def items():
        nonlocal taken, most_ahead
        for n in range(40):
            with lock:
                taken += 1
                most_ahead = max(most_ahead, taken - finished)
            yield n

    def work(n: int) -> None:
        nonlocal finished
        time.sleep(0.002)
        with lock:
            finished += 1

    assert run_bounded(items(), work, jobs=jobs, what="sleeping") == 40
    # One more item than the bound can be taken before the queue is seen full.
    assert most_ahead <= QUEUE_PER_JOB * jobs + 1


def test_stop_request_lets_items_in_flight_finish_and_drops_the_rest():
    started: list[int] = []
    stop = threading.Event()

    def work(n: int) -> int:
        started.append(n)
        if n == 5:
            stop.set()
        time.sleep(0.005)
        return n

    finished: list[int] = []
    with pytest.raises(errors.Interrupted, match=r"stopped while copying after \d+ of 1000"):
        run_bounded(
            range(1000),
            work,
            jobs=2,
            what="copying",
            done=lambda n, _: finished.append(n),
            should_stop=stop.is_set,
        )
    assert len(started) < 20
    assert sorted(finished) == sorted(started)  # nothing started was abandoned


def test_failures_aggregate_into_the_first_with_every_field_kept():
    all_started = threading.Barrier(3)

    def work(n: int) -> int:
        all_started.wait(timeout=5)  # three items in flight, all of which fail
        raise errors.UploadError(f"PUT c/o{n}: 503", http_status=503, object_name=f"o{n}")

    with pytest.raises(errors.UploadError) as caught:
        run_bounded(range(3), work, jobs=3, what="uploading")
    error = caught.value
    assert error.exit_code == errors.EXIT_UPLOAD
    assert str(error) == f"PUT c/{error.object_name}: 503 (and 2 more failure(s) while uploading)"
    failed = [error, *error.also_failed]
    assert all(type(e) is errors.UploadError and e.http_status == 503 for e in failed)
    assert sorted(e.object_name for e in failed) == ["o0", "o1", "o2"]


def test_a_failure_stops_new_items_from_starting():
    started: list[int] = []

    def work(n: int) -> None:
        started.append(n)
        if n == 0:
            raise errors.FetchError("object 'a': 404", http_status=404, object_name="a")
        time.sleep(0.005)

    with pytest.raises(errors.FetchError, match="object 'a': 404$") as caught:
        run_bounded(range(1000), work, jobs=2, what="fetching")
    assert caught.value.also_failed == []
    assert len(started) <= QUEUE_PER_JOB * 2 + 1


def test_an_unexpected_exception_is_raised_unchanged():
    failure = ZeroDivisionError("a bug")

    def work(n: int) -> None:
        raise failure

    with pytest.raises(ZeroDivisionError) as caught:
        run_bounded([1, 2, 3], work, jobs=2, what="dividing")
    assert caught.value is failure


def test_a_failing_done_callback_stops_the_pool_like_a_failed_item():
    def done(item: int, _result: None) -> None:
        raise errors.ConversionError(f"item {item} is bad", object_name=str(item))

    pool = BoundedPool(lambda n: None, jobs=2, what="checking", done=done)
    with pytest.raises(errors.ConversionError):
        pool.run(range(100))
    assert pool.completed < 100


def test_refuses_a_pool_without_workers():
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        BoundedPool(lambda n: n, jobs=0, what="nothing")
