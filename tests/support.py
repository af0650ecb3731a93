"""Helpers the test modules share (conftest.py holds only fixtures): synthetic documents and files,
indexes built from them, the CLI in process, child processes and their environment, a real server,
and the independent references the tests compare the product against (brute-force scores, an
engine rebuilt from an index's stored state, plain autograd gradients, a fitted preconditioner)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from api.server import serve_in_subprocess

REPO = Path(__file__).resolve().parent.parent

# A chat template for tiny test tokenizers (the conftest chat_dir model's).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

WORDS = ("river stone cloud lamp orbit signal garden copper winter engine paper violet harbor needle "
         "falcon marble thunder velvet lantern meadow cipher anchor quartz ember willow canyon socket "
         "prism tundra beacon ledger nickel saddle raven cobalt").split()


# -- documents, files and indexes ------------------------------------------------------------------

def synthetic_corpus(n: int, seed: int = 0) -> list[dict]:
    """Documents of random words with provenance fields; distinct enough that a document's own
    gradient should find it."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
        docs.append({"id": f"doc-{i}", "text": text, "source": rng.choice(["web", "books", "code"]), "position": i})
    return docs


def write_jsonl(path, records) -> str:
    """One line a record: dicts and other values JSON-encoded, str records written verbatim (broken
    lines on purpose). Returns the path as a string."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def build_corpus_index(root, model_dir, records, **config):
    """`records` written to root/data.jsonl and indexed into root/index with the library's default
    settings (overridden by `config`). Returns the index folder."""
    from indexer.build import BuildConfig, build_index
    data = write_jsonl(root / "data.jsonl", records)
    build_index(BuildConfig(model=model_dir, data=[data], out=str(root / "index"), progress=False, **config))
    return root / "index"


def table_rows(index_dir) -> list[dict]:
    """The LanceDB rows in physical order, metadata decoded."""
    from indexer.store import Index
    rows = Index.open(index_dir).table.to_arrow().to_pylist()
    for r in rows:
        r["metadata"] = json.loads(r["metadata"])
    return rows


def leftovers(parent: Path) -> list[str]:
    """Temporary folders an interrupted or failed build might leave next to its output."""
    return [p.name for p in Path(parent).iterdir() if ".building" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


def checkpointed_shards(building: Path, name: str = "checkpoint.pt") -> int:
    """Shards a build in progress has checkpointed (0 before its first checkpoint)."""
    try:
        return torch.load(building / name, weights_only=True)["n_shards"]
    except Exception:  # not written yet, or being replaced this instant
        return 0


# -- commands and processes ------------------------------------------------------------------------

def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`python -m indexer` in process (`main` is what it calls): exit code, stdout, stderr."""
    from indexer.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def post_ok(client, path: str, body: dict) -> dict:
    """POST `body` as JSON; the answer must be a 200: its JSON."""
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def subprocess_env(**extra: str) -> dict[str, str]:
    """A child process's environment: this one's, with this checkout first on the import path,
    nothing from a model hub and no tokenizer thread pools; `extra` on top."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def running_api(index_dir, log_dir, ready_s: float = 60, args: tuple[str, ...] = ()):
    """A real `python -m api` process on a free loopback port (more options in `args`), yielded once
    /health answers, as (base_url, process, stderr file); stopped on exit if still running."""
    return serve_in_subprocess(index_dir, log_dir, args=args, env=subprocess_env(), ready_s=ready_s)


# -- independent references ------------------------------------------------------------------------

def exact_scores(vectors, q, mode: str, norms=None) -> np.ndarray:
    """Brute-force float64 scores of every row of `vectors` against `q`; cosine divides by `norms`
    (default: the rows' own norms) and by |q|."""
    v, q = np.asarray(vectors, dtype=np.float64), np.asarray(q, dtype=np.float64)
    scores = v @ q
    if mode != "cosine":
        return scores
    norms = np.linalg.norm(v, axis=1) if norms is None else np.asarray(norms, dtype=np.float64)
    return scores / (norms * np.linalg.norm(q))


def stored_high(index_dir) -> tuple[str, np.ndarray, np.ndarray | None, np.ndarray]:
    """The high-fidelity stage as its files hold it, read here without the store's reader: (storage,
    codes, scales, norms). Codes are float16 unit rows, or integers (int4: each byte's two nibbles,
    low first, minus 8); scales are None for float16."""
    index_dir = Path(index_dir)
    high = json.loads((index_dir / "manifest.json").read_text())["high"]
    storage, dim = high.get("storage", "float16"), high["dim"]
    raw = np.load(index_dir / "high.npy")
    if storage == "int4":
        codes = np.empty((raw.shape[0], 2 * raw.shape[1]), np.int16)
        codes[:, 0::2], codes[:, 1::2] = (raw & 15).astype(np.int16) - 8, (raw >> 4).astype(np.int16) - 8
        codes = codes[:, :dim]
    else:
        codes = raw
    scales = None if storage == "float16" else np.load(index_dir / "high-scales.npy")
    return storage, codes, scales, np.load(index_dir / "high-norms.npy")


def stored_vectors(index_dir) -> np.ndarray:
    """The compact vectors as the files hold them, read here without the store's reader, float64: float32
    rows, or int8 codes (vectors.npy) times their scales (scales.npy: unit rows) times their norms."""
    index_dir = Path(index_dir)
    raw = np.load(index_dir / "vectors.npy").astype(np.float64)
    if not (index_dir / "scales.npy").is_file():
        return raw
    scales, norms = np.load(index_dir / "scales.npy"), np.load(index_dir / "norms.npy")
    return raw * (scales.astype(np.float64) * norms.astype(np.float64))[:, None]


def stored_high_rows(index_dir) -> np.ndarray:
    """The high-fidelity unit rows the files hold (`stored_high`'s codes times their scales), float64."""
    _, codes, scales, _ = stored_high(index_dir)
    rows = np.asarray(codes, dtype=np.float64)
    return rows if scales is None else rows * scales[:, None].astype(np.float64)


def assert_same_vectors(a_dir, b_dir) -> None:
    """Two builds' compact vectors, computed in another order (batches, processes), as their files hold
    them: float32 rows within float rounding (amplified along EK-FAC's smallest, damped directions);
    int8 codes apart by at most one step in a few entries, norms and scales within rounding."""
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    a, b = np.load(a_dir / "vectors.npy"), np.load(b_dir / "vectors.npy")
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.load(a_dir / "norms.npy"), np.load(b_dir / "norms.npy"), rtol=1e-4)
    if a.dtype == np.float32:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        return
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
    np.testing.assert_allclose(np.load(a_dir / "scales.npy"), np.load(b_dir / "scales.npy"), rtol=1e-3)


