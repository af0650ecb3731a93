"""Turn (prompt, response) text into token ids and a loss mask, and pad examples into batches."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    loss_start: int  # first position whose token is scored (predicted from the tokens before it)
    truncated: bool
    n_tokens_before_truncation: int

    @property
    def n_loss_tokens(self) -> int:
        # Position 0 is never predicted, so it never carries loss.
        return len(self.input_ids) - max(self.loss_start, 1)


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_tokens: int) -> Encoded:
    """Prompt and response are tokenized separately so the boundary is exact; special tokens (a BOS,
    if the tokenizer adds one) go on the first non-empty part. A plain document is an empty prompt
    with the document as the response, so a document and the same text sent as a query encode alike.

    Over `max_tokens`, the response keeps its head and the prompt its tail (the context nearest the
    response), with at least half the budget for the response."""
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2")
    p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    r_ids = tokenizer(response, add_special_tokens=not p_ids)["input_ids"]
    total = len(p_ids) + len(r_ids)
    truncated = total > max_tokens
    if truncated:
        r_keep = min(len(r_ids), max_tokens - min(len(p_ids), max_tokens // 2))
        p_keep = max_tokens - r_keep
        r_ids = r_ids[:r_keep]
        p_ids = p_ids[len(p_ids) - p_keep :] if p_keep else []
    return Encoded(p_ids + r_ids, len(p_ids), truncated, total)


@dataclass(frozen=True)
class TextFormat:
    """How a (prompt, response) pair or a chat becomes the prompt and response texts the model reads:
    through a chat template (Jinja, as `tokenizer.apply_chat_template` renders it) or, without one,
    joined by `separator`. Recorded in the manifest, so documents and queries are formatted alike.
    `TextFormat(None, "")` is the plain concatenation of indexes built before formats existed."""
    chat_template: str | None = None
    separator: str = "\n"

    def to_dict(self) -> dict:
        return {"chat_template": self.chat_template, "separator": self.separator}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TextFormat":
        return cls(None, "") if d is None else cls(d.get("chat_template"), d.get("separator", "\n"))

    def pair(self, tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[str, str]:
        """An empty prompt is a plain text: unformatted, as a document is."""
        if not prompt:
            return "", response
        if self.chat_template is None:
            return prompt + self.separator, response
        return self.messages(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])

    def messages(self, tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, str]:
        """The last turn (the assistant's) is the response; every turn before it, the prompt."""
        check_messages(messages)
        if self.chat_template is None:
            head = self.separator.join(m["content"] for m in messages[:-1])
            return (head + self.separator if len(messages) > 1 else ""), messages[-1]["content"]
        render = lambda turns, gen: tokenizer.apply_chat_template(turns, chat_template=self.chat_template, tokenize=False,
                                                                  add_generation_prompt=gen)
        full, head = render(messages, False), render(messages[:-1], True) if len(messages) > 1 else ""
        if not full.startswith(head):
            raise ValueError("the chat template renders the conversation without its prompt as a prefix; "
                             "the response's tokens cannot be told apart (use --chat-template none)")
        # A rendered BOS that the tokenizer adds by itself anyway is dropped from the text (encode adds it).
        auto = tokenizer.decode(tokenizer("", add_special_tokens=True)["input_ids"])
        if auto and full.startswith(auto):
            full, head = full[len(auto):], head[len(auto):] if head.startswith(auto) else head
        return head, full[len(head):]

    def check(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """A chat template must encode a conversation as apply_chat_template tokenizes it (a template
        rendering no BOS for a tokenizer that adds one would not): a ValueError saying so otherwise."""
        if self.chat_template is None:
            return
        chat = [{"role": "user", "content": "What is a roux? Be brief."},
                {"role": "assistant", "content": "A roux is flour cooked in fat."}]
        want = tokenizer.apply_chat_template(chat, chat_template=self.chat_template, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        got = encode(tokenizer, *self.messages(tokenizer, chat), 10**9).input_ids
        if list(got) != list(want):
            raise ValueError("the chat template's text does not encode to the tokens apply_chat_template gives "
                             f"({len(got)} against {len(want)} tokens for a two-turn chat); use --chat-template none")


def check_messages(messages) -> None:
    if (not isinstance(messages, list) or not messages or
            not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        raise ValueError("messages must be a non-empty list of {\"role\": str, \"content\": str}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message is the response and must be the assistant's, not {messages[-1]['role']!r}")


def token_texts(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that the pieces concatenate to the decoded text. Decoded
    incrementally: a token that ends inside a multi-byte character gets "" and the token that
    completes the character carries it. Special tokens decode to ""."""
    texts, prev = [], ""
    for j in range(len(ids)):
        cur = tokenizer.decode(list(ids[: j + 1]), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if cur.endswith("\ufffd") and j < len(ids) - 1:
            texts.append("")
            continue
        k = 0
        while k < min(len(prev), len(cur)) and prev[k] == cur[k]:
            k += 1
        texts.append(cur[k:])
        prev = cur
    return texts


def scored_positions(e: Encoded) -> range:
    """Positions whose token carries loss: the response's, except position 0 (nothing predicts it)."""
    return range(max(e.loss_start, 1), len(e.input_ids))


def collate(examples: list[Encoded], pad_id: int,
            label_positions: Sequence[Sequence[int] | None] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch. labels are -100 on prompt and padding positions (unshifted: the
    loss shifts them). `label_positions`, one entry per example, labels only the given positions of
    that example instead (None: its whole response), e.g. one token at a time for per-token scores."""
    if label_positions is not None and len(label_positions) != len(examples):
        raise ValueError(f"label_positions has {len(label_positions)} entries for {len(examples)} examples")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        positions = None if label_positions is None else label_positions[i]
        if positions is None:
            labels[i, e.loss_start : n] = ids[i, e.loss_start : n]
        else:
            pos = torch.as_tensor(list(positions), dtype=torch.long)
            if len(pos) and (pos.min() < 0 or pos.max() >= n):
                raise ValueError(f"label position out of range for an example of {n} tokens")
            labels[i, pos] = ids[i, pos]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_bucketed_batches(encoded: list[list[int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of document indices, grouped by similar length (for training loops: the demo's
    model and the quality benchmark's retrains).

    Docstrings range from a few tokens to `max_tokens`; padding every batch to its
    longest member wasted over half the compute. Sorting within random pools of 50
    batches keeps batches random while cutting most of the padding.
    """
    order = list(range(len(encoded)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p:p + pool], key=lambda i: len(encoded[i]))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
