"""Shared fixtures: a synthetic corpus, a tokenizer trained on it here, and tiny GPT-2 (Conv1D) and
Llama-style (nn.Linear) models saved to local folders, loaded back through the real
`from_pretrained` path. Nothing comes from a model hub."""
from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from indexer.demo_corpus import train_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

WORDS = ("river stone cloud lamp orbit signal garden copper winter engine paper violet harbor needle "
         "falcon marble thunder velvet lantern meadow cipher anchor quartz ember willow canyon socket "
         "prism tundra beacon ledger nickel saddle raven cobalt").split()


def synthetic_corpus(n: int, seed: int = 0) -> list[dict]:
    """Documents of random words with provenance fields; distinct enough that a document's own
    gradient should find it."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
        docs.append({"id": f"doc-{i}", "text": text, "source": rng.choice(["web", "books", "code"]), "position": i})
    return docs


def build_corpus_index(root, model_dir, records, **config):
    """`records` written to root/data.jsonl and indexed into root/index with the library's default
    settings (overridden by `config`). Returns the index folder."""
    from indexer.build import BuildConfig, build_index
    data = write_jsonl(root / "data.jsonl", records)
    build_index(BuildConfig(model=model_dir, data=[data], out=str(root / "index"), progress=False, **config))
    return root / "index"


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [d["text"] for d in synthetic_corpus(400, seed=123)]
    train_tokenizer(texts, out, vocab_size=300)
    return out


def _save_model(model, tokenizer_dir, out):
    from transformers import AutoTokenizer
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=128, n_embd=32, n_layer=2, n_head=2, attn_implementation="eager",
                     bos_token_id=0, eos_token_id=0)
    return _save_model(GPT2LMHeadModel(cfg), tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir):
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager",
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return _save_model(LlamaForCausalLM(cfg), tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(params=["gpt2", "llama"])
def model_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "api", *args]


@contextlib.contextmanager
def running_api(index_dir, log_dir, ready_s: float = 60, args: tuple[str, ...] = ()):
    """A real `python -m api` process on a free loopback port (more options in `args`), yielded once
    /health answers, as (base_url, process, stderr file). Terminated (then killed) on exit if still
    running. Also used by benchmarks/serving.py."""
    port = free_port()
    out, err = open(Path(log_dir) / "out", "w+"), open(Path(log_dir) / "err", "w+")
    proc = subprocess.Popen(api_cmd("--index", str(index_dir), "--host", "127.0.0.1", "--port", str(port), *args),
                            cwd=REPO, stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                err.seek(0)
                pytest.fail(f"server exited with {proc.returncode}: {err.read()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready within {ready_s} s")
            time.sleep(0.2)
        yield base, proc, err
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()
        err.close()
