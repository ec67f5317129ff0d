"""What the web server runs at once: a memory budget for decoding, and micro-batched inference.

Both are plain threads and locks, with no knowledge of HTTP, so they can be tested on their own.

- :class:`MemoryBudget` admits work by its estimated size in bytes: a thread reserves what its
  decode will hold at its peak and waits while the reservations of others would push the total
  over the budget. One job larger than the whole budget still runs, alone, so nothing waits
  forever (the caller's own size limits bound how large a job can be).
- :class:`MicroBatcher` collects items submitted from any number of threads and hands them, as one
  list, to a function running in one of ``workers`` worker threads: one forward pass per batch
  instead of one per request. A batch is whatever is waiting when a worker comes free, topped up for
  at most ``max_wait_s`` after its first item, up to ``max_batch`` items; under load the queue fills
  while the previous batches run, so the wait rarely matters, and an idle server adds at most
  ``max_wait_s`` latency.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MemoryBudget:
    """A counting semaphore in bytes; ``peak`` is the most ever reserved at once."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the memory budget must be positive, not {budget_bytes}")
        self.budget = budget_bytes
        self.reserved = 0
        self.peak = 0
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block, waiting until they fit."""
        with self._changed:
            self._changed.wait_for(lambda: self.reserved == 0 or self.reserved + nbytes <= self.budget)
            self.reserved += nbytes
            self.peak = max(self.peak, self.reserved)
        try:
            yield
        finally:
            with self._changed:
                self.reserved -= nbytes
                self._changed.notify_all()


class MicroBatcher(Generic[T, R]):
    """Runs ``run_batch`` (a list of items → one result per item) in ``workers`` worker threads."""

    _STOP = object()

    def __init__(
        self, run_batch: Callable[[list[T]], Sequence[R]], *, max_batch: int, max_wait_s: float,
        workers: int = 1, name: str = "micro-batcher",
    ) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError(f"max_batch and workers must be at least 1, not {max_batch} and {workers}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        #: How many batches of each size have run.
        self.batch_sizes: Counter[int] = Counter()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sizes_lock = threading.Lock()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: T) -> Future[R]:
        """A future of ``item``'s result; it carries ``run_batch``'s exception if the batch failed."""
        if self._stopping:
            raise RuntimeError("the micro-batcher is closed")
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then stop the worker threads."""
        self._stopping = True
        for _ in self._threads:
            self._queue.put(self._STOP)
        for thread in self._threads:
            thread.join(timeout)

    def _collect(self) -> tuple[list[tuple[T, Future[R]]], bool]:
        """The next batch, and whether the stop signal came with it."""
        first = self._queue.get()
        if first is self._STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is self._STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            # A future cancelled by its waiter needs no result.
            batch = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
            if not batch:
                continue
            with self._sizes_lock:
                self.batch_sizes[len(batch)] += 1
            try:
                results = self.run_batch([item for item, _ in batch])
            except BaseException as err:  # noqa: BLE001 - handed to every waiter, not swallowed
                for _, future in batch:
                    future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
