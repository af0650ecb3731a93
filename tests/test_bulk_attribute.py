"""`python -m indexer attribute`: every query's hits equal POST /attribute's for the same query and
options; a killed run goes on after its last complete batch and ends with what an uninterrupted run
writes; bad query records get file-and-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from api import create_app
from indexer.query.attribute import AttributeConfig, attribute_queries

from .support import build_corpus_index, run_cli, synthetic_corpus, write_jsonl

N_DOCS = 40
QUERIES = [{"id": f"q{i}", "prompt": p, "response": r, "team": i % 2} for i, (p, r) in enumerate([
    ("winter engine", " paper violet harbor needle"), ("", "river stone cloud lamp orbit"),
    ("falcon", " marble thunder velvet lantern"), ("meadow cipher", " anchor quartz ember"),
    ("", "willow canyon socket prism tundra"), ("beacon", " ledger nickel saddle raven cobalt"),
    ("copper", " garden signal orbit lamp"), ("", "thunder velvet paper harbor")])]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gpt2_dir):
    return build_corpus_index(tmp_path_factory.mktemp("bulk"), gpt2_dir, synthetic_corpus(N_DOCS, seed=17))


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("queries") / "queries.jsonl", QUERIES)


def read_hits(path: Path) -> list[dict]:
    if str(path).endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def attribute_args(index_dir, queries, out, *extra):
    return ["attribute", "--index", index_dir, "--queries", queries, "--prompt-field", "prompt", "--response-field",
            "response", "--out", out, "--no-progress", *extra]


@pytest.mark.parametrize("precision,fmt", [("high", "jsonl"), ("fast", "parquet"), ("high", "parquet")])
def test_bulk_hits_equal_the_apis(index_dir, queries, tmp_path, capsys, precision, fmt):
    out = tmp_path / f"hits.{fmt}"
    code, printed, err = run_cli(attribute_args(index_dir, queries, out, "--k", 5, "--precision", precision,
                                                "--batch-size", 3, "--mode", "influence"), capsys)
    assert code == 0, err
    assert f"attributed {len(QUERIES)} queries" in printed and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    rows = read_hits(out)
    assert len(rows) == 5 * len(QUERIES)
    with TestClient(create_app(index_dir)) as c:
        for q in QUERIES:
            api = c.post("/attribute", json={"prompt": q["prompt"], "response": q["response"], "k": 5,
                                             "precision": precision, "mode": "influence"}).json()["results"]
            got = [r for r in rows if r["query_id"] == q["id"]]
            assert [r["rank"] for r in got] == [1, 2, 3, 4, 5]
            assert [r["id"] for r in got] == [a["id"] for a in api]
            assert [r["stage"] for r in got] == [a["stage"] for a in api] == [precision] * 5
            assert [r["score"] for r in got] == pytest.approx([a["score"] for a in api], rel=1e-6)


def test_a_killed_run_goes_on_after_its_last_complete_batch(index_dir, queries, tmp_path, monkeypatch):
    import indexer.query.attribute as attribute
    cfg = lambda out: AttributeConfig(index=str(index_dir), queries=[queries], out=str(out), k=3, batch_size=3,
                                      prompt_field="prompt", response_field="response", progress=False)
    reference = tmp_path / "reference.jsonl"
    attribute_queries(cfg(reference))

    real, calls = attribute.rank, {"n": 0, "die_at": 5}  # the second batch dies on its second query

    def rank(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(attribute, "rank", rank)
    out = tmp_path / "hits.jsonl"
    with pytest.raises(KeyboardInterrupt):
        attribute_queries(cfg(out))
    progress = json.loads(Path(f"{out}.partial.json").read_text())
    assert progress["queries"] == 3 and not out.exists()
    with open(f"{out}.partial.jsonl", "ab") as f:  # a write the kill cut short
        f.write(b'{"query_id": "q3", "ra')
    calls.update(n=0, die_at=-1)
    done = attribute_queries(cfg(out))
    assert done["queries"] == len(QUERIES) and calls["n"] == len(QUERIES) - 3  # only the rest was ranked
    assert out.read_text() == reference.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.jsonl", "reference.jsonl"]


def test_bad_query_records_name_their_file_and_line(index_dir, tmp_path, capsys):
    lines = [json.dumps(q) for q in QUERIES[:3]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    out = tmp_path / "hits.jsonl"
    code, _, err = run_cli(attribute_args(index_dir, bad, out), capsys)
    assert code == 2 and "line 3" in err and str(bad) in err and not out.exists()

    empty = tmp_path / "empty.jsonl"  # one token with no prompt: nothing to score
    write_jsonl(empty, [QUERIES[0], {"id": "e", "prompt": "", "response": "river"}])
    code, _, err = run_cli(attribute_args(index_dir, empty, out), capsys)
    assert code == 2 and "line 2" in err and "no token to score" in err
    code, printed, err = run_cli(attribute_args(index_dir, empty, out, "--skip-bad"), capsys)
    assert code == 0 and "skipped 1" in printed and {r["query_id"] for r in read_hits(out)} == {"q0"}
