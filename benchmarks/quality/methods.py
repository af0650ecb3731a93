"""Every method's scores on the fine-tuned model: a (queries x documents) matrix per method, plus
its self-retrieval@1 (each fine-tune document as the query), bytes per document and seconds per query.

- `default fast` / `default high`: the shipped defaults end to end (`indexer.build_index`, then
  `api.search.Attributor.attribute`; see default_scores).
- `fast ...`: compact-vector settings (dimension budget, head share, preconditioner) through the
  engine functions the indexer and API use; `logra rR`: the previous default (rank R, no head).
- `high ...`: high-fidelity stage settings, every document scored (k = all).
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

MODES = ("influence", "cosine")
DAMPING = 0.1  # the engine's default (fraction of the mean eigenvalue)
# A damping sweep for full-gradient EK-FAC, so the reference is not left at an untuned damping.
DAMPING_SWEEP = (0.01, 0.03, 0.3, 1.0)
TIMED_QUERIES = 20
# Where the compact vectors' dimensions go (engine.budget): (budget, head_share, preconditioner, damping).
# head_share None: the LM head untracked. The first is the shipped default (BuildConfig.budget, ...); the
# large budgets are candidates for the stored high-fidelity vectors (BuildConfig.high_budget, ...:
# 65536 at 0.75 is the shipped one).
FAST_GRID = ((4096, 0.5, "ekfac", 0.01), (2048, 0.5, "ekfac", 0.01), (2048, 0.5, "raw", 0.1),
             (512, 0.5, "raw", 0.1), (1024, 0.5, "raw", 0.1), (4096, 0.5, "raw", 0.1),
             (2048, None, "raw", 0.1), (2048, 0.25, "raw", 0.1), (2048, 0.75, "raw", 0.1), (2048, 1.0, "raw", 0.1),
             (2048, 0.5, "none", 0.1), (2048, 0.5, "ekfac", 0.1), (2048, 0.5, "raw", 0.01),
             (2048, 0.25, "ekfac", 0.1), (2048, 0.25, "ekfac", 0.01), (1024, 0.25, "ekfac", 0.01), (4096, 0.25, "ekfac", 0.01),
             (2048, 0.125, "raw", 0.1), (2048, 0.5, "ekfac", 0.03), (1024, 0.5, "ekfac", 0.01),
             (2048, 0.75, "ekfac", 0.01), (16384, 0.75, "ekfac", 0.01), (32768, 0.75, "ekfac", 0.01),
             (32768, 0.9, "ekfac", 0.01), (65536, 0.75, "ekfac", 0.01), (65536, 0.9, "ekfac", 0.01),
             # the real model's grid (chat.GRID) asked these of the toys
             (4096, 0.75, "ekfac", 0.01), (4096, 0.9, "ekfac", 0.01), (65536, 1.0, "ekfac", 0.01))
QUICK_FAST = FAST_GRID[:1]
LEGACY = ((8, "raw"),)  # the previous default: rank 8 on the blocks' layers, no head
# Larger representations, recomputed from the texts: (max_side, preconditioner, damping, head, head_whole).
# max_side None: every side whole (exact full-gradient EK-FAC: the references). head_whole: the head's
# vocabulary side kept whole with a diagonal factor. The first was the previous high-fidelity stage
# (candidates' gradients recomputed at query time; docs/quality.md "Two stages" says why it was replaced).
HIGH_GRID = ((256, "ekfac", 0.1, True, True), (None, "ekfac", 0.1, True, False), (None, "ekfac", 0.1, False, False),
             (256, "ekfac", 0.1, True, False), (256, "ekfac", 0.01, True, False), (256, "kfac", 0.1, True, False),
             (64, "ekfac", 0.1, True, False), (128, "ekfac", 0.1, True, True), (256, "ekfac", 0.01, True, True),
             (64, "ekfac", 0.1, True, True), (256, "kfac", 0.1, True, True), (256, "ekfac", 0.1, "only", True),
             (256, "ekfac", 0.01, "only", True))
QUICK_HIGH = HIGH_GRID[:1]
DEPTHS = (10, 25, 50, 100, 200, 400)  # high-stage rescoring depths whose top-10 agreement is measured


def _self_at1(q: np.ndarray, d: np.ndarray, cosine: bool) -> float:
    s = dot_scores(q, d, cosine)
    return float(np.mean(s.argmax(axis=1) == np.arange(len(s))))


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "module": r["module"]}, ensure_ascii=False) + "\n")


def _tag(damping: float) -> str:
    return "" if damping == DAMPING else f" d{damping:g}"


def fast_name(budget: int, head_share: float | None, pre: str, damping: float) -> str:
    return f"fast b{budget} {'nohead' if head_share is None else f'h{head_share:g}'} {pre}{_tag(damping)}"


def high_name(side: int | None, pre: str, damping: float, head: bool, head_whole: bool = False) -> str:
    which = {True: "", False: " nohead", "only": " headonly"}[head]
    return f"high s{side or 'full'}{' headwhole' if head_whole else ''} {pre}{_tag(damping)}{which}"


def _fit(logra, tokenizer, kind: str, damping: float, encoded: list, batch: int = 32):
    """A preconditioner fitted on the documents as the indexer's high stage fits it."""
    from engine import Preconditioner, fit_preconditioner
    pre = Preconditioner(kind, logra.shapes, damping_ratio=damping, diagonal_out=logra.diagonal_out)
    return fit_preconditioner(logra, pre, tokenizer, [encoded[i : i + batch] for i in range(0, len(encoded), batch)])


