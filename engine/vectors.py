"""Document and query vectors: text -> projected gradients -> preconditioned LoGra vectors.
The indexer and the API both go through these functions, so a query and a document are
encoded by exactly the same code."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .encoding import Encoded, collate, encode, scored_positions
from .logra import LoGra, ProjectedGradients
from .preconditioner import Preconditioner


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_tokens: int) -> list[Encoded]:
    return [encode(tokenizer, prompt, response, max_tokens) for prompt, response in pairs]


def projected_gradients(logra: LoGra, tokenizer: PreTrainedTokenizerBase, encoded: Sequence[Encoded],
                        token_stats: bool = False) -> ProjectedGradients:
    return logra.gradients(collate(list(encoded), tokenizer.pad_token_id), token_stats=token_stats)


def query_vectors(logra: LoGra, preconditioner: Preconditioner, tokenizer: PreTrainedTokenizerBase,
                  pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, list[Encoded]]:
    """(batch, dim) preconditioned vectors for (prompt, response) pairs, and their encodings."""
    encoded = encode_pairs(tokenizer, pairs, logra.max_tokens)
    out = projected_gradients(logra, tokenizer, encoded)
    return preconditioner.apply(out.grads), encoded


def fit_preconditioner(logra: LoGra, preconditioner: Preconditioner, tokenizer: PreTrainedTokenizerBase,
                       batches: Sequence[Sequence[Encoded]], progress=lambda what, batches: batches) -> Preconditioner:
    """Fit `preconditioner` on documents held in memory, batch by batch: its statistics in one pass
    (token statistics for kfac / ekfac), EK-FAC's eigenvalues in a second pass that recomputes the
    gradients; returns it finalized. `progress(what, batches)` may wrap each pass (a progress bar).
    The indexer's streaming gradient pass fits the compact vectors' preconditioner its own way."""
    if preconditioner.kind != "none":
        for batch in progress("statistics", batches):
            out = projected_gradients(logra, tokenizer, batch, token_stats=preconditioner.needs_token_stats)
            preconditioner.update(out.grads, out.token_stats)
    if preconditioner.needs_second_pass:
        for batch in progress("eigenvalues", batches):
            preconditioner.update_second(projected_gradients(logra, tokenizer, batch).grads)
    return preconditioner.finalize()


def pair_vector_batches(logra: LoGra, preconditioner: Preconditioner, tokenizer: PreTrainedTokenizerBase,
                        pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                        eigenbasis: bool = True) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices into `pairs`, their (len(indices), dim) preconditioned vectors), batch by batch, in
    batches of similar length (a vector does not depend on its batch). Inner products and norms
    only need them in the preconditioner's eigenbasis, in float32 (Preconditioner.apply): the default."""
    encoded = encode_pairs(tokenizer, pairs, logra.max_tokens)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        grads = projected_gradients(logra, tokenizer, [encoded[i] for i in idx]).grads
        yield idx, preconditioner.apply(grads, eigenbasis=eigenbasis, dtype=torch.float32 if eigenbasis else torch.float64)


def pair_vectors(logra: LoGra, preconditioner: Preconditioner, tokenizer: PreTrainedTokenizerBase,
                 pairs: Sequence[tuple[str, str]], batch_size: int = 16, eigenbasis: bool = True) -> torch.Tensor:
    """(len(pairs), dim) preconditioned vectors, in the pairs' order (pair_vector_batches)."""
    out = torch.zeros(len(pairs), logra.dim)
    for idx, v in pair_vector_batches(logra, preconditioner, tokenizer, pairs, batch_size, eigenbasis):
        out[idx] = v
    return out


MAX_TOKENS_SCORED = 256


@dataclass
class TokenVectors:
    """Per-token query vectors of one (prompt, response): `tokens[i]` is the preconditioned vector of
    the loss of the token at `positions[i]` alone. The gradient is linear in the loss, so the rows sum
    to `query` (the whole response's vector) unless `truncated`."""
    query: torch.Tensor  # (dim,)
    tokens: torch.Tensor  # (len(positions), dim)
    positions: list[int]  # positions in encoded.input_ids, ascending
    encoded: Encoded
    truncated: bool  # scored tokens past max_tokens_scored were left out of `tokens`


def token_vectors(logra: LoGra, preconditioner: Preconditioner, tokenizer: PreTrainedTokenizerBase, prompt: str,
                  response: str, max_tokens_scored: int = MAX_TOKENS_SCORED, batch_size: int = 32,
                  eigenbasis: bool = False, guard: Callable[[], ContextManager] = nullcontext) -> TokenVectors:
    """`eigenbasis`: the vectors in the preconditioner's eigenbasis (Preconditioner.apply); `guard()`:
    entered around each batch's computation (a server's lock, taken batch by batch). The sequence is replicated once per scored token with a label mask selecting just that token,
    plus one copy labelled as a normal query; the copies go through `LoGra.gradients` in batches of
    `batch_size` (eager attention: a copy's gradient does not depend on its batch)."""
    if max_tokens_scored < 1 or batch_size < 1:
        raise ValueError("max_tokens_scored and batch_size must be at least 1")
    enc = encode(tokenizer, prompt, response, logra.max_tokens)
    positions = list(scored_positions(enc))
    truncated = len(positions) > max_tokens_scored
    positions = positions[:max_tokens_scored]
    masks: list[list[int] | None] = [None] + [[j] for j in positions]
    rows = []
    for i in range(0, len(masks), batch_size):
        chunk = masks[i : i + batch_size]
        batch = collate([enc] * len(chunk), tokenizer.pad_token_id, label_positions=chunk)
        with guard():
            rows.append(preconditioner.apply(logra.gradients(batch).grads, eigenbasis=eigenbasis))
    vectors = torch.cat(rows)
    return TokenVectors(query=vectors[0], tokens=vectors[1:], positions=positions, encoded=enc, truncated=truncated)
