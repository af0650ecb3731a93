"""Indexing speed and memory.

1. Throughput: tokens/s of the indexer's gradient pass (LoGra hooks + preconditioner statistics,
   no weight gradients) against a plain training step (forward + backward with weight gradients,
   optimizer excluded) on the same model and the same batches, alternated in one process. Two
   model sizes (random weights: speed does not depend on what the model learned).
2. Memory: peak RSS of `python -m indexer build` at two corpus sizes, each in a fresh process.
3. Whole build against a plain epoch ("build_vs_epoch"): `python -m indexer build` with the default
   options, and with `--no-high` (the compact vectors alone), against a plain forward+backward epoch over the same documents and model (a training
   script as a user writes it: same batches, no optimizer), both as whole processes (imports and model
   load included), alternated; the median ratio, quiet and under a competing CPU load (another
   process multiplying matrices on every core), and each one's slowdown under that load.

    python benchmarks/indexing.py            # writes benchmarks/results/indexing.json
    python benchmarks/indexing.py --quick    # smaller
    python benchmarks/indexing.py --smoke    # seconds: checks the benchmark runs (tests/test_benchmarks_smoke.py)
    python benchmarks/indexing.py --only memory
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import LoGra, LoGraConfig, Preconditioner, collate, per_example_loss, prepare_model  # noqa: E402
from engine.encoding import Encoded  # noqa: E402
from indexer.build import BuildConfig  # noqa: E402
from indexer.store import read_manifest  # noqa: E402

MODELS = {  # name -> GPT2Config kwargs
    "gpt2-tiny (2x128)": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=4096),
    "gpt2-small (12x768)": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}


def batches_for(vocab: int, n_batches: int, batch_size: int, max_len: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n_batches):
        lengths = sorted(rng.randint(max_len // 2, max_len) for _ in range(batch_size))  # length-sorted, like the indexer
        out.append(collate([Encoded([rng.randrange(vocab) for _ in range(n)], 0, False, n) for n in lengths], 0))
    return out


def throughput(name: str, kwargs: dict, n_batches: int, batch_size: int, max_len: int, repeats: int, rank: int) -> dict:
    torch.manual_seed(0)
    model = prepare_model(GPT2LMHeadModel(GPT2Config(n_positions=max_len, attn_implementation="eager", **kwargs)))
    batches = batches_for(kwargs["vocab_size"], n_batches, batch_size, max_len)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    logra = LoGra(model, LoGraConfig(rank=rank, max_tokens=max_len))
    kind = BuildConfig.preconditioner  # the indexer's default
    pre = Preconditioner(kind, logra.shapes)

    def train_step():
        model.requires_grad_(True)
        for b in batches:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            per_example_loss(logits, b["labels"]).sum().backward()
        model.requires_grad_(False)

    def index_pass():
        for b in batches:
            out = logra.gradients(b, token_stats=pre.needs_token_stats)
            pre.update(out.grads, out.token_stats)
            logra.flatten(out.grads).numpy()

    train_step(), index_pass()  # warm-up
    times = {"train_step": [], "index_pass": []}
    for _ in range(repeats):  # alternate so drifts in machine load hit both alike
        for label, fn in (("train_step", train_step), ("index_pass", index_pass)):
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    ratios = [t / i for t, i in zip(times["train_step"], times["index_pass"])]
    return {
        "model": name, "parameters": sum(p.numel() for p in model.parameters()), "tracked_layers": len(logra.layers),
        "preconditioner": kind, "rank": rank, "dim": logra.dim, "batches": n_batches, "batch_size": batch_size, "tokens_per_repeat": tokens,
        "train_step_tokens_per_s": round(tokens / statistics.median(times["train_step"]), 1),
        "index_pass_tokens_per_s": round(tokens / statistics.median(times["index_pass"]), 1),
        "speedup_median": round(statistics.median(ratios), 3),
        "speedup_per_repeat": [round(r, 3) for r in ratios],
    }


def peak_rss(n_docs: int, workdir: Path, model_dir: Path) -> dict:
    rng = random.Random(n_docs)
    words = "river stone cloud lamp orbit signal garden copper winter engine paper violet harbor needle".split()
    data = workdir / f"docs-{n_docs}.jsonl"
    with data.open("w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(8, 24)))}) + "\n")
    out = workdir / f"index-{n_docs}"
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report this parent's peak.
    code = ("import re, time; from indexer.cli import main\n"
            "hwm = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "base = hwm('VmRSS'); t = time.time()\n"
            f"rc = main(['build', '--model', {str(model_dir)!r}, '--data', {str(data)!r}, '--out', {str(out)!r}, "
            "'--no-progress', '--batch-size', '32', '--max-tokens', '64'])\n"
            "print('RESULT', rc, base, hwm('VmHWM'), time.time() - t)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    if proc.returncode or not line:
        raise RuntimeError(proc.stderr[-2000:])
    _, rc, base_kib, kib, seconds = line[0].split()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    build = read_manifest(out).build
    return {"documents": n_docs, "peak_rss_mib": round(int(kib) / 1024, 1),
            "rss_after_imports_mib": round(int(base_kib) / 1024, 1), "seconds": round(float(seconds), 1),
            "build_tokens_per_s": build.tokens_per_s,
            "index_mib": round(size / 2**20, 1)}


EPOCH = """
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data, batch_size, max_tokens, shard = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
ids = [x[:max_tokens] for x in tok([json.loads(l)["text"] for l in open(data)])["input_ids"]]
for s in range(0, len(ids), shard):  # length-sorted batches within shards, as the indexer makes them
    chunk = sorted(ids[s : s + shard], key=len)
    for b in range(0, len(chunk), batch_size):
        batch = chunk[b : b + batch_size]
        width = max(map(len, batch))
        x = torch.tensor([i + [0] * (width - len(i)) for i in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in batch])
        model.zero_grad(set_to_none=True)
        model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
