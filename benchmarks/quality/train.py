"""The models' recipes: pretraining a spec's base model, the fine-tuning recipe every ground-truth
model follows, and query losses.

Pretrain (`pretrain`) = the spec's architecture from scratch on the pretraining split: GPT-2 through
`indexer.demo_corpus.train_tiny_gpt2`, Llama through `train_tiny_llama` (AdamW, warmup then cosine
decay, gradient clipping), each text followed by eos and cut to max_tokens.
Fine-tune = the base model, AdamW at a fixed learning rate, batches of `batch` documents in a
data-order seed's shuffled, length-bucketed order, `epochs` epochs, mean token loss (the spec's
recipe; the module constants are benchmark 1's). Query loss = the summed token loss of each query,
as the engine defines it (`engine.per_example_loss`). A document or query is a text (all of it
scored) or a (prompt, response) pair, formatted as the model saw it (only the response scored).
Retrains run in worker processes (one thread each on the CPU); on a CUDA device in bfloat16 autocast
with TF32 matmuls, query losses in float32.
"""
from __future__ import annotations

import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

EPOCHS = 2
BATCH = 32
LR = 1e-3

_W: dict = {}  # per-process state: base weights, encoded train docs and queries, the recipe


def collate_on(examples: list, pad: int, device) -> dict:
    """engine.collate (labels -100 on padding and on what carries no loss), moved to `device`."""
    from engine import collate
    return {k: v.to(device) for k, v in collate(list(examples), pad).items()}