def fitted_vectors(logra, tokenizer, docs: list[tuple[str, str]], queries: list[tuple[str, str]], kind: str,
                   damping: float, eigenbasis: bool) -> tuple[np.ndarray, np.ndarray]:
    """(queries, documents) float64 vectors of (prompt, response) pairs with a preconditioner fitted on
    the documents (_fit); `eigenbasis` as the high stage stores them (Preconditioner.apply)."""
    from engine import encode_pairs, pair_vectors
    pre = _fit(logra, tokenizer, kind, damping, encode_pairs(tokenizer, docs, logra.max_tokens))
    dv, qv = (pair_vectors(logra, pre, tokenizer, p, batch_size=32, eigenbasis=eigenbasis).double().numpy()
              for p in (docs, queries))
    return qv, dv


def engine_scores(model, tokenizer, config, pres: list[tuple[str, float]], name, train_texts: list[str],
                  queries: list[str], self_retrieval: bool = True) -> dict:
    """One LoGra configuration (engine.LoGraConfig), every (preconditioner, damping) in `pres`, both
    modes: document and query vectors through the engine, as the indexer and the API compute them."""
    from engine import LoGra, encode_pairs, pair_vectors
    logra = LoGra(model, config)
    enc = encode_pairs(tokenizer, [("", t) for t in train_texts], logra.max_tokens)
    out = {}
    for kind, damping in pres:
        t = time.perf_counter()
        pre = _fit(logra, tokenizer, kind, damping, enc)
        fit_sec = time.perf_counter() - t
        docs = pair_vectors(logra, pre, tokenizer, [("", x) for x in train_texts], batch_size=32).numpy()
        t = time.perf_counter()
        qv = pair_vectors(logra, pre, tokenizer, [("", q) for q in queries], batch_size=32).numpy()
        sec = (time.perf_counter() - t) / len(queries)
        for mode in MODES:
            out[f"{name(kind, damping)} {mode}"] = {
                "family": name(kind, damping).split()[0], "preconditioner": kind, "damping": damping, "mode": mode,
                "dim": logra.dim, "layers": logra.layer_spec(), "scores": dot_scores(qv, docs, mode == "cosine"),
                "self_at1": _self_at1(docs, docs, mode == "cosine") if self_retrieval else None,
                "vector_bytes_per_doc": logra.dim * 4, "index_bytes_per_doc": None, "seconds_per_query": sec,
                "fit_seconds": fit_sec}
    return out


