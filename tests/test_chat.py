"""Chat models: a tiny Llama whose tokenizer carries a chat template. Documents given as prompt/response
or as `messages` are encoded exactly as `apply_chat_template` tokenizes the conversation, only the
response's tokens carry the loss, the manifest records the format, and a query given as messages
scores the same as the same conversation given as prompt and response. Without a template, a
recorded separator joins prompt and response."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from api import create_app
from engine import TextFormat, collate, encode
from indexer.build import BuildConfig, build_index
from indexer.cli import main as cli_main
from indexer.store import Index

from .support import CHAT_TEMPLATE as TEMPLATE, self_cosine_tolerance, write_jsonl

CHATS = [
    [{"role": "user", "content": "river stone cloud"}, {"role": "assistant", "content": "lamp orbit signal garden"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copper winter"},
     {"role": "assistant", "content": "engine paper violet"}],
    [{"role": "user", "content": "falcon marble"}, {"role": "assistant", "content": "thunder"},
     {"role": "user", "content": "velvet lantern"}, {"role": "assistant", "content": "meadow cipher anchor quartz"}],
]


def test_encoding_equals_apply_chat_template_and_prompt_tokens_carry_no_loss(chat_dir):
    tok = AutoTokenizer.from_pretrained(chat_dir)
    fmt = TextFormat(tok.chat_template, "\n")
    fmt.check(tok)
    for chat in CHATS:
        prompt, response = fmt.messages(tok, chat)
        enc = encode(tok, prompt, response, 10**6)
        want = tok.apply_chat_template(chat, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert enc.input_ids == list(want)
        head = tok.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True)
        head = head["input_ids"] if hasattr(head, "keys") else head
        assert enc.loss_start == len(head)  # the scored tokens are the last turn's, end marker included
        labels = collate([enc], tok.pad_token_id)["labels"][0]
        assert (labels[: enc.loss_start] == -100).all() and (labels[enc.loss_start :] >= 0).all()
    # a pair is the two-turn chat
    assert fmt.pair(tok, "river stone cloud", "lamp orbit signal garden") == fmt.messages(tok, CHATS[0])


@pytest.fixture(scope="module")
def chat_index(tmp_path_factory, chat_dir):
    root = tmp_path_factory.mktemp("chat-index")
    records = [{"id": f"m{i}", "messages": chat, "source": "chat"} for i, chat in enumerate(CHATS)]
    records += [{"id": f"p{i}", "q": f"{w} harbor", "a": f" needle {w} beacon ledger", "source": "pairs"}
                for i, w in enumerate(["prism", "tundra", "nickel", "saddle", "raven", "cobalt", "ember", "willow"])]
    data = write_jsonl(root / "chat.jsonl", records)
    build_index(BuildConfig(model=chat_dir, data=[data], out=str(root / "index"), prompt_field="q", response_field="a",
                            progress=False))
    return root / "index"


def test_documents_are_stored_as_the_template_renders_them(chat_index, chat_dir):
    tok = AutoTokenizer.from_pretrained(chat_dir)
    idx = Index.open(chat_index)
    assert idx.manifest.text_format == {"chat_template": TEMPLATE, "separator": "\n"}
    docs = {d["id"]: d for d in idx.documents(list(range(len(idx))))}
    for i, chat in enumerate(CHATS):
        rendered = tok.apply_chat_template(chat, tokenize=False)
        head = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        assert docs[f"m{i}"]["text"] == rendered and docs[f"m{i}"]["prompt"] == head
        assert "messages" not in docs[f"m{i}"]["metadata"] and docs[f"m{i}"]["metadata"]["source"] == "chat"
    pair = tok.apply_chat_template([{"role": "user", "content": "prism harbor"},
                                    {"role": "assistant", "content": " needle prism beacon ledger"}], tokenize=False)
    assert docs["p0"]["text"] == pair


def test_a_query_as_messages_scores_as_the_same_pair_and_finds_its_own_conversation(chat_index):
    with TestClient(create_app(chat_index)) as c:
        for precision in ("fast", "high"):
            as_chat = c.post("/attribute", json={"messages": CHATS[0], "k": 5, "precision": precision}).json()
            as_pair = c.post("/attribute", json={"prompt": CHATS[0][0]["content"], "response": CHATS[0][1]["content"],
                                                 "k": 5, "precision": precision}).json()
            assert [r["id"] for r in as_chat["results"]] == [r["id"] for r in as_pair["results"]]
            assert [r["score"] for r in as_chat["results"]] == pytest.approx([r["score"] for r in as_pair["results"]])
            assert as_chat["results"][0]["id"] == "m0" and \
                as_chat["results"][0]["score"] == pytest.approx(1.0, abs=self_cosine_tolerance(chat_index, precision))
            top = as_chat["results"][0]  # the page shows the context apart from the response
            assert top["prompt"] and top["text"].startswith(top["prompt"]) and top["text"][len(top["prompt"]):].startswith(
                CHATS[0][1]["content"])
        tokens = c.post("/attribute/tokens", json={"messages": CHATS[2], "id": "m2"}).json()
        assert "".join(t["text"] for t in tokens["tokens"]).startswith("meadow cipher anchor quartz")
        bad = c.post("/attribute", json={"messages": CHATS[0][:1]})
        assert bad.status_code == 422 and "assistant" in bad.text
        both = c.post("/attribute", json={"messages": CHATS[0], "response": "x y"})
        assert both.status_code == 422


def test_bulk_queries_as_messages(chat_index, tmp_path, capsys):
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": "c0", "messages": CHATS[0]}, {"id": "c1", "messages": CHATS[1]}])
    out = tmp_path / "hits.jsonl"
    code = cli_main(["attribute", "--index", str(chat_index), "--queries", queries, "--out", str(out), "--k", "1",
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["m0", "m1"]


def test_without_a_template_a_recorded_separator_joins_prompt_and_response(tmp_path, gpt2_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "q": "river stone", "a": "cloud lamp orbit"},
                                              {"id": "b", "messages": CHATS[1]},
                                              {"id": "c", "messages": [{"role": "user", "content": "x"}]}])
    code = cli_main(["build", "--model", gpt2_dir, "--data", data, "--out", str(tmp_path / "idx"), "--prompt-field", "q",
                     "--response-field", "a", "--separator", " || ", "--skip-bad", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    idx = Index.open(tmp_path / "idx")
    assert idx.manifest.text_format == {"chat_template": None, "separator": " || "}
    docs = {d["id"]: d for d in idx.documents(list(range(len(idx))))}
    assert docs["a"]["text"] == "river stone || cloud lamp orbit" and docs["a"]["prompt"] == "river stone || "
    assert docs["b"]["text"] == "be brief || copper winter || engine paper violet"
    assert idx.manifest.stats.skipped == 1 and "assistant" in idx.manifest.stats.skipped_examples[0]
