"""Valuation at scale: `indexer value`'s work after the query pass (indexer.query.value.value_report: every
document scored against every query from the memory-mapped stored vectors, per-document and
per-group sums, the bootstrap, the report) against a plain BLAS product of the same shapes, alternated
in one process.

The baseline, per block of the same memory-mapped rows: numpy's float32 matmul of the block by the
(dim x queries) query matrix, each document's sum over the queries, and each query's sum per group
(a one-hot float32 matmul); stored codes decoded to float32 first, as any BLAS product over them must:
the compact rows (int8 codes with a per-row scale, or float32: --storage) through store.CompactRows, the
high-fidelity stage's (float16, or int8 / int4 codes: --high-storage) to unit rows through store.HighRows.
No norm scaling, no float64, no metadata read, no report: a lower bound.

    python benchmarks/valuation.py            # fast stage 1M x 4096, high stage 100k x 65536, 1000 queries
    python benchmarks/valuation.py --smoke    # seconds (checks the benchmark runs)
    python benchmarks/valuation.py --processes 2    # also value_processes over 2 torchrun processes
    python benchmarks/valuation.py --stages fast --n 200000 --workdir /data/valuation

Writes "valuation" (or "valuation_smoke") in benchmarks/results/valuation.json.

Synthetic data (what is and is not measured): document vectors are benchmarks/large_index.py's
anisotropic clusters without its random rotation (`rows(rotate=False)`: a dim x dim rotation of
65,536 dims would not fit in memory, and the timing of a product does not depend on the values);
the high-fidelity rows are stored through the indexer's own writer (store.HighVectorWriter: unit rows
as --high-storage says, by default as the indexer stores them, and float32 norms). Query vectors are
synthetic rows of the same distribution: the queries' model pass (one forward and backward pass each,
the same as /attribute's) is not what is measured.
Every document's metadata is {"source": one of --groups (Zipf-sized), "position": its row}, in a real
LanceDB documents table, which the valuation reads to group them (the valuation's time includes it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy
sys.path.insert(0, str(ROOT / "benchmarks"))

import indexer  # noqa: E402,F401  first, as `python -m indexer` imports it: it sets GOMP_SPINCOUNT before torch loads
import lancedb  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from large_index import rows  # noqa: E402

from indexer import BuildConfig, store  # noqa: E402
from indexer.query.value import BLOCK_BYTES, value_report  # noqa: E402

GENERATOR = 1  # bump when the prepared data change: a workdir of another version is rebuilt


def chunk_rows(dim: int) -> int:
    return max(1, (64 << 20) // (4 * dim))  # 64 MiB of float32 per generated chunk


def prepare(folder: Path, stage: str, n: int, dim: int, n_queries: int, n_groups: int,
            storage: str = "float16") -> float:
    """The stage's stored vectors (as `storage` says), a documents table and query vectors in `folder`,
    reused when already there for the same sizes. Returns the seconds it took (0 when reused)."""
    meta = {"stage": stage, "n": n, "dim": dim, "queries": n_queries, "groups": n_groups, "generator": GENERATOR,
            "storage": storage}
    if (folder / "meta.json").is_file() and json.loads((folder / "meta.json").read_text()) == meta:
        return 0.0
    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)
    if stage == "fast":  # as store.IndexWriter.write_vectors stores them
        out = np.lib.format.open_memmap(folder / store.VECTORS, mode="w+", shape=(n, dim),
                                        dtype=np.float32 if storage == "float32" else np.int8)
        norms, scales, s = np.zeros(n, np.float32), np.zeros(n, np.float32), 0
        for z in rows(n, dim, rotate=False, chunk=chunk_rows(dim)):
            at = slice(s, s + len(z))
            if storage == "float32":
                out[at], norms[at] = z, np.linalg.norm(z, axis=1)
            else:
                out[at], scales[at], norms[at] = store.encode_rows(z, storage)
            s += len(z)
        out.flush()
        del out
        np.save(folder / store.NORMS, norms)
        if storage != "float32":
            np.save(folder / store.SCALES, scales)
    else:  # what the indexer writes: stored unit rows and float32 norms, through its own writer
        writer = store.HighVectorWriter(folder, dim, storage)
        for z in rows(n, dim, rotate=False, chunk=chunk_rows(dim)):
            writer.add(z)
        writer.close(n)
    np.save(folder / "queries.npy", np.concatenate(list(rows(n_queries, dim, rows_seed=1, rotate=False,
                                                             chunk=chunk_rows(dim)))))
    rng = np.random.default_rng(2)
    weights = np.arange(1, n_groups + 1) ** -0.7
    codes = rng.choice(n_groups, size=n, p=weights / weights.sum())

    def batches():
        for s in range(0, n, 100_000):
            r = np.arange(s, min(n, s + 100_000))
            yield pa.RecordBatch.from_pydict({
                "row": r, "id": [f"doc-{i}" for i in r], "text": [""] * len(r), "prompt": [None] * len(r),
                "metadata": [json.dumps({"source": f"source-{c}", "position": int(i)}) for c, i in zip(codes[r], r)], "source": ["synthetic"] * len(r),
                "line": r + 1, "n_tokens": np.zeros(len(r), np.int64), "truncated": np.zeros(len(r), bool)},
                schema=store.DOCUMENT_SCHEMA)
    lancedb.connect(folder).create_table(store.TABLE, data=pa.RecordBatchReader.from_batches(store.DOCUMENT_SCHEMA, batches()),
                                         mode="overwrite")
    np.save(folder / "codes.npy", codes)
    (folder / "meta.json").write_text(json.dumps(meta))
    return time.perf_counter() - t


def open_index(folder: Path, stage: str, n: int) -> store.Index:
    """An Index over the prepared folder holding what the valuation reads: the stage's vectors and
    norms, the documents table and the ids (no model state, no FAISS files: never read by it)."""
    table = lancedb.connect(folder).open_table(store.TABLE)
    row_of_id = {f"doc-{i}": i for i in range(n)}
    meta = json.loads((folder / "meta.json").read_text())
    if stage == "fast":
        vectors = store.CompactRows.open(folder, meta["storage"])
        return store.Index(folder, None, {}, vectors, vectors.norms, {}, table, row_of_id)
    return store.Index(folder, None, {}, np.empty((n, 0), np.float32), np.ones(n, np.float32), {}, table, row_of_id,
                       store.HighRows.open(folder, meta["storage"], meta["dim"]))


def blas_pass(read, n: int, queries: np.ndarray, codes: np.ndarray, n_groups: int, block: int):
    """The baseline (module docstring): per-document sums and per-query group sums, float32, over the
    n rows `read(slice)` gives as float32."""
    q_t = np.ascontiguousarray(queries.T, dtype=np.float32)
    values = np.empty(n, np.float32)
    by_group = np.zeros((n_groups, len(queries)), np.float32)
    for s in range(0, n, block):
        x = read(slice(s, s + block))
        scores = x @ q_t
        values[s : s + len(x)] = scores.sum(axis=1)
        onehot = np.zeros((len(x), n_groups), np.float32)
        onehot[np.arange(len(x)), codes[s : s + len(x)]] = 1
        by_group += onehot.T @ scores
    return values, by_group


def read_pass(vectors: np.ndarray, block: int) -> float:
    """Only reading the rows (what the disk and page cache cost both sides), seconds."""
    t = time.perf_counter()
    for s in range(0, len(vectors), block):
        np.array(vectors[s : s + block])
    return time.perf_counter() - t


def sharded_child(folder: Path, stage: str, n: int) -> None:
    """One process of a torchrun launch (--processes): value_processes over the prepared folder, as
    `torchrun -m indexer value` runs it after the query pass; rank 0 prints its seconds and sums."""
    from indexer.distributed import Processes
    from indexer.query.value import value_processes
    procs = Processes.from_env("cpu")
    index = open_index(folder, stage, n)
    queries = np.load(folder / "queries.npy")
    procs.most(0)  # start together
    t = time.perf_counter()
    report = value_processes(procs, index, stage, len(queries), lambda part: queries[part.start : part.stop], ["source"],
                             bootstrap=1000)
    seconds = time.perf_counter() - t
    procs.close()
    if report is not None:
        print(json.dumps({"seconds": seconds, "world": procs.world, "groups": {g["group"]["source"]: g["value"] for g in report["groups"]},
                          "ci": {g["group"]["source"]: [g["ci_low"], g["ci_high"]] for g in report["groups"]}}))


def sharded(folder: Path, stage: str, n: int, processes: int, one: dict) -> dict:
    """`processes` torchrun processes (gloo, one thread each) against the one-process report `one`."""
    # the child's settings travel in the environment: torchrun's own parser would take "--n" for one of its options
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "VALUATION_CHILD": json.dumps([str(folder), stage, n])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), __file__]
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - t
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["world"] != processes:
        raise RuntimeError(f"the launch ran {r['world']} processes, not {processes}")
    scale = max(abs(v) for v in one["groups"].values())
    return {"processes": processes, "threads_per_process": 1, "value_s": round(r["seconds"], 2),
            "launch_wall_s": round(wall, 2),
            "max_relative_difference_from_one_process": {
                "groups": max(abs(r["groups"][k] - v) for k, v in one["groups"].items()) / scale,
                "ci": max(abs(a - b) for k, v in one["ci"].items() for a, b in zip(r["ci"][k], v)) / scale}}


def measure(folder: Path, stage: str, n: int, dim: int, n_groups: int, repeats: int) -> tuple[dict, dict]:
    """The alternated timings, and the one-process report's group values and intervals."""
    index = open_index(folder, stage, n)
    if stage == "fast":
        stored, read = index.vectors.stored, lambda r: np.asarray(index.vectors[r], dtype=np.float32)
    else:
        stored, read = index.high_store.codes, index.high_rows
    queries = np.load(folder / "queries.npy")
    codes = np.load(folder / "codes.npy")
    block = max(1, BLOCK_BYTES // (4 * dim))
    read_s = read_pass(stored, block)
    t = time.perf_counter()
    index.groups(["source"])
    groups_s = time.perf_counter() - t
    times = {"value": [], "blas": []}
    for rep in range(repeats):  # alternated: blas first on even repeats, value first on odd ones
        for side in ("blas", "value") if rep % 2 == 0 else ("value", "blas"):
            t = time.perf_counter()
            if side == "value":
                report = value_report(index, stage, queries, ["source"], bootstrap=1000)
            else:
                values, by_group = blas_pass(read, n, queries, codes, n_groups, block)
            times[side].append(time.perf_counter() - t)
            print(json.dumps({"stage": stage, "repeat": rep, side: round(times[side][-1], 2)}), flush=True)
    # the two computed the same sums (the high stage's influence scales by the norms; the baseline does not):
    # every group's value and each group's top documents' values
    expect = values.astype(np.float64) * (index.high_norms if stage == "high" else 1)
    group_expect = np.zeros(n_groups)
    np.add.at(group_expect, codes, expect)
    row = {f"doc-{i}": i for i in range(n)}.__getitem__
    top = [(d["value"], expect[row(d["id"])]) for g in report["groups"] for d in g["top_documents"]]
    agree = {"groups": float(max(abs(g["value"] - group_expect[int(g["group"]["source"].split("-")[1])])
                                 for g in report["groups"]) / np.abs(group_expect).max()),
             "top_documents": float(max(abs(a - b) for a, b in top) / np.abs(expect).max())}
    one = {"groups": {g["group"]["source"]: g["value"] for g in report["groups"]},
           "ci": {g["group"]["source"]: [g["ci_low"], g["ci_high"]] for g in report["groups"]}}
    med = {k: float(np.median(v)) for k, v in times.items()}
    flops = 2.0 * n * dim * len(queries)
    return {"n_documents": n, "dim": dim,
            "stored_dtype": index.vectors.storage if stage == "fast" else index.high_store.storage, "queries": len(queries),
            "groups": n_groups, "vectors_bytes": int(stored.nbytes),
            "block_rows": block, "read_only_pass_s": round(read_s, 2), "metadata_grouping_s": round(groups_s, 2),
            "value_s": [round(x, 2) for x in times["value"]], "blas_s": [round(x, 2) for x in times["blas"]],
            "value_s_median": round(med["value"], 2), "blas_s_median": round(med["blas"], 2),
            "ratio": round(med["value"] / med["blas"], 3),
            "ratio_per_repeat": [round(v / b, 3) for v, b in zip(times["value"], times["blas"])],
            "blas_gflops": round(flops / med["blas"] / 1e9, 1), "value_gflops": round(flops / med["value"] / 1e9, 1),
            "max_relative_difference": agree}, one


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="documents of the compact (fast) stage")
    ap.add_argument("--dim", type=int, default=4096, help="compact vector size (the default --budget)")
    ap.add_argument("--high-n", type=int, default=100_000, help="documents of the high-fidelity stage")
    ap.add_argument("--high-dim", type=int, default=65536, help="high-fidelity vector size (the default --high-budget)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--groups", type=int, default=100, help="distinct sources the documents are grouped by")
    ap.add_argument("--repeats", type=int, default=2, help="alternated (baseline, valuation) pairs per stage")
    ap.add_argument("--stages", nargs="+", default=["fast", "high"], choices=("fast", "high"))
    ap.add_argument("--storage", choices=store.STORAGES, default=BuildConfig.storage,
                    help="how the compact (fast stage) rows are stored (default: the indexer's)")
    ap.add_argument("--high-storage", choices=store.HIGH_STORAGES, default=BuildConfig.high_storage,
                    help="how the high-fidelity rows are stored (default: the indexer's)")
    ap.add_argument("--smoke", action="store_true", help="4,000 x 64 and 2,000 x 256, 50 queries: seconds")
    ap.add_argument("--workdir", default=None, help="keep the prepared data here (reused by a rerun); default: a temporary folder")
    ap.add_argument("--processes", type=int, default=0,
                    help="also the valuation over this many torchrun processes (one thread each), after the alternation")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "valuation.json"))
    args = ap.parse_args(argv)
    if "VALUATION_CHILD" in os.environ:  # a process of a --processes launch
        folder, stage, n = json.loads(os.environ["VALUATION_CHILD"])
        sharded_child(Path(folder), stage, n)
        return
    if args.smoke:
        args.n, args.dim, args.high_n, args.high_dim, args.queries, args.groups, args.repeats = 4000, 64, 2000, 256, 50, 10, 1
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="valuation-")
    work = Path(args.workdir or tmp.name)
    key = "valuation_smoke" if args.smoke else "valuation"
    path = Path(args.out)
    try:
        for stage in args.stages:
            n, dim = (args.n, args.dim) if stage == "fast" else (args.high_n, args.high_dim)
            prepare_s = prepare(work / stage, stage, n, dim, args.queries, args.groups,
                                args.storage if stage == "fast" else args.high_storage)
            timed, one = measure(work / stage, stage, n, dim, args.groups, args.repeats)
            r = {"prepare_s": round(prepare_s, 2), **timed}
            if args.processes:
                r["sharded"] = sharded(work / stage, stage, n, args.processes, one)
                print(json.dumps({"stage": stage, "sharded": r["sharded"]}), flush=True)
            print(json.dumps({"stage": stage} | {k: r[k] for k in ("n_documents", "dim", "value_s_median", "blas_s_median", "ratio")}),
                  flush=True)
            results = json.loads(path.read_text()) if path.is_file() else {}
            section = results.get(key, {})
            section.update({
                "what": "indexer.query.value.value_report (scores, sums, bootstrap 1000, report, per-document values) against "
                        "numpy float32 matmul + per-document sums + one-hot group sums over the same memory-mapped rows, "
                        "alternated; synthetic document and query vectors (benchmarks/valuation.py docstring)",
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "numpy": np.__version__, "torch": torch.__version__}})
            section.setdefault("stages", {})[stage] = r
            results[key] = section
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
