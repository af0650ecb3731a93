"""LoGra: per-example projected gradients of every tracked layer, from forward/backward hooks.

For a linear layer y = W x with output gradient g_t at token t, the weight gradient of one example
is G = sum_t g_t x_t^T. LoGra keeps P_out G P_in^T = sum_t (P_out g_t)(P_in x_t)^T: the inputs are
projected on the way forward, the output gradients on the way back, and one batched matmul per
layer gives every example's r_out x r_in gradient. No parameter ever requires a gradient; the
backward pass starts at the input embedding's output, so no weight gradient is computed.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import TrackedLayer, find_tracked_layers, input_embedding
from .model import effective_max_tokens


@dataclass(frozen=True)
class LoGraConfig:
    """Which layers, and each layer's r_out x r_in, by the first of these that is set:
    `rank` (r_in = r_out = rank everywhere: the explicit override), `max_side` (each side kept whole
    up to max_side features, projected to max_side beyond: the high-fidelity stage), else `budget`
    dimensions per document spread over the layers by `engine.budget.allocate`. A side kept whole is
    not projected at all (the exact gradient), whatever the mode."""
    rank: int | None = None
    budget: int = 2048
    head_share: float = 0.75  # of the budget, to the LM head when it is tracked (engine.budget)
    min_layer_dims: int = 0  # no block layer gets fewer dimensions: the budget goes to the deepest blocks (engine.budget)
    max_side: int | None = None
    # max_side mode: the LM head's output (vocabulary) side kept whole whatever its size; its
    # output-gradient statistics are then only the diagonal (a vocabulary-square factor is too big)
    head_whole: bool = False
    head: bool = True  # track the LM head (output embedding) besides the blocks' linear layers
    # the LM head's output (vocabulary) side, where projected, by a sparse sign sketch (sketch_matrix)
    # instead of a Gaussian: about V operations a token instead of r_out x V
    head_sketch: bool = False
    head_only: bool = False  # track the LM head alone (then a forward pass and the head's gradient suffice)
    seed: int = 0
    include: str | None = None  # regex over layer names
    exclude: str | None = None
    max_tokens: int = 512  # clamped to the model's context length

    def shapes(self, layers: list[TrackedLayer], head_name: str | None) -> dict[str, tuple[int, int]]:
        """layer -> (r_out, r_in)."""
        from .budget import allocate, clamp
        if self.rank is not None:
            return {l.name: clamp(l, self.rank, self.rank) for l in layers}
        if self.max_side is not None:
            return {l.name: clamp(l, l.out_features if self.head_whole and l.name == head_name else self.max_side,
                                  self.max_side) for l in layers}
        return allocate(layers, self.budget, self.head_share, head_name, self.min_layer_dims)


def projection_matrix(seed: int, layer: str, role: str, rank: int, dim: int) -> torch.Tensor:
    """A (rank x dim) Gaussian matrix with N(0, 1/rank) entries, seeded by (seed, layer, role) so
    that every process, and every later query, rebuilds exactly the same projection."""
    digest = hashlib.sha256(f"{seed}/{layer}/{role}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(rank, dim, generator=gen) / rank**0.5


def sketch_matrix(seed: int, layer: str, role: str, rank: int, dim: int) -> torch.Tensor:
    """A (rank x dim) sparse sign sketch (CountSketch) as a matrix: each column holds one entry, +-1,
    in a row drawn without replacement so that every row gets dim / rank columns (to one). Like the
    Gaussian it keeps inner products in expectation, with no more variance per inner product, yet as
    the LM head's projection it ranked worse on the quality benchmarks (benchmarks/quality/projection.py).
    Multiplying by it is a signed scatter-add of the columns (LoGra's hooks do that, `_sketch`).
    Seeded as projection_matrix."""
    digest = hashlib.sha256(f"{seed}/{layer}/{role}/sketch".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    rows = torch.randperm(dim, generator=gen) % rank
    signs = torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1
    out = torch.zeros(rank, dim)
    out[rows, torch.arange(dim)] = signs
    return out


def _padded_rows(rows: int) -> int:
    """A projection's rows as the hooks multiply by it: up to a multiple of 16 beyond 8 (LoGra._padded)."""
    return rows + (-rows % 16 if rows > 8 else 0)


def _sketch_parts(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row of each column, its sign) when `p` has one +-1 entry per column (sketch_matrix), else None."""
    nonzero = p != 0
    if not bool((nonzero.sum(dim=0) == 1).all()):
        return None
    rows = nonzero.float().argmax(dim=0)
    signs = p.gather(0, rows[None]).squeeze(0)
    return (rows, signs) if bool((signs.abs() == 1).all()) else None


@dataclass
class ProjectedGradients:
    grads: dict[str, torch.Tensor]  # layer -> (batch, r_out, r_in), float32
    losses: torch.Tensor  # (batch,) summed token loss of each example
    n_loss_tokens: torch.Tensor  # (batch,)
    # layer -> (sum x x^T over tokens, sum g g^T over tokens, token count); for K-FAC factors
    token_stats: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)


class LoGra:
    """Projected per-example gradients for one model. Hooks are attached only inside `gradients`."""

    def __init__(self, model: nn.Module, config: LoGraConfig = LoGraConfig(), layers: list[TrackedLayer] | None = None,
                 shapes: dict[str, tuple[int, int]] | None = None):
        """`shapes` (layer -> (r_out, r_in), in vector order) fixes the layers and their sizes, as an
        index's manifest records them; otherwise `config` chooses both."""
        self.model = model
        self.config = config
        self.max_tokens = effective_max_tokens(model, config.max_tokens)  # never past the model's context
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if layers is None and shapes is not None:  # as recorded, in that order
            by_name = {l.name: l for l in find_tracked_layers(model, include_embeddings=True)}
            missing = [n for n in shapes if n not in by_name]
            if missing:
                raise ValueError(f"{type(model).__name__} has no trackable layer {missing[0]!r}")
            layers = [by_name[n] for n in shapes]
        elif layers is None and config.head_only:
            layers = [l for l in find_tracked_layers(model, include_embeddings=True) if l.module is head]
            if not layers:
                raise ValueError(f"{type(model).__name__} has no linear LM head to track")
        elif layers is None:
            layers = find_tracked_layers(model, config.include, config.exclude, include_embeddings=config.head)
        self.layers = layers
        self.head_name = next((l.name for l in layers if head is not None and l.module is head), None)
        self.shapes: dict[str, tuple[int, int]] = dict(shapes) if shapes is not None else config.shapes(layers, self.head_name)
        self.layers = [l for l in self.layers if l.name in self.shapes]  # the budget may leave shallow layers out
        # the LM head alone: the backward pass starts at its input (a forward pass and the head's gradient)
        self.head_only = [l.name for l in self.layers] == [self.head_name]
        # layers whose token statistics keep only the diagonal of sum g g^T (Preconditioner reads it so)
        self.diagonal_out = frozenset({self.head_name} if config.head_whole and config.max_side is not None
                                      and self.head_name else ())
        device = next(model.parameters()).device
        # None: that side is kept whole (r = features), so it is not multiplied by anything
        self.projections: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for layer in self.layers:
            r_out, r_in = self.shapes[layer.name]
            p_in = None if r_in == layer.in_features else projection_matrix(config.seed, layer.name, "in", r_in, layer.in_features).to(device)
            draw = sketch_matrix if config.head_sketch and layer.name == self.head_name else projection_matrix
            p_out = None if r_out == layer.out_features else draw(config.seed, layer.name, "out", r_out, layer.out_features).to(device)
            self.projections[layer.name] = (p_in, p_out)
        self.dim = sum(o * i for o, i in self.shapes.values())
        self._root: tuple[float, nn.Module | None] | None = None  # backward_root, found once
        self._derived_cache: dict = {}  # (layer, side, what) -> (projection, its version, what): _derived

    def backward_root(self) -> tuple[float, nn.Module | None]:
        """Where the backward pass starts, as (depth, module): the input of the first transformer block
        holding a tracked layer (depth = its index), of the LM head when it is tracked alone (depth inf),
        or (-1, None) for the input embedding's output (block 0). Nothing before it is differentiated:
        a budget that tracks the deepest blocks only (engine.budget) pays for their part of the backward."""
        if self._root is None:
            self._root = self._find_root()
        return self._root

    def _find_root(self) -> tuple[float, nn.Module | None]:
        if self.head_only:
            return float("inf"), self.layers[0].module
        from .budget import block_of
        # one stack of blocks (the outermost ModuleList) whose members hold every tracked block layer
        stacks = [name for name, m in self.model.named_modules() if isinstance(m, nn.ModuleList) and name]
        blocks = [block_of(l.name) for l in self.layers if l.name != self.head_name]
        outer = [s for s in stacks if not any(s.startswith(o + ".") for o in stacks)]
        if len(outer) != 1 or not blocks or None in blocks or min(blocks) == 0:
            return -1, None
        return min(blocks), self.model.get_submodule(f"{outer[0]}.{min(blocks)}")

    def projection(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_in, P_out) of a layer as matrices (an identity for a side kept whole)."""
        layer = next(l for l in self.layers if l.name == name)
        p_in, p_out = self.projections[name]
        eye = lambda n: torch.eye(n, device=next(self.model.parameters()).device)
        return (eye(layer.in_features) if p_in is None else p_in), (eye(layer.out_features) if p_out is None else p_out)

    def with_projections(self, projections: dict) -> "LoGra":
        """The same projector (model, layers, shapes) with other projections, layer -> (P_in, P_out)
        on the model's device (e.g. Preconditioner.fold's); no projection is drawn again."""
        other = copy.copy(self)
        other.projections, other._derived_cache = dict(projections), {}
        return other

    def _derived(self, name: str, side: int, what: str, make):
        """make(P) for the layer's P_in (side 0) or P_out (side 1), cached while that projection is the
        same tensor, unchanged; None for a side kept whole."""
        p = self.projections[name][side]
        if p is None:
            return None
        hit = self._derived_cache.get((name, side, what))
        if hit is None or hit[0] is not p or hit[1] != p._version:
            hit = self._derived_cache[(name, side, what)] = (p, p._version, make(p))
        return hit[2]

    def _padded(self, name: str, side: int) -> torch.Tensor | None:
        """The layer's P_in (side 0) or P_out (side 1) with zero rows added up to a multiple of 16
        (beyond 8 rows; _padded_rows): BLAS multiplies by it faster (1.2-1.9x on the CPU at 11, 45, 55
        or 221 rows), and the extra outputs are zeros, sliced off. None for a side kept whole."""
        def pad(p):
            extra = _padded_rows(p.shape[0]) - p.shape[0]
            return torch.cat([p, p.new_zeros(extra, p.shape[1])]) if extra else p
        return self._derived(name, side, "padded", pad)

    def _sketch(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The layer's P_out as a sketch (row of each column, sign, rows padded as _padded pads them)
        when it is one (sketch_matrix: drawn, or loaded from an index, or left unfolded by fold), else
        None."""
        def parts(p):
            found = _sketch_parts(p)
            return None if found is None else (*found, _padded_rows(p.shape[0]))
        return self._derived(name, 1, "sketch", parts)

    def sketched(self, name: str) -> bool:
        """Whether the layer's output side is projected by a sketch (sketch_matrix)."""
        return self._sketch(name) is not None

    def layer_spec(self) -> list[dict]:
        return [
            {"name": l.name, "in_features": l.in_features, "out_features": l.out_features,
             "r_in": self.shapes[l.name][1], "r_out": self.shapes[l.name][0]}
            for l in self.layers
        ]

    def flatten(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, dim): layers in tracked order, each (r_out, r_in) row-major."""
        return torch.cat([grads[l.name].reshape(grads[l.name].shape[0], -1) for l in self.layers], dim=1)

    def gradients(self, batch: dict[str, torch.Tensor], token_stats: bool = False) -> ProjectedGradients:
        """Projected gradients of each example's summed loss over its labelled tokens.
        `batch` comes from `engine.encoding.collate` (labels -100 on prompt and padding)."""
        return joint_gradients([self], batch, [token_stats])[0]

    def _empty(self, out: ProjectedGradients, batch_size: int, n_tokens: int, stats: dict | None, device) -> None:
        """Fill in what a layer the backward pass never reached has: zeros (a batch with no loss
        token at all), and the token statistics' shapes."""
        for layer in self.layers:
            if layer.name not in out.grads:
                out.grads[layer.name] = torch.zeros(batch_size, *self.shapes[layer.name], device=device)
        if stats is not None:
            for layer in self.layers:
                r_out, r_in = self.shapes[layer.name]
                xx = stats.get(layer.name, {}).get(0, torch.zeros(r_in, r_in, device=device))
                empty = torch.zeros(r_out, device=device) if layer.name in self.diagonal_out else torch.zeros(r_out, r_out, device=device)
                gg = stats.get(layer.name, {}).get(1, empty)
                out.token_stats[layer.name] = (xx, gg, n_tokens)


