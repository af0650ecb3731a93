"""HTTP endpoints. The Attributor comes from app state through a dependency."""
from __future__ import annotations

import time
from pathlib import Path

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import MAX_TOKENS_SCORED

from .auth import require_admin_key, require_api_key
from indexer.query.value import report_csv

from .schemas import (AttributeRequest, AttributeResponse, AttributeResult, Document, Health, QueryInfo, Reloaded,
                      TokenRequest, TokenResponse, TokenScore, ValueRequest, ValueResponse)
from .search import Attributor

router = APIRouter()  # open to all: health, metrics, the page
data = APIRouter(dependencies=[Depends(require_api_key)])  # the index's contents: the API key when one is set
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)])
STATIC = Path(__file__).parent / "static"


def get_attributor(request: Request) -> Attributor:
    return request.app.state.attributor


# QueryError (422) and UnknownDocument (404) are mapped to HTTP by the app's exception handlers (api.app).
AttributorDep = Annotated[Attributor, Depends(get_attributor)]


@data.post("/attribute", response_model=AttributeResponse)
def attribute(body: AttributeRequest, att: AttributorDep) -> AttributeResponse:
    started = time.perf_counter()
    hits, docs, info = att.attribute(body.prompt, body.response, body.k, body.mode, body.direction, body.where,
                                     body.precision, messages=body.chat)
    n_documents, precision = info.pop("n_documents"), info.pop("precision")
    results = [AttributeResult(rank=i + 1, id=d["id"], score=h.score, stage=h.stage, text=d["text"], prompt=d["prompt"] or "",
                               metadata=d["metadata"], source=d["source"], line=d["line"])
               for i, (h, d) in enumerate(zip(hits, docs))]
    return AttributeResponse(results=results, mode=body.mode, precision=precision, direction=body.direction, k=body.k,
                             n_documents=n_documents,
                             query=QueryInfo(**info), took_ms=round((time.perf_counter() - started) * 1000, 2))


@data.post("/attribute/tokens", response_model=TokenResponse)
def attribute_tokens(body: TokenRequest, att: AttributorDep) -> TokenResponse:
    """Split one document's score over the response's tokens."""
    ts = att.token_scores(body.prompt, body.response, body.id, body.mode, precision=body.precision, messages=body.chat)
    return TokenResponse(id=body.id, mode=body.mode, tokens=[TokenScore(text=t, score=s) for t, s in zip(ts.texts, ts.scores)],
                         total=ts.total, document_score=ts.document_score, truncated=ts.truncated,
                         n_scored_tokens=ts.n_scored, max_tokens_scored=MAX_TOKENS_SCORED)


@data.post("/value", response_model=ValueResponse, responses={200: {"content": {"text/csv": {}}}})
def value(body: ValueRequest, request: Request, att: AttributorDep):
    """What each group of documents (by metadata fields) was worth over a set of queries: the same
    report as `python -m indexer value` for the same queries and options."""
    started = time.perf_counter()
    limit = request.app.state.settings.max_value_queries
    if len(body.queries) > limit:
        raise HTTPException(status_code=422, detail=f"{len(body.queries)} queries; this server values at most {limit} "
                            "per request (LOGRA_MAX_VALUE_QUERIES; `python -m indexer value` has no limit)")
    report = att.value([q.chat or (q.prompt, q.response) for q in body.queries], body.group_by, body.mode,
                       body.precision, body.top, body.bootstrap, body.seed)
    if body.format == "csv":
        return Response(report_csv(report), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="value.csv"'})
    return ValueResponse(**report, took_ms=round((time.perf_counter() - started) * 1000, 2))


@data.get("/documents", response_model=Document)
def document_by_query(id: str, att: AttributorDep) -> Document:  # noqa: A002
    """The same as /documents/{id}, for ids a URL path cannot carry ("." and "..": clients remove them)."""
    return document(id, att)


@data.get("/documents/{doc_id:path}", response_model=Document)
def document(doc_id: str, att: AttributorDep) -> Document:
    doc = att.document(doc_id)
    if doc is None:
        raise HTTPException(status_code=404, detail=f"no document with id {doc_id!r}")
    return Document(**{k: doc[k] for k in Document.model_fields})


@router.get("/health", response_model=Health, responses={503: {"description": "the server is shutting down"}})
def health(request: Request, att: AttributorDep) -> Health:
    """503 once the server is stopping (api.shutdown), so a load balancer sends no more work here."""
    if request.app.state.heavy_lane.draining:
        raise HTTPException(status_code=503, detail="the server is shutting down: send requests to another replica")
    return Health(status="ok", n_documents=len(att.index), model=att.model_name)


@data.get("/index")
def index_manifest(att: AttributorDep) -> dict:
    return att.index.manifest.to_json()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format: requests by route and status, latencies, index size."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@admin.post("/reload", response_model=Reloaded)
def reload(att: AttributorDep) -> Reloaded:
    """Open the index folder again now if it was replaced (requests also notice it by themselves)."""
    reloaded = att.reload()
    return Reloaded(reloaded=reloaded, n_documents=len(att.index))


# The page loads only its own files; document text is rendered as text, and this is a second line.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> FileResponse:
    """Browsers ask for it whatever the page says: an answer keeps their consoles clean."""
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


@router.get("/", include_in_schema=False)
@router.get("/ui/document", include_in_schema=False)
@router.get("/ui/value", include_in_schema=False)
def page() -> FileResponse:
    """The browsing page; /ui/document?id=... is its document view and /ui/value its value view (the
    same file, routed in the page)."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)
