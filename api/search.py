"""The attribution service: an opened index plus the model that built it. A query is one forward
and backward pass (through `engine`, as for documents), FAISS candidates, and an exact rerank
against the stored vectors."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import LoGra, LoGraConfig, Preconditioner, load_model, model_fingerprint, query_vectors
from indexer.store import Index, unit_rows


class ModelMismatchError(RuntimeError):
    """The model given to serve an index is not the model that built it."""


class QueryError(ValueError):
    """A well-formed request the index cannot answer (e.g. nothing to score)."""


@dataclass
class Hit:
    row: int
    score: float


class Attributor:
    def __init__(self, index_dir: str | Path, model: str | None = None, device: str = "cpu"):
        self.index = Index.open(index_dir)
        m = self.index.manifest
        self.model_name = model or m["model"]["name_or_path"]
        self.model, self.tokenizer = load_model(self.model_name, device=device, dtype=m["model"].get("dtype", "float32"))
        fingerprint = model_fingerprint(self.model)
        if fingerprint != m["model"]["fingerprint"]:
            raise ModelMismatchError(
                f"model {self.model_name!r} (fingerprint {fingerprint}) is not the model that built {index_dir} "
                f"({m['model']['name_or_path']!r}, fingerprint {m['model']['fingerprint']})")
        self.logra = LoGra(self.model, LoGraConfig(rank=m["rank"], seed=m["seed"], include=m["include"],
                                                   exclude=m["exclude"], max_tokens=m["max_tokens"]))
        if [l["name"] for l in self.logra.layer_spec()] != [l["name"] for l in m["layers"]]:
            raise ModelMismatchError(f"{self.model_name!r} does not have the layers recorded in {index_dir}")
        # The stored projections are the ones the documents used, whatever this torch's RNG does.
        for name, p in self.index.state["projections"].items():
            self.logra.projections[name] = (p["in"].to(self.logra.projections[name][0].device),
                                            p["out"].to(self.logra.projections[name][1].device))
        self.preconditioner = Preconditioner.from_state_dict(self.index.state["preconditioner"])
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

    def search(self, q: np.ndarray, k: int, mode: str) -> list[Hit]:
        """Top-k rows for a query vector: FAISS proposes candidates, exact scores rank them."""
        n = len(self.index)
        k = min(k, n)
        q = q.astype(np.float32)[None, :]
        probe = unit_rows(q) if mode == "cosine" else q
        n_candidates = n if n <= 4 * k else min(n, max(4 * k, k + 64))
        _, cand = self.index.faiss[mode].search(probe, n_candidates)
        cand = np.unique(cand[0][cand[0] >= 0])
        exact = self.index.vectors[cand].astype(np.float64) @ q[0].astype(np.float64)
        if mode == "cosine":
            denom = self.index.norms[cand].astype(np.float64) * float(np.linalg.norm(q))
            exact = np.divide(exact, denom, out=np.zeros_like(exact), where=denom > 0)
        order = np.lexsort((cand, -exact))[:k]  # best first; ties broken by row for reproducibility
        return [Hit(int(cand[i]), float(exact[i])) for i in order]

    def document(self, doc_id: str) -> dict | None:
        row = self.index.row_of_id.get(doc_id)
        return None if row is None else self.index.documents([row])[0]
