"""The indexer end to end: the documented CLI (as a subprocess and in process), self-retrieval
through the API's engine path, provenance, truncation, bad input, atomicity, reproducibility and
streaming. Real models (the tiny local GPT-2 and Llama of conftest), real files, no mocks."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from api.search import Attributor
from api.server import stop
from engine import PRECONDITIONERS, load_model, model_fingerprint
from indexer import ann, store
from engine.encoding import Encoded
from indexer.build import BuildConfig, _batches, build_index, resume_key
from indexer.cli import main as cli_main
from indexer.records import BadRecordError
from indexer.store import REQUIRED, Index

from .support import (self_cosine_tolerance, assert_same_high_rows, assert_same_vectors, checkpointed_shards, exact_scores, leftovers, run_cli, stored_high,
                      subprocess_env, synthetic_corpus, table_rows, write_jsonl)

MODELS = ("gpt2", "llama")
N_SELF = 150


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Two shared cores: torch's default pool oversubscribes them and a tiny model's backward pass
    # gets ~30x slower. One thread keeps the module well inside its time budget.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def error_lines(stderr: str) -> list[str]:
    # transformers draws its own "Loading weights" bar on stderr even with --no-progress; skip it
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def build_args(model, data, out, *extra) -> list[str]:
    data = data if isinstance(data, (list, tuple)) else [data]
    return ["build", "--model", model, "--data", *map(str, data), "--out", out, "--no-progress", *extra]


def snapshot(index_dir: Path) -> tuple[bytes, bytes]:
    return (index_dir / store.MANIFEST).read_bytes(), (index_dir / store.VECTORS).read_bytes()


# -- the documented command, as a real subprocess ---------------------------------------------------

def _spawn(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = subprocess_env(OMP_NUM_THREADS="1")
    # Output to files, not pipes: several processes run at once and none may block on a full pipe.
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "indexer", *map(str, argv)], cwd=cwd, env=env,
                                stdout=out, stderr=err)


def _run_all(jobs: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run CLI invocations concurrently: each pays several seconds of imports, so in parallel."""
    procs = {name: _spawn(argv, cwd, cwd / f"log-{name}") for name, argv in jobs.items()}
    done = {}
    try:
        for name, p in procs.items():
            p.wait(timeout=300)
            log = cwd / f"log-{name}"
            done[name] = subprocess.CompletedProcess(jobs[name], p.returncode, log.with_suffix(".out").read_text(),
                                                     log.with_suffix(".err").read_text())
    finally:
        for p in procs.values():  # never leave a hung build behind
            stop(p, grace_s=0)
    return done


@pytest.fixture(scope="module")
def cli(tmp_path_factory, gpt2_dir, llama_dir):
    """Every subprocess run of the module, in two concurrent waves. Returns (folder, results)."""
    d = tmp_path_factory.mktemp("cli")
    # A corpus neither model nor tokenizer has seen (the tokenizer was trained on seed 123).
    write_jsonl(d / "corpus.jsonl", synthetic_corpus(N_SELF, seed=2024))
    write_jsonl(d / "small.jsonl", synthetic_corpus(30, seed=5))
    models = {"gpt2": gpt2_dir, "llama": llama_dir}
    jobs = {f"build-{m}": build_args(models[m], "corpus.jsonl", f"idx-{m}") for m in MODELS}
    jobs["progress"] = ["build", "--model", gpt2_dir, "--data", "small.jsonl", "--out", "idx-progress",
                        "--batch-size", "4"]
    jobs["bad-model"] = build_args(d / "no-such-model", "small.jsonl", "idx-bad-model")
    results = _run_all(jobs, d)
    # one `info` process is enough for the process plumbing; both models' manifests are checked in process
    results.update(_run_all({"info": ["info", "idx-gpt2", "--json"], "summary": ["info", "idx-gpt2"]}, d))
    return d, results


@pytest.mark.parametrize("model", MODELS)
def test_cli_build_writes_complete_index(cli, model):
    d, res = cli
    r = res[f"build-{model}"]
    assert r.returncode == 0, r.stderr
    assert f"indexed {N_SELF} documents" in r.stdout
    out = d / f"idx-{model}"
    assert sorted(p for p in REQUIRED if not (out / p).exists()) == []
    assert len(Index.open(out)) == N_SELF
    assert leftovers(d) == []
    # --no-progress: our bar is off (transformers' own "Loading weights" bar is not ours to silence)
    assert "gradients" not in r.stderr and "doc/s" not in r.stderr
    assert "will be created" not in r.stderr and "WARN" not in r.stderr  # LanceDB's table-creation log line


def test_cli_info_summary_reads_like_the_manifest(cli):
    d, res = cli
    r = res["summary"]
    assert r.returncode == 0, r.stderr
    m = json.loads((d / "idx-gpt2" / store.MANIFEST).read_text())
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line and not line.startswith(" ")}
    assert f"{m['n_documents']:,}" in lines["documents"] and m["model"]["fingerprint"] in lines["model"]
    assert f"{m['dim']:,} dimensions" in lines["vectors"] and "ekfac (damping 0.01)" in lines["vectors"]
    assert f"{m['high']['dim']:,} dimensions" in lines["high"] and m["faiss"]["type"] in lines["faiss"]
    per_doc = (m["high"]["dim"] + 1) // 2 + 8  # the default int4: half a byte a dimension, a scale and a norm
    assert f"stored as int4 ({per_doc:,} bytes a document" in lines["high"]
    # the compact budget's 1,024 block dimensions cannot give 8 block layers 576 each: the last block's
    # last layer alone is tracked (engine.budget), and the summary says which blocks
    shape = lambda l: f"{l['r_out']} x {l['r_in']} of {l['out_features']} x {l['in_features']}"
    tracked = [l for l in m["layers"] if l["name"] != "lm_head"]
    assert [l["name"] for l in tracked] == ["transformer.h.1.mlp.c_proj"] and tracked[0]["r_out"] * tracked[0]["r_in"] >= 576
    assert "at least 576 a block layer: blocks {1} tracked" in lines["vectors"]
    layer_lines = [line.strip() for line in r.stdout.splitlines() if line.startswith("  ")]
    assert layer_lines == [f"{l['name']}: {shape(l)}" for l in tracked] + [f"lm_head: {shape(m['layers'][-1])}"]
    assert "MiB" in lines["size"] and f"{m['build']['seconds']:,.0f} s" in lines["built"]


