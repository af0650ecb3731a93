"""The benchmarks' corpora and base models, per spec (specs.py).

A corpus is split so that the base model is pretrained on one part and the fine-tune set (n_train
documents) and the held-out queries (n_queries) come from the other, drawn at random from one pool:
queries share modules (and often classes) with fine-tune documents but were never trained on.
- "stdlib": standard-library docstrings (`indexer.demo_corpus`), split by top-level module.
- "site-packages": docstrings of the third-party packages installed beside the project
  (`spec.packages`), read with the same `ast` scan; each record carries its `package`. Per package,
  whole modules go to the pool (split_packages); pretraining and the fine-tune/query draw keep at
  most a fixed number of documents per package, so no package dominates either.
Every text is cut to at most max_tokens tokens of the spec's tokenizer, so no document or query is
truncated by the engine.
"""
from __future__ import annotations

import json
import random
import sys
import sysconfig
from collections import Counter
from pathlib import Path

from .specs import Spec

MAX_TOKENS = 64  # every spec's max_tokens (methods.py reads it)
MIN_TOKENS = 8
VENDORED = frozenset({"_vendor", "vendor", "_vendored", "vendored"})  # copies of other packages


def split_modules(docs: list[dict], spec: Spec) -> tuple[list[dict], list[dict]]:
    """(pretraining docs, held-out pool) of the stdlib corpus: whole top-level modules go to the pool,
    in a seeded random order, until it holds spec.held_out_docs documents."""
    tops = sorted({d["module"].split(".")[0] for d in docs})
    random.Random(spec.seed).shuffle(tops)
    held, count = set(), 0
    by_top = {}
    for d in docs:
        by_top.setdefault(d["module"].split(".")[0], []).append(d)
    for t in tops:
        if count >= spec.held_out_docs:
            break
        if len(by_top[t]) > 150:  # no single package dominates the fine-tune set
            continue
        held.add(t)
        count += len(by_top[t])
    pre = [d for d in docs if d["module"].split(".")[0] not in held]
    pool = [d for d in docs if d["module"].split(".")[0] in held]
    return pre, pool


def package_docstrings(packages: tuple[str, ...], min_chars: int = 40) -> list[dict]:
    """One record per module/class/function docstring of the installed packages (the demo corpus's
    scan of each package's folder), as `{"id", "text", "package", "module", "qualname", "kind", "file",
    "line"}` with full module names. Vendored copies are left out, and a text seen before (a sync and
    an async twin, an overload) is kept once."""
    from indexer.demo_corpus import _scan_stdlib  # lazily: reading a ground truth needs no indexer (chat.py)
    site = Path(sysconfig.get_paths()["purelib"])
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 50_000))  # a few generated sources nest deeper than the default allows
    try:
        scans = [(p, _scan_stdlib(str(site / p), min_chars)) for p in packages]
    finally:
        sys.setrecursionlimit(limit)
    docs, seen = [], set()
    for package, scan in scans:
        if not scan:
            raise FileNotFoundError(f"no docstrings under {site / package}")
        for d in scan:
            if VENDORED & set(d["module"].split(".")) or d["text"] in seen:
                continue
            seen.add(d["text"])
            module = f"{package}.{d['module']}" if d["module"] else package
            docs.append({"id": f"{module}:{d['qualname']}" if d["qualname"] else module, "text": d["text"],
                         "package": package, "module": module, "qualname": d["qualname"], "kind": d["kind"],
                         "file": f"{package}/{d['file']}", "line": d["line"]})
    return docs


