"""Turn dataset files (JSON Lines, optionally gzipped, and Parquet) into `Record`s,
streaming: one line or one Parquet batch is in memory at a time, plus the set of
ids already seen, which duplicate detection needs. Every record, whatever its
format, goes through one function (`_to_record`) that checks it and builds the
`Record`; a bad one raises `BadRecordError` naming the file and line (or row), or
is skipped and counted when the caller asks for that.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import glob
import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["Record", "BadRecordError", "Formatter", "TextFormatter", "ReadStats", "expand_inputs", "read_records",
           "source_identity",
           "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")
PARQUET_BATCH_ROWS = 1024
DEFAULT_ID_FIELD = "id"
# An --id-field other than the default that none of the first ID_FIELD_CHECK records has is a mistake
# (a typo would silently give every document a generated id): an error, not a warning.
ID_FIELD_CHECK = 100
MAX_REASONS = 20
_MAX_FIELDS_LISTED = 10


@dataclass(frozen=True)
class Record:
    id: str
    text: str  # what the model sees: prompt + response, concatenated as is
    prompt: str  # "" for plain documents; else text.startswith(prompt)
    metadata: dict  # every other field, JSON-serialisable
    source: str  # the file path as given
    line: int  # 1-based line (JSON Lines) or row (Parquet)


class BadRecordError(ValueError):
    """A record that cannot be indexed; the message names the file and line/row."""

    def __init__(self, message: str, *, source: str | None = None,
                 line: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.source = source
        self.line = line
        self.reason = reason


@dataclass
class ReadStats:
    read: int = 0  # records yielded
    skipped: int = 0  # bad records skipped (skip_bad=True)
    skipped_reasons: list[str] = field(default_factory=list)  # first MAX_REASONS messages

    def _skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.skipped_reasons) < MAX_REASONS:
            self.skipped_reasons.append(message)


class _Bad(Exception):
    """Internal: why one record was rejected (location added by the caller)."""


@dataclass(frozen=True)
class _Fields:
    text: str
    prompt: str | None
    response: str | None
    id: str
    messages: str = "messages"

    @property
    def excluded(self) -> frozenset[str]:
        if self.response is not None:
            # text_field is ignored for prompt/response records, so a field of that
            # name is ordinary metadata there.
            return frozenset((self.prompt, self.response, self.id, self.messages))
        return frozenset((self.text, self.id, self.messages))


class Formatter:
    """How prompt/response records and chat records (`messages`) become the prompt and response
    texts (engine.TextFormat with the model's tokenizer); without one, a pair is concatenated as is
    and a chat's turns are joined by newlines."""

    def pair(self, prompt: str, response: str) -> tuple[str, str]:
        return prompt, response

    def messages(self, messages: list[dict]) -> tuple[str, str]:
        from engine import check_messages
        check_messages(messages)
        head = "\n".join(m["content"] for m in messages[:-1])
        return (head + "\n" if head else ""), messages[-1]["content"]


class TextFormatter(Formatter):
    """A Formatter through an engine.TextFormat (chat template or separator) and the model's tokenizer."""

    def __init__(self, text_format, tokenizer):
        self.text_format, self.tokenizer = text_format, tokenizer

    def pair(self, prompt: str, response: str) -> tuple[str, str]:
        return self.text_format.pair(self.tokenizer, prompt, response)

    def messages(self, messages: list[dict]) -> tuple[str, str]:
        return self.text_format.messages(self.tokenizer, messages)


HUB_PREFIX = "hf://"  # hf://owner/name[:config][@split]: a dataset on the Hugging Face hub, streamed


def is_dataset(source: str) -> bool:
    """A `datasets` dataset: a hub name (hf://...) or a folder written by `save_to_disk` (FOLDER@SPLIT too)."""
    source = str(source)
    p = Path(source if Path(source).exists() else source.rsplit("@", 1)[0])
    return source.startswith(HUB_PREFIX) or (p.is_dir() and any(
        (p / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")))


def source_identity(source: str) -> tuple:
    """What a rerun must find unchanged in a data source: a file's or a saved dataset's size and time
    (a hub dataset: its name only)."""
    if source.startswith(HUB_PREFIX):
        return source, None, None
    path = Path(source) if Path(source).exists() else Path(source.rsplit("@", 1)[0])
    stats = [f.stat() for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file()]
    return source if is_dataset(source) else str(path.resolve()), sum(st.st_size for st in stats), \
        max((st.st_mtime_ns for st in stats), default=0)


def expand_inputs(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Data files as given, with directories (every supported file inside, at any depth) and glob
    patterns (`*`, `?`, `[`, `**`) expanded to their files in sorted order, each file once; datasets
    (is_dataset) as given. A folder or pattern without a supported file is an error."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    supported = lambda name: str(name).lower().endswith(SUPPORTED_FORMATS)
    out: list[str] = []
    for p in map(str, paths):
        if is_dataset(p):
            files, where = [p], ""
        elif any(c in p for c in "*?[") and not Path(p).exists():
            files = sorted(m for m in glob.glob(p, recursive=True) if Path(m).is_file() and supported(m))
            where = f"match {p!r}"
        elif Path(p).is_dir():
            files = sorted(str(f) for f in Path(p).rglob("*") if f.is_file() and supported(f.name))
            where = f"are in the folder {p}"
        else:
            files, where = [p], ""
        if not files:
            raise FileNotFoundError(f"no {', '.join(SUPPORTED_FORMATS)} files {where}")
        out += [f for f in files if f not in out]
    return out


def read_records(
    paths: str | Path | Sequence[str | Path],
    *,
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    id_field: str = "id",
    skip_bad: bool = False,
    stats: ReadStats | None = None,
    seen_ids: set[str] | None = None,
    formatter: Formatter | None = None,
    messages_field: str = "messages",
) -> Iterator[Record]:
    """Yield the records of `paths` in file order, then line/row order.

    Arguments are checked now (field options, extensions, that files exist);
    records are read lazily as the iterator is consumed. Ids are checked for
    duplicates across all files and against `seen_ids`, into which every yielded
    id is added.
    """
    if (prompt_field is None) != (response_field is None):
        raise ValueError("prompt_field and response_field must be given together "
                         f"(got prompt_field={prompt_field!r}, response_field={response_field!r})")
    if prompt_field is not None and prompt_field == response_field:
        raise ValueError(f"prompt_field and response_field are the same field {prompt_field!r}")
    fields = _Fields(text_field, prompt_field, response_field, id_field, messages_field)

    sources = expand_inputs(paths) if paths else []
    if not sources:
        raise ValueError("no input files given")
    readers = [_reader_for(s) for s in sources]  # fail on a bad path before reading anything

    return _generate(list(zip(sources, readers)), fields, skip_bad,
                     stats if stats is not None else ReadStats(),
                     seen_ids if seen_ids is not None else set(), formatter or Formatter())


def _dataset_source(source: str):
    """A `datasets` dataset to iterate: hf://owner/name[:config][@split] (streamed: memory does not
    grow), or a save_to_disk folder [@split] (memory-mapped). Loaded now, so an unreachable hub name
    or a missing split is an error before any work."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{source}: reading datasets needs the `datasets` package (pip install datasets)") from None
    if Path(source).is_dir() or "@" not in source:
        spec, split = source, ""
    else:
        spec, split = source.rsplit("@", 1)
    if spec.startswith(HUB_PREFIX):
        name, _, config = spec[len(HUB_PREFIX):].partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        except Exception as e:  # offline, unknown name, gated repo, unknown config or split: say which
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{source}: cannot load this dataset from the Hugging Face hub "
                             f"({type(e).__name__}: {first[:300]}); check the name, config and split, the network "
                             "(HF_HUB_OFFLINE), or save it with `save_to_disk` and pass the folder") from None
    data = datasets.load_from_disk(spec)
    if isinstance(data, datasets.DatasetDict):
        if (split or "train") not in data:
            raise ValueError(f"{source}: no split {split or 'train'!r} in this dataset; it has {', '.join(data)} "
                             f"(pass FOLDER@SPLIT)")
        data = data[split or "train"]
    elif split:
        raise ValueError(f"{source}: this saved dataset has no splits; pass the folder alone")
    return data


def _reader_for(source: str):
    if is_dataset(source):
        data = _dataset_source(source)  # loaded now: an unreachable or malformed source fails before any work
        return lambda _source: ((row, obj, None) for row, obj in enumerate(data, start=1))
    path = Path(source)
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        reader = _jsonl_rows
    elif name.endswith(".parquet"):
        reader = _parquet_rows
    else:
        raise ValueError(f"{source}: unsupported file format; supported: {', '.join(SUPPORTED_FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"no such file: {source}")
    if not path.is_file():
        raise ValueError(f"{source}: not a regular file")
    return reader


def _generate(inputs, fields: _Fields, skip_bad: bool, stats: ReadStats,
              seen: set[str], formatter: Formatter) -> Iterator[Record]:
    checking, first = fields.id != DEFAULT_ID_FIELD, None  # first: (source, line, fields) of the first record

    def no_id_field() -> BadRecordError:
        source, line, keys = first
        shown = ", ".join(repr(k) for k in keys[:_MAX_FIELDS_LISTED]) or "(none)"
        return BadRecordError(f"--id-field {fields.id!r}: none of the first {stats.read} records has that field "
                              f"(the first, {source} line {line}, has {shown})", source=source, line=line,
                              reason="no record has the id field")
    for source, reader in inputs:
        unit = "line" if reader is _jsonl_rows else "row"
        stem = _stem(source)
        for line, obj, error in reader(source):
            try:
                if error is not None:
                    raise _Bad(error)
                record = _to_record(obj, source, line, stem, fields, seen, formatter)
            except _Bad as bad:
                message = f"{source} {unit} {line}: {bad}"
                if not skip_bad:
                    raise BadRecordError(message, source=source, line=line, reason=str(bad)) from None
                stats._skip(message)
                continue
            seen.add(record.id)
            stats.read += 1
            if checking:
                first = first or (source, line, list(obj))
                if fields.id in obj:
                    checking = False
                elif stats.read >= ID_FIELD_CHECK:
                    raise no_id_field()
            yield record
    if checking and first is not None:
        raise no_id_field()


def _to_record(obj: Any, source: str, line: int, stem: str, fields: _Fields,
               seen: set[str], formatter: Formatter) -> Record:
    """The one place where a parsed row becomes a Record, for every format."""
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object (one per line), got {_type_name(obj)}")

    if fields.messages in obj and fields.messages not in (fields.text, fields.prompt, fields.response):
        try:
            prompt, response = formatter.messages(obj[fields.messages])
        except ValueError as e:  # not role/content turns, or not ending with the assistant's
            raise _Bad(f"field {fields.messages!r}: {e}") from None
        if not response.strip():
            raise _Bad(f"field {fields.messages!r}: the last (assistant) message is empty")
        text = prompt + response
    elif fields.response is not None:
        prompt, response = formatter.pair(_string_field(obj, fields.prompt, allow_empty=True),
                                          _string_field(obj, fields.response, allow_empty=False))
        text = prompt + response
    else:
        prompt = ""
        text = _string_field(obj, fields.text, allow_empty=False)

    if fields.id in obj:
        raw = obj[fields.id]
        # bool is an int subclass, but True as an id is surely a data error.
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise _Bad(f"id field {fields.id!r} must be a string or integer, got {_type_name(raw)}")
        doc_id = str(raw)
        if not doc_id.strip():
            raise _Bad(f"id field {fields.id!r} is empty")
    else:
        doc_id = f"{stem}-{line}"
    if doc_id in seen:
        raise _Bad(f"duplicate id {doc_id!r}")

    excluded = fields.excluded
    metadata = {k: _plain(v) for k, v in obj.items() if k not in excluded}
    return Record(id=doc_id, text=text, prompt=prompt, metadata=metadata, source=source, line=line)


def _string_field(obj: dict, name: str, *, allow_empty: bool) -> str:
    if name not in obj:
        keys = list(obj)
        shown = ", ".join(repr(k) for k in keys[:_MAX_FIELDS_LISTED])
        more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_FIELDS_LISTED else ""
        raise _Bad(f"missing field {name!r}; available fields: {shown or '(none)'}{more}")
    value = obj[name]
    if not isinstance(value, str):
        raise _Bad(f"field {name!r} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _Bad(f"field {name!r} is empty")
    return value


def _jsonl_rows(source: str) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value, error) per non-blank line."""
    gz = source.lower().endswith(".gz")
    # Binary mode: lines split on b"\n" only (as JSON Lines means), and a bad byte
    # sequence becomes an error on its own line rather than killing the file.
    with (gzip.open(source, "rb") if gz else open(source, "rb")) as f:
        for line, raw in enumerate(f, start=1):
            if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            try:
                yield line, json.loads(text), None
            except json.JSONDecodeError as e:
                hint = " (expected one JSON object per line)" if text.lstrip()[:1] in "[{" else ""
                yield line, None, f"invalid JSON: {e.msg} at column {e.colno}{hint}"


def _parquet_rows(source: str) -> Iterator[tuple[int, Any, str | None]]:
    """(row number, row as dict, None) per row, one batch in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{source}: not a readable Parquet file: {e}") from e
    row = 0
    with pf:
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS)
        while True:
            try:
                batch = next(batches, None)
            except pa.ArrowException as e:  # corrupt data mid-file: say which file
                raise ValueError(f"{source}: cannot read Parquet data after row {row}: {e}") from e
            if batch is None:
                return
            for obj in batch.to_pylist():
                row += 1
                yield row, obj, None


def _plain(value: Any) -> Any:
    """Make a value JSON-serialisable (Parquet gives dates, decimals, bytes, ...)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # NaN/inf are not JSON; a strict encoder (the API's) would fail on them.
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact, unlike float
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return str(value)


def _stem(source: str) -> str:
    """File name without format suffixes: data.jsonl.gz -> data (for generated ids)."""
    path = Path(source)
    if path.suffix.lower() == ".gz":
        path = path.with_suffix("")
    return path.stem


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)