def test_cli_info_summarises_repeated_blocks(cli, tmp_path, capsys):
    """A 30-block Llama's 211 layers read as one line per block layer; a block whose layer has another
    shape is not merged into the others; --json still prints every layer."""
    d, res = cli
    assert res["build-llama"].returncode == 0
    m = json.loads((d / "idx-llama" / store.MANIFEST).read_text())
    parts = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    layer = lambda name, r_out, r_in, out_f, in_f: {"name": name, "in_features": in_f, "out_features": out_f,
                                                     "r_in": r_in, "r_out": r_out}
    m["layers"] = [layer(f"model.layers.{b}.{p}", *((4, 16) if (b, p) == (7, "self_attn.q_proj") else (8, 8)), 576, 576)
                   for b in range(30) for p in parts] + [layer("lm_head", 64, 24, 49152, 576)]
    (tmp_path / store.MANIFEST).write_text(json.dumps(m))
    code, out, err = run_cli(["info", tmp_path], capsys)
    assert code == 0, err
    assert "layers       211 " in out
    assert [line for line in out.splitlines() if line.startswith("  ")] == [
        "  model.layers.{0..6,8..29}.self_attn.q_proj: 29x 8 x 8 of 576 x 576",
        *(f"  model.layers.{{0..29}}.{p}: 30x 8 x 8 of 576 x 576" for p in parts[1:]),
        "  model.layers.7.self_attn.q_proj: 4 x 16 of 576 x 576",
        "  lm_head: 64 x 24 of 49152 x 576",
    ]
    code, out, err = run_cli(["info", tmp_path, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out) == m


def test_cli_info_subprocess_prints_manifest(cli):
    d, res = cli
    r = res["info"]
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads((d / "idx-gpt2" / store.MANIFEST).read_text())


@pytest.mark.parametrize("model", MODELS)
def test_cli_info_manifest_fields(cli, model, request, capsys):
    d, res = cli
    assert res[f"build-{model}"].returncode == 0
    code, out, err = run_cli(["info", d / f"idx-{model}", "--json"], capsys)
    assert code == 0, err
    printed = json.loads(out)
    assert printed == json.loads((d / f"idx-{model}" / store.MANIFEST).read_text())
    assert printed["n_documents"] == N_SELF
    assert printed["format_version"] == store.FORMAT_VERSION
    assert printed["rank"] is None and printed["seed"] == 0
    assert printed["budget"] == {"dims": 4096, "head_share": 0.75, "min_layer_dims": 576}
    assert printed["preconditioner"] == {"kind": "ekfac", "damping_ratio": 0.01}
    # the LM head is tracked by default, and the allocation is recorded layer by layer
    assert printed["layers"][-1]["name"] == "lm_head" and printed["dim"] <= 4096
    high = printed["high"]
    assert high["preconditioner"] == {"kind": "ekfac", "damping_ratio": 0.01} and high["sample_documents"] == N_SELF
    assert high["budget"] == {"dims": 65536, "head_share": 0.75, "min_layer_dims": 576}
    assert high["storage"] == BuildConfig.high_storage == "int4" and high["stored"].startswith("int4 codes")
    # the larger budget tracks every layer the compact one does (the deepest first), each at least as large
    high_by_name = {l["name"]: l for l in high["layers"]}
    assert set(high_by_name) >= {l["name"] for l in printed["layers"]}
    assert high["dim"] == sum(l["r_out"] * l["r_in"] for l in high["layers"]) <= 65536
    assert all(high_by_name[f["name"]]["r_out"] >= f["r_out"] and high_by_name[f["name"]]["r_in"] >= f["r_in"]
               for f in printed["layers"])
    assert printed["layers"] and printed["dim"] == sum(l["r_out"] * l["r_in"] for l in printed["layers"])
    # the fingerprint is the model's own, so the API can refuse a different checkpoint
    loaded, _ = load_model(request.getfixturevalue(f"{model}_dir"))
    assert printed["model"]["fingerprint"] == model_fingerprint(loaded)
    assert printed["stats"]["documents"] == N_SELF and printed["stats"]["skipped"] == 0


def test_cli_info_on_a_non_index(tmp_path, capsys):
    code, _, err = run_cli(["info", tmp_path], capsys)
    assert code != 0 and error_lines(err) and "not an index folder" in err


def test_cli_progress_bar_shows_rates(cli):
    _, res = cli
    r = res["progress"]
    assert r.returncode == 0, r.stderr
    assert "30/30" in r.stderr
    assert re.search(r"doc/s|s/doc", r.stderr), r.stderr[-2000:]  # documents per second (tqdm unit)
    assert re.search(r"tok_s=[\d,.]+", r.stderr), r.stderr[-2000:]  # tokens per second


def test_cli_missing_model_is_one_line_error(cli):
    d, res = cli
    r = res["bad-model"]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = error_lines(r.stderr)
    assert len(errors) == 1 and "no-such-model" in errors[0], r.stderr
    assert not (d / "idx-bad-model").exists()
    assert leftovers(d) == []


# -- acceptance: a document finds itself ----------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_self_retrieval(cli, model, record_property):
    """Every indexed document, sent as a response with an empty prompt through the API's own path,
    must rank itself first (cosine) for at least 99% of the corpus."""
    d, res = cli
    assert res[f"build-{model}"].returncode == 0
    docs = synthetic_corpus(N_SELF, seed=2024)
    attributor = Attributor(d / f"idx-{model}")
    misses = []
    for i, doc in enumerate(docs):
        _, found, _ = attributor.attribute("", doc["text"], 1, "cosine")
        if found[0]["id"] != doc["id"]:
            misses.append(doc["id"])
    fraction = 1 - len(misses) / len(docs)
    record_property(f"self_retrieval_{model}", fraction)
    print(f"self-retrieval {model}: {fraction:.4f} ({len(docs) - len(misses)}/{len(docs)})")
    assert fraction >= 0.99, misses


# -- provenance ------------------------------------------------------------------------------------

def test_metadata_kept_and_ids_generated(tmp_path, gpt2_dir, capsys):
    records = [
        {"id": "a", "text": "river stone cloud lamp", "source": "web", "nested": {"k": [1, 2.5, None]}, "flag": True},
        {"text": "orbit signal garden copper", "license": "cc-by", "score": 0.25},  # no id: generated
        {"id": 7, "text": "winter engine paper violet", "url": "https://example.org/x"},  # integer id
        {"text": "harbor needle falcon marble"},  # no id, no metadata
    ]
    data = write_jsonl(tmp_path / "prov.jsonl", records)
    code, out, err = run_cli(build_args(gpt2_dir, data, tmp_path / "idx"), capsys)
    assert code == 0, err
    rows = table_rows(tmp_path / "idx")
    assert [r["id"] for r in rows] == ["a", "prov-2", "7", "prov-4"]  # <file stem>-<line>
    for r, rec in zip(rows, records):
        assert r["text"] == rec["text"] and r["prompt"] == ""
        assert r["metadata"] == {k: v for k, v in rec.items() if k not in ("id", "text")}
        assert r["source"] == data
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r["row"] for r in rows] == [0, 1, 2, 3]


