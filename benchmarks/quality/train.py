"""The fine-tuning recipe every ground-truth model follows, and query losses.

Fine-tune = the base model, AdamW at a fixed learning rate, batches of BATCH documents in a
data-order seed's shuffled, length-bucketed order, EPOCHS epochs, mean token loss. Query loss =
the summed token loss of each query, as the engine defines it (`engine.per_example_loss`).
Retrains run in at most two worker processes, one thread each.
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

EPOCHS = 2
BATCH = 32
LR = 1e-3

_W: dict = {}  # per-process state: base weights, encoded train docs and queries


def _setup(base_dir: str, train_texts: list[str], query_texts: list[str]) -> None:
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine import encode
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.float32)
    _W.update(base_dir=base_dir, tok=tok, model=model,
              base_state={k: v.clone() for k, v in model.state_dict().items()},
              train=[encode(tok, "", t, 10**9) for t in train_texts],
              queries=[encode(tok, "", t, 10**9) for t in query_texts])


def fine_tune(model, train: list, keep: np.ndarray, seed: int, pad: int) -> None:
    """In place: fine-tune `model` on the documents (engine `Encoded`, whole text labelled) where
    `keep` is true."""
    from engine import collate
    from indexer.demo_corpus import _length_bucketed_batches
    docs = [train[i] for i in np.flatnonzero(keep)]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(EPOCHS):
        for idx in _length_bucketed_batches([d.input_ids for d in docs], BATCH, rng):
            batch = collate([docs[i] for i in idx], pad)  # labels -100 on padding
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def query_losses(model, tok, queries) -> np.ndarray:
    """Summed token loss of each encoded query (engine.per_example_loss)."""
    from engine import collate, per_example_loss
    out = []
    for i in range(0, len(queries), 50):
        batch = collate(list(queries[i : i + 50]), tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        out.append(per_example_loss(logits, batch["labels"]).double().numpy())
    return np.concatenate(out)


def _job(args) -> np.ndarray:
    keep, seed = args
    model, tok = _W["model"], _W["tok"]
    model.load_state_dict(_W["base_state"])
    torch.manual_seed(seed)
    fine_tune(model, _W["train"], np.asarray(keep, bool), seed, tok.pad_token_id)
    return query_losses(model, tok, _W["queries"])


def retrain_many(base_dir: Path, train_texts: list[str], query_texts: list[str], jobs: list[tuple[np.ndarray, int]],
                 workers: int = 2, progress: bool = True) -> np.ndarray:
    """(len(jobs), n_queries) query losses, one fine-tune of the base per (keep mask, seed)."""
    from tqdm import tqdm
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init = (str(base_dir), list(train_texts), list(query_texts))
    if workers <= 1:
        _setup(*init)
        return np.stack([_job(j) for j in tqdm(jobs, disable=not progress, desc="retrains")])
    import multiprocessing as mp
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_setup, initargs=init) as ex:
        return np.stack(list(tqdm(ex.map(_job, jobs, chunksize=1), total=len(jobs), disable=not progress,
                                  desc="retrains")))


def fine_tune_full(base_dir: Path, train_texts: list[str], out_dir: Path, seed: int = 0) -> None:
    """The model every method is scored on: the base fine-tuned on the whole set, saved with its tokenizer."""
    _setup(str(base_dir), list(train_texts), [])
    model, tok = _W["model"], _W["tok"]
    torch.manual_seed(seed)
    fine_tune(model, _W["train"], np.ones(len(_W["train"]), bool), seed, tok.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
