"""A query costs one forward (and backward) pass of the model, whatever stages it needs: a
high-precision /attribute computes the compact vector for the candidates and the high-fidelity one
for their rescoring in the same pass (it took two before); a fast one, one pass too; `indexer
attribute` one pass per batch of queries at either precision; valuation (`indexer value`, POST
/value) one per batch, of the one stage it reads; the token view one per batch of copies. Passes are
counted by a forward hook on the model's input embedding, which every pass goes through once."""
from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient

import indexer.query.opened as opened_module
from api import create_app
from api.search import HEAVY_BATCH

from .support import build_corpus_index, post_ok, run_cli, synthetic_corpus, write_jsonl

N_DOCS = 30
QUERIES = [{"id": f"q{i}", "prompt": p, "response": r} for i, (p, r) in enumerate([
    ("winter engine", " paper violet harbor needle"), ("", "river stone cloud lamp orbit"),
    ("falcon", " marble thunder velvet lantern"), ("meadow cipher", " anchor quartz ember"),
    ("", "willow canyon socket prism tundra")])]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gpt2_dir):
    return build_corpus_index(tmp_path_factory.mktemp("passes"), gpt2_dir, synthetic_corpus(N_DOCS, seed=21))


def count_passes(model) -> dict:
    """A counter of the model's forward passes from now on (the hook stays: each test has its model)."""
    count = {"passes": 0}
    model.get_input_embeddings().register_forward_hook(lambda *_: count.update(passes=count["passes"] + 1))
    return count


@pytest.fixture
def counted_cli(monkeypatch):
    """The passes of the model `indexer attribute` / `indexer value` load (indexer.query.opened.load_model)."""
    count = {"passes": 0}
    real = opened_module.load_model

    def load(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        model.get_input_embeddings().register_forward_hook(lambda *_: count.update(passes=count["passes"] + 1))
        return model, tokenizer

    monkeypatch.setattr(opened_module, "load_model", load)
    return count


@pytest.mark.parametrize("precision", ["high", "fast"])
def test_an_attribute_query_is_one_model_pass(index_dir, precision):
    app = create_app(index_dir)
    with TestClient(app) as c:
        count = count_passes(app.state.attributor.model)
        for i, q in enumerate(QUERIES[:3], start=1):
            out = post_ok(c, "/attribute", {"prompt": q["prompt"], "response": q["response"], "k": 5,
                                            "precision": precision})
            assert out["precision"] == precision and {r["stage"] for r in out["results"]} == {precision}
            assert count["passes"] == i


def test_the_token_view_is_one_pass_per_batch_of_copies(index_dir):
    app = create_app(index_dir)
    with TestClient(app) as c:
        count = count_passes(app.state.attributor.model)
        doc = app.state.attributor.index.ids[0]
        out = post_ok(c, "/attribute/tokens", {"prompt": "", "response": QUERIES[1]["response"], "id": doc})
    copies = out["n_scored_tokens"] + 1  # one copy a scored token, and the whole response
    assert out["n_scored_tokens"] > HEAVY_BATCH and count["passes"] == math.ceil(copies / HEAVY_BATCH)


def test_api_valuation_is_one_pass_per_batch_of_queries(index_dir):
    app = create_app(index_dir)
    with TestClient(app) as c:
        count = count_passes(app.state.attributor.model)
        post_ok(c, "/value", {"queries": [{"prompt": q["prompt"], "response": q["response"]} for q in QUERIES],
                              "group_by": ["source"], "bootstrap": 0})
    assert count["passes"] == math.ceil(len(QUERIES) / HEAVY_BATCH)


def cli_args(command: str, index_dir, queries, out, precision: str, *extra) -> list:
    """`python -m indexer COMMAND` over the query file in batches of 2."""
    return [command, "--index", index_dir, "--queries", queries, "--prompt-field", "prompt", "--response-field",
            "response", "--out", out, "--batch-size", 2, "--precision", precision, "--no-progress", *extra]


@pytest.mark.parametrize("precision", ["high", "fast"])
def test_bulk_attribution_is_one_pass_per_batch(index_dir, tmp_path, capsys, counted_cli, precision):
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    out = tmp_path / "hits.jsonl"
    code, _, err = run_cli(cli_args("attribute", index_dir, queries, out, precision, "--k", 3), capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 * len(QUERIES) and {r["stage"] for r in rows} == {precision}
    assert counted_cli["passes"] == math.ceil(len(QUERIES) / 2)


@pytest.mark.parametrize("precision", ["high", "fast"])
def test_bulk_valuation_is_one_pass_per_batch(index_dir, tmp_path, capsys, counted_cli, precision):
    queries = write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    out = tmp_path / "value.json"
    code, _, err = run_cli(cli_args("value", index_dir, queries, out, precision, "--group-by", "source", "--bootstrap", 0),
                           capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["precision"] == precision
    assert counted_cli["passes"] == math.ceil(len(QUERIES) / 2)
