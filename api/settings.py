"""Server settings: limits, API key, CORS. Each can come from the environment (LOGRA_*), so a
container or a process manager configures the server without code."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


@dataclass(frozen=True)
class ServerSettings:
    max_body_bytes: int = 8 * 2**20  # two 1M-character texts, JSON-escaped, fit
    request_timeout_s: float = 60.0  # answered with 503 past this; the computation itself finishes in its thread
    # /attribute, /attribute/tokens, /documents and /index need it when set; admin endpoints always do
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers (same-origin only)
    max_value_queries: int = 256  # POST /value: queries per request at most (each costs a gradient pass)
    # slow requests (token views, valuations): this many compute at once, this many more wait (api.lanes)
    heavy_running: int = 1
    heavy_queued: int = 2

    def __post_init__(self):
        if (self.max_body_bytes < 1 or self.request_timeout_s <= 0 or self.max_value_queries < 1 or self.heavy_running < 1
                or self.heavy_queued < 0):
            raise ValueError("max_body_bytes, request_timeout_s, max_value_queries and heavy_running must be positive, "
                             "heavy_queued at least 0")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ValueError("an API key needs at least 16 characters")

    @classmethod
    def from_env(cls, **overrides) -> "ServerSettings":
        env = {"max_body_bytes": int(os.environ.get("LOGRA_MAX_BODY_BYTES", cls.max_body_bytes)),
               "request_timeout_s": float(os.environ.get("LOGRA_REQUEST_TIMEOUT_S", cls.request_timeout_s)),
               "api_key": os.environ.get("LOGRA_API_KEY") or None,
               "cors_origins": _env_list("LOGRA_CORS_ORIGINS"),
               "max_value_queries": int(os.environ.get("LOGRA_MAX_VALUE_QUERIES", cls.max_value_queries)),
               "heavy_running": int(os.environ.get("LOGRA_HEAVY_RUNNING", cls.heavy_running)),
               "heavy_queued": int(os.environ.get("LOGRA_HEAVY_QUEUED", cls.heavy_queued))}
        return cls(**{**env, **{k: v for k, v in overrides.items() if v is not None}})
