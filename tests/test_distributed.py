"""`torchrun --nproc_per_node 2 -m indexer build ...` on the CPU (gloo): the index equals the one a
single process builds from the same data, file for file (both stages, each process computing its own
shards' rows), also after the whole launch was SIGKILLed in or after the high-fidelity sample and rerun;
a bad record stops every process with its file and line and leaves nothing behind. Real
processes launched by torch's own launcher, no mocks."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer import ann, store
from indexer.build import BuildConfig, build_index
from indexer.store import Index

from .support import (REPO, checkpointed_shards, fit_preconditioner, leftovers, subprocess_env, synthetic_corpus,
                      table_rows, write_jsonl)

SHARD = 8
# raw: 60 documents in 8 shards: rank 0 writes 0, 2, 4, 6 and rank 1 writes 1, 3, 5, 7 (the short last
# one); the high-fidelity sample is the whole corpus, fitted when it ends.
# kfac and ekfac: 120 documents in 15 shards, a high-fidelity sample of at least 20 documents (shards 0-2,
# 24 documents, two of the shards rank 0's), fitted at shard 3; killed once both processes have checkpointed a shard (kfac: in the
# sample) or three (ekfac: after it), then rerun.
N_DOCS = {"raw": 60, "kfac": 120, "ekfac": 120}
KINDS = tuple(N_DOCS)
HIGH_SAMPLE = {"raw": 4096, "kfac": 20, "ekfac": 20}
KILL_AT = {"kfac": 1, "ekfac": 3}
BAD_LINE = 3 * SHARD + 2  # in shard 3, which rank 1 computes (every process reads every record)


def torchrun(gpt2_dir, data, out, *extra) -> subprocess.Popen:
    env = subprocess_env(OMP_NUM_THREADS="1", LOGRA_DIST_TIMEOUT_S="120")
    log = Path(out).with_name(Path(out).name + ".log")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "indexer", "build", "--model", str(gpt2_dir), "--data", str(data), "--out", str(out),
           "--shard-size", str(SHARD), "--batch-size", "4", "--no-progress", *extra]
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def checkpointed(building: Path, rank: int) -> int:
    return checkpointed_shards(building, f"checkpoint-{rank}.pt")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        above = todo.pop()
        children = [c for c, p in parent.items() if p == above]
        found += children
        todo += children
    return found


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers, as a lost machine would."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def kill_when_checkpointed(proc: subprocess.Popen, building: Path, shards: int) -> list[int]:
    """Kill the launch once each process has checkpointed `shards` shards; returns how many each had."""
    try:
        while proc.poll() is None and min(checkpointed(building, r) for r in (0, 1)) < shards:
            time.sleep(0.002)
    finally:
        kill_launch(proc)
    assert building.is_dir(), "the build finished before it could be killed"
    return [checkpointed(building, r) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_dir):
    """Every 2-process build of the module at once (each pays seconds of imports), and, meanwhile,
    the 1-process builds of the same data in this process. Returns (folder, return codes)."""
    d = tmp_path_factory.mktemp("dist")
    data = {k: write_jsonl(d / f"data-{k}.jsonl", synthetic_corpus(n, seed=77)) for k, n in N_DOCS.items()}
    lines = (d / "data-raw.jsonl").read_text().splitlines()
    lines[BAD_LINE - 1] = '{"id": "broken", "text": '
    (d / "bad.jsonl").write_text("\n".join(lines) + "\n")
    two = {k: (gpt2_dir, data[k], d / f"two-{k}", "--preconditioner", k, "--high-sample", str(HIGH_SAMPLE[k]))
           for k in KINDS}
    procs = {f"two-{k}": torchrun(*args) for k, args in two.items()}
    procs["bad"] = torchrun(gpt2_dir, d / "bad.jsonl", d / "bad")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of the launch: the same arithmetic
    try:
        codes = {}
        for k, at in KILL_AT.items():
            codes[f"killed-at-{k}"] = kill_when_checkpointed(procs[f"two-{k}"], d / f".two-{k}.building", at)
            procs[f"two-{k}"] = torchrun(*two[k])  # the same command again: resumes
        for k in KINDS:
            build_index(BuildConfig(model=gpt2_dir, data=[data[k]], out=str(d / f"one-{k}"), preconditioner=k,
                                    shard_size=SHARD, batch_size=4, high_sample=HIGH_SAMPLE[k], progress=False))
        codes.update({name: p.wait(timeout=240) for name, p in procs.items()})
    finally:
        torch.set_num_threads(threads)
        for p in procs.values():  # never leave a launch or its workers behind
            if p.poll() is None:
                kill_launch(p)
    return d, codes


def assert_same_state(a, b, path="state") -> None:
    """Two saved engine states (nested dicts of tensors) equal to the last bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def log(d: Path, name: str) -> str:
    return (d / f"{name}.log").read_text()


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_build_the_one_process_index(runs, kind):
    d, codes = runs
    assert codes[f"two-{kind}"] == 0, log(d, f"two-{kind}")[-4000:]
    one, two = Index.open(d / f"one-{kind}"), Index.open(d / f"two-{kind}")
    assert two.manifest.build.processes == 2
    assert len(two) == N_DOCS[kind]
    # the same documents, rows and metadata, in the input's order
    assert table_rows(d / f"two-{kind}") == table_rows(d / f"one-{kind}")
    assert [r["id"] for r in table_rows(d / f"two-{kind}")] == [f"doc-{i}" for i in range(N_DOCS[kind])]
    # the same files: compact and high-fidelity rows, norms, scales, FAISS, fitted state (compensated sums
    # do not depend on which process added what; rank 0's eigenbases are every process's)
    for name in ("vectors.npy", "norms.npy", "scales.npy", "high.npy", "high-norms.npy", "high-scales.npy"):
        if (d / f"one-{kind}" / name).exists():
            assert np.array_equal(np.load(d / f"two-{kind}" / name), np.load(d / f"one-{kind}" / name)), name
    s1, s2 = (torch.load(d / f"{n}-{kind}" / "state.pt", weights_only=True) for n in ("one", "two"))
    assert_same_state(s1, s2)
    whole_shards = -(-HIGH_SAMPLE[kind] // SHARD) * SHARD  # the sample is whole shards
    assert two.manifest.high.sample_documents == one.manifest.high.sample_documents == min(whole_shards, N_DOCS[kind])
    # what a user sees: every document as a query, both stages, the same top 10 and scores within 1e-6
    for stored in (lambda ix: np.asarray(ix.vectors, np.float64),
                   lambda ix: np.asarray(ix.high_rows(range(len(ix))), np.float64) * ix.high_norms[:, None]):
        a, b = stored(one), stored(two)
        sa, sb = a @ a.T, b @ b.T
        np.testing.assert_allclose(sb, sa, rtol=1e-6, atol=1e-6 * np.abs(sa).max())
        assert np.array_equal(np.argsort(-sa, axis=1, kind="stable")[:, :10], np.argsort(-sb, axis=1, kind="stable")[:, :10])
    probes = np.asarray(one.vectors[::6])
    for mode in ann.MODES:
        q = ann.unit_rows(probes) if mode == "cosine" else probes
        assert np.array_equal(one.faiss[mode].search(q, 5)[1], two.faiss[mode].search(q, 5)[1]), mode
    # the same manifest but for how it was built
    m1, m2 = one.manifest.to_json(), two.manifest.to_json()
    b1, b2 = m1.pop("build"), m2.pop("build")
    assert m1 == m2
    assert (b1["processes"], b2["processes"]) == (1, 2)
    if kind in KILL_AT:  # the rerun went on from each process's last checkpoint
        killed_at = codes[f"killed-at-{kind}"]
        assert min(killed_at) >= KILL_AT[kind] and not (d / f".two-{kind}.building").exists()
        assert b2["resumed_at_document"] == SHARD * sum(killed_at)
    else:
        assert b2["resumed_at_document"] == 0
    assert leftovers(d) == []


def test_bad_record_stops_every_process_and_leaves_nothing(runs):
    d, codes = runs
    out = log(d, "bad")
    assert codes["bad"] != 0, out[-4000:]
    message = f"bad.jsonl line {BAD_LINE}: invalid JSON"
    # each process read the record and says so itself (rank 1's line is tagged)
    assert f"error: {d / 'bad.jsonl'} line {BAD_LINE}" in out and "error: [rank 1] " in out and message in out, out[-4000:]
    assert not (d / "bad").exists()
    assert leftovers(d) == []


# -- the preconditioner's statistics, summed over processes ---------------------------------------------

def _all_reduce(pres: list, second: bool = False) -> None:
    """What an all-gather does to `Preconditioner.reduce` in several processes, in one: each gets
    every process's tensors, in rank order, for each tensor it hands over."""
    handed = [[] for _ in pres]
    for pre, mine in zip(pres, handed):
        copy.deepcopy(pre).reduce(lambda t, mine=mine: (mine.append(t.clone()), [t])[1], second=second)
    for pre in pres:
        it = iter(zip(*handed))
        pre.reduce(lambda t: [x.clone() for x in next(it)], second=second)


@pytest.mark.parametrize("kind", ["none", "raw", "kfac", "ekfac"])
def test_statistics_summed_over_processes_fit_the_one_process_preconditioner(gpt2_dir, kind):
    """Three processes: two hold half the batches each, one holds none (more processes than
    shards); after the sums each fits the preconditioner one process fits on all the batches, to the
    last bit (compensated sums do not depend on the order of the additions)."""
    from engine import LoGra, LoGraConfig, Preconditioner, load_model
    model, tok = load_model(gpt2_dir)
    logra = LoGra(model, LoGraConfig(rank=3))
    whole, outs = fit_preconditioner(kind, logra, tok, [("", d["text"]) for d in synthetic_corpus(24, seed=6)])
    parts = [outs[1::2], outs[::2][::-1], []]  # interleaved, one of them backwards
    pres = [Preconditioner(kind, logra.shapes) for _ in parts]
    for pre, part in zip(pres, parts):
        for o in part:
            pre.update(o.grads, o.token_stats)
    _all_reduce(pres)
    if whole.needs_second_pass:
        for pre, part in zip(pres, parts):
            for o in part:
                pre.update_second(o.grads)
        _all_reduce(pres, second=True)
    g = outs[0].grads
    for pre in pres:
        assert (pre.n_docs, pre.n_tokens) == (whole.n_docs, whole.n_tokens)
        assert torch.equal(pre.finalize().apply(g), whole.apply(g))
