"""Slow requests never stall fast ones (api.lanes): query passes go before waiting heavy batches;
the heavy lane admits a bounded number and refuses the rest with 503 and Retry-After; against a real
server, /attribute's median latency with three long token views in flight stays within 2x of its
idle median (a ratio measured in one run, not a wall time)."""
from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from api.lanes import Busy, HeavyLane, PassLock

from .support import WORDS, build_corpus_index, running_api, synthetic_corpus


def _until(condition) -> None:
    while not condition():
        time.sleep(0.001)


def test_a_waiting_query_pass_goes_before_a_waiting_heavy_batch():
    lock, order = PassLock(), []
    inside, release = threading.Event(), threading.Event()

    def hold():
        with lock.heavy():
            inside.set()
            release.wait()

    def take(kind, tag):
        with getattr(lock, kind)():
            order.append(tag)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait()
    heavy = threading.Thread(target=take, args=("heavy", "heavy"))
    heavy.start()
    fast = threading.Thread(target=take, args=("fast", "fast"))
    fast.start()
    _until(lambda: lock._fast_waiting == 1)  # both blocked behind the holder
    release.set()
    for t in (holder, heavy, fast):
        t.join(10)
    assert order == ["fast", "heavy"]


def test_the_heavy_lane_runs_some_queues_some_and_refuses_the_rest():
    lane = HeavyLane(running=1, queued=1)
    running, release, done = threading.Event(), threading.Event(), []

    def first():
        with lane.enter("token view"):
            running.set()
            release.wait()
        done.append("first")

    def second():
        with lane.enter("token view"):
            done.append("second")

    a = threading.Thread(target=first)
    a.start()
    running.wait()
    b = threading.Thread(target=second)
    b.start()
    _until(lambda: lane._admitted._value == 0)  # the second is admitted and waiting to run
    with pytest.raises(Busy, match="try again"):
        with lane.enter("token view"):
            pass
    release.set()
    a.join(10), b.join(10)
    assert done == ["first", "second"]
    with lane.enter("token view"):  # room again
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory, gpt2_dir):
    root = tmp_path_factory.mktemp("lanes")
    index = build_corpus_index(root, gpt2_dir, synthetic_corpus(40, seed=3))
    (root / "log").mkdir()
    with running_api(index, root / "log", args=("--max-batch", "1")) as (base, _, _):
        yield base


LONG = " ".join(WORDS[i % len(WORDS)] for i in range(120))  # a long response: many copies per token view


def _attribute_ms(c: httpx.Client, n: int) -> list[float]:
    times = []
    for i in range(n):
        t = time.perf_counter()
        r = c.post("/attribute", json={"response": f"{WORDS[i % 9]} river stone cloud lamp", "k": 5, "precision": "fast"})
        times.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return times


def test_token_views_in_flight_leave_attribute_within_twice_its_idle_latency(server):
    doc = httpx.post(server + "/attribute", json={"response": LONG, "k": 1}, timeout=60).json()["results"][0]["id"]
    stop, answered = threading.Event(), []

    def token_views():
        with httpx.Client(base_url=server, timeout=120) as c:
            while not stop.is_set():
                answered.append(c.post("/attribute/tokens", json={"response": LONG, "id": doc}).status_code)

    with httpx.Client(base_url=server, timeout=60) as c:
        _attribute_ms(c, 5)  # warm
        idle = statistics.median(_attribute_ms(c, 25))
        views = [threading.Thread(target=token_views) for _ in range(3)]
        for t in views:
            t.start()
        _until(lambda: len(answered) >= 1)  # token views are being computed
        loaded = statistics.median(_attribute_ms(c, 25))
        stop.set()
        for t in views:
            t.join(120)
    assert set(answered) == {200}  # three fit in the lane (1 running, 2 waiting)
    assert loaded <= 2 * idle, (loaded, idle)


def test_excess_slow_requests_get_503_with_retry_after(server):
    doc = httpx.post(server + "/attribute", json={"response": LONG, "k": 1}, timeout=60).json()["results"][0]["id"]
    answers = []

    def view():
        r = httpx.post(server + "/attribute/tokens", json={"response": LONG, "id": doc}, timeout=120)
        answers.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=view) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(a[0] for a in answers)
    assert 200 in codes and 503 in codes and set(codes) == {200, 503}
    refused = [a for a in answers if a[0] == 503]
    assert all(a[1] == "5" and "try again" in a[2]["detail"] for a in refused)
