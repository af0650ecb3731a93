"""Paired LDS of the default stages' rows stored as integer codes with a per-row scale (what
`--high-storage` chooses among for the high-fidelity stage) against the float rows, on every quality
benchmark: the measurement behind the `int4` default (docs/indexing.md, "High-fidelity storage").

Each stage's document vectors are quantized per row (symmetric codes; the step the row's largest |entry|
/ (2^(bits-1) - 1), or `clip` x its rms / (2^(bits-1) - 1) with entries beyond clipped), read back as unit
rows, and scored by cosine against the queries' float vectors; LDS per query (evaluate.lds_per_query)
against the float rows' on the same queries: mean and paired standard error of the difference. The
shipped storages (int8: max-abs; int4: clip store.INT4_CLIP) are store.encode_rows / decode_rows
themselves; the other rows are the alternatives they were chosen over.

    python -m benchmarks.quality.storage gpt2-stdlib llama-pkgdocs smollm2-chat --chat-index DIR

gpt2-stdlib and llama-pkgdocs: both stages' vectors recomputed with the engine at the indexer's default
sizes (BuildConfig: budget and head share of each stage; EK-FAC fitted on the fine-tune set), each in the
basis the index stores it in (compact rows whitened, high rows in the eigenbasis). smollm2-chat: the stored
rows of an index of its records built with the defaults but float rows (`--chat-index`, built with
--storage float32 --high-storage float16), as chat.stage_vectors reads them; `--stages` picks the stages.
Writes benchmarks/results/high_storage.json (keys already there for other benchmarks or stages are kept).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from indexer.store import INT4_CLIP, decode_rows, encode_rows

from . import chat, data, evaluate, methods
from .specs import ground_truth

OUT = Path(__file__).resolve().parent.parent / "results" / "high_storage.json"
# (bits, clip): None = the row's max |entry|; the shipped ones are read through the store
VARIANTS = ((8, None), (4, None), (4, 3.0), (4, INT4_CLIP), (3, 2.5), (2, 1.5))
SHIPPED = {(8, None): "int8", (4, INT4_CLIP): "int4"}


def quantized(u: np.ndarray, bits: int, clip: float | None) -> np.ndarray:
    """Rows u stored with `bits`-bit codes and read back as unit rows."""
    if (bits, clip) in SHIPPED:
        storage = SHIPPED[bits, clip]
        return decode_rows(*encode_rows(u, storage)[:2], storage, u.shape[1]).astype(np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True).clip(1e-30)
    levels = 2 ** (bits - 1) - 1
    top = np.abs(u).max(axis=1, keepdims=True) if clip is None else clip * np.sqrt((u * u).mean(axis=1, keepdims=True))
    c = np.clip(np.rint(u / top * levels), -levels - (1 if clip else 0), levels)
    return c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-30)


def cosine(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-30)
    d = d / np.linalg.norm(d, axis=1, keepdims=True).clip(1e-30)
    return q @ d.T


def evaluate_stage(name: str, qv: np.ndarray, dv: np.ndarray, masks, losses, out: dict) -> None:
    base = evaluate.lds_per_query(cosine(qv, dv), masks, losses)
    out[name] = {"lds": evaluate.mean_se(base)}
    for bits, clip in VARIANTS:
        pq = evaluate.lds_per_query(cosine(qv, quantized(dv.astype(np.float32), bits, clip)), masks, losses)
        key = f"{name} int{bits} clip{clip}"
        out[key] = {"lds": evaluate.mean_se(pq), "vs": evaluate.mean_se(pq - base)}
        print(key, out[key], flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benches", nargs="+")
    ap.add_argument("--chat-index", default=None, help="smollm2-chat: a default index of its records (float16 rows)")
    ap.add_argument("--stages", default="fast,high", help="comma-separated: fast (compact rows), high")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from indexer import BuildConfig
    stages = args.stages.split(",")
    out = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for bench in args.benches:
        gt = ground_truth(bench)
        lds = np.load(gt / "lds.npz")
        masks, losses = lds["masks"], lds["losses"]
        if bench == "smollm2-chat":
            for stage, (qv, dv, _) in chat.stage_vectors(gt, Path(args.chat_index)).items():
                if stage in stages:
                    evaluate_stage(f"{bench} {stage}", qv, dv, masks, losses, out)
            continue
        from engine import LoGra, LoGraConfig
        train_rows, query_rows = data.load_rows(gt)
        model, tok = methods.load_finetuned(gt)
        d = BuildConfig
        for stage, (budget, head) in {"fast": (d.budget, d.head_share), "high": (d.high_budget, d.high_head_share)}.items():
            if stage not in stages:
                continue
            logra = LoGra(model, LoGraConfig(budget=budget, head_share=head, max_tokens=data.MAX_TOKENS))
            docs, queries = ([("", r["text"]) for r in rows] for rows in (train_rows, query_rows))
            qv, dv = methods.fitted_vectors(logra, tok, docs, queries, "ekfac", 0.01, eigenbasis=stage == "high")
            evaluate_stage(f"{bench} {stage}", qv, dv, masks, losses, out)
            out[f"{bench} {stage}"]["settings"] = {"budget": budget, "head_share": head, "dim": logra.dim}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
