"""Build an index: records -> projected gradients (pass 1, with preconditioner statistics) ->
preconditioned vectors (pass 2, over the stored shards) -> FAISS + LanceDB + manifest."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine import (LoGra, LoGraConfig, Preconditioner, TextFormat, collate, encode_pairs, fit_preconditioner,
                    joint_gradients, load_model, model_fingerprint, pair_vectors, projected_gradients)
from engine.encoding import Encoded
from engine.model import gguf_file

from .distributed import Processes, is_input_error, world_size
from .manifest import (AppendInfo, Budget, BuildInfo, DataInfo, FaissInfo, Manifest, ModelInfo, PreconditionerInfo,
                       Stats)
from .records import ReadStats, Record, TextFormatter, expand_inputs, is_dataset, read_records, source_identity
from .ann import INDEX_TYPES
from .store import (HIGH_STORAGES, STORAGES, HighVectorWriter, Index, IndexFormatError, IndexWriter, document_pair, encode_rows,
                    load_engine_state)


@dataclass
class BuildConfig:
    model: str
    data: Sequence[str]
    out: str
    text_field: str = "text"
    prompt_field: str | None = None
    response_field: str | None = None
    id_field: str = "id"
    # prompt/response and chat (`messages`) records: the tokenizer's chat template ("auto", when it has
    # one), none ("none": prompt + separator + response), or a Jinja template file's
    chat_template: str = "auto"
    separator: str = "\n"
    max_tokens: int = 512
    batch_size: int = 8  # documents per pass at most
    batch_tokens: int | None = None  # padded tokens per pass at most (None: batch_size alone decides)
    rank: int | None = None  # explicit r_in = r_out for every layer; None: spread `budget` (engine.budget)
    budget: int = 4096  # dimensions per document of the compact (ANN) vectors
    # the compact vectors as stored: int8 codes with a float32 scale per row (4x smaller than float32, the
    # same LDS within 0.001 on all three quality benchmarks: docs/indexing.md), or float32
    storage: str = "int8"
    head_share: float = 0.75  # of the budget, to the LM head (chosen on all three quality benchmarks)
    # no block layer gets fewer dimensions than this: when the blocks' part of the budget cannot give every
    # block layer as much, it goes to the deepest blocks alone (engine.budget; docs/quality.md, depth)
    min_layer_dims: int = 576
    head: bool = True  # track the LM head (output embedding)
    seed: int = 0
    # ekfac in the projected space, damping 0.01: the best compact vectors on both quality benchmarks
    preconditioner: str = "ekfac"
    damping: float = 0.01
    # The high-fidelity stage (api: precision "high"): larger compact vectors (high_budget dimensions,
    # high_head_share of them to the LM head) with their own EK-FAC, fitted on the first high_sample
    # documents (whole shards), stored on disk as high_storage and read for the candidates
    # (docs/quality.md, the two stages).
    high: bool = True
    high_budget: int = 65536
    high_head_share: float = 0.75
    high_min_layer_dims: int = 576
    high_preconditioner: str = "ekfac"
    high_damping: float = 0.01
    high_sample: int = 4096
    # the LM head's vocabulary side projected by a Gaussian or a sparse sign sketch (engine.sketch_matrix):
    # the sketch is a scatter-add instead of a V x r_out matmul a token, but ranked 0.017 LDS worse on both
    # toy benchmarks (benchmarks/quality/projection.py), so it is not the default
    high_head_projection: str = "gaussian"
    # the stored rows: float16, or int8 / int4 codes with a float32 scale per row (store.encode_rows); int4
    # scored as float16 within the benchmarks' error on all three quality benchmarks (docs/indexing.md)
    high_storage: str = "int4"
    include: str | None = None
    exclude: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    skip_bad: bool = False
    overwrite: bool = False
    index_type: str = "auto"  # ann.INDEX_TYPES; auto: by corpus size (ann.resolve_index_type)
    shard_size: int = 1024  # documents per shard: bounds memory and is the unit written to disk
    progress: bool = True
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)  # recorded in the manifest (e.g. the demo's provenance)

    def __post_init__(self):
        if self.data:  # shard folders and glob patterns: their files, in a stable order
            self.data = expand_inputs(self.data)
        for name in ("max_tokens", "batch_size", "rank", "shard_size", "batch_tokens", "budget", "high_budget",
                     "high_sample"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("min_layer_dims", "high_min_layer_dims"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.damping < 0 or self.high_damping < 0:
            raise ValueError(f"damping must be >= 0, got {min(self.damping, self.high_damping)}")
        for name in ("head_share", "high_head_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.high_head_projection not in HEAD_PROJECTIONS:
            raise ValueError(f"high_head_projection must be one of {HEAD_PROJECTIONS}, got {self.high_head_projection!r}")
        if self.high_storage not in HIGH_STORAGES:
            raise ValueError(f"high_storage must be one of {HIGH_STORAGES}, got {self.high_storage!r}")
        if self.high_preconditioner not in HIGH_PRECONDITIONERS:
            raise ValueError(f"high_preconditioner must be one of {HIGH_PRECONDITIONERS}, got {self.high_preconditioner!r}")

    def logra_config(self) -> LoGraConfig:
        return LoGraConfig(rank=self.rank, budget=self.budget, head_share=self.head_share, min_layer_dims=self.min_layer_dims,
                           head=self.head, seed=self.seed,
                           include=self.include, exclude=self.exclude, max_tokens=self.max_tokens)

    def high_config(self, fast: LoGraConfig) -> LoGraConfig:
        """The high-fidelity stage's projector: the compact one's layers and seed at the stage's budget."""
        return replace(fast, rank=None, budget=self.high_budget, head_share=self.high_head_share,
                       min_layer_dims=self.high_min_layer_dims,
                       head_sketch=self.high_head_projection == "sketch")