def assert_same_high_rows(a_dir, b_dir) -> None:
    """Two builds' high-fidelity rows, computed in another order (batches, processes): float16 rows
    within float16 rounding of each other; integer codes apart by at most one step in a few entries
    (a float sum's last bit can put a value on the other side of a rounding boundary)."""
    (storage, a, sa, na), (storage_b, b, sb, nb) = stored_high(a_dir), stored_high(b_dir)
    assert storage == storage_b
    np.testing.assert_allclose(na, nb, rtol=1e-4)
    if storage == "float16":
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=2e-4)
        return
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    np.testing.assert_allclose(sa, sb, rtol=1e-3)


# A document sent as the query meets its own stored high-fidelity row: its cosine is 1 up to the
# storage's error. int4 rows of these tiny random models (heavier-tailed than a trained model's) keep
# cosines of 0.96-0.99 with the vectors they store.
SELF_COSINE_TOLERANCE = {"float16": 2e-3, "int8": 2e-3, "int4": 0.05}


def self_cosine_tolerance(index_dir, precision: str = "high") -> float:
    """How far below 1 a document's own cosine score may be at `precision` in this index."""
    manifest = json.loads((Path(index_dir) / "manifest.json").read_text())
    if precision == "fast":  # float32 vectors: rounding only
        return SELF_COSINE_TOLERANCE["int8" if manifest.get("storage") == "int8" else "float16"]
    return SELF_COSINE_TOLERANCE[manifest["high"].get("storage", "float16")]


def reference_engine(index_dir, model_dir=None):
    """(index, model, tokenizer, LoGra, preconditioner) rebuilt outside the API and the store's own
    loader: a model load of its own (`model_dir`, default the manifest's), LoGra from the manifest's
    seed, length and shapes with the stored projections, the preconditioner from its stored state."""
    from engine import LoGra, LoGraConfig, Preconditioner, load_model
    from indexer.store import Index
    idx = Index.open(index_dir)
    m = idx.manifest
    model, tok = load_model(model_dir or m.model.name_or_path)
    logra = LoGra(model, LoGraConfig(seed=m.seed, max_tokens=m.max_tokens),
                  shapes={l.name: (l.r_out, l.r_in) for l in m.layers})
    for name, p in idx.state["projections"].items():
        logra.projections[name] = (p["in"], p["out"])
    return idx, model, tok, logra, Preconditioner.from_state_dict(idx.state["preconditioner"])


def autograd_gradient(model, layer, enc, pad_id: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """G = dL/dW for one example alone, from plain autograd, in (out, in) orientation. The LM head's
    weight is usually tied to the input embedding: it gets a weight of its own for the duration, so
    that G is the gradient of the head's use alone (what LoGra tracks), not of the embedding lookup."""
    from transformers.pytorch_utils import Conv1D

    from engine import collate, per_example_loss
    batch = collate([enc], pad_id)
    shared = layer.module.weight
    w = torch.nn.Parameter(shared.detach().clone())
    layer.module.weight = w
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        (g,) = torch.autograd.grad(per_example_loss(logits, batch["labels"] if labels is None else labels).sum(), w)
    finally:
        layer.module.weight = shared
    return g.T if isinstance(layer.module, Conv1D) else g


def fit(pre, outs):
    """`pre` fed the gradient batches `outs` (a second pass where it needs one), finalized."""
    for o in outs:
        pre.update(o.grads, o.token_stats)
    if pre.needs_second_pass:
        for o in outs:
            pre.update_second(o.grads)
    return pre.finalize()


def fit_preconditioner(kind, logra, tok, pairs):
    """A `kind` preconditioner fitted on (prompt, response) `pairs` in batches of 3; returns it and the
    batches' projected gradients."""
    from engine import Preconditioner, encode, projected_gradients
    pre = Preconditioner(kind, logra.shapes)
    encoded = [encode(tok, p, r, 64) for p, r in pairs]
    outs = [projected_gradients(logra, tok, encoded[i:i + 3], token_stats=pre.needs_token_stats)
            for i in range(0, len(encoded), 3)]
    return fit(pre, outs), outs
