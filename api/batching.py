"""Micro-batching: queries that arrive together share one forward and backward pass.

There is no worker thread. A request thread enqueues its job and, when no pass is running, leads
one: it waits up to `max_wait_s` for more jobs (until `max_batch` are queued; only while passes are
being shared, so a lone client never waits), takes up to
`max_batch` of those keyed the same as the oldest one, runs them through one call and hands each
job its own result. The others wait; when the pass ends, a thread whose job is still queued leads
the next. Jobs of different keys (here: different opened indexes, across a hot reload) never share
a call. If a batched call raises, each of its jobs is run again alone, so a bad job fails by itself.

Batching cannot change a result as long as the computation treats the rows of a batch
independently, which per-example gradients with eager attention and masked padding do
(tests/test_batching.py checks it against lone answers)."""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Callable, Generic, Sequence, TypeVar

__all__ = ["BatchStats", "MicroBatcher"]

I = TypeVar("I")
R = TypeVar("R")


class _Job:
    __slots__ = ("key", "item", "done", "result", "error")

    def __init__(self, key, item):
        self.key, self.item = key, item
        self.done, self.result, self.error = False, None, None


class BatchStats:
    """Counters of a MicroBatcher (for /metrics): jobs submitted, passes (calls of the batched
    function, the lone reruns after a failed batch included) and how many passes had each size."""

    def __init__(self, max_batch: int):
        self._lock = threading.Lock()
        self.max_batch = max_batch
        self.jobs = 0
        self.passes = 0
        self.failed_batches = 0  # batched calls that raised (their jobs were then run alone)
        self.sizes: Counter[int] = Counter()

    def _count_job(self) -> None:
        with self._lock:
            self.jobs += 1

    def _record(self, size: int) -> None:
        with self._lock:
            self.passes += 1
            self.sizes[size] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"max_batch": self.max_batch, "jobs": self.jobs, "passes": self.passes,
                    "failed_batches": self.failed_batches,
                    "mean_batch": round(sum(s * c for s, c in self.sizes.items()) / self.passes, 3) if self.passes else 0.0,
                    "sizes": dict(sorted(self.sizes.items()))}


# Concurrent queries sharing one gradient pass, at most (the server's --max-batch default): 1.4-1.6x the
# throughput of one pass per query on the project's CPU machine (docs/benchmarks.md "Serving").
MAX_BATCH = 16


class MicroBatcher(Generic[I, R]):
    """`run(key, items) -> results` (one result per item, same order) called on batches of items
    submitted from many threads; jobs batch together only when their keys are the same object. `submit` blocks until its own result is ready and returns it (or
    raises the error its item raised)."""

    def __init__(self, run: Callable[[object, Sequence[I]], Sequence[R]], max_batch: int = MAX_BATCH,
                 max_wait_s: float = 0.002, always_wait: bool = False):
        """`always_wait`: wait `max_wait_s` before every pass, even when no pass has been shared
        lately (tests use it to batch a burst deterministically)."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s if max_batch > 1 else 0.0
        self.stats = BatchStats(max_batch)
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._busy = False  # a pass is running (one at a time)
        self._always_wait = always_wait
        self._shared = False  # the last pass took several jobs or left some queued

    def submit(self, key: object, item: I) -> R:
        job = _Job(key, item)
        self.stats._count_job()
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()  # a leader waiting for more jobs counts this one
        while True:
            with self._cond:
                while self._busy and not job.done:
                    self._cond.wait()
                if job.done:
                    break
                # No pass running and this job is still queued (jobs leave the queue only into a
                # pass, which marks them done before it ends): lead the next pass.
                self._busy = True
                batch = self._take()
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _take(self) -> list[_Job]:
        """Called holding the condition, with a non-empty queue: maybe wait a moment for more jobs, then
        take the oldest job and up to max_batch - 1 later ones of the same key."""
        # Waiting only pays when other requests are coming: a lone client would pay it every time.
        # So wait only while passes are being shared (the last one took several jobs or left some).
        deadline = time.monotonic() + (self.max_wait_s if self._shared or self._always_wait else 0.0)
        while len(self._queue) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        key = self._queue[0].key
        batch: list[_Job] = []
        others: list[_Job] = []
        while self._queue and len(batch) < self.max_batch:
            job = self._queue.popleft()
            (batch if job.key is key else others).append(job)
        self._queue.extendleft(reversed(others))  # skipped jobs keep their place at the front
        self._shared = len(batch) > 1 or bool(self._queue)
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        """Run the batch; every job ends done, with a result or its own error. Never raises."""
        try:
            results = self._run(batch[0].key, [j.item for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batched call returned {len(results)} results for {len(batch)} items")
        except BaseException as e:  # noqa: BLE001  (handed to the waiting request, not swallowed)
            self.stats._record(len(batch))
            if len(batch) == 1:
                batch[0].error, batch[0].done = e, True
                return
            with self.stats._lock:
                self.stats.failed_batches += 1
            for job in batch:  # each alone: only the job that fails gets an error
                self._execute([job])
            return
        self.stats._record(len(batch))
        for job, result in zip(batch, results):
            job.result, job.done = result, True
