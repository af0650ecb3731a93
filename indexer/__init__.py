"""Datasets in, index folder out: `python -m indexer build|info|demo`."""
import os

# libgomp (torch's and FAISS's OpenMP) keeps its idle worker threads spinning for ~300k iterations
# after each parallel region. The index pass runs many small ops, so under another process's CPU
# load those spins take the time slices the working threads need (a build 7.7x slower loaded, a
# training epoch 5x). A short spin keeps the quiet speed (benchmarks/indexing.py, build_vs_epoch).
# libgomp reads it once, when torch loads: so here, before any import (`python -m indexer` imports
# this package first); a user's own setting wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .build import BuildConfig, build_index  # noqa: E402
from .records import BadRecordError, Record, read_records  # noqa: E402
from .store import Index, IndexFormatError  # noqa: E402

__all__ = ["BuildConfig", "build_index", "BadRecordError", "Record", "read_records", "Index", "IndexFormatError"]
