"""A bounded load test: 16 clients for 10 s against a real `python -m api` process on a loopback port
(micro-batching on, the default). Every request sent is answered with a 200 and a well-formed body;
nothing about speed is asserted beyond the run's bounded length."""
from __future__ import annotations

import random
import threading
import time

import httpx

from .support import WORDS, build_corpus_index, running_api, synthetic_corpus

CLIENTS = 16
SECONDS = 10.0
VOCABULARY = WORDS[:14]


def test_sixteen_clients_for_ten_seconds(tmp_path, gpt2_dir):
    index = build_corpus_index(tmp_path, gpt2_dir, synthetic_corpus(120, seed=11))
    sent, answered, failures = [0] * CLIENTS, [0] * CLIENTS, []

    def client(i: int, base: str, stop_at: float) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=base, timeout=60) as c:
            while time.monotonic() < stop_at:
                body = {"prompt": " ".join(rng.choices(VOCABULARY, k=rng.randint(0, 6))),
                        "response": " ".join(rng.choices(VOCABULARY, k=rng.randint(2, 12))),
                        "k": rng.choice([1, 10, 50]), "mode": rng.choice(["influence", "cosine"])}
                sent[i] += 1
                try:
                    r = c.post("/attribute", json=body)
                except httpx.HTTPError as e:
                    failures.append(f"client {i}: {type(e).__name__}: {e}")
                    continue
                results = r.json().get("results") if r.status_code == 200 else None
                if r.status_code == 200 and len(results) == body["k"] and \
                        all(a["score"] >= b["score"] for a, b in zip(results, results[1:])):
                    answered[i] += 1
                else:
                    failures.append(f"client {i}: {r.status_code} {r.text[:300]}")

    with running_api(index, tmp_path) as (base, proc, err):
        stop_at = time.monotonic() + SECONDS
        threads = [threading.Thread(target=client, args=(i, base, stop_at)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SECONDS + 120)  # bounded: a hung request fails the test, not the suite
        assert not any(t.is_alive() for t in threads), "a client is still waiting for an answer"
        assert proc.poll() is None, "the server died under load"
    total = sum(sent)
    print(f"load test: {CLIENTS} clients, {SECONDS:.0f} s: {total} requests, {sum(answered)} answered, "
          f"{total / SECONDS:.1f} req/s")
    assert failures == []
    assert total > CLIENTS and sum(answered) == total
