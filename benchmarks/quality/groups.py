"""Group valuation against reality (`indexer value`'s claim): groups of fine-tune documents by a
metadata field (gpt2-stdlib: module, llama-pkgdocs: package; those with at least MIN_DOCS
documents), each removed in turn and the model retrained (2 seeds, plus all-data runs with the same
seeds); a group's measured value is how much the queries' total loss rose without it. A method's
predicted value of a group is the sum over its documents and the queries of the method's scores
(what `indexer value` computes for the shipped defaults); compared by Spearman across groups, with
the seed-vs-seed noise ceiling. Additivity: pairs of groups removed together against the sum of
their measured values.

    groups.npz   field, names (G,), members (G, N) bool, pairs (P, 2), seeds (2,),
                 losses_all (2, Q), losses_group (G, 2, Q), losses_pair (P, 2, Q)
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import data, train
from .reference import spearman
from .specs import Spec, spec_of

GROUP_FIELD = {"gpt2-stdlib": "module", "llama-pkgdocs": "package"}
MIN_DOCS = 5
SEEDS = (3001, 3002)
N_PAIRS = 8
# Methods whose summed scores predict group values ("count": the group's size; "random": random scores).
METHODS = ("default high influence", "default high cosine", "default fast influence", "full-ekfac", "full-dot", "bm25",
           "count", "random")


def stage_groups(gt: Path, workers: int = 2, spec: Spec | None = None) -> None:
    path = gt / "groups.npz"
    if path.exists():
        return
    spec = spec or spec_of(gt)
    field = GROUP_FIELD[spec.name]
    tr, q = data.load_rows(gt)
    sizes = Counter(r[field] for r in tr)
    names = sorted(g for g, n in sizes.items() if n >= MIN_DOCS)
    members = np.array([[r[field] == g for r in tr] for g in names])
    pairs = np.random.default_rng(7).choice(len(names), size=(N_PAIRS, 2), replace=False) if len(names) >= 2 * N_PAIRS \
        else np.zeros((0, 2), int)
    removals = [np.zeros(len(tr), bool)] + list(members) + [members[a] | members[b] for a, b in pairs]
    jobs = [(~drop, s) for drop in removals for s in SEEDS]
    t = time.time()
    losses = train.retrain_many(gt / "base", [r["text"] for r in tr], [r["text"] for r in q], jobs, workers=workers,
                                recipe=spec.recipe).reshape(len(removals), len(SEEDS), len(q))
    np.savez_compressed(path, field=field, names=np.array(names), members=members, pairs=pairs, seeds=np.array(SEEDS),
                        losses_all=losses[0], losses_group=losses[1 : 1 + len(names)],
                        losses_pair=losses[1 + len(names):])
    meta = json.loads((gt / "meta.json").read_text())
    meta["groups"] = {"field": field, "groups": len(names), "pairs": len(pairs), "retrains": len(jobs),
                      "seconds": round(time.time() - t, 1), "workers": workers}
    (gt / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearman(np.asarray(a, float)[:, None], np.asarray(b, float)[:, None], axis=0)[0])


def summary(results: dict, gt: Path, resamples: int = 1000) -> dict | None:
    """Spearman across groups between each method's predicted and the measured value (with a
    bootstrap-over-groups standard error, and against full-gradient EK-FAC paired); the noise ceiling
    (seed against seed, and Spearman-Brown's for the two seeds' mean); additivity of the measured values."""
    path = gt / "groups.npz"
    if not path.exists():
        return None
    g = np.load(path)
    members = g["members"].astype(np.float64)
    increase = g["losses_group"].sum(-1) - g["losses_all"].sum(-1)[None, :]  # (G, seeds): total query loss rise
    measured = increase.mean(axis=1)
    single = _rank_corr(increase[:, 0], increase[:, 1])
    out = {"field": str(g["field"]), "groups": int(len(members)), "documents_per_group":
           {"min": int(members.sum(1).min()), "median": float(np.median(members.sum(1))), "max": int(members.sum(1).max())},
           "noise_ceiling_single_seed": single, "noise_ceiling_two_seeds": 2 * single / (1 + single), "methods": {}}
    boot = np.random.default_rng(0).integers(0, len(members), size=(resamples, len(members)))
    corr_boot = lambda p: np.array([_rank_corr(p[b], measured[b]) for b in boot])
    predictions = {}
    for name in METHODS:
        if name == "count":
            predicted = members.sum(1)
        elif name in results:
            predicted = members @ results[name]["scores"].sum(axis=0)
        else:
            continue
        predictions[name] = corr_boot(predicted)
        out["methods"][name] = {"spearman": _rank_corr(predicted, measured), "spearman_se": float(predictions[name].std()),
                                "spearman_seed": [_rank_corr(predicted, increase[:, s]) for s in range(increase.shape[1])]}
    if "full-ekfac" in predictions:
        for name, b in predictions.items():
            if name != "full-ekfac":
                d = out["methods"][name]["spearman"] - out["methods"]["full-ekfac"]["spearman"]
                out["methods"][name]["vs_full_ekfac"] = {"diff": d, "se": float((b - predictions["full-ekfac"]).std())}
    if len(g["pairs"]):
        together = (g["losses_pair"].sum(-1) - g["losses_all"].sum(-1)[None, :]).mean(axis=1)
        apart = measured[g["pairs"][:, 0]] + measured[g["pairs"][:, 1]]
        out["additivity"] = {"pairs": int(len(together)), "pearson": float(np.corrcoef(together, apart)[0, 1]),
                             "ratio_together_to_sum": float(together.sum() / apart.sum())}
    return out