def joint_gradients(logras: Sequence[LoGra], batch: dict[str, torch.Tensor],
                    token_stats: Sequence[bool]) -> list[ProjectedGradients]:
    """`LoGra.gradients` of several projectors of the same model and layers (e.g. the index's compact
    and high-fidelity stages) from one forward and one backward pass: the model's work is shared (and
    each layer's input is masked once), only the projections are per projector. Each result equals
    that projector's own `gradients`."""
    first = logras[0]
    if any(l.model is not first.model for l in logras[1:]):
        raise ValueError("joint_gradients needs projectors of one model")
    device = next(first.model.parameters()).device
    has_padding = not bool(batch["attention_mask"].all())  # asked on the host; no padding, no masking
    ids, mask, labels = (_to_device(batch[k], device) for k in ("input_ids", "attention_mask", "labels"))
    grads: list[dict[str, torch.Tensor]] = [{} for _ in logras]
    stats: list[dict | None] = [{} if s else None for s in token_stats]
    with torch.enable_grad(), _hooks(logras, mask.float(), has_padding, grads, stats):
        logits = first.model(input_ids=ids, attention_mask=mask).logits.float()
        losses = per_example_loss(logits, labels)
        if losses.requires_grad:
            losses.sum().backward()
    n_tok = (labels[:, 1:] != -100).sum(dim=1)
    outs = []
    for logra, g, s in zip(logras, grads, stats):
        out = ProjectedGradients(g, losses.detach(), n_loss_tokens=n_tok)
        logra._empty(out, ids.shape[0], int(mask.sum()), s, device)
        outs.append(out)
    return outs


