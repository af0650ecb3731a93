"""Server settings: limits, API key, CORS. Each can come from the environment (LOGRA_*), so a
container or a process manager configures the server without code. Values given to the constructor
(the command line's flags) win over the environment; a bad value is reported by its variable's name."""
from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "LOGRA_"
_SECRET = frozenset({"api_key"})  # never echoed in an error message


class SettingsError(ValueError):
    """One line per bad setting, each naming its environment variable (or the argument given)."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


class ServerSettings(BaseSettings):
    # empty variables count as unset (LOGRA_API_KEY= means no key, as before)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True)

    max_body_bytes: int = Field(8 * 2**20, ge=1)  # two 1M-character texts, JSON-escaped, fit
    # answered with 503 past this; the computation itself finishes in its thread
    request_timeout_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    # /attribute, /attribute/tokens, /documents and /index need it when set; admin endpoints always do
    api_key: str | None = Field(None, repr=False)
    # empty: no CORS headers (same-origin only). LOGRA_CORS_ORIGINS: comma-separated, or a JSON list
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_value_queries: int = Field(256, ge=1)  # POST /value: queries per request at most (each costs a gradient pass)
    # slow requests (token views, valuations): this many compute at once, this many more wait (api.lanes)
    heavy_running: int = Field(1, ge=1)
    heavy_queued: int = Field(2, ge=0)
    # on SIGTERM/SIGINT: new slow requests get 503, those in flight get this long, then the process exits (api.shutdown)
    shutdown_timeout_s: float = Field(20.0, gt=0, allow_inf_nan=False)

    @field_validator("api_key")
    @classmethod
    def _key_long_enough(cls, key: str | None) -> str | None:
        if key is not None and len(key) < 16:
            raise ValueError("an API key needs at least 16 characters")
        return key

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: Any) -> Any:
        """`https://a.example,https://b.example` (what users set) or a JSON list."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON list ({e.msg})") from None
        return [v.strip() for v in value.split(",") if v.strip()]

    @classmethod
    def from_env(cls, **overrides) -> "ServerSettings":
        """The environment's settings with `overrides` (those not None) on top; SettingsError if any is bad."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as e:
            raise SettingsError(describe(e, given)) from None


def describe(error: ValidationError, given: dict) -> str:
    """`LOGRA_MAX_BODY_BYTES='abc': Input should be a valid integer, ...`, one clause per bad value."""
    parts = []
    for err in error.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        name = (field if field in given else env_name(field)) + "".join(f"[{i}]" for i in err["loc"][1:])
        reason = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        parts.append(f"{name}: {reason}" if field in _SECRET else f"{name}={err['input']!r}: {reason}")
    return "invalid server setting: " + "; ".join(parts)
