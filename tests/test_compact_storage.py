"""The compact vectors' storage (--storage int8 | float32, manifest `storage`, format 4) and the flat
FAISS index built when an index is opened: two builds of one corpus that differ only by the storage.
Each int8 row is the float32 build's vector within its rounding bound (read here without the store's
reader); a flat index folder holds no FAISS file and its opened index searches as brute force over the
stored rows does; an append keeps the base's codes byte for byte; an index of format 3 (float32 rows,
flat FAISS files, no `storage`) opens and answers as before. test_api's brute-force references score
the default (int8) index's stored rows."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api import create_app
from indexer import ann
from indexer.build import BuildConfig, append_documents
from indexer.store import STORAGES, Index, unit_rows

from .support import build_corpus_index, exact_scores, post_ok, stored_vectors, synthetic_corpus, write_jsonl

N_DOCS = 40
QUERIES = [("", "river stone cloud lamp orbit signal garden copper"), ("winter engine", " paper violet harbor needle")]


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, gpt2_dir):
    corpus = synthetic_corpus(N_DOCS, seed=17)
    return {s: build_corpus_index(tmp_path_factory.mktemp(f"compact-{s}"), gpt2_dir, corpus, storage=s, high=False,
                                  shard_size=16) for s in STORAGES}


def test_the_default_is_int8(indexes):
    assert BuildConfig.storage == "int8"
    assert {s: Index.open(d).manifest.storage for s, d in indexes.items()} == {s: s for s in STORAGES}


def test_int8_rows_are_the_float32_vectors_within_the_rounding_bound(indexes):
    v = np.load(indexes["float32"] / "vectors.npy").astype(np.float64)  # builds are reproducible: the exact vectors
    codes = np.load(indexes["int8"] / "vectors.npy")
    scales, norms = np.load(indexes["int8"] / "scales.npy"), np.load(indexes["int8"] / "norms.npy")
    assert codes.dtype == np.int8 and codes.shape == v.shape
    assert (indexes["int8"] / "vectors.npy").stat().st_size < codes.size + 256  # a byte a dimension and the header
    np.testing.assert_allclose(norms, np.linalg.norm(v, axis=1), rtol=1e-5)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    step = np.abs(u).max(axis=1, keepdims=True) / 127  # the largest entry is code +-127
    assert (np.abs(codes).max(axis=1) == 127).all()
    assert np.abs(codes * step - u).max() <= 0.5 * step.max() * (1 + 1e-4)
    np.testing.assert_allclose(scales, 1 / np.linalg.norm(codes.astype(np.float64), axis=1), rtol=1e-6)
    # what the store's reader gives is what the files hold
    np.testing.assert_allclose(np.asarray(Index.open(indexes["int8"]).vectors, np.float64), stored_vectors(indexes["int8"]),
                               rtol=1e-6, atol=1e-7 * np.abs(v).max())


@pytest.mark.parametrize("storage", STORAGES)
def test_a_flat_index_has_no_faiss_file_and_searches_as_brute_force(indexes, storage):
    index_dir = indexes[storage]
    assert not list(index_dir.glob("faiss-*"))
    idx = Index.open(index_dir)
    assert idx.manifest.faiss.type == "flat" and all(ix.ntotal == N_DOCS for ix in idx.faiss.values())
    rows = stored_vectors(index_dir)
    q = rows[3] + np.random.default_rng(0).standard_normal(rows.shape[1]) * np.abs(rows[3]).mean()
    for mode in ann.MODES:
        probe = (unit_rows(q[None]) if mode == "cosine" else q[None]).astype(np.float32)
        scores, found = idx.faiss[mode].search(probe, N_DOCS)
        exact = exact_scores(rows, q, mode, norms=idx.norms)
        assert list(found[0][:10]) == list(np.argsort(-exact, kind="stable")[:10])
        np.testing.assert_allclose(scores[0], exact[found[0]], rtol=1e-4, atol=1e-5 * np.abs(exact).max())


def test_an_append_keeps_the_base_codes(indexes, tmp_path, gpt2_dir):
    dst = tmp_path / "index"
    shutil.copytree(indexes["int8"], dst)
    new = write_jsonl(tmp_path / "new.jsonl", [{**d, "id": f"new-{i}"} for i, d in enumerate(synthetic_corpus(6, seed=99))])
    append_documents(dst, [new], progress=False)
    for name in ("vectors.npy", "scales.npy", "norms.npy"):
        before, after = np.load(indexes["int8"] / name), np.load(dst / name)
        assert after.dtype == before.dtype and len(after) == N_DOCS + 6
        assert after[:N_DOCS].tobytes() == before.tobytes(), name
    idx = Index.open(dst)
    assert idx.manifest.storage == "int8" and idx.faiss["cosine"].ntotal == N_DOCS + 6 and not list(dst.glob("faiss-*"))


def test_a_format_3_index_opens_and_answers_as_before(indexes, tmp_path):
    """Format 3 wrote float32 rows (as --storage float32 does, byte for byte) and flat FAISS files under a
    manifest with no `storage`: it reads as float32 and every answer stays the same."""
    old = tmp_path / "old"
    shutil.copytree(indexes["float32"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["storage"]
    manifest["format_version"] = 3
    (old / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    vectors = np.load(old / "vectors.npy")
    for mode, x in (("influence", vectors), ("cosine", unit_rows(vectors))):
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(np.ascontiguousarray(x, dtype=np.float32))
        faiss.write_index(flat, str(old / f"faiss-{mode}.index"))
    idx = Index.open(old)
    assert idx.manifest.format_version == 3 and idx.manifest.storage == "float32"
    answers = {}
    for name, index_dir in (("new", indexes["float32"]), ("old", old)):
        with TestClient(create_app(index_dir)) as c:
            answers[name] = [post_ok(c, "/attribute", {"prompt": p, "response": r, "k": 10, "mode": mode, "precision": "fast"})["results"]
                             for p, r in QUERIES for mode in ann.MODES]
    assert answers["old"] == answers["new"]
