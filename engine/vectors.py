"""Document and query vectors: text -> projected gradients -> preconditioned LoGra vectors.
The indexer and the API both go through these functions, so a query and a document are
encoded by exactly the same code."""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .encoding import Encoded, collate, encode
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
