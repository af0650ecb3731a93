"""Where the compact vectors' dimensions go (engine.budget), sides kept whole, and the high-fidelity
stage's preconditioner against an independent full-gradient EK-FAC (benchmarks/quality/reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.quality.reference import EKFAC, full_gradients
from engine import LoGra, LoGraConfig, Preconditioner, allocate, collate, encode, find_tracked_layers, load_model, pair_vectors
from engine.budget import sides
from engine.layers import TrackedLayer

from .support import autograd_gradient, fit, synthetic_corpus


def _layer(name, i, o):
    return TrackedLayer(name, torch.nn.Identity(), i, o)


def test_allocation_spends_the_budget_and_gives_the_head_its_share():
    layers = [_layer(f"b{j}", 64, 256) for j in range(4)] + [_layer("head", 64, 2048)]
    shapes = allocate(layers, 2048, 0.5, "head")
    assert list(shapes) == [l.name for l in layers]
    assert shapes["head"] == (32, 32)  # 1024 dims, square
    assert all(shapes[f"b{j}"] == (16, 16) for j in range(4))  # 256 each
    assert sum(o * i for o, i in shapes.values()) <= 2048
    # a side narrower than sqrt(share) is kept whole and the other side takes the rest
    assert sides(_layer("x", 8, 4096), 1024) == (128, 8)
    assert sides(_layer("x", 4096, 8), 1024) == (8, 128)
    assert sides(_layer("x", 4, 4), 1024) == (4, 4)  # the whole layer: no more to spend
    only_head = allocate([_layer("head", 64, 2048)], 512, 0.5, "head")
    assert only_head == {"head": (23, 22)}  # 506 of 512
    no_head = allocate(layers[:4], 1024, 0.5, None)
    assert all(v == (16, 16) for v in no_head.values())
    with pytest.raises(ValueError):
        allocate(layers, 0, 0.5, "head")
    with pytest.raises(ValueError):
        allocate(layers, 100, 1.5, "head")


def test_default_config_tracks_the_head_within_the_budget(model_dir):
    model, _ = load_model(model_dir)
    logra = LoGra(model, LoGraConfig(budget=600, head_share=0.5))
    head = model.get_output_embeddings()
    assert logra.head_name is not None and next(l for l in logra.layers if l.name == logra.head_name).module is head
    assert logra.dim <= 600 and logra.shapes[logra.head_name][0] * logra.shapes[logra.head_name][1] <= 300
    assert [l.name for l in LoGra(model, LoGraConfig(rank=2, head=False)).layers] == [l.name for l in find_tracked_layers(model)]
    # the manifest's shapes rebuild the same layers and sizes
    again = LoGra(model, LoGraConfig(), shapes=logra.shapes)
    assert [l.name for l in again.layers] == [l.name for l in logra.layers] and again.shapes == logra.shapes


def test_a_side_kept_whole_is_the_exact_gradient(model_dir):
    """max_side past every side: no projection at all, the per-example gradient itself."""
    model, tok = load_model(model_dir)
    logra = LoGra(model, LoGraConfig(max_side=10**6))
    assert all(p is None for pair in logra.projections.values() for p in pair)
    enc = encode(tok, "garden copper", " engine paper violet harbor needle", 64)
    out = logra.gradients(collate([enc], tok.pad_token_id))
    for layer in logra.layers:
        ref = autograd_gradient(model, layer, enc, tok.pad_token_id)
        torch.testing.assert_close(out.grads[layer.name][0], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_high_stage_equals_full_gradient_ekfac(gpt2_dir):
    """Every side whole and ekfac: the engine's influence v_q . v_d is the independent full-gradient
    EK-FAC of benchmarks/quality/reference (per-document autograd, its own factors and eigenvalues),
    also in the eigenbasis coordinates the API's rescoring uses."""
    model, tok = load_model(gpt2_dir)
    texts = [d["text"] for d in synthetic_corpus(40, seed=3)]
    queries = ["river stone cloud lamp orbit", "winter engine paper violet"]
    logra = LoGra(model, LoGraConfig(max_side=10**6, head=False, max_tokens=64))
    pre = Preconditioner("ekfac", logra.shapes, damping_ratio=0.1)
    enc = [encode(tok, "", t, 64) for t in texts]
    fit(pre, [logra.gradients(collate(enc[i:i + 8], tok.pad_token_id), token_stats=True) for i in range(0, len(enc), 8)])
    for eigenbasis in (False, True):
        vd = pair_vectors(logra, pre, tok, [("", t) for t in texts], eigenbasis=eigenbasis).double().numpy()
        vq = pair_vectors(logra, pre, tok, [("", q) for q in queries], eigenbasis=eigenbasis).double().numpy()
        engine_scores = vq @ vd.T
        ref = full_gradients(model, tok, texts, 64, factors=True)
        ek = EKFAC(ref, damping_ratio=0.1)
        qg = full_gradients(model, tok, queries, 64)
        ref_scores = ek.precondition(qg.grads) @ ref.grads.astype(np.float64).T
        np.testing.assert_allclose(engine_scores, ref_scores, rtol=2e-3, atol=2e-3 * np.abs(ref_scores).max())


