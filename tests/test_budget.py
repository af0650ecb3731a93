"""Where the compact vectors' dimensions go (engine.budget), sides kept whole, and the high-fidelity
stage's preconditioner against an independent full-gradient EK-FAC (benchmarks/quality/reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.quality.reference import EKFAC, full_gradients
from engine import LoGra, LoGraConfig, Preconditioner, allocate, collate, encode, find_tracked_layers, load_model, pair_vectors
from engine.budget import block_of, sides
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


def _stack(blocks: int, hidden: int, mlp: int, kv: int, vocab: int) -> tuple[list[TrackedLayer], str]:
    """A Llama-shaped stack's tracked layers (7 a block) and its head, without a model."""
    per_block = [("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", hidden, kv), ("self_attn.v_proj", hidden, kv),
                 ("self_attn.o_proj", hidden, hidden), ("mlp.gate_proj", hidden, mlp), ("mlp.up_proj", hidden, mlp),
                 ("mlp.down_proj", mlp, hidden)]
    layers = [_layer(f"model.layers.{b}.{n}", i, o) for b in range(blocks) for n, i, o in per_block]
    return layers + [_layer("lm_head", hidden, vocab)], "lm_head"


@pytest.mark.parametrize("stack", [(30, 576, 1536, 192, 49152), (32, 4096, 14336, 1024, 128256), (1, 64, 256, 32, 512)],
                         ids=["smollm2-135m", "llama-3-8b", "7-layer-toy"])
@pytest.mark.parametrize("budget, min_dims", [(4096, 16), (4096, 64), (65536, 256), (65536, 576), (4096, 5000)])
def test_no_block_layer_is_spread_thinner_than_the_minimum(stack, budget, min_dims):
    layers, head = _stack(*stack)
    shapes = allocate(layers, budget, 0.75, head, min_dims)
    even = allocate(layers, budget, 0.75, head)
    blocks = [n for n in shapes if n != head]
    assert sum(o * i for o, i in shapes.values()) <= budget
    if (budget - round(budget * 0.75)) >= min_dims * (len(layers) - 1):
        assert shapes == even  # enough for every block layer: the even spread, unchanged
        return
    # too few: the tracked block layers are the deepest whole blocks (or the last block's last layers),
    # each with its share of the blocks' part of the budget, never less than the minimum
    assert all(shapes[n][0] * shapes[n][1] >= min_dims for n in blocks)
    order = [l.name for l in layers[:-1]]
    assert blocks == order[len(order) - len(blocks):]  # a suffix of the stack, in its order
    rest = budget - round(budget * 0.75)
    assert len(blocks) == (min(len(order), rest // min_dims) // 7 * 7 or min(rest // min_dims, 7))
    if blocks:
        assert shapes[head] == even[head]
        assert all(shapes[n] == engine_sides(layers, n, rest / len(blocks)) for n in blocks)
    else:  # not one layer at the minimum: the head takes the whole budget
        assert shapes == allocate([layers[-1]], budget, 0.75, head)


def engine_sides(layers, name, dims):
    return sides(next(l for l in layers if l.name == name), dims)


def test_a_projector_tracks_only_the_layers_its_budget_keeps(model_dir):
    """The layers a rule leaves out are not hooked: the vector is the kept layers' projected gradients,
    each equal to the projection of the explicit per-example gradient."""
    model, tok = load_model(model_dir)
    full = LoGra(model, LoGraConfig(budget=4096, head_share=0.5))
    n_blocks = len({block_of(l.name) for l in full.layers if l.name != full.head_name})
    per_block = (len(full.layers) - 1) // n_blocks
    logra = LoGra(model, LoGraConfig(budget=4096, head_share=0.5, min_layer_dims=2048 // per_block))
    kept = [l.name for l in logra.layers]
    assert kept[-1] == logra.head_name and {block_of(n) for n in kept[:-1]} == {n_blocks - 1}
    assert logra.dim == sum(o * i for o, i in logra.shapes.values()) and list(logra.shapes) == kept
    enc = encode(tok, "garden copper", " engine paper violet harbor needle", 64)
    out = logra.gradients(collate([enc], tok.pad_token_id))
    assert set(out.grads) == set(kept)
    for layer in logra.layers:
        p_in, p_out = logra.projection(layer.name)
        ref = p_out @ autograd_gradient(model, layer, enc, tok.pad_token_id) @ p_in.T
        torch.testing.assert_close(out.grads[layer.name][0], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    # the backward pass starts at the last block's input: the earlier blocks are not differentiated
    depth, root = logra.backward_root()
    assert depth == n_blocks - 1 and root is not None
    first_block = next(m for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList))[0]
    reached = []
    hook = first_block.register_full_backward_hook(lambda *a: reached.append(1))
    try:
        logra.gradients(collate([enc], tok.pad_token_id))
        assert not reached
        full.gradients(collate([enc], tok.pad_token_id))  # every block tracked: the backward reaches block 0
        assert reached
    finally:
        hook.remove()
    # the manifest's shapes rebuild the same projector
    again = LoGra(model, LoGraConfig(), shapes=logra.shapes)
    assert [l.name for l in again.layers] == kept
