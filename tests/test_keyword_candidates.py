"""Keyword candidates: a build writes LanceDB full-text (BM25) indexes over the documents' text and
prompt (Index.keyword_rows), and precision "high" rescores the union of the compact vectors' top
`high_depth` and the keyword search's top `keyword_depth`, checked against an independent brute force
of the high stage over exactly that union (test_precision.high_reference's float64 recomputation)."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import create_app
from indexer.store import Index

from .support import build_corpus_index, post_ok, synthetic_corpus
from .test_precision import N_DOCS, check_ranked, high_reference  # noqa: F401 (a fixture)

RARE = "zanzibar"


@pytest.fixture(scope="module")
def corpus():
    docs = synthetic_corpus(N_DOCS, seed=11)
    docs[37]["text"] += f" {RARE} quokka"  # the only document with these words
    return docs


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gpt2_dir, corpus):
    return build_corpus_index(tmp_path_factory.mktemp("keyword"), gpt2_dir, corpus, high_storage="float16")


def test_keyword_rows_find_the_documents_that_hold_the_words(index_dir, corpus):
    idx = Index.open(index_dir)
    rows = idx.keyword_rows(f"what is a {RARE}?", 5)
    assert [idx.documents([int(r)])[0]["id"] for r in rows] == ["doc-37"]
    assert len(idx.keyword_rows("river stone cloud", 7)) == 7  # common words: as many as asked
    for nothing in ("", "   ", "xyzzy-not-a-word", 'AND OR ( "'):  # no indexed term, query syntax taken as text
        assert len(idx.keyword_rows(nothing, 5)) == 0
    assert len(idx.keyword_rows(RARE, 0)) == 0


def test_high_rescores_the_union_of_compact_and_keyword_candidates(index_dir, high_reference):
    prompt, response = "", f"river stone {RARE} cloud"
    by_id = dict(zip(high_reference["ids"], high_reference["scores"](prompt, response, "cosine")))
    idx = Index.open(index_dir)
    with TestClient(create_app(index_dir, high_depth=4, keyword_depth=6)) as c:
        fast = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 4, "precision": "fast", "mode": "cosine"})
        high = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 3, "mode": "cosine"})
        opponents = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 3, "direction": "opponents", "mode": "cosine"})
        fast_opp = post_ok(c, "/attribute", {"prompt": prompt, "response": response, "k": 4, "precision": "fast", "mode": "cosine",
                                             "direction": "opponents"})
    keyword = [idx.documents([int(r)])[0]["id"] for r in idx.keyword_rows(f"{prompt}\n{response}", 6)]
    assert "doc-37" in keyword and len(keyword) == 6
    union = sorted({r["id"] for r in fast["results"]} | set(keyword))
    assert len(union) > 4  # the keyword search added candidates the compact stage did not propose
    check_ranked(high["results"], by_id, union, 3)
    # opponents: the compact stage's candidates alone (a keyword match is no evidence against)
    check_ranked(opponents["results"], by_id, [r["id"] for r in fast_opp["results"]], 3, sign=-1.0)



def test_an_index_without_full_text_indexes_answers_from_the_compact_candidates(tmp_path, gpt2_dir, corpus):
    """An index written before the keyword indexes existed (dropped here) still answers, from the compact stage."""
    index_dir = build_corpus_index(tmp_path, gpt2_dir, corpus[:20])
    idx = Index.open(index_dir)
    for i in idx.table.list_indices():
        idx.table.drop_index(i.name)
    again = Index.open(index_dir)
    assert len(again.keyword_rows(RARE, 5)) == 0 and len(again.keyword_rows("river", 5)) == 0
    with TestClient(create_app(index_dir)) as c:
        out = post_ok(c, "/attribute", {"prompt": "", "response": "river stone cloud lamp", "k": 3})
    assert out["precision"] == "high" and len(out["results"]) == 3
