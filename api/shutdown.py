"""Stopping `python -m api` within a bound: LOGRA_SHUTDOWN_TIMEOUT_S (default 20 s; --shutdown-timeout).

uvicorn alone, on SIGTERM, closes its listener at once and then waits for every request in flight
without a limit (its `timeout_graceful_shutdown` is None by default). Cancelling a request's task does
not stop the thread computing a token view, and the ones queued behind it start in turn: three token
views in flight kept a server up for 54 s. `timeout_graceful_shutdown` alone bounds the wait, but its
end cancels the requests without an answer (the client sees the connection close) and every request
sent meanwhile meets a closed port.

`DrainingServer`, on the first SIGTERM or SIGINT:
1. drains the heavy lane (api.lanes): a new slow request (token view, valuation) is answered 503
   with a message saying so, and /health 503; fast requests are still answered; the listener stays open.
2. Once no slow request is left, or the bound has passed (the lane then stops those in flight at
   their next batch and those waiting at once, each answered 503), it stops as uvicorn does: the
   listener closes (a new connection is refused) and the requests in flight get what is left of
   the bound plus FINISH_S to send their answers, then their tasks are cancelled.
3. uvicorn raises the signal again with its default action: the process ends (status -15, or 143
   in a shell, for SIGTERM) without waiting for threads still computing.
A second signal skips the drain (uvicorn's own handling, still bounded by the same timeout).
"""
from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from .lanes import HeavyLane

FINISH_S = 2.0  # after the bound: for requests stopped at their next batch to send their 503
STARTUP_FAILURE = 3  # uvicorn.run's exit status when the server never started

log = logging.getLogger("uvicorn.error")  # beside uvicorn's own "Shutting down" lines


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, lane: HeavyLane, bound_s: float):
        super().__init__(config)
        self.lane, self.bound_s = lane, bound_s
        self.signalled_at: float | None = None  # time.monotonic() of the first signal
        config.timeout_graceful_shutdown = bound_s + FINISH_S  # every way out is bounded, a second signal's too

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signalled_at is not None or self.should_exit:
            return super().handle_exit(sig, frame)
        self._captured_signals.append(sig)  # raised again by uvicorn once it has stopped
        # acted on by on_tick, on the event loop: a signal handler takes no lock
        self.signalled_at = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self.signalled_at is not None and not self.should_exit:
            left = self.signalled_at + self.bound_s - time.monotonic()
            if not self.lane.draining:
                self.lane.drain(self.bound_s, cut_at=self.signalled_at + self.bound_s)
                log.info("Draining: slow requests in flight: %d, stopped if still running %g s after the signal; "
                         "new ones are answered 503", self.lane.in_flight, self.bound_s)
            if self.lane.in_flight == 0 or left <= 0:
                if self.lane.in_flight:
                    log.warning("Shutdown bound of %g s reached: stopping the slow requests still in flight (%d)",
                                self.bound_s, self.lane.in_flight)
                self.config.timeout_graceful_shutdown = max(left, 0.0) + FINISH_S
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app: FastAPI, host: str, port: int) -> int:
    """Serve `app` (from api.create_app) until a signal, then stop within its settings' shutdown_timeout_s
    (see above). Returns 0, or STARTUP_FAILURE if the server never started."""
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info"), app.state.heavy_lane,
                            app.state.settings.shutdown_timeout_s)
    server.run()
    return 0 if server.started else STARTUP_FAILURE