# raw would need a (r_out r_in)^2 covariance per layer: too large at the high stage's size
HIGH_PRECONDITIONERS = ("none", "kfac", "ekfac")
HEAD_PROJECTIONS = ("sketch", "gaussian")


def _chunks(it: Iterator, n: int) -> Iterator[list]:
    while chunk := list(islice(it, n)):
        yield chunk


def _batches(encoded: list[Encoded], batch_size: int, batch_tokens: int | None = None) -> Iterator[list[int]]:
    """Indices of one shard in batches of similar length, so little compute goes to padding: at most
    `batch_size` documents, and at most `batch_tokens` tokens once padded to the longest (a document
    longer than that alone gets a batch of its own)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    batch: list[int] = []
    for i in order:
        width = len(encoded[i].input_ids)  # ascending: the newest document is the longest
        if batch and (len(batch) == batch_size or (batch_tokens and (len(batch) + 1) * width > batch_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def count_records(paths: Sequence[str]) -> int | None:
    """Cheap upper bound for the progress bar's ETA (non-blank lines / parquet rows)."""
    total = 0
    for p in paths:
        if str(p).endswith(".parquet"):
            import pyarrow.parquet as pq
            total += pq.ParquetFile(p).metadata.num_rows
        elif str(p).endswith((".jsonl", ".json")):
            with open(p, "rb") as f:
                total += sum(1 for line in f if line.strip())
        else:  # a dataset: its size is not known without reading it (streamed)
            return None
    return total


def build_index(cfg: BuildConfig) -> Manifest | None:
    """Build the index described by `cfg` and return its manifest. A build that is killed or
    crashes keeps its completed shards; the same call again resumes after them.

    Under torchrun (WORLD_SIZE > 1) every process runs this: each computes both stages' gradients of
    its share of the shards (the high-fidelity stage fitted from every process's share of the first
    shards), the preconditioners' statistics are summed over the processes, and rank 0 writes the
    index and returns the manifest; the other processes return None."""
    started = time.time()
    procs = Processes.from_env(cfg.device)
    writer = None
    try:
        cfg = replace(cfg, device=procs.device)
        model, tokenizer = _load(cfg)
        key = resume_key(cfg, model_fingerprint(model))
        if procs.world > 1:  # each process's checkpoint covers its own shards: resumable by as many processes
            key = f"{key}/{procs.world} processes, high stage in the pass"  # (not a partial build from before)
        with procs.step():  # rank 0 takes the lock and prepares the folder ...
            if procs.main:
                writer = IndexWriter(cfg.out, overwrite=cfg.overwrite, key=key, world=procs.world)
        with procs.step():  # ... then the others join it
            if not procs.main:
                writer = IndexWriter(cfg.out, key=key, rank=procs.rank, world=procs.world)
        return _build(cfg, model, tokenizer, writer, started, procs)
    except BaseException as e:
        _give_up(writer, e, procs)
        raise
    finally:
        procs.close()


def _run(writer: IndexWriter, work):
    try:
        return work()
    except BaseException as e:
        _give_up(writer, e, Processes())
        raise


def _give_up(writer: IndexWriter | None, e: BaseException, procs: Processes) -> None:
    """A build failed with `e`: discard the partial build or keep it for a rerun to resume."""
    if writer is not None and is_input_error(e):
        writer.abort()  # bad input or options: a rerun needs different data or flags, nothing to resume
    elif writer is not None:
        if writer.n_shards and writer.owner:
            print(f"partial build kept ({writer.n_rows} documents in {writer.n_shards} shards); "
                  "run the same command again to resume", file=sys.stderr)
        writer.release()
    procs.failed(e)


