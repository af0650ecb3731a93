"""Keeping slow requests from stalling fast ones.

Gradient passes run one at a time (the engine's hooks live on modules the passes share), so a token
view (one pass per few copies of a long response) or a valuation (one pass per batch of queries)
used to hold every /attribute query behind it. Two mechanisms fix that:

- `PassLock`: /attribute's passes go first. A heavy request takes the lock one small batch at a
  time and only while no query pass is waiting, so it delays a query by at most one of its batches.
- `HeavyLane`: at most `running` heavy requests compute at once and `queued` wait; any more are
  refused at once (`Busy`: 503 with Retry-After) instead of joining a queue without end.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

RETRY_AFTER_S = 5


class Busy(RuntimeError):
    """The heavy lane is full."""


class PassLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._fast_waiting = 0

    @contextmanager
    def fast(self) -> Iterator[None]:
        """One query pass (/attribute): ahead of every heavy batch waiting."""
        with self._cond:
            self._fast_waiting += 1
            while self._busy:
                self._cond.wait()
            self._fast_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def heavy(self) -> Iterator[None]:
        """One batch of a heavy request: only while no query pass waits."""
        with self._cond:
            while self._busy or self._fast_waiting:
                self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class HeavyLane:
    def __init__(self, running: int = 1, queued: int = 2):
        if running < 1 or queued < 0:
            raise ValueError("a heavy lane needs running >= 1 and queued >= 0")
        self.running, self.queued = running, queued
        self._admitted = threading.BoundedSemaphore(running + queued)
        self._running = threading.BoundedSemaphore(running)

    @contextmanager
    def enter(self, what: str) -> Iterator[None]:
        if not self._admitted.acquire(blocking=False):
            raise Busy(f"{self.running + self.queued} slow requests ({what}: token views, valuations) are already "
                       f"running or waiting; try again in {RETRY_AFTER_S} s")
        try:
            with self._running:
                yield
        finally:
            self._admitted.release()
