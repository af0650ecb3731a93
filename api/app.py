"""The FastAPI application factory."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .routes import STATIC, router
from .search import Attributor


def create_app(index_dir: str | Path, model: str | None = None, device: str = "cpu") -> FastAPI:
    """Open the index and load its model now, so a bad index or the wrong model fails at start-up,
    not on the first request. `model` overrides the manifest's model (e.g. a local copy)."""
    attributor = Attributor(index_dir, model=model, device=device)
    app = FastAPI(title="logra-search", version="0.1.0",
                  description="Which training documents made the model produce this response?")
    app.state.attributor = attributor
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
