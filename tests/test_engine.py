"""The engine against independent references: plain autograd per-example gradients, explicit
damped inverses, and batch/padding invariance."""
from __future__ import annotations

import pytest
import torch

from engine import (LoGra, LoGraConfig, Preconditioner, collate, encode, find_tracked_layers, load_model,
                    model_fingerprint, per_example_loss, projected_gradients, query_vectors, scored_positions,
                    sketch_matrix, token_texts, token_vectors)

from .support import autograd_gradient, fit_preconditioner, synthetic_corpus

PAIRS = [("", "river stone cloud lamp orbit signal"),
         ("garden copper winter", " engine paper violet harbor needle falcon marble"),
         ("thunder", " velvet"),
         ("", "lantern meadow cipher anchor quartz ember willow canyon socket prism tundra beacon")]


@pytest.fixture
def loaded(model_dir):
    return load_model(model_dir)


@pytest.mark.parametrize("head_sketch", [False, True])
def test_projected_gradient_equals_projection_of_autograd_gradient(loaded, head_sketch):
    model, tok = loaded
    logra = LoGra(model, LoGraConfig(rank=4, head_sketch=head_sketch))
    assert [logra.sketched(l.name) for l in logra.layers] == [head_sketch and l.name == logra.head_name for l in logra.layers]
    encoded = [encode(tok, p, r, 64) for p, r in PAIRS]
    out = projected_gradients(logra, tok, encoded)
    for i, enc in enumerate(encoded):
        for layer in logra.layers:
            p_in, p_out = logra.projection(layer.name)
            ref = p_out @ autograd_gradient(model, layer, enc, tok.pad_token_id) @ p_in.T
            torch.testing.assert_close(out.grads[layer.name][i], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    # no parameter gradient was ever created or requested
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_conv1d_and_linear_layers_are_found(gpt2_dir, llama_dir):
    gpt2, _ = load_model(gpt2_dir)
    names = [l.name for l in find_tracked_layers(gpt2)]
    assert names == [f"transformer.h.{b}.{m}" for b in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    layer = find_tracked_layers(gpt2)[0]
    assert (layer.in_features, layer.out_features) == (32, 96)  # Conv1D weight is (in, out)
    llama, _ = load_model(llama_dir)
    layers = find_tracked_layers(llama)
    assert len(layers) == 2 * 7 and not any("lm_head" in l.name or "embed" in l.name for l in layers)
    assert [l.name for l in find_tracked_layers(llama, include=r"mlp")] == [
        f"model.layers.{b}.mlp.{m}" for b in range(2) for m in ("gate_proj", "up_proj", "down_proj")]
    assert all("q_proj" not in l.name for l in find_tracked_layers(llama, exclude="q_proj"))
    assert any("lm_head" in l.name for l in find_tracked_layers(llama, include_embeddings=True))
    with pytest.raises(ValueError, match="no trackable layers"):
        find_tracked_layers(llama, include="no-such-layer")


def test_vector_does_not_depend_on_batch_or_padding(loaded):
    model, tok = loaded
    logra = LoGra(model, LoGraConfig(rank=4))
    encoded = [encode(tok, p, r, 64) for p, r in PAIRS]
    alone = [logra.flatten(projected_gradients(logra, tok, [e]).grads)[0] for e in encoded]
    together = logra.flatten(projected_gradients(logra, tok, encoded).grads)
    reversed_ = logra.flatten(projected_gradients(logra, tok, encoded[::-1]).grads).flip(0)
    for i in range(len(encoded)):
        scale = alone[i].abs().max().item()
        torch.testing.assert_close(together[i], alone[i], rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(reversed_[i], alone[i], rtol=1e-4, atol=1e-5 * scale)


def test_prompt_tokens_enter_only_as_context(loaded):
    model, tok = loaded
    logra = LoGra(model, LoGraConfig(rank=4))
    prompt, response = "garden copper winter", " engine paper violet harbor"
    enc = encode(tok, prompt, response, 64)
    n_prompt = len(tok(prompt)["input_ids"])
    assert enc.loss_start == n_prompt and enc.n_loss_tokens == len(enc.input_ids) - n_prompt
    batch = collate([enc], tok.pad_token_id)
    assert (batch["labels"][0, :n_prompt] == -100).all() and (batch["labels"][0, n_prompt:] >= 0).all()
    # the loss is the response tokens' loss: equal to the full-sequence loss minus the prompt part
    logits = model(input_ids=batch["input_ids"]).logits
    full = torch.nn.functional.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:], reduction="none")
    torch.testing.assert_close(per_example_loss(logits, batch["labels"])[0], full[n_prompt - 1:].sum())
    # same response, different prompt: the context changes the gradient; no prompt at all too
    g = logra.flatten(projected_gradients(logra, tok, [enc]).grads)[0]
    g_other = logra.flatten(projected_gradients(logra, tok, [encode(tok, "quartz ember", response, 64)]).grads)[0]
    whole = logra.flatten(projected_gradients(logra, tok, [encode(tok, "", prompt + response, 64)]).grads)[0]
    assert not torch.allclose(g, g_other, rtol=1e-3)
    assert not torch.allclose(g, whole, rtol=1e-3)  # prompt tokens carry no loss of their own


@pytest.mark.parametrize("kind", ["none", "raw", "kfac", "ekfac"])
def test_influence_equals_explicit_damped_inverse(gpt2_dir, kind):
    model, tok = load_model(gpt2_dir)
    logra = LoGra(model, LoGraConfig(rank=3))
    docs = [("", d["text"]) for d in synthetic_corpus(40, seed=5)]
    pre, outs = fit_preconditioner(kind, logra, tok, docs)
    queries = [("river stone", " cloud lamp orbit"), ("", "winter engine paper")]
    v_q, _ = query_vectors(logra, pre, tok, queries)
    v_d = pre.apply(outs[0].grads)
    g_q = projected_gradients(logra, tok, [encode(tok, p, r, 64) for p, r in queries]).grads
    g_d = outs[0].grads
    expected = torch.zeros(len(queries), v_d.shape[0], dtype=torch.float64)
    for name in logra.shapes:  # block-diagonal over layers: sum of per-layer bilinear forms
        gq = g_q[name].reshape(len(queries), -1).double()
        gd = g_d[name].reshape(v_d.shape[0], -1).double()
        if kind == "none":
            H_inv = torch.eye(gq.shape[1], dtype=torch.float64)
        else:
            all_g = torch.cat([o.grads[name].reshape(o.grads[name].shape[0], -1) for o in outs]).double()
            n = all_g.shape[0]
            if kind == "raw":
                H = all_g.T @ all_g / n
            else:
                A = sum(o.token_stats[name][0].double() for o in outs) / sum(o.token_stats[name][2] for o in outs)
                S = sum(o.token_stats[name][1].double() for o in outs) / n
                H = torch.kron(S, A)
                if kind == "ekfac":  # same eigenbasis, eigenvalues = gradient second moments in it
                    Q = torch.kron(torch.linalg.eigh(S)[1], torch.linalg.eigh(A)[1])
                    H = Q @ torch.diag(((all_g @ Q) ** 2).mean(0)) @ Q.T
            lam = 0.1 * torch.linalg.eigvalsh(H).clamp_min(0).mean()
            H_inv = torch.linalg.inv(H + lam * torch.eye(H.shape[0], dtype=torch.float64))
        expected += gq @ H_inv @ gd.T
    got = (v_q.double() @ v_d.double().T)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


def test_projections_are_seeded_by_seed_and_layer(gpt2_dir):
    model, _ = load_model(gpt2_dir)
    a, b, c = (LoGra(model, LoGraConfig(rank=4, seed=s)) for s in (0, 0, 1))
    name = a.layers[0].name
    assert torch.equal(a.projections[name][0], b.projections[name][0])
    assert not torch.equal(a.projections[name][0], c.projections[name][0])
    assert not torch.equal(a.projections[name][0][:, :32], a.projections[a.layers[4].name][0][:, :32])


@pytest.mark.parametrize("rank,dim", [(384, 4096), (7, 100), (16, 16)])
def test_a_sketch_has_one_sign_per_column_and_balanced_rows(rank, dim):
    a, b = sketch_matrix(0, "lm_head", "out", rank, dim), sketch_matrix(0, "lm_head", "out", rank, dim)
    assert torch.equal(a, b) and not torch.equal(a, sketch_matrix(1, "lm_head", "out", rank, dim))
    assert torch.equal((a != 0).sum(dim=0), torch.ones(dim, dtype=torch.long))
    assert set(a[a != 0].tolist()) <= {-1.0, 1.0}
    per_row = (a != 0).sum(dim=1)
    assert int(per_row.max() - per_row.min()) <= 1 and int(per_row.sum()) == dim
    # inner products kept on average over seeds (CountSketch is unbiased): a fixed pair of vectors
    x, y = torch.randn(2, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est = torch.tensor([float((s @ x) @ (s @ y)) for s in
                        (sketch_matrix(seed, "l", "out", rank, dim).double() for seed in range(400))], dtype=torch.float64)
    assert abs(float(est.mean()) - float(x @ y)) <= 4 * float(est.std()) / 20 + 1e-9  # exact when rank = dim: a signed permutation


def test_fingerprint_identifies_weights(gpt2_dir):
    m1, _ = load_model(gpt2_dir)
    m2, _ = load_model(gpt2_dir)
    m3, _ = load_model(gpt2_dir, dtype="bfloat16")
    assert model_fingerprint(m1) == model_fingerprint(m2) == model_fingerprint(m3)
    with torch.no_grad():
        m2.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    assert model_fingerprint(m1) != model_fingerprint(m2)


def test_truncation_keeps_response_head_and_prompt_tail(loaded):
    _, tok = loaded
    prompt, response = "river " * 40, "stone " * 40
    enc = encode(tok, prompt, response, 32)
    assert len(enc.input_ids) == 32 and enc.truncated and enc.n_tokens_before_truncation > 32
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[enc.loss_start:] == r_ids[: 32 - enc.loss_start]
    assert enc.loss_start == 16


@pytest.mark.parametrize("prompt,response", [("", "river stone cloud lamp orbit signal garden"),
                                             ("garden copper winter", " engine paper violet harbor needle")])
def test_token_vectors_sum_to_query_and_match_single_token_losses(loaded, prompt, response):
    model, tok = loaded
    logra = LoGra(model, LoGraConfig(rank=3))
    docs = [("", d) for d in ("quartz ember willow canyon socket", "falcon marble thunder velvet lantern meadow",
                              "cobalt raven saddle nickel ledger beacon", "tundra prism socket canyon willow")] * 3
    pre, outs = fit_preconditioner("raw", logra, tok, docs)
    v_d = pre.apply(outs[0].grads).double()  # a few document vectors
    tv = token_vectors(logra, pre, tok, prompt, response, batch_size=3)  # several batches
    enc = encode(tok, prompt, response, logra.max_tokens)
    assert tv.encoded == enc and not tv.truncated
    assert tv.positions == list(scored_positions(enc)) and len(tv.positions) == enc.n_loss_tokens >= 4
    v_q, _ = query_vectors(logra, pre, tok, [(prompt, response)])
    torch.testing.assert_close(tv.query, v_q[0], rtol=1e-4, atol=1e-5 * v_q.abs().max().item())
    # influence: per-token contributions sum to the document's score
    contrib = tv.tokens.double() @ v_d.T  # (tokens, docs)
    score = v_q[0].double() @ v_d.T
    torch.testing.assert_close(contrib.sum(0), score, rtol=1e-4, atol=1e-5 * score.abs().max().item())
    assert len({round(c, 6) for c in contrib[:, 0].tolist()}) > 1  # tokens differ
    # each equals a direct computation: plain autograd through a one-token label mask
    n = len(tv.positions)
    for i in sorted({0, 1, n // 2, n - 1}):
        j = tv.positions[i]
        batch = collate([enc], tok.pad_token_id)
        labels = torch.full_like(batch["labels"], -100)
        labels[0, j] = batch["input_ids"][0, j]
        g = {}
        for layer in logra.layers:
            p_in, p_out = logra.projection(layer.name)
            g[layer.name] = (p_out @ autograd_gradient(model, layer, enc, tok.pad_token_id, labels) @ p_in.T)[None]
        direct = pre.apply(g)[0]
        torch.testing.assert_close(tv.tokens[i], direct, rtol=1e-3, atol=1e-4 * direct.abs().max().item())


def test_token_vectors_cap_and_collate_label_positions(loaded):
    model, tok = loaded
    logra = LoGra(model, LoGraConfig(rank=3))
    pre = Preconditioner("none", logra.shapes).finalize()
    response = "lantern meadow cipher anchor quartz ember willow canyon"
    full = token_vectors(logra, pre, tok, "", response)
    capped = token_vectors(logra, pre, tok, "", response, max_tokens_scored=3)
    assert capped.truncated and capped.positions == full.positions[:3] and capped.tokens.shape[0] == 3
    torch.testing.assert_close(capped.tokens, full.tokens[:3], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(capped.query, full.query, rtol=1e-4, atol=1e-6)  # still the whole response
    enc = encode(tok, "", response, 64)
    b = collate([enc, enc, enc], tok.pad_token_id, label_positions=[None, [2], []])
    assert torch.equal(b["labels"][0], collate([enc], tok.pad_token_id)["labels"][0])
    assert (b["labels"][1] != -100).nonzero().flatten().tolist() == [2] and (b["labels"][2] == -100).all()
    with pytest.raises(ValueError):
        collate([enc], tok.pad_token_id, label_positions=[[len(enc.input_ids)]])
    # the pieces concatenate to the text
    ids = tok(response, add_special_tokens=False)["input_ids"]
    assert "".join(token_texts(tok, ids)) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    snow = tok("caf\u00e9 \u2603 na\u00efve", add_special_tokens=False)["input_ids"]  # multi-byte characters
    assert "".join(token_texts(tok, snow)) == "caf\u00e9 \u2603 na\u00efve"
