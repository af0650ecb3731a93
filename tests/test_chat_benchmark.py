"""The real-model quality benchmark's ground-truth code (benchmarks/quality/chat.py), on a tiny chat
Llama: the full-gradient reference equals plain autograd's per-example gradients, every stage runs
end to end and writes what `run` reads, a brittleness row is the fine-tune it says it is, and the
brittleness summary is the arithmetic it states. The real model's own test skips without its package."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from benchmarks.quality import chat, data, train
from benchmarks.quality.specs import SPECS
from engine import collate, encode, find_tracked_layers, load_model, per_example_loss

from .support import synthetic_corpus


def _records(n_train: int, n_queries: int) -> list[dict]:
    docs = synthetic_corpus(n_train + n_queries, seed=7)
    return [{"id": d["id"], "messages": [{"role": "user", "content": " ".join(d["text"].split()[:3])},
                                         {"role": "assistant", "content": d["text"]}],
             "package": d["source"], "split": "train" if i < n_train else "query"} for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def tiny_gt(tmp_path_factory):
    gt = tmp_path_factory.mktemp("chat-gt")
    with (gt / "data.jsonl").open("w") as f:
        for r in _records(16, 4):
            f.write(json.dumps(r) + "\n")
    return gt


def test_full_dot_equals_per_example_autograd_gradients(chat_dir, tiny_gt):
    model, tok = load_model(chat_dir)
    assert not model.config.tie_word_embeddings  # so autograd's head gradient is its output use alone
    tr_rows, q_rows = data.load_rows(tiny_gt)
    tr, q = chat.pairs(tok, tr_rows[:6]), chat.pairs(tok, q_rows[:3])
    got = chat.full_dot_scores(model, tok, q, tr, batch=4)  # batches mix lengths: padding must not enter
    weights = [l.module.weight for l in find_tracked_layers(model, include_embeddings=True)]  # untied head

    def grad(pair):
        b = collate([encode(tok, *pair, 10**9)], tok.pad_token_id)
        for w in weights:
            w.requires_grad_(True)
        try:
            loss = per_example_loss(model(input_ids=b["input_ids"]).logits.float(), b["labels"])[0]
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)]).double()
        finally:
            for w in weights:
                w.requires_grad_(False)

    qg, dg = torch.stack([grad(p) for p in q]), torch.stack([grad(p) for p in tr])
    want = (qg @ dg.T).numpy()
    assert got.shape == (3, 6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_generate_writes_every_stage_and_a_brittleness_row_is_its_fine_tune(chat_dir, tiny_gt, monkeypatch):
    spec = dataclasses.replace(SPECS["smollm2-chat"], n_subsets=3, n_train=16, n_queries=4, finetune_epochs=1)
    monkeypatch.setattr(chat, "BRITTLE_QUERIES", 2)
    monkeypatch.setattr(chat, "BRITTLE_KS", (2, 3))
    monkeypatch.setattr(chat, "RANDOM_DRAWS", 2)
    monkeypatch.setattr(chat, "BRITTLE_SEEDS", 2)
    defaults = {"rank": None, "budget": 256, "head_share": 0.5, "head": True, "seed": 0, "include": None, "exclude": None,
                "max_tokens": 512, "preconditioner": "ekfac", "damping": 0.01, "high_budget": 1024,
                "high_head_share": 0.75, "high_preconditioner": "ekfac", "high_damping": 0.01, "high_sample": 8}
    (tiny_gt / "defaults.json").write_text(json.dumps(defaults))
    chat.generate(tiny_gt, spec, device="cpu", workers=1, base=chat_dir)

    lds = np.load(tiny_gt / "lds.npz")
    assert lds["masks"].shape == (3, 16) and (lds["masks"].sum(axis=1) == 8).all()
    assert lds["losses"].shape == (3, 2, 4) and np.isfinite(lds["losses"]).all()
    ref = chat.reference_scores(tiny_gt)
    for name in ("full-dot", "default fast", "default high", "bm25"):
        assert ref[name].shape == (4, 16), name
    meta = json.loads((tiny_gt / "meta.json").read_text())
    assert "mirror_error" not in meta["reference"]
    grid = chat.grid_scores(tiny_gt)  # every setting, each the engine stage with its change made
    assert set(grid) == set(chat.GRID) and all(v.shape == (4, 16) for v in grid.values())
    assert meta["grid"]["fast b4096 h0.9 ekfac d0.01"]["dim"] != meta["reference"]["default fast dim"]
    model, tok = load_model(chat_dir)
    want = chat.mirror_stage(model, tok, chat.pairs(tok, data.load_rows(tiny_gt)[1]), chat.pairs(tok, data.load_rows(tiny_gt)[0]),
                             {**defaults, "head_share": 0.9}, "fast")
    np.testing.assert_allclose(grid["fast b4096 h0.9 ekfac d0.01"], want["scores"], rtol=1e-5, atol=1e-6)

    b = np.load(tiny_gt / "brittle.npz")
    assert b["default_high_losses"].shape == (2, 2, 2)  # (queries, ks, seeds)
    assert b["random_losses"].shape == (2, 2, 2, 4)  # (ks, seeds, draws, queries)
    # Independently: query 1, k = 3, seed 1 of full-dot is the base fine-tuned on full-dot's top 3 for query 1.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(chat_dir)
    tr_rows, q_rows = data.load_rows(tiny_gt)
    tr, q = chat.pairs(tok, tr_rows), chat.pairs(tok, q_rows)
    top3 = np.argsort(-ref["full-dot"][1], kind="stable")[:3]
    assert list(b["full-dot_top"][1, :3]) == list(top3)
    keep = np.isin(np.arange(16), top3)
    want = train.retrain_many(chat_dir, tr, q, [(keep, 3001)], workers=1, progress=False,
                              recipe={**spec.recipe, "batch": chat.BRITTLE_BATCH})[0, 1]
    assert b["full-dot_losses"][1, 1, 1] == pytest.approx(want, rel=1e-6)

    sd = np.full(4, 0.5)
    res = chat.brittleness(tiny_gt, sd)
    assert set(res) == {"default high", "default fast", "full-dot", "bm25"}
    rand = b["random_losses"].mean(axis=2)  # (ks, seeds, queries)
    drop = np.mean([[rand[j, s, 0] - b["bm25_losses"][0, j, s] for s in range(2)] for j in range(2)])
    assert res["bm25"]["drop_nats"][0] == pytest.approx(drop)
    assert res["bm25"]["mean_se"][0] == pytest.approx(np.mean(res["bm25"]["drop_nats"]) / 0.5)


def test_the_real_models_cached_folder_is_its_gguf_de_quantized():
    """SmolLM2-135M-Instruct from its package: the benchmark's cached plain folder holds exactly the
    weights and chat template that loading the GGUF itself gives (tests/test_gguf.py checks that one)."""
    try:
        folder = chat.model_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load_model(str(folder))
    ref, ref_tok = load_model(str(chat.package_gguf()))
    assert len(find_tracked_layers(model, include_embeddings=True)) == 30 * 7 + 1 and len(tok) == 49152
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert tok.chat_template == ref_tok.chat_template and tok("a roux")["input_ids"] == ref_tok("a roux")["input_ids"]


def test_layer_groups_split_a_vector_by_the_layers_it_was_made_of():
    spec = ([{"name": f"model.layers.{b}.self_attn.q_proj", "r_out": 2, "r_in": 2} for b in range(6)]
            + [{"name": f"model.layers.{b}.mlp.up_proj", "r_out": 1, "r_in": 3} for b in range(6)]
            + [{"name": "lm_head", "r_out": 4, "r_in": 1}])
    g = chat.layer_groups(spec)
    assert {k: int(v.sum()) for k, v in g.items()} == {"head": 4, "attention": 24, "mlp": 18, "blocks": 42,
                                                       "blocks, first third": 14, "blocks, middle third": 14,
                                                       "blocks, last third": 14}
    assert (g["head"] ^ g["blocks"]).all() and g["head"][-4:].all() and not g["head"][:-4].any()
    assert (g["attention"][:24]).all() and (g["blocks, first third"][[0, 4, 24, 26]]).all()  # blocks 0 and 1
    rng = np.random.default_rng(0)
    q, d = rng.standard_normal((2, 46)), rng.standard_normal((3, 46))
    got = chat.group_scores(q, d, spec, "fast")
    head = got["fast head only cosine"]["scores"]
    want = (q[:, -4:] / np.linalg.norm(q[:, -4:], axis=1, keepdims=True)) @ (d[:, -4:] / np.linalg.norm(d[:, -4:], axis=1, keepdims=True)).T
    np.testing.assert_allclose(head, want)
