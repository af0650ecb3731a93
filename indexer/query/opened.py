"""An index opened for queries (`Opened`): the index, the model's tokenizer, both stages with their
engines, how queries are formatted, and for a server the folder's identity and the metadata filters'
cache; the one type the API, `indexer attribute` and `indexer value` open an index into. Also query
records read as documents are (same fields, same id rules, same file-and-line errors), and query
vectors, every stage a query needs from one forward and backward pass."""
from __future__ import annotations

import json
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from engine import Encoded, TextFormat, encode_pairs, load_model

from ..records import BadRecordError, ReadStats, Record, TextFormatter, read_records
from ..store import Index, document_pair
from .stage import STAGES, Stage, stage_vectors

__all__ = ["NOTHING_TO_SCORE", "Opened", "QueryError", "open_index", "query_matrix", "query_records"]

# A query whose encoding has no scored token (one token and no prompt: nothing predicts it).
NOTHING_TO_SCORE = "the response has no token to score (with an empty prompt it needs at least two tokens)"


class QueryError(ValueError):
    """A well-formed query the index cannot answer (e.g. nothing to score, a metadata field no
    document has)."""


@dataclass(frozen=True, eq=False)
class Opened:
    """One opened index and the engine objects made from it for the loaded model."""
    index: Index
    tokenizer: object
    fast: Stage
    high: Stage | None  # None: an index built without the high-fidelity stage
    text_format: TextFormat = TextFormat(None, "")  # how queries are formatted: as the documents were
    stamp: tuple[int, int] | None = None  # a server's: the folder's identity when it was opened (api.search)
    # metadata field -> value -> rows, built on a field's first filter (one table scan), kept with the index
    _by_field: dict = field(default_factory=dict, repr=False)
    _by_field_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def with_model(cls, index: Index, model, tokenizer, name: str | None = None,
                   stamp: tuple[int, int] | None = None) -> "Opened":
        """`index` with both stages' engines for `model` (called `name` in errors), which must be the
        model that built it (Index.engine checks)."""
        fast = Stage("fast", *index.engine(model, name))
        high = index.high_engine(model, name)
        return cls(index, tokenizer, fast, None if high is None else Stage("high", *high),
                   TextFormat.from_dict(index.manifest.text_format), stamp)

    def stage(self, precision: str) -> Stage:
        """The stage that answers `precision` ("high" falls back to "fast" without the stage)."""
        if precision not in STAGES:
            raise ValueError(f"precision must be one of {STAGES}, got {precision!r}")
        return self.high if precision == "high" and self.high is not None else self.fast

    def ranking_stages(self, precision: str) -> list[Stage]:
        """The stages ranking at `precision` reads (indexer.query.ranking.rank): the compact stage's
        candidates, and the high stage's rescoring of them where it answers."""
        stage = self.stage(precision)
        return [self.fast] if stage is self.fast else [self.fast, stage]

    def pair(self, prompt: str, response: str, messages: list[dict] | None = None) -> tuple[str, str]:
        """A query's prompt and response texts, formatted as the index's documents were (its chat
        template or separator); `messages` (a chat ending with the assistant's turn) instead of the
        pair. A malformed chat is a QueryError."""
        try:
            if messages is not None:
                return self.text_format.messages(self.tokenizer, messages)
            return self.text_format.pair(self.tokenizer, prompt, response)
        except ValueError as e:
            raise QueryError(str(e)) from None

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[Encoded]:
        return encode_pairs(self.tokenizer, pairs, self.fast.logra.max_tokens)

    def vectors(self, stages: Sequence[Stage], pairs: Sequence[tuple[str, str]]) -> tuple[list[np.ndarray], list[Encoded]]:
        """Each of `stages`' (len(pairs), dim) float32 query vectors, in the basis the index stores that
        stage's rows in, from one forward and backward pass (stage_vectors), and the encodings."""
        encoded = self.encode(pairs)
        return [v.numpy() for v in stage_vectors(stages, self.tokenizer, encoded)], encoded

    def rows_where(self, where: dict) -> np.ndarray:
        """Rows whose metadata has every field = value of `where`, ascending. A field no document has,
        or a value of a type the field never holds, is a QueryError that says so."""
        rows = None
        for name, value in where.items():
            with self._by_field_lock:
                if name not in self._by_field:
                    self._by_field[name] = self.index.rows_by_value(name)
                by_value = self._by_field[name]
                if not by_value:
                    known = self._by_field.setdefault(_FIELDS, sorted(self.index.metadata_fields()))
                    raise QueryError(f"no document has the metadata field {name!r}; the index's fields: "
                                     f"{', '.join(known[:30]) or '(none)'}")
            held = sorted({type(json.loads(v)).__name__ for v in by_value})
            if type(value).__name__ not in held:
                raise QueryError(f"metadata field {name!r} holds {' and '.join(held)} values, not {type(value).__name__} "
                                 f"({json.dumps(value)})")
            match = by_value.get(json.dumps(value, sort_keys=True), np.empty(0, np.int64))
            rows = match if rows is None else np.intersect1d(rows, match, assume_unique=True)
        return np.empty(0, np.int64) if rows is None else rows


