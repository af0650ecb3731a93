"""What each document, and each group of documents (a provider, source, licence: any metadata
field), was worth to the model over a set of queries: `python -m indexer value` and POST /value.

A document's value is its summed score over the queries (influence mode by default: g_q^T H^-1 g_d,
additive, so a group's value is the sum over its documents; it predicts how much the queries' total
loss would rise without them). Every document and every query is scored exactly from the stored
vectors of the chosen stage, in one blocked pass over them (summed_scores; memory bounded by the block,
not the index; on `device`, e.g. cuda), never through the ANN index. Confidence intervals come from a bootstrap
over the queries.

Under `torchrun` (`value_processes`) each process scores a contiguous slice of the documents (it
reads only its slice of the stored vectors: memory and disk reads split, not multiplied) after the
query vectors were computed a slice each and shared; rank 0 sums the processes' per-document values
and per-query group sums (exact: every document is scored by one process) and writes the report a
single process writes."""
from __future__ import annotations

import csv
import io
import json
from typing import Callable

import numpy as np
import torch

from engine import resolve_device

from ..distributed import Processes
from ..store import Index
from .stage import MODES, Stage

BLOCK_BYTES = 256 << 20  # document vectors read per block (as float32; float64 while summed)
CONFIDENCE = 0.95
MISSING = "(missing)"  # CSV and parquet cells of a group field its documents lack