def defaults_tag() -> str:
    """A digest of the shipped build defaults: cached default indexes and scores follow them."""
    from dataclasses import asdict

    from indexer import BuildConfig
    d = {k: v for k, v in asdict(BuildConfig(model="", data=[], out="")).items() if k not in ("model", "data", "out")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_index(gt: Path, work: Path, rows: list[dict]) -> Path:
    """An index of the fine-tune set built by `indexer.build_index` with the shipped defaults."""
    from indexer import BuildConfig, build_index
    data_file = work / "train.jsonl"
    if not data_file.exists():
        _write_jsonl(rows, data_file)
    out = work / f"index-default-{defaults_tag()}"
    if not (out / "manifest.json").exists():
        build_index(BuildConfig(model=str(gt / "finetuned"), data=[str(data_file)], out=str(out), max_tokens=data.MAX_TOKENS,
                                batch_size=32, progress=False, overwrite=True))
    return out


def default_scores(gt: Path, work: Path, train_rows: list[dict], queries: list[str], spot_check: int = 3) -> dict:
    """The shipped defaults end to end: `build_index`, then `api.search.Attributor.attribute` with k =
    every document, precision fast ("default fast") and high ("default high": every document scored
    from its stored high-fidelity vector). The high scores are checked against the engine's own
    recomputation from the texts (`pair_vectors` with the index's high-stage projections and
    preconditioner, float32) on `spot_check` queries. Also every query's default answer (k = 10,
    precision high) and its time, for the top-10 agreement."""
    from api.search import Attributor
    from engine import pair_vectors
    from indexer.store import vector_bytes_per_document
    index_dir = default_index(gt, work, train_rows)
    attr = Attributor(index_dir)
    s = attr.current()
    n = len(s.index)
    row_of = np.array([s.index.row_of_id[r["id"]] for r in train_rows])
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    high_logra, high_pre = s.high.logra, s.high.pre
    checked = min(spot_check, len(queries))
    hd = pair_vectors(high_logra, high_pre, attr.tokenizer, [("", r["text"]) for r in train_rows], batch_size=32).numpy()
    hq = pair_vectors(high_logra, high_pre, attr.tokenizer, [("", q) for q in queries[:checked]], batch_size=32).numpy()
    hd_norm, hq_norm = np.linalg.norm(hd, axis=1).astype(np.float64), np.linalg.norm(hq, axis=1).astype(np.float64)
    h_dot = (hq @ hd.T).astype(np.float64)
    stored_high = s.index.high_rows(row_of)  # unit rows
    out = {}
    for mode in MODES:
        scores = {p: np.zeros((len(queries), n)) for p in ("fast", "high")}
        for prec in ("fast", "high"):
            for qi, text in enumerate(queries):
                hits, _, _ = attr.attribute("", text, n, mode, precision=prec)
                by_row = {h.row: h.score for h in hits}
                scores[prec][qi] = [by_row[r] for r in row_of]
        engine = h_dot / np.outer(hq_norm, hd_norm) if mode == "cosine" else h_dot
        worst = max(float(np.abs(scores["high"][qi] - engine[qi]).max() / np.abs(engine[qi]).max()) for qi in range(checked))
        top10, secs = [], {}
        for prec in ("fast", "high"):
            t = time.perf_counter()
            for qi, text in enumerate(queries):
                hits, _, _ = attr.attribute("", text, 10, mode, precision=prec)
                if prec == "high":
                    pos = {r: i for i, r in enumerate(row_of)}
                    top10.append([pos[h.row] for h in hits])
            secs[prec] = (time.perf_counter() - t) / len(queries)
        common = {"family": "default", "mode": mode, "index_bytes_per_doc": size / n}
        # self-retrieval: a document sent as the query encodes exactly as it was indexed, so its query
        # vector is its stored vector (tests/test_api.py checks this through the API)
        stored = np.asarray(s.index.vectors)[row_of]
        high_stored = stored_high if mode == "cosine" else stored_high * s.index.high_norms[row_of][:, None]
        out[f"default fast {mode}"] = {**common, "dim": s.index.manifest.dim, "scores": scores["fast"],
                                       "self_at1": _self_at1(stored, stored, mode == "cosine"),
                                       "vector_bytes_per_doc": vector_bytes_per_document(s.index.manifest, "fast"),
                                       "seconds_per_query": secs["fast"]}
        out[f"default high {mode}"] = {**common, "dim": s.high.dim, "scores": scores["high"], "api_k10_top": np.array(top10),
                                       "self_at1": _self_at1(high_stored, high_stored, mode == "cosine"),
                                       "api_max_rel_error": worst, "high_depth": attr.high_depth,
                                       "vector_bytes_per_doc": vector_bytes_per_document(s.index.manifest, "high"),
                                       "seconds_per_query": secs["high"]}
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


CACHED_ONLY = False  # `run --cached`: tables from the scores already computed, nothing new


def _cached(work: Path, key: str, compute) -> dict:
    """Scores are cached in the scratch folder (per fine-tuned model), so a rerun after an
    interruption redoes only what is missing."""
    path = work / "scores" / (key.replace(" ", "_") + ".pkl")
    if path.exists():
        with path.open("rb") as f:
            return pickle.load(f)
    if CACHED_ONLY:
        return {}
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(out, f)
    return out


def all_scores(gt: Path, work: Path, quick: bool = False, only: list[str] | None = None, log=print) -> dict:
    """Every method's results (see module doc). `quick`: the shipped defaults, the first fast and high
    settings and the baselines only. `only`: restrict to these method names (the brittleness stage)."""
    from engine import LoGraConfig
    tr, qr = data.load_rows(gt)
    train_texts, queries = [r["text"] for r in tr], [r["text"] for r in qr]
    digest = hashlib.sha256((gt / "finetuned" / "model.safetensors").read_bytes()).hexdigest()[:12]
    work = work / digest  # indexes and cached scores belong to one fine-tuned model
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_finetuned(gt)
    want = (lambda name: only is None or name in only)
    wants = (lambda prefix: only is None or any(n.startswith(prefix + " ") for n in only))
    results = {}
    if wants("default fast") or wants("default high"):
        t = time.time()
        results.update(_cached(work, f"default-{defaults_tag()}", lambda: default_scores(gt, work, tr, queries)))
        log(f"defaults: {time.time() - t:.0f} s")
    if any(want(n) for n in ("full-dot", "full-cosine", "full-ekfac", "full-ekfac-cosine")):
        def full():
            t = time.time()
            ref = full_gradients(model, tokenizer, train_texts, data.MAX_TOKENS, factors=True)
            log(f"full gradients of {len(train_texts)} documents: {time.time() - t:.0f} s")
            return reference_scores(model, tokenizer, ref, train_texts, queries, self_retrieval=only is None)
        results.update(_cached(work, "full-sweep" if only is None else "full-noself", full))
    if want("bm25") or want("random"):
        results.update(_cached(work, "text", lambda: text_scores(train_texts, queries)))
    max_tokens = data.MAX_TOKENS
    for budget, share, pre, damping in (QUICK_FAST if quick else FAST_GRID):
        name = fast_name(budget, share, pre, damping)
        if wants(name):
            cfg = LoGraConfig(budget=budget, head_share=share or 0.0, head=share is not None, max_tokens=max_tokens)
            t = time.time()
            results.update(_cached(work, name, lambda: engine_scores(
                model, tokenizer, cfg, [(pre, damping)], lambda k, d: fast_name(budget, share, k, d), train_texts, queries)))
            log(f"{name}: {time.time() - t:.0f} s")
    for rank, pre in (() if quick else LEGACY):
        name = f"logra r{rank} {pre}"
        if wants(name):
            cfg = LoGraConfig(rank=rank, head=False, max_tokens=max_tokens)
            results.update(_cached(work, name, lambda: engine_scores(
                model, tokenizer, cfg, [(pre, DAMPING)], lambda k, d: f"logra r{rank} {k}{_tag(d)}", train_texts, queries)))
    for side, pre, damping, head, whole in (QUICK_HIGH if quick else HIGH_GRID):
        name = high_name(side, pre, damping, head, whole)
        if wants(name):
            cfg = LoGraConfig(max_side=side or 10**9, head=bool(head), head_only=head == "only", head_whole=whole,
                              max_tokens=max_tokens)
            t = time.time()
            results.update(_cached(work, name, lambda: engine_scores(
                model, tokenizer, cfg, [(pre, damping)], lambda k, d: high_name(side, k, d, head, whole), train_texts, queries,
                self_retrieval=False)))
            log(f"{name}: {time.time() - t:.0f} s")
    if only is not None:
        results = {k: v for k, v in results.items() if k in only}
    return results
