"""The one bounded thread pool that every step uses for its per-object work.

Few items are queued at a time (memory stays bounded for millions of objects),
a stop request lets the work in flight finish, and failures are aggregated into
the first one, which keeps its type and fields.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sized
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Generic, TypeVar

from . import errors

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Items submitted per worker thread: enough to keep every thread busy, few
# enough that a stop request is honoured within a few items.
QUEUE_PER_JOB = 2


class BoundedPool(Generic[T, R]):
    """Runs ``work(item)`` on ``jobs`` threads with at most ``QUEUE_PER_JOB * jobs``
    items submitted; ``done(item, result)`` runs in the caller's thread.
    """

    def __init__(
        self,
        work: Callable[[T], R],
        *,
        jobs: int,
        what: str,
        done: Callable[[T, R], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, not {jobs}")
        self.work = work
        self.jobs = jobs
        self.what = what
        self.done = done
        self.should_stop = should_stop or (lambda: False)
        self.completed = 0
        self.failures: list[BaseException] = []
        self.stopped = False
        self.total: int | None = None
        self._pending: dict[Future, T] = {}

    def run(self, items: Iterable[T]) -> int:
        """Runs every item; returns how many completed.

        Raises the first failure (see :func:`errors.aggregate`) once the items
        in flight have finished, and Interrupted when ``should_stop()`` became
        true; queued items that had not started are dropped in both cases.
        """
        self.total = len(items) if isinstance(items, Sized) else None
        iterator = iter(items)
        with ThreadPoolExecutor(self.jobs, thread_name_prefix=self.what.split()[0]) as executor:
            exhausted = False
            while True:
                if not exhausted:
                    exhausted = self._submit_more(executor, iterator)
                if self.stopped or self.failures:
                    self._cancel_queued()
                if not self._pending:
                    break
                self._collect_some()
        self._raise_outcome()
        return self.completed

    def _submit_more(self, executor: ThreadPoolExecutor, iterator: Iterator[T]) -> bool:
        """Fills the queue up to its bound; returns True once ``iterator`` is exhausted."""
        while (
            not (self.stopped or self.failures) and len(self._pending) < QUEUE_PER_JOB * self.jobs
        ):
            if self.should_stop():
                self.stopped = True
                return False
            try:
                item = next(iterator)
            except StopIteration:
                return True
            self._pending[executor.submit(self.work, item)] = item
        return False

    def _cancel_queued(self) -> None:
        """Drops the submitted items that have not started."""
        for future in list(self._pending):
            if future.cancel():
                del self._pending[future]

    def _collect_some(self) -> None:
        """Waits for at least one item, then records every finished one."""
        try:
            finished, _ = wait(list(self._pending), return_when=FIRST_COMPLETED)
        except KeyboardInterrupt:
            self._cancel_queued()  # only the running items finish
            raise
        for future in finished:
            item = self._pending.pop(future)
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                self.failures.append(error)
                continue
            self.completed += 1
            if self.done is not None:
                try:
                    self.done(item, future.result())
                except BaseException as exc:  # stops new items like a failed one
                    self.failures.append(exc)

    def _raise_outcome(self) -> None:
        if self.failures:
            raise errors.aggregate(self.failures, f"while {self.what}")
        if self.stopped:
            of_total = f" of {self.total}" if self.total is not None else ""
            raise errors.Interrupted(
                f"stopped while {self.what} after {self.completed}{of_total} item(s); run "
                f"the same command again to resume (finished work is kept)"
            )


def run_bounded(
    items: Iterable[T],
    work: Callable[[T], R],
    *,
    jobs: int,
    what: str,
    done: Callable[[T, R], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Runs ``work`` on every item in a :class:`BoundedPool`; returns how many completed."""
    pool = BoundedPool(work, jobs=jobs, what=what, done=done, should_stop=should_stop)
    return pool.run(items)
