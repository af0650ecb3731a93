"""The attribution service: an opened index plus the model that built it. A query is one forward
and backward pass (through `engine`, as for documents), FAISS candidates, and an exact rerank
against the stored vectors.

The index folder is watched: when `indexer append` or a rebuild renames a new folder into place, the
next request opens it (same model: the fingerprint is checked again) and swaps it in. A request uses
one opened index from start to end; one caught by the swap (the old folder's table deleted under it)
is answered again from the new index.

Concurrent /attribute queries are micro-batched (api.batching): those arriving together share one
forward and backward pass, computed with the opened index (projections, preconditioner) each of
them then searches."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from engine import (MAX_TOKENS_SCORED, LoGra, Preconditioner, TextFormat, encode_pairs, load_model, pair_vectors,
                    query_vectors, token_texts, token_vectors)
from indexer.query.opened import NOTHING_TO_SCORE, Opened, query_matrix
from indexer.query.value import value_report
from indexer.query.ranking import HIGH_DEPTH, Hit, rank
from indexer.store import MANIFEST, Index, IndexFormatError, ModelMismatchError

from .batching import MAX_BATCH, MicroBatcher
from .lanes import Busy, HeavyLane, PassLock

__all__ = ["HIGH_DEPTH", "Attributor", "Hit", "IndexUnavailable", "ModelMismatchError", "QueryError", "TokenScores",
           "UnknownDocument"]

log = logging.getLogger("logra_search.api")
T = TypeVar("T")
# a query that failed while the folder was being swapped (two renames) waits up to this long for the
# new index to appear before the error counts as real
SWAP_WAIT_S, SWAP_POLL_S = 2.0, 0.05


class QueryError(ValueError):
    """A well-formed request the index cannot answer (e.g. nothing to score)."""


class UnknownDocument(KeyError):
    """No document with this id in the index."""


class IndexUnavailable(RuntimeError):
    """The index folder was replaced by one this server cannot serve (answered with 503)."""


PRECISIONS = ("fast", "high")
# Copies (token view) or queries (valuation) per gradient pass of a heavy request: a query waits for
# at most one such pass (api.lanes).
HEAVY_BATCH = 2


@dataclass
class TokenScores:
    texts: list[str]  # every response token in the encoded query
    scores: list[float | None]  # None: not scored
    total: float
    document_score: float
    truncated: bool
    n_scored: int


@dataclass(frozen=True)
class Served:
    """One opened index and the engine objects made from it for the loaded model."""
    index: Index
    logra: LoGra
    preconditioner: Preconditioner
    stamp: tuple[int, int] | None  # the folder's identity when it was opened (see _stamp)
    high: tuple[LoGra, Preconditioner] | None = None  # the high-fidelity stage, when the index has one
    text_format: TextFormat = TextFormat(None, "")  # how queries are formatted: as the documents were
    # metadata field -> value -> rows, built on a field's first filter (one table scan), kept with the index
    _by_field: dict = field(default_factory=dict, compare=False, repr=False)
    _by_field_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

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


_FIELDS = object()  # Served._by_field's key for the list of every metadata field


def _stamp(root: Path) -> tuple[int, int] | None:
    """The folder's inode (a rename into place gives a new one) and its manifest's mtime; None while a
    swap is between its two renames."""
    try:
        return os.stat(root).st_ino, os.stat(root / MANIFEST).st_mtime_ns
    except FileNotFoundError:
        return None


class Attributor:
    """`max_batch`: at most this many concurrent queries share a gradient pass (1: no batching);
    `batch_wait_ms`: how long a pass waits for more queries once one is queued."""

    def __init__(self, index_dir: str | Path, model: str | None = None, device: str = "cpu", max_batch: int = MAX_BATCH,
                 batch_wait_ms: float = 2.0, high_depth: int = HIGH_DEPTH, heavy: HeavyLane | None = None):
        self.root = Path(index_dir)
        stamp = _stamp(self.root)  # before opening: a swap during the open is seen by the next request
        index = Index.open(self.root)
        m = index.manifest
        self.model_name = model or m.model.name_or_path
        self.model, self.tokenizer = load_model(self.model_name, device=device, dtype=m.model.dtype)
        self.high_depth = high_depth
        self._served = self._serve(index, stamp)
        self._refused_stamp = None  # a replacement that could not be served; not retried until it changes
        self._refusal = ""
        self._reload_lock = threading.Lock()
        # Hooks live on shared modules: one gradient computation at a time, queries first (api.lanes).
        self._passes = PassLock()
        self._heavy = heavy or HeavyLane()
        self._batcher = MicroBatcher(self._query_batch, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000)

    def _serve(self, index: Index, stamp) -> Served:
        return Served(index, *index.engine(self.model, self.model_name), stamp,
                      high=index.high_engine(self.model, self.model_name),
                      text_format=TextFormat.from_dict(index.manifest.text_format))

    def texts(self, s: Served, prompt: str, response: str, messages: list[dict] | None = None) -> tuple[str, str]:
        """A query's prompt and response texts, formatted as the index's documents were (its chat
        template or separator); `messages` (a chat ending with the assistant's turn) instead of the pair."""
        try:
            if messages is not None:
                return s.text_format.messages(self.tokenizer, messages)
            return s.text_format.pair(self.tokenizer, prompt, response)
        except ValueError as e:
            raise QueryError(str(e)) from None

    @property
    def batch_stats(self) -> dict:
        """Query passes and their batch sizes so far (MicroBatcher.stats)."""
        return self._batcher.stats.snapshot()

    @property
    def index(self) -> Index:
        return self.current().index

    def current(self) -> Served:
        """The index to answer from, reopened first if the folder was replaced since."""
        served, stamp = self._served, _stamp(self.root)
        if stamp is None or stamp == served.stamp or stamp == self._refused_stamp:
            return served
        return self._reopen(stamp)

    def reload(self) -> bool:
        """Reopen the folder now if it changed (POST /admin/reload); raises what stops serving it."""
        stamp = _stamp(self.root)
        if stamp is None or stamp == self._served.stamp:
            return False
        served = self._reopen(stamp)
        if served.stamp != stamp:
            raise IndexUnavailable(f"{self.root} cannot be served: {self._refusal}")
        return True

    def _reopen(self, stamp: tuple[int, int]) -> Served:
        with self._reload_lock:
            if self._served.stamp != stamp:
                try:
                    index = Index.open(self.root)
                    self._served = self._serve(index, stamp)
                    log.warning("reloaded %s: %d documents", self.root, len(index))
                except (IndexFormatError, ModelMismatchError, OSError) as e:
                    self._refused_stamp, self._refusal = stamp, str(e)
                    log.error("not serving the new contents of %s, keeping the old index: %s", self.root, e)
            return self._served

    def _answer(self, fn: Callable[[Served], T]) -> T:
        served = self.current()
        try:
            return fn(served)
        except (QueryError, UnknownDocument, Busy):
            raise
        except Exception:
            for _ in range(round(SWAP_WAIT_S / SWAP_POLL_S)):  # a swap is two renames: give the second a moment
                if _stamp(self.root) is not None:
                    break
                time.sleep(SWAP_POLL_S)
            fresh = self.current()
            if fresh is not served:
                return fn(fresh)
            if _stamp(self.root) in (served.stamp, None):  # the folder did not change: a real error
                raise
            raise IndexUnavailable(f"{self.root} was replaced by an index this server cannot serve "
                                   f"({self._refusal}); restart it with the right model") from None

    def attribute(self, prompt: str, response: str, k: int, mode: str, direction: str = "proponents",
                  where: dict | None = None, precision: str = "high",
                  messages: list[dict] | None = None) -> tuple[list[Hit], list[dict], dict]:
        """The top-k hits (among documents matching `where`, if given), their documents, and what was
        scored (tokens, truncation, index size, the precision used). `precision` "high" rescores the
        compact vectors' top max(k, high_depth) with the high-fidelity stage (the same as "fast" for
        an index built without one). `messages`: the query as a chat instead of (prompt, response)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return self._answer(lambda s: self._attribute(s, *self.texts(s, prompt, response, messages), k, mode, direction,
                                                      where, precision))

    def _heavy_batch(self):
        """Entered around each batch of a heavy request: the pass lock, unless the server stopping has
        cut the request (ShuttingDown)."""
        self._heavy.checkpoint()
        return self._passes.heavy()

    def _query_batch(self, s: Served, pairs: list[tuple[str, str]]) -> list:
        """(vector, encoding) per pair: one forward and backward pass with this index's engine."""
        with self._passes.fast():
            vectors, encoded = query_vectors(s.logra, s.preconditioner, self.tokenizer, pairs)
        return list(zip(vectors, encoded))

    def _attribute(self, s: Served, prompt: str, response: str, k: int, mode: str, direction: str,
                   where: dict | None = None, precision: str = "high"):
        vector, enc = self._batcher.submit(s, (prompt, response))
        high = precision == "high" and s.high is not None
        info = {"n_tokens": len(enc.input_ids), "n_response_tokens": enc.n_loss_tokens, "truncated": enc.truncated,
                "n_documents": len(s.index), "precision": "high" if high else "fast"}
        if enc.n_loss_tokens == 0:
            raise QueryError(NOTHING_TO_SCORE)
        rows = s.rows_where(where) if where else None
        high_q = None
        if high:
            logra, pre = s.high
            with self._passes.fast():
                high_q = pair_vectors(logra, pre, self.tokenizer, [(prompt, response)])[0].numpy()
        hits = rank(s.index, vector.numpy(), k, mode, direction, rows=rows, high_q=high_q, depth=self.high_depth)
        return hits, s.index.documents([h.row for h in hits]), info

    def value(self, queries: list[tuple[str, str] | list[dict]], group_by: list[str], mode: str = "influence",
              precision: str = "high", top: int = 5, bootstrap: int = 1000, seed: int = 0) -> dict:
        """Documents' and groups' values over the queries ((prompt, response) pairs or chats), as
        `indexer value` computes them (indexer.query.value.value_report)."""
        def run(s: Served) -> dict:
            pairs = [self.texts(s, *q) if isinstance(q, tuple) else self.texts(s, "", "", q) for q in queries]
            opened = Opened(s.index, self.tokenizer, (s.logra, s.preconditioner), s.high)
            stage = opened.stage(precision)
            for i, e in enumerate(encode_pairs(self.tokenizer, pairs, s.logra.max_tokens)):
                if e.n_loss_tokens == 0:
                    raise QueryError(f"query {i}: {NOTHING_TO_SCORE}")
            with self._heavy.enter("valuation"):
                vectors = query_matrix(opened, stage, pairs, batch_size=HEAVY_BATCH, guard=self._heavy_batch)
            try:
                return value_report(s.index, stage, vectors, group_by, mode=mode, top=top, bootstrap=bootstrap, seed=seed,
                                    device=str(next(self.model.parameters()).device))
            except ValueError as e:  # e.g. a field no document has
                raise QueryError(str(e)) from None
        return self._answer(run)

    def token_scores(self, prompt: str, response: str, doc_id: str, mode: str,
                     max_tokens_scored: int = MAX_TOKENS_SCORED, precision: str = "high",
                     messages: list[dict] | None = None) -> TokenScores:
        """How much each response token contributes to the document's score: v_j . v_d, with v_j the
        query vector of token j's loss alone. In cosine mode each is divided by both full norms, so the
        contributions still sum to the cosine score (when no token is left out by the cap)."""
        return self._answer(lambda s: self._token_scores(s, *self.texts(s, prompt, response, messages), doc_id, mode,
                                                         max_tokens_scored, precision))

    def _token_scores(self, s: Served, prompt: str, response: str, doc_id: str, mode: str,
                      max_tokens_scored: int, precision: str = "high") -> TokenScores:
        """With precision "high" (and an index that has the stage), the same split of the document's
        high-fidelity score: its stored vector against the query's per token at the same sizes."""
        row = s.index.row_of_id.get(doc_id)
        if row is None:
            raise UnknownDocument(doc_id)
        high = precision == "high" and s.high is not None
        logra, pre = s.high if high else (s.logra, s.preconditioner)
        with self._heavy.enter("token view"):  # the stored high-fidelity vectors are in the eigenbasis
            tv = token_vectors(logra, pre, self.tokenizer, prompt, response, max_tokens_scored, batch_size=HEAVY_BATCH,
                               eigenbasis=high, guard=self._heavy_batch)
        enc = tv.encoded
        if not tv.positions:
            raise QueryError(NOTHING_TO_SCORE)
        if high:
            d_norm = float(s.index.high_norms[row])
            d = s.index.high_rows([row])[0].astype(np.float64) * d_norm
        else:
            d, d_norm = np.asarray(s.index.vectors[row], dtype=np.float64), float(s.index.norms[row])
        contrib = tv.tokens.double().numpy() @ d
        score = float(tv.query.double().numpy() @ d)
        if mode == "cosine":
            denom = d_norm * float(np.linalg.norm(tv.query.double().numpy()))
            scale = 1.0 / denom if denom > 0 else 0.0
            contrib, score = contrib * scale, score * scale
        by_pos = dict(zip(tv.positions, contrib.tolist()))
        resp_ids = enc.input_ids[enc.loss_start:]
        texts = token_texts(self.tokenizer, resp_ids)
        scores = [by_pos.get(enc.loss_start + i) for i in range(len(resp_ids))]
        return TokenScores(texts, scores, float(contrib.sum()), score, tv.truncated or enc.truncated, len(tv.positions))

    def document(self, doc_id: str) -> dict | None:
        def get(s: Served) -> dict | None:
            row = s.index.row_of_id.get(doc_id)
            return None if row is None else s.index.documents([row])[0]
        return self._answer(get)


