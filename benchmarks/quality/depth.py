"""How a stage's budget is spread over depth (engine.budget's `min_layer_dims`), on all three benchmarks.

The preconditioner is block-diagonal over layers and a layer's projection depends only on its own
(seed, name, sides), so a layer's whitened vector at given sides is the same in every allocation that
gives it those sides. This computes, in ONE forward and backward pass over the documents and the
queries, every (layer, sides) that any candidate rule asks for (several projectors through
`engine.joint_gradients`, each layer's EK-FAC fitted on the documents as the build fits it), then scores
each candidate by concatenating its layers' vectors (cosine, as the benchmarks score the defaults):
LDS and paired differences against the shipped rule, per stage.

    python -m benchmarks.quality.depth gpt2-stdlib llama-pkgdocs smollm2-chat     # writes results/depth.json
    python -m benchmarks.quality.depth --smoke gpt2-stdlib                          # CI: 64 documents

The per-layer vectors are cached in --work (default /tmp/logra-quality/depth-BENCH.pt).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import data
from .evaluate import lds_per_query, mean_se

RESULTS = Path(__file__).resolve().parents[1] / "results" / "depth.json"
# Candidates per stage: (head share, minimum dimensions per block layer). The first is the even spread at
# the shipped share (the rule before this benchmark, the baseline every other is paired against);
# HEAD_ONLY: the head alone.
HEAD_ONLY = 10**9
CANDIDATES = {
    "fast": [(0.75, m) for m in (0, 16, 36, 64, 144, 256, 576, HEAD_ONLY)],
    "high": [(0.75, m) for m in (0, 64, 256, 576, 1024, HEAD_ONLY)] + [(h, 576) for h in (0.8, 0.85, 0.9)],
}
STAGES = {"fast": ("budget", "head_share"), "high": ("high_budget", "high_head_share")}


def _defaults() -> dict:
    from indexer import BuildConfig
    from dataclasses import asdict
    return asdict(BuildConfig(model="", data=[], out=""))


def load_bench(name: str, smoke: bool = False):
    """(model, tokenizer, document pairs, query pairs, lds masks, lds losses, max_tokens)."""
    from .specs import ground_truth
    gt = ground_truth(name)
    tr, qr = data.load_rows(gt)
    lds = np.load(gt / "lds.npz")
    masks, losses = lds["masks"], lds["losses"]
    if name == "smollm2-chat":
        from engine import load_model
        from . import chat
        model, tok = load_model(str(chat.model_dir()))
        d_pairs, q_pairs, max_tokens = chat.pairs(tok, tr), chat.pairs(tok, qr), 512
    else:
        from .methods import load_finetuned
        model, tok = load_finetuned(gt)
        d_pairs, q_pairs, max_tokens = [("", r["text"]) for r in tr], [("", r["text"]) for r in qr], data.MAX_TOKENS
    if smoke:
        d_pairs, q_pairs, masks, losses = d_pairs[:64], q_pairs[:8], masks[:, :64], losses[:, :, :8]
    return model, tok, d_pairs, q_pairs, masks, losses, max_tokens


def candidates(model, defaults: dict, max_tokens: int) -> dict[tuple[str, float, int], dict[str, tuple[int, int]]]:
    """(stage, head share, min_layer_dims) -> the shapes that rule gives (engine.LoGraConfig.shapes)."""
    from engine import LoGra, LoGraConfig
    out = {}
    for stage, (b, _) in STAGES.items():
        for share, m in CANDIDATES[stage]:
            cfg = LoGraConfig(budget=defaults[b], head_share=share, seed=defaults["seed"], max_tokens=max_tokens,
                              min_layer_dims=m)
            out[(stage, share, m)] = LoGra(model, cfg).shapes
    return out


def layer_vectors(model, tok, d_pairs, q_pairs, wanted: set[tuple[str, tuple[int, int]]], seed: int, max_tokens: int,
                  damping: float = 0.01, batch: int = 16, log=print) -> dict:
    """(layer, sides) -> (query vectors, document vectors), float32, in each layer's EK-FAC eigenbasis,
    the preconditioner fitted on every document (the build's sample is 4,096: every document here)."""
    from engine import LoGra, LoGraConfig, Preconditioner, collate, encode_pairs, joint_gradients
    # projector k holds, for each layer, the k-th sides asked of it
    per_layer: dict[str, list] = {}
    for name, shape in sorted(wanted):
        per_layer.setdefault(name, []).append(shape)
    order = [l.name for l in LoGra(model, LoGraConfig(rank=1, max_tokens=max_tokens)).layers]
    n_proj = max(len(v) for v in per_layer.values())
    shapes = [{n: per_layer[n][k] for n in order if n in per_layer and len(per_layer[n]) > k} for k in range(n_proj)]
    logras = [LoGra(model, LoGraConfig(seed=seed, max_tokens=max_tokens), shapes=s) for s in shapes]
    pres = [Preconditioner("ekfac", l.shapes, damping_ratio=damping) for l in logras]
    log(f"{len(wanted)} (layer, sides) in {n_proj} projectors, {sum(l.dim for l in logras):,} dims")
    grads = {}
    for what, pairs, stats in (("documents", d_pairs, True), ("queries", q_pairs, False)):
        enc = encode_pairs(tok, pairs, max_tokens)
        idx = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
        parts: list[list[dict]] = [[] for _ in logras]
        t = time.time()
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            outs = joint_gradients(logras, collate([enc[i] for i in chunk], tok.pad_token_id), [stats] * len(logras))
            for k, out in enumerate(outs):
                if stats:
                    pres[k].update(out.grads, out.token_stats)
                parts[k].append({n: g.detach().cpu() for n, g in out.grads.items()})
            if s // batch % 10 == 0:
                log(f"  {what}: {s + len(chunk)}/{len(idx)} ({time.time() - t:.0f} s, RSS {_rss_gib():.1f} GiB)")
        inv = np.argsort(idx)
        grads[what] = [{n: torch.cat([p[n] for p in ps])[inv] for n in ps[0]} for ps in parts]
    out = {}
    for k, (logra, pre) in enumerate(zip(logras, pres)):
        pre.update_second(grads["documents"][k], dtype=torch.float32)
        pre.finalize()
        dv = pre.apply(grads["documents"][k], eigenbasis=True, dtype=torch.float32)
        qv = pre.apply(grads["queries"][k], eigenbasis=True, dtype=torch.float32)
        start = 0
        for name, (r_out, r_in) in logra.shapes.items():
            w = r_out * r_in
            out[(name, (r_out, r_in))] = (qv[:, start:start + w].clone(), dv[:, start:start + w].clone())
            start += w
    return out


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def _reference_even(name: str) -> dict[str, np.ndarray]:
    from .chat import grid_scores, reference_scores
    from .specs import ground_truth
    gt = ground_truth(name)
    # the compact stage's mirror at today's head share (0.75) is a grid row; the reference's has 0.5
    return {"fast": grid_scores(gt)["fast b4096 h0.75 ekfac d0.01"], "high": reference_scores(gt)["default high"]}


def cosine_scores(vectors: dict, shapes: dict[str, tuple[int, int]]) -> np.ndarray:
    q = torch.cat([vectors[(n, s)][0] for n, s in shapes.items()], dim=1).double()
    d = torch.cat([vectors[(n, s)][1] for n, s in shapes.items()], dim=1).double()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (q @ d.T).numpy()


def describe(shapes: dict[str, tuple[int, int]], head_name: str | None) -> dict:
    from engine.budget import block_of
    blocks = sorted({block_of(n) for n in shapes if n != head_name})
    sizes = sorted({s for n, s in shapes.items() if n != head_name})
    return {"dim": sum(o * i for o, i in shapes.values()), "head": list(shapes.get(head_name, (0, 0))),
            "block_layers": sum(1 for n in shapes if n != head_name), "blocks": f"{blocks[0]}-{blocks[-1]}" if blocks else "",
            "block_sides": [list(s) for s in sizes]}


def run_bench(name: str, work: Path, smoke: bool = False, log=print) -> dict:
    model, tok, d_pairs, q_pairs, masks, losses, max_tokens = load_bench(name, smoke)
    defaults = _defaults()
    cands = candidates(model, defaults, max_tokens)
    # the real model's even spread (every block layer) is in its ground truth already, mirrored through the
    # engine on a GPU (chat.mirrored_defaults): not recomputed here, so the pass starts at the deepest block
    # a candidate tracks (LoGra.backward_root) instead of the first
    even = {} if smoke or name != "smollm2-chat" else _reference_even(name)
    base = {stage: cands[(stage, *CANDIDATES[stage][0])] for stage in STAGES}
    wanted = {(n, s) for (stage, *_), shapes in cands.items() if not (stage in even and shapes == base[stage])
              for n, s in shapes.items()}
    cache = work / f"depth-{name}{'-smoke' if smoke else ''}.pt"
    vectors = torch.load(cache) if cache.exists() else {}
    missing = wanted - set(vectors)  # a layer's vectors at given sides do not depend on the others: computed once
    if missing:
        t = time.time()
        vectors.update(layer_vectors(model, tok, d_pairs, q_pairs, missing, defaults["seed"], max_tokens,
                                     damping=defaults["damping"], log=log))
        log(f"{name}: per-layer vectors in {time.time() - t:.0f} s")
        work.mkdir(parents=True, exist_ok=True)
        torch.save(vectors, cache)
    from engine import LoGra, LoGraConfig
    head_name = LoGra(model, LoGraConfig(max_tokens=max_tokens)).head_name
    out = {"documents": len(d_pairs), "queries": len(q_pairs), "stages": {}}
    for stage in STAGES:
        keys = [(stage, *c) for c in CANDIDATES[stage]]
        lds = {key: lds_per_query(even[stage] if stage in even and cands[key] == base[stage]
                                  else cosine_scores(vectors, cands[key]), masks, losses) for key in keys}
        rows = {}
        for key in keys:
            same = cands[key] == base[stage]
            rows[f"h{key[1]:g} min{key[2]}"] = {
                **describe(cands[key], head_name), "head_share": key[1], "min_layer_dims": key[2], "lds": mean_se(lds[key]),
                "vs_even": None if same else mean_se(lds[key] - lds[keys[0]]), "same_as_even": same}
        out["stages"][stage] = rows
        for label, r in rows.items():
            vs = "=" if r["same_as_even"] else f"{r['vs_even'][0]:+.3f} ± {r['vs_even'][1]:.3f}"
            log(f"{name} {stage} {label:>16}: LDS {r['lds'][0]:.3f} ± {r['lds'][1]:.3f}  vs even {vs}  head {r['head']} "
                f"blocks {r['blocks']} ({r['block_layers']} layers at {r['block_sides']}) dim {r['dim']:,}")
    return out


# Architectures whose allocation the docs show (engine.budget at the shipped defaults), built on the meta
# device from configs alone: the real model, a Llama-3-8B, and the smallest stack (one Llama block, 7 layers)
SHOWN = {
    "SmolLM2-135M (30 blocks, vocabulary 49,152)": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                                         num_hidden_layers=30, num_attention_heads=9,
                                                         num_key_value_heads=3, tie_word_embeddings=True),
    "Llama-3-8B (32 blocks, vocabulary 128,256)": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                                        num_hidden_layers=32, num_attention_heads=32,
                                                        num_key_value_heads=8, tie_word_embeddings=False),
    "a 7-layer toy (1 Llama block, 64 wide, vocabulary 4,096)": dict(vocab_size=4096, hidden_size=64,
                                                                      intermediate_size=256, num_hidden_layers=1,
                                                                      num_attention_heads=4, num_key_value_heads=4),
}


def allocations(defaults: dict | None = None) -> dict:
    """What the shipped rule gives each SHOWN architecture, per stage: the head's sides, the blocks
    tracked, their layers' sides, the dimensions."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine import LoGra, LoGraConfig
    d = defaults or _defaults()
    out = {}
    for name, cfg in SHOWN.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg))
        out[name] = {}
        for stage, (b, h) in STAGES.items():
            m = d["min_layer_dims"] if stage == "fast" else d["high_min_layer_dims"]
            logra = LoGra(model, LoGraConfig(budget=d[b], head_share=d[h], min_layer_dims=m))
            out[name][stage] = describe(logra.shapes, logra.head_name)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benches", nargs="+")
    p.add_argument("--work", type=Path, default=Path("/tmp/logra-quality"))
    p.add_argument("--smoke", action="store_true", help="64 documents and 8 queries (CI)")
    p.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS}; smoke: not written)")
    args = p.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.smoke else {}
    results["allocations"] = allocations()
    for name in args.benches:
        results[name] = run_bench(name, args.work, args.smoke)
        out = args.out or (None if args.smoke else RESULTS)
        if out:
            out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
