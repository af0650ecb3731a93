"""Precision "high": the compact vectors' candidates rescored by the high-fidelity stage, against an
independent brute force (each document's high-stage vector recomputed from its text alone, in
float64, in the original basis), and the response's account of which stage scored what. The index
stores the high-fidelity vectors as float16 unit rows (--high-storage float16, so that scores agree to
FP16 of the largest score; the int8 and int4 storages are checked against their own stored rows and
the engine's vectors in test_high_storage.py)."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import create_app
from engine import load_model, pair_vectors
from indexer.store import Index, document_pair

from .support import build_corpus_index, exact_scores, post_ok, synthetic_corpus

N_DOCS = 60
QUERIES = [("", "river stone cloud lamp orbit signal garden copper"), ("winter engine", " paper violet harbor needle")]


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(N_DOCS, seed=11)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gpt2_dir, corpus):
    return build_corpus_index(tmp_path_factory.mktemp("precision"), gpt2_dir, corpus, high_storage="float16")


@pytest.fixture(scope="module")
def high_reference(index_dir):
    """Every document's high-stage vector, one document per pass, in float64 and the original basis."""
    idx = Index.open(index_dir)
    model, tok = load_model(idx.manifest.model.name_or_path)
    logra, pre = idx.high_engine(model)
    stored = idx.documents(list(range(len(idx))))
    pairs = [document_pair(d["prompt"] or "", d["text"]) for d in stored]  # as the indexer encoded them
    docs = np.stack([pair_vectors(logra, pre, tok, [p], eigenbasis=False)[0].double().numpy() for p in pairs])
    ids = [d["id"] for d in stored]

    sep = idx.manifest.text_format["separator"]

    def scores(prompt, response, mode):
        q = pair_vectors(logra, pre, tok, [(prompt + sep if prompt else "", response)], eigenbasis=False)[0].double().numpy()
        return exact_scores(docs, q, mode)

    return {"scores": scores, "ids": ids}


FP16 = 2e-3  # stored float16 unit rows: score errors up to this fraction of the largest |score|


def check_ranked(results, ref: dict, candidates, k: int, sign: float = 1.0):
    """`results` are the best k of `candidates` by the reference scores `ref` (id -> score), up to the
    float16 storage error: each score is the reference's, they are ranked by it, and no candidate left
    out beats a returned one by more than the error."""
    tol = FP16 * max(abs(ref[i]) for i in candidates)
    got = [r["id"] for r in results]
    assert len(got) == min(k, len(candidates)) and set(got) <= set(candidates)
    assert max(abs(r["score"] - ref[r["id"]]) for r in results) <= tol
    scores = [sign * r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    worst = min(sign * ref[i] for i in got)
    assert all(sign * ref[i] <= worst + 2 * tol for i in set(candidates) - set(got))


@pytest.mark.parametrize("mode", ["influence", "cosine"])
@pytest.mark.parametrize("prompt,response", QUERIES)
def test_high_scores_every_document_when_k_covers_the_index(index_dir, high_reference, mode, prompt, response):
    with TestClient(create_app(index_dir)) as c:
        out = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 1000, "mode": mode})
    assert out["precision"] == "high" and len(out["results"]) == N_DOCS
    assert {r["stage"] for r in out["results"]} == {"high"}
    s = high_reference["scores"](prompt, response, mode)
    check_ranked(out["results"], dict(zip(high_reference["ids"], s)), high_reference["ids"], N_DOCS)


def test_high_rescores_the_fast_stage_candidates_to_the_configured_depth(index_dir, high_reference):
    prompt, response = QUERIES[0]
    s = high_reference["scores"](prompt, response, "cosine")
    by_id = dict(zip(high_reference["ids"], s))
    with TestClient(create_app(index_dir, high_depth=8, keyword_depth=0)) as c:  # the compact stage alone
        fast = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 8, "precision": "fast"})
        high = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 3})
        # k past the depth: every returned document is still rescored (max(k, depth) candidates)
        wide = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 12})
    assert fast["precision"] == "fast" and {r["stage"] for r in fast["results"]} == {"fast"}
    candidates = [r["id"] for r in fast["results"]]
    check_ranked(high["results"], by_id, candidates, 3)
    assert len(wide["results"]) == 12 and {r["stage"] for r in wide["results"]} == {"high"}
    assert [r["score"] for r in wide["results"]] == sorted((r["score"] for r in wide["results"]), reverse=True)


def test_opponents_and_filters_go_through_the_high_stage(index_dir, high_reference, corpus):
    prompt, response = QUERIES[1]
    s = high_reference["scores"](prompt, response, "influence")
    with TestClient(create_app(index_dir, high_depth=N_DOCS)) as c:
        opp = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 4, "mode": "influence",
                                     "direction": "opponents"})
        web = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 4, "mode": "influence",
                                     "where": {"source": "web"}})
    by_id = dict(zip(high_reference["ids"], s))
    check_ranked(opp["results"], by_id, high_reference["ids"], 4, sign=-1.0)
    web_ids = [d["id"] for d in corpus if d["source"] == "web"]
    check_ranked(web["results"], by_id, web_ids, 4)


@pytest.mark.parametrize("mode", ["influence", "cosine"])
def test_high_token_view_sums_to_the_high_score(index_dir, corpus, mode):
    prompt, response = QUERIES[0]
    with TestClient(create_app(index_dir)) as c:
        top = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 1, "mode": mode})["results"][0]
        t = post_ok(c, "/attribute/tokens", {"prompt": prompt, "response": response, "id": top["id"], "mode": mode})
    assert t["document_score"] == pytest.approx(top["score"], rel=1e-4)
    assert t["total"] == pytest.approx(t["document_score"], rel=1e-3, abs=1e-6)


def test_an_index_without_the_high_stage_answers_fast(tmp_path, gpt2_dir, corpus):
    idx = build_corpus_index(tmp_path, gpt2_dir, corpus[:20], high=False)
    assert "high" not in Index.open(idx).manifest and Index.open(idx).high_engine(None) is None
    with TestClient(create_app(idx)) as c:
        out = post_ok(c, "/attribute", {"response": corpus[3]["text"], "k": 3})
    assert out["precision"] == "fast" and {r["stage"] for r in out["results"]} == {"fast"}
    assert out["results"][0]["id"] == corpus[3]["id"]