def append_documents(index_dir: str | Path, data: Sequence[str], *, model: str | None = None,
                     text_field: str | None = None, prompt_field: str | None = None, response_field: str | None = None,
                     id_field: str | None = None, batch_size: int = 8, batch_tokens: int | None = None,
                     shard_size: int = 1024, device: str = "cpu",
                     skip_bad: bool = False, progress: bool = True) -> Manifest:
    """Add documents to an index with the index's own projections and preconditioner (not refitted,
    so existing scores do not move). Ids already in the index are refused. The new index is built
    beside the old one, which stays valid until the new one is renamed into place."""
    if world_size() > 1:
        raise ValueError("append runs in one process: run `python -m indexer append` without torchrun")
    started = time.time()
    base = Index.open(index_dir)
    m, d = base.manifest, base.manifest.data
    pick = lambda given, recorded: given if given is not None else recorded
    cfg = BuildConfig(model=model or m.model.name_or_path, data=list(data), out=str(index_dir),
                      text_field=pick(text_field, d.text_field) or "text", prompt_field=pick(prompt_field, d.prompt_field),
                      response_field=pick(response_field, d.response_field), id_field=pick(id_field, d.id_field) or "id",
                      max_tokens=m.max_tokens, batch_size=batch_size, batch_tokens=batch_tokens, rank=m.rank, seed=m.seed,
                      preconditioner=m.preconditioner.kind, damping=m.preconditioner.damping_ratio,
                      include=m.include, exclude=m.exclude, device=device, dtype=m.model.dtype,
                      skip_bad=skip_bad, overwrite=True, index_type=m.index_type, storage=m.storage,
                      shard_size=shard_size, progress=progress)
    lm, tokenizer = _load(cfg)
    logra, pre = base.engine(lm, cfg.model)
    fingerprint = m.model.fingerprint
    writer = IndexWriter(index_dir, overwrite=True, key=f"append/{len(base)}/{resume_key(cfg, fingerprint)}", base=base)

    def work():
        stats = ReadStats()
        records = read_records(cfg.data, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                               response_field=cfg.response_field, id_field=cfg.id_field, skip_bad=skip_bad,
                               stats=stats, seen_ids=set(base.row_of_id),
                               formatter=TextFormatter(TextFormat.from_dict(m.text_format), tokenizer))
        high = base.high_engine(lm, cfg.model)  # the index's own high-fidelity stage too, not refitted
        if high is not None:
            high = HighStage(*high, base.state["high"], 0, m.high.preconditioner.damping_ratio, 0.0, m.high.storage)
        counts, seconds, _, _, _ = _gradient_pass(cfg, records, logra, tokenizer, pre, writer, fit=False, high=high)
        if writer.n_rows == 0:
            raise ValueError(f"no new documents in {', '.join(map(str, cfg.data))} (skipped {stats.skipped})")
        faiss_info = _write_vectors(cfg, pre, writer, logra.dim)
        old = m.stats
        manifest = m.model_copy(update={
            "faiss": FaissInfo(**faiss_info),
            "data": d.model_copy(update={"files": d.files + [str(p) for p in cfg.data]}),
            "stats": Stats(**{k: getattr(old, k) + v for k, v in counts.items()}, documents=len(base) + writer.n_rows,
                           skipped=old.skipped + stats.skipped,
                           skipped_examples=(old.skipped_examples + stats.skipped_reasons)[:5]),
            "appends": m.appends + [AppendInfo(files=[str(p) for p in cfg.data], documents=writer.n_rows,
                                               skipped=stats.skipped, skipped_examples=stats.skipped_reasons[:5],
                                               seconds=round(time.time() - started, 2),
                                               gradient_seconds=round(seconds, 2))]})
        return writer.commit(manifest, base.state)

    return _run(writer, work)


