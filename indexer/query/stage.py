"""What a stage of an index is, in one place: the compact stage ("fast") or the high-fidelity one
("high"), its engine (the LoGra projector and fitted preconditioner the index was built with), the
basis its rows are stored in, how they are read from the index, and the scoring rule (influence or
cosine). Ranking, valuation, the token view and bulk attribution all go through it; and
`stage_vectors` gives any set of stages' query vectors from one forward and backward pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engine import Encoded, LoGra, Preconditioner, collate, joint_gradients

from ..store import Index

__all__ = ["MODES", "STAGES", "Stage", "stage_vectors"]

STAGES = ("fast", "high")
MODES = ("influence", "cosine")
SCORE_BLOCK_BYTES = 512 << 20  # stored rows scored per block, as float64


@dataclass(frozen=True)
class Stage:
    """One stage of an index.

    - "fast": the compact vectors, whitened (v = H^-1/2 g) in the original basis, stored as vectors
      (float32, or int8 unit rows times their norms) with their norms; FAISS indexes them.
    - "high": the high-fidelity vectors, whitened in the preconditioner's K-FAC eigenbasis (an
      orthogonal change of basis: inner products and norms as in the original), stored as unit rows
      (float16, int8 or int4) with their float32 norms apart.

    With its engine (`logra`, `pre`) a stage turns projected gradients into query vectors in the basis
    its rows are stored in (`vectors`); without one (a process with no model) it still reads and
    scores the stored rows.

    The scoring rule, for a query vector q and a document's vector d of the same stage: influence
    q . d (= g_q^T H^-1 g_d); cosine q . d / (|q| |d|), 0 where either is zero. It is written as a
    stored row times a factor of its norm (`factors`), against q times a factor of |q| (`query_scales`),
    so that a score is one product and a sum of scores (valuation) is a product with a sum."""
    name: str
    logra: LoGra | None = None
    pre: Preconditioner | None = None

    def __post_init__(self):
        if self.name not in STAGES:
            raise ValueError(f"a stage is one of {STAGES}, not {self.name!r}")

    @property
    def eigenbasis(self) -> bool:
        """Whether the vectors are in the preconditioner's eigenbasis (the high stage) rather than
        the original basis."""
        return self.name == "high"

    @property
    def unit_rows(self) -> bool:
        """Whether the stored rows are unit rows with the norms apart (the high stage) rather than
        the vectors themselves."""
        return self.name == "high"

    @property
    def dim(self) -> int:
        return self.logra.dim

    # -- query vectors -------------------------------------------------------------------------------

    def vectors(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, dim) float32 vectors of projected gradients (LoGra.gradients' grads) in the basis
        this stage's rows are stored in: the compact stage's whitened in float64 arithmetic in the
        original basis (as build._write_vectors whitens the documents', and engine.query_vectors a
        query's), the high stage's in float32 in the eigenbasis (as build.HighStage.vectors, and
        engine.pair_vectors)."""
        if self.eigenbasis:
            return self.pre.apply(grads, eigenbasis=True, dtype=torch.float32)
        return self.pre.apply(grads)

    # -- stored rows and the scoring rule ------------------------------------------------------------

    def width(self, index: Index) -> int:
        """The stored rows' dimension."""
        return index.high_store.dim if self.unit_rows else index.vectors.shape[1]

    def norms(self, index: Index) -> np.ndarray:
        """Every document's float32 norm of this stage's vector."""
        return index.high_norms if self.unit_rows else index.norms

    def rows(self, index: Index, rows) -> np.ndarray:
        """The stored rows of `rows` (row numbers or a slice), float32, writable (a new array where
        the index's own is a read-only map): the compact vectors, or the high stage's unit rows."""
        if self.unit_rows:
            return index.high_rows(rows)
        return np.require(index.vectors[rows], np.float32, ["W"])

    @staticmethod
    def factors(norms: np.ndarray, mode: str, unit_rows: bool) -> np.ndarray | None:
        """float64 factor of each stored row (with these norms) in `mode`'s score (None: 1 for every
        row): influence scales unit rows back by their norms; cosine divides full vectors by theirs
        (a zero vector: 0)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        n = np.asarray(norms, dtype=np.float64)
        if mode == "influence" and unit_rows:
            return n
        if mode == "cosine" and not unit_rows:
            return np.divide(1.0, n, out=np.zeros_like(n), where=n > 0)
        return None

    def row_factors(self, norms: np.ndarray, mode: str) -> np.ndarray | None:
        """`factors` of this stage's stored rows."""
        return self.factors(norms, mode, self.unit_rows)

    @staticmethod
    def query_scales(queries: np.ndarray, mode: str) -> np.ndarray:
        """float64 factor of each query vector (rows of `queries`) in `mode`'s score: 1 for influence,
        1/|q| for cosine (0 for a zero vector)."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float64))
        if mode == "influence":
            return np.ones(len(q))
        n = np.linalg.norm(q, axis=1)
        return np.divide(1.0, n, out=np.zeros_like(n), where=n > 0)

    def score_rows(self, x: np.ndarray, norms: np.ndarray, q: np.ndarray, mode: str) -> np.ndarray:
        """float64 scores of stored rows `x` (as `rows` reads them) with their `norms` for the query
        vector q: the scoring rule (cosine clipped to [-1, 1] against rounding)."""
        q64 = np.asarray(q, dtype=np.float64).ravel()
        # the high stage's unit rows in float32 (as decoded): a float64 copy of 150-200 rows of 65k dims would
        # double a high-precision query's rescoring time for ~1e-7 relative; the compact rows in float64
        scores = ((x @ q64.astype(np.float32)).astype(np.float64) if self.unit_rows
                  else np.asarray(x, dtype=np.float64) @ q64)
        f = self.row_factors(norms, mode)
        if f is not None:
            scores *= f
        if mode == "cosine":
            scores = np.clip(scores * self.query_scales(q64, mode)[0], -1.0, 1.0)
        return scores

    def scores(self, index: Index, rows: np.ndarray, q: np.ndarray, mode: str) -> np.ndarray:
        """float64 scores of `rows` for query vector q from the index's stored rows, read in file order
        a block at a time (SCORE_BLOCK_BYTES)."""
        rows = np.asarray(rows, dtype=np.int64)
        norms = self.norms(index)
        out = np.zeros(len(rows))
        order = np.argsort(rows, kind="stable")
        block = max(1, SCORE_BLOCK_BYTES // (8 * self.width(index)))
        for s in range(0, len(rows), block):
            at = order[s : s + block]
            r = rows[at]
            out[at] = self.score_rows(self.rows(index, r), norms[r], q, mode)
        return out

    def scaled(self, index: Index, rows, mode: str) -> np.ndarray:
        """float64 stored rows times their factors: a score is a row's product with the query vector
        times the query's factor (`query_scales`), token by token too (the token view)."""
        x = self.rows(index, rows).astype(np.float64)
        f = self.row_factors(self.norms(index)[rows], mode)
        return x if f is None else x * f[:, None]


def stage_vectors(stages: Sequence[Stage], tokenizer, encoded: Sequence[Encoded]) -> list[torch.Tensor]:
    """Each stage's (len(encoded), dim) float32 query vectors (Stage.vectors) from one forward and
    backward pass of the model, however many stages (engine.joint_gradients: the model's work is
    shared, only the projections are per stage). Each equals the stage's own pass's to float rounding."""
    batch = collate(list(encoded), tokenizer.pad_token_id)
    outs = joint_gradients([s.logra for s in stages], batch, [False] * len(stages))
    return [s.vectors(o.grads) for s, o in zip(stages, outs)]
