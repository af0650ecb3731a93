"""The build fits the high-fidelity stage's EK-FAC with one model pass over its sample (the
eigenvalue pass reads the stored sample gradients back): the same preconditioner as the engine's
two-pass fit, which recomputes them."""
from __future__ import annotations

import torch

from engine import LoGra, LoGraConfig, Preconditioner, collate, encode, fit_preconditioner, load_model
from indexer.build import fit_sample

from .support import synthetic_corpus


def test_one_pass_fit_equals_the_two_pass_fit(tmp_path, model_dir):
    model, tok = load_model(model_dir)
    logra = LoGra(model, LoGraConfig(budget=2048, head_share=0.75))
    enc = [encode(tok, "", d["text"], 32) for d in synthetic_corpus(40, seed=3)]
    batches = [enc[i : i + 6] for i in range(0, len(enc), 6)]
    two = fit_preconditioner(logra, Preconditioner("ekfac", logra.shapes, damping_ratio=0.01), tok, batches)
    scratch = tmp_path / "sample.f32"
    one = fit_sample(logra, Preconditioner("ekfac", logra.shapes, damping_ratio=0.01), tok, batches, scratch)
    assert not scratch.exists()
    probe = logra.gradients(collate(enc[:8], tok.pad_token_id)).grads
    for eigenbasis in (False, True):
        torch.testing.assert_close(one.apply(probe, eigenbasis=eigenbasis), two.apply(probe, eigenbasis=eigenbasis),
                                   rtol=1e-5, atol=1e-7)
    kfac = fit_sample(logra, Preconditioner("kfac", logra.shapes), tok, batches, scratch)  # no second pass: no file
    torch.testing.assert_close(kfac.apply(probe), fit_preconditioner(logra, Preconditioner("kfac", logra.shapes), tok,
                                                                     batches).apply(probe))