def test_prompt_response_records(tmp_path, gpt2_dir, capsys):
    records = [{"id": "p1", "q": "river stone", "a": " cloud lamp orbit", "text": "ignored here", "lang": "en"},
               {"id": "p2", "q": "", "a": "signal garden copper winter", "split": "train"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    code, _, err = run_cli(build_args(gpt2_dir, data, tmp_path / "idx", "--prompt-field", "q", "--response-field", "a"),
                       capsys)
    assert code == 0, err
    rows = table_rows(tmp_path / "idx")
    for r, rec in zip(rows, records):  # no chat template: a newline (the default separator) after a prompt
        prompt = rec["q"] + "\n" if rec["q"] else ""
        assert r["text"] == prompt + rec["a"]
        assert r["prompt"] == prompt
        # a field named like --text-field is ordinary metadata for prompt/response records
        assert r["metadata"] == {k: v for k, v in rec.items() if k not in ("id", "q", "a")}
    manifest = json.loads((tmp_path / "idx" / store.MANIFEST).read_text())
    assert manifest["data"]["prompt_field"] == "q" and manifest["data"]["response_field"] == "a"


def test_parquet_input_through_cli(tmp_path, gpt2_dir, capsys):
    import datetime as dt
    table = pa.table({
        "doc_id": pa.array([10, 11, 12], pa.int64()),
        "body": ["river stone cloud lamp", "orbit signal garden", "copper winter engine paper"],
        "when": pa.array([dt.datetime(2024, 1, i + 1) for i in range(3)], pa.timestamp("s")),
        "tags": [["a"], [], ["b", "c"]],
    })
    path = tmp_path / "docs.parquet"
    pq.write_table(table, path)
    code, out, err = run_cli(build_args(gpt2_dir, path, tmp_path / "idx", "--text-field", "body", "--id-field", "doc_id"),
                         capsys)
    assert code == 0, err
    assert "indexed 3 documents" in out
    rows = table_rows(tmp_path / "idx")
    assert [r["id"] for r in rows] == ["10", "11", "12"]
    assert [r["text"] for r in rows] == table.column("body").to_pylist()
    assert rows[0]["metadata"] == {"when": "2024-01-01T00:00:00", "tags": ["a"]}
    assert [r["line"] for r in rows] == [1, 2, 3]  # row numbers, 1-based


# -- truncation ------------------------------------------------------------------------------------

def test_truncation_recorded_per_document(tmp_path, model_dir, capsys):
    long = " ".join(["river stone cloud lamp orbit signal"] * 10)  # well over 16 tokens
    records = [{"id": "short", "text": "river stone"}, {"id": "long", "text": long},
               {"id": "long2", "text": long + " garden"}]
    data = write_jsonl(tmp_path / "t.jsonl", records)
    code, _, err = run_cli(build_args(model_dir, data, tmp_path / "idx", "--max-tokens", "16"), capsys)
    assert code == 0, err
    rows = {r["id"]: r for r in table_rows(tmp_path / "idx")}
    assert rows["long"]["truncated"] and rows["long"]["n_tokens"] == 16
    assert rows["long2"]["truncated"] and rows["long2"]["n_tokens"] == 16
    assert not rows["short"]["truncated"] and rows["short"]["n_tokens"] < 16
    assert rows["long"]["text"] == long  # the stored text is the whole document, not the truncated part
    manifest = json.loads((tmp_path / "idx" / store.MANIFEST).read_text())
    assert manifest["max_tokens"] == 16
    assert manifest["stats"]["truncated"] == 2


# -- bad input through the CLI --------------------------------------------------------------------

def test_skip_bad_counts_skipped_records(tmp_path, gpt2_dir, capsys):
    lines = [json.dumps(r) for r in synthetic_corpus(6, seed=3)]
    lines[3] = "{not json"
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(build_args(gpt2_dir, data, tmp_path / "idx", "--skip-bad"), capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "idx" / store.MANIFEST).read_text())
    assert manifest["n_documents"] == 5
    assert manifest["stats"]["skipped"] == 1
    assert any("line 4" in m for m in manifest["stats"]["skipped_examples"])
    assert [r["id"] for r in table_rows(tmp_path / "idx")] == [f"doc-{i}" for i in (0, 1, 2, 4, 5)]


@pytest.mark.parametrize("case, lines, message", [
    ("missing-text", ['{"id": "a", "text": "river stone"}', '{"id": "b", "body": "cloud lamp"}'],
     r"line 2: missing field 'text'; available fields: 'id', 'body'"),
    ("empty-doc", ['{"id": "a", "text": "river stone"}', '{"id": "b", "text": "   "}'],
     r"line 2: field 'text' is empty"),
    ("duplicate-id", ['{"id": "a", "text": "river stone"}', '{"id": "z", "text": "x y"}', '{"id": "a", "text": "lamp"}'],
     r"line 3: duplicate id 'a'"),
    ("malformed", ['{"id": "a", "text": "river stone"}', '{"id": "b", "text": "cl'],
     r"line 2: invalid JSON"),
])
def test_bad_records_refused_with_clear_message(tmp_path, gpt2_dir, capsys, case, lines, message):
    data = tmp_path / f"{case}.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(build_args(gpt2_dir, data, tmp_path / "idx"), capsys)
    assert code != 0
    (line,) = error_lines(err)
    assert str(data) in line and re.search(message, line), err
    assert not (tmp_path / "idx").exists() and leftovers(tmp_path) == []


def test_nonexistent_data_file(tmp_path, gpt2_dir, capsys):
    code, _, err = run_cli(build_args(gpt2_dir, tmp_path / "nope.jsonl", tmp_path / "idx"), capsys)
    assert code != 0
    (line,) = error_lines(err)
    assert "no such file" in line and "nope.jsonl" in line, err
    assert not (tmp_path / "idx").exists() and leftovers(tmp_path) == []


def test_existing_index_refused_then_overwritten(tmp_path, gpt2_dir, capsys):
    first = write_jsonl(tmp_path / "first.jsonl", synthetic_corpus(8, seed=1))
    second = write_jsonl(tmp_path / "second.jsonl", synthetic_corpus(5, seed=2))
    out = tmp_path / "idx"
    assert run_cli(build_args(gpt2_dir, first, out), capsys)[0] == 0
    before = snapshot(out)

    code, _, err = run_cli(build_args(gpt2_dir, second, out), capsys)
    assert code != 0 and "already exists" in err and "--overwrite" in err
    assert snapshot(out) == before

    # --overwrite with a build that fails must keep the old index too
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "river"}\n{oops\n')
    code, _, err = run_cli(build_args(gpt2_dir, bad, out, "--overwrite"), capsys)
    assert code != 0 and "bad.jsonl line 2" in err
    assert snapshot(out) == before and leftovers(tmp_path) == []

    code, _, err = run_cli(build_args(gpt2_dir, second, out, "--overwrite"), capsys)
    assert code == 0, err
    assert json.loads((out / store.MANIFEST).read_text())["n_documents"] == 5
    assert [r["id"] for r in table_rows(out)] == [f"doc-{i}" for i in range(5)]
    assert leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_that_is_not_an_index(tmp_path, gpt2_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(5, seed=1))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = run_cli(build_args(gpt2_dir, data, precious, "--overwrite"), capsys)
    assert code != 0 and "not an index folder" in err
    assert (precious / "notes.txt").read_text() == "keep me" and leftovers(tmp_path) == []


@pytest.mark.parametrize("flag", ["--batch-size", "--shard-size", "--rank", "--max-tokens"])
def test_non_positive_sizes_refused(tmp_path, gpt2_dir, flag):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(5, seed=1))
    with pytest.raises(SystemExit) as exc:
        cli_main(["build", "--model", gpt2_dir, "--data", data, "--out", str(tmp_path / "idx"), flag, "0"])
    assert exc.value.code == 2 and not (tmp_path / "idx").exists()


