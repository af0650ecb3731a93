"""Serving: /attribute latency at 10k, 100k and 1M documents, ANN recall@10 against exact search, and
throughput with 1, 8 and 32 concurrent clients with and without micro-batching.

    python benchmarks/serving.py                 # 10k, 100k, 1M; writes benchmarks/results/serving.json
    python benchmarks/serving.py --quick         # 10k and 30k, shorter runs: a smoke run (a few minutes)
    python benchmarks/serving.py --workdir W     # keep the demo and the enlarged indexes in W (reused by a rerun)

The model and the real documents are the embedded demo's (`python -m indexer demo`: a tiny GPT-2
trained on standard-library docstrings, 3,000 documents indexed). Each larger index is the demo
index plus synthetic documents, written through the indexer's own `IndexWriter` (demo index as the
base, as `indexer append` does) with the index type `auto` picks for its size. Their vectors come
from `benchmarks/large_index.generate` (clusters, decaying spectrum, heavy-tailed norms), mapped
linearly so that their mean and covariance are the demo vectors' (whiten with the generated rows'
covariance, colour with the demo's): real queries see them as they see real documents.

Queries are real: (prompt, response) pairs cut from demo docstrings (the first words the prompt,
the next ones the response), their vectors computed by `engine.query_vectors` as the server does.
- Latency: sequential POST /attribute (k=10, cosine, precision fast and high alternated) from one client to a real `python -m api`
  process on loopback, client-side wall time; the search alone (`indexer.query.ranking.search`) in-process;
  and, in the same run, exact brute force over the same vectors held in RAM (float32 matmul +
  argpartition), what the search would cost without the ANN index.
- Recall@10: the search's top 10 against exact float64 top 10 (large_index.exact_top_k), both modes.
- Throughput: requests/s answered with 1, 8 and 32 client threads (one HTTP connection each) for a
  fixed time, against the smallest index, with `--max-batch 16` (default) and `--max-batch 1`
  (no batching) servers started in the same run.

The real model (`--real-model`, key "real_model"; smoke: "real_model_smoke"): SmolLM2-135M-Instruct
(benchmarks/quality/chat.py) indexed over its ground truth's chat records (`--real-base DIR`, an index
built with `python -m indexer build`, or built here from the first `--real-docs` of them), enlarged the
same way to the first of --sizes (default 10,000); queries are the held-out chat records
(split=query) sent as `messages`; latency as above, and the server's peak RSS (VmHWM) and each
stage's bytes per document on disk.

    python benchmarks/serving.py --real-model --real-base DIR --sizes 10000 --queries 100 --workdir W
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy
sys.path.insert(0, str(ROOT / "benchmarks"))

import faiss  # noqa: E402
import httpx  # noqa: E402

from api.server import serve_in_subprocess  # noqa: E402
from indexer import ann, store  # noqa: E402
from indexer.manifest import FaissInfo  # noqa: E402
from large_index import exact_top_k, generate  # noqa: E402

K = 10
SHARD = 100_000  # synthetic documents per IndexWriter shard
SYNTHETIC = 4  # bump when the synthetic rows change: cached enlarged indexes of another version are rebuilt


# -- queries ------------------------------------------------------------------------------------
def make_queries(corpus: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs cut from demo docstrings: up to 12 words of prompt, then up to 24."""
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    rng = random.Random(seed)
    pairs = []
    for text in rng.sample(docs, len(docs)):
        words = text.split()
        if len(words) < 8:
            continue
        cut = rng.randint(2, min(12, len(words) - 4))
        pairs.append((" ".join(words[:cut]), " ".join(words[cut : cut + 24])))
        if len(pairs) == n:
            break
    return pairs


def query_vectors_of(index_dir: Path, pairs: list[tuple[str, str]]) -> np.ndarray:
    from engine import load_model, query_vectors
    index = store.Index.open(index_dir)
    model, tok = load_model(index.manifest.model.name_or_path)
    logra, pre = index.engine(model)
    rows = [query_vectors(logra, pre, tok, pairs[i : i + 16])[0].numpy() for i in range(0, len(pairs), 16)]
    return np.concatenate(rows).astype(np.float32)


# -- enlarged indexes ---------------------------------------------------------------------------
def recolor_map(real: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m_gen, W, mu_real): (x - m_gen) @ W + mu_real has the real rows' mean and covariance."""
    def sqrt_cov(x, inverse):
        w, v = np.linalg.eigh(np.cov(x.astype(np.float64), rowvar=False))
        w = np.clip(w, w.max() * 1e-12, None)
        return (v * (w ** (-0.5 if inverse else 0.5))) @ v.T
    w = sqrt_cov(generated, True) @ sqrt_cov(real, False)
    return generated.mean(0), w.astype(np.float32), real.mean(0).astype(np.float32)