@contextlib.contextmanager
def _hooks(logras: Sequence[LoGra], mask: torch.Tensor, has_padding: bool, grads: list[dict], token_stats: list[dict | None]):
    """One forward hook per tracked layer for all the projectors (a layer any of them tracks), and
    from it one hook on the layer's output gradient; each projector's (r_out, r_in) gradients go to
    its own `grads` dict, its token statistics (where asked) to its own `token_stats` dict. A projector's
    numbers do not depend on the others it runs with."""
    first = logras[0]
    handles = []

    def start_backward(_module, _inputs, output):
        # Activation gradients only: the embedding output becomes the root of the backward graph.
        return output.requires_grad_(True)

    def start_at_input(_module, args, kwargs):
        # The first tracked block's (or the LM head's) input becomes the root: nothing before it is differentiated
        if args:
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    def capture(name: str, users: list[int]):
        # per projector: P_in padded (_padded; None: a side kept whole), the output side's projection as a
        # function of the output gradients, (r_out, r_in), diagonal S
        spec = [(logras[k]._padded(name, 0), _out_projection(logras[k], name), logras[k].shapes[name],
                 name in logras[k].diagonal_out) for k in users]

        def forward_hook(_module, inputs, output):
            # Detached: the projected inputs need no gradient, and a graph through them would tie
            # each batch's statistics to the hooks' closures in a cycle torch cannot free (memory
            # grew ~18 MB a batch on the demo model with token statistics).
            x = inputs[0].detach()
            if x.shape[:2] != mask.shape:
                raise RuntimeError(f"layer {name} sees input of shape {tuple(x.shape)}, not (batch, tokens, features); "
                                   "exclude it with a layer filter")
            x = x.float()
            if has_padding:  # padding contributes nothing (masked before projecting: the same numbers as after)
                x = x * mask[..., None]
            xps = [x if p_in is None else x @ p_in.T for p_in, _, _, _ in spec]
            for k, xp, (_, _, (_, r_in), _) in zip(users, xps, spec):
                if token_stats[k] is not None:
                    flat = xp.reshape(-1, xp.shape[-1])
                    _add(token_stats[k], name, 0, (flat.T @ flat)[:r_in, :r_in])
            if output.requires_grad:
                output.register_hook(lambda g: _on_grad(g.float(), xps))

        def _on_grad(g, xps):
            for k, xp, (_, project, (r_out, r_in), diagonal) in zip(users, xps, spec):
                gp = project(g)
                # A module called twice in one forward contributes both calls' terms, as autograd would.
                _add(grads[k], name, None, torch.bmm(gp.transpose(1, 2), xp)[:, :r_out, :r_in])
                if token_stats[k] is not None:
                    flat = gp.reshape(-1, gp.shape[-1])
                    _add(token_stats[k], name, 1, (flat * flat).sum(dim=0) if diagonal else (flat.T @ flat)[:r_out, :r_out])

        return forward_hook

    users: dict[str, list[int]] = {}
    modules = {}
    for k, logra in enumerate(logras):
        for layer in logra.layers:
            users.setdefault(layer.name, []).append(k)
            modules[layer.name] = layer.module
    try:
        # the earliest root any projector needs: each projector's layers are at or past it
        _, root = min((l.backward_root() for l in logras), key=lambda r: r[0])
        if root is None:
            handles.append(input_embedding(first.model).register_forward_hook(start_backward))
        else:
            handles.append(root.register_forward_pre_hook(start_at_input, with_kwargs=True))
        for name, ks in users.items():
            handles.append(modules[name].register_forward_hook(capture(name, ks)))
        yield
    finally:
        for h in handles:
            h.remove()