def model_reference(name_or_path: str) -> str:
    """What the manifest records: a local folder or GGUF file as an absolute path (a relative one would
    only load from the directory the build ran in; a folder holding one GGUF file, as that file), a hub
    name as given."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = gguf_file(name_or_path) or path
    return str(path.resolve()) if path.is_dir() or path.is_file() else name_or_path


def resume_key(cfg: BuildConfig, fingerprint: str) -> str:
    """What a partial build must share with this one to be resumed: every option that changes the
    output, the model's weights, and the data files' sizes and modification times."""
    files = [source_identity(str(p)) for p in cfg.data]
    # Batching changes no vector (tested), so a build can resume with other batch settings, e.g. after OOM.
    ignored = ("out", "overwrite", "progress", "device", "data", "batch_size", "batch_tokens")
    relevant = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    blob = json.dumps({"cfg": relevant, "files": files, "model": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def text_format(cfg: BuildConfig, tokenizer) -> TextFormat:
    """The format `cfg.chat_template` and `cfg.separator` ask for, checked against the tokenizer."""
    if cfg.chat_template == "none":
        template = None
    elif cfg.chat_template == "auto":
        template = getattr(tokenizer, "chat_template", None) or None
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
    else:
        path = Path(cfg.chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"--chat-template: no such file: {cfg.chat_template} (or use auto / none)")
        template = path.read_text()
    fmt = TextFormat(template, cfg.separator)
    fmt.check(tokenizer)
    return fmt


def _load(cfg: BuildConfig):
    for p in cfg.data:  # before loading a model: a missing file is the cheapest error to report
        if not Path(p).is_file() and not is_dataset(p):
            raise FileNotFoundError(f"no such file: {p}")
    try:
        return load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:  # transformers' messages for a bad path talk about repo ids; say which model and why
        where = "" if Path(cfg.model).exists() or cfg.model.lower().endswith(".gguf") else \
            " (no such local folder, and not a model name that can be loaded)"
        raise OSError(f"cannot load model {cfg.model!r}{where}: {e}") from e


def _build(cfg: BuildConfig, model, tokenizer, writer: IndexWriter, started: float,
           procs: Processes = Processes()) -> Manifest | None:
    logra = LoGra(model, cfg.logra_config())
    max_tokens = logra.max_tokens
    pre = Preconditioner(cfg.preconditioner, logra.shapes, damping_ratio=cfg.damping)
    stats = ReadStats()  # every process reads every record, so every one counts the same skipped records
    fmt = text_format(cfg, tokenizer)
    read = lambda skip_bad, stats: read_records(cfg.data, text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                                                response_field=cfg.response_field, id_field=cfg.id_field,
                                                skip_bad=skip_bad, stats=stats, formatter=TextFormatter(fmt, tokenizer))
    records = read(cfg.skip_bad, stats)
    # The high-fidelity stage is fitted inside the gradient pass from its first shards (every process
    # its own share of them), so the pass computes both stages' vectors from one forward and backward
    # pass per batch (a bad record is skipped here: the gradient pass reports it or skips it too, so
    # the sample is the first rows).
    high = sampler = None
    if cfg.high:
        if writer.high_state is None and (writer.n_rows == 0 or "high_sample" in (writer.resumed or {})):
            sampler = HighSampler(cfg, model, logra, writer)  # fitted inside the gradient pass
        else:  # fitted before a kill, or a partial build that fitted it in a pass of its own
            sample = (document_pair(r.prompt, r.text) for r in read(True, ReadStats()))
            high = _fit_high(cfg, model, tokenizer, logra, writer, sample)
    with procs.step():
        counts, gradient_seconds, n_done_before, tokens_at_start, high = _gradient_pass(
            cfg, records, logra, tokenizer, pre, writer, procs=procs, high=high, sampler=sampler)
    # Sums over the processes (each of them holds its own shards' share); the identity in one process.
    pre.reduce(procs.gather, broadcast=procs.broadcast)
    counts = procs.total(counts)
    done = procs.total({"rows": writer.n_rows, "shards": writer.n_shards, "before": n_done_before,
                        "tokens_at_start": tokens_at_start})
    gradient_seconds = procs.most(gradient_seconds)
    if done["rows"] == 0:
        raise ValueError(f"no documents to index in {', '.join(map(str, cfg.data))} (skipped {stats.skipped})")

    if pre.needs_second_pass:
        with procs.step():
            for block in tqdm(writer.raw_shards(), total=writer.n_shards, unit="shard", desc="ekfac eigenvalues",
                              disable=not (cfg.progress and procs.main), dynamic_ncols=True):
                pre.update_second(torch.from_numpy(block))
        pre.reduce(procs.gather, second=True)
    procs.part()  # rank 0 writes the index from every process's shards; the others are done
    if not procs.main:
        return None
    writer.merge(done["shards"], done["rows"])
    n_done_before, tokens_at_start = done["before"], done["tokens_at_start"]
    pre.finalize()
    faiss_info = _write_vectors(cfg, pre, writer, logra.dim)
    if high is not None and procs.world > 1:  # each process wrote its own shards' rows
        writer.merge_high(procs.world, cfg.shard_size, high.logra.dim, high.storage)

    total_seconds = time.time() - started
    manifest = Manifest(
        n_documents=writer.n_rows,
        model=ModelInfo(name_or_path=model_reference(cfg.model), fingerprint=model_fingerprint(model),
                        class_name=type(model).__name__, dtype=cfg.dtype),
        layers=logra.layer_spec(), rank=cfg.rank,
        budget=None if cfg.rank is not None else Budget(dims=cfg.budget, head_share=cfg.head_share,
                                                                  min_layer_dims=cfg.min_layer_dims),
        seed=cfg.seed, include=cfg.include, exclude=cfg.exclude, max_tokens=max_tokens, text_format=fmt.to_dict(),
        dim=logra.dim, storage=cfg.storage, preconditioner=PreconditionerInfo(kind=cfg.preconditioner, damping_ratio=cfg.damping),
        faiss=faiss_info, index_type=cfg.index_type,
        **({"high": high.manifest()} if high else {}),
        data=DataInfo(files=[str(p) for p in cfg.data], text_field=cfg.text_field, prompt_field=cfg.prompt_field,
                      response_field=cfg.response_field, id_field=cfg.id_field),
        stats=Stats(**counts, documents=writer.n_rows, skipped=stats.skipped, skipped_examples=stats.skipped_reasons[:5]),
        build=BuildInfo(seconds=round(total_seconds, 2), gradient_seconds=round(gradient_seconds, 2),
                        tokens_per_s=round((counts["tokens"] - tokens_at_start) / max(gradient_seconds, 1e-9), 1),
                        docs_per_s=round((writer.n_rows - n_done_before) / max(gradient_seconds, 1e-9), 2),
                        resumed_at_document=n_done_before, device=cfg.device, processes=procs.world,
                        **({"high_fit_seconds": high.fit_seconds} if high else {})),
        **({"extra": cfg.extra} if cfg.extra else {}),
    )
    state = {**_engine_state(logra, pre), **({"high": high.state} if high else {})}
    return writer.commit(manifest, state)


def _engine_state(logra: LoGra, pre: Preconditioner) -> dict:
    cpu = lambda t: None if t is None else t.cpu()  # None: a side kept whole
    return {"projections": {name: {"in": cpu(p_in), "out": cpu(p_out)} for name, (p_in, p_out) in logra.projections.items()},
            "preconditioner": pre.state_dict()}


@dataclass
class HighStage:
    """The high-fidelity stage of a build: its projector, fitted preconditioner and saved state."""
    logra: LoGra
    pre: Preconditioner
    state: dict
    sample_documents: int
    damping: float
    fit_seconds: float
    storage: str  # how its rows are stored (store.encode_rows)
    _folded: "HighStage | None" = field(default=None, repr=False, compare=False)  # folded()

    def manifest(self) -> dict:
        stored = {"float16": "float16 unit rows and float32 norms",
                  "int8": "int8 codes with a float32 scale per unit row, and float32 norms",
                  "int4": "int4 codes (two a byte) with a float32 scale per unit row, and float32 norms"}[self.storage]
        return {"layers": self.logra.layer_spec(), "dim": self.logra.dim,
                "budget": {"dims": self.logra.config.budget, "head_share": self.logra.config.head_share,
                           "min_layer_dims": self.logra.config.min_layer_dims},
                "head_projection": "sketch" if self.logra.head_name and self.logra.sketched(self.logra.head_name) else "gaussian",
                "preconditioner": {"kind": self.pre.kind, "damping_ratio": self.damping},
                "sample_documents": self.sample_documents, "stored": stored, "storage": self.storage}

    def vectors(self, grads, rotated: bool = False) -> torch.Tensor:
        """Stored vectors of projected gradients: in the preconditioner's eigenbasis (inner products
        and norms are the same there), float32. `rotated`: the gradients are in it already."""
        return self.pre.apply(grads, eigenbasis=True, dtype=torch.float32, rotated=rotated)

    def folded(self) -> "HighStage":
        """The stage that computes the documents' rows: its K-FAC eigenbasis moved into the projections
        (Preconditioner.fold), so gradients leave the model pass already rotated and a row is only
        scaled. Each document's rotation (r_out^2 r_in + r_out r_in^2: 27M multiply-adds on the demo
        shape, ~18% of its training step) becomes no extra work for a projected side and an r x r
        product a token for a side kept whole; the same rows to float rounding. The state saved in
        the index stays the unfolded one."""
        if self.pre.kind not in ("kfac", "ekfac"):
            return self
        if self._folded is None:
            device = next(self.logra.model.parameters()).device  # the eigenbases live on the CPU
            cpu = lambda t: None if t is None else t.cpu()
            projections, pre = self.pre.fold({n: (cpu(a), cpu(b)) for n, (a, b) in self.logra.projections.items()},
                                             keep_out=frozenset(n for n in self.logra.shapes if self.logra.sketched(n)))
            logra = self.logra.with_projections(
                {n: tuple(None if t is None else t.to(device) for t in ab) for n, ab in projections.items()})
            self._folded = replace(self, logra=logra, pre=pre)
        return self._folded


def _fit_high(cfg: BuildConfig, model, tokenizer, fast: LoGra, writer: IndexWriter,
              documents: Iterator[tuple[str, str]]) -> HighStage:
    """The high-fidelity stage: the compact vectors' layer filters, a larger budget, its preconditioner
    fitted on the first `high_sample` of `documents` ((prompt, text) pairs) by `fit_sample`. Saved in
    the build folder, so a killed build does not fit it again."""
    t0 = time.time()
    logra = LoGra(model, cfg.high_config(fast.config))
    saved = writer.high_state
    if saved is None:
        pre = Preconditioner(cfg.high_preconditioner, logra.shapes, damping_ratio=cfg.high_damping)
        sample = list(islice(documents, cfg.high_sample))
        encoded = encode_pairs(tokenizer, sample, logra.max_tokens)
        batches = [[encoded[i] for i in idx] for idx in _batches(encoded, cfg.batch_size, cfg.batch_tokens)]
        progress = lambda what, it: tqdm(it, unit="batch", desc=f"high-fidelity {what}", disable=not cfg.progress,
                                         dynamic_ncols=True)
        pre = fit_sample(logra, pre, tokenizer, batches, writer.tmp / "high-sample.f32", progress)
        saved = {"state": _engine_state(logra, pre), "sample_documents": len(sample),
                 "fit_seconds": round(time.time() - t0, 2)}
        writer.save_high_state(saved)
    else:
        pre = load_engine_state(logra, saved["state"])
    return HighStage(logra, pre, saved["state"], saved["sample_documents"], cfg.high_damping, saved["fit_seconds"],
                     cfg.high_storage)


class HighSampler:
    """The high-fidelity stage fitted inside the gradient pass (one process): the first shards, whole,
    until they hold at least high_sample documents (or the corpus ends), get their high-fidelity
    gradients and statistics from the same forward and backward passes as the compact vectors; the
    gradients wait in a scratch file (float32, about 1 GB at 4,096 x 65,536; their rotated copy as much
    again, in memory up to ROTATED_IN_MEMORY_BYTES, else a second file) until the stage is fitted, then
    become those documents' rows, and later shards get theirs directly. No model pass
    of its own (`fit_sample` makes one). The statistics ride in the shards' checkpoints and the
    scratch rows are flushed before them, so a killed build resumes the sample too."""
    def __init__(self, cfg: BuildConfig, model, fast: LoGra, writer: IndexWriter):
        self.logra = LoGra(model, cfg.high_config(fast.config))
        self.pre = Preconditioner(cfg.high_preconditioner, self.logra.shapes, damping_ratio=cfg.high_damping)
        self.cfg, self.writer, self.rows = cfg, writer, 0
        self.path, self.rotated = self.scratch(writer)
        self.file = open(self.path, "r+b" if self.path.is_file() else "w+b")

    @staticmethod
    def scratch(writer: IndexWriter) -> tuple[Path, Path]:
        """This process's scratch files: the sample's raw rows, and (EK-FAC) the same rows in the
        stage's eigenbasis once it is fitted."""
        tag = "" if writer.world == 1 else f"-{writer.rank}"
        return writer.tmp / f"high-sample{tag}.f32", writer.tmp / f"high-sample-rotated{tag}.f32"

    def state(self) -> dict:
        return {"rows": self.rows, "preconditioner": self.pre.stats_state()}

    def load(self, state: dict) -> None:
        self.rows = state["rows"]
        self.pre.load_stats_state(state["preconditioner"])

    def add(self, idx: Sequence[int], out) -> None:
        """One batch of the current shard: statistics, and its rows at their places in the scratch file."""
        self.pre.update(out.grads, out.token_stats)
        flat = np.ascontiguousarray(self.logra.flatten(out.grads).cpu().numpy(), dtype=np.float32)
        for i, row in zip(idx, flat):
            self.file.seek((self.rows + i) * row.nbytes)
            self.file.write(row.tobytes())

    def end_shard(self, n: int) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # before the shard's checkpoint, which counts these rows
        self.rows += n

    def finish(self, out: HighVectorWriter, procs: Processes = Processes()) -> HighStage | None:
        """Fit on the sample (EK-FAC's eigenvalue statistics from the scratch rows), save the fitted
        state, then write the sample's rows. Several processes call this together, each with its share
        of the sample: the statistics are summed over them, rank 0's fitted state is every one's.
        None when no process has a sample document."""
        t0 = time.time()
        self.file.close()
        self.pre.reduce(procs.gather, broadcast=procs.broadcast)  # the identity in one process
        if self.pre.n_docs == 0:
            return None
        # The rotated rows are kept in memory when they fit ROTATED_IN_MEMORY_BYTES (1 GiB at the default
        # 4,096 x 65,536), else written to a second scratch file: the file costs a write, an fsync and a
        # read of as many bytes.
        in_memory = self.rows * self.logra.dim * 4 <= ROTATED_IN_MEMORY_BYTES
        kept: list[torch.Tensor] = []
        if self.pre.needs_second_pass:  # rotated once, in float32 as the stored rows are (HighStage.vectors)
            with contextlib.nullcontext() if in_memory else open(self.rotated, "wb") as f:
                for x in scratch_blocks(self.path, self.logra.dim, 0, self.rows):
                    rot = self.pre.rotate(torch.from_numpy(x), dtype=torch.float32)
                    self.pre.update_second(rot, dtype=torch.float32, rotated=True)
                    if in_memory:
                        kept.append(rot)
                    else:
                        f.write(rot.numpy().tobytes())  # the rows' own rotation: written scaled, not rotated again
                if not in_memory:
                    f.flush()
                    os.fsync(f.fileno())  # before the saved state, which says the file is whole
            self.pre.reduce(procs.gather, second=True)
        self.pre.finalize()
        saved = {"state": _engine_state(self.logra, self.pre), "sample_documents": self.pre.n_docs,
                 "fit_seconds": round(time.time() - t0, 2)}
        if procs.main:
            self.writer.save_high_state(saved)  # from here a resumed build has the stage (_fit_high loads it)
        # every process scales its rows with rank 0's state (and goes on only once it is saved)
        self.pre = Preconditioner.from_state_dict(procs.broadcast(lambda: saved["state"]["preconditioner"]))
        if self.pre.needs_second_pass and not in_memory:
            self.path.unlink(missing_ok=True)  # the rotated rows replace the raw ones
        high = HighStage(self.logra, self.pre, saved["state"], self.pre.n_docs, self.cfg.high_damping,
                         saved["fit_seconds"], self.cfg.high_storage)
        kept.reverse()
        while kept:  # the raw file stays until they are written: a build killed meanwhile resumes from it
            out.add(high.vectors(kept.pop(), rotated=True).numpy())  # each block freed once written
            out.checkpoint()
        self.write_sample_rows(high, out, self.writer)  # the rest (all of them without kept rows); the files go
        high.fit_seconds = round(time.time() - t0, 2)
        return high

    @classmethod
    def write_sample_rows(cls, high: HighStage, out: HighVectorWriter, writer: IndexWriter) -> None:
        """The stored rows of the sample's documents from the scratch file, after those `out` has,
        up to the checkpointed shards (a build killed while writing them resumes here); then the
        scratch file goes."""
        raw, rotated = cls.scratch(writer)
        # the rotated rows are whole once the state is saved (finish); a build from before they were
        # written, or with kfac, has the raw ones
        path = rotated if rotated.is_file() and high.pre.kind == "ekfac" else raw
        stop = writer.row_offset + writer.n_rows
        if out.rows < stop and not path.is_file():
            raise IndexFormatError(f"the partial build in {writer.tmp} lost its high-fidelity sample; "
                                   "rebuild with --overwrite")
        for x in scratch_blocks(path, high.logra.dim, out.rows, stop):
            out.add(high.vectors(torch.from_numpy(x), rotated=path == rotated).numpy())
            out.checkpoint()
        raw.unlink(missing_ok=True)
        rotated.unlink(missing_ok=True)


