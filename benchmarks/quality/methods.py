"""Every method's scores on the fine-tuned model: a (queries x documents) matrix per method, plus
its self-retrieval@1 (each fine-tune document as the query), bytes per document and seconds per query.

- `logra`: the engine's public path: `indexer.build_index` writes an index of the fine-tune set,
  `api.search.Attributor.attribute` answers each query with exact scores for every document
  (k = number of documents); self-retrieval goes through `engine.query_vectors` with the index's
  own projections and preconditioner.
- `logra-pca`: the engine API with PCA projections (top eigenvectors of each layer's input and
  output-gradient covariances, from the reference pass) put in place of the random ones: the
  indexer has no PCA option, so these configurations do not go through build_index.
- `full-dot`, `full-cosine`, `full-ekfac`, `full-ekfac-cosine`: reference.py on unprojected gradients.
- `bm25` on the text, `random`.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from . import data
from .reference import EKFAC, bm25_scores, dot_scores, full_gradients

RANKS = (4, 8, 16, 32)
PRECONDITIONERS = ("none", "raw", "kfac", "ekfac")
MODES = ("influence", "cosine")
DAMPING = 0.1  # the engine's default (fraction of the mean eigenvalue)
# A damping sweep beside the grid, for the engine's default preconditioner at two ranks, and for
# full-gradient EK-FAC (so neither side of the comparison is left at an untuned damping).
DAMPING_SWEEP = (0.01, 0.03, 0.3, 1.0)
SWEEP_SETTINGS = ((8, "raw"), (16, "raw"))
QUICK_SETTING = (8, "raw")  # the engine's default: the one logra setting `run --quick` scores
TIMED_QUERIES = 20


def _self_at1(q: np.ndarray, d: np.ndarray, cosine: bool) -> float:
    s = dot_scores(q, d, cosine)
    return float(np.mean(s.argmax(axis=1) == np.arange(len(s))))


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "module": r["module"]}, ensure_ascii=False) + "\n")


def _tag(damping: float) -> str:
    return "" if damping == DAMPING else f" d{damping:g}"


def logra_index(gt: Path, work: Path, rank: int, pre: str, rows: list[dict], damping: float = DAMPING) -> Path:
    from indexer import BuildConfig, build_index
    data_file = work / "train.jsonl"
    if not data_file.exists():
        _write_jsonl(rows, data_file)
    out = work / f"index-r{rank}-{pre}{_tag(damping).replace(' ', '-')}"
    if not (out / "manifest.json").exists():
        build_index(BuildConfig(model=str(gt / "finetuned"), data=[str(data_file)], out=str(out), max_tokens=data.MAX_TOKENS,
                                batch_size=32, rank=rank, preconditioner=pre, damping=damping, progress=False,
                                overwrite=True))
    return out


def logra_scores(gt: Path, work: Path, rank: int, pre: str, train_rows: list[dict], queries: list[str],
                 damping: float = DAMPING) -> dict:
    """Both modes of one (rank, preconditioner, damping) index, through build_index + Attributor."""
    from api.search import Attributor
    from engine import query_vectors
    index_dir = logra_index(gt, work, rank, pre, train_rows, damping)
    attr = Attributor(index_dir)
    n = len(attr.index)
    row_of = np.array([attr.index.row_of_id[r["id"]] for r in train_rows])
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    tq, _ = query_vectors(attr.logra, attr.preconditioner, attr.tokenizer, [("", r["text"]) for r in train_rows])
    stored = np.asarray(attr.index.vectors)[row_of]
    out = {}
    for mode in MODES:
        scores = np.zeros((len(queries), n))
        for qi, text in enumerate(queries):
            hits, _ = attr.attribute("", text, n, mode)
            by_row = {h.row: h.score for h in hits}
            scores[qi] = [by_row[r] for r in row_of]
        t = time.perf_counter()
        for text in queries[:TIMED_QUERIES]:
            attr.attribute("", text, 10, mode)
        sec = (time.perf_counter() - t) / TIMED_QUERIES
        out[f"logra r{rank} {pre}{_tag(damping)} {mode}"] = {
            "family": "logra", "rank": rank, "init": "random", "preconditioner": pre, "damping": damping, "mode": mode,
            "dim": attr.index.manifest["dim"], "scores": scores,
            "self_at1": _self_at1(tq.numpy(), stored, mode == "cosine"),
            "vector_bytes_per_doc": attr.index.manifest["dim"] * 4, "index_bytes_per_doc": size / n,
            "seconds_per_query": sec}
    return out


def pca_projections(ref, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(P_in, P_out) per layer: the top-`rank` eigenvectors (as rows) of E[x x^T] and E[g g^T]."""
    out = {}
    for name in ref.names:
        proj = []
        for cov in (ref.A[name], ref.S[name]):
            _, vecs = torch.linalg.eigh(cov)
            r = min(rank, cov.shape[0])
            proj.append(vecs[:, -r:].flip(1).T.float().contiguous())
        out[name] = tuple(proj)
    return out


