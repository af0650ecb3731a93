"""The HTTP API against independent references: brute-force numpy scoring over every stored vector,
self-retrieval, provenance, bad input, concurrency, start-up refusals and a real server process."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given as hypothesis_given

from api import create_app
from api.search import ModelMismatchError
from api.server import stop
from engine import query_vectors
from indexer.build import BuildConfig, append_documents, build_index
from indexer.store import VECTORS, IndexFormatError

from .support import (REPO, build_corpus_index, exact_scores, post_ok, reference_engine, running_api, stored_vectors,
                      self_cosine_tolerance, subprocess_env, synthetic_corpus, write_jsonl)

N_DOCS = 80
# Ids that would be dangerous if anything used them as paths; they must be plain lookup keys.
ODD_IDS = ["a/b", "../etc/passwd", "100%2Fsure", "..", "q?x#y z"]


@pytest.fixture(scope="module")
def corpus():
    docs = synthetic_corpus(N_DOCS, seed=7)
    for doc, odd in zip(docs, ODD_IDS):
        doc["id"] = odd
    return docs


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, gpt2_dir, corpus):
    return build_corpus_index(tmp_path_factory.mktemp("api-index"), gpt2_dir, corpus)


@pytest.fixture(scope="module")
def client(index_dir):
    with TestClient(create_app(index_dir)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(index_dir, gpt2_dir):
    """Query vectors computed outside the API (own model load, LoGra rebuilt from the manifest and
    the stored projections/preconditioner) and every stored vector, in float64."""
    idx, _, tok, logra, pre = reference_engine(index_dir, gpt2_dir)
    sep = idx.manifest.text_format["separator"]  # no chat template here: a prompt is followed by the separator

    def qvec(prompt: str, response: str) -> np.ndarray:
        v, _ = query_vectors(logra, pre, tok, [(prompt + sep if prompt else "", response)])
        return v[0].double().numpy()

    vectors = stored_vectors(index_dir)  # all rows, not FAISS's candidates
    ids = [r["id"] for r in idx.documents(list(range(len(idx))))]
    return {"qvec": qvec, "vectors": vectors, "ids": ids, "tokenizer": tok}


def brute_force(ref, prompt, response, mode):
    scores = exact_scores(ref["vectors"], ref["qvec"](prompt, response), mode)
    order = np.argsort(-scores, kind="stable")
    return [ref["ids"][i] for i in order], scores[order]


def attribute(client, **body):
    # The references here score the stored compact vectors: precision fast. The high-fidelity stage
    # (the default) has its own references in test_precision.py.
    return post_ok(client, "/attribute", {"precision": "fast", **body})


# -- 1. scores against brute force ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["influence", "cosine"])
@pytest.mark.parametrize("prompt,response", [("", "river stone cloud lamp orbit signal garden copper"),
                                             ("winter engine", " paper violet harbor needle falcon"),
                                             ("", "marble thunder velvet")])
def test_scores_match_brute_force(client, reference, mode, prompt, response):
    k = 7
    out = attribute(client, prompt=prompt, response=response, k=k, mode=mode)
    ids, scores = brute_force(reference, prompt, response, mode)
    res = out["results"]
    assert [r["rank"] for r in res] == list(range(1, k + 1))
    assert [r["id"] for r in res] == ids[:k]
    np.testing.assert_allclose([r["score"] for r in res], scores[:k], rtol=1e-5, atol=1e-9 * abs(scores).max())
    got = [r["score"] for r in res]
    assert got == sorted(got, reverse=True)
    assert out["mode"] == mode and out["n_documents"] == N_DOCS


@pytest.mark.parametrize("mode", ["influence", "cosine"])
def test_k_above_corpus_returns_every_document(client, reference, mode):
    out = attribute(client, response="lantern meadow cipher anchor quartz", k=1000, mode=mode)
    res = out["results"]
    ids, scores = brute_force(reference, "", "lantern meadow cipher anchor quartz", mode)
    assert len(res) == N_DOCS and [r["rank"] for r in res] == list(range(1, N_DOCS + 1))
    assert [r["id"] for r in res] == ids
    np.testing.assert_allclose([r["score"] for r in res], scores, rtol=1e-5, atol=1e-9 * abs(scores).max())


def test_document_as_query_reproduces_its_stored_vector(reference, corpus):
    # Ties the query path to the indexing path: a document sent alone as a response (empty prompt)
    # encodes exactly as it was indexed, so its vector must be its stored row (batch invariance).
    for row in (5, 17, 42):
        q = reference["qvec"]("", corpus[row]["text"])
        # within one step of the stored int8 codes (store.encode_rows: the row's largest entry is 127 steps)
        np.testing.assert_allclose(q, reference["vectors"][row], rtol=1e-3, atol=np.abs(q).max() / 127)


# -- 2. self-retrieval ---------------------------------------------------------------------------

def test_self_retrieval_cosine(client, corpus):
    misses = []
    for doc in corpus[:30]:
        top = attribute(client, prompt="", response=doc["text"], k=3, mode="cosine")["results"][0]
        if top["id"] != doc["id"]:
            misses.append((doc["id"], top["id"], top["score"]))
        else:
            assert top["score"] == pytest.approx(1.0, abs=1e-3)
    assert not misses, misses


def test_prompt_response_split_still_answers(client, corpus):
    words = corpus[10]["text"].split()
    prompt, response = " ".join(words[: len(words) // 2]), " " + " ".join(words[len(words) // 2 :])
    out = attribute(client, prompt=prompt, response=response, k=5, mode="cosine")
    assert len(out["results"]) == 5
    q = out["query"]
    assert 0 < q["n_response_tokens"] < q["n_tokens"] and q["truncated"] is False


# -- 3. provenance and documents -----------------------------------------------------------------

def test_results_carry_provenance(client, corpus):
    by_id = {d["id"]: d for d in corpus}
    for r in attribute(client, response=corpus[3]["text"], k=10, mode="cosine")["results"]:
        doc = by_id[r["id"]]
        assert r["text"] == doc["text"]
        assert r["metadata"] == {"source": doc["source"], "position": doc["position"]}


def test_get_document(client, corpus):
    doc = corpus[12]
    r = client.get(f"/documents/{doc['id']}")
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == doc["id"] and body["text"] == doc["text"] and body["prompt"] == ""
    assert body["metadata"] == {"source": doc["source"], "position": doc["position"]}
    assert body["line"] == 13 and body["source"].endswith("data.jsonl")


def test_unknown_document_is_404_naming_it(client):
    r = client.get("/documents/no-such-doc")
    assert r.status_code == 404 and "no-such-doc" in r.json()["detail"]


_opened: list = []
_watching = threading.Event()


def _audit(event, args):
    if _watching.is_set() and event in ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename"):
        _opened.append((event, args))


sys.addaudithook(_audit)  # process-wide and permanent; records only while a test is watching


def _doc_path(doc_id: str) -> str:
    # Dots percent-encoded too: clients remove "." and ".." path segments before sending.
    return "/documents/" + quote(doc_id, safe="").replace(".", "%2E")


def _tc_path(doc_id: str) -> str:
    # Starlette's TestClient unquotes httpx's already-decoded path (a second decode: "%252F" -> "/"),
    # so quote twice here; the real-server test below sends singly-quoted paths as HTTP clients do.
    return "/documents/" + quote(_doc_path(doc_id)[len("/documents/"):], safe="")


@pytest.mark.parametrize("doc_id", ODD_IDS)
def test_odd_ids_are_keys_not_paths(client, corpus, doc_id):
    doc = next(d for d in corpus if d["id"] == doc_id)
    _opened.clear()
    _watching.set()
    try:
        r = client.get(_tc_path(doc_id))
        missing = client.get(_tc_path("../" + doc_id + "/../../manifest.json"))
    finally:
        _watching.clear()
    assert r.status_code == 200, r.text
    assert r.json()["id"] == doc_id and r.json()["text"] == doc["text"]
    assert missing.status_code == 404 and "manifest.json" in missing.json()["detail"]
    # the id never reached the filesystem (Python-level opens/listings during the requests)
    assert not [e for e in _opened if any(isinstance(a, (str, bytes, os.PathLike)) and
                                          ("passwd" in str(a) or "manifest.json" in str(a)) for a in e[1])], _opened


def test_unescaped_slash_in_id_works(client, corpus):
    r = client.get("/documents/a/b")
    assert r.status_code == 200 and r.json()["text"] == corpus[0]["text"]


# -- 4. bad requests -----------------------------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    ({"response": ""}, "response"),
    ({"response": "   \n\t "}, "non-whitespace"),
    ({"prompt": "river"}, "response"),
    ({"response": "river stone", "k": 0}, "greater than or equal to 1"),
    ({"response": "river stone", "k": 1001}, "less than or equal to 1000"),
    ({"response": "river stone", "k": "ten"}, "valid integer"),
    ({"response": "river stone", "k": 2.5}, "valid integer"),
    ({"response": "river stone", "k": "5"}, "valid integer"),  # strict: no silent coercion
    ({"response": "river stone", "k": True}, "valid integer"),
    ({"response": "river stone", "mode": "euclid"}, "'influence' or 'cosine'"),
    ({"response": 5}, "valid string"),
    ({"response": ["river"]}, "valid string"),
    ({"prompt": None, "response": "river stone"}, "prompt"),
    ({"response": "river stone", "top_k": 3}, "top_k"),
])
def test_bad_request_is_4xx_naming_the_problem(client, body, needle):
    r = client.post("/attribute", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert needle in r.text


def test_error_does_not_echo_huge_input(client):
    r = client.post("/attribute", json={"response": "river " * 200_000, "k": 0})
    assert r.status_code == 422 and len(r.content) < 2000, len(r.content)


@pytest.mark.parametrize("content,needle", [
    (b"this is not json", "JSON"),
    (b'{"response": "river"', "JSON"),
    (b'["river stone"]', "valid dictionary"),
    (b"", "body"),
])
def test_malformed_body_is_4xx(client, content, needle):
    r = client.post("/attribute", content=content, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert needle.lower() in r.text.lower()


@pytest.mark.parametrize("content", [b'{"response": "\\ud800 river stone"}',
                                     b'{"prompt": "\\udfff", "response": "river stone"}'])
def test_lone_surrogate_is_4xx(client, content):
    # Valid JSON that decodes to a str UTF-8 cannot encode; the error echoing it back must not fail.
    r = client.post("/attribute", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "unicode" in r.text


def test_response_too_short_to_score(client, reference):
    tok = reference["tokenizer"]
    one = next(w for w in ["r", "a", "e", "river", "stone"] if len(tok(w)["input_ids"]) == 1)
    r = client.post("/attribute", json={"prompt": "", "response": one})
    assert r.status_code == 422 and "no token to score" in r.json()["detail"]
    # the same token after a prompt is scorable
    assert attribute(client, prompt="river stone", response=one)["query"]["n_response_tokens"] == 1


def test_huge_text_is_truncated_not_refused(client):
    text = ("garden copper winter engine " * 8000)[:200_000]
    out = attribute(client, prompt=text, response=text, k=3)
    assert out["query"]["truncated"] is True and len(out["results"]) == 3


# -- 5. health, manifest, page -------------------------------------------------------------------

def test_health_index_and_page(client, index_dir, gpt2_dir, reference):
    h = client.get("/health").json()
    assert h == {"status": "ok", "n_documents": N_DOCS, "model": gpt2_dir}
    m = client.get("/index").json()
    assert m == json.loads((index_dir / "manifest.json").read_text())
    assert m["model"]["name_or_path"] == gpt2_dir and m["n_documents"] == N_DOCS
    assert m["dim"] == reference["vectors"].shape[1] and m["preconditioner"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()


# -- 6. concurrency ------------------------------------------------------------------------------

def test_concurrent_requests_equal_lone_requests(client, corpus):
    # Hooks live on shared modules; without the lock concurrent backward passes would mix.
    bodies = [{"prompt": "" if i % 2 else corpus[i + 1]["text"][:20], "response": corpus[i]["text"], "k": 5,
               "mode": "cosine" if i % 3 else "influence", "precision": "high" if i % 4 == 0 else "fast"} for i in range(64)]
    alone = [attribute(client, **b)["results"] for b in bodies]

    def one_thread(t):
        return [(i, client.post("/attribute", json=bodies[i])) for i in range(t, 64, 16)]

    with ThreadPoolExecutor(16) as pool:
        answers = [a for chunk in pool.map(one_thread, range(16)) for a in chunk]
    assert len(answers) == 64
    for i, r in answers:
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [x["id"] for x in got] == [x["id"] for x in alone[i]]
        assert [x["score"] for x in got] == pytest.approx([x["score"] for x in alone[i]], rel=1e-6, abs=1e-12)


# -- 7. start-up refusals ------------------------------------------------------------------------

def _copy(index_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(index_dir, dst)
    return dst


def test_refuses_folder_that_is_not_an_index(tmp_path):
    with pytest.raises(IndexFormatError, match="manifest|not"):
        create_app(tmp_path)
    with pytest.raises(IndexFormatError, match="not a folder"):
        create_app(tmp_path / "absent")


@pytest.mark.parametrize("missing", ["vectors.npy", "state.pt", "norms.npy", "scales.npy"])
def test_refuses_index_with_file_removed(index_dir, tmp_path, missing):
    dst = _copy(index_dir, tmp_path)
    (dst / missing).unlink()
    with pytest.raises(IndexFormatError, match=f"missing {missing}"):
        create_app(dst)


def test_refuses_corrupt_manifest(index_dir, tmp_path):
    dst = _copy(index_dir, tmp_path)
    text = (dst / "manifest.json").read_text()
    (dst / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(IndexFormatError, match="corrupt"):
        create_app(dst)


@pytest.mark.parametrize("edit", [lambda m: [], lambda m: {k: v for k, v in m.items() if k != "n_documents"},
                                  lambda m: {k: v for k, v in m.items() if k != "model"}],
                         ids=["list", "no-n_documents", "no-model"])
def test_refuses_manifest_missing_keys(index_dir, tmp_path, edit):
    dst = _copy(index_dir, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(IndexFormatError):
        create_app(dst)


@pytest.mark.parametrize("name", [VECTORS, "high.npy", "high-norms.npy", "high-scales.npy"])
def test_refuses_truncated_vectors(index_dir, tmp_path, name):
    dst = _copy(index_dir, tmp_path)
    v = np.load(dst / name)
    np.save(dst / name, v[:-1])
    with pytest.raises(IndexFormatError, match="corrupt"):
        create_app(dst)


def test_refuses_missing_high_vectors(index_dir, tmp_path):
    dst = _copy(index_dir, tmp_path)
    (dst / "high.npy").unlink()
    with pytest.raises(IndexFormatError, match="corrupt.*high.npy"):
        create_app(dst)


def test_refuses_another_model(index_dir, llama_dir):
    with pytest.raises(ModelMismatchError, match="not the model"):
        create_app(index_dir, model=llama_dir)


def test_refuses_perturbed_weights(index_dir, gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path / "gpt2-perturbed"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gpt2_dir).save_pretrained(out)
    with pytest.raises(ModelMismatchError, match="gpt2-perturbed"):
        create_app(index_dir, model=str(out))


# -- 8. a real server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_missing_index(tmp_path_factory):
    # Started early and left running beside the server: each process spends most of its time importing.
    log = tmp_path_factory.mktemp("cli")
    out, err = open(log / "out", "w+"), open(log / "err", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "api", "--index", "/nonexistent/index"], cwd=REPO, stdout=out,
                            stderr=err, env=subprocess_env())
    yield proc, out, err
    stop(proc, grace_s=0)
    out.close()
    err.close()


@pytest.fixture(scope="module")
def server(index_dir, cli_missing_index, tmp_path_factory):
    with running_api(index_dir, tmp_path_factory.mktemp("server")) as running:
        yield running


def test_real_server(server, client, corpus):
    base, proc, err = server
    body = {"prompt": "", "response": corpus[20]["text"], "k": 5, "mode": "cosine", "precision": "high"}
    r = httpx.post(base + "/attribute", json=body, timeout=30)
    assert r.status_code == 200
    res = r.json()["results"]
    assert res[0]["id"] == corpus[20]["id"] and len(res) == 5
    alone = attribute(client, **body)["results"]  # same index, same model, another process
    assert [x["id"] for x in res] == [x["id"] for x in alone]
    assert [x["score"] for x in res] == pytest.approx([x["score"] for x in alone], rel=1e-6)
    for doc_id in ODD_IDS:  # percent-decoding through uvicorn, not only the test client
        d = httpx.get(base + _doc_path(doc_id), timeout=10)
        assert d.status_code == 200 and d.json()["id"] == doc_id
    assert httpx.get(base + _doc_path("../etc/shadow"), timeout=10).status_code == 404
    bad = httpx.post(base + "/attribute", content=b"[1", headers={"content-type": "application/json"}, timeout=10)
    assert bad.status_code == 422
    surrogate = httpx.post(base + "/attribute", content=b'{"response": "\\ud800 river"}',
                           headers={"content-type": "application/json"}, timeout=10)
    assert surrogate.status_code == 422
    proc.terminate()
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM, hence -SIGTERM
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    err.seek(0)
    log = err.read()
    assert "Finished server process" in log and "Traceback" not in log, log[-3000:]


def test_cli_refuses_missing_index(cli_missing_index):
    proc, out, err = cli_missing_index
    assert proc.wait(timeout=60) != 0
    err.seek(0)
    stderr = err.read()
    assert "/nonexistent/index" in stderr and "error" in stderr.lower()
    assert "Traceback" not in stderr


# -- 9. per-token scores -------------------------------------------------------------------------

def tokens(client, **body):
    return post_ok(client, "/attribute/tokens", {"precision": "fast", **body})


@pytest.mark.parametrize("mode", ["influence", "cosine"])
@pytest.mark.parametrize("prompt,response", [("", "river stone cloud lamp orbit signal garden copper"),
                                             ("winter engine", " paper violet harbor needle falcon")])
def test_token_scores_sum_to_the_document_score(client, reference, mode, prompt, response):
    res = attribute(client, prompt=prompt, response=response, k=3, mode=mode)["results"]
    for r in res:
        t = tokens(client, prompt=prompt, response=response, id=r["id"], mode=mode)
        assert t["id"] == r["id"] and t["mode"] == mode and t["truncated"] is False
        assert t["document_score"] == pytest.approx(r["score"], rel=1e-5, abs=1e-9)
        scores = [x["score"] for x in t["tokens"]]
        scored = [s for s in scores if s is not None]
        assert len(scored) == t["n_scored_tokens"] and t["max_tokens_scored"] == 256
        assert sum(scored) == pytest.approx(t["total"], rel=1e-9)
        assert t["total"] == pytest.approx(t["document_score"], rel=1e-3, abs=1e-4 * max(abs(s) for s in scored))
        assert len(set(scored)) > 1
        # one entry per response token, reading back as the response; nothing predicts an opening token
        assert "".join(x["text"] for x in t["tokens"]) == response
        assert (scores[0] is None) == (prompt == "") and all(s is not None for s in scores[1:])


def test_token_scores_against_brute_force_single_token_vectors(client, reference, index_dir, corpus):
    # Independent of the API: the reference LoGra's vector for the loss of one token, dotted with the row.
    from engine.encoding import collate, encode
    response = corpus[4]["text"]
    doc = corpus[9]["id"]
    t = tokens(client, prompt="", response=response, id=doc, mode="influence")
    idx, _, tok, logra, pre = reference_engine(index_dir)
    enc = encode(tok, "", response, idx.manifest.max_tokens)
    row = reference["vectors"][reference["ids"].index(doc)]
    for j in (1, 3, len(enc.input_ids) - 1):
        batch = collate([enc], tok.pad_token_id, label_positions=[[j]])
        v = pre.apply(logra.gradients(batch).grads)[0].double().numpy()
        assert t["tokens"][j]["score"] == pytest.approx(float(v @ row), rel=1e-3, abs=1e-6 * np.abs(row).max())


@pytest.mark.parametrize("body,status,needle", [
    ({"response": "river stone", "id": "no-such-doc"}, 404, "no-such-doc"),
    ({"response": "   ", "id": "doc-10"}, 422, "non-whitespace"),
    ({"response": "river stone"}, 422, "id"),
    ({"response": "river stone", "id": ""}, 422, "id"),
    ({"response": "river stone", "id": "doc-10", "mode": "dot"}, 422, "'influence' or 'cosine'"),
    ({"response": "river stone", "id": "doc-10", "k": 3}, 422, "k"),
    ({"response": "river stone", "id": 10}, 422, "valid string"),
])
def test_token_scores_bad_request(client, body, status, needle):
    r = client.post("/attribute/tokens", json=body)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_token_scores_response_too_short_and_truncated(client, reference):
    tok = reference["tokenizer"]
    one = next(w for w in ["r", "a", "e", "river", "stone"] if len(tok(w)["input_ids"]) == 1)
    r = client.post("/attribute/tokens", json={"response": one, "id": "doc-10"})
    assert r.status_code == 422 and "no token to score" in r.json()["detail"]
    t = tokens(client, prompt="river stone", response=one, id="doc-10")
    assert len(t["tokens"]) == 1 and t["n_scored_tokens"] == 1
    long = tokens(client, response="garden copper winter engine " * 200, id="doc-10")
    assert long["truncated"] is True and len(long["tokens"]) <= 128


@pytest.mark.parametrize("doc_id", ODD_IDS)
def test_document_by_query_parameter(client, corpus, doc_id):
    # the page fetches documents this way: "." and ".." cannot travel as URL path segments
    r = client.get("/documents", params={"id": doc_id})
    assert r.status_code == 200 and r.json()["id"] == doc_id
    assert client.get("/documents", params={"id": "nope"}).status_code == 404


# -- 10. an index replaced under a running server ------------------------------------------------

def _hammer(client, docs, stop: threading.Event, seen: list) -> None:
    """Queries and document fetches in a loop until `stop`; records (status, n_documents or None)."""
    i = 0
    while not stop.is_set():
        doc = docs[i % len(docs)]
        r = client.post("/attribute", json={"response": doc["text"], "k": 3, "mode": "cosine", "precision": "fast"})
        seen.append((r.status_code, r.json().get("n_documents") if r.status_code == 200 else r.text))
        d = client.get("/documents", params={"id": doc["id"]})
        seen.append((d.status_code, None if d.status_code == 200 else d.text))
        i += 1


def test_append_and_rebuild_are_served_without_restart(tmp_path, gpt2_dir):
    docs = synthetic_corpus(30, seed=31)
    idx = build_corpus_index(tmp_path, gpt2_dir, docs[:20])
    new = write_jsonl(tmp_path / "new.jsonl", docs[20:])
    everything = write_jsonl(tmp_path / "all.jsonl", docs)
    with TestClient(create_app(idx)) as c:
        assert c.get("/health").json()["n_documents"] == 20
        stop, seen = threading.Event(), []
        with ThreadPoolExecutor(3) as pool:
            workers = [pool.submit(_hammer, c, docs[k::3][:6], stop, seen) for k in range(3)]
            append_documents(idx, [new], progress=False)
            while not any(n == 30 for _, n in seen):  # until a request has seen the appended index
                assert not any(w.done() for w in workers)
                threading.Event().wait(0.05)
            # a rebuild with another preconditioner: new vectors, new engine objects
            build_index(BuildConfig(model=gpt2_dir, data=[everything], out=str(idx), overwrite=True,
                                    preconditioner="kfac", progress=False))
            while c.get("/index").json()["preconditioner"]["kind"] != "kfac":
                threading.Event().wait(0.05)
            n_before = len(seen)
            while len(seen) < n_before + 6:  # a few more requests on the rebuilt index
                threading.Event().wait(0.05)
            stop.set()
            for w in workers:
                w.result()
        assert {status for status, _ in seen} == {200}, [s for s in seen if s[0] != 200][:3]
        assert {n for _, n in seen if n is not None} == {20, 30}  # requests ran before, during and after
        # answers from the swapped-in index equal a server started on it
        with TestClient(create_app(idx)) as fresh:
            for doc in docs[18:24]:
                body = {"response": doc["text"], "k": 5, "mode": "influence"}
                got, want = attribute(c, **body), attribute(fresh, **body)
                assert [x["id"] for x in got["results"]] == [x["id"] for x in want["results"]]
                assert [x["score"] for x in got["results"]] == pytest.approx([x["score"] for x in want["results"]], rel=1e-9)
                assert attribute(c, response=doc["text"], k=1, mode="cosine")["results"][0]["id"] == doc["id"]
                assert c.get("/documents", params={"id": doc["id"]}).status_code == 200


def test_an_index_for_another_model_swapped_in_is_refused_with_503(tmp_path, gpt2_dir, llama_dir):
    docs = synthetic_corpus(12, seed=5)
    idx = build_corpus_index(tmp_path, gpt2_dir, docs)
    with TestClient(create_app(idx)) as c:
        assert attribute(c, response=docs[0]["text"], k=2)["n_documents"] == 12
        build_index(BuildConfig(model=llama_dir, data=[str(tmp_path / "data.jsonl")], out=str(idx), overwrite=True,
                                progress=False))
        r = c.post("/attribute", json={"response": docs[0]["text"], "k": 2})
        assert r.status_code == 503 and "cannot serve" in r.json()["detail"] and "not the model" in r.json()["detail"]
        assert c.get("/documents", params={"id": docs[0]["id"]}).status_code == 503
        assert c.get("/health").status_code == 200


# -- 11. opponents, limits, API key, CORS, metrics -------------------------------------------------

@pytest.mark.parametrize("mode", ["influence", "cosine"])
def test_opponents_are_the_lowest_exact_scores(client, reference, mode):
    response = "river stone cloud lamp orbit signal garden copper"
    ids, scores = brute_force(reference, "", response, mode)
    got = attribute(client, response=response, k=5, mode=mode, direction="opponents")
    assert got["direction"] == "opponents"
    assert [x["id"] for x in got["results"]] == ids[::-1][:5]
    # float32 scores against float64 ones: rounding up to ~1e-7 of the largest term, so a small score gets an absolute bound
    assert [x["score"] for x in got["results"]] == pytest.approx(list(scores[::-1][:5]), rel=1e-5, abs=1e-6 * abs(scores).max())
    bad = client.post("/attribute", json={"response": response, "direction": "sideways"})
    assert bad.status_code == 422 and "direction" in bad.text


def _app(index_dir, **settings):
    from api.settings import ServerSettings
    return TestClient(create_app(index_dir, settings=ServerSettings(**settings)))


KEY = "k" * 8 + "-secret-123"


def test_body_size_and_request_time_limits(index_dir, corpus):
    with _app(index_dir, max_body_bytes=2000, request_timeout_s=0.05) as c:
        big = c.post("/attribute", json={"response": "river " * 500})
        assert big.status_code == 413 and "2000 bytes" in big.json()["detail"]

        def chunks():  # no content-length: the limit counts what arrives
            for _ in range(10):
                yield b" " * 500
        assert c.post("/attribute", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
        # one pass per response token: far over 50 ms on any machine
        slow = c.post("/attribute/tokens", json={"response": " ".join(["river stone cloud"] * 60), "id": corpus[5]["id"]})
        assert slow.status_code == 503 and "no answer within 0.05 s" in slow.json()["detail"]
        assert c.get("/health").status_code == 200


def test_api_key_guards_the_data_and_admin_endpoints(index_dir, corpus):
    body = {"response": corpus[3]["text"], "k": 2}
    with _app(index_dir, api_key=KEY) as c:
        for call in (lambda h: c.post("/attribute", json=body, headers=h),
                     lambda h: c.get("/documents", params={"id": corpus[3]["id"]}, headers=h),
                     lambda h: c.get("/index", headers=h)):
            assert call({}).status_code == 401
            assert call({"Authorization": "Bearer wrong-key-wrong-key"}).status_code == 401
            assert call({"Authorization": f"Bearer {KEY}"}).status_code == 200
            assert call({"X-API-Key": KEY}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        assert c.post("/admin/reload").status_code == 401
        r = c.post("/admin/reload", headers={"X-API-Key": KEY})
        assert r.status_code == 200 and r.json() == {"reloaded": False, "n_documents": len(corpus)}
    with _app(index_dir) as c:  # no key: data open, admin off
        assert c.post("/attribute", json=body).status_code == 200
        r = c.post("/admin/reload", headers={"X-API-Key": KEY})
        assert r.status_code == 403 and "LOGRA_API_KEY" in r.json()["detail"]


def test_admin_reload_swaps_in_an_appended_index(tmp_path, gpt2_dir):
    docs = synthetic_corpus(14, seed=8)
    idx = build_corpus_index(tmp_path, gpt2_dir, docs[:10])
    with _app(idx, api_key=KEY) as c:
        append_documents(idx, [write_jsonl(tmp_path / "new.jsonl", docs[10:])], progress=False)
        r = c.post("/admin/reload", headers={"X-API-Key": KEY})
        assert r.json() == {"reloaded": True, "n_documents": 14}
        assert c.post("/admin/reload", headers={"X-API-Key": KEY}).json()["reloaded"] is False


def test_cors_is_off_by_default_and_configurable(index_dir):
    origin = {"Origin": "https://notebook.example"}
    with _app(index_dir) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers=origin).headers
    with _app(index_dir, cors_origins=["https://notebook.example"]) as c:
        assert c.get("/health", headers=origin).headers["access-control-allow-origin"] == "https://notebook.example"
        other = c.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_count_requests_by_route_and_report_the_index(index_dir, corpus):
    with _app(index_dir) as c:
        for doc in corpus[-3:]:  # plain ids (the first ones are odd on purpose)
            attribute(c, response=doc["text"], k=2)
            assert c.get(f"/documents/{doc['id']}").status_code == 200
        assert c.get("/documents/no-such-doc").status_code == 404
        text = c.get("/metrics").text
    assert 'logra_requests_total{method="POST",route="/attribute",status="200"} 3.0' in text
    assert 'logra_requests_total{method="GET",route="/documents/{doc_id:path}",status="200"} 3.0' in text
    assert 'logra_requests_total{method="GET",route="/documents/{doc_id:path}",status="404"} 1.0' in text
    assert 'logra_request_seconds_count{method="POST",route="/attribute"} 3.0' in text
    assert f"logra_index_documents {float(len(corpus))}" in text
    assert "logra_query_jobs 3.0" in text and "logra_query_passes 3.0" in text  # one client: one pass each
    assert corpus[-1]["id"] not in text  # ids never become labels


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(index_dir):
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error
    app = create_app(index_dir)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    n_cases = 0
    for operation in schema.get_all_operations():
        op = operation.ok()
        strategy = op.as_strategy()

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @hypothesis_given(strategy)
        def check(case):
            nonlocal n_cases
            n_cases += 1
            response = case.call()
            assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
            case.validate_response(response, checks=[not_a_server_error])
        check()
    assert n_cases >= 50


# -- 12. metadata filters --------------------------------------------------------------------------

@pytest.mark.parametrize("mode,direction", [("cosine", "proponents"), ("influence", "opponents")])
def test_where_filters_on_metadata_before_ranking_with_exact_scores(client, reference, corpus, mode, direction):
    response = "river stone cloud lamp orbit signal garden copper"
    ids, scores = brute_force(reference, "", response, mode)
    source = {d["id"]: d["source"] for d in corpus}
    for value in ("web", "books"):
        want = [(i, s) for i, s in zip(ids, scores) if source[i] == value]
        if direction == "opponents":
            want = want[::-1]
        got = attribute(client, response=response, k=4, mode=mode, direction=direction, where={"source": value})
        assert [x["id"] for x in got["results"]] == [i for i, _ in want[:4]]
        # float32 scores against float64 ones (as test_scores_match_brute_force): a small score gets an absolute bound
        assert [x["score"] for x in got["results"]] == pytest.approx([s for _, s in want[:4]], rel=1e-5,
                                                                      abs=1e-6 * abs(scores).max())
        assert all(x["metadata"]["source"] == value for x in got["results"])
    # two fields (both must hold), a value no document has, a field no document has
    doc = corpus[7]
    both = attribute(client, response=response, k=5, where={"source": doc["source"], "position": doc["position"]})
    assert [x["id"] for x in both["results"]] == [doc["id"]]
    assert attribute(client, response=response, where={"source": "nowhere"})["results"] == []
    # a field no document has, or a value of a type the field never holds: a 422 that says so
    r = client.post("/attribute", json={"response": response, "where": {"licence": "mit"}})
    assert r.status_code == 422 and "'licence'" in r.json()["detail"] and "position, source" in r.json()["detail"]
    r = client.post("/attribute", json={"response": response, "where": {"position": "7"}})
    assert r.status_code == 422 and "holds int values, not str" in r.json()["detail"]
    for bad in ({"source": ["web"]}, {"source": {"$ne": "web"}}, {f"f{i}": 1 for i in range(9)}):
        r = client.post("/attribute", json={"response": response, "where": bad})
        assert r.status_code == 422 and "where" in r.text


def test_bodies_that_are_not_utf8_json_get_told_what_to_send(client):
    r = client.post("/attribute", content=b'{"response": "abc \xff\xfe def"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["detail"] and "0xff" in r.json()["detail"]
    r = client.post("/attribute", content=b'{"response": "abc" "k": 3}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"] and "position 19" in r.json()["detail"]
    for headers in ({}, {"Content-Type": "text/plain"}):
        r = client.post("/attribute", content=b'{"response": "abc def"}', headers=headers)
        assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"]


@pytest.mark.parametrize("precision", ["fast", "high"])
def test_cosine_scores_stay_within_one(client, index_dir, corpus, precision):
    """A document sent as the query meets its own vector: cosine 1 up to rounding (and the high stage's
    storage), never above."""
    for doc in corpus[:12]:
        top = attribute(client, response=doc["text"], k=3, precision=precision)["results"]
        assert all(-1.0 <= x["score"] <= 1.0 for x in top)
        assert top[0]["score"] == pytest.approx(1.0, abs=self_cosine_tolerance(index_dir, precision))


def test_favicon_is_served(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    assert 'rel="icon"' in client.get("/").text