def split_packages(docs: list[dict], spec: Spec) -> tuple[list[dict], list[dict]]:
    """(pretraining docs, held-out pool) of the site-packages corpus. Per package, its modules in a
    seeded random order go to the pool until it holds spec.pool_per_package documents (at most half
    the package's; modules over spec.module_max documents are passed over); the rest is pretraining,
    at most spec.pretrain_cap documents per package (a seeded random sample)."""
    by_package: dict[str, dict[str, list[dict]]] = {}
    for d in docs:
        by_package.setdefault(d["package"], {}).setdefault(d["module"], []).append(d)
    rng = random.Random(spec.seed)
    pre, pool = [], []
    for package in sorted(by_package):
        modules = by_package[package]
        order = sorted(modules)
        rng.shuffle(order)
        target = min(spec.pool_per_package, sum(map(len, modules.values())) // 2)
        held, rest = 0, []
        for m in order:
            if held < target and len(modules[m]) <= spec.module_max:
                pool += modules[m]
                held += len(modules[m])
            else:
                rest += modules[m]
        rng.shuffle(rest)
        pre += rest[: spec.pretrain_cap]
    return pre, pool


def truncate(tokenizer, text: str, max_tokens: int = MAX_TOKENS, min_tokens: int = MIN_TOKENS) -> str | None:
    """The text cut to its first `max_tokens` tokens, or None when that does not round-trip
    exactly (a cut inside a character) or leaves fewer than `min_tokens` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < min_tokens:
        return None
    cut = tokenizer.decode(ids)
    if tokenizer(cut, add_special_tokens=False)["input_ids"] != ids:
        return None
    return cut


def draw(pool: list[dict], tokenizer, spec: Spec, fields: tuple[str, ...], cap: int | None = None,
         unique: bool = False) -> list[dict]:
    """The fine-tune documents then the queries, `split` set: the pool's usable (truncated) texts in a
    seeded random order, keeping at most `cap` per package (and each text once when `unique`: two
    docstrings may share their first max_tokens tokens), the first n_train + n_queries of them."""
    rows, seen = [], set()
    for d in pool:
        text = truncate(tokenizer, d["text"], spec.max_tokens, spec.min_tokens)
        if text is not None and not (unique and text in seen):
            seen.add(text)
            rows.append({"id": d["id"], "text": text, **{f: d[f] for f in fields}})
    random.Random(spec.seed).shuffle(rows)
    if cap is not None:
        taken = Counter()
        capped = []
        for r in rows:
            taken[r["package"]] += 1
            if taken[r["package"]] <= cap:
                capped.append(r)
        rows = capped
    n = spec.n_train + spec.n_queries
    if len(rows) < n:
        raise RuntimeError(f"only {len(rows)} usable held-out documents, {n} needed")
    rows = rows[:n]
    for i, r in enumerate(rows):
        r["split"] = "train" if i < spec.n_train else "query"
    return rows


def build(out: Path, spec: Spec, progress: bool = False) -> dict:
    """Write out/base (tokenizer + the spec's pretrained model) and out/data.jsonl (split = train/query)."""
    from indexer.demo_corpus import stdlib_docstrings, train_tokenizer

    from .train import pretrain
    if spec.corpus == "stdlib":
        docs = stdlib_docstrings()
        pre, pool = split_modules(docs, spec)
        fields, cap, unique = ("module", "kind"), None, False  # benchmark 1 as committed
    elif spec.corpus == "site-packages":
        docs = package_docstrings(spec.packages)
        pre, pool = split_packages(docs, spec)
        fields, cap, unique = ("package", "module", "kind"), spec.package_cap, True
    else:
        raise ValueError(f"unknown corpus {spec.corpus!r}")
    base = out / "base"
    tokenizer = train_tokenizer([d["text"] for d in pre], base, vocab_size=spec.vocab)
    training = pretrain(spec, [d["text"] for d in pre], tokenizer, base, progress=progress)
    rows = draw(pool, tokenizer, spec, fields, cap, unique)
    with (out / "data.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    info = {"pretrain_docs": len(pre), "pool_docs": len(pool), "pretraining": training,
            "held_out_modules": sorted({r["module"].split(".")[0] for r in rows})}
    if spec.corpus == "site-packages":
        train_rows = [r for r in rows if r["split"] == "train"]
        info.update(corpus_docs=len(docs), held_out_modules=sorted({r["module"] for r in rows}),
                    train_distinct={"packages": len({r["package"] for r in train_rows}),
                                    "modules": len({r["module"] for r in train_rows})},
                    pretrain_packages=dict(sorted(Counter(d["package"] for d in pre).items())),
                    **{f"{s}_packages": dict(sorted(Counter(r["package"] for r in rows if r["split"] == s).items()))
                       for s in ("train", "query")})
    return info


def load_rows(gt: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(l) for l in (gt / "data.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "query"]
