"""Spend a per-document dimension budget over the tracked layers.

A layer's LoGra block is r_out x r_in numbers. The rule (chosen on the three quality benchmarks,
benchmarks/quality; docs/quality.md "Choosing the defaults on all three"): the LM head gets
`head_share` of the budget, the blocks' layers split the rest equally; each layer's share b becomes r_in = r_out = floor(sqrt b),
and where a side is smaller than that it is kept whole and the other side takes what is left.
"""
from __future__ import annotations

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


def allocate(layers: list[TrackedLayer], budget: int, head_share: float, head_name: str | None) -> dict[str, tuple[int, int]]:
    """layer -> (r_out, r_in), in the layers' order."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if not 0 <= head_share <= 1:
        raise ValueError(f"head_share must be between 0 and 1, got {head_share}")
    blocks = [l for l in layers if l.name != head_name]
    has_head = any(l.name == head_name for l in layers)
    head_dims = (budget if not blocks else round(budget * head_share)) if has_head else 0
    per_block = (budget - head_dims) / len(blocks) if blocks else 0
    return {l.name: sides(l, head_dims if l.name == head_name else per_block) for l in layers}


__all__ = ["allocate", "clamp", "sides"]