# -- atomicity and reproducibility -------------------------------------------------------------------

def test_failure_mid_build_leaves_nothing(tmp_path, gpt2_dir, monkeypatch):
    records = [{"id": f"d{i}", "text": "river stone cloud lamp orbit"} for i in range(600)]
    lines = [json.dumps(r) for r in records]
    lines[499] = '{"id": "d499", "text": '  # line 500
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # A spy (the real method still runs) to prove shards had been written when the error came.
    written = []
    real_add = store.IndexWriter.add_shard
    monkeypatch.setattr(store.IndexWriter, "add_shard",
                        lambda self, rows, raw, **kw: (written.append(len(rows)), real_add(self, rows, raw, **kw))[1])
    cfg = BuildConfig(model=gpt2_dir, data=[str(data)], out=str(tmp_path / "idx"), shard_size=64, progress=False,
                      max_tokens=16, batch_size=32)
    with pytest.raises(BadRecordError, match=r"big\.jsonl line 500"):
        build_index(cfg)
    assert written == [64] * 7
    assert not (tmp_path / "idx").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_every_preconditioner_builds_a_readable_index(tmp_path, model_dir, kind):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(24, seed=9))
    manifest = build_index(BuildConfig(model=model_dir, data=[data], out=str(tmp_path / "idx"),
                                       preconditioner=kind, progress=False, shard_size=10))
    index = Index.open(tmp_path / "idx")
    assert manifest.preconditioner.kind == kind
    assert index.manifest == manifest
    assert len(index) == 24 and index.vectors.shape == (24, manifest.dim)
    assert np.isfinite(index.vectors).all()
    np.testing.assert_allclose(index.norms, np.linalg.norm(index.vectors, axis=1), rtol=1e-5)


def test_builds_are_reproducible(tmp_path, gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(40, seed=4))
    for name in ("a", "b"):
        build_index(BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / name), progress=False,
                                preconditioner="ekfac", shard_size=16))
    va, vb = (np.load(tmp_path / n / store.VECTORS) for n in "ab")
    assert va.tobytes() == vb.tobytes()
    assert table_rows(tmp_path / "a") == table_rows(tmp_path / "b")


def test_token_budget_batches_cover_every_document_once_within_budget():
    rng = np.random.default_rng(0)
    encoded = [Encoded(list(range(int(n))), 0, False, int(n)) for n in rng.integers(1, 200, size=300)]
    batches = list(_batches(encoded, batch_size=64, batch_tokens=1024))
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        widths = [len(encoded[i].input_ids) for i in b]
        assert widths == sorted(widths) and len(b) <= 64
        assert len(b) * max(widths) <= 1024 or len(b) == 1
    assert len(batches) < 300 // 8  # short documents did share passes
    long_doc = [Encoded(list(range(50)), 0, False, 50)] * 3
    assert list(_batches(long_doc, batch_size=8, batch_tokens=10)) == [[0], [1], [2]]  # over budget: alone


