"""`python -m indexer`: build, append, info and demo commands."""
from __future__ import annotations

import argparse
import json
import os
import sys

from engine import PRECONDITIONERS

from .build import HEAD_PROJECTIONS, BuildConfig, append_documents, build_index
from .query.ranking import HIGH_DEPTH
from .distributed import PeerFailed
from .records import BadRecordError
from .ann import COMPRESSED_TYPE, FLAT_BELOW, FLAT_UP_TO_BYTES, INDEX_TYPES
from .store import HIGH_STORAGES, STORAGES, IndexFormatError, read_manifest


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, except where it would mislead: an on/off flag (store_false's True
    reads as "on by default"), and None (unset: the help says what happens then). A default with
    whitespace (the separator's newline) is shown as a Python string."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.const is not None or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return action.help or ""
        if isinstance(action.default, str) and (not action.default or not action.default.strip()):
            return (action.help or "") + f" (default: {action.default!r})"
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


Option = tuple[tuple[str, ...], dict]  # add_argument's flags and keywords


def _opt(*flags: str, **kwargs) -> Option:
    return flags, kwargs


def add_options(p: argparse.ArgumentParser, options: list[Option], changes: dict[str, dict] | None = None) -> None:
    """Add `options` to `p`; `changes` (first flag -> keywords) adjusts some for this command."""
    for flags, kwargs in options:
        p.add_argument(*flags, **{**kwargs, **(changes or {}).get(flags[0], {})})


_D = BuildConfig(model="", data=[], out="")

# What `build` and `append` share, declared once. The documents and how their records are read:
DATA_OPTIONS: list[Option] = [
    _opt("--data", required=True, nargs="+",
         help=".jsonl / .json / .jsonl.gz / .json.gz / .parquet files, folders of them (shards), glob patterns (quote "
              "them), or `datasets` datasets: hf://owner/name[:config][@split] from the Hugging Face hub (streamed; "
              "split default train) or a folder written by save_to_disk (FOLDER@SPLIT for a DatasetDict)"),
    _opt("--text-field", default=_D.text_field, help="the document's text (plain-text records)"),
    _opt("--prompt-field", default=_D.prompt_field, help="with --response-field: prompt/response records"),
    _opt("--response-field", default=_D.response_field, help="with --prompt-field: the part that carries the loss"),
    _opt("--id-field", default=_D.id_field, help="generated as <file stem>-<line> when a record has none"),
    _opt("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping"),
]
# ... and how the gradient passes run (batching changes no vector):
PASS_OPTIONS: list[Option] = [
    _opt("--batch-size", type=positive_int, default=_D.batch_size, help="documents per pass at most"),
    _opt("--batch-tokens", type=positive_int, default=_D.batch_tokens,
         help="padded tokens per pass at most: batches of short documents grow up to --batch-size (default: off)"),
    _opt("--shard-size", type=positive_int, default=_D.shard_size, help="documents per on-disk shard"),
    _opt("--device", default=_D.device, help="cpu, cuda, cuda:1 or auto"),
    _opt("--no-progress", dest="progress", action="store_false", help="no progress bar"),
]
# `append` reads the record fields the index recorded unless told otherwise.
FIELDS_FROM_INDEX = {flag: {"default": None, "help": "default: as recorded in the index"}
                     for flag in ("--text-field", "--prompt-field", "--response-field", "--id-field")}
MODEL_ELSEWHERE = _opt("--model", default=None, help="the index's model from another place (must have the same weights)")

# `build` alone: the model, how documents are formatted and truncated, and what the index holds
# (an append keeps the index's projections, preconditioners and format).
BUILD_OPTIONS: list[Option] = [
    _opt("--model", required=True, help="Hugging Face causal LM: hub name, local folder, or a .gguf file (or a "
                                         "folder holding one), de-quantized to --dtype"),
    _opt("--out", required=True, help="index folder to create"),
    _opt("--chat-template", default=_D.chat_template,
         help="prompt/response and chat (messages) records: auto (the tokenizer's chat template, if it has one), "
              "none, or a Jinja template file"),
    _opt("--separator", default=_D.separator, help="between prompt and response when no chat template applies"),
    _opt("--overwrite", action="store_true", help="replace an existing index folder"),
    _opt("--trust-remote-code", action="store_true", help="let transformers run the model's own code"),
    _opt("--max-tokens", type=positive_int, default=_D.max_tokens,
         help="truncate each document to this many tokens (recorded per document)"),
    _opt("--rank", type=positive_int, default=_D.rank, help="projection rank r_in = r_out for every layer (overrides --budget)"),
    _opt("--budget", type=positive_int, default=_D.budget,
         help="dimensions per document of the compact vectors, spread over the layers"),
    _opt("--head-share", type=float, default=_D.head_share, help="fraction of --budget given to the LM head"),
    _opt("--min-layer-dims", type=int, default=_D.min_layer_dims,
         help="no block layer gets fewer of --budget's dimensions: when too few for every block layer, the deepest blocks "
              "alone are tracked (0: every block layer alike)"),
    _opt("--no-head", dest="head", action="store_false", help="do not track the LM head (output embedding)"),
    _opt("--no-high", dest="high", action="store_false",
         help="build no high-fidelity stage (queries then always use the compact vectors alone)"),
    _opt("--high-budget", type=positive_int, default=_D.high_budget,
         help="dimensions per document of the high-fidelity vectors (bytes each: see --high-storage)"),
    _opt("--high-head-share", type=float, default=_D.high_head_share, help="fraction of --high-budget given to the LM head"),
    _opt("--high-min-layer-dims", type=int, default=_D.high_min_layer_dims, help="as --min-layer-dims, for --high-budget"),
    _opt("--high-head-projection", choices=HEAD_PROJECTIONS, default=_D.high_head_projection,
         help="how the high-fidelity stage projects the LM head's vocabulary side: gaussian (a dense matrix) or sketch (a sparse sign sketch, "
              "a scatter-add per token: faster, 0.017 LDS worse on the toy benchmarks)"),
    _opt("--high-preconditioner", choices=("none", "kfac", "ekfac"), default=_D.high_preconditioner,
         help="the high-fidelity stage's preconditioner"),
    _opt("--high-damping", type=float, default=_D.high_damping, help="as --damping, for the high-fidelity stage"),
    _opt("--high-sample", type=positive_int, default=_D.high_sample,
         help="documents the high-fidelity preconditioner is fitted on (the first ones, whole shards)"),
    _opt("--storage", choices=STORAGES, default=_D.storage,
         help="how the compact vectors are stored: int8 (1 byte a dimension, codes with a float32 scale per row) "
              "or float32 (4 bytes); int8 ranks as float32 does within the quality benchmarks' error (docs/indexing.md)"),
    _opt("--high-storage", choices=HIGH_STORAGES, default=_D.high_storage,
         help="how the high-fidelity rows are stored: float16 (2 bytes a dimension), int8 (1 byte) or int4 (half a "
              "byte), the integer codes with a float32 scale per row; int8 and int4 rank as float16 does within "
              "the quality benchmarks' error (docs/indexing.md)"),
    _opt("--seed", type=int, default=_D.seed, help="projection seed"),
    _opt("--preconditioner", choices=PRECONDITIONERS, default=_D.preconditioner,
         help="the compact vectors' preconditioner, fitted on every document"),
    _opt("--damping", type=float, default=_D.damping, help="damping as a fraction of the mean eigenvalue"),
    _opt("--layers", dest="include", default=_D.include, help="regex: track only layers whose name matches (default: all)"),
    _opt("--exclude-layers", dest="exclude", default=_D.exclude, help="regex: drop layers whose name matches"),
    _opt("--dtype", default=_D.dtype, choices=["float32", "bfloat16", "float16"], help="the model's weights and passes"),
    _opt("--index-type", choices=INDEX_TYPES, default=_D.index_type,
         help=f"FAISS index: flat (exact), ivf (= ivf-flat), ivf-sq8, ivf-pq (compressed; reranked exactly), or auto: "
              f"flat while the float32 vectors fit {FLAT_UP_TO_BYTES >> 20} MiB (documents x dim x 4) or there are "
              f"fewer than {FLAT_BELOW} documents, {COMPRESSED_TYPE} above"),
]


def _add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="index folder built by `python -m indexer build`")
    p.add_argument("--queries", required=True, nargs="+",
                   help="query records: files, folders, glob patterns or datasets, as build's --data")
    for flag, kwargs in FIELDS_FROM_INDEX.items():
        p.add_argument(flag, **kwargs)
    p.add_argument("--precision", choices=("high", "fast"), default="high",
                   help="high: the compact vectors' candidates rescored with the high-fidelity rows (fast for an "
                        "index built with --no-high); fast: the compact vectors alone")
    p.add_argument("--batch-size", type=positive_int, default=16, help="queries per forward and backward pass")
    add_options(p, [MODEL_ELSEWHERE])
    p.add_argument("--device", default="cpu", help="where query gradients are computed: cpu, cuda, cuda:N or auto")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed query records instead of stopping")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m indexer", description="Build logra-search attribution indexes.")
    sub = ap.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": HelpFormatter}  # --help shows every default

    b = sub.add_parser("build", **defaults, help="index a dataset with a model")
    for options in (DATA_OPTIONS, BUILD_OPTIONS, PASS_OPTIONS):
        add_options(b, options)

    a = sub.add_parser("append", **defaults, help="add documents to an index, with its own projection and preconditioner")
    a.add_argument("--index", required=True, help="index folder to extend")
    add_options(a, [MODEL_ELSEWHERE])
    add_options(a, DATA_OPTIONS, FIELDS_FROM_INDEX)
    add_options(a, PASS_OPTIONS)

    q = sub.add_parser("attribute", **defaults, help="the top-k documents of every query in a file (as POST /attribute)")
    _add_query_args(q)
    q.add_argument("--out", required=True, help="hits, one row per (query, rank): .jsonl or .parquet")
    q.add_argument("--k", type=positive_int, default=10, help="documents per query")
    q.add_argument("--mode", choices=("cosine", "influence"), default="cosine",
                   help="cosine: scores divided by both vectors' norms; influence: the preconditioned inner product")
    q.add_argument("--direction", choices=("proponents", "opponents"), default="proponents",
                   help="proponents: highest scores first; opponents: lowest first")
    q.add_argument("--depth", type=positive_int, default=HIGH_DEPTH,
                   help="precision high rescores the compact vectors' top max(k, depth)")

    v = sub.add_parser("value", **defaults, help="each document's and each group's summed influence over a set of queries",
                       description="Each document's and each group's summed influence over a set of queries. Under "
                       "`torchrun --nproc_per_node N -m indexer value ...` each process computes a share of the query "
                       "vectors and scores a share of the documents; rank 0 writes the same report.")
    _add_query_args(v)
    v.add_argument("--group-by", action="append", required=True, help="a metadata field; repeat for several")
    v.add_argument("--out", required=True, help="groups: .json, .csv or .parquet")
    v.add_argument("--per-document", default=None, help="also every document's value into this .jsonl / .csv / .parquet")
    v.add_argument("--mode", choices=("influence", "cosine"), default="influence",
                   help="influence is additive: a group's value is the sum of its documents'; cosine divides each "
                        "score by both vectors' norms")
    v.add_argument("--top", type=positive_int, default=5, help="top documents listed per group")
    v.add_argument("--bootstrap", type=int, default=1000, help="resamples of the queries for the intervals (0: none)")
    v.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's resamples")

    i = sub.add_parser("info", **defaults, help="summarise an index: model, documents, layers, stages, sizes, build time")
    i.add_argument("index", help="index folder")
    i.add_argument("--json", action="store_true", help="print the manifest itself")

    dm = sub.add_parser("demo", **defaults, help="build the embedded demo: stdlib docstrings, a tiny GPT-2 trained here, its index")
    dm.add_argument("--out", default="demo", help="folder for the corpus, model and index (index in OUT/index)")
    dm.add_argument("--max-docs", type=positive_int, default=3000, help="docstring documents in the corpus at most")
    dm.add_argument("--epochs", type=positive_int, default=2, help="epochs the tiny GPT-2 is trained for")
    dm.add_argument("--overwrite", action="store_true", help="rebuild everything even if present")
    dm.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not getattr(args, "progress", True):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # its "Loading weights" bar too
    try:
        if args.command == "build":
            cfg = BuildConfig(**{k: v for k, v in vars(args).items() if k != "command"})
            manifest = build_index(cfg)
            if manifest is None:  # a torchrun process other than rank 0: its shards are written, rank 0 does the rest
                return 0
            st = manifest.stats
            print(f"indexed {manifest.n_documents} documents into {args.out} "
                  f"(dim {manifest.dim}, {manifest.build.seconds} s, {manifest.build.tokens_per_s:,.0f} tokens/s); "
                  f"truncated {st.truncated}, skipped {st.skipped}")
            if st.no_loss_tokens:
                print(f"warning: {st.no_loss_tokens} documents have no token to score (a single token and no BOS): "
                      "their vectors are zero and they never rank above 0", file=sys.stderr)
        elif args.command == "append":
            opts = {k: v for k, v in vars(args).items() if k not in ("command", "index", "data")}
            manifest = append_documents(args.index, args.data, **opts)
            last = manifest.appends[-1]
            print(f"appended {last.documents} documents to {args.index} ({manifest.n_documents} in all); "
                  f"skipped {last.skipped}")
            for reason in last.skipped_examples:
                print(f"  skipped: {reason}", file=sys.stderr)
        elif args.command == "attribute":
            from .query.attribute import AttributeConfig, attribute_queries
            done = attribute_queries(AttributeConfig(**{k: v for k, v in vars(args).items() if k != "command"}))
            print(f"attributed {done['queries']} queries ({done['precision']} precision) -> {done['rows']} rows in "
                  f"{done['out']} ({done['seconds']} s); skipped {done['skipped']}")
            for reason in done["skipped_examples"]:
                print(f"  skipped: {reason}", file=sys.stderr)
        elif args.command == "value":
            _value(args)
        elif args.command == "info":
            from .info import summary
            print(json.dumps(read_manifest(args.index).to_json(), indent=2, sort_keys=True) if args.json else summary(args.index))
        elif args.command == "demo":
            from .demo import build_demo
            build_demo(args.out, max_docs=args.max_docs, epochs=args.epochs, overwrite=args.overwrite, progress=args.progress)
    # OSError: a model that cannot be loaded (transformers raises it), or the disk: one line, no traceback.
    except (BadRecordError, IndexFormatError, OSError, ValueError, PeerFailed) as e:
        rank = os.environ.get("RANK", "0")
        print(f"error: {e}" if rank == "0" else f"error: [rank {rank}] {e}", file=sys.stderr)
        return 2
    return 0


