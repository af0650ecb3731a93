"""Self-contained material for the embedded demo: a text corpus and a tiny model
trained on it, with nothing downloaded. The corpus is every module, class and
function docstring of the running interpreter's standard library, read with `ast`
(no module is imported); a byte-level BPE tokenizer is trained on it with
`tokenizers`, and a small GPT-2 is trained from scratch on CPU with a plain
nanoGPT-style loop. The resulting folder loads with `AutoModelForCausalLM` /
`AutoTokenizer` like any Hugging Face checkpoint, so the indexer can attribute the
model's outputs to the docstrings it was actually trained on.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import os
import random
import sysconfig
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: the corpus part needs only the stdlib
    from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"

# Directory names never walked: third-party code, test suites, and tools/demos whose
# docstrings are not library documentation.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
     "turtledemo", "__pycache__"}
)


# --------------------------------------------------------------------------- corpus


class _DocstringCollector(ast.NodeVisitor):
    """Collects (qualname, kind, line, node) for every def/class, in source order.

    Qualnames follow Python's __qualname__ rules, so a function nested in a function
    is `outer.<locals>.inner`; defs under if/try/with blocks are found as well.
    """

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.found: list[tuple[str, str, int, ast.AST]] = []

    def _visit_scope(self, node, kind: str, is_function: bool) -> None:
        qualname = ".".join(self.stack + [node.name])
        self.found.append((qualname, kind, node.lineno, node))
        self.stack.append(node.name)
        if is_function:
            self.stack.append("<locals>")
        self.generic_visit(node)
        del self.stack[-(2 if is_function else 1):]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_scope(node, "class", is_function=False)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node, "function", is_function=True)

    visit_AsyncFunctionDef = visit_FunctionDef


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _stdlib_files(stdlib: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(stdlib):
        # Pruning in place keeps os.walk out of skipped trees entirely.
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        files.extend(Path(root, n) for n in names if n.endswith(".py"))
    # Sort on the relative posix path so the order does not depend on the OS.
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def stdlib_docstrings(max_docs: int | None = None, min_chars: int = 40) -> list[dict]:
    """One record per module/class/function docstring of the running stdlib.

    Records are `{"id", "text", "module", "qualname", "kind", "file", "line"}`,
    ordered by file path then source order, with unique ids (the first documented
    definition wins when a qualname repeats, e.g. property setters). `max_docs`
    keeps an evenly spaced subset of that order, so every part of the stdlib is
    represented. The scan (~3 s) is cached per process; callers get fresh dicts.
    """
    if max_docs is not None and max_docs < 0:
        raise ValueError(f"max_docs must be >= 0, got {max_docs}")
    docs = _scan_stdlib(sysconfig.get_paths()["stdlib"], min_chars)
    if max_docs is not None and max_docs < len(docs):
        # Evenly spaced indices: deterministic and spread across the whole stdlib,
        # rather than the first few packages alphabetically.
        n = len(docs)
        docs = tuple(docs[i * n // max_docs] for i in range(max_docs))
    return [dict(d) for d in docs]


@functools.lru_cache(maxsize=4)
def _scan_stdlib(stdlib_dir: str, min_chars: int) -> tuple[dict, ...]:
    stdlib = Path(stdlib_dir)
    docs: list[dict] = []
    seen: set[str] = set()
    for path in _stdlib_files(stdlib):
        rel = path.relative_to(stdlib)
        try:
            source = path.read_bytes()
            # Parsing bytes honours PEP 263 coding cookies; silence SyntaxWarnings
            # (invalid escapes in old docstrings) that are not our concern.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source, filename=str(path))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
            continue
        module = _module_name(rel)
        collector = _DocstringCollector()
        collector.visit(tree)
        entries = [("", "module", 1, tree)] + collector.found
        for qualname, kind, line, node in entries:
            raw = ast.get_docstring(node, clean=False)
            if not raw:
                continue
            # cleandoc keeps a whitespace-only last line when no line sets a margin.
            text = inspect.cleandoc(raw).strip()
            if len(text) < min_chars:
                continue
            doc_id = f"{module}:{qualname}" if qualname else module
            if doc_id in seen:
                continue
            seen.add(doc_id)
            docs.append({"id": doc_id, "text": text, "module": module,
                         "qualname": qualname, "kind": kind,
                         "file": rel.as_posix(), "line": line})
    return tuple(docs)


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], out_dir: str | Path,
                    vocab_size: int = 4096) -> "PreTrainedTokenizerFast":
    """Train a GPT-2-style byte-level BPE on `texts`, save it to `out_dir`.

    `<|endoftext|>` (id 0) is the bos, eos, unk and pad token. Byte-level BPE can
    encode any string, and decode(encode(text)) gives the text back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        # All 256 byte symbols up front, so no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
        # Exact round trips: no space "clean up" on decode.
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


# -------------------------------------------------------------------------- training


def train_tiny_gpt2(texts: list[str], tokenizer, out_dir: str | Path, *, n_layer: int = 2,
                    n_embd: int = 128, n_head: int = 4, max_tokens: int = 128,
                    epochs: int = 2, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
                    progress: bool = True) -> dict:
    """Train a small GPT-2 from scratch on `texts` (CPU), save model + tokenizer.

    Each text is tokenized, followed by eos, truncated to `max_tokens` and trained
    with the mean next-token loss (padding masked with -100). Returns
    `{"steps", "seconds", "first_loss", "final_loss", "tokens"}`: `first_loss` is the
    first step's loss, `final_loss` the mean of the last ~10% of steps (at most 20),
    `tokens` the number of non-padding tokens trained on over all epochs.
    """
    import torch
    from tqdm.auto import tqdm

    from engine import length_bucketed_batches
    from transformers import GPT2Config, GPT2LMHeadModel

    if not texts:
        raise ValueError("train_tiny_gpt2 needs at least one text")
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [(ids + [eos])[:max_tokens]
               for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=max_tokens, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head,
        # No dropout (as nanoGPT's default): tiny model, few steps, and the model
        # behaves the same in train and eval mode, which keeps attribution simple.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad,
        # Eager attention: fused kernels' backward can depend on the batch (docs/indexing.md, engine.model).
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # stated, so transformers does not warn that it guessed
    model.train()

    # Weight decay on matrices only, not on biases and LayerNorm gains (nanoGPT).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total_steps = steps_per_epoch * epochs
    warmup = max(1, min(100, total_steps // 20))

    def lr_factor(step: int) -> float:
        # Linear warmup, then cosine decay to 10% of the peak learning rate.
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    shuffler = random.Random(seed)
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="training tiny GPT-2", disable=not progress)
    for _ in range(epochs):
        for batch_idx in length_bucketed_batches(encoded, batch_size, shuffler):
            batch = [encoded[i] for i in batch_idx]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention[row, :len(ids)] = 1
            # Padding is the eos id, so labels must mask it by position, not by value.
            labels = input_ids.masked_fill(attention == 0, -100)

            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()

            losses.append(loss.item())
            tokens += int(attention.sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start

    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Longer inputs would overrun the position table: the saved tokenizer records
    # the limit, so `truncation=True` cuts there. The caller's object is left as it was.
    previous_max = tokenizer.model_max_length
    tokenizer.model_max_length = max_tokens
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.model_max_length = previous_max

    tail = max(1, min(20, len(losses) // 10))
    return {
        "steps": len(losses),
        "seconds": round(seconds, 2),
        "first_loss": losses[0],
        "final_loss": sum(losses[-tail:]) / tail,
        "tokens": tokens,
    }
