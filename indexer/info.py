"""`python -m indexer info DIR`: an index's manifest as a page a person reads (`--json`: the manifest)."""
from __future__ import annotations

import re
from pathlib import Path

from .manifest import LayerInfo
from .store import HIGH_FILES, NORMS, SCALES, VECTORS, compact_bytes_per_document, high_bytes_per_document, read_manifest


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


_BLOCK = re.compile(r"(?<=\.)\d+(?=\.)")  # the first all-digit part of a dotted name: the block number


def _numbers(blocks: list[int]) -> str:
    """0, 1, 2, 3, 5, 7, 8, 9 -> "{0..3,5,7..9}": runs of three or more as a..b."""
    runs: list[list[int]] = []
    for b in sorted(blocks):
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    parts = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs]
    return "{" + ",".join(parts) + "}"


def _layers(layers: list[LayerInfo]) -> list[str]:
    """One line per layer, except that layers differing only by their block number, with the same
    r_out x r_in and out x in, share one line: `model.layers.{0..29}.self_attn.q_proj: 30x 8 x 8 of ...`.
    A block whose layer has another shape keeps a line of its own. In order of first appearance."""
    groups: dict[tuple, list[tuple[int | None, str]]] = {}
    for l in layers:
        m = _BLOCK.search(l.name)
        pattern = l.name[:m.start()] + "{}" + l.name[m.end():] if m else l.name
        key = (pattern, l.r_out, l.r_in, l.out_features, l.in_features)
        groups.setdefault(key, []).append((int(m.group()) if m else None, l.name))
    lines = []
    for (pattern, r_out, r_in, out_f, in_f), members in groups.items():
        shape = f"{r_out} x {r_in} of {out_f} x {in_f}"
        if len(members) == 1:
            lines.append(f"  {members[0][1]}: {shape}")
        else:
            name = pattern.replace("{}", _numbers([b for b, _ in members]))
            lines.append(f"  {name}: {len(members)}x {shape}")
    return lines


def _spread(budget, layers) -> str:
    """How a stage's budget was spread (engine.budget): the head's share, and the blocks tracked."""
    from engine.budget import block_of
    blocks = sorted({b for l in layers if (b := block_of(l.name)) is not None})
    text = f"budget {budget.dims:,}, {budget.head_share:g} to the LM head"
    if budget.min_layer_dims:
        text += f", at least {budget.min_layer_dims:,} a block layer"
        text += f": blocks {_numbers(blocks)} tracked" if blocks else ": the LM head alone"
    return text


def summary(index_dir: str | Path) -> str:
    root = Path(index_dir)
    m = read_manifest(root)
    model, stats, build, faiss, pre, d = m.model, m.stats, m.build, m.faiss, m.preconditioner, m.data
    sizes = {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
    table = sum(p.stat().st_size for p in (root / "documents.lance").rglob("*") if p.is_file()) \
        if (root / "documents.lance").is_dir() else 0
    total = sum(sizes.values()) + table
    faiss_bytes = sum(v for k, v in sizes.items() if k.startswith("faiss-"))
    spread = _spread(m.budget, m.layers) if m.budget else f"rank {m.rank}"
    lines = [
        f"index        {root.resolve()} (format {m.format_version})",
        f"model        {model.name_or_path} ({model.class_name}, {model.dtype}, fingerprint {model.fingerprint})",
        f"documents    {m.n_documents:,} (skipped {stats.skipped}, truncated {stats.truncated} "
        f"at {m.max_tokens} tokens; {stats.tokens:,} tokens)",
        f"data         {', '.join(d.files)} (text {d.text_field!r}"
        + (f", prompt {d.prompt_field!r} / response {d.response_field!r}" if d.prompt_field else "") + f", id {d.id_field!r})",
        f"vectors      {m.dim:,} dimensions ({spread}), {pre.kind} (damping {pre.damping_ratio:g}), seed {m.seed}; "
        f"stored as {m.storage} ({compact_bytes_per_document(m.storage, m.dim):,} bytes a document with its "
        f"{'norm' if m.storage == 'float32' else 'scale and norm'})",
        f"layers       {len(m.layers)} (r_out x r_in of out x in; a block's repeats on one line):", *_layers(m.layers),
    ]
    high = m.high
    if high:
        lines.append(f"high stage   {high.dim:,} dimensions ({_spread(high.budget, high.layers)}"
                     f"{', its vocabulary side sketched' if high.head_projection == 'sketch' else ''}), "
                     f"{high.preconditioner.kind} (damping {high.preconditioner.damping_ratio:g}) "
                     f"fitted on {high.sample_documents:,} documents; stored as {high.storage} "
                     f"({high_bytes_per_document(high.storage, high.dim):,} bytes a document with its "
                     f"{'norm' if high.storage == 'float16' else 'scale and norm'})")
    else:
        lines.append("high stage   none (built with --no-high: queries answer with the compact vectors)")
    probe = f", {faiss.nprobe} of {faiss.nlist} lists probed" if faiss.nlist else ""
    built = "built when the index is opened (no file)" if faiss.type == "flat" else f"built on {faiss.device}"
    lines.append(f"faiss        {faiss.type}{probe}, rerank x{faiss.rerank_factor}, {built}")
    high_bytes = sum(sizes.get(f, 0) for f in HIGH_FILES)
    compact = sum(sizes.get(f, 0) for f in (VECTORS, SCALES, NORMS))
    lines.append(f"size         {_mib(total)}: vectors {_mib(compact)}, high-fidelity {_mib(high_bytes)}, "
                 f"FAISS {_mib(faiss_bytes)}, documents {_mib(table)}, state {_mib(sizes.get('state.pt', 0))}")
    fit = f", high-fidelity fit {build.high_fit_seconds:,.0f} s" if build.high_fit_seconds is not None else ""
    lines.append(f"built        in {build.seconds:,.0f} s (gradients {build.gradient_seconds:,.0f} s at "
                 f"{build.tokens_per_s:,.0f} tokens/s{fit}) on {build.device}, "
                 f"{build.processes} process{'es' if build.processes > 1 else ''}")
    for a in m.appends:
        lines.append(f"appended     {a.documents:,} documents from {', '.join(a.files)} in {a.seconds:,.0f} s")
    return "\n".join(lines)
