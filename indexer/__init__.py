"""Datasets in, index folder out: `python -m indexer build|info|demo`."""
from .build import BuildConfig, build_index
from .records import BadRecordError, Record, read_records
from .store import Index, IndexFormatError

__all__ = ["BuildConfig", "build_index", "BadRecordError", "Record", "read_records", "Index", "IndexFormatError"]
