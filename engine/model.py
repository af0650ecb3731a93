"""Load a Hugging Face causal LM and its tokenizer for gradient work, and fingerprint its weights."""
from __future__ import annotations

import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    name_or_path: str,
    device: str | None = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load by hub name or local folder. Eager attention: fused kernels have batch-dependent
    backward passes, and a document's vector must not depend on its batch (DESIGN.md)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=DTYPES[dtype],
        attn_implementation="eager",
        trust_remote_code=trust_remote_code,
    )
    model.to(resolve_device(device))
    prepare_model(model)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every computation, so any id will do.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
    return model, tokenizer


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode (no dropout) and no parameter gradients: LoGra only needs activation gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A cheap, dtype-independent fingerprint of the weights: names, shapes and a strided sample of
    each tensor's values rounded through bfloat16 (so fp32 and bf16 loads of one checkpoint agree).
    Hashing every byte of an 8B model would take minutes; a sample catches a different checkpoint."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def effective_max_tokens(model: torch.nn.Module, requested: int) -> int:
    ctx = context_length(model)
    return min(requested, ctx) if ctx else requested
