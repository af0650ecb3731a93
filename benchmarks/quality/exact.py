"""Would an exact top pay? (issue 28, part 3) Full-rank EK-FAC on the real model's high-stage blocks.

The high stage of the default index tracks the LM head (projected) and the last blocks (24 x 24 a
layer on SmolLM2). This scores every training record against every query with the blocks'
*unprojected* gradients under full-rank EK-FAC (George et al. 2018) fitted here, the head kept as the
index stores it (its vocabulary-side factor, 49,152 square, is too large to fit), and then asks what
rescoring the default's top M with those exact scores does to LDS.

Per tracked block layer: A = mean x x^T and S = mean g g^T over the tokens of the first `sample`
records, eigenbases Q_A, Q_S; a record's gradient in that basis R = sum_t (Q_S^T g_t)(Q_A^T x_t)^T
(rotating the tokens, never forming the (out, in) gradient first); Lam = mean R^2 over the sample;
whitened w = R / sqrt(Lam + damping mean(Lam)), as the index whitens its own rows. Per (query,
record) the block part's dot product and both squared norms are saved, so any mix with the stored
head part is scored afterwards (`report`).

    python -m benchmarks.quality.exact            # compute (about 40 min on 2 cores), then report
    python -m benchmarks.quality.exact --report   # report from the saved arrays

The toys (gpt2-stdlib, llama-pkgdocs) need no computation here: their full-gradient EK-FAC over
every tracked layer (the LM head included) is a reference row of `python -m benchmarks.quality run`,
whose cached scores the report reads. Results: benchmarks/results/exact_top.json.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch

from . import data, evaluate
from .chat import default_index, layer_groups, stage_vectors
from .specs import ground_truth

WORK = Path(os.environ.get("LOGRA_QUALITY_WORK", "/tmp/logra-quality"))
OUT = WORK / "exact-smollm2-chat.npz"


class Taps:
    """Forward hooks keeping each tracked layer's input and output (the output to take its gradient)."""

    def __init__(self, modules: dict):
        self.x, self.y = {}, {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def fwd(_m, inputs, output):
            self.x[name], self.y[name] = inputs[0].detach(), output
        return fwd

    def close(self):
        for h in self.handles:
            h.remove()


def batch_grads(model, taps: Taps, tokenizer, encoded) -> tuple[dict, dict, torch.Tensor]:
    """Per layer: inputs x (b, t, in) with padding zeroed, output gradients g (b, t, out) of each
    record's summed response loss; and the attention mask."""
    from engine import collate, per_example_loss
    b = collate(list(encoded), tokenizer.pad_token_id)
    with torch.enable_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        loss = per_example_loss(logits, b["labels"]).sum()
        names = list(taps.y)
        gs = torch.autograd.grad(loss, [taps.y[n] for n in names])
    mask = b["attention_mask"].unsqueeze(-1).float()
    return {n: taps.x[n] * mask for n in names}, dict(zip(names, (g.detach() for g in gs))), mask


def rotated_grads(x: dict, g: dict, QA: dict, QS: dict) -> dict:
    """Each record's gradient per layer in the layer's K-FAC eigenbasis, sum_t (Q_S^T g_t)(Q_A^T x_t)^T:
    the tokens rotated first, never the (out, in) gradient."""
    return {n: torch.einsum("bto,bti->boi", g[n] @ QS[n], x[n] @ QA[n]) for n in x}


def tapped(model, blocks: list[str]) -> Taps:
    """Hooks on the tracked block layers; only their weights need a graph, so the backward pass walks
    the blocks from the first tracked one."""
    mods = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in blocks:
        mods[n].weight.requires_grad_(True)
    return Taps({n: mods[n] for n in blocks})


def time_top(m: int = 20, queries: int = 10, log=print) -> dict:
    """What an exact top would cost a query on this CPU, one thread: the m best documents' gradients
    recomputed from their text (a forward pass, a backward pass from the first tracked block), rotated
    into full-rank bases of the blocks (random orthogonal ones: the cost does not depend on their
    values), whitened and dotted with the query's; against a fast and a high /attribute on the default
    index, alternated query by query."""
    from engine import encode_pairs
    from api.search import Attributor
    torch.set_num_threads(1)
    gt = ground_truth("smollm2-chat")
    attr = Attributor(default_index(gt, WORK))
    s = attr.current()
    _, q_rows = data.load_rows(gt)
    shapes = {l["name"]: l for l in s.high.logra.layer_spec()}
    blocks = [n for n in shapes if n != "lm_head"]
    model, tok = attr.model, attr.tokenizer
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.Generator().manual_seed(0)
    orth = lambda k: torch.linalg.qr(torch.randn(k, k, generator=rng))[0]
    QA = {n: orth(shapes[n]["in_features"]) for n in blocks}
    QS = {n: orth(shapes[n]["out_features"]) for n in blocks}
    scale = {n: torch.rand(shapes[n]["out_features"], shapes[n]["in_features"], generator=rng) for n in blocks}
    seconds = {"fast": [], "high": [], f"exact top {m}": []}
    for r in q_rows[:queries]:
        for prec in ("fast", "high"):
            t = time.perf_counter()
            hits, _, _ = attr.attribute("", "", m, "cosine", precision=prec, messages=r["messages"])
            seconds[prec].append(time.perf_counter() - t)
        docs = s.index.documents([h.row for h in hits])
        enc = encode_pairs(tok, [(d.get("prompt") or "", d["text"]) for d in docs], s.index.manifest.max_tokens)
        taps = tapped(model, blocks)
        try:
            t = time.perf_counter()
            wq = None
            for i in range(0, len(enc), 8):  # the query's own rotated gradient would come from its pass: not timed
                x, g, _ = batch_grads(model, taps, tok, enc[i : i + 8])
                w = torch.cat([(r * scale[n]).flatten(1) for n, r in rotated_grads(x, g, QA, QS).items()], dim=1)
                wq = w[0] if wq is None else wq
                _ = w @ wq
            seconds[f"exact top {m}"].append(time.perf_counter() - t)
        finally:
            taps.close()
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
        log(f"query {len(seconds['fast'])}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()))
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    return {"queries": queries, "threads": 1, "median_seconds": med,
            "exact_over_fast": med[f"exact top {m}"] / med["fast"], "seconds": seconds}


def compute(sample: int = 256, batch: int = 8, damping: float = 0.01, limit: int | None = None, log=print) -> None:
    from engine import encode_pairs, load_model
    from api.search import Attributor
    gt = ground_truth("smollm2-chat")
    index_dir = default_index(gt, WORK)
    tr_rows, q_rows = data.load_rows(gt)
    attr = Attributor(index_dir)
    s = attr.current()
    d_pairs, q_pairs = ([s.text_format.messages(attr.tokenizer, r["messages"]) for r in rows] for rows in (tr_rows, q_rows))
    # the head part as the index stores it (and the query's, through the index's own engine)
    qv, dv, spec = stage_vectors(gt, index_dir)["high"]
    head = layer_groups(spec)["head"]
    blocks = [l["name"] for l in spec if l["name"] != "lm_head"]
    model, tok = load_model(s.index.manifest.model.name_or_path)
    del attr, s
    taps = tapped(model, blocks)
    max_tokens = 512
    d_enc, q_enc = encode_pairs(tok, d_pairs, max_tokens), encode_pairs(tok, q_pairs, max_tokens)
    if limit:  # a smoke run: the first `limit` records and queries
        d_enc, q_enc = d_enc[:limit], q_enc[:limit]
    order = sorted(range(len(d_enc)), key=lambda i: len(d_enc[i].input_ids))
    fit = sorted(range(min(sample, len(d_enc))), key=lambda i: len(d_enc[i].input_ids))
    t0 = time.time()
    factors = OUT.with_name(OUT.stem + f"-factors-s{len(fit)}-d{damping:g}.pt")
    if factors.exists():  # a run that stopped after fitting them
        QA, QS, scale = torch.load(factors, weights_only=True)
    else:
        # 1. K-FAC factors on the sample; its tokens' inputs and output gradients kept for the second step
        A = {n: 0.0 for n in blocks}
        S = {n: 0.0 for n in blocks}
        kept = []
        for i in range(0, len(fit), batch):
            x, g, _ = batch_grads(model, taps, tok, [d_enc[j] for j in fit[i : i + batch]])
            kept.append((x, g))
            for n in blocks:
                xf, gf = x[n].reshape(-1, x[n].shape[-1]).double(), g[n].reshape(-1, g[n].shape[-1]).double()
                A[n] = A[n] + xf.T @ xf
                S[n] = S[n] + gf.T @ gf
        QA = {n: torch.linalg.eigh(A[n])[1].float() for n in blocks}
        QS = {n: torch.linalg.eigh(S[n])[1].float() for n in blocks}
        log(f"factors on {len(fit)} records: {time.time() - t0:.0f} s")
        # 2. eigenvalue corrections on the sample
        lam = {n: 0.0 for n in blocks}
        for x, g in kept:
            for n, r in rotated_grads(x, g, QA, QS).items():
                lam[n] = lam[n] + (r.double() ** 2).sum(0)
        del kept
        scale = {}
        for n in blocks:
            l = lam[n] / len(fit)
            scale[n] = (1.0 / torch.sqrt(l + damping * l.mean())).float()
        torch.save((QA, QS, scale), factors)
        log(f"eigenvalue corrections: {time.time() - t0:.0f} s")

    def rotated(encoded) -> dict:
        x, g, _ = batch_grads(model, taps, tok, encoded)
        return rotated_grads(x, g, QA, QS)

    def whitened(encoded) -> dict:
        return {n: (r * scale[n]).reshape(len(encoded), -1) for n, r in rotated(encoded).items()}

    # 3. queries, then every record. Kept a layer apart: one (100 x 14M) float32 matrix times a record's
    # column made the BLAS copy it (24 GB, killed); a layer at a time its products stay small.
    wq = {n: torch.empty(len(q_enc), scale[n].numel()) for n in blocks}  # 5.7 GB in all on SmolLM2
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    for i in range(0, len(q_enc), batch):
        for n, w in whitened(q_enc[i : i + batch]).items():
            wq[n][i : i + batch] = w
    log(f"queries: RSS {rss():.1f} GiB")
    qn2 = sum((w.double() ** 2).sum(1) for w in wq.values()).numpy()
    dot = np.zeros((len(q_enc), len(d_enc)))
    dn2 = np.zeros(len(d_enc))
    for k, i in enumerate(range(0, len(order), batch)):
        idx = order[i : i + batch]
        wd = whitened([d_enc[j] for j in idx])
        dot[:, idx] = sum((wq[n] @ w.T).double() for n, w in wd.items()).numpy()
        dn2[idx] = sum((w.double() ** 2).sum(1) for w in wd.values()).numpy()
        if k % 25 == 0:
            log(f"records {i + len(idx)}/{len(order)}: {time.time() - t0:.0f} s, RSS {rss():.1f} GiB")
    taps.close()
    if limit:
        log(f"smoke: {len(d_enc)} records, block dim {sum(w.shape[1] for w in wq.values())}, "
            f"cosine range {_cos(dot, qn2, dn2).min():.3f}..{_cos(dot, qn2, dn2).max():.3f}")
        return
    np.savez(OUT, block_dot=dot, block_q2=qn2, block_d2=dn2, head_dot=qv[:, head] @ dv[:, head].T,
             head_q2=(qv[:, head] ** 2).sum(1), head_d2=(dv[:, head] ** 2).sum(1),
             proj_block_dot=qv[:, ~head] @ dv[:, ~head].T, proj_block_q2=(qv[:, ~head] ** 2).sum(1),
             proj_block_d2=(dv[:, ~head] ** 2).sum(1))
    meta = {"sample": len(fit), "damping": damping, "blocks": blocks, "block_dim": int(sum(w.shape[1] for w in wq.values())),
            "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads()}
    OUT.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    log(f"done: {meta}")


def _cos(dot, q2, d2):
    return dot / np.sqrt(np.outer(q2, d2)).clip(1e-30)


def _swap_top(base: np.ndarray, exact: np.ndarray, m: int, how: str) -> np.ndarray:
    """The default's scores with its top m (per query) rescored by `exact`: 'order' keeps the m
    values and reorders them by the exact scores (what a user sees: the same documents, re-ranked);
    'scaled' puts in the exact scores, least-squares scaled to the values they replace."""
    out = base.copy()
    idx = np.argsort(-base, axis=1, kind="stable")[:, :m]
    b, e = np.take_along_axis(base, idx, 1), np.take_along_axis(exact, idx, 1)
    if how == "order":
        vals = -np.sort(-b, axis=1)
        new = np.empty_like(b)
        np.put_along_axis(new, np.argsort(-e, axis=1, kind="stable"), vals, 1)
    else:
        new = e * ((b * e).sum(1, keepdims=True) / (e * e).sum(1, keepdims=True).clip(1e-300))
    np.put_along_axis(out, idx, new, 1)
    return out


def _agree(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    ta, tb = np.argsort(-a, 1, kind="stable")[:, :k], np.argsort(-b, 1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb)]))


def score(rows: dict, default: str, exact: list[str], masks: np.ndarray, losses: np.ndarray) -> dict:
    """LDS of each row (paired with the default), and of the default with its top m rescored by each
    `exact` row (m = 10, 20, 50; reordered, or scaled in), with the k = 10 agreement with that row."""
    per = {k: evaluate.lds_per_query(v, masks, losses) for k, v in rows.items()}
    base = per[default]
    out = {"methods": {}, "exact_top": {}}
    for k, v in per.items():
        m, se = evaluate.mean_se(v)
        d, dse = evaluate.mean_se(v - base)
        out["methods"][k] = {"lds": m, "se": se, "vs_default": d, "vs_default_se": dse,
                             "k10_agreement_with_default": _agree(rows[k], rows[default])}
    for ref in exact:
        for m in (10, 20, 50):
            for how in ("order", "scaled"):
                sw = _swap_top(rows[default], rows[ref], m, how)
                lds = evaluate.lds_per_query(sw, masks, losses)
                d, dse = evaluate.mean_se(lds - base)
                out["exact_top"][f"{ref}: top {m}, {how}"] = {
                    "lds": float(np.nanmean(lds)), "vs_default": d, "vs_default_se": dse,
                    "k10_agreement_with_exact": _agree(sw, rows[ref])}
    for k, v in out["methods"].items():
        print(f"{k:55s} {v['lds']:.3f} ± {v['se']:.3f}  vs default {v['vs_default']:+.3f} ± {v['vs_default_se']:.3f}")
    for k, v in out["exact_top"].items():
        print(f"  {k:70s} {v['lds']:.3f}  {v['vs_default']:+.3f} ± {v['vs_default_se']:.3f}  "
              f"k10 vs exact {v['k10_agreement_with_exact']:.2f}")
    return out


def real_rows() -> tuple[dict, list[str]]:
    """The real model's rows from `compute`'s arrays and the default index's cached API scores."""
    from .methods import defaults_tag
    z = np.load(OUT)
    with (WORK / "scores" / f"chat-default-{defaults_tag()}.pkl").open("rb") as f:
        default = pickle.load(f)["default high cosine"]["scores"]
    part = lambda *names: _cos(sum(z[f"{n}_dot"] for n in names), sum(z[f"{n}_q2"] for n in names),
                               sum(z[f"{n}_d2"] for n in names))
    rows = {"default high cosine": default,
            "stored high vectors (head + projected blocks)": part("head", "proj_block"),
            "head part only": part("head"), "projected blocks only": part("proj_block"),
            "exact blocks only (full-rank EK-FAC)": part("block"),
            "exact: head part + full-rank blocks": part("head", "block")}
    # the full-rank blocks outweigh the head by their dimension count: the same part scaled down to the
    # projected blocks' mean share of the squared norms
    wq = z["proj_block_q2"].mean() / z["block_q2"].mean()
    wd = z["proj_block_d2"].mean() / z["block_d2"].mean()
    rows["exact, blocks at the projected blocks' weight"] = _cos(
        z["head_dot"] + np.sqrt(wq * wd) * z["block_dot"], z["head_q2"] + wq * z["block_q2"], z["head_d2"] + wd * z["block_d2"])
    return rows, ["exact: head part + full-rank blocks", "exact, blocks at the projected blocks' weight",
                  "exact blocks only (full-rank EK-FAC)"]


def toy_rows(name: str) -> tuple[dict, list[str]]:
    """A toy benchmark's default high scores and its full-gradient EK-FAC references (unprojected, every
    tracked layer, the LM head included: the whole exact stage), from `python -m benchmarks.quality run`'s
    cached scores."""
    import hashlib

    from .methods import defaults_tag
    gt = ground_truth(name)
    work = WORK / hashlib.sha256((gt / "finetuned" / "model.safetensors").read_bytes()).hexdigest()[:12] / "scores"
    paths = [work / f"default-{defaults_tag()}.pkl", work / "full-sweep.pkl"]
    if not all(p.exists() for p in paths):
        raise FileNotFoundError(f"{paths}: run `python -m benchmarks.quality run --bench {name}` first")
    (default, full) = (pickle.loads(p.read_bytes()) for p in paths)
    exact = ["full-ekfac d0.01-cosine", "full-ekfac-cosine", "full-ekfac d0.01"]  # the high stage's damping 0.01
    return {"default high cosine": default["default high cosine"]["scores"],
            **{k: full[k]["scores"] for k in exact}}, exact


def report(results: Path = Path("benchmarks/results"), names=("gpt2-stdlib", "llama-pkgdocs", "smollm2-chat")) -> dict:
    path = results / "exact_top.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        print(f"## {name}")
        gt = ground_truth(name)
        lds = np.load(gt / "lds.npz")
        rows, exact = real_rows() if name == "smollm2-chat" else toy_rows(name)
        out[name] = score(rows, "default high cosine", exact, lds["masks"], lds["losses"])
        if name == "smollm2-chat":
            out[name]["meta"] = json.loads(OUT.with_suffix(".json").read_text())
        path.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.exact")
    p.add_argument("--report", action="store_true", help="only report from the saved arrays")
    p.add_argument("--sample", type=int, default=256, help="records the factors are fitted on (default 256)")
    p.add_argument("--damping", type=float, default=0.01, help="relative damping, as the high stage's (default 0.01)")
    p.add_argument("--limit", type=int, default=None, help="smoke: only the first LIMIT records and queries")
    p.add_argument("--bench", nargs="+", default=["gpt2-stdlib", "llama-pkgdocs", "smollm2-chat"],
                   help="benchmarks to report (default: all three)")
    p.add_argument("--time-top", type=int, default=0, metavar="M",
                   help="only time an exact top of M documents against fast and high queries (one thread)")
    a = p.parse_args(argv)
    if a.time_top:
        r = time_top(a.time_top, log=lambda m: print(m, flush=True))
        path = Path("benchmarks/results/exact_top.json")
        out = json.loads(path.read_text()) if path.exists() else {}
        out.setdefault("smollm2-chat", {})["cpu_seconds"] = r
        path.write_text(json.dumps(out, indent=1, default=float) + "\n")
        print(json.dumps({k: r[k] for k in ("median_seconds", "exact_over_fast")}, indent=1))
        return
    if not a.report and "smollm2-chat" in a.bench:
        compute(a.sample, damping=a.damping, limit=a.limit, log=lambda m: print(m, flush=True))
    if not a.limit:
        report(names=a.bench)


if __name__ == "__main__":
    main()
