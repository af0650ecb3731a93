"""Keeping slow requests from stalling fast ones.

Gradient passes run one at a time (the engine's hooks live on modules the passes share), so a token
view (one pass per few copies of a long response) or a valuation (one pass per batch of queries)
used to hold every /attribute query behind it. Two mechanisms fix that:

- `PassLock`: /attribute's passes go first. A heavy request takes the lock one small batch at a
  time, only while no query pass is waiting and once the last query pass ended at least one heavy
  batch's time ago (or after waiting 4 such times for that gap): a query rarely meets a heavy batch,
  and then waits for at most one.
- `HeavyLane`: at most `running` heavy requests compute at once and `queued` wait; any more are
  refused at once (`Busy`: 503 with Retry-After) instead of joining a queue without end.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

RETRY_AFTER_S = 5
HEAVY_PATIENCE = 4  # a heavy batch waits for a gap between queries at most this many of its own durations


class Busy(RuntimeError):
    """The heavy lane is full."""


class PassLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._fast_waiting = 0
        self._fast_done = float("-inf")  # when the last query pass ended
        self._heavy_took = 0.0  # how long the last heavy batch held the lock

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
            with self._cond:
                self._busy = False
                self._fast_done = time.monotonic()
                self._cond.notify_all()

    @contextmanager
    def heavy(self) -> Iterator[None]:
        """One batch of a heavy request: only while no query pass waits and, while queries keep
        coming, after the lock has been free of them for as long as a heavy batch takes (at most
        HEAVY_PATIENCE batches' time: a slow request is slowed, never starved)."""
        with self._cond:
            give_up = time.monotonic() + HEAVY_PATIENCE * self._heavy_took
            while True:
                now = time.monotonic()
                quiet = now - self._fast_done
                if not self._busy and not self._fast_waiting and (quiet >= self._heavy_took or now >= give_up):
                    break
                self._cond.wait(timeout=max(1e-3, min(self._heavy_took - quiet, give_up - now)))
            self._busy = True
        started = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._heavy_took = time.monotonic() - started
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
