"""One forward and backward pass for several projectors (the build's compact and high-fidelity
stages) gives each exactly what its own pass gives."""
from __future__ import annotations

import pytest
import torch

from engine import LoGra, LoGraConfig, collate, encode, joint_gradients, load_model

PAIRS = [("", "river stone cloud lamp orbit signal"), ("garden copper", " winter engine paper violet"),
         ("", "harbor needle falcon marble lantern meadow cipher anchor")]


def test_joint_gradients_equal_each_projectors_own(model_dir):
    model, tok = load_model(model_dir)
    small = LoGra(model, LoGraConfig(budget=256, seed=1))
    large = LoGra(model, LoGraConfig(budget=2048, head_share=0.75, seed=2), layers=small.layers)
    batch = collate([encode(tok, p, r, 64) for p, r in PAIRS], tok.pad_token_id)
    joint = joint_gradients([small, large], batch, [True, False])
    for logra, got, stats in zip((small, large), joint, (True, False)):
        alone = logra.gradients(batch, token_stats=stats)
        torch.testing.assert_close(logra.flatten(got.grads), logra.flatten(alone.grads), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.losses, alone.losses)
        assert got.token_stats.keys() == alone.token_stats.keys()
        for name, (xx, gg, n) in alone.token_stats.items():
            torch.testing.assert_close(got.token_stats[name][0], xx)
            torch.testing.assert_close(got.token_stats[name][1], gg)
            assert got.token_stats[name][2] == n
    assert not joint[1].token_stats  # only where asked
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_joint_gradients_refuse_projectors_of_different_models(model_dir):
    a, _ = load_model(model_dir)
    b, _ = load_model(model_dir)
    with pytest.raises(ValueError, match="one model"):
        joint_gradients([LoGra(a, LoGraConfig(rank=2)), LoGra(b, LoGraConfig(rank=2))], {}, [False, False])
