"""The demo's corpus (stdlib docstrings), tokenizer and tiny GPT-2 trainer."""

import sysconfig
from pathlib import Path

import pytest

from indexer.demo_corpus import stdlib_docstrings, train_tiny_gpt2, train_tokenizer

FIELDS = {"id", "text", "module", "qualname", "kind", "file", "line"}
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def docs():
    return stdlib_docstrings()


def _source_line(record) -> str:
    lines = (STDLIB / record["file"]).read_text(encoding="utf-8").splitlines()
    return lines[record["line"] - 1]


def test_records_have_fields_and_unique_ids(docs):
    assert len(docs) > 1000
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        assert set(d) == FIELDS
        assert d["kind"] in {"module", "class", "function"}
        assert len(d["text"]) >= 40 and d["text"] == d["text"].strip()
        expected_id = f'{d["module"]}:{d["qualname"]}' if d["qualname"] else d["module"]
        assert d["id"] == expected_id
        assert (d["kind"] == "module") == (d["qualname"] == "")
        parts = Path(d["file"]).parts
        assert d["file"].endswith(".py") and not {"site-packages", "test", "tests",
                                                   "idlelib", "lib2to3", "turtledemo"} & set(parts)
    # Sorted by file, then source order within a file.
    keys = [(d["file"], d["line"]) for d in docs]
    assert keys == sorted(keys)


def test_known_docstrings_with_lines(docs):
    by_id = {d["id"]: d for d in docs}
    dumps = by_id["json:dumps"]
    assert (dumps["module"], dumps["qualname"], dumps["kind"]) == ("json", "dumps", "function")
    assert dumps["file"] == "json/__init__.py"
    assert dumps["text"].startswith("Serialize ``obj`` to a JSON formatted ``str``.")
    assert _source_line(dumps).startswith("def dumps")

    method = by_id["json.decoder:JSONDecoder.decode"]
    assert (method["module"], method["qualname"], method["kind"]) == (
        "json.decoder", "JSONDecoder.decode", "function")
    assert _source_line(method).lstrip().startswith("def decode")

    cls = by_id["json.decoder:JSONDecoder"]
    assert cls["kind"] == "class" and _source_line(cls).startswith("class JSONDecoder")

    module = by_id["json"]
    assert (module["qualname"], module["kind"], module["line"]) == ("", "module", 1)
    # cleandoc removed the indentation of continuation lines.
    assert "\n    " not in dumps["text"].split("\n\n")[0]


def test_max_docs_is_deterministic_and_spread(docs):
    subset = stdlib_docstrings(max_docs=200)
    assert len(subset) == 200
    assert subset == stdlib_docstrings(max_docs=200)
    assert subset != docs[:200]
    position = {d["id"]: i for i, d in enumerate(docs)}
    indices = [position[d["id"]] for d in subset]
    assert indices == sorted(indices)  # a subset, kept in corpus order
    assert len({d["module"].split(".")[0] for d in subset}) >= 20
    assert indices[-1] > 0.9 * len(docs)  # reaches the end of the alphabet too
    assert stdlib_docstrings(max_docs=0) == []
    assert len(stdlib_docstrings(max_docs=10**9)) == len(docs)


def test_tokenizer_round_trip(docs, tmp_path):
    from transformers import AutoTokenizer

    texts = [d["text"] for d in docs[::max(1, len(docs) // 200)]][:200]
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=600)
    assert len(tok) == 600

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == "<|endoftext|>"
    assert loaded.eos_token_id == tok.eos_token_id
    for text in (texts[3], "naïve → λ: bytes never seen in training\n\ttab"):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
    # BPE merged something: fewer tokens than bytes.
    assert len(loaded(texts[3])["input_ids"]) < len(texts[3].encode()) / 2


def test_tiny_training_lowers_loss_and_reloads(docs, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    texts = [d["text"] for d in docs[::max(1, len(docs) // 96)]][:96]
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=400)

    # Catch the trained model as it is saved, to compare it with what reloads.
    saved = []
    original_save = GPT2LMHeadModel.save_pretrained

    def capture(self, *args, **kwargs):
        saved.append(self)
        return original_save(self, *args, **kwargs)

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", capture)
    out = tmp_path / "model"
    figures = train_tiny_gpt2(texts, tok, out, n_layer=1, n_embd=32, n_head=2, max_tokens=32,
                              epochs=1, batch_size=8, lr=1e-2, progress=False)
    assert set(figures) == {"steps", "seconds", "first_loss", "final_loss", "tokens"}
    assert figures["steps"] == 12
    assert 0 < figures["tokens"] <= 96 * 32
    assert figures["final_loss"] < figures["first_loss"] - 0.5

    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    loaded_tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").exists()
    assert model.config.n_positions == 32 and model.config.vocab_size == len(tok)
    assert loaded_tok.model_max_length == 32
    assert tok.model_max_length > 32  # the caller's tokenizer is not modified

    batch = loaded_tok(texts[:2], return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        expected = saved[0](**batch).logits
        got = model(**batch).logits
    assert torch.equal(expected, got)
