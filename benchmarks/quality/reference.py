"""Independent baselines: full (unprojected) per-example gradients over the engine's tracked layers,
their dot product and cosine, full-gradient EK-FAC influence, BM25 on the text, Spearman.

Per-example gradients come from plain autograd, one document at a time (no padding, no hooks on
the weight gradient): the parameter gradient of the document's summed token loss w.r.t. each
tracked layer's weight, as an (out, in) matrix (GPT-2's Conv1D stores (in, out): transposed here).
EK-FAC (George et al. 2018; Grosse et al. 2023), per layer: A = E_tokens[x x^T] over layer inputs,
S = E_tokens[g g^T] over output gradients, eigenbases Q_A, Q_S; the eigenvalues are replaced by
the per-document gradients' second moments in that basis, Lam = E_docs[(Q_S^T G Q_A)^2]; damping
lambda = 0.1 x mean(Lam) as in the engine; H^-1 G = Q_S ((Q_S^T G Q_A) / (Lam + lambda)) Q_A^T.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from engine import collate, encode, find_tracked_layers, per_example_loss


# ------------------------------------------------------------------------------------- statistics

def rankdata(a: np.ndarray, axis: int = 0) -> np.ndarray:
    """Ranks along `axis`, ties given their average rank (as scipy.stats.rankdata)."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    out = np.empty_like(a)
    flat, res = a.reshape(-1, a.shape[-1]), out.reshape(-1, a.shape[-1])
    for i, row in enumerate(flat):
        order = np.argsort(row, kind="mergesort")
        sorted_row = row[order]
        # boundaries of runs of equal values
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_row)) + 1]
        ends = np.r_[starts[1:], len(row)]
        ranks = np.empty(len(row))
        for s, e in zip(starts, ends):
            ranks[s:e] = (s + e - 1) / 2 + 1
        res[i, order] = ranks
    return np.moveaxis(out, -1, axis)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman correlation of x and y along `axis` (NaN where one side is constant)."""
    rx, ry = rankdata(x, axis), rankdata(y, axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    den = np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=axis) / den


# ------------------------------------------------------------------------------ full gradients

@dataclass
class FullGradients:
    names: list[str]
    shapes: list[tuple[int, int]]  # (out, in) per layer
    grads: np.ndarray  # (n, dim) float32, layers concatenated, each (out, in) row-major
    losses: np.ndarray  # (n,)
    A: dict[str, torch.Tensor] | None = None  # layer -> (in, in) mean x x^T over tokens (float64)
    S: dict[str, torch.Tensor] | None = None  # layer -> (out, out) mean g g^T over tokens (float64)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for o, i in self.shapes:
            out.append(flat[:, start : start + o * i].reshape(-1, o, i))
            start += o * i
        return out


def full_gradients(model, tokenizer, texts: list[str], max_tokens: int, factors: bool = False) -> FullGradients:
    """Per-example gradients of each text's summed token loss w.r.t. every tracked layer's weight."""
    layers = find_tracked_layers(model)
    conv = [not isinstance(l.module, torch.nn.Linear) for l in layers]
    weights = [l.module.weight for l in layers]
    flags = [w.requires_grad for w in weights]
    shapes = [(l.out_features, l.in_features) for l in layers]
    A = {l.name: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for l in layers}
    S = {l.name: torch.zeros(l.out_features, l.out_features, dtype=torch.float64) for l in layers}
    n_tok = 0
    handles = []
    if factors:
        def hook(name):
            def fwd(_m, inputs, output):
                x = inputs[0].detach()[0].double()
                A[name] += x.T @ x
                def bwd(g):
                    g = g.detach()[0].double()
                    S[name].add_(g.T @ g)
                output.register_hook(bwd)
            return fwd
        handles = [l.module.register_forward_hook(hook(l.name)) for l in layers]
    grads, losses = [], []
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for text in texts:
                batch = collate([encode(tokenizer, "", text, max_tokens)], tokenizer.pad_token_id)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                loss = per_example_loss(logits, batch["labels"])[0]
                gs = torch.autograd.grad(loss, weights)
                grads.append(torch.cat([(g.T if c else g).reshape(-1) for g, c in zip(gs, conv)]).numpy().astype(np.float32))
                losses.append(float(loss.detach()))
                n_tok += batch["input_ids"].shape[1]
    finally:
        for h in handles:
            h.remove()
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    out = FullGradients([l.name for l in layers], shapes, np.stack(grads), np.array(losses))
    if factors:
        out.A = {k: v / n_tok for k, v in A.items()}
        out.S = {k: v / n_tok for k, v in S.items()}
    return out


def dot_scores(q: np.ndarray, d: np.ndarray, cosine: bool = False) -> np.ndarray:
    s = q.astype(np.float64) @ d.astype(np.float64).T
    if cosine:
        qn = np.linalg.norm(q.astype(np.float64), axis=1)[:, None]
        dn = np.linalg.norm(d.astype(np.float64), axis=1)[None, :]
        s = np.divide(s, qn * dn, out=np.zeros_like(s), where=(qn * dn) > 0)
    return s


class EKFAC:
    """Full-gradient EK-FAC, fitted on the training documents' gradients and K-FAC factors."""

    def __init__(self, train: FullGradients, damping_ratio: float = 0.1):
        self.shapes = train.shapes
        self.bases, self.scales = [], []
        for name, G in zip(train.names, train.split(train.grads)):
            _, qa = torch.linalg.eigh(train.A[name])
            _, qs = torch.linalg.eigh(train.S[name])
            qs, qa = qs.numpy(), qa.numpy()
            rot = np.einsum("so,nsi,ia->noa", qs, G.astype(np.float64), qa, optimize=True)
            lam = (rot**2).mean(axis=0)
            damp = damping_ratio * lam.mean()
            self.bases.append((qs, qa))
            self.scales.append(1.0 / (lam + damp))

    def precondition(self, flat: np.ndarray) -> np.ndarray:
        """H^-1 g for each row of `flat` (n, dim)."""
        parts, start = [], 0
        for (o, i), (qs, qa), scale in zip(self.shapes, self.bases, self.scales):
            G = flat[:, start : start + o * i].reshape(-1, o, i).astype(np.float64)
            rot = np.einsum("so,nsi,ia->noa", qs, G, qa, optimize=True) * scale
            parts.append(np.einsum("os,nsa,ia->noi", qs, rot, qa, optimize=True).reshape(len(flat), -1))
            start += o * i
        return np.concatenate(parts, axis=1)


# ------------------------------------------------------------------------------------------ BM25

_WORD = re.compile(r"[a-z0-9_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_scores(queries: list[str], docs: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 (Robertson-Sparck Jones idf with +1 smoothing, as Lucene) of every (query, doc)."""
    tokenized = [_words(d) for d in docs]
    n = len(docs)
    avgdl = sum(len(t) for t in tokenized) / max(n, 1)
    df = Counter(w for t in tokenized for w in set(t))
    idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}
    tfs = [Counter(t) for t in tokenized]
    out = np.zeros((len(queries), n))
    for qi, q in enumerate(queries):
        words = _words(q)
        for di, (tf, t) in enumerate(zip(tfs, tokenized)):
            norm = k1 * (1 - b + b * len(t) / avgdl)
            out[qi, di] = sum(idf[w] * tf[w] * (k1 + 1) / (tf[w] + norm) for w in words if w in tf)
    return out