def _value(args) -> None:
    """One process, or under torchrun every process: each computes a share of the query vectors and
    scores a share of the documents; rank 0 writes the report (indexer.query.value.value_processes)."""
    from .distributed import Processes
    from .query.opened import open_index, query_matrix, query_records
    from .query.value import check_outputs, value_processes, write_documents, write_report
    from .records import ReadStats
    procs = Processes.from_env(args.device)
    try:
        with procs.step():  # every process reads every query record: a bad one stops them all
            check_outputs(args.out, args.per_document)
            opened = open_index(args.index, args.model, procs.device)
            stage = opened.stage(args.precision)
            stats = ReadStats()
            pairs = [pair for _, pair in query_records(
                opened, args.queries, text_field=args.text_field, prompt_field=args.prompt_field,
                response_field=args.response_field, id_field=args.id_field, skip_bad=args.skip_bad, stats=stats)]
        report = value_processes(
            procs, opened.index, stage.name, len(pairs),
            lambda part: query_matrix(opened, stage, pairs[part.start : part.stop], args.batch_size,
                                      args.progress and procs.main),
            args.group_by, mode=args.mode, top=args.top, bootstrap=args.bootstrap, seed=args.seed,
            per_document=bool(args.per_document))
    finally:
        procs.close()
    if report is None:  # a torchrun process other than rank 0: its share is in rank 0's report
        return
    write_report(report, args.out)
    if args.per_document:
        write_documents(report, args.per_document)
    print(f"valued {report['n_documents']} documents in {len(report['groups'])} groups over {report['n_queries']} "
          f"queries ({stage.name} precision, {args.mode}{f', {procs.world} processes' if procs.world > 1 else ''}) -> "
          f"{args.out}; skipped {stats.skipped}")
