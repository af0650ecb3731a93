"""Per-layer (block-diagonal) preconditioners H^{-1/2} fitted on the training set's projected gradients.

kinds:
- `none`: identity (plain projected-gradient dot products).
- `raw`: H = E[vec(G) vec(G)^T], the (r_out r_in)^2 covariance of the projected gradients.
- `kfac`: H = S (x) A with A = E_tokens[x x^T] (projected inputs) and S = E_docs[sum_t g g^T]
  (projected output gradients); inverted through the two factors' eigenbases.
- `ekfac`: K-FAC's eigenbasis with the eigenvalues replaced by the gradients' own second moments
  in that basis (George et al. 2018); needs a second pass over the gradients.
Damping: lambda = damping_ratio x mean eigenvalue of H, per layer. All fitting in float64 (EK-FAC's eigenvalue pass may rotate the gradients in float32: update_second).
Sums carry their rounding error (Neumaier's compensated summation), so the fitted state does not
depend on the order the batches came in: processes that split a corpus (`reduce`) fit the state one
process fits on all of it. Eigenvectors have a fixed sign (each one's largest entry positive).
A layer whose output-gradient statistics come as a vector (LoGra.diagonal_out: the LM head's
vocabulary side kept whole) has a diagonal S: its K-FAC eigenbasis is the identity on that side.
"""
from __future__ import annotations

from typing import Callable

import torch

KINDS = ("none", "raw", "kfac", "ekfac")
COMP = "~"  # a sum's key + COMP: its running compensation (the rounding errors of the additions so far)


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a + b rounded, and the rounding error it made (Neumaier)."""
    t = a + b
    return t, torch.where(a.abs() >= b.abs(), (a - t) + b, (b - t) + a)


def _add(total: torch.Tensor, comp: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """A compensated sum (total, compensation) with each of `rows` added, in turn."""
    for x in rows:
        total, err = _two_sum(total, x)
        comp = comp + err
    return total, comp


def _signed(q: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (columns) with a fixed sign: each one's entry of largest magnitude positive."""
    top = q.abs().argmax(dim=0, keepdim=True)
    return q * torch.where(q.gather(0, top) < 0, -1.0, 1.0).to(q.dtype)


