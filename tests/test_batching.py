"""Micro-batching of /attribute queries: the batcher on its own (batches, keys, failures), then the
Attributor: answers of concurrent queries sharing passes equal their lone answers, on both model
families (GPT-2 Conv1D, Llama with rotary positions), fast and high queries in one pass included,
and a query that cannot be scored fails alone."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.batching import MicroBatcher
from api.search import Attributor, QueryError

from .support import build_corpus_index, synthetic_corpus


def _same_scores(got, want) -> None:
    """Equal up to float32 rounding: a batch's matmuls have other shapes than a lone query's, so BLAS
    sums in another order (seen: 3e-6 on a score of 2.4 beside a top score of 17.5 on Llama). A batch
    dependence (padding, attention) would show as differences of the order of the scores themselves."""
    scale = max(abs(x) for x in want)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6 * scale)


def _concurrently(fn, args: list, max_workers: int | None = None) -> list:
    """fn(*a) for every a, all released at once from their own threads; results (or exceptions) in order."""
    barrier = threading.Barrier(len(args))

    def call(a):
        barrier.wait()
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001  (compared by the caller)
            return e

    with ThreadPoolExecutor(max_workers or len(args)) as pool:
        return list(pool.map(call, args))


def test_batcher_shares_passes_and_keeps_order():
    calls = []

    def run(key, items):
        calls.append((key, list(items)))
        time.sleep(0.02)  # a pass takes a while: later arrivals queue behind it
        return [(key, x * 10) for x in items]

    b = MicroBatcher(run, max_batch=4, max_wait_s=0.05, always_wait=True)
    out = _concurrently(b.submit, [("a", i) for i in range(10)])
    assert out == [("a", i * 10) for i in range(10)]
    stats = b.stats.snapshot()
    assert stats["jobs"] == 10 and stats["passes"] == len(calls) < 10
    assert max(len(items) for _, items in calls) <= 4
    assert sum(s * c for s, c in stats["sizes"].items()) == 10


def test_batcher_never_mixes_keys():
    seen = []

    def run(key, items):
        seen.append((key, list(items)))
        return [(key, x) for x in items]

    b = MicroBatcher(run, max_batch=16, max_wait_s=0.05, always_wait=True)
    keys = [object(), object()]
    args = [(keys[i % 2], i) for i in range(12)]
    assert _concurrently(b.submit, args) == args
    for key, items in seen:
        assert all(keys[i % 2] is key for i in items)


def test_failing_job_fails_alone():
    def run(key, items):
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    b = MicroBatcher(run, max_batch=8, max_wait_s=0.1, always_wait=True)
    out = _concurrently(b.submit, [(None, x) for x in ["a", "b", "bad", "c"]])
    assert out[:2] == ["A", "B"] and out[3] == "C"
    assert isinstance(out[2], ValueError) and str(out[2]) == "bad item"
    assert b.stats.snapshot()["failed_batches"] >= 1
    # and the batcher still works afterwards
    assert b.submit(None, "d") == "D"


def test_max_batch_one_is_one_pass_per_job():
    b = MicroBatcher(lambda key, items: list(items), max_batch=1, max_wait_s=1.0)  # the wait is ignored
    started = time.monotonic()
    assert _concurrently(b.submit, [(None, i) for i in range(6)]) == list(range(6))
    assert time.monotonic() - started < 1.0
    assert b.stats.snapshot()["sizes"] == {1: 6}
    with pytest.raises(ValueError):
        MicroBatcher(lambda key, items: items, max_batch=0)


def test_lone_jobs_do_not_wait():
    """Without concurrency a pass starts at once: the wait is only taken while passes are shared."""
    b = MicroBatcher(lambda key, items: list(items), max_batch=16, max_wait_s=0.5)
    started = time.monotonic()
    assert [b.submit(None, i) for i in range(5)] == list(range(5))
    assert time.monotonic() - started < 0.5


def _batching_attributor(index_dir) -> Attributor:
    """An Attributor whose batcher waits long before every pass, so a burst shares passes for sure."""
    att = Attributor(index_dir, max_batch=16)
    att._batcher = MicroBatcher(att._query_batch, max_batch=16, max_wait_s=0.3, always_wait=True)
    return att


QUERIES = [("", "river stone cloud lamp orbit"), ("garden copper", "winter engine paper violet harbor needle falcon"),
           ("marble", "thunder velvet"), ("a much longer prompt: lantern meadow cipher anchor quartz ember willow",
                                          "canyon socket prism tundra beacon ledger nickel saddle raven cobalt river"),
           ("stone", "cloud"), ("", "lamp orbit signal garden copper winter engine paper violet harbor needle falcon marble")]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def small_index(request, tmp_path_factory):
    model_dir = request.getfixturevalue(f"{request.param}_dir")
    return build_corpus_index(tmp_path_factory.mktemp(f"batch-{request.param}"), model_dir, synthetic_corpus(60, seed=3))


@pytest.mark.parametrize("mode", ["influence", "cosine"])
def test_batched_answers_equal_lone_answers(small_index, mode):
    att = _batching_attributor(small_index)
    lone = [att.attribute(p, r, 20, mode) for p, r in QUERIES]
    assert att.batch_stats["sizes"] == {1: len(QUERIES)}
    burst = QUERIES * 2
    together = _concurrently(lambda p, r: att.attribute(p, r, 20, mode), burst)
    stats = att.batch_stats
    assert stats["passes"] - len(QUERIES) < len(burst), stats  # passes were shared...
    assert max(stats["sizes"]) > 1, stats
    for (hits, docs, info), got in zip(lone * 2, together):  # ...and changed nothing
        assert not isinstance(got, Exception), got
        g_hits, g_docs, g_info = got
        assert [d["id"] for d in g_docs] == [d["id"] for d in docs]
        assert [h.row for h in g_hits] == [h.row for h in hits]
        _same_scores([h.score for h in g_hits], [h.score for h in hits])
        assert g_info == info


def test_fast_and_high_queries_sharing_a_pass_answer_as_alone(small_index):
    """A pass computes the high stage's vectors when any of its queries is at precision high: each
    query still gets its own precision's answer, the same as alone."""
    att = _batching_attributor(small_index)
    mixed = [(p, r, precision) for (p, r), precision in zip(QUERIES, ["fast", "high"] * len(QUERIES))]
    ask = lambda p, r, precision: att.attribute(p, r, 20, "cosine", precision=precision)
    lone = [ask(*q) for q in mixed]
    together = _concurrently(ask, mixed * 2)
    assert max(att.batch_stats["sizes"]) > 1, att.batch_stats
    for (_, _, precision), (hits, docs, info), got in zip(mixed * 2, lone * 2, together):
        assert not isinstance(got, Exception), got
        g_hits, g_docs, g_info = got
        assert g_info == info and info["precision"] == precision and {h.stage for h in g_hits} == {precision}
        assert [h.row for h in g_hits] == [h.row for h in hits]
        _same_scores([h.score for h in g_hits], [h.score for h in hits])


def test_unscorable_query_fails_alone(small_index):
    att = _batching_attributor(small_index)
    lone = [att.attribute(p, r, 5, "influence") for p, r in QUERIES[:3]]
    burst = [*QUERIES[:2], ("", "x"), QUERIES[2]]  # one token, no prompt: nothing to score
    got = _concurrently(lambda p, r: att.attribute(p, r, 5, "influence"), burst)
    assert isinstance(got[2], QueryError)
    for (hits, _, _), g in zip(lone, [got[0], got[1], got[3]]):
        assert not isinstance(g, Exception), g
        assert [h.row for h in g[0]] == [h.row for h in hits]
        _same_scores([h.score for h in g[0]], [h.score for h in hits])
    assert max(att.batch_stats["sizes"]) > 1
