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

When the server stops (api.shutdown), `HeavyLane.drain` refuses every new heavy request and gives
those in flight a bound: past it, one still waiting gives up at once and one computing stops at its
next batch (`checkpoint`), both answered 503 (`ShuttingDown`).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

RETRY_AFTER_S = 5
WAIT_POLL_S = 0.05  # a waiting heavy request checks this often whether a shutdown has cut it
HEAVY_PATIENCE = 4  # a heavy batch waits for a gap between queries at most this many of its own durations


class Busy(RuntimeError):
    """The heavy lane is full."""


class ShuttingDown(Busy):
    """The server is stopping: a new heavy request is refused, or one in flight ran past the bound."""


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
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._bound_s: float | None = None  # set by drain()
        self._cut_at = float("inf")  # when requests still in flight are stopped (time.monotonic())

    @property
    def in_flight(self) -> int:
        """Heavy requests running or waiting now."""
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._bound_s is not None

    def drain(self, bound_s: float, cut_at: float | None = None) -> None:
        """Refuse new heavy requests from now on; stop those in flight at `cut_at` (a time.monotonic()
        time; default `bound_s` seconds from now)."""
        if self._bound_s is None:
            self._bound_s = bound_s  # first: checkpoint's message reads it once the cut time has passed
            self._cut_at = time.monotonic() + bound_s if cut_at is None else cut_at

    def checkpoint(self) -> None:
        """Called between the batches of a heavy request: ShuttingDown once the drain's bound has passed."""
        if time.monotonic() >= self._cut_at:
            raise ShuttingDown(f"the server is shutting down and stopped this request at its bound of {self._bound_s:g} s "
                               "(LOGRA_SHUTDOWN_TIMEOUT_S); send it again, to another replica or once the server is back")

    def _count(self, change: int) -> None:
        with self._count_lock:
            self._in_flight += change

    @contextmanager
    def enter(self, what: str) -> Iterator[None]:
        if self.draining:
            raise ShuttingDown(f"the server is shutting down and takes no new slow requests (this {what}); send it "
                               "to another replica or once the server is back")
        if not self._admitted.acquire(blocking=False):
            raise Busy(f"{self.running + self.queued} slow requests ({what}: token views, valuations) are already "
                       f"running or waiting; try again in {RETRY_AFTER_S} s")
        self._count(1)
        try:
            while not self._running.acquire(timeout=WAIT_POLL_S):  # a drain's bound ends the wait
                self.checkpoint()
            try:
                self.checkpoint()  # the bound may have passed just as its turn came
                yield
            finally:
                self._running.release()
        finally:
            self._count(-1)
            self._admitted.release()
