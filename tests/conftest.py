"""Shared fixtures: a tokenizer trained here on the synthetic corpus, and tiny GPT-2 (Conv1D) and
Llama-style (nn.Linear) models saved to local folders, loaded back through the real
`from_pretrained` path. Nothing comes from a model hub. Shared helpers live in tests/support.py."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from indexer.demo_corpus import train_tokenizer  # noqa: E402

from .support import CHAT_TEMPLATE, synthetic_corpus  # noqa: E402


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


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory, tokenizer_dir):
    """A tiny Llama whose tokenizer carries a chat template (support.CHAT_TEMPLATE)."""
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("chat-llama")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager",
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