def _out_projection(logra: LoGra, name: str):
    """g -> g P_out^T for a layer's output gradients (..., out_features): a matmul by the padded
    projection, a signed scatter-add for a sketch (its rows padded alike), g itself for a side kept whole."""
    sketch = logra._sketch(name)
    if sketch is not None:
        rows, signs, width = sketch

        def scatter(g):
            flat = g.reshape(-1, g.shape[-1])
            out = flat.new_zeros(flat.shape[0], width).index_add_(1, rows, flat * signs)
            return out.view(*g.shape[:-1], width)
        return scatter
    p_out = logra._padded(name, 1)
    return (lambda g: g) if p_out is None else (lambda g: g @ p_out.T)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned host memory lets the copy to a GPU run asynchronously with the host's next work.
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _add(store: dict, name: str, slot, value: torch.Tensor) -> None:
    if slot is None:
        store[name] = store[name] + value if name in store else value
    else:
        entry = store.setdefault(name, {})
        entry[slot] = entry[slot] + value if slot in entry else value


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of each example over its labelled tokens."""
    # The labels shifted left (the last position unlabelled) rather than the logits right: the logits
    # are not copied, nor is a zeroed copy of their gradient made on the way back.
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100,
                          reduction="none")
    return tok.view(shifted.shape)[:, :-1].sum(dim=1)
