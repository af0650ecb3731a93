"""The build fits the high-fidelity stage inside its gradient pass (below); a build resumed from an
older partial build, or one of several processes, fits it the high-fidelity stage's EK-FAC with one model pass over its sample (the
eigenvalue pass reads the stored sample gradients back): the same preconditioner as the engine's
two-pass fit, which recomputes them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LoGra, LoGraConfig, Preconditioner, collate, encode, fit_preconditioner, load_model, pair_vectors
from indexer import BuildConfig, Index, build_index
from indexer.build import fit_sample
from indexer.info import summary as info_text

from .support import synthetic_corpus, write_jsonl


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


def test_rows_rotated_once_equal_rows_rotated_twice(model_dir):
    """The in-pass fit rotates its sample into the eigenbasis once, for the eigenvalues and then the
    stored rows (Preconditioner.rotate, rotated=True): the same numbers as rotating for each."""
    model, tok = load_model(model_dir)
    logra = LoGra(model, LoGraConfig(budget=2048, head_share=0.75))
    enc = [encode(tok, "", d["text"], 32) for d in synthetic_corpus(24, seed=5)]
    grads = [logra.flatten(logra.gradients(collate(enc[i : i + 8], tok.pad_token_id), token_stats=True).grads)
             for i in range(0, 24, 8)]
    fits = []
    for once in (False, True):
        pre = Preconditioner("ekfac", logra.shapes, damping_ratio=0.01)
        for i in range(0, 24, 8):
            out = logra.gradients(collate(enc[i : i + 8], tok.pad_token_id), token_stats=True)
            pre.update(out.grads, out.token_stats)
        rows = [pre.rotate(g) if once else g for g in grads]
        for r in rows:
            pre.update_second(r, dtype=torch.float32, rotated=once)
        pre.finalize()
        fits.append(torch.cat([pre.apply(r, eigenbasis=True, dtype=torch.float32, rotated=once) for r in rows]))
    torch.testing.assert_close(fits[1], fits[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="only scaled"):
        pre.apply(grads[0], rotated=True)  # not in the eigenbasis: no rotation back from rotated rows


@pytest.mark.parametrize("head_sketch", [False, True])
def test_the_folded_stage_gives_the_stages_rows(model_dir, head_sketch):
    """After the sample, documents' rows come from the stage with its eigenbasis folded into the
    projections (HighStage.folded): the rows of rotating each document's gradient, to float rounding.
    A sketched head keeps its sketch (its output side rotated per document instead)."""
    from indexer.build import HighStage
    model, tok = load_model(model_dir)
    logra = LoGra(model, LoGraConfig(budget=2048, head_share=0.75, head_sketch=head_sketch))
    enc = [encode(tok, "", d["text"], 32) for d in synthetic_corpus(24, seed=7)]
    pre = fit_preconditioner(logra, Preconditioner("ekfac", logra.shapes, damping_ratio=0.01), tok,
                             [enc[i : i + 8] for i in range(0, 16, 8)])
    stage = HighStage(logra, pre, {}, 16, 0.01, 0.0, "float16")
    folded = stage.folded()
    assert folded is stage.folded() and folded.logra is not logra
    assert folded.logra.sketched(logra.head_name) == head_sketch
    batch = collate(enc[16:], tok.pad_token_id)
    want = stage.vectors(logra.gradients(batch).grads)
    got = folded.vectors(folded.logra.gradients(batch).grads)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("high_sample,projection", [(16, "gaussian"), (100, "gaussian"), (16, "sketch")])
def test_a_build_fits_the_high_stage_inside_its_gradient_pass(tmp_path, gpt2_dir, monkeypatch, high_sample, projection):
    """One model pass: the stage is fitted from the gradient pass's own first shards (no separate
    fit pass, no pass of its own for the vectors), and the stored rows equal the engine's two-pass
    fit on those documents applied to every document."""
    from indexer import build as build_module
    monkeypatch.setattr(build_module, "fit_sample", lambda *a, **k: pytest.fail("a model pass of the high stage's own"))
    docs = synthetic_corpus(40, seed=11)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    build_index(BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / "idx"), shard_size=8, batch_size=3,
                            high_budget=2048, high_sample=high_sample, high_storage="float16", progress=False,
                            high_head_projection=projection))
    index = Index.open(tmp_path / "idx")
    n_sample = min(high_sample, 40)
    assert index.manifest.high.sample_documents == n_sample
    assert index.manifest.high.head_projection == projection
    assert ("vocabulary side sketched" in info_text(tmp_path / "idx")) == (projection == "sketch")

    model, tok = load_model(gpt2_dir)
    # the high stage's projector as the build configures it (its own layers: the depth rule spreads 2,048 alone)
    cfg = BuildConfig(model=gpt2_dir, data=[], out="", high_budget=2048, high_head_projection=projection)
    logra = LoGra(model, cfg.high_config(cfg.logra_config()))
    assert [(l.name, l.r_out, l.r_in) for l in index.manifest.high.layers] == [
        (l["name"], l["r_out"], l["r_in"]) for l in logra.layer_spec()]
    enc = [encode(tok, "", d["text"], 512) for d in docs]
    pre = fit_preconditioner(logra, Preconditioner("ekfac", logra.shapes, damping_ratio=0.01), tok,
                             [enc[i : min(i + 5, n_sample)] for i in range(0, n_sample, 5)])
    want = pair_vectors(logra, pre, tok, [("", d["text"]) for d in docs], batch_size=7, eigenbasis=True).double().numpy()
    norms = np.linalg.norm(want, axis=1)
    np.testing.assert_allclose(index.high_norms, norms, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(index.high_rows(range(40)), np.float64), want / norms[:, None], atol=2e-3)
    assert not list(tmp_path.glob("**/high-sample*.f32"))  # the raw and the rotated scratch rows


def test_sample_rows_kept_in_memory_equal_those_from_the_scratch_file_and_survive_a_failure(tmp_path, gpt2_dir, monkeypatch):
    """HighSampler.finish keeps the rotated sample in memory when it fits (ROTATED_IN_MEMORY_BYTES),
    else writes it to a second scratch file: the same stored bytes. A build failing while the kept rows
    are written (the fitted state already saved) resumes from the raw scratch rows to the same bytes."""
    from indexer import build as build_module
    from indexer import store
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(40, seed=13))
    cfg = lambda out: BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / out), shard_size=8, batch_size=3,
                                  high_budget=2048, high_sample=100, progress=False)
    monkeypatch.setattr(build_module, "SAMPLE_BLOCK_BYTES", 4 * 2048 * 8)  # 8 rows a block: 5 blocks
    build_index(cfg("memory"))
    monkeypatch.setattr(build_module, "ROTATED_IN_MEMORY_BYTES", 0)
    build_index(cfg("file"))
    monkeypatch.undo()
    monkeypatch.setattr(build_module, "SAMPLE_BLOCK_BYTES", 4 * 2048 * 8)
    real, calls = store.HighVectorWriter.checkpoint, []

    def failing(self):
        calls.append(self.rows)
        if len(calls) == 2:  # after the first kept block
            raise OSError("disk full")
        real(self)
    monkeypatch.setattr(store.HighVectorWriter, "checkpoint", failing)
    with pytest.raises(OSError, match="disk full"):
        build_index(cfg("resumed"))
    assert calls == [8, 16] and list(tmp_path.glob(".resumed*/**/high-sample.f32"))  # the raw rows stay
    monkeypatch.setattr(store.HighVectorWriter, "checkpoint", real)
    build_index(cfg("resumed"))
    for other in ("file", "resumed"):
        for name in store.HIGH_FILES:
            assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / other / name).read_bytes(), (other, name)
    assert not list(tmp_path.glob("**/high-sample*.f32"))