def fit_sample(logra: LoGra, pre: Preconditioner, tokenizer, batches: Sequence[Sequence[Encoded]], scratch: Path,
               progress=lambda what, it: it) -> Preconditioner:
    """engine.fit_preconditioner's result with one model pass instead of two: EK-FAC's eigenvalue pass
    reads the sample's gradients back from `scratch` (float32, written by the statistics pass: about
    1 GB at the default 4096 documents x 65,536 dimensions, removed afterwards) instead of recomputing
    them."""
    if not pre.needs_second_pass:
        return fit_preconditioner(logra, pre, tokenizer, batches, progress)
    rows = 0
    try:
        with open(scratch, "wb") as f:
            for batch in progress("statistics", batches):
                out = projected_gradients(logra, tokenizer, batch, token_stats=True)
                pre.update(out.grads, out.token_stats)
                f.write(np.ascontiguousarray(logra.flatten(out.grads).cpu().numpy(), dtype=np.float32).tobytes())
                rows += len(batch)
        for x in progress("eigenvalues", scratch_blocks(scratch, logra.dim, 0, rows)):
            pre.update_second(torch.from_numpy(x))
    finally:
        scratch.unlink(missing_ok=True)
    return pre.finalize()


SAMPLE_BLOCK_BYTES = 64 << 20  # sample gradients read back per block (EK-FAC rotates them in float64)
ROTATED_IN_MEMORY_BYTES = 2 << 30  # HighSampler.finish keeps the rotated sample in memory up to this


