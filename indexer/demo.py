"""`python -m indexer demo`: the embedded demo, end to end on the CPU. The standard library's own
docstrings become the corpus, a tokenizer and a tiny GPT-2 are trained on them here, and the
ordinary build path indexes the corpus with that model. Nothing is downloaded."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .build import BuildConfig, build_index
from .demo_corpus import stdlib_docstrings, train_tiny_gpt2, train_tokenizer
from .store import IndexFormatError, read_manifest

MAX_TOKENS = 128


def build_demo(out: str | Path = "demo", max_docs: int = 3000, epochs: int = 2, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Write OUT/corpus.jsonl, OUT/model (tokenizer + weights) and OUT/index; return the manifest.
    An existing complete demo is reused unless `overwrite`."""
    out = Path(out)
    index_dir = out / "index"
    if not overwrite:
        try:
            manifest = read_manifest(index_dir)
            print(f"demo index already built at {index_dir} ({manifest.n_documents} documents); "
                  "pass --overwrite to rebuild")
            return manifest
        except IndexFormatError:
            pass
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()

    docs = stdlib_docstrings(max_docs=max_docs)
    corpus = out / "corpus.jsonl"
    with corpus.open("w") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"corpus: {len(docs)} docstrings from the standard library -> {corpus}", flush=True)

    texts = [d["text"] for d in docs]
    model_dir = out / "model"
    tokenizer = train_tokenizer(texts, model_dir)
    training = train_tiny_gpt2(texts, tokenizer, model_dir, max_tokens=MAX_TOKENS, epochs=epochs, progress=progress)
    print(f"model: tiny GPT-2 trained in {training['seconds']:.0f} s, loss {training['first_loss']:.2f} -> "
          f"{training['final_loss']:.2f} -> {model_dir}", flush=True)

    manifest = build_index(BuildConfig(model=str(model_dir), data=[str(corpus)], out=str(index_dir),
                                       max_tokens=MAX_TOKENS, batch_size=16, progress=progress,
                                       extra={"demo": {"training": training, "max_docs": max_docs}}))
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    print(f"index: {manifest.n_documents} documents, dim {manifest.dim}, {size / 2**20:.1f} MiB -> {index_dir} "
          f"(demo built in {time.time() - started:.0f} s)", flush=True)
    return manifest
