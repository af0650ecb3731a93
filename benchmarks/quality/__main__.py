"""python -m benchmarks.quality {generate,run}: see benchmarks/quality/__init__.py and docs/quality.md."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import evaluate, generate, groups, methods  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
# The shipped defaults (indexer BuildConfig, api schemas: precision high, mode cosine) and their fast
# stage alone (precision fast): the methods every other is paired against.
DEFAULT = "default high cosine"
DEFAULT_FAST = "default fast cosine"
BRITTLE_METHODS = ("full-ekfac", DEFAULT, DEFAULT_FAST, "full-dot", "bm25")


def cmd_generate(args) -> None:
    from .specs import SPECS, ground_truth
    names = args.bench or list(SPECS)
    custom = Path(args.ground_truth) != generate.GT  # --ground-truth given: one benchmark into that folder
    if custom and len(names) != 1:
        raise SystemExit("--ground-truth needs exactly one --bench")
    for name in names:
        gt, spec = (Path(args.ground_truth) if custom else ground_truth(name)), SPECS[name]
        print(f"## {name}: {gt}", flush=True)
        if spec.arch == "pretrained":  # a real model: its own stages (chat.py)
            from . import chat
            chat.generate(gt, spec, device=args.device, workers=args.workers,
                          stages=tuple(args.stages.split(",")) if args.stages else chat.STAGES)
            continue
        generate.stage_base(gt, spec)
        generate.stage_finetuned(gt, spec)
        generate.stage_lds(gt, workers=args.workers, n_subsets=args.subsets, spec=spec)
        generate.stage_brittle_random(gt, workers=args.workers, spec=spec)
        groups.stage_groups(gt, workers=args.workers, spec=spec)
        if args.brittle_methods == "none":
            continue
        wanted = args.brittle_methods.split(",") if args.brittle_methods else list(BRITTLE_METHODS)
        scores = methods.all_scores(gt, Path(args.work), only=wanted)
        todo = [m for m in wanted if not generate.brittle_matches(generate.brittle_path(gt, m), scores[m]["scores"])]
        for m in todo:
            print(f"brittleness retrains for {m}", flush=True)
            generate.stage_brittle_method(gt, m, scores[m]["scores"], n_queries=args.brittle_queries,
                                          workers=args.workers, spec=spec)


def summarize(results: dict, gt: Path, default: str) -> dict:
    lds = np.load(gt / "lds.npz")
    masks, losses = lds["masks"], lds["losses"]
    ceiling = evaluate.noise_ceiling(losses)
    sd = evaluate.seed_sd(losses)
    per_query = {name: evaluate.lds_per_query(r["scores"], masks, losses) for name, r in results.items()}
    random_b = np.load(gt / "brittle" / "random-removal.npz") if (gt / "brittle" / "random-removal.npz").exists() else None
    out = {}
    for name, r in results.items():
        m, se = evaluate.mean_se(per_query[name])
        row = {k: v for k, v in r.items() if k not in ("scores", "layers", "api_k10_top", "api_k10_top_no_keyword")}
        row.update(lds=m, lds_se=se)
        if default in per_query and name != default:
            d = per_query[name] - per_query[default]
            row["vs_default"], row["vs_default_se"] = evaluate.mean_se(d)
        path = generate.brittle_path(gt, name)
        if generate.brittle_matches(path, r["scores"]) and random_b is not None:
            b = np.load(path)
            res = evaluate.brittleness(b["losses"], random_b["losses"], b["queries"], sd)
            row["brittleness"] = {"mean": res["mean"], "se": res["se"], "queries": int(len(b["queries"])),
                                  "k": b["ks"].tolist(), "per_k": [{"mean": a, "se": s} for a, s in res["per_k"]]}
        out[name] = row
    cm, cse = evaluate.mean_se(ceiling)
    return {"default": default, "noise_ceiling": {"mean": cm, "se": cse},
            "seed_sd_median": float(np.median(sd)),
            "setting": {"subsets": int(masks.shape[0]), "seeds": int(losses.shape[1]), "train_docs": int(masks.shape[1]),
                        "queries": int(losses.shape[2]), "meta": json.loads((gt / "meta.json").read_text())},
            "methods": out, "targets": targets(results, per_query), "groups": groups.summary(results, gt)}


def paired(per_query: dict, a: str, b: str) -> dict | None:
    if a not in per_query or b not in per_query:
        return None
    m, se = evaluate.mean_se(per_query[a] - per_query[b])
    return {"diff": m, "se": se, "z": m / se if se > 0 else None}


def top10_agreement(fast: np.ndarray, high: np.ndarray, depth: int, k: int = 10) -> float:
    """Mean share of the top k by `high` over every document that the top k by `high` among the
    top `depth` by `fast` keeps (what precision high answers at that depth)."""
    best = np.argsort(-high, axis=1, kind="stable")[:, :k]
    cand = np.argsort(-fast, axis=1, kind="stable")[:, :depth]
    got = np.take_along_axis(cand, np.argsort(-np.take_along_axis(high, cand, 1), axis=1, kind="stable")[:, :k], 1)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(best, got)]))


def targets(results: dict, per_query: dict) -> dict:
    """The issue's targets on this benchmark (docs/quality.md "Against the targets")."""
    lds = {n: float(np.nanmean(v)) for n, v in per_query.items()}
    refs = [n for n in lds if n.startswith("full-ekfac") or n.startswith("high sfull")]
    out = {}
    if DEFAULT in lds and refs:
        best = max(refs, key=lambda n: lds[n])
        out["default_vs_ekfac"] = {"default": lds[DEFAULT], "full_ekfac": lds.get("full-ekfac"),
                                   "ratio_to_full_ekfac": lds[DEFAULT] / lds["full-ekfac"] if "full-ekfac" in lds else None,
                                   "best_reference": best, "best_reference_lds": lds[best],
                                   "ratio_to_best_reference": lds[DEFAULT] / lds[best]}
    for other in ("full-dot", "full-cosine", "bm25"):
        d = paired(per_query, DEFAULT_FAST, other)
        if d:
            out[f"fast_vs_{other}"] = d
    if DEFAULT_FAST in results and DEFAULT in results:
        fast, high = results[DEFAULT_FAST]["scores"], results[DEFAULT]["scores"]
        out["top10_agreement_by_depth"] = {d: top10_agreement(fast, high, d) for d in methods.DEPTHS}
        api = results[DEFAULT].get("api_k10_top")
        if api is not None:
            best = np.argsort(-high, axis=1, kind="stable")[:, :10]
            agree = lambda tops: float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(best, tops)]))
            out["api_k10_agreement"] = {"depth": results[DEFAULT].get("high_depth"), "mean": agree(api),
                                        "keyword_depth": results[DEFAULT].get("keyword_depth"),
                                        "max_rel_error_vs_engine": results[DEFAULT].get("api_max_rel_error")}
            if results[DEFAULT].get("api_k10_top_no_keyword") is not None:
                out["api_k10_agreement"]["mean_without_keyword"] = agree(results[DEFAULT]["api_k10_top_no_keyword"])
    return out


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


