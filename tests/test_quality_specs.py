"""The quality benchmark's specs and the committed ground truths: the registry, benchmark 2's
(llama-pkgdocs) artifacts, its fine-tuned model through the engine's loader, and the package split."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch

from benchmarks.quality import data
from benchmarks.quality.specs import GT_ROOT, SPECS, Spec, ground_truth, spec_of
from engine import find_tracked_layers, load_model

LLAMA = SPECS["llama-pkgdocs"]
GT2 = ground_truth("llama-pkgdocs")


def test_registry():
    assert set(SPECS) == {"gpt2-stdlib", "llama-pkgdocs", "smollm2-chat"}
    for name, spec in SPECS.items():
        assert spec.name == name and spec.arch in ("gpt2", "llama", "pretrained") and spec.max_tokens == data.MAX_TOKENS
        assert ground_truth(name) == GT_ROOT / name and spec_of(ground_truth(name)) is spec
        assert spec.recipe == {"lr": spec.finetune_lr, "epochs": spec.finetune_epochs, "batch": spec.finetune_batch}
    assert SPECS["gpt2-stdlib"].arch == "gpt2" and LLAMA.arch == "llama" and LLAMA.corpus == "site-packages"
    real = SPECS["smollm2-chat"]  # the committed corpus: chat records, the package as provider
    train, queries = data.load_rows(ground_truth(real.name))
    assert (real.arch, len(train), len(queries)) == ("pretrained", real.n_train, real.n_queries) and len(train) >= 2000
    assert all(r["messages"][-1]["role"] == "assistant" and r["package"] for r in train + queries)
    assert not {r["id"] for r in train} & {r["id"] for r in queries}
    with pytest.raises(KeyError, match="unknown benchmark"):
        ground_truth("nope")
    with pytest.raises(dataclasses.FrozenInstanceError):
        LLAMA.n_train = 5  # type: ignore[misc]


def test_benchmark1_artifacts_moved():
    gt = ground_truth("gpt2-stdlib")
    train, queries = data.load_rows(gt)
    assert (len(train), len(queries)) == (1000, 100)
    assert all({"id", "text", "module", "split"} <= r.keys() for r in train + queries)
    assert (gt / "finetuned" / "model.safetensors").exists() and (gt / "brittle" / "random-removal.npz").exists()


def test_benchmark2_data():
    meta = json.loads((GT2 / "meta.json").read_text())
    assert meta["spec"] == "llama-pkgdocs" and meta["arch"] == "llama"
    train, queries = data.load_rows(GT2)
    assert (len(train), len(queries)) == (LLAMA.n_train, LLAMA.n_queries)
    rows = train + queries
    assert len({r["id"] for r in rows}) == len(rows) and len({r["text"] for r in rows}) == len(rows)
    for r in rows:
        assert r["split"] in ("train", "query") and r["package"] in LLAMA.packages
        assert r["module"] == r["package"] or r["module"].startswith(r["package"] + ".")
    per_package = Counter(r["package"] for r in train)
    assert len(per_package) >= 30 and max(per_package.values()) <= LLAMA.package_cap
    assert len({r["module"] for r in train}) >= 100
    assert meta["base"]["train_packages"] == dict(sorted(per_package.items()))


def test_benchmark2_retrain_arrays():
    n_train, n_q = LLAMA.n_train, LLAMA.n_queries
    lds = np.load(GT2 / "lds.npz")
    s, per = LLAMA.n_subsets, LLAMA.seeds_per_subset
    assert lds["masks"].shape == (s, n_train) and lds["masks"].dtype == bool
    assert (lds["masks"].sum(axis=1) == n_train // 2).all()
    assert lds["seeds"].shape == (s, per) and len(np.unique(lds["seeds"])) == s * per
    assert lds["losses"].shape == (s, per, n_q) and np.isfinite(lds["losses"]).all()
    rnd = np.load(GT2 / "brittle" / "random-removal.npz")
    ks = rnd["ks"]
    assert rnd["losses"].shape == (len(ks), 3, n_q) and rnd["removed"].shape == (len(ks), 3, ks.max())
    for j, k in enumerate(ks):
        assert ((rnd["removed"][j, :, :k] >= 0) & (rnd["removed"][j, :, :k] < n_train)).all()


def test_benchmark2_model_loads_through_engine():
    model, tok = load_model(str(GT2 / "finetuned"))
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert len(model.model.layers) == 4 and model.config.hidden_act == "silu"  # gated MLP
    layers = find_tracked_layers(model)
    assert len(layers) == 4 * 7 and all(isinstance(l.module, torch.nn.Linear) for l in layers)
    assert {tuple(l.module.weight.shape) for l in layers if "mlp" in l.name} == {
        (LLAMA.model["intermediate_size"], LLAMA.model["hidden_size"]),
        (LLAMA.model["hidden_size"], LLAMA.model["intermediate_size"])}
    assert len(tok) == LLAMA.vocab and model.config.max_position_embeddings >= LLAMA.max_tokens


def _doc(package: str, module: str, i: int) -> dict:
    return {"id": f"{module}:{i}", "text": f"{module} doc {i}", "package": package, "module": module, "kind": "function"}


def test_split_packages_holds_out_whole_modules():
    spec = Spec(name="t", arch="llama", model={}, corpus="site-packages", pool_per_package=6, module_max=5,
                pretrain_cap=7)
    docs = [_doc("a", f"a.m{m}", i) for m in range(6) for i in range(3)]  # 18 docs in 6 modules
    docs += [_doc("b", "b", i) for i in range(4)]  # one module: all of it goes to the pool
    docs += [_doc("c", "c.big", i) for i in range(9)] + [_doc("c", "c.small", i) for i in range(2)]
    pre, pool = data.split_packages(docs, spec)
    assert not {d["module"] for d in pre} & {d["module"] for d in pool}
    assert Counter(d["package"] for d in pool) == {"a": 6, "b": 4, "c": 2}  # c.big is over module_max
    assert Counter(d["package"] for d in pre) == {"a": 7, "c": 7}  # pretrain_cap
