"""`python -m api --index DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16]`."""
from __future__ import annotations

import argparse
import sys

from indexer.store import IndexFormatError

from .app import create_app
from .batching import MAX_BATCH
from .search import HIGH_DEPTH, KEYWORD_DEPTH, ModelMismatchError
from .settings import ServerSettings
from .shutdown import serve


def _positive(kind):
    """An argparse type: a bad flag value names the flag (a bad LOGRA_* value names the variable)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" for non-numbers
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m api", description="Serve a logra-search index over HTTP.")
    env = {name: ServerSettings.model_fields[name].default for name in ("max_body_bytes", "request_timeout_s",
                                                                        "shutdown_timeout_s")}
    ap.add_argument("--index", required=True, help="index folder built by `python -m indexer build`")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                        "only; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    ap.add_argument("--model", default=None, help="serve with this model path/name instead of the manifest's")
    ap.add_argument("--device", default="cpu", help="where query gradients are computed: cpu, cuda, cuda:N or "
                                                    "auto (default cpu)")
    ap.add_argument("--max-body-bytes", type=_positive(int), default=None,
                    help=f"413 above this (default {env['max_body_bytes']:,}; LOGRA_MAX_BODY_BYTES)")
    ap.add_argument("--request-timeout", type=_positive(float), default=None,
                    help=f"seconds before a request is answered 503 (default {env['request_timeout_s']:g}; "
                         "LOGRA_REQUEST_TIMEOUT_S)")
    ap.add_argument("--shutdown-timeout", type=_positive(float), default=None,
                    help="on SIGTERM, seconds that slow requests in flight get before the server exits "
                         f"(default {env['shutdown_timeout_s']:g}; LOGRA_SHUTDOWN_TIMEOUT_S)")
    ap.add_argument("--cors-origin", action="append", default=None, dest="cors_origins",
                    help="allow browser pages from this origin (repeatable; default none; LOGRA_CORS_ORIGINS)")
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH,
                    help=f"at most this many concurrent /attribute queries share one gradient pass (1: no "
                         f"batching; default {MAX_BATCH})")
    ap.add_argument("--high-depth", type=int, default=HIGH_DEPTH,
                    help=f"precision high rescores the compact vectors' top max(k, this) documents (default {HIGH_DEPTH})")
    ap.add_argument("--keyword-depth", type=int, default=KEYWORD_DEPTH,
                    help=f"precision high also rescores this many of a keyword (BM25) search's best documents "
                         f"(0: none; default {KEYWORD_DEPTH})")
    args = ap.parse_args(argv)
    if args.keyword_depth < 0:
        ap.error("--keyword-depth must be at least 0")
    if args.max_batch < 1 or args.high_depth < 1:
        ap.error("--max-batch and --high-depth must be at least 1")
    try:
        # The API key comes only from LOGRA_API_KEY: a command line is visible to every user of the machine.
        # The flags given win over the environment; a bad LOGRA_* value is a SettingsError (a ValueError) naming it.
        settings = ServerSettings.from_env(max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
                                           cors_origins=args.cors_origins, shutdown_timeout_s=args.shutdown_timeout)
        app = create_app(args.index, model=args.model, device=args.device, settings=settings,
                         max_batch=args.max_batch, high_depth=args.high_depth,
                         keyword_depth=args.keyword_depth)
    except (IndexFormatError, ModelMismatchError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {args.index} on http://{args.host}:{args.port}/", flush=True)
    return serve(app, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