"""

LOAD = """
import torch
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def build_vs_epoch(workdir: Path, n_docs: int, rounds: int, batch_size: int = 16, max_tokens: int = 128) -> dict:
    """Seconds of `python -m indexer build` (defaults) and of a plain epoch, whole processes,
    alternated `rounds` times quiet and `rounds` times beside a competing load; median ratios."""
    from indexer.demo_corpus import stdlib_docstrings, train_tokenizer
    docs = stdlib_docstrings(max_docs=n_docs)
    data = workdir / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    model_dir = workdir / "model"  # the demo's shape, random weights: speed does not depend on what it learned
    tokenizer = train_tokenizer([d["text"] for d in docs], model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=max_tokens, n_embd=128, n_layer=2, n_head=4,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # every core, as a user runs them
    build = [sys.executable, "-m", "indexer", "build", "--model", str(model_dir), "--data", str(data), "--out",
             str(workdir / "index"), "--overwrite", "--no-progress", "--batch-size", str(batch_size),
             "--max-tokens", str(max_tokens)]
    commands = {"epoch": [sys.executable, "-c", EPOCH, str(model_dir), str(data), str(batch_size), str(max_tokens), "1024"],
                "build": build, "build_compact_only": build + ["--no-high"]}  # the defaults, and without the high stage
    seconds: dict[str, dict[str, list[float]]] = {c: {k: [] for k in commands} for c in ("quiet", "loaded")}
    for condition in ("quiet", "loaded"):
        load = subprocess.Popen([sys.executable, "-c", LOAD], env=env) if condition == "loaded" else None
        try:
            for _ in range(rounds):
                for label, cmd in commands.items():
                    t = time.perf_counter()
                    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(f"{label} failed ({done.returncode}): {done.stderr[-2000:]}")
                    seconds[condition][label].append(time.perf_counter() - t)
                    print(f"{condition} {label}: {seconds[condition][label][-1]:.1f} s", flush=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in seconds.items()}
    ratio = lambda c, k: round(statistics.median(b / e for b, e in zip(seconds[c][k], seconds[c]["epoch"])), 3)
    slowdown = {k: round(med["loaded"][k] / med["quiet"][k], 3) for k in commands}
    return {"documents": len(docs), "rounds": rounds, "batch_size": batch_size, "max_tokens": max_tokens,
            "seconds": {c: {k: [round(x, 2) for x in v] for k, v in d.items()} for c, d in seconds.items()},
            "over_epoch": {c: {k: ratio(c, k) for k in commands if k != "epoch"} for c in seconds},
            "slowdown_under_load": slowdown,
            # the check: a build suffers a competing load no worse than 1.5x what an epoch suffers
            "slowdown_over_epoch_slowdown": {k: round(slowdown[k] / slowdown["epoch"], 3) for k in commands if k != "epoch"}}


def tiny_model_dir(workdir: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(
        "river stone cloud lamp orbit signal garden copper winter engine paper violet harbor needle".split())}},
        unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = workdir / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(out)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=15, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                                           eos_token_id=0)).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the tiny model, one batch, 200 and 400 documents")
    ap.add_argument("--only", choices=["throughput", "memory", "build_vs_epoch"], default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "indexing.json"))
    args = ap.parse_args()
    q = args.quick
    out = Path(args.out)
    # Other benchmarks (large_index.py) keep their own sections of the same file.
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}
    if args.only in (None, "throughput"):
        results["throughput"] = []
        for name, kwargs in MODELS.items():
            small = kwargs["n_layer"] > 2
            if args.smoke and small:
                continue
            r = throughput(name, kwargs, n_batches=1 if args.smoke else 2 if q else (3 if small else 16), batch_size=8,
                           max_len=128, repeats=1 if args.smoke else 2 if q else 7, rank=8)
            print(json.dumps(r), flush=True)
            results["throughput"].append(r)
    if args.only in (None, "memory"):
        results["memory"] = []
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = tiny_model_dir(Path(tmp))
            for n in ((200, 400) if args.smoke else (1_000, 5_000) if q else (10_000, 100_000)):
                r = peak_rss(n, Path(tmp), model_dir)
                print(json.dumps(r), flush=True)
                results["memory"].append(r)
    if args.only in (None, "build_vs_epoch"):
        n_docs, rounds = (120, 1) if args.smoke else (1500, 2) if q else (3000, 3)
        with tempfile.TemporaryDirectory() as tmp:
            results["build_vs_epoch"] = build_vs_epoch(Path(tmp), n_docs, rounds)
        print(json.dumps(results["build_vs_epoch"]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
