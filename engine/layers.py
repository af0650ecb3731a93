"""Find the layers LoGra tracks: every linear map inside the transformer blocks."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class TrackedLayer:
    name: str
    module: nn.Module
    in_features: int
    out_features: int


def _features(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 stores the weight transposed: (in, out)
        return module.weight.shape[0], module.nf
    return None


def find_tracked_layers(
    model: nn.Module,
    include: str | None = None,
    exclude: str | None = None,
    include_embeddings: bool = False,
) -> list[TrackedLayer]:
    """Linear/Conv1D modules that live under a ModuleList (the stack of transformer blocks).

    `include` / `exclude` are regular expressions searched in the module name. The LM head is a
    Linear outside the blocks, so it is left out unless `include_embeddings` (which adds it back;
    embedding lookups themselves are not linear maps over an input and are never tracked).
    """
    block_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = []
    for name, module in model.named_modules():
        feats = _features(module)
        if feats is None:
            continue
        in_blocks = any(name.startswith(p) for p in block_prefixes)
        is_head = head is not None and module is head
        if not (in_blocks or (include_embeddings and is_head)):
            continue
        if include and not re.search(include, name):
            continue
        if exclude and re.search(exclude, name):
            continue
        layers.append(TrackedLayer(name, module, *feats))
    if not layers:
        raise ValueError(
            f"no trackable layers found in {type(model).__name__} (include={include!r}, exclude={exclude!r}): "
            "LoGra tracks nn.Linear and GPT-2 Conv1D modules inside the transformer blocks"
        )
    return layers


def input_embedding(model: nn.Module) -> nn.Module:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embedding module to start the backward pass from")
    return emb


__all__ = ["TrackedLayer", "find_tracked_layers", "input_embedding"]