def test_batch_settings_change_no_vector_and_a_build_resumes_with_others(tmp_path, gpt2_dir):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(40, seed=4))
    one = BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / "one"), batch_size=1, progress=False)
    many = BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / "many"), batch_size=64, batch_tokens=256,
                       progress=False)
    build_index(one), build_index(many)
    assert_same_vectors(tmp_path / "many", tmp_path / "one")
    assert_same_high_rows(tmp_path / "many", tmp_path / "one")
    assert resume_key(one, "f") == resume_key(BuildConfig(**{**one.__dict__, "out": "x", "batch_tokens": 64}), "f")


# -- streaming ---------------------------------------------------------------------------------------

def test_sharded_build_keeps_input_order(tmp_path, gpt2_dir, capsys, monkeypatch):
    docs = synthetic_corpus(100, seed=8)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    written = []
    real_add = store.IndexWriter.add_shard
    monkeypatch.setattr(store.IndexWriter, "add_shard",
                        lambda self, rows, raw, **kw: (written.append(len(rows)), real_add(self, rows, raw, **kw))[1])
    code, _, err = run_cli(build_args(gpt2_dir, data, tmp_path / "idx", "--shard-size", "32", "--batch-size", "8"), capsys)
    assert code == 0, err
    assert written == [32, 32, 32, 4]
    rows = table_rows(tmp_path / "idx")
    assert len(rows) == 100
    for i, (row, doc) in enumerate(zip(rows, docs)):
        assert (row["row"], row["id"], row["text"], row["line"]) == (i, doc["id"], doc["text"], i + 1)
        assert row["metadata"] == {"source": doc["source"], "position": i}
    # vector i belongs to document i (batches are length-sorted inside a shard): the document's
    # own query vector, computed alone, equals the stored row
    a = Attributor(tmp_path / "idx")
    from engine import query_vectors
    for i in (0, 31, 32, 63, 99):
        served = a.current()
        q, _ = query_vectors(served.fast.logra, served.fast.pre, a.tokenizer, [("", docs[i]["text"])])
        # within one int8 step of the row (the stored codes' rounding, store.encode_rows)
        np.testing.assert_allclose(q[0].numpy(), a.index.vectors[i], rtol=1e-3, atol=np.abs(q[0].numpy()).max() / 127)


def test_document_with_nothing_to_score_is_kept_and_reported(tmp_path, gpt2_dir, capsys):
    # One token and no BOS: no position is predicted, so the document has no gradient.
    docs = [{"id": "tiny", "text": "a"}] + synthetic_corpus(4, seed=3)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    code, out, err = run_cli(build_args(gpt2_dir, data, tmp_path / "idx"), capsys)
    assert code == 0, err
    assert "indexed 5 documents" in out and "1 documents have no token to score" in err
    index = Index.open(tmp_path / "idx")
    assert index.norms[index.row_of_id["tiny"]] == 0 and (index.norms[1:] > 0).all()
    hits, _, _ = Attributor(tmp_path / "idx").attribute("", docs[1]["text"], 5, "cosine")
    assert {h.row: h.score for h in hits}[index.row_of_id["tiny"]] == 0.0


def test_ivf_index_types_score_exactly_and_recall_high(tmp_path, gpt2_dir):
    """IVF (flat, SQ8, PQ) only proposes candidates: every score returned is the exact score, and it
    finds nearly all of the exact top 5 (flat index), through Attributor.search and the manifest."""
    from engine import query_vectors
    from indexer.query.ranking import search
    docs = synthetic_corpus(400, seed=11)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    kinds = {"ivf": "ivf-flat", "ivf-sq8": "ivf-sq8", "ivf-pq": "ivf-pq"}
    for kind in ("flat", *kinds):
        build_index(BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / kind), index_type=kind, progress=False))
    # an index from before rerank_factor was recorded opens and searches as before (factor 1)
    old = json.loads((tmp_path / "ivf" / "manifest.json").read_text())
    old["faiss"] = {key: old["faiss"][key] for key in ("type", "nlist", "nprobe")}
    (tmp_path / "ivf" / "manifest.json").write_text(json.dumps(old))
    flat = Attributor(tmp_path / "flat")
    served = flat.current()
    queries = query_vectors(served.fast.logra, served.fast.pre, flat.tokenizer, [("", d["text"]) for d in docs[::8]])[0]
    for kind, recorded in kinds.items():
        ivf = Attributor(tmp_path / kind)
        assert ivf.index.manifest.faiss.type == recorded and ivf.index.manifest.faiss.nlist > 1
        assert ivf.index.manifest.faiss.rerank_factor == ann.RERANK_FACTOR[recorded]
        recalled, total, self_found = 0, 0, 0
        for d, q in zip(docs[::8], queries.numpy()):
            for mode in ("cosine", "influence"):
                exact = {h.row: h.score for h in search(flat.index, q, len(docs), mode)}
                top5 = sorted(exact, key=lambda r: -exact[r])[:5]
                hits = search(ivf.index, q, 5, mode)
                assert [h.score for h in hits] == pytest.approx([exact[h.row] for h in hits], rel=1e-6)
                recalled += len({h.row for h in hits} & set(top5))
                total += 5
                if mode == "cosine":
                    self_found += flat.index.documents([hits[0].row])[0]["id"] == d["id"]
        assert recalled / total >= 0.9, (kind, recalled / total)
        assert self_found == len(docs[::8]), kind