def logra_pca_scores(model, tokenizer, ref, rank: int, train_texts: list[str], queries: list[str]) -> dict:
    """Every preconditioner and mode at one rank, PCA projections, through the engine API."""
    from engine import LoGra, LoGraConfig, Preconditioner, encode_pairs, projected_gradients, query_vectors
    logra = LoGra(model, LoGraConfig(rank=rank, max_tokens=data.MAX_TOKENS))
    for name, (p_in, p_out) in pca_projections(ref, rank).items():
        assert p_in.shape == logra.projections[name][0].shape and p_out.shape == logra.projections[name][1].shape
        logra.projections[name] = (p_in, p_out)
    enc = encode_pairs(tokenizer, [("", t) for t in train_texts], logra.max_tokens)
    raw, stats = [], []
    for i in range(0, len(enc), 32):
        o = projected_gradients(logra, tokenizer, enc[i : i + 32], token_stats=True)
        raw.append(logra.flatten(o.grads))
        stats.append(o.token_stats)
    raw_all = torch.cat(raw)
    out = {}
    for pre_kind in PRECONDITIONERS:
        pre = Preconditioner(pre_kind, logra.shapes)
        for g, st in zip(raw, stats):
            pre.update(g, st)
        if pre.needs_second_pass:
            pre.update_second(raw_all)
        pre.finalize()
        docs = pre.apply(raw_all).numpy()
        t = time.perf_counter()
        qv = np.concatenate([query_vectors(logra, pre, tokenizer, [("", q)])[0].numpy() for q in queries])
        sec = (time.perf_counter() - t) / len(queries)
        for mode in MODES:
            out[f"logra-pca r{rank} {pre_kind} {mode}"] = {
                "family": "logra-pca", "rank": rank, "init": "pca", "preconditioner": pre_kind, "mode": mode,
                "dim": logra.dim, "scores": dot_scores(qv, docs, mode == "cosine"),
                "self_at1": _self_at1(docs, docs, mode == "cosine"), "vector_bytes_per_doc": logra.dim * 4,
                "index_bytes_per_doc": None, "seconds_per_query": sec}
    return out


def reference_scores(model, tokenizer, ref, train_texts: list[str], queries: list[str], self_retrieval: bool = True) -> dict:
    """Full-gradient dot / cosine / EK-FAC influence / EK-FAC cosine. Cosine for EK-FAC divides by
    the H^-1 norms sqrt(g^T H^-1 g), as the engine's cosine mode divides whitened vectors' norms."""
    t = time.perf_counter()
    qg = full_gradients(model, tokenizer, queries, data.MAX_TOKENS)
    grad_sec = (time.perf_counter() - t) / len(queries)
    ek = EKFAC(ref)
    d = ref.grads
    qpre = ek.precondition(qg.grads)
    dpre = ek.precondition(d).astype(np.float32)
    norms = {"dot": np.linalg.norm(d.astype(np.float64), axis=1),
             "ekfac": np.sqrt(np.maximum((dpre.astype(np.float64) * d).sum(axis=1), 0))}
    gram = {}
    if self_retrieval:  # (n, n) score matrices, float32: the largest products of the benchmark
        gram = {"dot": d @ d.T, "ekfac": dpre @ d.T}
    out = {}
    for name, base, q, cos in (("full-dot", "dot", qg.grads, False), ("full-cosine", "dot", qg.grads, True),
                               ("full-ekfac", "ekfac", qpre, False), ("full-ekfac-cosine", "ekfac", qpre, True)):
        t = time.perf_counter()
        scores = q.astype(np.float64) @ d.astype(np.float64).T
        if cos:
            scores = scores / np.where(norms[base] > 0, norms[base], np.inf)[None, :]
        sec = grad_sec + (time.perf_counter() - t) / len(queries)
        self_at1 = None
        if self_retrieval:
            s = gram[base] / np.where(norms[base] > 0, norms[base], np.inf)[None, :] if cos else gram[base]
            self_at1 = float(np.mean(s.argmax(axis=1) == np.arange(len(s))))
        out[name] = {"family": "full", "mode": "cosine" if cos else "influence", "dim": d.shape[1], "scores": scores,
                     "self_at1": self_at1, "vector_bytes_per_doc": d.shape[1] * 4,
                     "index_bytes_per_doc": None, "seconds_per_query": sec}
    for damping in DAMPING_SWEEP:  # scores only: self-retrieval would cost another (n x n x dim) product each
        ekd = EKFAC(ref, damping_ratio=damping)
        qd = ekd.precondition(qg.grads)
        dn = np.sqrt(np.maximum((ekd.precondition(d) * d).sum(axis=1), 0))
        for cos in (False, True):
            scores = qd @ d.astype(np.float64).T
            if cos:
                scores = scores / np.where(dn > 0, dn, np.inf)[None, :]
            out[f"full-ekfac{_tag(damping)}{'-cosine' if cos else ''}"] = {
                "family": "full", "mode": "cosine" if cos else "influence", "damping": damping, "dim": d.shape[1],
                "scores": scores, "self_at1": None, "vector_bytes_per_doc": d.shape[1] * 4,
                "index_bytes_per_doc": None, "seconds_per_query": None}
    return out


