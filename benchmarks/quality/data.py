"""The benchmark's corpus and base model.

Standard-library docstrings (`indexer.demo_corpus`), split by top-level module: the base model is
pretrained on one part; the fine-tune set (1000 documents) and the held-out queries (100) come from
the other modules, drawn at random from one pool, so queries share modules (and often classes) with
fine-tune documents but were never trained on. Every text is cut to at most MAX_TOKENS tokens of
the benchmark's tokenizer, so no document or query is truncated by the engine.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from indexer.demo_corpus import stdlib_docstrings, train_tiny_gpt2, train_tokenizer

MAX_TOKENS = 64
MIN_TOKENS = 8
N_TRAIN = 1000
N_QUERIES = 100
HELD_OUT_DOCS = 1400  # docs of held-out modules to collect before drawing train + queries
MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4}
VOCAB = 2048
PRETRAIN_EPOCHS = 2
SEED = 0


def split_modules(docs: list[dict], seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(pretraining docs, held-out pool): whole top-level modules go to the pool, in a seeded
    random order, until it holds HELD_OUT_DOCS documents."""
    tops = sorted({d["module"].split(".")[0] for d in docs})
    random.Random(seed).shuffle(tops)
    held, count = set(), 0
    by_top = {}
    for d in docs:
        by_top.setdefault(d["module"].split(".")[0], []).append(d)
    for t in tops:
        if count >= HELD_OUT_DOCS:
            break
        if len(by_top[t]) > 150:  # no single package dominates the fine-tune set
            continue
        held.add(t)
        count += len(by_top[t])
    pre = [d for d in docs if d["module"].split(".")[0] not in held]
    pool = [d for d in docs if d["module"].split(".")[0] in held]
    return pre, pool


def truncate(tokenizer, text: str, max_tokens: int = MAX_TOKENS) -> str | None:
    """The text cut to its first `max_tokens` tokens, or None when that does not round-trip
    exactly (a cut inside a character) or leaves fewer than MIN_TOKENS tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < MIN_TOKENS:
        return None
    cut = tokenizer.decode(ids)
    if tokenizer(cut, add_special_tokens=False)["input_ids"] != ids:
        return None
    return cut


def build(out: Path, progress: bool = False) -> dict:
    """Write out/base (tokenizer + pretrained tiny GPT-2) and out/data.jsonl (split = train/query)."""
    docs = stdlib_docstrings()
    pre, pool = split_modules(docs)
    base = out / "base"
    tokenizer = train_tokenizer([d["text"] for d in pre], base, vocab_size=VOCAB)
    training = train_tiny_gpt2([d["text"] for d in pre], tokenizer, base, max_tokens=MAX_TOKENS,
                               epochs=PRETRAIN_EPOCHS, seed=SEED, progress=progress, **MODEL)
    rows = []
    for d in pool:
        text = truncate(tokenizer, d["text"])
        if text is not None:
            rows.append({"id": d["id"], "text": text, "module": d["module"], "kind": d["kind"]})
    random.Random(SEED).shuffle(rows)
    if len(rows) < N_TRAIN + N_QUERIES:
        raise RuntimeError(f"only {len(rows)} usable held-out documents")
    rows = rows[: N_TRAIN + N_QUERIES]
    for i, r in enumerate(rows):
        r["split"] = "train" if i < N_TRAIN else "query"
    with (out / "data.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"pretrain_docs": len(pre), "pool_docs": len(pool), "pretraining": training,
            "held_out_modules": sorted({r["module"].split(".")[0] for r in rows})}


def load_rows(gt: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(l) for l in (gt / "data.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "query"]
