"""Typed containers passed between the stages of an RL step (collect -> advantage -> update -> log).

Shapes use N = rollouts of the step, G = prompts (groups) of the step, R = response tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from v0_data.tasks.base import Prompt


@dataclass(frozen=True)
class Chunk:
    """The rollouts of one generation call that take part in the update.

    batch: a `v05_rl.rollout.RolloutBatch` of n rows; group (n,) int64 index of each row's prompt in the
    step's prompt list; rewards (n,) float64 ±1.
    """

    batch: Any
    group: np.ndarray
    rewards: np.ndarray

    def __len__(self) -> int:
        return len(self.rewards)


@dataclass(frozen=True)
class Collected:
    """Everything one step generated for training.

    prompts: the G prompts trained on; chunks: their rollouts, one chunk per generation call;
    priors (G,) the prior V used (NaN = none); generated: rollouts generated this step, every one counted
    (including DAPO's dropped groups); osla_rounds: extra OSLA rounds after the cold start;
    dapo_tries: DAPO generation tries; zero_var: share of generated groups with zero reward variance;
    t_prior / t_alloc / t_generate: seconds in the prior source, the planner, generation + scoring.
    """

    prompts: list[Prompt]
    chunks: list[Chunk]
    priors: np.ndarray
    generated: int
    osla_rounds: int = 0
    dapo_tries: int = 0
    zero_var: float = float("nan")
    t_prior: float = 0.0
    t_alloc: float = 0.0
    t_generate: float = 0.0

    @property
    def rewards(self) -> np.ndarray:
        """(N,) float64 ±1, chunk after chunk."""
        return np.concatenate([c.rewards for c in self.chunks]) if self.chunks else np.zeros(0)

    @property
    def group(self) -> np.ndarray:
        """(N,) int64 prompt index of each row, chunk after chunk."""
        return np.concatenate([c.group for c in self.chunks]) if self.chunks else np.zeros(0, dtype=np.int64)

    @property
    def counts(self) -> np.ndarray:
        """(G,) int64 rollouts per prompt (k_i)."""
        return np.bincount(self.group, minlength=len(self.prompts)).astype(np.int64)

    def success_rates(self) -> np.ndarray:
        """(G,) float64 share of each prompt's rollouts with reward +1 (what the support buffer stores)."""
        sums = np.bincount(self.group, weights=self.rewards, minlength=len(self.prompts))  # [G]
        return (sums / np.maximum(self.counts, 1) + 1.0) / 2.0


@dataclass(frozen=True)
class AdvantageStats:
    """Fusion diagnostics of a step: share of prompts whose prior the test of Eq. 7 rejects (Δ̂² > 0, among
    prompts with a prior), share without a prior, mean fusion weight ŵ (Eq. 8; 1 = empirical mean only).
    NaN where the estimator has no prior."""

    prior_reject: float = float("nan")
    prior_missing: float = float("nan")
    w_mean: float = float("nan")


@dataclass(frozen=True)
class PriorQuality:
    """How well the step's priors predicted the step's own rollouts (NaN without priors).

    auc: rollout-level ROC AUC of the prompt's prior V as a score for the rollout's success; brier: mean over
    prompts of ((V + 1)/2 − p̂_k)² with p̂_k the prompt's k-rollout success rate; brier_mean: the same for
    the constant prediction "the step's mean success rate" (a prior is useful only when brier < brier_mean).
    Both Brier scores include the sampling noise of p̂_k, equally."""

    auc: float = float("nan")
    brier: float = float("nan")
    brier_mean: float = float("nan")


@dataclass(frozen=True)
class UpdateStats:
    """Token-averaged metrics of the PPO update; grad_norm before clipping, mean over optimizer steps."""

    pg_loss: float = float("nan")
    kl: float = float("nan")
    entropy: float = float("nan")
    clip_frac: float = float("nan")
    grad_norm: float = float("nan")
    response_len: float = float("nan")


@dataclass(frozen=True)
class StepStats:
    """What one training step logs (one jsonl line)."""

    step: int
    rollouts: int  # rollouts generated this step (every one counted)
    rollouts_used: int  # cumulative
    oracle_rollouts: int  # not budgeted (oracle prior only)
    prompts: int
    reward: float  # mean reward of the trained rollouts (±1 scale)
    accuracy: float  # share of trained rollouts with reward +1
    k_mean: float
    k_max: int
    osla_rounds: int
    prior_reject: float  # share of prompts with Δ̂² > 0 (v05 with a prior), else NaN
    prior_missing: float  # share of prompts without a prior (NaN)
    w_mean: float  # mean fusion weight ŵ (1 = empirical mean only)
    prior_abs_err: float  # oracle-noise: mean |V - truth|, else NaN
    prior_auc: float  # rollout-level AUC of the prior against this step's rewards (PriorQuality)
    prior_brier: float  # Brier score of (V + 1)/2 against this step's k-rollout success rates
    prior_brier_mean: float  # Brier score of the step's mean success rate (the no-skill reference)
    zero_var_groups: float  # share of generated groups with zero reward variance
    dapo_tries: int
    pg_loss: float
    kl: float
    entropy: float
    clip_frac: float
    grad_norm: float  # global gradient norm before clipping (mean over optimizer steps)
    lr: float
    response_len: float
    t_generate: float
    t_prior: float  # prior source query
    t_alloc: float  # estimator + planner
    t_update: float
    t_step: float
    k_hist: dict[str, int] = field(default_factory=dict)  # {k: prompts trained with k rollouts} this step

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "train", **asdict(self)}


def zero_variance(rewards: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Which groups have zero reward variance (all their ±1 rewards agree; an empty group counts as zero).

    Shapes: rewards (N,), group (N,) -> (G,) bool."""
    counts = np.bincount(group, minlength=n_groups)  # [G]
    sums = np.bincount(group, weights=rewards, minlength=n_groups)  # [G]
    sq = np.bincount(group, weights=rewards**2, minlength=n_groups)  # [G]
    var = sq / np.maximum(counts, 1) - (sums / np.maximum(counts, 1)) ** 2  # [G]
    return var <= 1e-12


__all__ = ["AdvantageStats", "Chunk", "Collected", "PriorQuality", "StepStats", "UpdateStats", "zero_variance"]