# The rows printed after each benchmark (quality.md has every method).
SUMMARY_ROWS = (DEFAULT, DEFAULT_FAST, "default high influence", "default fast influence", "logra r8 raw cosine",
               "fast b2048 h0.5 raw cosine", "fast b512 h0.5 raw cosine", "fast b1024 h0.5 raw cosine",
               "fast b4096 h0.5 raw cosine", "fast b2048 h0.5 ekfac d0.01 cosine", "fast b2048 nohead raw cosine",
               "fast b16384 h0.75 ekfac d0.01 cosine", "fast b32768 h0.75 ekfac d0.01 cosine",
               "fast b65536 h0.75 ekfac d0.01 cosine", "fast b65536 h0.9 ekfac d0.01 cosine", "high s256 headwhole ekfac cosine",
               "fast b2048 h0.25 raw cosine", "fast b2048 h1 raw cosine", "fast b2048 h0.5 none cosine",
               "high sfull ekfac cosine", "high s256 ekfac cosine", "high s256 headwhole ekfac headonly cosine",
               "full-ekfac", "full-ekfac-cosine", "full-ekfac d0.01-cosine", "full-dot", "full-cosine", "bm25", "random")


def table(summary: dict, names=None) -> str:
    rows = sorted(((n, r) for n, r in summary["methods"].items() if names is None or n in names),
                  key=lambda kv: -kv[1]["lds"])
    lines = ["| method | dim | LDS ± SE | vs default (paired SE) | brittleness (seed sd) | self@1 | vector bytes/doc "
             "| s/query |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        vs = "(default)" if name == summary["default"] else (
            f"{r['vs_default']:+.3f} ({r['vs_default_se']:.3f})" if "vs_default" in r else "-")
        b = r.get("brittleness")
        bs = f"{b['mean']:.2f} ± {b['se']:.2f}" if b else "-"
        lines.append(f"| {name} | {r.get('dim') or '-'} | {r['lds']:.3f} ± {r['lds_se']:.3f} | {vs} | {bs} | "
                     f"{_fmt(r['self_at1'])} | {r.get('vector_bytes_per_doc') or '-'} | {_fmt(r['seconds_per_query'], 4)} |")
    c = summary["noise_ceiling"]
    lines.append(f"\nNoise ceiling (seed-vs-seed Spearman across subsets): {c['mean']:.3f} ± {c['se']:.3f}.")
    t = summary.get("targets", {})
    if "default_vs_ekfac" in t:
        e = t["default_vs_ekfac"]
        lines.append(f"Default (k = all) / full-gradient EK-FAC: {_fmt(e['ratio_to_full_ekfac'])}; / best reference "
                     f"({e['best_reference']}, {e['best_reference_lds']:.3f}): {e['ratio_to_best_reference']:.3f}.")
    for other in ("full-dot", "full-cosine", "bm25"):
        if f"fast_vs_{other}" in t:
            d = t[f"fast_vs_{other}"]
            lines.append(f"Fast vs {other}: {d['diff']:+.3f} ± {d['se']:.3f} paired ({_fmt(d['z'], 1)} SE).")
    if "top10_agreement_by_depth" in t:
        lines.append("Top-10 agreement with k = all, by rescoring depth: " + ", ".join(
            f"{d}: {v:.2f}" for d, v in t["top10_agreement_by_depth"].items()) + ".")
    if "api_k10_agreement" in t:
        a = t["api_k10_agreement"]
        err = a.get("max_rel_error_vs_engine")
        keyword = (f" with {a['keyword_depth']} keyword candidates ({a['mean_without_keyword']:.2f} without)"
                   if a.get("mean_without_keyword") is not None else "")
        lines.append(f"API k = 10 at depth {a['depth']}{keyword}: {a['mean']:.2f} of the k = all top 10"
                     + (f" (stored vs recomputed scores, max error {err:.1e} of the largest)." if err is not None else "."))
    gr = summary.get("groups")
    if gr:
        lines += ["", f"Group values against retraining ({gr['groups']} groups by {gr['field']}, "
                  f"{gr['documents_per_group']['min']}-{gr['documents_per_group']['max']} documents, each removed and "
                  f"retrained with 2 seeds): Spearman across groups between the predicted value (summed scores) and "
                  f"the rise of the queries' total loss; noise ceiling {gr['noise_ceiling_single_seed']:.3f} seed vs seed, "
                  f"{gr['noise_ceiling_two_seeds']:.3f} for the two seeds' mean.", "",
                  "| method | Spearman ± SE (bootstrap over groups) | vs full-ekfac (paired SE) | seed 1 / seed 2 |", "|---|---|---|---|"]
        for n, m in sorted(gr["methods"].items(), key=lambda nm: -nm[1]["spearman"]):
            vs = m.get("vs_full_ekfac")
            paired = f"{vs['diff']:+.3f} ({vs['se']:.3f})" if vs else "-"
            seeds = " / ".join(f"{x:.3f}" for x in m["spearman_seed"])
            lines.append(f"| {n} | {m['spearman']:.3f} ± {m['spearman_se']:.3f} | {paired} | {seeds} |")
        if gr.get("additivity"):
            a = gr["additivity"]
            lines.append(f"\nAdditivity: {a['pairs']} pairs of groups removed together: Pearson {a['pearson']:.3f} with the sum "
                         f"of their separate effects; together / sum {a['ratio_together_to_sum']:.2f}.")
    brittle = [(n, r["brittleness"]) for n, r in summary["methods"].items() if r.get("brittleness")]
    if brittle:
        ks = brittle[0][1]["k"]
        lines += ["", "Brittleness per k (query-loss increase over removing k random documents, in seed sd; "
                  f"{brittle[0][1]['queries']} queries x 3 seeds):", "",
                  "| method | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for n, b in sorted(brittle, key=lambda nb: -nb[1]["mean"]):
            lines.append(f"| {n} | " + " | ".join(f"{x['mean']:.2f} ± {x['se']:.2f}" for x in b["per_k"]) + " |")
    return "\n".join(lines)


# --smoke: the text baselines and the cheapest engine setting on the committed ground truth, written
# to --results (not benchmarks/results): seconds, and every stage of `run` is exercised.
SMOKE_METHODS = ("bm25", "random", "fast b512 h0.5 raw cosine", "fast b512 h0.5 raw influence")


def cmd_run(args) -> None:
    from .specs import SPECS, ground_truth
    names = args.bench or list(SPECS)
    methods.CACHED_ONLY = args.cached
    out = Path(args.results)
    previous = json.loads((out / "quality.json").read_text()) if (out / "quality.json").exists() else {}
    benchmarks = previous.get("benchmarks", {}) if args.bench else {}
    for name in names:
        gt = ground_truth(name)
        t = time.time()
        log = lambda m: print(f"[{name}] {m}", flush=True)
        if SPECS[name].arch == "pretrained":  # the real model (chat.py): its ground truth needs a GPU to make
            from . import chat
            if not (gt / "lds.npz").exists():
                print(f"[{name}] skipped: no ground truth yet (python -m benchmarks.quality generate --bench {name} "
                      "--device cuda)", flush=True)
                continue
            results = chat.all_scores(gt, Path(args.work), smoke=args.smoke, log=log)
            summary = summarize(results, gt, args.default)
            summary["additive_brittleness"] = chat.summary(gt, results)
        else:
            results = methods.all_scores(gt, Path(args.work), quick=args.quick,
                                         only=list(SMOKE_METHODS) if args.smoke else None, log=log)
            summary = summarize(results, gt, args.default)
        summary["seconds"] = round(time.time() - t, 1)
        summary["quick"] = args.quick
        benchmarks[name] = summary
        print(f"\n## {name}\n" + table(summary, SUMMARY_ROWS), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"default": args.default, "benchmarks": benchmarks}, indent=1,
                                                 default=float) + "\n")
    (out / "quality.md").write_text("\n\n".join(f"## {n}\n\n{table(b)}" for n, b in benchmarks.items()) + "\n")


