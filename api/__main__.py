"""`python -m api --index DIR [--host 127.0.0.1] [--port 8000]`."""
from __future__ import annotations

import argparse
import sys

import uvicorn

from indexer.store import IndexFormatError

from .app import create_app
from .search import ModelMismatchError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m api", description="Serve a logra-search index over HTTP.")
    ap.add_argument("--index", required=True, help="index folder built by `python -m indexer build`")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default=None, help="serve with this model path/name instead of the manifest's")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        app = create_app(args.index, model=args.model, device=args.device)
    except (IndexFormatError, ModelMismatchError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.index} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
