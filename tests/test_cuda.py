"""The CUDA path, against the CPU path as the reference: skipped without a CUDA device (run by
benchmarks/gpu_check.sh on a GPU machine)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LoGra, LoGraConfig, encode, load_model, projected_gradients
from indexer.build import BuildConfig, build_index
from indexer.store import Index

from .support import synthetic_corpus, write_jsonl

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_projected_gradients_on_cuda_equal_the_cpus(gpt2_dir):
    texts = [d["text"] for d in synthetic_corpus(6, seed=4)]
    out = {}
    for device in ("cpu", "cuda"):
        model, tok = load_model(gpt2_dir, device=device)
        logra = LoGra(model, LoGraConfig(budget=512, max_tokens=64))
        grads = projected_gradients(logra, tok, [encode(tok, "", t, 64) for t in texts]).grads
        out[device] = logra.flatten(grads).float().cpu().numpy()
    np.testing.assert_allclose(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-4 * np.abs(out["cpu"]).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_index_built_on_cuda_finds_each_document_itself(tmp_path, gpt2_dir, dtype):
    docs = synthetic_corpus(30, seed=6)
    data = write_jsonl(tmp_path / "d.jsonl", docs)
    build_index(BuildConfig(model=gpt2_dir, data=[data], out=str(tmp_path / "idx"), device="cuda", dtype=dtype,
                            progress=False))
    idx = Index.open(tmp_path / "idx")
    assert idx.manifest.build.device.startswith("cuda") and idx.manifest.model.dtype == dtype
    from api.search import Attributor
    att = Attributor(tmp_path / "idx", device="cuda")
    found = sum(att.attribute("", d["text"], 1, "cosine")[0][0].row == i for i, d in enumerate(docs))
    assert found >= (30 if dtype == "float32" else 27)
