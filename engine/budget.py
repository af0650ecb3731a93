"""Spend a per-document dimension budget over the tracked layers.

A layer's LoGra block is r_out x r_in numbers. The rule, for any number of layers (chosen on the three
quality benchmarks together: docs/quality.md "The budget at any depth"):
1. The LM head gets `head_share` of the budget (all of it when nothing else is tracked).
2. The rest goes to the blocks' layers, never fewer than `min_layer_dims` each (the build's default:
   576, a 24 x 24 block). When the rest can give every block layer that much, they split it equally.
   Otherwise only the deepest blocks are tracked: as many whole blocks, counted back from the last, as
   the rest gives `min_layer_dims` a layer (or, when not even the last block fits, its last layers),
   splitting it equally; the shallower layers are not tracked at all, and the backward pass starts at
   the first tracked block (LoGra.backward_root). When not one layer fits, the head takes the whole budget.
3. A layer's share b becomes r_in = r_out = floor(sqrt b); where a side is smaller than that it is kept
   whole and the other side takes what is left.
Spread evenly over 210 layers, a 16,384-dimension share gives each 9 x 8 numbers, which carried noise
on the real model (its LDS rose from 0.385 to 0.439 with the same budget on the last 4 blocks at 24 x 24).
"""
from __future__ import annotations

import re
from math import isqrt

from .layers import TrackedLayer


def clamp(layer: TrackedLayer, r_out: int, r_in: int) -> tuple[int, int]:
    return max(1, min(r_out, layer.out_features)), max(1, min(r_in, layer.in_features))


def sides(layer: TrackedLayer, dims: int) -> tuple[int, int]:
    """(r_out, r_in) with r_out * r_in <= max(dims, 1), as square as the layer's sides allow."""
    dims = max(1, int(dims))
    r = max(1, isqrt(dims))
    r_in = min(r, layer.in_features)
    r_out = min(layer.out_features, max(1, dims // r_in))
    r_in = min(layer.in_features, max(r_in, dims // r_out))  # a narrow output side leaves room on the input side
    return r_out, r_in


def block_of(name: str) -> int | None:
    """The index of the transformer block a layer's name puts it in (`model.layers.12.mlp.up_proj` -> 12): the
    first number in the name, so that a numbered module inside a block (an MoE expert) stays in its block."""
    found = re.search(r"\.(\d+)\.", f".{name}.")
    return int(found.group(1)) if found else None


def deepest(layers: list[TrackedLayer], n: int) -> list[TrackedLayer]:
    """At most n of the block layers, deepest first: whole blocks counted back from the last one, or,
    when not even the last block fits, its last n layers. Returned in the layers' order."""
    blocks: dict[int | None, list[TrackedLayer]] = {}
    for l in layers:
        blocks.setdefault(block_of(l.name), []).append(l)
    order = sorted(blocks, key=lambda b: -1 if b is None else b, reverse=True)
    chosen: list[TrackedLayer] = []
    for b in order:
        if len(chosen) + len(blocks[b]) > n:
            break
        chosen += blocks[b]
    if not chosen and n > 0:
        chosen = blocks[order[0]][-n:]
    keep = {l.name for l in chosen}
    return [l for l in layers if l.name in keep]


def allocate(layers: list[TrackedLayer], budget: int, head_share: float, head_name: str | None,
             min_layer_dims: int = 0) -> dict[str, tuple[int, int]]:
    """layer -> (r_out, r_in), in the layers' order; a layer left out is not tracked (min_layer_dims)."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if not 0 <= head_share <= 1:
        raise ValueError(f"head_share must be between 0 and 1, got {head_share}")
    blocks = [l for l in layers if l.name != head_name]
    has_head = any(l.name == head_name for l in layers)
    head_dims = (budget if not blocks else round(budget * head_share)) if has_head else 0
    rest = budget - head_dims
    if blocks and min_layer_dims > 0 and rest < min_layer_dims * len(blocks):
        blocks = deepest(blocks, rest // min_layer_dims)
        if not blocks and has_head:
            head_dims, rest = budget, 0
        elif not blocks:  # nothing but block layers and too few dimensions for one at the minimum
            blocks = deepest([l for l in layers if l.name != head_name], 1)
    per_block = rest / len(blocks) if blocks else 0
    kept = {l.name for l in blocks} | ({head_name} if has_head else set())
    return {l.name: sides(l, head_dims if l.name == head_name else per_block) for l in layers if l.name in kept}


__all__ = ["allocate", "block_of", "clamp", "deepest", "sides"]
