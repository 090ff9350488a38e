"""Stage 2 of an embedded RL step: per-rollout advantages from the estimator registry.

The estimator is chosen by name (`TrainConfig.resolved_estimator`: grpo for grpo/dapo, v05 for
v05/v05-fixed, or any `v05_rl.estimators.ESTIMATORS` name); each gets its own options from the config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from v0_model.metrics import auc
from v05_rl.estimators import ESTIMATORS, v05_group_stats
from v05_rl.types import AdvantageStats, PriorQuality


def estimator_options(name: str, cfg: Any) -> dict[str, Any]:
    """Keyword options of estimator `name` taken from a `TrainConfig`."""
    if name in ("grpo", "mcgrpo"):
        return {"eps": cfg.optim.grpo_eps, "norm_by_std": True}
    if name == "v05":
        return {"method": cfg.osla.method, "sigma_rule": cfg.osla.sigma_rule}
    return {}


def fusion_stats(rewards: np.ndarray, group: np.ndarray, priors: np.ndarray, method: str) -> AdvantageStats:
    """Share of prompts whose prior the test of Eq. 7 rejects (Δ̂² > 0, among those with a prior), share
    without a prior, and mean ŵ (Eq. 8). Shapes: rewards, group (N,), priors (G,)."""
    gs = v05_group_stats(rewards, group, prior=priors, method=method)
    w, delta2 = np.asarray(gs.w, dtype=np.float64), np.asarray(gs.delta2, dtype=np.float64)  # [G]
    has = ~np.isnan(priors)
    reject = float(np.mean(delta2[has] > 0)) if has.any() else float("nan")
    return AdvantageStats(prior_reject=reject, prior_missing=float(np.mean(~has)), w_mean=float(np.mean(w)))


def compute_advantages(name: str, options: dict[str, Any], rewards: np.ndarray, group: np.ndarray,
                       priors: np.ndarray) -> tuple[np.ndarray, AdvantageStats]:
    """Per-row advantages (N,) float64 and fusion diagnostics (for estimators that use a prior).

    Shapes: rewards (N,) ±1, group (N,) int in [0, G), priors (G,) NaN = none."""
    adv = np.asarray(ESTIMATORS.get(name)(rewards, group, prior=priors, **options), dtype=np.float64)  # [N]
    if name == "grpo":
        return adv, AdvantageStats(w_mean=1.0)
    if name == "v05":
        return adv, fusion_stats(rewards, group, priors, options.get("method", "paper"))
    return adv, AdvantageStats()


def prior_quality(rewards: np.ndarray, group: np.ndarray, priors: np.ndarray) -> PriorQuality:
    """The step's priors scored against the step's own rollouts (prompts without a prior left out).

    Shapes: rewards (N,) ±1, group (N,) in [0, G), priors (G,) NaN = none."""
    has = ~np.isnan(priors)  # [G]
    if not has.any() or len(rewards) == 0:
        return PriorQuality()
    counts = np.bincount(group, minlength=len(priors))  # [G]
    rate = (np.bincount(group, weights=rewards, minlength=len(priors)) / np.maximum(counts, 1) + 1.0) / 2.0  # [G]
    rows = has[group]  # [N] rollouts of prompts with a prior
    p_prior = (priors[has] + 1.0) / 2.0
    return PriorQuality(
        auc=auc(rewards[rows] > 0, priors[group[rows]]),
        brier=float(np.mean((p_prior - rate[has]) ** 2)),
        brier_mean=float(np.mean((rate[has].mean() - rate[has]) ** 2)),
    )


__all__ = ["compute_advantages", "estimator_options", "fusion_stats", "prior_quality"]