def text_scores(train_texts: list[str], queries: list[str], seed: int = 0) -> dict:
    t = time.perf_counter()
    bm = bm25_scores(queries, train_texts)
    sec = (time.perf_counter() - t) / len(queries)
    self_bm = bm25_scores(train_texts, train_texts)
    rnd = np.random.default_rng(seed)
    return {
        "bm25": {"family": "text", "mode": "bm25", "dim": None, "scores": bm,
                 "self_at1": float(np.mean(self_bm.argmax(1) == np.arange(len(train_texts)))),
                 "vector_bytes_per_doc": None, "index_bytes_per_doc": None, "seconds_per_query": sec},
        "random": {"family": "random", "mode": "random", "dim": None,
                   "scores": rnd.standard_normal((len(queries), len(train_texts))),
                   "self_at1": float(np.mean(rnd.standard_normal((len(train_texts),) * 2).argmax(1)
                                             == np.arange(len(train_texts)))),
                   "vector_bytes_per_doc": None, "index_bytes_per_doc": None, "seconds_per_query": 0.0},
    }


def load_finetuned(gt: Path):
    from engine import load_model
    return load_model(str(gt / "finetuned"))


def _cached(work: Path, key: str, compute) -> dict:
    """Scores are cached in the scratch folder (per fine-tuned model), so a rerun after an
    interruption redoes only what is missing."""
    path = work / "scores" / (key.replace(" ", "_") + ".pkl")
    if path.exists():
        with path.open("rb") as f:
            return pickle.load(f)
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(out, f)
    return out


def all_scores(gt: Path, work: Path, grid: bool = True, pca: bool = True, only: list[str] | None = None,
               log=print) -> dict:
    """Every method's results (see module doc). `only`: restrict to these method names (for the
    brittleness stage, which needs a few methods' scores)."""
    tr, qr = data.load_rows(gt)
    train_texts, queries = [r["text"] for r in tr], [r["text"] for r in qr]
    digest = hashlib.sha256((gt / "finetuned" / "model.safetensors").read_bytes()).hexdigest()[:12]
    work = work / digest  # indexes and cached scores belong to one fine-tuned model
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_finetuned(gt)
    want = (lambda name: only is None or name in only)
    results = {}
    t = time.time()
    ref = full_gradients(model, tokenizer, train_texts, data.MAX_TOKENS, factors=True)
    log(f"full gradients of {len(train_texts)} documents: {time.time() - t:.0f} s")
    if any(want(n) for n in ("full-dot", "full-cosine", "full-ekfac", "full-ekfac-cosine")):
        results.update(_cached(work, "full-sweep" if only is None else "full-noself", lambda: reference_scores(model, tokenizer, ref, train_texts, queries,
                                                                       self_retrieval=only is None)))
    if want("bm25") or want("random"):
        results.update(_cached(work, "text", lambda: text_scores(train_texts, queries)))
    for rank in RANKS:
        for pre in PRECONDITIONERS:
            names = [f"logra r{rank} {pre} {m}" for m in MODES]
            if (grid or only or (rank, pre) == QUICK_SETTING) and any(want(n) for n in names):
                t = time.time()
                results.update(_cached(work, f"logra r{rank} {pre}",
                                       lambda: logra_scores(gt, work, rank, pre, tr, queries)))
                log(f"logra r{rank} {pre}: {time.time() - t:.0f} s")
        for r, p in SWEEP_SETTINGS:
            if r == rank and grid and only is None:
                for damping in DAMPING_SWEEP:
                    results.update(_cached(work, f"logra r{rank} {p}{_tag(damping)}",
                                           lambda: logra_scores(gt, work, rank, p, tr, queries, damping)))
        if pca and any(want(f"logra-pca r{rank} {p} {m}") for p in PRECONDITIONERS for m in MODES):
            t = time.time()
            results.update(_cached(work, f"logra-pca r{rank}",
                                   lambda: logra_pca_scores(model, tokenizer, ref, rank, train_texts, queries)))
            log(f"logra-pca r{rank}: {time.time() - t:.0f} s")
    if only is not None:
        results = {k: v for k, v in results.items() if k in only}
    return results