def anisotropic_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """A decaying spectrum (low-rank gaussian plus noise) and heavy-tailed norms, like whitened gradients."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, dim)) * np.geomspace(4, 0.25, 16)[:, None]
    x = rng.standard_normal((n, 16)) @ basis + 0.3 * rng.standard_normal((n, dim))
    return (x * rng.lognormal(0, 0.7, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-sq8", "ivf-pq"])
def test_compressed_index_with_rerank_returns_the_exact_top_k(tmp_path, kind):
    """With every list probed, what is left is quantization error: the rerank over rerank_factor x
    more candidates (far fewer than the corpus) must give exactly the brute-force top 10 and scores."""
    from indexer.query.ranking import rerank_search
    import faiss
    n, dim, k = 3000, 64, 10
    x = anisotropic_vectors(n + 40, dim, seed=5)
    np.save(tmp_path / store.VECTORS, x[:n])
    info = store.write_faiss(tmp_path, kind, nlist=4, block=700)  # blocks not dividing n
    assert info["type"] == kind and info["nprobe"] == info["nlist"] == 4
    assert (max(4 * k, k + 64) * info["rerank_factor"]) < n / 2  # the rerank sees a minority of the corpus
    if kind == "ivf-pq":
        assert info["padded_dim"] == info["m"] * ann.PQ_DIMS_PER_CODE >= dim and info["nbits"] == 8
    vectors = np.load(tmp_path / store.VECTORS, mmap_mode="r")
    norms = np.linalg.norm(x[:n], axis=1)
    for mode in ann.MODES:
        index = faiss.read_index(str(store.faiss_path(tmp_path, mode)))
        assert index.ntotal == n
        for q in x[n:] + 0.1 * np.random.default_rng(1).standard_normal((40, dim)).astype(np.float32):
            exact = exact_scores(x[:n], q, mode, norms)
            hits = rerank_search(index, vectors, norms, q, k, mode, info["rerank_factor"])
            assert [h.row for h in hits] == list(np.argsort(-exact, kind="stable")[:k])
            assert [h.score for h in hits] == pytest.approx(exact[[h.row for h in hits]], rel=1e-6)


def test_ivf_pq_pads_a_dim_its_codes_do_not_divide(tmp_path):
    from indexer.query.ranking import rerank_search
    import faiss
    n, dim, k = 3000, 61, 10
    x = anisotropic_vectors(n + 20, dim, seed=6)
    np.save(tmp_path / store.VECTORS, x[:n])
    info = store.write_faiss(tmp_path, "ivf-pq", nlist=4)
    assert info["padded_dim"] == 64 and info["m"] == 8
    vectors, norms = np.load(tmp_path / store.VECTORS, mmap_mode="r"), np.linalg.norm(x[:n], axis=1)
    index = faiss.read_index(str(store.faiss_path(tmp_path, "cosine")))
    assert index.d == 64
    found = 0
    for q in x[n:]:
        exact = exact_scores(x[:n], q, "cosine", norms)
        hits = rerank_search(index, vectors, norms, q, k, "cosine", info["rerank_factor"])
        assert [h.score for h in hits] == pytest.approx(exact[[h.row for h in hits]], rel=1e-6)  # padding adds nothing
        found += len({h.row for h in hits} & set(np.argsort(-exact)[:k]))
    assert found / (k * 20) >= 0.9


def test_auto_index_type_by_corpus_size():
    assert ann.resolve_index_type("auto", ann.FLAT_BELOW - 1, 10**6) == "flat"  # too few to train lists
    flat_max = ann.FLAT_UP_TO_BYTES // (4 * 512)
    assert ann.resolve_index_type("auto", flat_max, 512) == "flat"
    assert ann.resolve_index_type("auto", flat_max + 1, 512) == ann.COMPRESSED_TYPE == "ivf-pq"
    assert ann.resolve_index_type("ivf", 10, 512) == "ivf-flat"
    assert ann.resolve_index_type("flat", 10**9, 512) == "flat"
    with pytest.raises(ValueError, match="index_type"):
        ann.resolve_index_type("hnsw", 10, 512)
    assert [ann.padded_dim("ivf-pq", d) for d in (512, 4073, 7)] == [512, 4080, 8]
    assert ann.padded_dim("ivf-flat", 4073) == 4073


def test_vector_file_reads_blocks_and_rows_like_numpy(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 24)).astype(np.float32)
    np.save(tmp_path / "v.npy", x)
    vf = store.VectorFile(tmp_path / "v.npy")
    assert vf.shape == (1000, 24)
    assert np.array_equal(np.concatenate([b for _, b in vf.blocks(300)]), x)
    rows = np.array([0, 299, 300, 301, 999])
    assert np.array_equal(vf.rows(rows, 300), x[rows])


# -- resume after SIGKILL ----------------------------------------------------------------------------

def test_killed_build_resumes_to_the_identical_index(tmp_path, gpt2_dir):
    """SIGKILL the indexer at several points (early, mid-pass, after the gradient pass); rerunning
    the same command continues from the last complete shard and ends with exactly the index an
    uninterrupted build makes. The high-fidelity vectors are written with the shards, so each kill
    also stops them mid-way: their int4 codes, per-row scales and norms resume to the same bytes."""
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(240, seed=21))
    # the high-fidelity stage is fitted in the pass from the first 4 shards: kill 1 stops it mid-sample
    args = ["--shard-size", "16", "--batch-size", "4", "--preconditioner", "kfac", "--high-sample", "64",
            "--high-storage", "int4", "--no-progress"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = lambda out: [sys.executable, "-m", "indexer", "build", "--model", gpt2_dir, "--data", data, "--out", str(out), *args]
    reference = tmp_path / "reference"
    subprocess.run(cmd(reference), check=True, env=env, capture_output=True)

    out = tmp_path / "resumed"
    building = tmp_path / ".resumed.building"
    high_rows = lambda: json.loads((building / "high-progress.json").read_text())["rows"] \
        if (building / "high-progress.json").is_file() else -1
    kills = []
    for wait_for in (1, 6, 14):  # shards checkpointed before the kill
        proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while proc.poll() is None and checkpointed_shards(building) < wait_for:
                time.sleep(0.005)
        finally:
            stop(proc, grace_s=0)  # SIGKILL
        assert not out.exists(), "the build finished before it could be killed"
        kills.append(checkpointed_shards(building))
        if 16 * kills[-1] <= 64:  # the sample's rows come once it is fitted
            assert max(high_rows(), 0) in (0, 64)
        else:
            assert 16 * kills[-1] <= high_rows() <= 16 * (kills[-1] + 1)  # as far as the shards, or one ahead
    assert kills == sorted(kills) and kills[0] >= 1  # each run went on from where the last stopped
    done = subprocess.run(cmd(out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not building.exists() and leftovers(tmp_path) == []

    ref, got = Index.open(reference), Index.open(out)
    assert got.manifest.build.resumed_at_document == 16 * kills[-1]
    assert np.array_equal(np.asarray(ref.vectors), np.asarray(got.vectors))
    assert got.manifest.high.storage == "int4" and got.high_store.codes.dtype == np.uint8
    for name in store.HIGH_FILES:  # codes, scales, norms
        assert (reference / name).read_bytes() == (out / name).read_bytes(), name
    assert table_rows(reference) == table_rows(out)
    q = np.asarray(ref.vectors[:20])
    for mode in ("influence", "cosine"):
        probe = ann.unit_rows(q) if mode == "cosine" else q
        assert np.array_equal(ref.faiss[mode].search(probe, 10)[1], got.faiss[mode].search(probe, 10)[1])


def test_failure_after_the_gradient_pass_resumes_to_the_identical_index(tmp_path, gpt2_dir, monkeypatch):
    """A build that fails once every shard and high-fidelity vector is written (here in the
    preconditioning pass) resumes from the complete gradient pass to the uninterrupted build's index."""
    from indexer import build as build_module
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(40, seed=5))
    cfg = lambda out: BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / out), shard_size=16, progress=False)
    reference = Index.open(tmp_path / "ref") if build_index(cfg("ref")) else None
    real = build_module._write_vectors
    monkeypatch.setattr(build_module, "_write_vectors", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        build_index(cfg("idx"))
    assert (tmp_path / ".idx.building" / "high.npy").is_file() and not (tmp_path / "idx").exists()
    monkeypatch.setattr(build_module, "_write_vectors", real)
    manifest = build_index(cfg("idx"))
    assert manifest.build.resumed_at_document == 40
    got = Index.open(tmp_path / "idx")
    assert np.array_equal(np.asarray(reference.vectors), np.asarray(got.vectors))
    for name in store.HIGH_FILES:
        assert (reference.root / name).read_bytes() == (got.root / name).read_bytes(), name
    assert leftovers(tmp_path) == []


def test_changed_data_starts_afresh_instead_of_resuming(tmp_path, gpt2_dir):
    first = synthetic_corpus(40, seed=1)
    data = tmp_path / "d.jsonl"
    write_jsonl(data, first)
    cfg = BuildConfig(model=gpt2_dir, data=[str(data)], out=str(tmp_path / "idx"), shard_size=8, progress=False)
    # leave a partial build behind, as a kill would
    writer = store.IndexWriter(cfg.out, key="some other build")
    writer.add_shard([{"id": "stale", "text": "x", "prompt": "", "metadata": "{}", "source": "", "line": 1,
                       "n_tokens": 1, "truncated": False}], np.zeros((1, 3), np.float32), state={})
    writer.release()
    manifest = build_index(cfg)
    assert manifest.build.resumed_at_document == 0
    assert [r["id"] for r in table_rows(tmp_path / "idx")] == [d["id"] for d in first]


def test_two_builds_into_one_folder_refused(tmp_path, gpt2_dir):
    writer = store.IndexWriter(tmp_path / "idx")
    try:
        with pytest.raises(FileExistsError, match="another build"):
            store.IndexWriter(tmp_path / "idx")
    finally:
        writer.abort()


# -- append ------------------------------------------------------------------------------------------

def test_append_adds_documents_with_the_index_own_preconditioner(tmp_path, gpt2_dir, capsys):
    old_docs, new_docs = synthetic_corpus(60, seed=31), synthetic_corpus(90, seed=32)[60:]
    new_docs = [{**d, "id": f"new-{i}"} for i, d in enumerate(new_docs)]
    old = write_jsonl(tmp_path / "old.jsonl", old_docs)
    new = write_jsonl(tmp_path / "new.jsonl", new_docs)
    idx = tmp_path / "idx"
    assert run_cli(build_args(gpt2_dir, old, idx, "--preconditioner", "kfac", "--high-storage", "int8"), capsys)[0] == 0
    before = Index.open(idx)
    old_vectors, old_state = np.array(before.vectors), before.state
    _, old_codes, old_scales, old_norms = stored_high(idx)

    code, out, err = run_cli(["append", "--index", idx, "--data", new, "--no-progress", "--shard-size", "7"], capsys)
    assert code == 0, err
    assert "appended 30 documents" in out and leftovers(tmp_path) == []
    after = Index.open(idx)
    assert len(after) == 90 and after.manifest.n_documents == 90
    # old rows untouched; preconditioner not refitted, so old scores do not move
    assert np.array_equal(np.asarray(after.vectors[:60]), old_vectors)
    assert torch.equal(after.state["preconditioner"]["state"][after.manifest.layers[0].name]["qs"],
                       old_state["preconditioner"]["state"][after.manifest.layers[0].name]["qs"])
    assert [r["id"] for r in table_rows(idx)] == [d["id"] for d in old_docs + new_docs]
    # a new document's stored vector is its query vector under the index's own engine
    att = Attributor(idx)
    hits, _, _ = att.attribute("", new_docs[3]["text"], 1, "cosine", precision="fast")
    assert hits[0].row == 63 and hits[0].score == pytest.approx(1.0, abs=self_cosine_tolerance(idx, "fast"))
    assert all(att.attribute("", d["text"], 1, "cosine")[0][0].row == i for i, d in enumerate(old_docs + new_docs))
    # ... and its high-fidelity vector too, in the index's own storage (int8 here, not the default), the old
    # rows kept as they were stored
    hits, _, _ = att.attribute("", new_docs[3]["text"], 1, "cosine")
    assert hits[0].row == 63 and hits[0].stage == "high" and hits[0].score == pytest.approx(1.0, abs=2e-3)
    storage, codes, scales, norms = stored_high(idx)
    assert storage == after.manifest.high.storage == "int8" and len(codes) == len(scales) == len(norms) == 90
    assert np.array_equal(codes[:60], old_codes) and np.array_equal(scales[:60], old_scales)
    assert np.array_equal(norms[:60], old_norms)


def test_append_refuses_duplicate_ids_and_keeps_the_index(tmp_path, gpt2_dir, capsys):
    docs = synthetic_corpus(20, seed=41)
    idx = tmp_path / "idx"
    assert run_cli(build_args(gpt2_dir, write_jsonl(tmp_path / "a.jsonl", docs), idx), capsys)[0] == 0
    before = snapshot(idx)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "fresh", "text": "river stone"}, docs[5]])
    code, _, err = run_cli(["append", "--index", idx, "--data", dup, "--no-progress"], capsys)
    assert code != 0 and "duplicate id 'doc-5'" in err
    assert snapshot(idx) == before and leftovers(tmp_path) == []


