"""Paired LDS of the high-fidelity stage with the LM head's vocabulary side projected by a sparse sign
sketch (engine.sketch_matrix, `--high-head-projection sketch`) against the default Gaussian: the
measurement behind keeping the Gaussian (docs/indexing.md).

gpt2-stdlib and llama-pkgdocs: the high stage's vectors recomputed with the engine at the indexer's
default sizes (BuildConfig.high_config), EK-FAC fitted on the fine-tune set, once per projection; cosine
scores. smollm2-chat: two real indexes of its records (`--chat-index gaussian=DIR --chat-index
sketch=DIR`, built with `--high-head-projection` each), their stored high rows and the queries' vectors
from each index's own engine (chat.stage_vectors). Per query, LDS of each; the mean and paired standard
error of the difference.

    python -m benchmarks.quality.projection gpt2-stdlib llama-pkgdocs
    python -m benchmarks.quality.projection gpt2-stdlib --smoke --out /tmp/p.json   # the first 64 documents, 8 queries

Writes benchmarks/results/head_projection.json (keys already there for other benchmarks are kept).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import chat, data, evaluate, methods
from .specs import ground_truth
from .storage import cosine

OUT = Path(__file__).resolve().parent.parent / "results" / "head_projection.json"


def compare(bench: str, vectors: dict[str, tuple[np.ndarray, np.ndarray]], masks, losses, out: dict) -> None:
    """vectors: projection -> (queries, documents)."""
    per_query = {k: evaluate.lds_per_query(cosine(q, d), masks, losses) for k, (q, d) in vectors.items()}
    out[bench] = {**{k: {"lds": evaluate.mean_se(v)} for k, v in per_query.items()},
                  "sketch - gaussian": evaluate.mean_se(per_query["sketch"] - per_query["gaussian"]),
                  "queries": int(np.isfinite(per_query["sketch"] - per_query["gaussian"]).sum())}
    print(bench, json.dumps(out[bench]), flush=True)


def engine_vectors(gt: Path, head_sketch: bool, n_docs: int | None, n_queries: int | None
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Queries' and documents' high-stage vectors (eigenbasis, as the index stores them) of a toy benchmark."""
    from engine import LoGra, LoGraConfig
    from indexer import BuildConfig
    train_rows, query_rows = data.load_rows(gt)
    train_rows, query_rows = train_rows[:n_docs], query_rows[:n_queries]
    model, tok = methods.load_finetuned(gt)
    cfg = BuildConfig(model="", data=[], out="", high_head_projection="sketch" if head_sketch else "gaussian")
    logra = LoGra(model, cfg.high_config(LoGraConfig(budget=cfg.budget, head_share=cfg.head_share,
                                                     max_tokens=data.MAX_TOKENS)))
    assert logra.sketched(logra.head_name) == head_sketch
    docs, queries = ([("", r["text"]) for r in rows] for rows in (train_rows, query_rows))
    qv, dv = methods.fitted_vectors(logra, tok, docs, queries, cfg.high_preconditioner, cfg.high_damping, eigenbasis=True)
    return qv, dv, logra.dim


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benches", nargs="+")
    ap.add_argument("--chat-index", action="append", default=[],
                    help="smollm2-chat: PROJECTION=DIR, an index of its records built with --high-head-projection PROJECTION")
    ap.add_argument("--smoke", action="store_true", help="the first 64 documents and 8 queries: checks it runs")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    n_docs, n_queries = (64, 8) if args.smoke else (None, None)
    out = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for bench in args.benches:
        gt = ground_truth(bench)
        lds = np.load(gt / "lds.npz")
        masks, losses = lds["masks"][:, :n_docs], lds["losses"][:, :, :n_queries]
        if bench == "smollm2-chat":
            indexes = {k: Path(d) for k, d in (a.split("=", 1) for a in args.chat_index)}
            vectors = {k: chat.stage_vectors(gt, d)["high"][:2] for k, d in indexes.items()}
            compare(bench, vectors, masks, losses, out)
            out[bench]["indexes"] = {k: str(d) for k, d in indexes.items()}
        else:
            vectors, dims = {}, {}
            for name in ("gaussian", "sketch"):
                qv, dv, dims[name] = engine_vectors(gt, name == "sketch", n_docs, n_queries)
                vectors[name] = (qv, dv)
            compare(bench, vectors, masks, losses, out)
            out[bench]["dim"] = dims["sketch"]
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
