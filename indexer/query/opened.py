"""Queries against an index outside the server (`indexer attribute`, `indexer value`): the index
and its model opened together, query records read as documents are (same fields, same id rules,
same file-and-line errors), and the queries' vectors as the index stores them for a stage."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from engine import LoGra, Preconditioner, TextFormat, encode_pairs, load_model, pair_vectors, query_vectors

from ..records import BadRecordError, ReadStats, Record, TextFormatter, read_records
from ..store import Index, document_pair

STAGES = ("fast", "high")
# A query whose encoding has no scored token (one token and no prompt: nothing predicts it).
NOTHING_TO_SCORE = "the response has no token to score (with an empty prompt it needs at least two tokens)"


@dataclass
class Opened:
    index: Index
    tokenizer: object
    fast: tuple[LoGra, Preconditioner]
    high: tuple[LoGra, Preconditioner] | None  # None: an index built without the high-fidelity stage

    def stage(self, precision: str) -> str:
        """The stage that answers `precision` ("high" falls back to "fast" without the stage)."""
        if precision not in STAGES:
            raise ValueError(f"precision must be one of {STAGES}, got {precision!r}")
        return "high" if precision == "high" and self.high is not None else "fast"


def open_index(index_dir: str, model: str | None = None, device: str = "cpu") -> Opened:
    """The index and the model that built it (checked), with both stages' engines."""
    index = Index.open(index_dir)
    m = index.manifest
    name = model or m.model.name_or_path
    lm, tokenizer = load_model(name, device=device, dtype=m.model.dtype)
    return Opened(index, tokenizer, index.engine(lm, name), index.high_engine(lm, name))


def stage_vectors(opened: Opened, stage: str, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """(len(pairs), dim) float32 query vectors of one stage, in the basis the index stores that
    stage's document vectors in: the compact vectors in the original basis (as /attribute computes
    them), the high-fidelity ones in the preconditioner's eigenbasis."""
    if stage == "high":
        logra, pre = opened.high
        return pair_vectors(logra, pre, opened.tokenizer, pairs).numpy().astype(np.float32)
    logra, pre = opened.fast
    return query_vectors(logra, pre, opened.tokenizer, pairs)[0].numpy().astype(np.float32)


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
                           formatter=TextFormatter(TextFormat.from_dict(opened.index.manifest.text_format),
                                                   opened.tokenizer))
    max_tokens = opened.fast[0].max_tokens
    for r in records:
        pair = document_pair(r.prompt, r.text)
        if encode_pairs(opened.tokenizer, [pair], max_tokens)[0].n_loss_tokens == 0:
            message = f"{r.source} line {r.line}: {NOTHING_TO_SCORE}"
            if not skip_bad:
                raise BadRecordError(message, source=r.source, line=r.line, reason="no token to score")
            stats._skip(message)
            continue
        yield r, pair


def query_matrix(opened: Opened, stage: str, pairs: Iterable[tuple[str, str]], batch_size: int = 16,
                 progress: bool = False, guard: Callable[[], ContextManager] = nullcontext) -> np.ndarray:
    """(n, dim) float32 stage vectors of every pair, computed `batch_size` at a time (each batch
    inside `guard()`: a server's lock)."""
    pairs, parts = iter(pairs), []
    with tqdm(unit="query", desc="query vectors", disable=not progress, dynamic_ncols=True) as bar:
        while batch := list(islice(pairs, batch_size)):
            with guard():
                parts.append(stage_vectors(opened, stage, batch))
            bar.update(len(batch))
    dim = (opened.high if stage == "high" else opened.fast)[0].dim
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