def share(n: int, procs: Processes) -> range:
    """This process's contiguous part of n items (documents or queries): the first n % world
    processes one more."""
    return range(n * procs.rank // procs.world, n * (procs.rank + 1) // procs.world)


def stage_blocks(index: Index, stage: str, mode: str, device, rows: range):
    """(rows, float64 block) over `rows` of the stage's stored rows, BLOCK_BYTES of float32 at a time
    (memory bounded by the block, not the index), each row times its factor in `mode`'s score
    (Stage.row_factors), so that its product with a query vector times the query's factor is the score."""
    stage = Stage(stage)
    norms = stage.norms(index)
    block = max(1, BLOCK_BYTES // (4 * stage.width(index)))
    for s in range(rows.start, rows.stop, block):
        e = min(s + block, rows.stop)
        x = torch.as_tensor(stage.rows(index, slice(s, e)), device=device).double()
        f = stage.row_factors(norms[s:e], mode)
        if f is not None:
            x.mul_(torch.as_tensor(f, device=device)[:, None])
        yield range(s, e), x


def value_groups(index: Index, group_by: list[str]) -> tuple[list[dict], np.ndarray]:
    """The groups of `group_by` and each document's group number (Index.groups), refusing a grouping
    no document has."""
    if not group_by:
        raise ValueError("group_by needs at least one metadata field")
    groups, codes = index.groups(group_by)
    if groups == [{}]:
        raise ValueError(f"no document has the metadata field{'s' * (len(group_by) > 1)} {', '.join(map(repr, group_by))}")
    return groups, codes


def summed_scores(index: Index, stage: str, queries: np.ndarray, codes: np.ndarray, n_groups: int,
                  mode: str = "influence", device: str = "cpu", rows: range | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Over the documents `rows` (default: all): (values, per_query), float64. values (len(index),): each
    document's summed score over the queries (0 outside `rows`); per_query (len(queries), n_groups): each
    query's summed score over each group's documents, the bootstrap's unit. `queries`: the stage's query
    vectors (indexer.query.opened.query_matrix).

    A score is linear in the document's (scaled) stored vector, so no document-by-query product is
    formed: a document's value is its vector against the queries' sum, and a group's per-query sums
    are its vectors' sum against each query. One pass over the rows in float64 sums: exact up to
    the order of additions, bound by reading the rows (benchmarks/valuation.py)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = resolve_device(device)  # "auto" too
    queries = np.asarray(queries, dtype=np.float64)
    q = torch.as_tensor(queries * Stage.query_scales(queries, mode)[:, None], device=device)
    q_sum = q.sum(dim=0)
    rows = range(len(index)) if rows is None else rows
    values = np.zeros(len(index))
    group_vectors = torch.zeros((n_groups, q.shape[1]), dtype=torch.float64, device=device)
    codes = torch.as_tensor(codes, dtype=torch.int64, device=device)
    for r, x in stage_blocks(index, stage, mode, device, rows):
        values[r.start : r.stop] = (x @ q_sum).cpu().numpy()
        group_vectors.index_add_(0, codes[r.start : r.stop], x)
    return values, (q @ group_vectors.T).cpu().numpy()


def value_report(index: Index, stage: str, queries: np.ndarray, group_by: list[str], mode: str = "influence",
                 top: int = 5, bootstrap: int = 1000, seed: int = 0, device: str = "cpu",
                 per_document: bool = False) -> dict:
    """Every document's value over `queries` and, per group of the metadata fields `group_by` (its
    documents lacking a field form their own group): n_documents, value, share of all positive and of
    all negative value, value per document, a bootstrap confidence interval over the queries, and the
    top documents. With `per_document`, also every document's value ("documents", by row)."""
    groups, codes = value_groups(index, group_by)
    if len(queries) == 0:
        raise ValueError("no queries to value")
    values, per_query = summed_scores(index, stage, queries, codes, len(groups), mode, device)
    return build_report(index, stage, groups, codes, values, per_query, group_by, mode, top, bootstrap, seed,
                        per_document)


def value_processes(procs: Processes, index: Index, stage: str, n_queries: int,
                    query_vectors: Callable[[range], np.ndarray], group_by: list[str], mode: str = "influence",
                    top: int = 5, bootstrap: int = 1000, seed: int = 0, per_document: bool = False) -> dict | None:
    """value_report over the processes of a launch (every one calls this; one process: the same as
    value_report): each computes `query_vectors(its share of the n_queries)` and the processes share
    them, then each scores its share of the documents (on procs.device); rank 0 gets the report,
    the others None. An input error in any process stops them all (Processes.step)."""
    with procs.step():
        groups, codes = value_groups(index, group_by)
        if n_queries == 0:
            raise ValueError("no queries to value")
    with procs.step():
        mine = np.asarray(query_vectors(share(n_queries, procs)), dtype=np.float32)
    queries = np.concatenate(procs.gather(mine))
    with procs.step():
        values, per_query = summed_scores(index, stage, queries, codes, len(groups), mode, procs.device,
                                          share(len(index), procs))
    values = procs.sum(torch.from_numpy(values)).numpy()  # every document was scored by one process
    per_query = procs.sum(torch.from_numpy(per_query)).numpy()
    procs.part()
    if not procs.main:
        return None
    return build_report(index, stage, groups, codes, values, per_query, group_by, mode, top, bootstrap, seed,
                        per_document)


def build_report(index: Index, stage: str, groups: list[dict], codes: np.ndarray, values: np.ndarray,
                 per_query: np.ndarray, group_by: list[str], mode: str, top: int, bootstrap: int, seed: int,
                 per_document: bool) -> dict:
    """The report (value_report) from summed_scores' sums over every document."""
    n_q = len(per_query)
    rng = np.random.default_rng(seed)
    resampled = rng.multinomial(n_q, np.full(n_q, 1.0 / n_q), size=bootstrap) @ per_query if bootstrap else None
    interval = (np.percentile(resampled, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)], axis=0)
                if resampled is not None else np.full((2, len(groups)), None))
    pos, neg = np.clip(values, 0, None), np.clip(values, None, 0)
    total_pos, total_neg = pos.sum(), neg.sum()
    ids = index.ids
    order = np.argsort(codes, kind="stable")  # every group's rows, ascending, in one sort
    bounds = np.searchsorted(codes[order], np.arange(len(groups) + 1))
    out = []
    for g, group in enumerate(groups):
        members = order[bounds[g] : bounds[g + 1]]
        v = float(per_query[:, g].sum())
        best = members[np.argsort(-values[members], kind="stable")[:top]]
        lo, hi = interval[:, g]
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
