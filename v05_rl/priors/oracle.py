"""`oracle-noise`: an experimental upper bound on what any value model could give as a prior.

The current policy's own success rate on each prompt, measured with many extra rollouts that are *not*
counted in the rollout budget, plus Gaussian noise of a chosen standard deviation on the reward scale
(clipped to [-1, 1]) and an optional fraction of flipped priors (V -> -V, the "hallucinating" regime).
Not a method one could deploy.

The measured rate p̂ of n rollouts is smoothed to (n·p̂ + 0.5)/(n + 1) and the noisy prior clipped to
±n/(n + 1), so the oracle never says exactly ±1: a prior of ±1 with one contradicting rollout passes the
test of Eq. 7 and would get an advantage of ∓20 under the paper's σ* (the ±1 hazard, `v05_rl.estimators`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from v0_data.tasks.base import Prompt
from v05_rl.priors.base import BufferedPriorSource, SuccessRateFn, SupportBuffer


def noisy_prior(
    success_rate: np.ndarray, noise_std: float, flip_fraction: float, rng: np.random.Generator, bound: float = 1.0
) -> np.ndarray:
    """V = clip(2p - 1 + σ·ε, -bound, bound), then V -> -V for each prompt with probability `flip_fraction`.

    Shapes: success_rate (B,) -> (B,). ε ~ N(0, 1) drawn from `rng` (always B draws, then B uniforms, so
    the stream does not depend on σ or the flip fraction).
    """
    truth = 2.0 * np.asarray(success_rate, dtype=np.float64) - 1.0  # [B]
    eps = rng.standard_normal(truth.shape)  # [B]
    flips = rng.random(truth.shape) < flip_fraction  # [B]
    v = np.clip(truth + noise_std * eps, -bound, bound)  # [B]
    return np.where(flips, -v, v)


class OracleNoisePrior(BufferedPriorSource):
    """Upper-bound prior: the policy's measured success rate (extra rollouts, outside the budget) + noise.

    `success_rate_fn` generates `n_rollouts` fresh rollouts per prompt with the *current* policy. Each call
    uses its own seed derived from (seed, call index), so a resumed run draws the same priors.
    `last_truth` holds 2p - 1 of the latest call, for logging the prior's error.
    """

    name = "oracle-noise"
    uses_policy = True  # it generates with the current policy: the engine does not run it beside round 0

    def __init__(
        self,
        success_rate_fn: SuccessRateFn,
        *,
        n_rollouts: int = 32,
        noise_std: float = 0.0,
        flip_fraction: float = 0.0,
        seed: int = 0,
        support: SupportBuffer | None = None,
    ):
        super().__init__(support)
        if n_rollouts < 1:
            raise ValueError(f"oracle-noise: n_rollouts must be >= 1, got {n_rollouts}")
        if not noise_std >= 0.0:
            raise ValueError(f"oracle-noise: noise_std must be >= 0, got {noise_std}")
        if not 0.0 <= flip_fraction <= 1.0:
            raise ValueError(f"oracle-noise: flip_fraction must be in [0, 1], got {flip_fraction}")
        self.success_rate_fn = success_rate_fn
        self.n_rollouts = int(n_rollouts)
        self.noise_std = float(noise_std)
        self.flip_fraction = float(flip_fraction)
        self.seed = int(seed)
        self.calls = 0
        self.last_truth: np.ndarray | None = None

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        call_seed = int(np.random.SeedSequence([self.seed, 0x0AC1E, self.calls]).generate_state(1)[0])
        self.calls += 1
        p = np.asarray(self.success_rate_fn(prompts, self.n_rollouts, call_seed), dtype=np.float64)  # [B]
        if p.shape != (len(prompts),):
            raise ValueError(f"oracle-noise: success_rate_fn returned shape {p.shape}, expected ({len(prompts)},)")
        self.last_truth = 2.0 * p - 1.0
        n = self.n_rollouts
        smoothed = (p * n + 0.5) / (n + 1)  # never exactly 0 or 1: a prior of ±1 is the ±1 hazard
        return noisy_prior(smoothed, self.noise_std, self.flip_fraction, np.random.default_rng(call_seed),
                           bound=n / (n + 1))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.calls = int(state["calls"])



__all__ = ["OracleNoisePrior", "noisy_prior"]