def enlarged_index(base_dir: Path, out: Path, n: int, work: Path) -> dict:
    """base index + (n - len(base)) synthetic documents in `out`, through IndexWriter; reused when
    already built for the same n and generator."""
    tag = {"n": n, "synthetic": SYNTHETIC, "base": str(base_dir)}
    try:
        if (store.read_manifest(out).extra or {}).get("serving_benchmark") == tag:
            return json.loads((out / "build.json").read_text())
    except (store.IndexFormatError, FileNotFoundError):
        pass
    started = time.perf_counter()
    base = store.Index.open(base_dir)
    extra = n - len(base)
    dim = base.vectors.shape[1]
    gen = work / f"generated-{n}.npy"
    generate(gen, extra, dim)
    vf = store.VectorFile(gen)
    m_gen, w, mu = recolor_map(np.asarray(base.vectors), vf.read(0, min(extra, 100_000)))
    writer = store.IndexWriter(out, overwrite=True, key=f"serving-benchmark/{n}", base=base)
    if writer.n_rows > extra:
        raise RuntimeError(f"{writer.tmp} holds more rows than asked: remove it")
    # Synthetic rows carry real demo texts and high-fidelity vectors (cycled): the high stage reads
    # the stored vectors of its candidates, which must exist and be as large as real ones.
    texts = [d["text"] for d in base.documents(list(range(len(base))))]
    for s in range(writer.n_rows, extra, SHARD):  # a killed build resumes after its last checkpointed shard
        rows = [{"id": f"synthetic-{i}", "text": texts[i % len(texts)], "prompt": None, "metadata": "{}",
                 "source": "synthetic", "line": i, "n_tokens": 0, "truncated": False}
                for i in range(s, min(extra, s + SHARD))]
        # raw (unpreconditioned) gradients only feed a preconditioner fit, which this build skips
        writer.add_shard(rows, np.zeros((len(rows), 0), np.float32))
    writer.write_vectors(((x - m_gen) @ w + mu for _, x in vf.blocks(65536)), dim, base.manifest.storage)
    if base.high_store is not None:  # the base's rows first, in its own storage
        high = writer.high_vectors(base.high_store.dim, base.high_store.storage)
        real = base.high_rows(slice(None)) * base.high_norms[:, None]
        for s in range(high.rows - len(base), extra, len(base)):
            high.add(real[: min(len(base), extra - s)])
        high.close(len(base) + extra)
    faiss_info = writer.write_faiss("auto")
    m = base.manifest
    writer.commit(m.model_copy(update={"faiss": FaissInfo(**faiss_info),
                                       "extra": {**(m.extra or {}), "serving_benchmark": tag}}), base.state)
    gen.unlink()
    info = {"build_s": round(time.perf_counter() - started, 1), "faiss": faiss_info}
    (out / "build.json").write_text(json.dumps(info))
    return info


