"""The GPU path, measured (benchmarks/gpu_check.sh runs this on a bare CUDA machine).

A GPT-2-small-sized model (12 x 768, vocabulary 50,257; weights random, tokenizer trained here:
nothing is downloaded) indexes ~20k standard-library docstrings in bf16 on the GPU. Reported, in
one run: the index pass's tokens/s against a plain bf16 training step (forward + backward, no
optimizer) over the same batches, alternated; peak GPU memory of the build; the FAISS build time
(faiss-gpu when installed); /attribute latency (fast and high) on the GPU through the app.

    python benchmarks/gpu_check.py                      # results -> benchmarks/results/gpu.json
    python benchmarks/gpu_check.py --smoke --device cpu  # a tiny run that checks the script itself
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def training_tokens_per_s(model_dir: Path, texts: list[str], device: str, dtype: str, batch: int, max_tokens: int) -> float:
    """A plain training step's throughput (forward + backward of the summed loss) over the batches
    the indexer sees: the same tokenizer, truncation and batch size."""
    from engine import collate, encode, load_model
    model, tok = load_model(str(model_dir), device=device, dtype=dtype)
    for p in model.parameters():  # load_model freezes the weights (the index needs no weight gradient)
        p.requires_grad_(True)
    enc = sorted((encode(tok, "", t, max_tokens) for t in texts), key=lambda e: len(e.input_ids))
    tokens, started = 0, None
    for i in range(0, len(enc), batch):
        b = collate(enc[i : i + batch], tok.pad_token_id)
        b = {k: v.to(device) for k, v in b.items()}
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        if started is None:  # the first batch warms up kernels and allocator
            sync(device)
            started = time.perf_counter()
            continue
        tokens += int(b["attention_mask"].sum())
    sync(device)
    return tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="a tiny model and 200 documents (checks the script)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = ap.parse_args(argv)
    from transformers import GPT2Config, GPT2LMHeadModel

    from indexer.build import BuildConfig, build_index
    from indexer.demo_corpus import stdlib_docstrings, train_tokenizer
    from indexer.store import Index, write_faiss
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.smoke:
        args.docs, args.queries = 200, 5
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    docs = stdlib_docstrings(max_docs=args.docs)
    data = work / "corpus.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    model_dir = work / "model"
    train_tokenizer([d["text"] for d in docs[:5000]], model_dir, vocab_size=2048 if args.smoke else 16384)
    ids = {"bos_token_id": 0, "eos_token_id": 0}  # the trained tokenizer's <|endoftext|>
    cfg = (GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=2048, n_positions=args.max_tokens, **ids) if args.smoke
           else GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, **ids))
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    texts = [d["text"] for d in docs]

    result = {"device": args.device, "dtype": dtype, "documents": len(docs), "batch_size": args.batch_size,
              "max_tokens": args.max_tokens, "model": "GPT-2 2 x 64 (smoke)" if args.smoke else "GPT-2 12 x 768, vocab 50257",
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "torch": torch.__version__, "platform": platform.platform()}
    train_rates = [training_tokens_per_s(model_dir, texts, args.device, dtype, args.batch_size, args.max_tokens)]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    manifest = build_index(BuildConfig(model=str(model_dir), data=[str(data)], out=str(work / "index"), device=args.device,
                                       dtype=dtype, batch_size=args.batch_size, max_tokens=args.max_tokens,
                                       progress=False))
    build_s = time.perf_counter() - t
    train_rates.append(training_tokens_per_s(model_dir, texts, args.device, dtype, args.batch_size, args.max_tokens))
    result["build"] = {"seconds": round(build_s, 1), "gradient_tokens_per_s": manifest.build.tokens_per_s,
                       "training_step_tokens_per_s": [round(r, 1) for r in train_rates],
                       "index_over_training": round(manifest.build.tokens_per_s / statistics.mean(train_rates), 3),
                       "high_fit_seconds": manifest.build.high_fit_seconds,
                       "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                       if args.device.startswith("cuda") else None, "faiss": manifest.faiss.model_dump(exclude_none=True)}
    t = time.perf_counter()
    result["faiss_rebuild"] = {**write_faiss(work / "index", "ivf-pq" if len(docs) >= 4096 else "flat"),
                               "seconds": round(time.perf_counter() - t, 2)}

    from fastapi.testclient import TestClient

    from api import create_app
    latency = {}
    with TestClient(create_app(work / "index", device=args.device)) as c:
        for precision in ("fast", "high"):
            times = []
            for d in docs[: args.queries + 3]:
                words = d["text"].split()
                t = time.perf_counter()
                r = c.post("/attribute", json={"prompt": " ".join(words[:8]), "response": " ".join(words[8:40]) or d["text"],
                                               "k": 10, "precision": precision})
                times.append(1000 * (time.perf_counter() - t))
                r.raise_for_status()
            latency[precision] = {"p50_ms": round(statistics.median(times[3:]), 2), "max_ms": round(max(times[3:]), 2)}
    result["attribute_latency"] = latency
    result["index_documents"] = len(Index.open(work / "index"))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["gpu_check_smoke" if args.smoke else "gpu_check"] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