def test_whole_vocabulary_side_with_a_diagonal_factor_against_brute_force(llama_dir):
    """The high stage's LM head (head_whole): no projection, K-FAC's output factor taken diagonal
    (identity eigenbasis), EK-FAC eigenvalues in the input factor's eigenbasis. Checked against the
    same estimator computed by hand from autograd gradients and the head's captured inputs."""
    model, tok = load_model(llama_dir)
    cfg = LoGraConfig(max_side=4, head_whole=True, include="lm_head", max_tokens=64)
    logra = LoGra(model, cfg)
    (head,) = logra.layers
    assert logra.shapes[head.name] == (head.out_features, 4) and logra.diagonal_out == {head.name}
    texts = [d["text"] for d in synthetic_corpus(12, seed=4)]
    enc = [encode(tok, "", t, 64) for t in texts]
    pre = Preconditioner("ekfac", logra.shapes, damping_ratio=0.1, diagonal_out=logra.diagonal_out)
    outs = [logra.gradients(collate(enc[i:i + 4], tok.pad_token_id), token_stats=True) for i in range(0, 12, 4)]
    assert all(o.token_stats[head.name][1].shape == (head.out_features,) for o in outs)  # the diagonal only
    fit(pre, outs)
    engine = pair_vectors(logra, pre, tok, [("", t) for t in texts], eigenbasis=False).double()
    # by hand: inputs of the head projected by P_in, their covariance's eigenbasis, per-document gradients
    p_in, _ = logra.projection(head.name)
    xs = []
    hook = head.module.register_forward_hook(lambda m, i, o: xs.append(i[0].detach()[0].double() @ p_in.double().T))
    try:
        grads = [autograd_gradient(model, head, e, tok.pad_token_id).double() @ p_in.double().T for e in enc]
    finally:
        hook.remove()
    x = torch.cat(xs[: len(enc)])  # one forward per document: the first len(enc) captures
    _, qa = torch.linalg.eigh(x.T @ x / len(x))
    rot = torch.stack([g @ qa for g in grads])
    lam = (rot**2).mean(dim=0)
    v = (rot / (lam + 0.1 * lam.mean()).sqrt()) @ qa.T
    torch.testing.assert_close(engine, v.reshape(len(enc), -1), rtol=2e-3, atol=2e-3 * v.abs().max().item())


def test_head_only_starts_the_backward_at_the_head_and_gives_its_exact_gradient(model_dir):
    model, tok = load_model(model_dir)
    logra = LoGra(model, LoGraConfig(max_side=10**6, head_whole=True, head_only=True))
    assert logra.head_only and [l.module for l in logra.layers] == [model.get_output_embeddings()]
    enc = [encode(tok, "garden copper", " engine paper violet harbor needle", 64), encode(tok, "", "river stone cloud", 64)]
    out = logra.gradients(collate(enc, tok.pad_token_id))
    for i, e in enumerate(enc):
        ref = autograd_gradient(model, logra.layers[0], e, tok.pad_token_id)
        torch.testing.assert_close(out.grads[logra.head_name][i], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(out.losses, LoGra(model, LoGraConfig(rank=2)).gradients(collate(enc, tok.pad_token_id)).losses)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_folding_the_eigenbases_into_the_projections_keeps_every_vector(gpt2_dir, kind):
    import copy
    model, tok = load_model(gpt2_dir)
    logra = LoGra(model, LoGraConfig(max_side=16, head_whole=True, max_tokens=64))
    texts = [d["text"] for d in synthetic_corpus(24, seed=8)]
    enc = [encode(tok, "", t, 64) for t in texts]
    pre = Preconditioner(kind, logra.shapes, diagonal_out=logra.diagonal_out)
    fit(pre, [logra.gradients(collate(enc[i:i + 8], tok.pad_token_id), token_stats=True) for i in range(0, 24, 8)])
    folded = copy.copy(logra)
    folded.projections, fpre = pre.fold(logra.projections)
    pairs = [("", t) for t in texts[:6]] + [("river stone", " cloud lamp orbit")]
    want = pair_vectors(logra, pre, tok, pairs, eigenbasis=True)
    for eigenbasis in (True, False):  # a folded preconditioner has no basis left to rotate
        got = pair_vectors(folded, fpre, tok, pairs, eigenbasis=eigenbasis)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    head = logra.head_name
    assert folded.projections[head][1] is None  # the vocabulary side stays whole and unrotated (diagonal)
