"""`history` and `v0+history`: a per-prompt prior from the policy's own earlier rollouts on that prompt.

The Discounted Beta–Bernoulli (DBB) estimate of arXiv 2603.18444: every prompt keeps discounted counts
of its past successes and failures,

    α ← γ·α + successes,    β ← γ·β + failures                     (on each observation of the prompt)
    p̂ = (α + a0) / (α + β + a0 + b0)                              (posterior mean under a Beta(a0, b0) prior)
    V  = 2·p̂ − 1                                                   (the reward scale of the paper's prior)

and V is NaN ("no prior", μ* = v̄_k in Eq. 9) for a prompt never observed. It is the natural rival of
V0 when prompts recur (multi-epoch training, the paper's 2,048 prompts per step on DAPO-Math-17k), and
useless when every prompt is fresh.

Choices this module makes, and why:
- Discount unit (`discount_unit`): "observation" (default) decays a prompt's counts by γ each time the
  prompt is observed again, whatever happened in between (DBB's per-visit discount); "step" decays every
  prompt's counts by γ per `observe` call, i.e. per training step (a prompt seen long ago fades towards
  the Beta prior even if it was seen once). "step" is applied lazily, γ^(steps since last seen), so one
  step costs O(batch), not O(prompts ever seen).
- The Beta prior matters when successes are rare: with the flat Beta(1, 1) a prompt seen failing 4 of 4
  times gets V = −0.67, far above its true value when the policy solves ~10 % of prompts, and a prior
  that far off makes the gradient worse than none (`v05 bench gradient`, tiny-m warm start: −0.07 / −0.11
  cosine vs grpo at k = 2 / 4). `history_center: base-rate` centres the Beta on the support buffer's mean
  success rate instead (same strength a0 + b0); measured there, Beta(0.2, 1.8) (the 10 % base rate)
  raised the cosine by +0.07 / +0.14 ± 0.03–0.04 over Beta(1, 1), to grpo's level. "flat" stays the
  default (the DBB estimator as published).
- Counts: the engines measure success *rates*; `observe(..., counts=k)` turns a rate into k·rate
  successes and k·(1 − rate) failures. Without `counts`, a rate counts as ONE observation of weight 1
  (rate successes, 1 − rate failures): a weaker update than the k rollouts behind it deserve, so the
  engines should pass the rollouts per prompt.
- Never exactly ±1: with a0, b0 > 0 the posterior mean lies strictly inside (0, 1); V is further kept in
  [−1 + 1e-12, 1 − 1e-12] against floating-point rounding (the ±1 hazard of Eq. 7 in issue 12). It can
  still come close to ±1 (V = 0.95 after many all-correct observations with γ = 0.9): confident,
  as a prior measured on ≈ 40 rollouts should be.
- `v0+history` (V0 as the Beta prior of the history): p̂ = (α + n0·p_V0) / (α + β + n0) with
  n0 = a0 + b0 and p_V0 = (V_V0 + 1)/2 kept inside [1e-6, 1 − 1e-6]. A prompt never observed gets V0's
  prior unchanged; an observed one gets its history posterior, centred on V0's estimate instead of the
  flat a0/(a0 + b0) — the hard switch "V0 where unseen, history where seen" up to n0 pseudo-rollouts
  (2 by default) and continuous in between. Where V0 has no prior (cold support buffer) the flat Beta
  prior is used; where neither has anything, NaN. V0's support buffer is fed as for `v0`.
- The state is plain JSON (lists of ids and floats; Python's float repr round-trips exactly), so a run
  resumed from a checkpoint — torch or the verl trainer's JSON file — continues bit for bit.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from v0_data.tasks.base import Prompt
from v05_rl.priors.base import HISTORY_CENTERS as CENTERS
from v05_rl.priors.base import HISTORY_DISCOUNT_UNITS as DISCOUNT_UNITS
from v05_rl.priors.base import BufferedPriorSource, PriorSource, SupportBuffer

V_GUARD = 1e-12  # |V| <= 1 - V_GUARD: a prior is never exactly ±1
V0_MEAN_CLIP = 1e-6  # p_V0 kept in [1e-6, 1 - 1e-6] when it centres the history's Beta prior
BASE_RATE_CLIP = 1e-3  # the "base-rate" centre kept in [1e-3, 1 - 1e-3]


# ----------------------------------------------------------------------------------------------
# pure math


def discounted_counts(
    alpha: np.ndarray, beta: np.ndarray, successes: np.ndarray, failures: np.ndarray, decay: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """DBB update α ← decay·α + successes, β ← decay·β + failures. Shapes: all (B,) (decay may be a scalar)."""
    return decay * alpha + successes, decay * beta + failures


def beta_posterior_mean(alpha: np.ndarray, beta: np.ndarray, a0: np.ndarray | float, b0: np.ndarray | float) -> np.ndarray:
    """p̂ = (α + a0) / (α + β + a0 + b0), the mean of Beta(a0 + α, b0 + β). Shapes: (B,) -> (B,)."""
    return (alpha + a0) / (alpha + beta + a0 + b0)


def prior_from_success(p: np.ndarray) -> np.ndarray:
    """V = 2p − 1 kept in [−1 + V_GUARD, 1 − V_GUARD]; NaN stays NaN. Shape: (B,) -> (B,)."""
    return np.clip(2.0 * np.asarray(p, dtype=np.float64) - 1.0, -1.0 + V_GUARD, 1.0 - V_GUARD)


def check_observation(prompt_ids: Any, success_rates: Any, counts: Any, where: str) -> tuple[np.ndarray, ...]:
    """(ids (B,) int64, successes (B,), failures (B,)) from rates in [0, 1] and rollouts per prompt.

    counts None: each rate is one observation of weight 1. Raises ValueError naming the bad entry."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)  # [B]
    rates = np.asarray(success_rates, dtype=np.float64).reshape(-1)  # [B]
    n = np.ones_like(rates) if counts is None else np.asarray(counts, dtype=np.float64).reshape(-1)  # [B]
    if not ids.shape == rates.shape == n.shape:
        raise ValueError(f"{where}: prompt_ids ({ids.size}), success_rates ({rates.size}) and counts ({n.size}) "
                         "must have one entry per prompt")
    bad = ~np.isfinite(rates) | (rates < 0.0) | (rates > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: success_rates[{i}] = {float(rates[i])!r} is not a success rate in [0, 1]; "
                         "pass successes / rollouts, not a ±1 mean reward")
    bad = ~np.isfinite(n) | (n < 0.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: counts[{i}] = {float(n[i])!r} is not a number of rollouts >= 0")
    return ids, n * rates, n * (1.0 - rates)


# ----------------------------------------------------------------------------------------------
# per-prompt state


class DiscountedBetaTable:
    """Discounted success / failure counts per prompt id (the DBB state), JSON-serialisable.

    >>> t = DiscountedBetaTable(discount=0.5)
    >>> t.update([7], [1.0], counts=[4])        # α = 4, β = 0
    >>> t.update([7], [0.25], counts=[4])       # α = 0.5·4 + 1 = 3, β = 0.5·0 + 3 = 3
    >>> t.lookup([7, 8])
    (array([3., 0.]), array([3., 0.]), array([ True, False]))
    """

    def __init__(self, discount: float = 0.9, unit: str = "observation"):
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"history prior: discount must be in (0, 1] (1 = never forget), got {discount}")
        if unit not in DISCOUNT_UNITS:
            raise ValueError(f"history prior: discount unit {unit!r} unknown; use one of {', '.join(DISCOUNT_UNITS)}")
        self.discount = float(discount)
        self.unit = unit
        self.tick = 0  # update calls so far (training steps)
        self._rows: dict[int, list[float]] = {}  # prompt id -> [α, β, tick of last observation, observations]

    def __len__(self) -> int:
        return len(self._rows)

    def update(self, prompt_ids: Any, success_rates: Any, counts: Any = None) -> None:
        """One observation per entry, in order (a repeated id is observed twice); entries of 0 rollouts are skipped."""
        ids, succ, fail = check_observation(prompt_ids, success_rates, counts, "history prior observe")
        self.tick += 1
        for pid, s, f in zip(ids.tolist(), succ.tolist(), fail.tolist()):
            if s + f <= 0.0:
                continue
            row = self._rows.get(pid)
            if row is None:
                self._rows[pid] = [s, f, float(self.tick), 1.0]
                continue
            decay = self._decay(row[2])
            row[0], row[1] = discounted_counts(row[0], row[1], s, f, decay)
            row[2], row[3] = float(self.tick), row[3] + 1.0

    def _decay(self, last_tick: float) -> float:
        """γ for "observation"; γ^(steps since the last observation) for "step"."""
        if self.unit == "observation":
            return self.discount
        return self.discount ** (self.tick - last_tick)

    def lookup(self, prompt_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(α, β, seen), each (B,): counts decayed to the current step ("step" unit); 0, 0, False when unseen."""
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)  # [B]
        alpha, beta = np.zeros(ids.size), np.zeros(ids.size)  # [B]
        seen = np.zeros(ids.size, dtype=bool)  # [B]
        for j, pid in enumerate(ids.tolist()):
            row = self._rows.get(pid)
            if row is None:
                continue
            decay = 1.0 if self.unit == "observation" else self.discount ** (self.tick - row[2])
            alpha[j], beta[j], seen[j] = decay * row[0], decay * row[1], True
        return alpha, beta, seen

    def state_dict(self) -> dict[str, Any]:
        rows = list(self._rows.values())
        return {
            "discount": self.discount,
            "unit": self.unit,
            "tick": self.tick,
            "prompt_ids": list(self._rows),
            "alpha": [r[0] for r in rows],
            "beta": [r[1] for r in rows],
            "last": [r[2] for r in rows],
            "n_obs": [r[3] for r in rows],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if float(state["discount"]) != self.discount or state["unit"] != self.unit:
            raise ValueError(
                f"history prior: checkpoint has discount {state['discount']} per {state['unit']}, config has "
                f"{self.discount} per {self.unit}; resume with the same history_discount and history_discount_unit"
            )
        self.tick = int(state["tick"])
        cols = zip(state["prompt_ids"], state["alpha"], state["beta"], state["last"], state["n_obs"])
        self._rows = {int(p): [float(a), float(b), float(t), float(n)] for p, a, b, t, n in cols}


# ----------------------------------------------------------------------------------------------
# sources


def _check_beta_prior(a0: float, b0: float) -> None:
    if not (a0 > 0.0 and b0 > 0.0 and np.isfinite(a0) and np.isfinite(b0)):
        raise ValueError(f"history prior: Beta(a0, b0) needs a0 > 0 and b0 > 0 (else a prior of ±1 is possible), "
                         f"got ({a0}, {b0})")


class HistoryPrior(BufferedPriorSource):
    """`history`: V = 2·p̂ − 1 from the prompt's discounted Beta–Bernoulli posterior; NaN if never observed.

    center "flat": the Beta(a0, b0) prior; "base-rate": Beta(n0·m, n0·(1 − m)) with n0 = a0 + b0 and m the
    mean success rate held by the support buffer (the policy's recent average; a0/(a0 + b0) while empty).
    """

    name = "history"

    def __init__(self, table: DiscountedBetaTable | None = None, *, a0: float = 1.0, b0: float = 1.0,
                 center: str = "flat", support: SupportBuffer | None = None):
        super().__init__(support)
        _check_beta_prior(a0, b0)
        if center not in CENTERS:
            raise ValueError(f"history prior: center {center!r} unknown; use one of {', '.join(CENTERS)}")
        self.table = table if table is not None else DiscountedBetaTable()
        self.a0, self.b0, self.center = float(a0), float(b0), center

    def beta_prior(self) -> tuple[float, float]:
        """(a, b) of the Beta prior every prompt's counts are added to (see the class docstring)."""
        if self.center == "flat" or len(self.support) == 0:
            return self.a0, self.b0
        n0 = self.a0 + self.b0
        m = float(np.clip(self.support.arrays().success_rates.mean(), BASE_RATE_CLIP, 1.0 - BASE_RATE_CLIP))
        return n0 * m, n0 * (1.0 - m)

    def observe(self, prompt_ids, success_rates, counts=None) -> None:
        """Feed the support buffer and the per-prompt counts (`counts`: rollouts behind each rate)."""
        self.table.update(prompt_ids, success_rates, counts)
        self.support.add(prompt_ids, success_rates)

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """Shape (B,): V in (−1, 1) for observed prompts, NaN for the others."""
        alpha, beta, seen = self.table.lookup([p.prompt_id for p in prompts])  # [B] each
        v = prior_from_success(beta_posterior_mean(alpha, beta, *self.beta_prior()))  # [B]
        return np.where(seen, v, np.nan)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.table.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.table.load_state_dict(state["history"])


def history_over_v0(v0_prior: np.ndarray, alpha: np.ndarray, beta: np.ndarray, seen: np.ndarray,
                    a0: float, b0: float) -> np.ndarray:
    """The `v0+history` rule (module docstring). Shapes: all (B,) -> (B,).

    unseen: V0's prior as is (NaN = none); seen: 2·(α + n0·m)/(α + β + n0) − 1 with n0 = a0 + b0 and
    m = clip((V0 + 1)/2, 1e-6, 1 − 1e-6), or m = a0/(a0 + b0) where V0 has no prior."""
    n0 = a0 + b0
    m = np.where(np.isnan(v0_prior), a0 / n0, np.clip((v0_prior + 1.0) / 2.0, V0_MEAN_CLIP, 1.0 - V0_MEAN_CLIP))  # [B]
    v_hist = prior_from_success(beta_posterior_mean(alpha, beta, n0 * m, n0 * (1.0 - m)))  # [B]
    return np.where(seen, v_hist, v0_prior)


class V0HistoryPrior:
    """`v0+history`: history where the prompt was observed (centred on V0's estimate), V0 where it was not."""

    name = "v0+history"

    def __init__(self, v0: PriorSource, table: DiscountedBetaTable | None = None, *, a0: float = 1.0, b0: float = 1.0):
        _check_beta_prior(a0, b0)
        self.v0 = v0
        self.table = table if table is not None else DiscountedBetaTable()
        self.a0, self.b0 = float(a0), float(b0)

    @property
    def support(self) -> SupportBuffer:
        """V0's support buffer (the context C_π of its queries)."""
        return self.v0.support  # type: ignore[attr-defined]

    def observe(self, prompt_ids, success_rates, counts=None) -> None:
        """Feed V0's support buffer and the per-prompt counts (`counts`: rollouts behind each rate)."""
        self.table.update(prompt_ids, success_rates, counts)
        self.v0.observe(prompt_ids, success_rates)

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """Shape (B,): one V0 query for the batch, then the rule of `history_over_v0`."""
        v0_prior = np.asarray(self.v0.priors(prompts), dtype=np.float64).reshape(-1)  # [B]
        alpha, beta, seen = self.table.lookup([p.prompt_id for p in prompts])  # [B] each
        return history_over_v0(v0_prior, alpha, beta, seen, self.a0, self.b0)

    def state_dict(self) -> dict[str, Any]:
        return {**self.v0.state_dict(), "history": self.table.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.v0.load_state_dict({k: v for k, v in state.items() if k != "history"})
        self.table.load_state_dict(state["history"])


__all__ = [
    "DISCOUNT_UNITS",
    "DiscountedBetaTable",
    "HistoryPrior",
    "V0HistoryPrior",
    "beta_posterior_mean",
    "check_observation",
    "discounted_counts",
    "history_over_v0",
    "prior_from_success",
]
