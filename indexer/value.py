"""What each document, and each group of documents (a provider, source, licence: any metadata
field), was worth to the model over a set of queries: `python -m indexer value` and POST /value.

A document's value is its summed score over the queries (influence mode by default: g_q^T H^-1 g_d,
additive, so a group's value is the sum over its documents; it predicts how much the queries' total
loss would rise without them). Every document and every query is scored exactly, as blocked matrix
products over the stored vectors of the chosen stage (memory bounded by the block, not the index;
on `device`, e.g. cuda), never through the ANN index. Confidence intervals come from a bootstrap
over the queries."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import torch

from .store import Index

MODES = ("influence", "cosine")
BLOCK_BYTES = 256 << 20  # document vectors scored per block
CONFIDENCE = 0.95
MISSING = "(missing)"  # CSV and parquet cells of a group field its documents lack


def document_scores(index: Index, stage: str, queries: np.ndarray, mode: str = "influence", device: str = "cpu"):
    """(rows, scores) blocks: scores (len(queries), len(rows)) of every document against every query,
    exact, in float64 after float32 products. `queries`: the stage's query vectors (queries.stage_vectors)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device)
    q_norm = torch.linalg.vector_norm(q, dim=1)
    if stage == "high":  # unit rows and norms apart (store.HighVectorWriter)
        vectors, norms = index.high_vectors, index.high_norms
        q_side = q / torch.where(q_norm > 0, q_norm, 1)[:, None] if mode == "cosine" else q
    else:
        vectors, norms = index.vectors, index.norms
        q_side = q
    block = max(1, BLOCK_BYTES // (4 * vectors.shape[1]))
    for s in range(0, len(vectors), block):
        x = torch.as_tensor(np.array(vectors[s : s + block], dtype=np.float32), device=device)  # a copy: the map is read-only
        sc = (q_side @ x.T).double()
        n = torch.as_tensor(norms[s : s + block], dtype=torch.float64, device=device)
        if stage == "high" and mode == "influence":
            sc = sc * n[None, :]
        elif stage == "fast" and mode == "cosine":
            denom = q_norm.double()[:, None] * n[None, :]
            sc = torch.where(denom > 0, sc / torch.where(denom > 0, denom, 1), torch.zeros_like(sc))
        yield np.arange(s, s + x.shape[0]), sc.cpu().numpy()


def value_report(index: Index, stage: str, queries: np.ndarray, group_by: list[str], mode: str = "influence",
                 top: int = 5, bootstrap: int = 1000, seed: int = 0, device: str = "cpu",
                 per_document: bool = False) -> dict:
    """Every document's value over `queries` and, per group of the metadata fields `group_by` (its
    documents lacking a field form their own group): n_documents, value, share of all positive and of
    all negative value, value per document, a bootstrap confidence interval over the queries, and the
    top documents. With `per_document`, also every document's value ("documents", by row)."""
    if not group_by:
        raise ValueError("group_by needs at least one metadata field")
    groups, codes = index.groups(group_by)
    if groups == [{}]:
        raise ValueError(f"no document has the metadata field{'s' * (len(group_by) > 1)} {', '.join(map(repr, group_by))}")
    n_q, n_g = len(queries), len(groups)
    if n_q == 0:
        raise ValueError("no queries to value")
    values = np.zeros(len(index))
    per_query = np.zeros((n_q, n_g))  # each query's summed score per group: the bootstrap's unit
    for rows, sc in document_scores(index, stage, queries, mode, device):
        values[rows] = sc.sum(axis=0)
        order = np.argsort(codes[rows], kind="stable")
        block_codes = codes[rows][order]
        starts = np.flatnonzero(np.r_[True, block_codes[1:] != block_codes[:-1]])
        per_query[:, block_codes[starts]] += np.add.reduceat(sc[:, order], starts, axis=1)
    rng = np.random.default_rng(seed)
    resampled = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=bootstrap) @ per_query if bootstrap else None
    pos, neg = np.clip(values, 0, None), np.clip(values, None, 0)
    total_pos, total_neg = pos.sum(), neg.sum()
    ids = index.ids
    out = []
    for g, group in enumerate(groups):
        members = np.flatnonzero(codes == g)
        v = float(per_query[:, g].sum())
        best = members[np.argsort(-values[members], kind="stable")[:top]]
        lo, hi = (np.percentile(resampled[:, g], [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
                  if resampled is not None else (None, None))
        out.append({"group": group, "n_documents": int(len(members)), "value": v,
                    "share_positive": float(pos[members].sum() / total_pos) if total_pos > 0 else 0.0,
                    "share_negative": float(neg[members].sum() / total_neg) if total_neg < 0 else 0.0,
                    "value_per_document": v / len(members),
                    "ci_low": None if lo is None else float(lo), "ci_high": None if hi is None else float(hi),
                    "top_documents": [{"id": ids[r], "value": float(values[r])} for r in best]})
    out.sort(key=lambda g: -g["value"])
    report = {"groups": out, "group_by": list(group_by), "n_queries": n_q, "n_documents": len(index), "mode": mode,
              "precision": stage, "total_value": float(values.sum()), "total_positive": float(total_pos),
              "total_negative": float(total_neg), "bootstrap": bootstrap, "confidence": CONFIDENCE}
    if per_document:
        report["documents"] = [{"id": ids[r], "value": float(values[r]), **groups[codes[r]]} for r in range(len(index))]
    return report


REPORT_FORMATS = (".json", ".csv", ".parquet")
DOCUMENT_FORMATS = (".jsonl", ".csv", ".parquet")


def check_outputs(out: str, per_document: str | None = None) -> None:
    """Refuse output names write_report / write_documents cannot write, before any work."""
    if not str(out).endswith(REPORT_FORMATS):
        raise ValueError(f"--out must end with one of {', '.join(REPORT_FORMATS)}, got {out!r}")
    if per_document and not str(per_document).endswith(DOCUMENT_FORMATS):
        raise ValueError(f"--per-document must end with one of {', '.join(DOCUMENT_FORMATS)}, got {per_document!r}")


def flat_groups(report: dict) -> list[dict]:
    """The report's groups as flat rows (the CSV and parquet columns): group.FIELD per grouping field,
    then the numbers, top_documents as JSON text."""
    rows = []
    for g in report["groups"]:
        row = {f"group.{f}": _cell(g["group"].get(f, MISSING)) for f in report["group_by"]}
        row.update({k: g[k] for k in ("n_documents", "value", "share_positive", "share_negative", "value_per_document",
                                      "ci_low", "ci_high")})
        row["top_documents"] = json.dumps(g["top_documents"])
        rows.append(row)
    return rows


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def report_csv(report: dict) -> str:
    rows = flat_groups(report)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def write_report(report: dict, out: str) -> None:
    """`out` by extension: .json (the report), .csv or .parquet (flat_groups)."""
    if out.endswith(".json"):
        with open(out, "w") as f:
            json.dump({k: v for k, v in report.items() if k != "documents"}, f, indent=1)
    elif out.endswith(".csv"):
        with open(out, "w", newline="") as f:
            f.write(report_csv(report))
    elif out.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(flat_groups(report)), out)
    else:
        check_outputs(out)


def write_documents(report: dict, out: str) -> None:
    """Every document's value (report["documents"]) into `out`: .jsonl, .csv or .parquet."""
    docs = report["documents"]
    if out.endswith(".jsonl"):
        with open(out, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        return
    fields = ["id", "value", *report["group_by"]]
    rows = [{k: d.get(k, MISSING) if k in ("id", "value") else _cell(d.get(k, MISSING)) for k in fields} for d in docs]
    if out.endswith(".csv"):
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    elif out.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        check_outputs(".json", out)
