"""The attribution service: an opened index plus the model that built it. A query is one forward
and backward pass (through `engine`, as for documents), FAISS candidates, and an exact rerank
against the stored vectors."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from engine import MAX_TOKENS_SCORED, load_model, query_vectors, token_texts, token_vectors
from indexer.store import Index, ModelMismatchError, unit_rows

__all__ = ["Attributor", "Hit", "ModelMismatchError", "QueryError", "TokenScores", "rerank_search"]


class QueryError(ValueError):
    """A well-formed request the index cannot answer (e.g. nothing to score)."""


@dataclass
class Hit:
    row: int
    score: float


@dataclass
class TokenScores:
    texts: list[str]  # every response token in the encoded query
    scores: list[float | None]  # None: not scored
    total: float
    document_score: float
    truncated: bool
    n_scored: int


def rerank_search(index: faiss.Index, vectors: np.ndarray, norms: np.ndarray, q: np.ndarray, k: int, mode: str,
                  rerank_factor: int = 1) -> list[Hit]:
    """Top-k rows of `vectors` for query q: `index` (over vectors, or their unit rows for cosine)
    proposes rerank_factor x max(4k, k + 64) candidates, exact float64 scores rank them."""
    n = len(vectors)
    k = min(k, n)
    q = q.astype(np.float32)[None, :]
    probe = unit_rows(q) if mode == "cosine" else q
    _, cand = index.search(probe, min(n, max(4 * k, k + 64) * rerank_factor))
    cand = np.unique(cand[0][cand[0] >= 0])
    exact = vectors[cand].astype(np.float64) @ q[0].astype(np.float64)
    if mode == "cosine":
        denom = norms[cand].astype(np.float64) * float(np.linalg.norm(q))
        exact = np.divide(exact, denom, out=np.zeros_like(exact), where=denom > 0)
    order = np.lexsort((cand, -exact))[:k]  # best first; ties broken by row for reproducibility
    return [Hit(int(cand[i]), float(exact[i])) for i in order]


class Attributor:
    def __init__(self, index_dir: str | Path, model: str | None = None, device: str = "cpu"):
        self.index = Index.open(index_dir)
        m = self.index.manifest
        self.model_name = model or m["model"]["name_or_path"]
        self.model, self.tokenizer = load_model(self.model_name, device=device, dtype=m["model"].get("dtype", "float32"))
        self.logra, self.preconditioner = self.index.engine(self.model, self.model_name)
        # Hooks live on shared modules: one gradient computation at a time.
        self._lock = threading.Lock()

    def attribute(self, prompt: str, response: str, k: int, mode: str) -> tuple[list[Hit], dict]:
        with self._lock:
            vectors, encoded = query_vectors(self.logra, self.preconditioner, self.tokenizer, [(prompt, response)])
        enc = encoded[0]
        info = {"n_tokens": len(enc.input_ids), "n_response_tokens": enc.n_loss_tokens, "truncated": enc.truncated}
        if enc.n_loss_tokens == 0:
            raise QueryError("the response has no token to score: with an empty prompt it needs at least two tokens")
        return self.search(vectors[0].numpy(), k, mode), info

    def token_scores(self, prompt: str, response: str, row: int, mode: str,
                     max_tokens_scored: int = MAX_TOKENS_SCORED) -> TokenScores:
        """How much each response token contributes to document `row`'s score: v_j . v_d, with v_j the
        query vector of token j's loss alone. In cosine mode each is divided by both full norms, so the
        contributions still sum to the cosine score (when no token is left out by the cap)."""
        with self._lock:
            tv = token_vectors(self.logra, self.preconditioner, self.tokenizer, prompt, response, max_tokens_scored)
        enc = tv.encoded
        if not tv.positions:
            raise QueryError("the response has no token to score: with an empty prompt it needs at least two tokens")
        d = np.asarray(self.index.vectors[row], dtype=np.float64)
        contrib = tv.tokens.double().numpy() @ d
        score = float(tv.query.double().numpy() @ d)
        if mode == "cosine":
            denom = float(self.index.norms[row]) * float(np.linalg.norm(tv.query.double().numpy()))
            scale = 1.0 / denom if denom > 0 else 0.0
            contrib, score = contrib * scale, score * scale
        by_pos = dict(zip(tv.positions, contrib.tolist()))
        resp_ids = enc.input_ids[enc.loss_start:]
        texts = token_texts(self.tokenizer, resp_ids)
        scores = [by_pos.get(enc.loss_start + i) for i in range(len(resp_ids))]
        return TokenScores(texts, scores, float(contrib.sum()), score, tv.truncated or enc.truncated, len(tv.positions))

    def search(self, q: np.ndarray, k: int, mode: str) -> list[Hit]:
        """Top-k rows for a query vector: FAISS proposes candidates, exact scores rank them."""
        factor = (self.index.manifest.get("faiss") or {}).get("rerank_factor", 1)  # absent in older indexes
        return rerank_search(self.index.faiss[mode], self.index.vectors, self.index.norms, q, k, mode, factor)

    def document(self, doc_id: str) -> dict | None:
        row = self.index.row_of_id.get(doc_id)
        return None if row is None else self.index.documents([row])[0]
