"""The high-fidelity stage's storage (--high-storage float16 | int8 | int4, manifest `high.storage`):
three builds of one corpus that differ only by it. Each stored row is the engine's own vector (engine.
pair_vectors, recomputed here) quantized within its rounding bound; /attribute at precision high and
the valuation score exactly what the files hold (read here without the store's reader); int4 ranks as
float16 does; and a float16 index written before the storage option existed (manifest version 2, no
`storage`) opens and answers as before."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import create_app
from engine import load_model, pair_vectors
from indexer.query import value
from indexer.store import HIGH_STORAGES, INT4_CLIP, Index, document_pair, high_bytes_per_document
from indexer.query.value import value_report

from .support import build_corpus_index, post_ok, stored_high, stored_high_rows, synthetic_corpus

N_DOCS = 40
QUERIES = [("", "river stone cloud lamp orbit signal garden copper"), ("winter engine", " paper violet harbor needle"),
           ("", "falcon marble thunder velvet lantern meadow"), ("quartz", " ember willow canyon socket prism")]


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(N_DOCS, seed=13)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, gpt2_dir, corpus):
    return {s: build_corpus_index(tmp_path_factory.mktemp(f"storage-{s}"), gpt2_dir, corpus, high_storage=s, shard_size=16)
            for s in HIGH_STORAGES}


@pytest.fixture(scope="module")
def engine(indexes):
    """The high stage's engine (the same in every build: only the storage differs) and a function from
    (prompt, response) pairs to its vectors, in the eigenbasis the rows are stored in, float64."""
    idx = Index.open(indexes["float16"])
    model, tok = load_model(idx.manifest.model.name_or_path)
    logra, pre = idx.high_engine(model)
    sep = idx.manifest.text_format["separator"]
    vectors = lambda pairs: pair_vectors(logra, pre, tok, pairs, batch_size=4, eigenbasis=True).double().numpy()
    docs = idx.documents(list(range(len(idx))))
    return {"docs": vectors([document_pair(d["prompt"] or "", d["text"]) for d in docs]),
            "queries": vectors([(p + sep if p else "", r) for p, r in QUERIES]), "ids": [d["id"] for d in docs]}


@pytest.mark.parametrize("storage", HIGH_STORAGES)
def test_stored_rows_are_the_engine_vectors_within_the_rounding_bound(indexes, engine, storage):
    index_dir = indexes[storage]
    got, codes, scales, norms = stored_high(index_dir)
    v = engine["docs"]
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert got == storage == Index.open(index_dir).manifest.high.storage
    np.testing.assert_allclose(norms, np.linalg.norm(v, axis=1), rtol=1e-4)
    if storage == "float16":
        np.testing.assert_allclose(np.asarray(codes, np.float64), u, rtol=2e-3, atol=1e-6)
    else:
        # the quantization grid of each engine vector: codes = clip(round(u / step)) within half a step (and the
        # engine's float noise between batches, far below it)
        if storage == "int8":
            step, lo, hi = np.abs(u).max(axis=1) / 127, -127, 127
        else:
            step, lo, hi = INT4_CLIP * np.sqrt((u * u).mean(axis=1)) / 7, -8, 7
        exact = np.clip(u / step[:, None], lo, hi)
        assert codes.min() >= lo and codes.max() <= hi
        assert np.abs(codes - exact).max() <= 0.5 + 1e-2
        if storage == "int4":
            assert (np.abs(exact) > 7).any()  # the clip did clip: the test saw both sides of the bound
        # each row reads back as its codes over their length: a unit row in the quantized direction
        np.testing.assert_allclose(scales, 1 / np.linalg.norm(codes.astype(np.float64), axis=1), rtol=1e-6)
    rows = Index.open(index_dir).high_rows(np.arange(N_DOCS))
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, stored_high_rows(index_dir), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    # the reader: any rows, in the order asked, and in blocks
    idx = Index.open(index_dir)
    np.testing.assert_array_equal(idx.high_rows([7, 2, 7]), rows[[7, 2, 7]])
    np.testing.assert_array_equal(np.concatenate([b for _, b in idx.high_blocks(range(3, 40), 5)]), rows[3:40])


def test_bytes_per_document_follow_the_storage(indexes):
    for storage, index_dir in indexes.items():
        dim = Index.open(index_dir).manifest.high.dim
        on_disk = sum((index_dir / f).stat().st_size for f in ("high.npy", "high-scales.npy", "high-norms.npy")
                      if (index_dir / f).exists())
        headers = 128 * 3  # three .npy headers (high.npy's is padded to room for any row count)
        per_doc = {"float16": 2 * dim + 4, "int8": dim + 8, "int4": (dim + 1) // 2 + 8}[storage]
        assert per_doc == high_bytes_per_document(storage, dim)
        assert N_DOCS * per_doc <= on_disk <= N_DOCS * per_doc + headers, storage


@pytest.mark.parametrize("mode", ["influence", "cosine"])
def test_int4_high_scores_are_the_stored_rows_brute_force_and_rank_as_float16(indexes, engine, mode):
    rows = stored_high_rows(indexes["int4"])
    norms = stored_high(indexes["int4"])[3].astype(np.float64)
    answers = {}
    for storage in ("int4", "float16"):
        with TestClient(create_app(indexes[storage])) as c:
            answers[storage] = [post_ok(c, "/attribute", {"prompt": p, "response": r, "k": 1000, "mode": mode})["results"]
                                for p, r in QUERIES]
    for qi, q in enumerate(engine["queries"]):
        got = answers["int4"][qi]
        assert len(got) == N_DOCS and {r["stage"] for r in got} == {"high"}
        dots = rows @ q
        ref = dots / np.linalg.norm(q) if mode == "cosine" else dots * norms
        by_id = dict(zip(engine["ids"], ref))
        tol = 1e-4 * np.abs(ref).max()  # float32 products, and the query's float noise
        assert max(abs(r["score"] - by_id[r["id"]]) for r in got) <= tol
        assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
        assert all(by_id[a["id"]] >= by_id[b["id"]] - 2 * tol for a, b in zip(got, got[1:]))  # ranked by them
        # against float16 rows: the same best document, the same top 5 but for near ties
        f16 = answers["float16"][qi]
        assert got[0]["id"] == f16[0]["id"]
        assert len({r["id"] for r in got[:5]} & {r["id"] for r in f16[:5]}) >= 4
        # ... and each score within 0.05 of float16's as a cosine (the int4 rows' own cosines with the vectors
        # they store are 0.96-0.99 on this tiny model)
        f16_by_id = {r["id"]: r["score"] for r in f16}
        per_cosine = {i: 1.0 if mode == "cosine" else float(np.linalg.norm(q)) * n for i, n in zip(engine["ids"], norms)}
        assert max(abs(r["score"] - f16_by_id[r["id"]]) / per_cosine[r["id"]] for r in got) <= 0.05


@pytest.mark.parametrize("mode", ["influence", "cosine"])
def test_valuation_over_int4_rows_is_the_sum_of_exact_scores_from_them(indexes, engine, mode, monkeypatch):
    monkeypatch.setattr(value, "BLOCK_BYTES", 7 * 4 * Index.open(indexes["int4"]).manifest.high.dim)  # blocks of 7 rows
    idx = Index.open(indexes["int4"])
    report = value_report(idx, "high", engine["queries"], ["source"], mode=mode, bootstrap=0, per_document=True)
    rows = stored_high_rows(indexes["int4"])
    q = engine["queries"]
    if mode == "cosine":
        scores = rows @ (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    else:
        scores = (rows * stored_high(indexes["int4"])[3][:, None]) @ q.T
    tol = 1e-5 * np.abs(scores).sum()
    np.testing.assert_allclose([d["value"] for d in report["documents"]], scores.sum(axis=1), atol=tol)
    assert sum(g["value"] for g in report["groups"]) == pytest.approx(scores.sum(), abs=tol)


def test_a_float16_index_written_before_the_storage_option_opens_and_answers_as_before(indexes, tmp_path, corpus):
    """Version 2 wrote float16 rows (as --high-storage float16 does, byte for byte) under a manifest with no
    `storage`: the manifest is rewritten as it wrote it, and every answer stays the same."""
    old = tmp_path / "old"
    shutil.copytree(indexes["float16"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["high"]["storage"]
    manifest["high"]["stored"] = "float16 unit rows and float32 norms"
    manifest["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    assert not (old / "high-scales.npy").exists()
    idx = Index.open(old)
    assert idx.manifest.format_version == 2 and idx.manifest.high.storage == "float16"
    assert idx.high_store.codes.dtype == np.float16
    answers = {}
    for name, index_dir in (("new", indexes["float16"]), ("old", old)):
        with TestClient(create_app(index_dir)) as c:
            p, r = QUERIES[1]
            answers[name] = [post_ok(c, "/attribute", {"prompt": p, "response": r, "k": 10, "mode": mode})["results"]
                             for mode in ("influence", "cosine")]
            top = answers[name][1][0]["id"]
            answers[name].append(post_ok(c, "/attribute/tokens", {"prompt": p, "response": r, "id": top}))
            valued = post_ok(c, "/value", {"queries": [{"prompt": p, "response": r}], "group_by": ["source"], "bootstrap": 0})
            answers[name].append({k: v for k, v in valued.items() if k != "took_ms"})
            assert c.get("/index").json()["high"].get("storage", "float16") == "float16"
    assert answers["old"] == answers["new"]
