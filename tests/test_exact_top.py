"""benchmarks/quality/exact.py's evaluation: rescoring a top M with other scores, against a direct
computation. (Its `compute` needs the real model's default index, a 24-minute build: not run here.)"""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from benchmarks.quality import evaluate
from benchmarks.quality.exact import _swap_top, score

from .support import REPO, subprocess_env


def swapped(seed: int, queries: int, docs: int, m: int, how: str):
    """Random default and exact scores, and the default's top m rescored `how`."""
    rng = np.random.default_rng(seed)
    base, exact = rng.standard_normal((queries, docs)), rng.standard_normal((queries, docs))
    return base, exact, _swap_top(base, exact, m, how)


def test_a_reordered_top_keeps_its_documents_and_values_and_follows_the_exact_order():
    base, exact, got = swapped(0, 5, 40, 7, "order")
    for q in range(5):
        top = np.argsort(-base[q])[:7]
        rest = np.setdiff1d(np.arange(40), top)
        assert np.array_equal(got[q, rest], base[q, rest])  # below the top: untouched
        assert sorted(got[q, top]) == sorted(base[q, top])  # the same values on the same documents
        by_exact = top[np.argsort(-exact[q, top])]
        assert np.array_equal(by_exact, top[np.argsort(-got[q, top])])  # in the exact scores' order


def test_scaled_top_is_the_least_squares_fit_of_the_exact_scores():
    base, exact, got = swapped(1, 3, 30, 10, "scaled")
    for q in range(3):
        top = np.argsort(-base[q])[:10]
        c, *_ = np.linalg.lstsq(exact[q, top][:, None], base[q, top], rcond=None)
        np.testing.assert_allclose(got[q, top], c[0] * exact[q, top])


def test_score_reports_each_rows_lds_and_its_paired_difference(capsys):
    rng = np.random.default_rng(2)
    masks = rng.random((30, 25)) < 0.5
    losses = rng.standard_normal((30, 2, 4))
    rows = {"default": rng.standard_normal((4, 25)), "other": rng.standard_normal((4, 25))}
    out = score(rows, "default", ["other"], masks, losses)
    for name, r in rows.items():
        per = evaluate.lds_per_query(r, masks, losses)
        assert np.isclose(out["methods"][name]["lds"], per.mean())
    d = evaluate.lds_per_query(rows["other"], masks, losses) - evaluate.lds_per_query(rows["default"], masks, losses)
    assert np.isclose(out["methods"]["other"]["vs_default"], d.mean())
    swapped = evaluate.lds_per_query(_swap_top(rows["default"], rows["other"], 10, "order"), masks, losses)
    assert np.isclose(out["exact_top"]["other: top 10, order"]["lds"], swapped.mean())


def test_the_benchmark_command_line_loads():
    r = subprocess.run([sys.executable, "-m", "benchmarks.quality.exact", "--help"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--time-top" in r.stdout, r.stderr[-2000:]
