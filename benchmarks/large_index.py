"""Index types for large corpora: build cost, size, memory, latency and recall@10 after the exact rerank.

Builds each IVF type (ivf-flat, ivf-sq8, ivf-pq) over N synthetic vectors through the indexer's own
code path (`indexer.store.write_faiss`, what `IndexWriter.write_faiss` runs), each in its own child
process so that its peak RSS is its own, and searches it through the API's own function
(`indexer.query.ranking.rerank_search`: FAISS candidates, exact float64 rerank from the memory-mapped
vectors). Recall@10 is measured against exact brute force (float64, chunked) for held-out, perturbed
query vectors, in both modes; the timing baseline is exact brute force over the same memory-mapped
vectors in the same process (float32 BLAS, chunked).

    python benchmarks/large_index.py            # 1M x 512; writes "large_index" in benchmarks/results/indexing.json
    python benchmarks/large_index.py --quick    # 50k, a smoke run
    OMP_NUM_THREADS=1 python benchmarks/large_index.py --n 200000 --types ivf-pq

Synthetic vectors (why this shape): LoGra vectors are whitened gradients v = H^-1/2 g. Damped
whitening flattens the spectrum without equalising it, so the variance still decays over directions;
documents on the same topic or task share gradient directions (clusters of unequal size); and a few
documents have much larger gradients than the rest (heavy-tailed norms, docs/method.md). So each vector is
    v_i = s_i * (mu_{c_i} + z_i),   z_i ~ N(0, R diag(lambda) R^T),  lambda_j ~ j^-1 (j = 1..dim),
with R a random rotation, 1000 cluster means mu_c drawn from the same gaussian scaled by 0.75
(clusters overlap: a neighbour is often in another cluster), cluster sizes ~ Zipf (c^-0.7), and
s_i ~ lognormal(0, 0.5). Isotropic or uniformly clustered data would be easier (or harder) than this
in ways real gradients are not; this is a stand-in, not a measurement on real LoGra vectors.
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
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

import faiss  # noqa: E402

from indexer import ann, store  # noqa: E402

TYPES = ("ivf-flat", "ivf-sq8", "ivf-pq")
K = 10
CHUNK = 65536  # rows per generated / scanned block: 128 MiB at dim 512
N_CLUSTERS = 1000
GENERATOR = 1  # bump when generate() changes: results and cached corpora of another version differ


def rows(n: int, dim: int, rows_seed: int = 0, rotate: bool = True, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The n vectors of `generate`, `chunk` rows at a time. `rotate=False`: the same spectrum, clusters
    and norms along the coordinate axes instead of a random rotation's (no dim x dim product: cheap at
    any dim, for benchmarks that time products over the vectors, e.g. benchmarks/valuation.py)."""
    rng = np.random.default_rng(0)
    if rotate:
        rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        mix = (np.sqrt(1.0 / np.arange(1, dim + 1))[:, None] * rotation).astype(np.float32)  # z = g @ mix
        spread = lambda g: g @ mix  # noqa: E731
    else:
        scale = np.sqrt(1.0 / np.arange(1, dim + 1)).astype(np.float32)
        spread = lambda g: g * scale  # noqa: E731
    means = spread(0.75 * rng.standard_normal((N_CLUSTERS, dim)).astype(np.float32))
    weights = np.arange(1, N_CLUSTERS + 1) ** -0.7
    for s in range(0, n, chunk):
        r = np.random.default_rng([rows_seed, s // chunk])
        m = min(chunk, n - s)
        z = spread(r.standard_normal((m, dim), dtype=np.float32))
        z += means[r.choice(N_CLUSTERS, size=m, p=weights / weights.sum())]
        z *= r.lognormal(0.0, 0.5, size=(m, 1)).astype(np.float32)
        yield z


def generate(path: Path, n: int, dim: int, rows_seed: int = 0) -> None:
    """n vectors (module docstring) into a float32 .npy written chunk by chunk. The distribution
    (rotation, spectrum, clusters) is fixed; `rows_seed` draws other rows from it (held-out queries)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    s = 0
    for z in rows(n, dim, rows_seed):
        out[s : s + len(z)] = z
        s += len(z)
    out.flush()
    del out


def exact_top_k(vf: store.VectorFile, norms: np.ndarray, queries: np.ndarray, k: int, dtype) -> dict[str, np.ndarray]:
    """Exact top-k rows per query in both modes, scanning the vectors in chunks (bounded memory)."""
    q = queries.astype(dtype)
    qn = np.linalg.norm(q, axis=1)
    best = {mode: (np.full((len(q), 0), -np.inf), np.zeros((len(q), 0), dtype=np.int64)) for mode in ann.MODES}
    for s, x in vf.blocks(CHUNK):
        raw = x.astype(dtype, copy=False) @ q.T  # (rows, queries)
        for mode, scores in (("influence", raw), ("cosine", raw / (norms[s : s + len(x), None] * qn[None, :]))):
            top_s, top_i = best[mode]
            cand_s = np.concatenate([top_s, scores.T], axis=1)
            cand_i = np.concatenate([top_i, np.broadcast_to(np.arange(s, s + len(x)), (len(q), len(x)))], axis=1)
            keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k] if cand_s.shape[1] > k else np.argsort(-cand_s, axis=1)
            best[mode] = (np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1))
    return {mode: np.take_along_axis(i, np.argsort(-sc, axis=1), 1) for mode, (sc, i) in best.items()}


def prepare(work: Path, n: int, dim: int, n_queries: int) -> dict:
    """Corpus, queries and exact answers in `work`, reused when already there for the same sizes."""
    meta = {"n": n, "dim": dim, "n_queries": n_queries, "generator": GENERATOR}
    if (work / "meta.json").is_file() and json.loads((work / "meta.json").read_text()) == meta:
        return json.loads((work / "prepared.json").read_text())
    t = time.perf_counter()
    generate(work / store.VECTORS, n, dim)
    generate(work / "held-out.npy", n_queries, dim, rows_seed=1)
    held = np.load(work / "held-out.npy")
    rng = np.random.default_rng(1)
    # a query is near, not equal to, something the corpus distribution holds: 30% relative noise
    noise = rng.standard_normal(held.shape).astype(np.float32)
    queries = held + 0.3 * noise * (np.linalg.norm(held, axis=1, keepdims=True) / np.sqrt(dim))
    vf = store.VectorFile(work / store.VECTORS)
    norms = np.concatenate([np.linalg.norm(x, axis=1) for _, x in vf.blocks(CHUNK)])
    np.save(work / store.NORMS, norms)
    np.save(work / "queries.npy", queries)
    generate_s = time.perf_counter() - t
    t = time.perf_counter()
    truth = exact_top_k(vf, norms, queries, K, np.float64)
    truth_s = time.perf_counter() - t
    for mode, top in truth.items():
        np.save(work / f"truth-{mode}.npy", top)
    # Baseline: exact search one query at a time over the same vectors (float32, as fast as numpy goes)
    times = []
    for q in queries[:5]:
        t = time.perf_counter()
        exact_top_k(vf, norms, q[None, :], K, np.float32)
        times.append(time.perf_counter() - t)
    prepared = {"generate_s": round(generate_s, 1), "ground_truth_s": round(truth_s, 1),
                "brute_force_ms_per_query": round(1000 * float(np.median(times)), 2)}
    (work / "prepared.json").write_text(json.dumps(prepared))
    (work / "meta.json").write_text(json.dumps(meta))
    return prepared


def proc_status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that over
    exec from the forking parent, whose mapped corpus would then pass for this child's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(work: Path, kind: str, pq_dims: int = ann.PQ_DIMS_PER_CODE) -> dict:
    """Build one type via the indexer's code path (IVF-PQ with `pq_dims` dimensions a code), then search it;
    runs in its own process."""
    shipped, ann.PQ_DIMS_PER_CODE = ann.PQ_DIMS_PER_CODE, pq_dims
    folder = work / (kind if kind != "ivf-pq" or pq_dims == shipped else f"{kind}-{pq_dims}")
    folder.mkdir(exist_ok=True)
    for name in (store.VECTORS, store.NORMS):
        if not (folder / name).exists():
            (folder / name).symlink_to(work / name)
    rss_start = proc_status_kib("VmRSS")
    t = time.perf_counter()
    info = store.write_faiss(folder, kind)
    build_s = time.perf_counter() - t
    rss_build = proc_status_kib("VmHWM")
    sizes = {mode: store.faiss_path(folder, mode).stat().st_size for mode in ann.MODES}
    n = np.load(work / store.VECTORS, mmap_mode="r").shape[0]
    result = {"type": kind, "faiss": info, "build_s": round(build_s, 1),
              "index_bytes": sizes, "index_bytes_per_document": round(sum(sizes.values()) / n, 1),
              "rss_before_build_mib": round(rss_start / 1024), "peak_rss_build_mib": round(rss_build / 1024),
              "modes": {}}
    from indexer.query.ranking import rerank_search  # after the build: torch et al. stay out of its peak RSS
    vectors = np.load(folder / store.VECTORS, mmap_mode="r")
    norms = np.load(folder / store.NORMS)
    queries = np.load(work / "queries.npy")

    def measure(index, mode: str, factor: int, truth: np.ndarray, queries: np.ndarray = queries) -> dict:
        times, recalled = [], 0
        for q, top in zip(queries, truth):
            t0 = time.perf_counter()
            hits = rerank_search(index, vectors, norms, q, K, mode, factor)
            times.append(time.perf_counter() - t0)
            recalled += len({h.row for h in hits} & set(top.tolist()))
        ms = 1000 * np.array(times)
        return {"recall_at_10": round(recalled / (K * len(queries)), 4), "ms_p50": round(float(np.median(ms)), 2),
                "ms_p99": round(float(np.percentile(ms, 99)), 2), "ms_mean": round(float(ms.mean()), 2)}

    for mode in ann.MODES:
        truth = np.load(work / f"truth-{mode}.npy")
        index = faiss.read_index(str(store.faiss_path(folder, mode)))
        measure(index, mode, info["rerank_factor"], truth[:10], queries[:10])  # warm the page cache and FAISS
        r = {"default": {"nprobe": info["nprobe"], "rerank_factor": info["rerank_factor"],
                         **measure(index, mode, info["rerank_factor"], truth)}}
        # what the defaults trade: fewer/more candidates reranked, fewer/more lists probed (half the queries)
        half = slice(0, max(1, len(queries) // 2))
        r["by_rerank_factor"] = {f: measure(index, mode, f, truth[half], queries[half])
                                 for f in (1, 4, 16) if f != info["rerank_factor"]}
        r["by_nprobe"] = {}
        for p in sorted({max(1, info["nlist"] // d) for d in (32, 16, 4, 2)}):
            index.nprobe = p
            r["by_nprobe"][p] = measure(index, mode, info["rerank_factor"], truth[half], queries[half])
        result["modes"][mode] = r
        del index
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="corpus size")
    ap.add_argument("--quick", action="store_true", help="50k vectors and 100 queries")
    ap.add_argument("--smoke", action="store_true", help="5k vectors of 64 dims, 20 queries: seconds (checks the benchmark runs)")
    ap.add_argument("--dim", type=int, default=512, help="vector size (the demo index's)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--pq-dims", type=int, nargs="+", default=[ann.PQ_DIMS_PER_CODE],
                    help="IVF-PQ: dimensions per one-byte code (ann.PQ_DIMS_PER_CODE); several: one IVF-PQ build each")
    ap.add_argument("--workdir", default=None, help="keep corpus and indexes here (reused by a rerun); default: a temporary folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "indexing.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.child:
        print(json.dumps(child(Path(args.workdir), args.child, args.pq_dims[0])))
        return
    if args.quick:
        args.n, args.queries = 50_000, 100
    if args.smoke:
        args.n, args.dim, args.queries = 5_000, 64, 20
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="large-index-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare(work, args.n, args.dim, args.queries)
    print(json.dumps(prepared), flush=True)
    path = Path(args.out)
    section = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": K, "generator": GENERATOR,
               "data": "synthetic anisotropic clusters (benchmarks/large_index.py docstring)",
               "vectors_bytes": args.n * args.dim * 4, **prepared,
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "omp_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "faiss": faiss.__version__},
               "types": []}
    key = "large_index_smoke" if args.smoke else "large_index_quick" if args.quick else "large_index"
    builds = [(kind, d) for kind in args.types for d in (args.pq_dims if kind == "ivf-pq" else [ann.PQ_DIMS_PER_CODE])]
    for kind, d in builds:
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--workdir", str(work), "--pq-dims", str(d)],
                             stdout=subprocess.PIPE, text=True, check=True)  # its stderr shows here
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["pq_dims_per_code"] = d if kind == "ivf-pq" else None
        r["search_speedup_vs_brute_force"] = {
            mode: round(prepared["brute_force_ms_per_query"] / r["modes"][mode]["default"]["ms_mean"], 1) for mode in ann.MODES}
        print(json.dumps({k: r[k] for k in ("type", "build_s", "index_bytes_per_document", "peak_rss_build_mib")}
                         | {m: r["modes"][m]["default"] for m in ann.MODES}), flush=True)
        # written after each type; a run of some --types replaces those and keeps the others measured
        # on the same corpus. Other sections of the file belong to other benchmarks.
        results = json.loads(path.read_text()) if path.is_file() else {}
        old = results.get(key, {})
        same = all(old.get(f) == section[f] for f in ("n", "dim", "queries", "generator"))
        section["types"].append(r)
        ran = {t["type"] for t in section["types"]}
        kept = [t for t in old.get("types", []) if same and t["type"] not in ran]
        results[key] = {**section, "types": sorted(kept + section["types"], key=lambda t: TYPES.index(t["type"]))}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
