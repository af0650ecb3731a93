"""`python -m indexer attribute`: the top-k documents of every query in a file, through the same
ranking as POST /attribute (indexer.query.ranking.rank: compact vectors, then the high-fidelity
stage), in batches: one forward and backward pass a batch gives the stages it ranks by (both at
precision high). One output row per hit: query_id, rank, id, score, stage.

Rows go to OUT.partial.jsonl a batch at a time; OUT.partial.json records how many queries (and
bytes) are complete after each batch, so a killed run, started again with the same command, goes on
after the last complete batch. At the end the rows are written to OUT (.jsonl or .parquet) and the
partial files removed."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from tqdm import tqdm

from ..manifest import Manifest
from ..records import ReadStats, expand_inputs, source_identity
from .opened import open_index, query_records
from .ranking import DIRECTIONS, HIGH_DEPTH, rank

OUTPUT_FORMATS = (".jsonl", ".parquet")
HIT_SCHEMA = pa.schema([("query_id", pa.string()), ("rank", pa.int64()), ("id", pa.string()), ("score", pa.float64()),
                        ("stage", pa.string())])


@dataclass
class AttributeConfig:
    index: str
    queries: Sequence[str]
    out: str
    k: int = 10
    mode: str = "cosine"
    precision: str = "high"
    direction: str = "proponents"
    depth: int = HIGH_DEPTH
    text_field: str | None = None  # None: as the index was built
    prompt_field: str | None = None
    response_field: str | None = None
    id_field: str | None = None
    batch_size: int = 16
    model: str | None = None
    device: str = "cpu"
    skip_bad: bool = False
    progress: bool = True

    def __post_init__(self):
        self.queries = expand_inputs(self.queries)  # folders and glob patterns, as for build
        if not str(self.out).endswith(OUTPUT_FORMATS):
            raise ValueError(f"--out must end with one of {OUTPUT_FORMATS}, got {self.out!r}")
        if self.k < 1 or self.batch_size < 1 or self.depth < 1:
            raise ValueError("k, batch_size and depth must be at least 1")
        if self.mode not in ("influence", "cosine"):
            raise ValueError(f"mode must be influence or cosine, got {self.mode!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {tuple(DIRECTIONS)}, got {self.direction!r}")


def _key(cfg: AttributeConfig, manifest: Manifest) -> str:
    """What a partial run must share with this one to be continued."""
    files = [source_identity(str(p)) for p in cfg.queries]
    opts = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress", "device", "batch_size", "queries")}
    index = (manifest.model.fingerprint, manifest.n_documents, manifest.build.seconds)
    return hashlib.sha256(json.dumps([files, opts, index], sort_keys=True, default=str).encode()).hexdigest()


def attribute_queries(cfg: AttributeConfig) -> dict:
    """Run the queries of `cfg` and write their hits; returns a summary (queries, rows, seconds)."""
    started = time.time()
    opened = open_index(cfg.index, cfg.model, cfg.device)
    stages = opened.ranking_stages(cfg.precision)
    ids = opened.index.ids
    out = Path(cfg.out)
    rows_path, progress_path = Path(f"{out}.partial.jsonl"), Path(f"{out}.partial.json")
    key = _key(cfg, opened.index.manifest)
    done = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if done.get("key") != key:
        done = {"key": key, "queries": 0, "bytes": 0, "skipped": 0}
    stats = ReadStats()
    records = query_records(opened, cfg.queries, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                            response_field=cfg.response_field, id_field=cfg.id_field, skip_bad=cfg.skip_bad, stats=stats)
    for _ in islice(records, done["queries"]):  # answered by the killed run: read past them (ids still checked)
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(rows_path, "ab") as f, tqdm(initial=done["queries"], unit="query", desc="attributing",
                                          disable=not cfg.progress, dynamic_ncols=True) as bar:
        f.truncate(done["bytes"])  # a batch the kill cut short
        f.seek(done["bytes"])
        while batch := list(islice(records, cfg.batch_size)):
            vectors, _ = opened.vectors(stages, [pair for _, pair in batch])
            fast, high = vectors if len(vectors) > 1 else (vectors[0], [None] * len(batch))
            lines = []
            for (record, (prompt, response)), fq, hq in zip(batch, fast, high):
                hits = rank(opened.index, fq, cfg.k, cfg.mode, cfg.direction, high_q=hq, depth=cfg.depth,
                            text=f"{prompt}\n{response}")
                lines += [json.dumps({"query_id": record.id, "rank": i + 1, "id": ids[h.row], "score": h.score,
                                      "stage": h.stage}) + "\n" for i, h in enumerate(hits)]
            f.write("".join(lines).encode())
            f.flush()
            os.fsync(f.fileno())
            done.update(queries=done["queries"] + len(batch), bytes=f.tell())
            tmp = Path(f"{progress_path}.tmp")
            tmp.write_text(json.dumps(done))
            os.replace(tmp, progress_path)
            bar.update(len(batch))
    if str(out).endswith(".parquet"):
        table = (pa_json.read_json(rows_path, parse_options=pa_json.ParseOptions(explicit_schema=HIT_SCHEMA))
                 if rows_path.stat().st_size else HIT_SCHEMA.empty_table())
        pq.write_table(table.select(HIT_SCHEMA.names), out)
        n_rows = table.num_rows
        rows_path.unlink()
    else:
        with open(rows_path, "rb") as f:
            n_rows = sum(1 for _ in f)
        os.replace(rows_path, out)
    progress_path.unlink()
    seconds = time.time() - started
    return {"queries": done["queries"], "rows": n_rows, "skipped": stats.skipped,
            "skipped_examples": stats.skipped_reasons[:5], "precision": opened.stage(cfg.precision).name, "seconds": round(seconds, 2),
            "out": str(out)}
