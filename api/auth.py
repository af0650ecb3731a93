"""API key checks. With `ServerSettings.api_key` set, the data endpoints need it; admin endpoints
always need it (and are off when no key is set). Sent as `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
from __future__ import annotations

import secrets

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="the server's API key (LOGRA_API_KEY)")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key (LOGRA_API_KEY)")


def _check(expected: str, bearer: HTTPAuthorizationCredentials | None, header: str | None) -> None:
    given = bearer.credentials if bearer is not None else header
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status_code=401, detail="a valid API key is required: Authorization: Bearer KEY, or X-API-Key: KEY",
                            headers={"WWW-Authenticate": "Bearer"})


def require_api_key(request: Request, bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
                    header: str | None = Security(_header)) -> None:
    expected = request.app.state.settings.api_key
    if expected is not None:
        _check(expected, bearer, header)


def require_admin_key(request: Request, bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
                      header: str | None = Security(_header)) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        raise HTTPException(status_code=403, detail="admin endpoints are off: start the server with LOGRA_API_KEY set")
    _check(expected, bearer, header)
