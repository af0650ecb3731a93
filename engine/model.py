"""Load a Hugging Face causal LM and its tokenizer for gradient work, and fingerprint its weights."""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file `name_or_path` names, if it names one: a path ending in `.gguf`, or a folder with
    no config.json holding exactly one `*.gguf`. None for anything else (a model folder, a hub name)."""
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {name_or_path}")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        raise ValueError(f"{name_or_path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): "
                         f"name the one to load, e.g. {path / found[0].name}")
    return found[0] if found else None


def load_model(
    name_or_path: str,
    device: str | None = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load by hub name, local folder or GGUF file (see `gguf_file`). Eager attention: fused kernels
    have batch-dependent backward passes, and a document's vector must not depend on its batch (docs/indexing.md)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    gguf = gguf_file(name_or_path)
    if gguf is not None:
        model, tokenizer = _load_gguf(gguf, DTYPES[dtype])
    else:
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


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file through transformers' GGUF loader (needs the `gguf` package), every weight
    de-quantized to `dtype`: a plain dense model, as a folder would give (no quantization config
    left on it, nn.Linear layers for LoGra to track). The tokenizer and its chat template come from
    the file's metadata."""
    from transformers import GgufConfig
    folder, name = str(path.resolve().parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, attn_implementation="eager",
            quantization_config=GgufConfig(dequantize=True),
        )
    except ImportError as e:
        raise ValueError(f"loading GGUF file {path} needs the gguf package (pip install gguf): {e}") from e
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, NotImplementedError, struct.error) as e:
        # The gguf reader and transformers' converter raise these for a file that is not a GGUF, is
        # truncated, or holds an architecture or tokenizer transformers cannot build.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load GGUF file {path}: {first}") from e
    # dequantize=True makes transformers drop the quantization config; make sure nothing of it is left.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
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