def run_epochs(model, docs: list, pad: int, opt, *, epochs: int, batch: int, seed: int, schedule=None,
               clip: float | None = None, progress: str | None = None) -> list[float]:
    """Train `model` in place on engine `Encoded` documents (labels as `engine.collate` sets them) in
    a seeded shuffled, length-bucketed batch order; returns every step's loss."""
    from contextlib import nullcontext

    from tqdm import tqdm
    from engine import length_bucketed_batches
    rng = random.Random(seed)
    losses = []
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.train()
    with tqdm(total=epochs * -(-len(docs) // batch), desc=progress, disable=progress is None) as bar:
        for _ in range(epochs):
            for idx in length_bucketed_batches([d.input_ids for d in docs], batch, rng):
                b = collate_on([docs[i] for i in idx], pad, device)
                with autocast:
                    loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                if schedule is not None:
                    schedule.step()
                losses.append(loss.item())
                bar.update(1)
    model.eval()
    return losses


def fine_tune(model, train: list, keep: np.ndarray, seed: int, pad: int, lr: float = LR, epochs: int = EPOCHS,
              batch: int = BATCH) -> list[float]:
    """In place: fine-tune `model` on the documents (engine `Encoded`, whole text labelled) where
    `keep` is true."""
    docs = [train[i] for i in np.flatnonzero(keep)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return run_epochs(model, docs, pad, opt, epochs=epochs, batch=batch, seed=seed)


def train_tiny_llama(texts: list[str], tokenizer, out_dir: Path, *, model: dict, max_tokens: int, epochs: int,
                     batch: int, lr: float, seed: int = 0, progress: bool = True) -> dict:
    """A Llama-style causal LM (`model`: LlamaConfig settings; tied embeddings, no dropout, eager
    attention) trained from scratch on `texts`, saved with the tokenizer. AdamW (weight decay 0.1 on
    matrices), linear warmup then cosine decay to a tenth of `lr`, gradients clipped at norm 1.
    Returns the same summary as `train_tiny_gpt2`: steps, seconds, first_loss, final_loss (mean of
    the last ~10% of steps, at most 20), tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from engine import Encoded
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    docs = [Encoded((x + [eos])[:max_tokens], 0, False, len(x) + 1) for x in ids]
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_tokens, tie_word_embeddings=True,
                         attention_dropout=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="eager", **model)
    net = LlamaForCausalLM(config)
    net.loss_type = "ForCausalLM"
    matrices = [p for p in net.parameters() if p.dim() >= 2]
    others = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    steps = epochs * -(-len(docs) // batch)  # upper bound: length buckets may leave a few short batches
    warmup = max(1, min(100, steps // 20))
    schedule = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps - warmup, eta_min=lr / 10)], [warmup])
    start = time.perf_counter()
    losses = run_epochs(net, docs, tokenizer.pad_token_id, opt, epochs=epochs, batch=batch, seed=seed,
                        schedule=schedule, clip=1.0, progress="pretraining tiny Llama" if progress else None)
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out_dir, safe_serialization=True)
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = max_tokens  # `truncation=True` cuts where the positions end
    tokenizer.save_pretrained(out_dir)
    tokenizer.model_max_length = saved
    tail = max(1, min(20, len(losses) // 10))
    return {"steps": len(losses), "seconds": round(seconds, 2), "first_loss": losses[0],
            "final_loss": sum(losses[-tail:]) / tail, "tokens": sum(len(d.input_ids) for d in docs) * epochs}


def pretrain(spec, texts: list[str], tokenizer, out_dir: Path, progress: bool = False) -> dict:
    """The spec's base model, pretrained from scratch on `texts` and saved with the tokenizer to `out_dir`."""
    common = dict(max_tokens=spec.max_tokens, epochs=spec.pretrain_epochs, seed=spec.seed, progress=progress)
    if spec.arch == "gpt2":
        from indexer.demo_corpus import train_tiny_gpt2
        return train_tiny_gpt2(texts, tokenizer, out_dir, batch_size=spec.pretrain_batch, lr=spec.pretrain_lr,
                               **common, **spec.model)
    if spec.arch == "llama":
        return train_tiny_llama(texts, tokenizer, out_dir, model=spec.model, batch=spec.pretrain_batch,
                                lr=spec.pretrain_lr, **common)
    raise ValueError(f"unknown architecture {spec.arch!r}")


def _encode(tok, item):
    """A text (all of it scored) or a (prompt, response) pair already formatted (engine.TextFormat)."""
    from engine import encode
    prompt, response = ("", item) if isinstance(item, str) else item
    return encode(tok, prompt, response, 10**9)


def _setup(base_dir: str, train_texts: list, query_texts: list, recipe: dict | None = None,
           device: str = "cpu") -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if device == "cpu":
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token_id is None:  # padding is masked out of every loss
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32).to(device)
    _W.update(base_dir=base_dir, tok=tok, model=model, recipe=dict(recipe or {}),
              base_state={k: v.clone() for k, v in model.state_dict().items()},
              train=[_encode(tok, t) for t in train_texts], queries=[_encode(tok, t) for t in query_texts])


@torch.no_grad()
def query_losses(model, tok, queries) -> np.ndarray:
    """Summed token loss of each encoded query (engine.per_example_loss)."""
    from engine import per_example_loss
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(queries), 50):
        batch = collate_on(queries[i : i + 50], tok.pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        out.append(per_example_loss(logits, batch["labels"]).double().cpu().numpy())
    return np.concatenate(out)


def model_query_losses(model_dir: Path, query_texts: list, device: str = "cpu") -> np.ndarray:
    """Query losses of a saved model (in this process)."""
    _setup(str(model_dir), [], list(query_texts), device=device)
    return query_losses(_W["model"], _W["tok"], _W["queries"])


def _job(args) -> np.ndarray:
    keep, seed = args
    model, tok = _W["model"], _W["tok"]
    model.load_state_dict(_W["base_state"])
    torch.manual_seed(seed)
    fine_tune(model, _W["train"], np.asarray(keep, bool), seed, tok.pad_token_id, **_W["recipe"])
    return query_losses(model, tok, _W["queries"])


def retrain_many(base_dir: Path, train_texts: list, query_texts: list, jobs: list[tuple[np.ndarray, int]],
                 workers: int = 2, progress: bool = True, recipe: dict | None = None, device: str = "cpu",
                 partial: Path | None = None) -> np.ndarray:
    """(len(jobs), n_queries) query losses, one fine-tune of the base per (keep mask, seed); `recipe`:
    fine_tune's lr/epochs/batch (spec.recipe; default benchmark 1's). On a GPU the workers share it.
    `partial`: the rows finished so far are saved there (.npy) every `workers` jobs, so a run cut
    short by a time limit still leaves them, and the same call again starts after them."""
    from tqdm import tqdm
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init = (str(base_dir), list(train_texts), list(query_texts), recipe, device)
    done = list(np.load(partial)) if partial is not None and partial.exists() else []
    jobs = jobs[len(done):]

    def collect(results) -> np.ndarray:
        rows = list(done)
        for row in tqdm(results, total=len(jobs), disable=not progress, desc="retrains"):
            rows.append(row)
            if partial is not None and len(rows) % max(1, workers) == 0:
                np.save(partial, np.stack(rows))
        return np.stack(rows)

    if not jobs:
        return np.stack(done)
    if workers <= 1:
        _setup(*init)
        return collect(_job(j) for j in jobs)
    import multiprocessing as mp
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_setup, initargs=init) as ex:
        return collect(ex.map(_job, jobs, chunksize=1))


def fine_tune_full(base_dir: Path, train_texts: list[str], out_dir: Path, seed: int = 0,
                   recipe: dict | None = None) -> list[float]:
    """The model every method is scored on: the base fine-tuned on the whole set, saved with its
    tokenizer. Returns the step losses."""
    _setup(str(base_dir), list(train_texts), [], recipe)
    model, tok = _W["model"], _W["tok"]
    torch.manual_seed(seed)
    losses = fine_tune(model, _W["train"], np.ones(len(_W["train"]), bool), seed, tok.pad_token_id, **_W["recipe"])
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return losses
