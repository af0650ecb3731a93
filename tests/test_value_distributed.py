"""`torchrun --nproc_per_node 2 -m indexer value ...` on the CPU (gloo): the report and the per-document
values equal the ones a single process writes for the same index and queries (each process computes
half the query vectors and scores half the documents; rank 0 sums and writes); a bad query record
stops both processes with its file and line and writes nothing. Real processes launched by torch's
own launcher, as tests/test_distributed.py launches the build. Also, in process: the document
shares of any number of processes (more than there are documents included) add up to the whole."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.distributed import Processes
from indexer.store import Index
from indexer.query.value import share, summed_scores, value_groups

from .support import REPO, build_corpus_index, run_cli, subprocess_env, synthetic_corpus, write_jsonl

N_DOCS = 30
QUERIES = [{"prompt": p, "response": r} for p, r in [
    ("winter engine", " paper violet harbor needle"), ("", "river stone cloud lamp orbit"),
    ("falcon", " marble thunder velvet lantern"), ("meadow cipher", " anchor quartz ember"),
    ("", "willow canyon socket prism tundra")]]  # odd: the processes' shares of the queries differ
RUNS = {  # name -> options (every run groups by two fields)
    "high-influence": ["--precision", "high", "--mode", "influence", "--per-document", "docs.jsonl"],
    "fast-cosine": ["--precision", "fast", "--mode", "cosine", "--per-document", "docs.jsonl"],
}


def corpus() -> list[dict]:
    docs = synthetic_corpus(N_DOCS, seed=41)
    for i, d in enumerate(docs):
        d["licence"] = ["cc-by", "mit", "apache"][i % 3]
        if i % 5 == 2:
            del d["source"]
    return docs


def value_argv(index_dir, queries, folder: Path, options: list[str]) -> list[str]:
    options = [str(folder / o) if o.endswith(".jsonl") else o for o in options]
    return ["value", "--index", str(index_dir), "--queries", str(queries), "--prompt-field", "prompt",
            "--response-field", "response", "--group-by", "licence", "--group-by", "source", "--bootstrap", "200",
            "--out", str(folder / "report.json"), "--no-progress", *options]


def torchrun(argv: list[str], log: Path) -> subprocess.Popen:
    env = subprocess_env(OMP_NUM_THREADS="1", LOGRA_DIST_TIMEOUT_S="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "indexer", *argv]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_dir):
    """Every 2-process launch at once and, meanwhile, the same valuations in one process (in this
    one). Returns (folder, return codes)."""
    d = tmp_path_factory.mktemp("value-dist")
    index_dir = build_corpus_index(d, gpt2_dir, corpus())
    queries = write_jsonl(d / "q.jsonl", QUERIES)
    bad = write_jsonl(d / "bad.jsonl", [*QUERIES[:3], '{"prompt": "x", "response": ', *QUERIES[3:]])
    procs = {}
    for name, options in RUNS.items():
        (d / f"two-{name}").mkdir()
        procs[name] = torchrun(value_argv(index_dir, queries, d / f"two-{name}", options), d / f"two-{name}.log")
    (d / "bad").mkdir()
    procs["bad"] = torchrun(value_argv(index_dir, bad, d / "bad", []), d / "bad.log")
    try:
        for name, options in RUNS.items():
            (d / f"one-{name}").mkdir()
            code, _, err = run_cli(value_argv(index_dir, queries, d / f"one-{name}", options), _NoCapture())
            assert code == 0, err
        codes = {name: p.wait(timeout=240) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return d, codes


class _NoCapture:
    """run_cli's capsys stand-in for a module fixture (pytest's capsys is per test)."""

    @staticmethod
    def readouterr():
        return "", ""


def assert_close(a, b, tol: float, where: str = "report") -> None:
    """Equal JSON, numbers to `tol` (absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, abs=tol, rel=1e-5), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", RUNS)
def test_two_processes_write_the_one_process_report(runs, name):
    d, codes = runs
    assert codes[name] == 0, (d / f"two-{name}.log").read_text()[-4000:]
    assert "2 processes" in (d / f"two-{name}.log").read_text()
    one = json.loads((d / f"one-{name}" / "report.json").read_text())
    two = json.loads((d / f"two-{name}" / "report.json").read_text())
    docs_one = [json.loads(x) for x in (d / f"one-{name}" / "docs.jsonl").read_text().splitlines()]
    docs_two = [json.loads(x) for x in (d / f"two-{name}" / "docs.jsonl").read_text().splitlines()]
    kinds = {(doc["licence"], doc.get("source")) for doc in corpus()}  # a source, or none
    assert len(docs_one) == N_DOCS and len(one["groups"]) == len(kinds) > 6
    # float32 query vectors from other batches and sums in another order: equal to float tolerance
    tol = 1e-5 * max(abs(one["total_positive"]), abs(one["total_negative"]), 1e-12)
    assert_close(one, two, tol)
    assert_close(docs_one, docs_two, tol, "documents")


def test_a_bad_query_record_stops_both_processes_and_writes_nothing(runs):
    d, codes = runs
    out = (d / "bad.log").read_text()
    assert codes["bad"] != 0, out[-4000:]
    assert f"error: {d / 'bad.jsonl'} line 4" in out and "error: [rank 1] " in out, out[-4000:]
    assert not (d / "bad" / "report.json").exists()


def test_document_shares_of_any_number_of_processes_add_up_to_the_whole(tmp_path, gpt2_dir):
    index = Index.open(build_corpus_index(tmp_path, gpt2_dir, synthetic_corpus(7, seed=3)))
    groups, codes = value_groups(index, ["source"])
    q = np.random.default_rng(0).standard_normal((3, index.vectors.shape[1])).astype(np.float32)
    whole = summed_scores(index, "fast", q, codes, len(groups))
    for world in (2, 3, 9):  # 9 processes for 7 documents: two score none
        parts = [share(len(index), Processes(rank=r, world=world)) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(len(index)))
        sums = [summed_scores(index, "fast", q, codes, len(groups), rows=p) for p in parts]
        np.testing.assert_allclose(sum(v for v, _ in sums), whole[0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sum(g for _, g in sums), whole[1], rtol=1e-12, atol=1e-12)
