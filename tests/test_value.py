"""Valuation: `python -m indexer value` and POST /value against a brute force built from the API's
own exact scores (/attribute with k = every document): a document's value is the sum of its scores
over the queries, a group's the sum over its documents; groups split additively; the bootstrap
interval is the one recomputed by hand from per-query group sums; the API and the CLI agree."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import create_app
from api.settings import ServerSettings
from indexer.query.value import CONFIDENCE

from .support import build_corpus_index, run_cli, synthetic_corpus, write_jsonl

N_DOCS = 36
QUERIES = [{"prompt": p, "response": r} for p, r in [
    ("winter engine", " paper violet harbor needle"), ("", "river stone cloud lamp orbit"),
    ("falcon", " marble thunder velvet lantern"), ("meadow cipher", " anchor quartz ember"),
    ("", "willow canyon socket prism tundra"), ("beacon", " ledger nickel saddle raven cobalt")]]


def corpus() -> list[dict]:
    docs = synthetic_corpus(N_DOCS, seed=23)
    for i, d in enumerate(docs):
        d["licence"] = ["cc-by", "mit"][i % 2]
        if i % 7 == 3:
            del d["source"]  # these form their own group
    return docs


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gpt2_dir):
    return build_corpus_index(tmp_path_factory.mktemp("value"), gpt2_dir, corpus())


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("vq") / "q.jsonl", [{"id": f"q{i}", **q} for i, q in enumerate(QUERIES)])


@pytest.fixture(scope="module")
def exact(index_dir):
    """(precision, mode) -> (queries x documents) scores from /attribute over every document."""
    out = {}
    with TestClient(create_app(index_dir)) as c:
        for precision in ("high", "fast"):
            for mode in ("influence", "cosine"):
                m = np.zeros((len(QUERIES), N_DOCS))
                for qi, q in enumerate(QUERIES):
                    res = c.post("/attribute", json={**q, "k": N_DOCS, "mode": mode, "precision": precision}).json()
                    for r in res["results"]:
                        m[qi, int(r["id"].split("-")[1])] = r["score"]
                out[precision, mode] = m
    return out


def cli(argv, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    return out


def value_args(index_dir, queries, out, *extra):
    return ["value", "--index", index_dir, "--queries", queries, "--prompt-field", "prompt", "--response-field", "response",
            "--out", out, "--no-progress", *extra]


def members(group: dict, fields: list[str]) -> list[int]:
    docs = corpus()
    return [i for i, d in enumerate(docs) if {f: d[f] for f in fields if f in d} == group]


@pytest.mark.parametrize("precision,mode", [("high", "influence"), ("fast", "influence"), ("high", "cosine")])
def test_values_are_sums_of_exact_scores(index_dir, queries, exact, tmp_path, capsys, precision, mode):
    cli(value_args(index_dir, queries, tmp_path / "v.json", "--group-by", "source", "--precision", precision,
                   "--mode", mode, "--per-document", tmp_path / "docs.jsonl", "--top", 3), capsys)
    report = json.loads((tmp_path / "v.json").read_text())
    scores = exact[precision, mode]
    per_doc = scores.sum(axis=0)
    tol = 1e-5 * np.abs(scores).sum()  # float32 products, summed in another order
    docs = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == [f"doc-{i}" for i in range(N_DOCS)]
    np.testing.assert_allclose([d["value"] for d in docs], per_doc, atol=tol)
    assert report["n_queries"] == len(QUERIES) and report["n_documents"] == N_DOCS and report["precision"] == precision
    groups = {json.dumps(g["group"], sort_keys=True): g for g in report["groups"]}
    assert set(groups) == {'{"source": "web"}', '{"source": "books"}', '{"source": "code"}', "{}"}  # {}: no source
    pos, neg = np.clip(per_doc, 0, None).sum(), np.clip(per_doc, None, 0).sum()
    for g in report["groups"]:
        rows = members(g["group"], ["source"])
        assert g["n_documents"] == len(rows)
        assert g["value"] == pytest.approx(per_doc[rows].sum(), abs=tol)
        assert g["value_per_document"] == pytest.approx(per_doc[rows].mean(), abs=tol)
        assert g["share_positive"] == pytest.approx(np.clip(per_doc[rows], 0, None).sum() / pos, abs=1e-6)
        assert g["share_negative"] == pytest.approx(np.clip(per_doc[rows], None, 0).sum() / neg if neg < 0 else 0.0, abs=1e-6)
        best = sorted(rows, key=lambda r: -per_doc[r])[:3]
        assert [d["value"] for d in g["top_documents"]] == pytest.approx(per_doc[best], abs=tol)
    assert [g["value"] for g in report["groups"]] == sorted((g["value"] for g in report["groups"]), reverse=True)
    assert sum(g["share_positive"] for g in report["groups"]) == pytest.approx(1.0)
    assert report["total_value"] == pytest.approx(sum(g["value"] for g in report["groups"]), abs=tol)


def test_bootstrap_interval_is_the_percentiles_of_resampled_query_sums(index_dir, queries, exact, tmp_path, capsys):
    cli(value_args(index_dir, queries, tmp_path / "v.json", "--group-by", "licence", "--bootstrap", 500, "--seed", 3), capsys)
    report = json.loads((tmp_path / "v.json").read_text())
    scores = exact["high", "influence"]
    rng = np.random.default_rng(3)
    weights = rng.multinomial(len(QUERIES), np.full(len(QUERIES), 1 / len(QUERIES)), size=500)
    for g in report["groups"]:
        per_query = scores[:, members(g["group"], ["licence"])].sum(axis=1)
        lo, hi = np.percentile(weights @ per_query, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
        assert (g["ci_low"], g["ci_high"]) == pytest.approx((lo, hi), rel=1e-6, abs=1e-9)


def test_groups_split_additively_over_a_second_field(index_dir, queries, tmp_path, capsys):
    cli(value_args(index_dir, queries, tmp_path / "one.json", "--group-by", "licence"), capsys)
    cli(value_args(index_dir, queries, tmp_path / "two.json", "--group-by", "licence", "--group-by", "source"), capsys)
    one = {g["group"]["licence"]: g["value"] for g in json.loads((tmp_path / "one.json").read_text())["groups"]}
    two = json.loads((tmp_path / "two.json").read_text())["groups"]
    for licence, value in one.items():
        parts = [g for g in two if g["group"]["licence"] == licence]
        assert len(parts) == 4  # three sources and none
        assert sum(g["value"] for g in parts) == pytest.approx(value, rel=1e-9, abs=1e-9)


def test_api_answers_what_the_cli_writes(index_dir, queries, tmp_path, capsys):
    cli(value_args(index_dir, queries, tmp_path / "v.json", "--group-by", "source"), capsys)
    cli(value_args(index_dir, queries, tmp_path / "v.csv", "--group-by", "source"), capsys)
    cli(value_args(index_dir, queries, tmp_path / "v.parquet", "--group-by", "source"), capsys)
    report = json.loads((tmp_path / "v.json").read_text())
    with TestClient(create_app(index_dir)) as c:
        api = c.post("/value", json={"queries": QUERIES, "group_by": ["source"]})
        assert api.status_code == 200, api.text
        as_csv = c.post("/value", json={"queries": QUERIES, "group_by": ["source"], "format": "csv"})
    body = api.json()
    assert body["groups"] == report["groups"]
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.text.replace("\r\n", "\n") == (tmp_path / "v.csv").read_text().replace("\r\n", "\n")
    rows = list(csv.DictReader((tmp_path / "v.csv").open()))
    assert [r["group.source"] for r in rows] == [g["group"].get("source", "(missing)") for g in report["groups"]]
    import pyarrow.parquet as pq
    assert pq.read_table(tmp_path / "v.parquet").column("value").to_pylist() == [g["value"] for g in report["groups"]]


def test_value_refuses_what_it_cannot_answer(index_dir, gpt2_dir):
    with TestClient(create_app(index_dir, settings=ServerSettings(max_value_queries=4))) as c:
        many = c.post("/value", json={"queries": QUERIES, "group_by": ["source"]})
        assert many.status_code == 422 and "at most 4" in many.json()["detail"]
        unknown = c.post("/value", json={"queries": QUERIES[:2], "group_by": ["provider"]})
        assert unknown.status_code == 422 and "provider" in unknown.json()["detail"]
        empty = c.post("/value", json={"queries": [{"prompt": "", "response": "river"}], "group_by": ["source"]})
        assert empty.status_code == 422 and "query 0" in empty.json()["detail"]


def test_cli_refuses_an_output_it_cannot_write_before_any_work(index_dir, queries, tmp_path, capsys):
    code, _, err = run_cli(value_args(index_dir, queries, tmp_path / "v.xlsx", "--group-by", "source"), capsys)
    assert code == 2 and "--out must end with" in err and not any(tmp_path.iterdir())
