"""Ranking an opened index for query vectors, with no model: FAISS candidates reranked exactly against
the stored compact vectors (`search`), exact search over a subset of rows (`exact_search`, metadata
filters), and the high-fidelity stage's rescoring of the best of them; every score by the stage's
scoring rule (indexer.query.stage.Stage). `rank` is the one path from query vectors to hits: the API's
/attribute and `indexer attribute` both go through it."""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from ..ann import pad_to, unit_rows
from ..store import Index
from .stage import Stage

__all__ = ["DIRECTIONS", "HIGH_DEPTH", "KEYWORD_DEPTH", "Hit", "exact_search", "rank", "rerank_search", "search"]

DIRECTIONS = {"proponents": 1.0, "opponents": -1.0}
# FAISS candidates for the exact rerank: rerank_factor x max(CANDIDATES_PER_HIT x k, k + CANDIDATES_MIN_EXTRA),
# and HIGH_CANDIDATES_PER_DEPTH x depth where they only feed the high stage (its top `depth` need only be roughly right)
CANDIDATES_PER_HIT = 4
CANDIDATES_MIN_EXTRA = 64
HIGH_CANDIDATES_PER_DEPTH = 4
SCAN_BLOCK_ROWS = 65536  # compact rows scored per block by the exact scan
COMPACT, HIGH = Stage("fast"), Stage("high")  # the stages' stored rows and scoring rule (no engine needed)
# The high-fidelity stage rescores this many of the compact vectors' best candidates (or k, if more):
# docs/quality.md "Two stages" gives the k = 10 answers' agreement with the top 10 over every document by depth.
HIGH_DEPTH = 150
# ...and this many of a keyword (BM25) search's best documents besides, so that it never misses what
# keyword search finds (docs/quality.md, the candidate stage)
KEYWORD_DEPTH = 50


@dataclass
class Hit:
    row: int
    score: float
    stage: str = "fast"  # which stage's score this is (and ranked it): "fast" or "high"


def rerank_search(index: faiss.Index, vectors: np.ndarray, norms: np.ndarray, q: np.ndarray, k: int, mode: str,
                  rerank_factor: int = 1, direction: str = "proponents", candidates: int | None = None) -> list[Hit]:
    """Top-k rows of `vectors` for query q: `index` (over vectors, or their unit rows for cosine)
    proposes `candidates` (default rerank_factor x max(4k, k + 64), as above) rows, exact float64 scores rank
    them. Opponents (the lowest scores) are the top rows for -q: the same index, probed the other way."""
    n = len(vectors)
    k = min(k, n)
    sign = DIRECTIONS[direction]
    q = q.astype(np.float32)[None, :]
    probe = pad_to(sign * (unit_rows(q) if mode == "cosine" else q), index.d)
    _, cand = index.search(probe, min(n, candidates or max(CANDIDATES_PER_HIT * k, k + CANDIDATES_MIN_EXTRA) * rerank_factor))
    cand = np.unique(cand[0][cand[0] >= 0])
    exact = COMPACT.score_rows(vectors[cand], norms[cand], q[0], mode)
    order = np.lexsort((cand, -sign * exact))[:k]  # best first; ties broken by row for reproducibility
    return [Hit(int(cand[i]), float(exact[i])) for i in order]


def search(index: Index, q: np.ndarray, k: int, mode: str, direction: str = "proponents",
           candidates: int | None = None) -> list[Hit]:
    """Top-k rows of an opened index for a query vector, with the candidate count its manifest asks
    (or `candidates`)."""
    factor = index.manifest.faiss.rerank_factor
    return rerank_search(index.faiss[mode], index.vectors, index.norms, q, k, mode, factor, direction, candidates)


def exact_search(index: Index, rows: np.ndarray, q: np.ndarray, k: int, mode: str, direction: str = "proponents",
                 block: int = SCAN_BLOCK_ROWS) -> list[Hit]:
    """Top-k of `rows` (ascending) by exact float64 score, read from the stored vectors in blocks: the
    search behind metadata filters, whose cost grows with the number of matching rows."""
    sign = DIRECTIONS[direction]
    kept_rows, kept = np.empty(0, np.int64), np.empty(0)
    for s in range(0, len(rows), block):
        r = rows[s : s + block]
        scores = COMPACT.scores(index, r, q, mode)
        kept_rows, kept = np.concatenate([kept_rows, r]), np.concatenate([kept, scores])
        if len(kept) > k:  # the best k so far (an exact tie at the k-th score keeps either row)
            top = np.argpartition(-sign * kept, k - 1)[:k]
            kept_rows, kept = kept_rows[top], kept[top]
    order = np.lexsort((kept_rows, -sign * kept))[:k]
    return [Hit(int(kept_rows[i]), float(kept[i])) for i in order]


def rank(index: Index, fast_q: np.ndarray, k: int, mode: str, direction: str = "proponents",
         rows: np.ndarray | None = None, high_q: np.ndarray | None = None, depth: int = 0,
         text: str = "", keyword_depth: int = KEYWORD_DEPTH) -> list[Hit]:
    """The top k for one query: the compact vector `fast_q` ranks the index (or `rows` only, exactly);
    with `high_q` (the query's high-fidelity vector) its top max(k, depth), with the best `keyword_depth`
    documents of a keyword search for `text` (proponents only), are rescored by the high-fidelity stage
    and the best k of them returned, best first (ties by row)."""
    depth = max(k, depth) if high_q is not None else k
    # The high stage needs the compact vectors' top `depth` roughly right, not their exact k: 4 x depth
    # FAISS candidates reranked exactly (rerank_factor x that read ~160 MB a query at depth 150 and 100k).
    hits = (search(index, fast_q, depth, mode, direction, candidates=HIGH_CANDIDATES_PER_DEPTH * depth if high_q is not None else None)
            if rows is None else exact_search(index, rows, fast_q, depth, mode, direction))
    if high_q is None or not hits:
        return hits
    cand = np.array([h.row for h in hits])
    if text and keyword_depth > 0 and direction == "proponents":
        keyword = index.keyword_rows(text, keyword_depth)
        cand = np.union1d(cand, keyword if rows is None else np.intersect1d(keyword, rows))
    scores = HIGH.scores(index, cand, high_q, mode)
    order = np.lexsort((cand, -DIRECTIONS[direction] * scores))[:k]
    return [Hit(int(cand[i]), float(scores[i]), "high") for i in order]