class Preconditioner:
    """Accumulate statistics batch by batch (`update`, and `update_second` for ekfac), then
    `finalize`, then `apply` maps {layer: (B, r_out, r_in)} gradients to (B, dim) whitened vectors."""

    def __init__(self, kind: str, shapes: dict[str, tuple[int, int]], damping_ratio: float = 0.1,
                 diagonal_out: frozenset[str] = frozenset()):
        if kind not in KINDS:
            raise ValueError(f"preconditioner must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.shapes = dict(shapes)  # layer -> (r_out, r_in), in vector order
        self.diagonal_out = frozenset(diagonal_out)  # layers with a diagonal output factor (kfac, ekfac)
        self.damping_ratio = damping_ratio
        self.n_docs = 0
        self.n_tokens = 0
        self.sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.shapes}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._bases = None  # kfac, ekfac: the fitted eigenbases (_eigenbases)
        self.finalized = kind == "none"

    @property
    def needs_token_stats(self) -> bool:
        return self.kind in ("kfac", "ekfac")

    @property
    def needs_second_pass(self) -> bool:
        return self.kind == "ekfac"

    def split(self, grads) -> dict[str, torch.Tensor]:
        """Accept {layer: (B, r_out, r_in)} or a flat (B, dim) tensor in vector order."""
        if isinstance(grads, dict):
            return grads
        out, start = {}, 0
        for name, (r_out, r_in) in self.shapes.items():
            out[name] = grads[:, start : start + r_out * r_in].reshape(-1, r_out, r_in)
            start += r_out * r_in
        if start != grads.shape[1]:
            raise ValueError(f"gradient width {grads.shape[1]} does not match the layers' total {start}")
        return out

    def _acc(self, name: str, key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float64)
        s = self.sums[name]
        if key not in s:
            s[key], s[key + COMP] = value, torch.zeros_like(value)
        else:  # a sum saved before COMP has none
            s[key], s[key + COMP] = _add(s[key], s.get(key + COMP, torch.zeros_like(value)), [value])

    def _sum(self, name: str, key: str) -> torch.Tensor:
        """A statistic's sum, its compensation added."""
        s = self.sums[name]
        return s[key] + s[key + COMP] if key + COMP in s else s[key]

    def update(self, grads, token_stats: dict | None = None) -> None:
        grads = self.split(grads)
        n = next(iter(grads.values())).shape[0]
        self.n_docs += n
        if self.kind == "raw":
            for name, g in grads.items():
                flat = g.reshape(n, -1).double()
                self._acc(name, "gg", flat.T @ flat)
        elif self.needs_token_stats:
            if not token_stats:
                raise ValueError(f"{self.kind} needs token statistics: call LoGra.gradients(batch, token_stats=True)")
            for name, (xx, gg, ntok) in token_stats.items():
                self._acc(name, "A", xx)
                self._acc(name, "S", gg)
            self.n_tokens += next(iter(token_stats.values()))[2]

    def stats_state(self) -> dict:
        """The running sums of `update`, to checkpoint a long pass and resume it later."""
        return {"n_docs": self.n_docs, "n_tokens": self.n_tokens,
                "sums": {n: {k: t.clone() for k, t in d.items()} for n, d in self.sums.items()}}

    def load_stats_state(self, state: dict) -> None:
        self.n_docs, self.n_tokens = state["n_docs"], state["n_tokens"]
        self.sums = {n: dict(d) for n, d in state["sums"].items()}

    def reduce(self, gather: Callable[[torch.Tensor], list[torch.Tensor]], second: bool = False,
               broadcast: Callable = lambda make: make()) -> None:
        """Combine statistics gathered by several processes, each over part of the data: `gather`
        returns every process's float64 tensor in rank order (an all-gather), and every process calls
        this at the same point, after `update` (or, with `second`, after `update_second`). Afterwards each
        holds the statistics of all the data (compensated sums: the same, to the last bit, whatever
        the split); a process that saw none contributes zeros. kfac and ekfac: the eigenbases are then
        fitted on rank 0 alone and taken from it (`broadcast(make)`), so every process rotates with the
        same ones."""
        if second:
            self._begin_second()
            keys = ("E",)
        else:
            keys = {"none": (), "raw": ("gg",), "kfac": ("A", "S"), "ekfac": ("A", "S")}[self.kind]
        for name, (r_out, r_in) in self.shapes.items():
            s_shape = (r_out,) if name in self.diagonal_out else (r_out, r_out)
            shapes = {"gg": (r_out * r_in, r_out * r_in), "A": (r_in, r_in), "S": s_shape, "E": (r_out, r_in)}
            s = self.sums[name]
            for key in keys:
                zero = torch.zeros(shapes[key], dtype=torch.float64)
                mine = torch.stack([s.get(key, zero), s.get(key + COMP, zero)])
                s[key], s[key + COMP] = _add(zero, zero, (x for part in gather(mine) for x in part))
        counts = lambda *n: [int(x) for x in sum(gather(torch.tensor(n, dtype=torch.float64))).tolist()]
        if second:
            self._second_docs = counts(self._second_docs)[0]
        else:
            self.n_docs, self.n_tokens = counts(self.n_docs, self.n_tokens)
            if self.kind in ("kfac", "ekfac"):
                self._bases = None
                self._bases = broadcast(self._eigenbases)

    def _eigenbases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (Q_S, eigenvalues of S, Q_A, eigenvalues of A), fitted once (or set by `reduce`)."""
        if self._bases is not None:
            return self._bases
        out = {}
        for name in self.shapes:
            A = self._sum(name, "A") / max(self.n_tokens, 1)
            S = self._sum(name, "S") / max(self.n_docs, 1)
            la, qa = torch.linalg.eigh(A)
            ls, qs = (S, None) if S.dim() == 1 else torch.linalg.eigh(S)  # None: the identity
            out[name] = (None if qs is None else _signed(qs), ls.clamp_min(0), _signed(qa), la.clamp_min(0))
        self._bases = out
        return out

    def _begin_second(self) -> None:
        if not self.state:
            self.state = {n: {"qs": qs, "qa": qa} for n, (qs, _, qa, _) in self._eigenbases().items()}
            self._second_docs = 0

    def rotate(self, grads, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ekfac, before `finalize`: the gradients in the layers' K-FAC eigenbases, flat (batch, dim),
        in `dtype` (the rotation `update_second` and `apply(eigenbasis=True)` do), for a caller that
        needs them twice: pass them back with `rotated=True`."""
        self._begin_second()
        return torch.cat([_rotate(g.detach().to("cpu", dtype), *self._basis(name, dtype)).flatten(1)
                          for name, g in self.split(grads).items()], dim=1)

    def _basis(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        st = self.state[name]
        return tuple(None if st[k] is None else st[k].to(dtype) for k in ("qs", "qa"))

    def update_second(self, grads, dtype: torch.dtype = torch.float64, rotated: bool = False) -> None:
        """ekfac only: second moments of the gradients rotated into the K-FAC eigenbasis, the rotation
        in `dtype` (float32: the arithmetic `apply(eigenbasis=True, dtype=torch.float32)` does, a third of
        float64's time) and the squares summed in float64, a document at a time with compensation (the
        same sums however the documents are split into calls). `rotated`: `grads` come from `rotate`."""
        grads = self.split(grads)
        self._begin_second()
        n = next(iter(grads.values())).shape[0]
        self._second_docs += n
        squares = torch.cat([(g if rotated else _rotate(g.detach().to("cpu", dtype), *self._basis(name, dtype)))
                             .reshape(n, -1).to(torch.float64).square() for name, g in
                             ((name, grads[name]) for name in self.shapes)], dim=1)  # in the layers' order
        widths = [r_out * r_in for r_out, r_in in self.shapes.values()]
        zero = lambda name: torch.zeros(self.shapes[name], dtype=torch.float64).flatten()
        total = torch.cat([self.sums[name].get("E", zero(name)).flatten() for name in self.shapes])
        comp = torch.cat([self.sums[name].get("E" + COMP, zero(name)).flatten() for name in self.shapes])
        total, comp = _add(total, comp, squares)  # one vector operation a document over every layer at once
        for name, t, c in zip(self.shapes, total.split(widths), comp.split(widths)):
            self.sums[name]["E"], self.sums[name]["E" + COMP] = t.reshape(self.shapes[name]), c.reshape(self.shapes[name])

    def finalize(self) -> "Preconditioner":
        if self.kind == "none":
            self.finalized = True
            return self
        if self.n_docs == 0:
            raise ValueError("cannot fit a preconditioner on zero documents")
        if self.kind == "raw":
            for name in self.shapes:
                H = self._sum(name, "gg") / self.n_docs
                evals, evecs = torch.linalg.eigh(H)
                evals = evals.clamp_min(0)
                damp = self.damping_ratio * evals.mean()
                inv_sqrt = evecs @ torch.diag((evals + damp).clamp_min(1e-30).rsqrt()) @ evecs.T
                self.state[name] = {"inv_sqrt": inv_sqrt, "damping": damp.reshape(1)}
        else:
            bases = self._eigenbases()
            for name, (qs, ls, qa, la) in bases.items():
                if self.kind == "ekfac":
                    if "E" not in self.sums[name]:
                        raise ValueError("ekfac needs a second pass: call update_second over the gradients first")
                    eig = self._sum(name, "E") / self._second_docs
                else:
                    eig = torch.outer(ls, la)  # eigenvalues of S (x) A
                damp = self.damping_ratio * eig.mean()
                self.state[name] = {"qs": qs, "qa": qa, "scale": (eig + damp).clamp_min(1e-30).rsqrt(),
                                    "damping": damp.reshape(1)}
        self.finalized = True
        return self

    def apply(self, grads, eigenbasis: bool = False, dtype: torch.dtype = torch.float64,
              rotated: bool = False) -> torch.Tensor:
        """Whitened vectors v = H^{-1/2} g, concatenated over layers: (batch, dim), float32.
        `eigenbasis` (kfac, ekfac): v in the layer's K-FAC eigenbasis instead, an orthogonal change
        of basis that keeps every inner product and norm and skips the rotation back (half the work;
        the high-fidelity stage's query-time path). `dtype`: the arithmetic's precision. `rotated`
        (with `eigenbasis`): `grads` are already in the eigenbasis (`rotate`), only scaled here."""
        grads = self.split(grads)
        if not self.finalized:
            raise RuntimeError("preconditioner is not fitted: call finalize() first")
        if rotated and not (eigenbasis and self.kind in ("kfac", "ekfac")):
            raise ValueError("rotated gradients are only scaled: kfac or ekfac, with eigenbasis=True")
        parts = []
        for name in self.shapes:
            g = grads[name].detach().to("cpu", dtype)
            n = g.shape[0]
            if self.kind == "none":
                v = g.reshape(n, -1)
            elif self.kind == "raw":
                v = g.reshape(n, -1) @ self.state[name]["inv_sqrt"].to(dtype)
            else:
                st = self.state[name]
                qs, qa = self._basis(name, dtype)
                rot = (g if rotated else _rotate(g, qs, qa)) * st["scale"].to(dtype)
                v = (rot if eigenbasis else _rotate(rot, qs, qa, back=True)).reshape(n, -1)
            parts.append(v.float())
        return torch.cat(parts, dim=1)

    def fold(self, projections: dict, keep_out: frozenset = frozenset()) -> tuple[dict, "Preconditioner"]:
        """kfac / ekfac: the K-FAC eigenbases moved into the projections, P_in <- Q_A^T P_in and
        P_out <- Q_S^T P_out, so that projected gradients come out in the eigenbasis and whitening is
        a scaling. Returns the new projections (layer -> (P_in, P_out), None for an identity) and the
        preconditioner that goes with them; the pair gives the vectors `apply(eigenbasis=True)` gives
        with the old pair. The rotation then costs a small matmul per token instead of one per
        document on the whole r_out x r_in gradient (the high-fidelity stage's query-time path).
        Layers in `keep_out` keep their P_out (a sketch, cheaper than any dense matrix) and the
        returned preconditioner still rotates their output side, per document."""
        if self.kind not in ("kfac", "ekfac") or not self.finalized:
            raise ValueError(f"only a fitted kfac or ekfac preconditioner folds, not {self.kind!r}")
        new_proj, new_state = {}, {}
        for name in self.shapes:
            st = self.state[name]
            p_in, p_out = projections[name]
            turn = lambda q, p: None if q is None else (q.T.float() if p is None else q.T.float() @ p.float())
            keep = name in keep_out or st["qs"] is None
            new_proj[name] = (turn(st["qa"], p_in) if st["qa"] is not None else p_in, p_out if keep else turn(st["qs"], p_out))
            new_state[name] = {"qs": st["qs"] if name in keep_out else None, "qa": None, "scale": st["scale"],
                               "damping": st["damping"]}
        folded = Preconditioner(self.kind, self.shapes, self.damping_ratio, self.diagonal_out)
        folded.n_docs, folded.state, folded.finalized = self.n_docs, new_state, True
        return new_proj, folded

    def state_dict(self) -> dict:
        return {"kind": self.kind, "damping_ratio": self.damping_ratio, "n_docs": self.n_docs,
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "diagonal_out": sorted(self.diagonal_out),
                "state": {n: {k: None if t is None else t.clone() for k, t in st.items()} for n, st in self.state.items()}}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Preconditioner":
        pre = cls(sd["kind"], {k: tuple(v) for k, v in sd["shapes"].items()}, sd["damping_ratio"],
                  frozenset(sd.get("diagonal_out", ())))
        pre.n_docs = sd["n_docs"]
        pre.state = sd["state"]
        pre.finalized = True
        return pre


def _rotate(g: torch.Tensor, qs: torch.Tensor | None, qa: torch.Tensor | None, back: bool = False) -> torch.Tensor:
    """Q_S^T g Q_A (or, `back`, Q_S g Q_A^T); None is the identity."""
    if qa is not None:
        g = g @ (qa.T if back else qa)
    if qs is not None:
        g = (qs if back else qs.T) @ g
    return g