def test_append_refuses_another_model(tmp_path, gpt2_dir, llama_dir, capsys):
    docs = synthetic_corpus(10, seed=42)
    idx = tmp_path / "idx"
    assert run_cli(build_args(gpt2_dir, write_jsonl(tmp_path / "a.jsonl", docs), idx), capsys)[0] == 0
    new = write_jsonl(tmp_path / "b.jsonl", [{"id": "x1", "text": "river stone cloud"}])
    code, _, err = run_cli(["append", "--index", idx, "--data", new, "--model", llama_dir, "--no-progress"], capsys)
    assert code != 0 and "is not the model that built" in err


def test_manifest_records_a_local_model_folder_absolutely(tmp_path, gpt2_dir, monkeypatch):
    from indexer.build import model_reference
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(6, seed=3))
    monkeypatch.chdir(Path(gpt2_dir).parent)
    manifest = build_index(BuildConfig(model=Path(gpt2_dir).name, data=[data], out=str(tmp_path / "idx"), progress=False))
    assert manifest.model.name_or_path == str(Path(gpt2_dir).resolve())
    monkeypatch.chdir(tmp_path)  # served from elsewhere, the recorded model still loads
    hits, _, _ = Attributor(tmp_path / "idx").attribute("", synthetic_corpus(6, seed=3)[2]["text"], 1, "cosine")
    assert hits[0].row == 2
    assert model_reference("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_build_from_a_folder_of_shards(tmp_path, gpt2_dir, capsys):
    docs = synthetic_corpus(12, seed=5)
    (tmp_path / "data" / "2024").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "2024" / "b.jsonl", docs[6:])
    write_jsonl(tmp_path / "data" / "a.jsonl", docs[:6])
    code, _, err = run_cli(build_args(gpt2_dir, tmp_path / "data", tmp_path / "idx"), capsys)
    assert code == 0, err
    rows = table_rows(tmp_path / "idx")
    assert [r["id"] for r in rows] == [d["id"] for d in docs[6:] + docs[:6]]  # sorted paths: 2024/b.jsonl first
    assert {r["source"].rsplit("/", 1)[1] for r in rows[:6]} == {"b.jsonl"} and rows[6]["source"].endswith("a.jsonl")
    manifest = json.loads((tmp_path / "idx" / store.MANIFEST).read_text())
    assert [p.rsplit("/", 1)[1] for p in manifest["data"]["files"]] == ["b.jsonl", "a.jsonl"]


