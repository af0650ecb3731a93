"""The attribution service: an opened index plus the model that built it. A query is one forward
and backward pass (through `engine`, as for documents), FAISS candidates, and an exact rerank
against the stored vectors.

The index folder is watched: when `indexer append` or a rebuild renames a new folder into place, the
next request opens it (same model: the fingerprint is checked again) and swaps it in. A request uses
one opened index from start to end; one caught by the swap (the old folder's table deleted under it)
is answered again from the new index.

A query is one forward and backward pass whatever its precision: the compact stage's vector and, at
precision "high", the high-fidelity stage's come out of the same pass (indexer.query.stage.stage_vectors).
Concurrent /attribute queries are micro-batched (api.batching): those arriving together share that
pass, computed with the opened index (projections, preconditioners) each of them then searches; a
batch computes the high stage's vectors when any of its queries asks for them (a fast query in it
then waits for the high stage's projections, not for a pass of its own behind theirs)."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from engine import MAX_TOKENS_SCORED, load_model, token_texts, token_vectors
from indexer.query.opened import NOTHING_TO_SCORE, Opened, QueryError, query_matrix
from indexer.query.ranking import HIGH_DEPTH, KEYWORD_DEPTH, Hit, rank
from indexer.query.value import value_report
from indexer.store import MANIFEST, Index, IndexFormatError, ModelMismatchError

from .batching import MAX_BATCH, MicroBatcher
from .lanes import Busy, HeavyLane, PassLock

__all__ = ["HIGH_DEPTH", "KEYWORD_DEPTH", "Attributor", "Hit", "IndexUnavailable", "ModelMismatchError", "QueryError", "TokenScores",
           "UnknownDocument"]

log = logging.getLogger("logra_search.api")
T = TypeVar("T")
# a query that failed while the folder was being swapped (two renames) waits up to this long for the
# new index to appear before the error counts as real
SWAP_WAIT_S, SWAP_POLL_S = 2.0, 0.05


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
                 batch_wait_ms: float = 2.0, high_depth: int = HIGH_DEPTH,
                 keyword_depth: int = KEYWORD_DEPTH, heavy: HeavyLane | None = None):
        self.root = Path(index_dir)
        stamp = _stamp(self.root)  # before opening: a swap during the open is seen by the next request
        index = Index.open(self.root)
        m = index.manifest
        self.model_name = model or m.model.name_or_path
        self.model, self.tokenizer = load_model(self.model_name, device=device, dtype=m.model.dtype)
        self.high_depth = high_depth
        self.keyword_depth = keyword_depth
        self._served = self._serve(index, stamp)
        self._refused_stamp = None  # a replacement that could not be served; not retried until it changes
        self._refusal = ""
        self._reload_lock = threading.Lock()
        # Hooks live on shared modules: one gradient computation at a time, queries first (api.lanes).
        self._passes = PassLock()
        self._heavy = heavy or HeavyLane()
        self._batcher = MicroBatcher(self._query_batch, max_batch=max_batch, max_wait_s=batch_wait_ms / 1000)

    def _serve(self, index: Index, stamp) -> Opened:
        return Opened.with_model(index, self.model, self.tokenizer, self.model_name, stamp)

    @property
    def batch_stats(self) -> dict:
        """Query passes and their batch sizes so far (MicroBatcher.stats)."""
        return self._batcher.stats.snapshot()

    @property
    def index(self) -> Index:
        return self.current().index

    def current(self) -> Opened:
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

    def _reopen(self, stamp: tuple[int, int]) -> Opened:
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

    def _answer(self, fn: Callable[[Opened], T]) -> T:
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
        return self._answer(lambda s: self._attribute(s, *s.pair(prompt, response, messages), k, mode, direction,
                                                      where, precision))

    def _heavy_batch(self):
        """Entered around each batch of a heavy request: the pass lock, unless the server stopping has
        cut the request (ShuttingDown)."""
        self._heavy.checkpoint()
        return self._passes.heavy()

    def _query_batch(self, s: Opened, items: list[tuple[tuple[str, str], bool]]) -> list:
        """(compact vector, high-fidelity vector or None, encoding) per (pair, wants the high stage):
        one forward and backward pass with this index's engines, computing the high stage's vectors
        too when any item wants them."""
        stages = [s.fast] + ([s.high] if s.high is not None and any(high for _, high in items) else [])
        with self._passes.fast():
            vectors, encoded = s.vectors(stages, [pair for pair, _ in items])
        fast, high = vectors if len(vectors) > 1 else (vectors[0], None)
        return [(fast[i], high[i] if wants and high is not None else None, enc)
                for i, ((_, wants), enc) in enumerate(zip(items, encoded))]

    def _attribute(self, s: Opened, prompt: str, response: str, k: int, mode: str, direction: str,
                   where: dict | None = None, precision: str = "high"):
        stage = s.stage(precision)
        fast_q, high_q, enc = self._batcher.submit(s, ((prompt, response), stage.name == "high"))
        info = {"n_tokens": len(enc.input_ids), "n_response_tokens": enc.n_loss_tokens, "truncated": enc.truncated,
                "n_documents": len(s.index), "precision": stage.name}
        if enc.n_loss_tokens == 0:
            raise QueryError(NOTHING_TO_SCORE)
        rows = s.rows_where(where) if where else None
        hits = rank(s.index, fast_q, k, mode, direction, rows=rows, high_q=high_q, depth=self.high_depth,
                    text=f"{prompt}\n{response}", keyword_depth=self.keyword_depth)
        return hits, s.index.documents([h.row for h in hits]), info

    def value(self, queries: list[tuple[str, str] | list[dict]], group_by: list[str], mode: str = "influence",
              precision: str = "high", top: int = 5, bootstrap: int = 1000, seed: int = 0) -> dict:
        """Documents' and groups' values over the queries ((prompt, response) pairs or chats), as
        `indexer value` computes them (indexer.query.value.value_report)."""
        def run(s: Opened) -> dict:
            pairs = [s.pair(*q) if isinstance(q, tuple) else s.pair("", "", q) for q in queries]
            stage = s.stage(precision)
            for i, e in enumerate(s.encode(pairs)):
                if e.n_loss_tokens == 0:
                    raise QueryError(f"query {i}: {NOTHING_TO_SCORE}")
            with self._heavy.enter("valuation"):
                vectors = query_matrix(s, stage, pairs, batch_size=HEAVY_BATCH, guard=self._heavy_batch)
            try:
                return value_report(s.index, stage.name, vectors, group_by, mode=mode, top=top, bootstrap=bootstrap, seed=seed,
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
        return self._answer(lambda s: self._token_scores(s, *s.pair(prompt, response, messages), doc_id, mode,
                                                         max_tokens_scored, precision))

    def _token_scores(self, s: Opened, prompt: str, response: str, doc_id: str, mode: str,
                      max_tokens_scored: int, precision: str = "high") -> TokenScores:
        """With precision "high" (and an index that has the stage), the same split of the document's
        high-fidelity score: its stored vector against the query's per token at the same sizes."""
        row = s.index.row_of_id.get(doc_id)
        if row is None:
            raise UnknownDocument(doc_id)
        stage = s.stage(precision)
        with self._heavy.enter("token view"):  # in the basis the stage's rows are stored in
            tv = token_vectors(stage.logra, stage.pre, self.tokenizer, prompt, response, max_tokens_scored,
                               batch_size=HEAVY_BATCH, eigenbasis=stage.eigenbasis, guard=self._heavy_batch)
        enc = tv.encoded
        if not tv.positions:
            raise QueryError(NOTHING_TO_SCORE)
        # the stage's scoring rule, token by token: the document's scaled row against each token's vector
        d = stage.scaled(s.index, [row], mode)[0]
        scale = stage.query_scales(tv.query.double().numpy(), mode)[0]
        contrib = (tv.tokens.double().numpy() @ d) * scale
        score = float(tv.query.double().numpy() @ d) * scale
        by_pos = dict(zip(tv.positions, contrib.tolist()))
        resp_ids = enc.input_ids[enc.loss_start:]
        texts = token_texts(self.tokenizer, resp_ids)
        scores = [by_pos.get(enc.loss_start + i) for i in range(len(resp_ids))]
        return TokenScores(texts, scores, float(contrib.sum()), score, tv.truncated or enc.truncated, len(tv.positions))

    def document(self, doc_id: str) -> dict | None:
        def get(s: Opened) -> dict | None:
            row = s.index.row_of_id.get(doc_id)
            return None if row is None else s.index.documents([row])[0]
        return self._answer(get)