def main(argv=None) -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="(re)build the ground truth; existing stages are kept")
    g.add_argument("--workers", type=int, default=2, help="retrain processes (on a GPU they share it)")
    g.add_argument("--device", default="cpu", help="where the real-model benchmark's retrains and references run, e.g. cuda")
    g.add_argument("--subsets", type=int, default=None, help="LDS subsets (default: the benchmark's spec)")
    g.add_argument("--brittle-methods", default=None, help="comma-separated method names, or none")
    g.add_argument("--bench", action="append", default=None, help="a benchmark (specs.SPECS) to generate; repeatable; default all")
    g.add_argument("--brittle-queries", type=int, default=generate.BRITTLE_QUERIES)
    g.add_argument("--stages", default=None, help="the real model's stages to run, comma-separated (chat.STAGES; default all)")
    r = sub.add_parser("run", help="score every method against the ground truth")
    r.add_argument("--default", default=DEFAULT)
    r.add_argument("--quick", action="store_true", help="the shipped defaults and the baselines only (no grids)")
    r.add_argument("--bench", action="append", default=None, help="a benchmark (specs.SPECS) to run; repeatable; default all")
    r.add_argument("--cached", action="store_true", help="only the methods whose scores the scratch folder already holds")
    r.add_argument("--smoke", action="store_true", help="BM25, random and one cheap engine setting: checks `run` works")
    r.add_argument("--results", default=str(RESULTS), help="folder for quality.json and quality.md")
    for s in (g, r):
        s.add_argument("--ground-truth", default=str(generate.GT))
        s.add_argument("--work", default="/tmp/logra-quality", help="scratch folder for the indexes")
    args = p.parse_args(argv)
    {"generate": cmd_generate, "run": cmd_run}[args.cmd](args)


if __name__ == "__main__":
    main()
