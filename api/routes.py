"""HTTP endpoints. The Attributor comes from app state through a dependency."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from .schemas import AttributeRequest, AttributeResponse, AttributeResult, Document, Health, QueryInfo
from .search import Attributor, QueryError

router = APIRouter()
STATIC = Path(__file__).parent / "static"


def get_attributor(request: Request) -> Attributor:
    return request.app.state.attributor


@router.post("/attribute", response_model=AttributeResponse)
def attribute(body: AttributeRequest, att: Attributor = Depends(get_attributor)) -> AttributeResponse:
    started = time.perf_counter()
    try:
        hits, info = att.attribute(body.prompt, body.response, body.k, body.mode)
    except QueryError as e:
        raise HTTPException(status_code=422, detail=str(e)) from e
    docs = att.index.documents([h.row for h in hits])
    results = [AttributeResult(rank=i + 1, id=d["id"], score=h.score, text=d["text"], metadata=d["metadata"],
                               source=d["source"], line=d["line"]) for i, (h, d) in enumerate(zip(hits, docs))]
    return AttributeResponse(results=results, mode=body.mode, k=body.k, n_documents=len(att.index),
                             query=QueryInfo(**info), took_ms=round((time.perf_counter() - started) * 1000, 2))


@router.get("/documents/{doc_id:path}", response_model=Document)
def document(doc_id: str, att: Attributor = Depends(get_attributor)) -> Document:
    doc = att.document(doc_id)
    if doc is None:
        raise HTTPException(status_code=404, detail=f"no document with id {doc_id!r}")
    return Document(**{k: doc[k] for k in Document.model_fields})


@router.get("/health", response_model=Health)
def health(att: Attributor = Depends(get_attributor)) -> Health:
    return Health(status="ok", n_documents=len(att.index), model=att.model_name)


@router.get("/index")
def index_manifest(att: Attributor = Depends(get_attributor)) -> dict:
    return att.index.manifest


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")
