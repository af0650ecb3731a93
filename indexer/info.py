"""`python -m indexer info DIR`: an index's manifest as a page a person reads (`--json`: the manifest)."""
from __future__ import annotations

from pathlib import Path

from .store import HIGH_VECTORS, VECTORS, read_manifest


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _layers(layers: list[dict]) -> list[str]:
    return [f"  {l['name']}: {l['r_out']} x {l['r_in']} of {l['out_features']} x {l['in_features']}" for l in layers]


def summary(index_dir: str | Path) -> str:
    root = Path(index_dir)
    m = read_manifest(root)
    model, stats, build, faiss = m["model"], m.get("stats", {}), m.get("build", {}), m.get("faiss", {})
    pre = m["preconditioner"]
    budget = m.get("budget")
    sizes = {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
    table = sum(p.stat().st_size for p in (root / "documents.lance").rglob("*") if p.is_file()) \
        if (root / "documents.lance").is_dir() else 0
    total = sum(sizes.values()) + table
    faiss_bytes = sum(v for k, v in sizes.items() if k.startswith("faiss-"))
    spread = f"budget {budget['dims']:,}, {budget['head_share']:g} to the LM head" if budget else f"rank {m.get('rank')}"
    lines = [
        f"index        {root.resolve()} (format {m['format_version']})",
        f"model        {model['name_or_path']} ({model.get('class')}, {model.get('dtype')}, fingerprint {model['fingerprint']})",
        f"documents    {m['n_documents']:,} (skipped {stats.get('skipped', 0)}, truncated {stats.get('truncated', 0)} "
        f"at {m['max_tokens']} tokens; {stats.get('tokens', 0):,} tokens)",
        f"data         {', '.join(m['data'].get('files', []))} (text {m['data'].get('text_field')!r}"
        + (f", prompt {m['data']['prompt_field']!r} / response {m['data']['response_field']!r}"
           if m["data"].get("prompt_field") else "") + f", id {m['data'].get('id_field')!r})",
        f"vectors      {m['dim']:,} dimensions ({spread}), {pre['kind']} (damping {pre['damping_ratio']:g}), seed {m['seed']}",
        f"layers       {len(m['layers'])} (r_out x r_in of out x in):", *_layers(m["layers"]),
    ]
    high = m.get("high")
    if high:
        hb = high.get("budget") or {}
        lines.append(f"high stage   {high['dim']:,} dimensions (budget {hb.get('dims', '?'):,}, {hb.get('head_share', '?')} to the "
                     f"LM head), {high['preconditioner']['kind']} (damping {high['preconditioner']['damping_ratio']:g}) "
                     f"fitted on {high.get('sample_documents', '?'):,} documents; stored as float16")
    else:
        lines.append("high stage   none (built with --no-high: queries answer with the compact vectors)")
    probe = f", {faiss['nprobe']} of {faiss['nlist']} lists probed" if "nlist" in faiss else ""
    lines.append(f"faiss        {faiss.get('type')}{probe}, rerank x{faiss.get('rerank_factor', 1)}, built on {faiss.get('device', 'cpu')}")
    lines.append(f"size         {_mib(total)}: vectors {_mib(sizes.get(VECTORS, 0))}, high-fidelity {_mib(sizes.get(HIGH_VECTORS, 0))}, "
                 f"FAISS {_mib(faiss_bytes)}, documents {_mib(table)}, state {_mib(sizes.get('state.pt', 0))}")
    if build:
        extra = "".join(f", {label} {build[k]:,.0f} s" for k, label in (("high_fit_seconds", "high-fidelity fit"),
                                                                         ("high_seconds", "high-fidelity vectors")) if k in build)
        lines.append(f"built        in {build.get('seconds', 0):,.0f} s (gradients {build.get('gradient_seconds', 0):,.0f} s at "
                     f"{build.get('tokens_per_s', 0):,.0f} tokens/s{extra}) on {build.get('device')}, "
                     f"{build.get('processes', 1)} process{'es' if build.get('processes', 1) > 1 else ''}")
    for a in m.get("appends", []):
        lines.append(f"appended     {a['documents']:,} documents from {', '.join(a['files'])} in {a['seconds']:,.0f} s")
    return "\n".join(lines)
