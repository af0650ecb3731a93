"""LDS, noise ceiling, brittleness and the results table, from ground-truth arrays and score matrices."""
from __future__ import annotations

import numpy as np

from .reference import spearman


def lds_per_query(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per query: Spearman, across subsets, between the summed scores of the subset's documents and
    minus the query's loss (averaged over the data-order seeds). scores (Q, N), masks (S, N),
    losses (S, seeds, Q)."""
    predicted = masks.astype(np.float64) @ scores.T  # (S, Q)
    actual = -losses.mean(axis=1)  # (S, Q)
    return spearman(predicted, actual, axis=0)


def noise_ceiling(losses: np.ndarray) -> np.ndarray:
    """Per query: Spearman across subsets between seed 0's and seed 1's losses."""
    return spearman(-losses[:, 0], -losses[:, 1], axis=0)


def mean_se(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def seed_sd(losses: np.ndarray) -> np.ndarray:
    """Per query: the standard deviation of one retrain's query loss from the data order alone,
    from the paired seeds of every subset: sd(L_seed0 - L_seed1) / sqrt(2)."""
    return (losses[:, 0] - losses[:, 1]).std(axis=0, ddof=1) / np.sqrt(2)


def brittleness(removed_losses: np.ndarray, random_losses: np.ndarray, queries: np.ndarray, sd: np.ndarray) -> dict:
    """removed_losses (n_q, n_k, seeds): loss of query queries[i] after removing the method's top-k;
    random_losses (n_k, seeds, Q): all queries' losses after removing k random documents. Returns the
    mean loss increase over random removal in units of the per-run seed sd, per k and overall, with SE
    over queries."""
    rand = random_losses[:, :, queries].mean(axis=1).T  # (n_q, n_k)
    effect = (removed_losses.mean(axis=2) - rand) / sd[queries][:, None]
    per_k = [mean_se(effect[:, j]) for j in range(effect.shape[1])]
    overall = mean_se(effect.mean(axis=1))
    return {"per_k": per_k, "mean": overall[0], "se": overall[1], "effect": effect}