def test_append_reports_skipped_records_like_build(tmp_path, gpt2_dir, capsys):
    docs = synthetic_corpus(10, seed=8)
    old = write_jsonl(tmp_path / "old.jsonl", docs[:6])
    assert run_cli(build_args(gpt2_dir, old, tmp_path / "idx"), capsys)[0] == 0
    new = tmp_path / "new.jsonl"
    new.write_text("\n".join([json.dumps(docs[6]), "{broken", json.dumps(docs[7])]) + "\n")
    code, out, err = run_cli(["append", "--index", tmp_path / "idx", "--data", new, "--skip-bad", "--no-progress"], capsys)
    assert code == 0, err
    assert "appended 2 documents" in out and "skipped 1" in out
    assert "skipped:" in err and f"{new} line 2" in err
    assert Index.open(tmp_path / "idx").manifest.appends[-1].skipped == 1


def test_an_error_after_the_progress_bar_starts_on_its_own_line(tmp_path, gpt2_dir):
    docs = synthetic_corpus(40, seed=9)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([json.dumps(d) for d in docs[:30]] + ["{broken"] + [json.dumps(d) for d in docs[30:]]) + "\n")
    r = subprocess.run([sys.executable, "-m", "indexer", "build", "--model", gpt2_dir, "--data", str(data), "--out",
                        str(tmp_path / "idx"), "--shard-size", "8", "--batch-size", "4"],
                       capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "gradients" in r.stderr  # the bar was drawn
    error = r.stderr[r.stderr.index("error:"):]
    assert r.stderr[r.stderr.index("error:") - 1] == "\n" and "line 31" in error.splitlines()[0]


def test_build_from_a_saved_dataset(tmp_path, gpt2_dir, capsys):
    datasets = pytest.importorskip("datasets")
    docs = synthetic_corpus(8, seed=12)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(docs)}).save_to_disk(tmp_path / "ds")
    code, _, err = run_cli(build_args(gpt2_dir, f"{tmp_path / 'ds'}@train", tmp_path / "idx"), capsys)
    assert code == 0, err
    rows = table_rows(tmp_path / "idx")
    assert [r["id"] for r in rows] == [d["id"] for d in docs]
    assert rows[3]["source"] == f"{tmp_path / 'ds'}@train" and rows[3]["line"] == 4
    code, _, err = run_cli(build_args(gpt2_dir, "hf://no-such-owner/no-such-data", tmp_path / "idx2"), capsys)
    assert code == 2 and "cannot load this dataset" in err and "Traceback" not in err
