"""HTTP API and browsing page: `python -m api --index DIR`, or `create_app(index_dir)`."""
from .app import create_app

__all__ = ["create_app"]