_FIELDS = object()  # Opened._by_field's key for the list of every metadata field


def open_index(index_dir: str, model: str | None = None, device: str = "cpu") -> Opened:
    """The index and the model that built it (checked), with both stages' engines."""
    index = Index.open(index_dir)
    name = model or index.manifest.model.name_or_path
    lm, tokenizer = load_model(name, device=device, dtype=index.manifest.model.dtype)
    return Opened.with_model(index, lm, tokenizer, name)


def query_records(opened: Opened, paths: Sequence[str], *, text_field: str | None = None,
                  prompt_field: str | None = None, response_field: str | None = None, id_field: str | None = None,
                  skip_bad: bool = False, stats: ReadStats | None = None) -> Iterator[tuple[Record, tuple[str, str]]]:
    """Query records and their (prompt, response), read and formatted like documents (text, prompt and
    response fields default to those the index was built with, chat `messages` records too; the id
    field to "id"). A query whose response has no token to score is a bad record: an error
    naming its file and line, or skipped and counted with `skip_bad`."""
    d = opened.index.manifest.data
    pick = lambda given, key, default: given if given is not None else (getattr(d, key) or default)
    stats = stats if stats is not None else ReadStats()
    records = read_records(paths, text_field=pick(text_field, "text_field", "text"),
                           prompt_field=pick(prompt_field, "prompt_field", None),
                           response_field=pick(response_field, "response_field", None),
                           id_field=id_field or "id", skip_bad=skip_bad, stats=stats,
                           formatter=TextFormatter(opened.text_format, opened.tokenizer))
    for r in records:
        pair = document_pair(r.prompt, r.text)
        if opened.encode([pair])[0].n_loss_tokens == 0:
            message = f"{r.source} line {r.line}: {NOTHING_TO_SCORE}"
            if not skip_bad:
                raise BadRecordError(message, source=r.source, line=r.line, reason="no token to score")
            stats._skip(message)
            continue
        yield r, pair


def query_matrix(opened: Opened, stage: Stage, pairs: Iterable[tuple[str, str]], batch_size: int = 16,
                 progress: bool = False, guard: Callable[[], ContextManager] = nullcontext) -> np.ndarray:
    """(n, dim) float32 vectors of `stage` for every pair (valuation reads no other stage), one forward
    and backward pass per `batch_size` pairs (each batch inside `guard()`: a server's lock)."""
    pairs, parts = iter(pairs), []
    with tqdm(unit="query", desc="query vectors", disable=not progress, dynamic_ncols=True) as bar:
        while batch := list(islice(pairs, batch_size)):
            with guard():
                parts.append(opened.vectors([stage], batch)[0][0])
            bar.update(len(batch))
    return np.concatenate(parts) if parts else np.zeros((0, stage.dim), np.float32)
