"""Serving past one process: two stateless `python -m api` replicas over one index folder (shared
storage, here a local folder), both under load from concurrent clients, give the same answers; an
index swapped into the folder (`indexer append`: a new folder renamed into place) is seen by both,
with no failed request on either; serving writes nothing into the folder."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from indexer.build import append_documents

from .support import build_corpus_index, running_api, synthetic_corpus, write_jsonl

N_BEFORE, N_AFTER = 16, 24
QUERIES = [{"response": d["text"], "k": 5, "mode": mode, "precision": precision}
           for d, (mode, precision) in zip(synthetic_corpus(N_AFTER, seed=11)[::2],
                                           [("influence", "high"), ("cosine", "fast"), ("cosine", "high")] * 4)]


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the index folder with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _load(urls: list[str], stop: threading.Event, seen: list, worker: int) -> None:
    """Queries in a loop, to each replica in turn, until `stop`; records (replica, query, status, answer)."""
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(httpx.Client(base_url=u, timeout=60)) for u in urls]
        i = worker
        while not stop.is_set():
            replica, q = i % len(urls), (i // len(urls)) % len(QUERIES)
            r = clients[replica].post("/attribute", json=QUERIES[q])
            seen.append((replica, q, r.status_code, r.json() if r.status_code == 200 else r.text))
            i += 1


def _answer(body: dict) -> tuple:
    return body["n_documents"], [x["id"] for x in body["results"]], [x["score"] for x in body["results"]]


def _until_every_query_answered_by_both(seen: list, n_documents: int, within_s: float = 300) -> None:
    every = {(replica, q) for replica in (0, 1) for q in range(len(QUERIES))}
    deadline = time.monotonic() + within_s
    while {(rep, q) for rep, q, status, body in list(seen) if status == 200 and body["n_documents"] == n_documents} < every:
        assert time.monotonic() < deadline and all(status == 200 for _, _, status, _ in list(seen)), seen[-3:]
        time.sleep(0.05)


def test_two_replicas_under_load_answer_alike_and_both_see_a_hot_swap(tmp_path, gpt2_dir):
    docs = synthetic_corpus(N_AFTER, seed=11)
    index = build_corpus_index(tmp_path, gpt2_dir, docs[:N_BEFORE])
    new = write_jsonl(tmp_path / "new.jsonl", docs[N_BEFORE:])
    logs = [tmp_path / "log-a", tmp_path / "log-b"]
    for log in logs:
        log.mkdir()
    built = _files(index)
    with running_api(index, logs[0]) as (a, _, _), running_api(index, logs[1]) as (b, _, _):
        stop, seen = threading.Event(), []
        workers = [threading.Thread(target=_load, args=([a, b], stop, seen, w)) for w in range(4)]
        for w in workers:
            w.start()
        try:
            _until_every_query_answered_by_both(seen, N_BEFORE)
            assert _files(index) == built  # serving wrote nothing into the folder
            append_documents(index, [new], progress=False)  # under load: a new folder renamed into place
            swapped = _files(index)
            _until_every_query_answered_by_both(seen, N_AFTER)
        finally:
            stop.set()
            for w in workers:
                w.join(60)
        assert _files(index) == swapped
        # after the swap: a new document sent as the query finds itself first on both replicas
        for url in (a, b):
            for doc in docs[N_BEFORE:N_BEFORE + 3]:
                r = httpx.post(url + "/attribute", json={"response": doc["text"], "k": 1, "mode": "cosine"}, timeout=60)
                assert r.json()["results"][0]["id"] == doc["id"]

    assert [s for s in seen if s[2] != 200] == []  # no failed request on either replica, the swap included
    answers: dict[tuple[int, int], dict[int, list]] = {}  # (n_documents, query) -> replica -> answers
    for replica, q, _, body in seen:
        n, ids, scores = _answer(body)
        answers.setdefault((n, q), {}).setdefault(replica, []).append((ids, scores))
    assert {n for n, _ in answers} == {N_BEFORE, N_AFTER}
    both = [key for key, by in answers.items() if len(by) == 2]
    assert sorted(both) == [(n, q) for n in (N_BEFORE, N_AFTER) for q in range(len(QUERIES))]
    for key in both:
        (ids, scores), *rest = answers[key][0] + answers[key][1]
        for other_ids, other_scores in rest:
            assert other_ids == ids, key
            assert other_scores == pytest.approx(scores, rel=1e-6, abs=1e-9), key
