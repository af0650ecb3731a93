"""A build with two processes against one: wall time and the index it gives.

`python -m indexer build` (one process) and `torchrun --nproc_per_node 2 -m indexer build` on the same
data, options and model, one thread a process (OMP_NUM_THREADS=1), as whole processes (imports and
model load included), alternated `rounds` times. Reports the median of the paired ratios two / one,
each run's manifest timings (the gradient pass, the whole build, the high-fidelity fit), the same ratio
for two independent one-process builds of each half of the data run at once (what two processes that
shared nothing would take on this machine), and whether
the two indexes are the same (every stored file equal; every document as a query: the same top 10 in
both stages, scores within 1e-6 relative).

Sections: "demo" (the demo's shape, random weights, the standard library's docstrings, 256-document
shards so both processes get as many) and "real_model" (SmolLM2-135M-Instruct on chat records of its
quality benchmark; skipped with a line when its package is not installed).

    python benchmarks/processes.py                 # writes benchmarks/results/processes.json
    python benchmarks/processes.py --only demo --rounds 3
    python benchmarks/processes.py --smoke         # seconds: checks the benchmark runs
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from indexer.store import Index, read_manifest  # noqa: E402

FILES = ("vectors.npy", "norms.npy", "scales.npy", "high.npy", "high-norms.npy", "high-scales.npy")


def same_index(a: Path, b: Path, probes: int = 256) -> dict:
    """Whether two builds of the same data are the same index: stored files, and `probes` documents
    (evenly spaced) as queries in both stages (top 10, largest relative score difference)."""
    files = {n: bool(np.array_equal(np.load(a / n), np.load(b / n))) for n in FILES if (a / n).exists()}
    ia, ib = Index.open(a), Index.open(b)
    out = {"files_equal": files}
    stages = {"fast": lambda ix: np.asarray(ix.vectors, np.float64)}
    if ia.high_store is not None:
        stages["high"] = lambda ix: np.asarray(ix.high_rows(range(len(ix))), np.float64) * ix.high_norms[:, None]
    for stage, rows in stages.items():
        x, y = rows(ia), rows(ib)
        at = np.linspace(0, len(x) - 1, min(probes, len(x))).astype(int)
        sx, sy = x[at] @ x.T, y[at] @ y.T
        top = lambda s: np.argsort(-s, axis=1, kind="stable")[:, :10]
        out[stage] = {"same_top10": float(np.mean(np.all(top(sx) == top(sy), axis=1))),
                      "max_rel_diff": float(np.max(np.abs(sx - sy)) / np.max(np.abs(sx)))}
    return out


def timings(index: Path) -> dict:
    b = read_manifest(index).build
    return {"seconds": b.seconds, "gradient_seconds": b.gradient_seconds, "high_fit_seconds": b.high_fit_seconds,
            "processes": b.processes}


def compare(model: Path, data: Path, work: Path, rounds: int, options: list[str], halves: bool = True) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    common = ["-m", "indexer", "build", "--model", str(model), "--data", str(data), "--overwrite", "--no-progress",
              *options]
    commands = {"one": [sys.executable, *common, "--out", str(work / "one")],
                "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *common, "--out", str(work / "two")]}
    if halves:  # the machine's own limit: two independent one-process builds of each half, at once
        lines = data.read_text().splitlines(keepends=True)
        parts = []
        for h, chunk in enumerate((lines[: len(lines) // 2], lines[len(lines) // 2 :])):
            (work / f"half{h}.jsonl").write_text("".join(chunk))
            cmd = [sys.executable, *common, "--out", str(work / f"half{h}")]
            cmd[cmd.index("--data") + 1] = str(work / f"half{h}.jsonl")
            parts.append(shlex.join(cmd))
        commands["halves_at_once"] = ["bash", "-c", f"{parts[0]} & a=$!; {parts[1]} & b=$!; wait $a && wait $b"]
    from indexing import alternate
    manifests = {k: [] for k in ("one", "two")}
    seconds = alternate(commands, rounds, env, conditions=("quiet",),
                        after=lambda label: label in ("one", "two") and manifests[label].append(timings(work / label)))[0]["quiet"]
    seconds = {k: [round(x, 2) for x in v] for k, v in seconds.items()}
    ratios = [t / o for t, o in zip(seconds["two"], seconds["one"])]
    limit = [h / o for h, o in zip(seconds.get("halves_at_once", []), seconds["one"])]
    return {"rounds": rounds, "options": options, "documents": read_manifest(work / "one").n_documents,
            "seconds": seconds, "two_over_one": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios], "manifest_timings": manifests,
            # two independent builds of each half at once against one of the whole: what two processes
            # could reach on this machine if they shared nothing (each its own start-up and model load)
            **({"halves_at_once_over_one": round(statistics.median(limit), 3)} if limit else {}),
            "same_index": same_index(work / "one", work / "two")}


def demo(work: Path, n_docs: int, rounds: int, shard: int, max_tokens: int = 128) -> dict:
    from indexing import demo_shape
    data, model, _ = demo_shape(work, n_docs, max_tokens)
    return compare(model, data, work, rounds, ["--shard-size", str(shard), "--batch-size", "16",
                                               "--max-tokens", str(max_tokens)])


def real_model(work: Path, n_docs: int, rounds: int, shard: int, high_sample: int) -> dict | None:
    from benchmarks.quality.chat import model_dir
    from indexing import chat_records
    try:
        model = model_dir()
    except FileNotFoundError as e:  # its package is not installed (benchmarks/quality/chat.py says which)
        print(f"real_model: skipped ({e})", flush=True)
        return None
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(n_docs)))
    return compare(model, data, work, rounds, ["--shard-size", str(shard), "--high-sample", str(high_sample),
                                               "--batch-size", "16"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "processes.json"),
                   help="results file, merged section by section (default: %(default)s)")
    p.add_argument("--only", choices=("demo", "real_model"), help="one section (default: both)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of each section (default: %(default)s)")
    p.add_argument("--demo-docs", type=int, default=3000, help="demo section's documents (default: %(default)s)")
    p.add_argument("--real-docs", type=int, default=192, help="real model's chat records (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="a few documents, one round: checks the benchmark runs")
    a = p.parse_args()
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() and not a.smoke else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("demo", "real_model"):
            if a.only and name != a.only or (a.smoke and name == "real_model"):
                continue
            work = Path(tmp) / name
            work.mkdir()
            if name == "demo":
                r = demo(work, 48 if a.smoke else a.demo_docs, 1 if a.smoke else a.rounds, 8 if a.smoke else 256)
            else:
                r = real_model(work, a.real_docs, a.rounds, shard=a.real_docs // 8, high_sample=a.real_docs // 2)
            if r is None:
                continue
            docs, default = (a.demo_docs, 3000) if name == "demo" else (a.real_docs, 192)
            key = "smoke" if a.smoke else name if docs == default else f"{name}_{docs}"
            results[key] = r
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")  # each section as it finishes
            print(json.dumps({name: {k: r[k] for k in ("two_over_one", "same_index")}}, indent=1), flush=True)


if __name__ == "__main__":
    main()