# -- measurements -------------------------------------------------------------------------------
def pct(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.median(a)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def search_measures(index_dir: Path, queries: np.ndarray) -> dict:
    """In-process: the server's search (ANN + exact rerank) vs brute force over the same vectors."""
    from indexer.query.ranking import search
    index = store.Index.open(index_dir)
    vf = store.VectorFile(index_dir / store.VECTORS)
    truth = exact_top_k(vf, index.norms, queries, K, np.float64)
    def measure(mode: str, queries: np.ndarray) -> dict:
        times, recalled = [], 0
        for q, top in zip(queries, truth[mode]):
            t = time.perf_counter()
            hits = search(index, q, K, mode)
            times.append(1000 * (time.perf_counter() - t))
            recalled += len({h.row for h in hits} & set(top.tolist()))
        return {"recall_at_10": round(recalled / (K * len(queries)), 4), "ann_search": pct(times)}

    out = {}
    for mode in ann.MODES:
        search(index, queries[0], K, mode)  # warm
        out[mode] = measure(mode, queries)
        ix = index.faiss[mode]
        if hasattr(ix, "nprobe"):  # what probing more lists would buy (half the queries)
            default, out[mode]["by_nprobe"] = ix.nprobe, {}
            for p in sorted({ix.nlist // 4, ix.nlist // 2, ix.nlist} - {default}):
                ix.nprobe = p
                out[mode]["by_nprobe"][p] = measure(mode, queries[: max(1, len(queries) // 2)])
            ix.nprobe = default
    # exact brute force: every vector in RAM, one float32 matmul per query, top k by argpartition
    vectors = np.asarray(index.vectors, dtype=np.float32)
    times = []
    for q in queries[: min(len(queries), 30)]:
        t = time.perf_counter()
        scores = vectors @ q
        top = np.argpartition(-scores, K)[:K]
        _ = top[np.argsort(-scores[top])]
        times.append(1000 * (time.perf_counter() - t))
    out["brute_force_search"] = pct(times)
    del vectors
    return out


@contextlib.contextmanager
def server(index_dir: Path, log_dir: Path, max_batch: int = 16, served: bool = False):
    """A real `python -m api` process (api.server, as the tests start theirs), yielding its base URL
    (with `served`, api.server.Served: the URL and the process)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with serve_in_subprocess(index_dir, log_dir, ready_s=300, args=("--max-batch", str(max_batch)),
                             env={"HF_HUB_OFFLINE": "1"}) as s:
        yield s if served else s.url


PRECISIONS = ("fast", "high")


def http_latency(base: str, pairs: list[tuple[str, str] | dict], mode: str = "cosine") -> dict:
    """Per precision: client-side latency of POST /attribute (k = 10, the API's default mode), the two
    precisions alternated query by query in the same run, and the ratio of their medians. A query is
    a (prompt, response) pair or a dict of the request's text fields (e.g. {"messages": [...]})."""
    bodies = [q if isinstance(q, dict) else {"prompt": q[0], "response": q[1]} for q in pairs]
    times, took = {p: [] for p in PRECISIONS}, {p: [] for p in PRECISIONS}
    with httpx.Client(base_url=base, timeout=120) as c:
        for body in bodies[:5]:  # warm
            for precision in PRECISIONS:
                c.post("/attribute", json={**body, "k": K, "mode": mode, "precision": precision}).raise_for_status()
        for body in bodies:
            for precision in PRECISIONS:
                t = time.perf_counter()
                resp = c.post("/attribute", json={**body, "k": K, "mode": mode, "precision": precision})
                times[precision].append(1000 * (time.perf_counter() - t))
                resp.raise_for_status()
                took[precision].append(resp.json()["took_ms"])
    out = {precision: {**pct(times[precision]), "server_took_ms_p50": round(float(np.median(took[precision])), 2),
                       "requests": len(times[precision])} for precision in PRECISIONS}
    out["mode"] = mode
    out["high_over_fast_p50"] = round(out["high"]["p50_ms"] / out["fast"]["p50_ms"], 2)
    return out


def throughput(base: str, pairs: list[tuple[str, str]], clients: int, seconds: float) -> dict:
    done, errors = [0] * clients, []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(base_url=base, timeout=120) as c:
            start.wait()
            while time.perf_counter() < stop_at:
                p, r = rng.choice(pairs)
                # precision fast: what the micro-batcher shares is the compact vectors' pass
                resp = c.post("/attribute", json={"prompt": p, "response": r, "k": K, "mode": "influence",
                                                  "precision": "fast"})
                if resp.status_code == 200:
                    done[i] += 1
                else:
                    errors.append(resp.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at = time.perf_counter() + 1e9
    start.wait()
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"clients": clients, "requests": sum(done), "errors": len(errors), "seconds": round(elapsed, 2),
            "requests_per_s": round(sum(done) / elapsed, 2)}


# -- the real model ----------------------------------------------------------------------------
def real_base(work: Path, n_docs: int) -> Path:
    """An index of the real model (the build's defaults, batch 16) over the first n_docs chat records
    of its ground truth, built once in `work`."""
    from benchmarks.quality import chat
    from indexer import BuildConfig, build_index
    from indexing import chat_records
    out = work / f"real-base-{n_docs}"
    if not (out / store.MANIFEST).exists():
        data = work / f"real-train-{n_docs}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in chat_records(n_docs)))
        build_index(BuildConfig(model=str(chat.model_dir()), data=[str(data)], out=str(out), batch_size=16,
                                progress=False, overwrite=True))
    return out


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)


def real_model(base_dir: Path, n: int, work: Path, n_queries: int) -> dict:
    """/attribute latency (fast and high alternated) on the real model's index enlarged to n documents
    (the base itself when it holds n or more), queries as `messages`; the server's peak RSS; bytes per
    document of each stage of the base and of the enlarged index."""
    from indexing import chat_records, stage_bytes
    queries = [{"messages": r["messages"]} for r in chat_records(n_queries, split="query")]
    if n > len(store.Index.open(base_dir)):
        folder = work / f"real-index-{n}"
        built = enlarged_index(base_dir, folder, n, work)
    else:
        folder, built = base_dir, {"faiss": store.read_manifest(base_dir).faiss.model_dump(), "build_s": None}
    m = store.read_manifest(folder)
    row = {"model": "SmolLM2-135M-Instruct", "n_documents": m.n_documents,
           "base_documents": len(store.Index.open(base_dir)), "queries": len(queries), "k": K,
           "dims": {"compact": m.dim, "high": m.high.dim if m.high else None}, "faiss": built["faiss"],
           "build_s": built["build_s"], "disk": stage_bytes(folder), "base_disk": stage_bytes(base_dir),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "faiss": faiss.__version__,
                       "omp_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None}}
    with server(folder, work / f"server-real-{n}", served=True) as s:
        row["server_rss_after_start_mib"] = peak_rss_mib(s.process.pid)
        row["machine"]["loadavg_before"] = round(os.getloadavg()[0], 2)  # above ~0.5: something else was running
        row["attribute_http"] = http_latency(s.url, queries)
        row["machine"]["loadavg_after"] = round(os.getloadavg()[0], 2)
        row["server_peak_rss_mib"] = peak_rss_mib(s.process.pid)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 30k documents, 40 queries, 4 s per throughput run")
    ap.add_argument("--smoke", action="store_true", help="a 300-document demo trained 1 epoch, 1k documents, 10 queries, "
                    "1 s runs: checks the benchmark runs")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="index sizes (default 10000 100000 1000000)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each throughput run")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--workdir", default=None, help="keep the demo and indexes here (reused); default: a temporary folder")
    ap.add_argument("--demo", default=None, help="an existing `python -m indexer demo` folder to use")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    ap.add_argument("--real-model", action="store_true", help="only the real model's section (module docstring)")
    ap.add_argument("--real-base", default=None, help="an index of the real model to enlarge (default: built here)")
    ap.add_argument("--real-docs", type=int, default=2000, help="chat records of the base built here")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [10_000, 30_000]
        args.queries, args.seconds = min(args.queries, 40), min(args.seconds, 4.0)
    if args.smoke:
        args.sizes, args.queries, args.seconds, args.clients = [1_000], 10, 1.0, [1, 2]
    sizes = args.sizes or [10_000, 100_000, 1_000_000]
    faiss.omp_set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="serving-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    out = Path(args.out)

    def save_section(key: str, value: dict) -> None:
        results = json.loads(out.read_text()) if out.is_file() else {}
        results[key] = value
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    if args.real_model or args.smoke:
        from benchmarks.quality import chat
        try:
            chat.model_dir()
        except FileNotFoundError as e:  # its package is not installed: the smoke run says so and goes on
            if not args.smoke:
                raise
            real = {"skipped": str(e)}
        else:
            base = Path(args.real_base) if args.real_base else real_base(work, 4 if args.smoke else args.real_docs)
            real = real_model(base, sizes[0] if not args.smoke else 4, work, 2 if args.smoke else args.queries)
        print(json.dumps(real), flush=True)
        save_section("real_model_smoke" if args.smoke else "real_model", real)
        if args.real_model:
            if tmp is not None:
                tmp.cleanup()
            return

    demo = Path(args.demo) if args.demo else work / "demo"
    if not args.demo:
        from indexer.demo import build_demo
        build_demo(demo, progress=False, **({"max_docs": 300, "epochs": 1} if args.smoke else {}))
    pairs = make_queries(demo / "corpus.jsonl", args.queries)
    qv = query_vectors_of(demo / "index", pairs)
    result = {"k": K, "queries": len(pairs), "quick": args.quick or args.smoke, "model": "embedded demo (tiny GPT-2, 2x128)",
              "dim": int(qv.shape[1]), "base_documents": len(store.Index.open(demo / "index")),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "omp_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "faiss": faiss.__version__},
              "sizes": [], "throughput": {}}

    def save():
        save_section("serving_smoke" if args.smoke else "serving_quick" if args.quick else "serving", result)

    for n in sizes:
        folder = work / f"index-{n}"
        built = enlarged_index(demo / "index", folder, n, work)
        print(f"{n}: index built ({built})", flush=True)
        row = {"n_documents": n, "faiss": built["faiss"], "build_s": built["build_s"]}
        row.update(search_measures(folder, qv))
        with server(folder, work / f"server-{n}") as base:
            row["attribute_http"] = http_latency(base, pairs)
        print(json.dumps(row), flush=True)
        result["sizes"].append(row)
        save()

    folder = work / f"index-{sizes[0]}"
    for max_batch in (16, 1):
        runs = []
        with server(folder, work / f"server-batch{max_batch}", max_batch=max_batch) as base:
            http_latency(base, pairs[:10])  # warm
            for c in args.clients:
                runs.append(throughput(base, pairs, c, args.seconds))
                print(f"max_batch {max_batch}: {runs[-1]}", flush=True)
        result["throughput"][f"max_batch_{max_batch}"] = runs
    result["throughput"]["index_documents"] = sizes[0]
    result["throughput"]["batching_speedup"] = {
        str(a["clients"]): round(a["requests_per_s"] / b["requests_per_s"], 2)
        for a, b in zip(result["throughput"]["max_batch_16"], result["throughput"]["max_batch_1"])}
    print(json.dumps(result["throughput"]), flush=True)
    save()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
