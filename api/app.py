"""The FastAPI application factory."""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import MAX_BATCH
from .lanes import RETRY_AFTER_S, Busy, HeavyLane
from .limits import RequestLimits
from .metrics import Metrics, MetricsMiddleware
from .routes import STATIC, admin, data, router
from .search import HIGH_DEPTH, KEYWORD_DEPTH, Attributor, IndexUnavailable, QueryError, UnknownDocument
from .settings import ServerSettings


class _AsciiJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default handler echoes the input back: a 1 MB response would come back in the error,
    # and a lone surrogate ("\ud800" is valid JSON) fails to encode, a 500. Drop the input and
    # render escaped ASCII.
    errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken:
        where = broken["loc"][1] if len(broken.get("loc", ())) > 1 else "?"
        return _AsciiJSONResponse(status_code=422, content={"detail": f"the body is not valid JSON: "
                                                                      f"{broken.get('ctx', {}).get('error', broken['msg'])} at position {where}"})
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and any(e.get("loc") == ("body",) for e in errors):
        return _AsciiJSONResponse(status_code=422, content={"detail": f"send the body as JSON with the header Content-Type: "
                                                                      f"application/json (got {kind or 'no Content-Type'})"})
    return _AsciiJSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's answer to a body it cannot parse says only that; say why (not UTF-8, or where the JSON breaks)."""
    detail = exc.detail
    if exc.status_code == 400 and detail == "There was an error parsing the body":
        body = await request.body()
        try:
            json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            detail = f"the body is not valid UTF-8 (byte 0x{body[e.start]:02x} at position {e.start}): send JSON encoded as UTF-8"
        except ValueError as e:
            detail = f"the body is not valid JSON: {e}"
    return _AsciiJSONResponse(status_code=exc.status_code, content={"detail": detail}, headers=getattr(exc, "headers", None))


async def _unavailable(request: Request, exc: IndexUnavailable) -> JSONResponse:
    return _AsciiJSONResponse(status_code=503, content={"detail": str(exc)})


async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
    return _AsciiJSONResponse(status_code=422, content={"detail": str(exc)})


async def _unknown_document(request: Request, exc: UnknownDocument) -> JSONResponse:
    return _AsciiJSONResponse(status_code=404, content={"detail": f"no document with id {exc.args[0]!r}"})


async def _busy(request: Request, exc: Busy) -> JSONResponse:
    return _AsciiJSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": str(RETRY_AFTER_S)})


def create_app(index_dir: str | Path, model: str | None = None, device: str = "cpu",
               settings: ServerSettings | None = None, max_batch: int = MAX_BATCH, high_depth: int = HIGH_DEPTH,
               keyword_depth: int = KEYWORD_DEPTH) -> FastAPI:
    """Open the index and load its model now, so a bad index or the wrong model fails at start-up,
    not on the first request. `model` overrides the manifest's model (e.g. a local copy).
    `settings`: limits, API key and CORS (default: from the LOGRA_* environment variables).
    `max_batch`: concurrent /attribute queries sharing one gradient pass, at most (1: no batching).
    `high_depth`: precision "high" rescores the compact vectors' top max(k, high_depth) documents, and
    `keyword_depth`: the best that many of a keyword search for the query's text besides (0: none)."""
    settings = settings or ServerSettings.from_env()
    lane = HeavyLane(settings.heavy_running, settings.heavy_queued)  # drained on shutdown (api.shutdown)
    attributor = Attributor(index_dir, model=model, device=device, max_batch=max_batch, high_depth=high_depth,
                            keyword_depth=keyword_depth, heavy=lane)
    app = FastAPI(title="logra-search", version="0.1.0",
                  description="Which training documents made the model produce this response?")
    app.state.attributor, app.state.settings, app.state.heavy_lane = attributor, settings, lane
    app.state.metrics = Metrics(n_documents=lambda: len(attributor.index),
                                index_bytes=lambda: sum(p.stat().st_size for p in attributor.root.rglob("*") if p.is_file()),
                                batch_stats=lambda: attributor.batch_stats, slow_requests=lambda: lane.in_flight)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(IndexUnavailable, _unavailable)
    app.add_exception_handler(Busy, _busy)
    app.add_exception_handler(QueryError, _query_error)
    app.add_exception_handler(UnknownDocument, _unknown_document)
    for r in (router, data, admin):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Added last = outermost: metrics see every answer, the limits' 413 and 503 included.
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_body_bytes, timeout_s=settings.request_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app