def scratch_blocks(path: Path, dim: int, start: int, stop: int) -> Iterator[np.ndarray]:
    """Rows start..stop of a float32 scratch file of `dim`-wide rows (fit_sample's, HighSampler's),
    SAMPLE_BLOCK_BYTES at a time."""
    block = max(1, SAMPLE_BLOCK_BYTES // (4 * dim))
    for s in range(start, stop, block):
        n = min(block, stop - s)
        yield np.fromfile(path, np.float32, count=n * dim, offset=4 * s * dim).reshape(n, dim)


def _gradient_pass(cfg: BuildConfig, records, logra: LoGra, tokenizer, pre: Preconditioner, writer: IndexWriter,
                   fit: bool = True, procs: Processes = Processes(), high: HighStage | None = None,
                   sampler: "HighSampler | None" = None):
    """Pass 1: raw projected gradients of every record, shard by shard, checkpointed; with `fit`,
    the preconditioner's statistics too; with `high`, the high-fidelity vectors from the same
    forward and backward passes; with `sampler`, the high-fidelity stage is fitted from the same
    passes over the first shards, then used for the rest. Resumes after the writer's last
    checkpoint. With several processes, this one computes the shards the writer says it owns (every
    `world`-th) and reads past the others; its counts and statistics cover its own shards. Returns
    counts, seconds, documents done before, tokens at the start and the high-fidelity stage."""
    counts = {"tokens": 0, "loss_tokens": 0, "truncated": 0, "no_loss_tokens": 0}
    records = iter(records)
    n_done_before = writer.n_rows
    first_shard = writer.next_shard
    if writer.resumed:  # documents before the last checkpoint are done: read past them, no model pass
        counts = writer.resumed["counts"]
        if fit:
            pre.load_stats_state(writer.resumed["preconditioner"])
        if sampler is not None and "high_sample" in writer.resumed:
            sampler.load(writer.resumed["high_sample"])
    for _ in islice(records, first_shard * cfg.shard_size):  # every shard before it is full
        pass
    total = count_records(cfg.data) if cfg.progress and procs.main else None
    bar = tqdm(total=total and -(-total // procs.world), initial=writer.n_rows, unit="doc", desc="gradients",
               disable=not (cfg.progress and procs.main), dynamic_ncols=True)
    t0 = time.time()
    tokens_at_start = counts["tokens"]
    def progress(n_docs: int) -> None:
        bar.update(n_docs)
        bar.set_postfix(tok_s=f"{(counts['tokens'] - tokens_at_start) / max(time.time() - t0, 1e-9):,.0f}", refresh=False)

    high_out = None
    if high is not None:  # its rows written before each shard's checkpoint: at least as many as the checkpoint's
        high_out = writer.high_vectors(high.logra.dim, high.storage)
        if high_out.rows < writer.row_offset + writer.n_rows:  # killed while the sample's rows were written
            HighSampler.write_sample_rows(high, high_out, writer)
        high_out.rewind(writer.row_offset + writer.n_rows)
    elif sampler is not None:  # rows come once the stage is fitted
        high_out = writer.high_vectors(sampler.logra.dim, cfg.high_storage)
        high_out.rewind(0)

    def write(rows, raw, state, high_rows):
        if high_rows is not None:
            high_out.add_stored(*high_rows)
            high_out.checkpoint()
        writer.add_shard(rows, raw, state=state)

    def fit_high() -> HighStage:  # every sample shard written first: the checkpoints cover the sample
        nonlocal pending
        if pending is not None:
            pending.result()
            pending = None
        return sampler.finish(high_out, procs)

    # Shards are written by one background thread while the next is computed; at most one waits.
    io, pending = ThreadPoolExecutor(1, thread_name_prefix="shard-writer"), None
    try:  # the bar is closed on errors too, so an error message starts on a line of its own
        for number, shard in enumerate(_chunks(records, cfg.shard_size), start=first_shard):
            # The sample is the whole shards before the first to reach high_sample documents. Every
            # process fits the stage at that shard, having read the same records (a bad one stops
            # every process before or after the fit, never one in it), owned or not.
            if high is None and sampler is not None and number * cfg.shard_size >= cfg.high_sample:
                high = fit_high()
            if not writer.owns(number):
                continue
            raw, high_rows, encoded = _shard_gradients(cfg, shard, logra, tokenizer, pre, fit, counts, progress, high,
                                                       sampler if high is None else None)
            rows = [_row(r, e) for r, e in zip(shard, encoded)]
            state = {"counts": dict(counts), **({"preconditioner": pre.stats_state()} if fit else {}),  # snapshots
                     **({"high_sample": sampler.state()} if high is None and sampler is not None else {})}
            if pending is not None:
                pending.result()  # a write error stops the pass here
            pending = io.submit(write, rows, raw, state, high_rows)
        if high is None and sampler is not None and (sampler.rows > 0 or procs.world > 1):  # the corpus ended first
            high = fit_high()
        if pending is not None:
            pending.result()
        if high_out is not None and high is not None:
            high_out.close(writer.row_offset + writer.n_rows)
    finally:
        io.shutdown(wait=True)
        bar.close()
    return counts, time.time() - t0, n_done_before, tokens_at_start, high


def _shard_gradients(cfg: BuildConfig, shard: list[Record], logra: LoGra, tokenizer, pre: Preconditioner, fit: bool,
                     counts: dict, progress, high: HighStage | None = None, sampler: "HighSampler | None" = None
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None, list[Encoded]]:
    """Raw projected gradients of one shard (and statistics with `fit`), with `high` its high-fidelity
    vectors as stored (store.encode_rows: codes, scales, norms), with `sampler` the high-fidelity
    gradients and statistics of a sample shard; `counts` updated in place, `progress(n)` called after
    each batch of n documents. Returns the gradients, the high-fidelity rows and the encodings."""
    encoded = encode_pairs(tokenizer, [document_pair(r.prompt, r.text) for r in shard], logra.max_tokens)
    raw = np.zeros((len(shard), logra.dim), dtype=np.float32)
    if high is not None:
        high = high.folded()
        stored = HighVectorWriter.empty(len(shard), high.logra.dim, high.storage)
    second = high.logra if high is not None else sampler.logra if sampler is not None else None
    projectors = [logra] + ([second] if second is not None else [])
    for idx in _batches(encoded, cfg.batch_size, cfg.batch_tokens):
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        out = joint_gradients(projectors, batch, [fit and pre.needs_token_stats,
                                                  sampler is not None and sampler.pre.needs_token_stats])
        if fit:
            pre.update(out[0].grads, out[0].token_stats)
        raw[idx] = logra.flatten(out[0].grads).cpu().numpy()
        if high is not None:
            for part, new in zip(stored, encode_rows(high.vectors(out[1].grads).cpu().numpy(), high.storage)):
                part[idx] = new
        elif sampler is not None:
            sampler.add(idx, out[1])
        counts["tokens"] += sum(len(encoded[i].input_ids) for i in idx)
        progress(len(idx))
    if sampler is not None:
        sampler.end_shard(len(shard))
    for e in encoded:
        counts["loss_tokens"] += e.n_loss_tokens
        counts["truncated"] += e.truncated
        counts["no_loss_tokens"] += e.n_loss_tokens == 0
    return raw, (stored if high is not None else None), encoded


def _write_vectors(cfg, pre: Preconditioner, writer: IndexWriter, dim: int) -> dict:
    """Pass 2: preconditioned vectors from the raw shards, then the FAISS indexes."""
    with tqdm(total=writer.n_rows, unit="doc", desc="preconditioning", disable=not cfg.progress, dynamic_ncols=True) as bar:
        def whitened():
            for block in writer.raw_shards():
                yield pre.apply(torch.from_numpy(block)).numpy()
                bar.update(len(block))
        writer.write_vectors(whitened(), dim, cfg.storage)
    return writer.write_faiss(cfg.index_type)


def _row(record: Record, enc: Encoded) -> dict:
    return {"id": record.id, "text": record.text, "prompt": record.prompt,
            "metadata": json.dumps(record.metadata, ensure_ascii=False, default=str),
            "source": record.source, "line": record.line, "n_tokens": len(enc.input_ids), "truncated": enc.truncated}
