"""The prior interface and its parts shared by every source: `PriorSource`, the support buffer, options.

The paper (§4.1.3, Step 1) keeps a global support buffer of capacity 512 holding the current policy's
recent (prompt, success rate) pairs; for every prior query it samples 256 of them as the capability
context C_π and asks the value model for p̂, giving the prior V = 2p̂ - 1 on the reward scale [-1, 1].

Departures from the paper, and why:
- "No usable context" is defined as: the buffer is empty, or every rollout behind its pairs had the same
  outcome (all success rates 0, or all 1). An in-context classifier cannot learn anything from a single
  class, so the prior is absent (NaN) and μ* falls back to the empirical mean, as the paper prescribes
  for a cold start.
- The buffer is a plain FIFO of pairs; a prompt observed twice appears twice (its newer rate is closer to
  the current policy, its older one ages out). The paper does not say how duplicates are handled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from v0_data.tasks.base import Prompt

DEFAULT_CAPACITY = 512  # paper §4.1.3: support buffer capacity
DEFAULT_SUPPORT_SIZE = 256  # paper §4.1.3: support batch size (context rows per query)
HISTORY_DISCOUNT_UNITS = ("observation", "step")  # `history` prior: what one discount γ is applied per
HISTORY_CENTERS = ("flat", "base-rate")  # `history` prior: where its Beta prior is centred


@runtime_checkable
class PriorSource(Protocol):
    """Gives a prior V ∈ [-1, 1] (or NaN for "no prior") for a batch of prompts in one call."""

    name: str

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """Priors for `prompts`. Shape: (B,), float64, each in [-1, 1] or NaN."""
        ...

    def observe(
        self,
        prompt_ids: Sequence[int] | np.ndarray,
        success_rates: Sequence[float] | np.ndarray,
        counts: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        """Feed the support buffer with the current policy's measured success rates in [0, 1]; `counts` (B,)
        are the rollouts behind each rate (sources that weigh evidence, like `history`, use them)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the source bit-for-bit (support buffer, RNG counters)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SupportSample(NamedTuple):
    """Context drawn from the support buffer. Shapes: prompt_ids (n,) int64, success_rates (n,) float64."""

    prompt_ids: np.ndarray
    success_rates: np.ndarray


def _as_pairs(prompt_ids, success_rates, where: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)  # [B]
    rates = np.asarray(success_rates, dtype=np.float64).reshape(-1)  # [B]
    if ids.shape != rates.shape:
        raise ValueError(
            f"{where}: prompt_ids has {ids.size} entries but success_rates has {rates.size}; pass one rate per prompt"
        )
    bad = ~np.isfinite(rates) | (rates < 0.0) | (rates > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: success_rates[{i}] = {float(rates[i])!r} is not a success rate in [0, 1]; "
            "pass (successes / rollouts), not a ±1 mean reward"
        )
    return ids, rates


class SupportBuffer:
    """FIFO of the current policy's recent (prompt_id, success rate) pairs (paper: capacity 512).

    >>> buf = SupportBuffer(capacity=3)
    >>> buf.add([1, 2, 3, 4], [0.0, 0.5, 1.0, 0.25])   # the oldest pair (1, 0.0) is pushed out
    >>> len(buf), buf.usable()
    (3, True)
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"SupportBuffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._ids: deque[int] = deque(maxlen=self.capacity)
        self._rates: deque[float] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, prompt_ids, success_rates) -> None:
        """Append pairs in order; once full, each new pair evicts the oldest."""
        ids, rates = _as_pairs(prompt_ids, success_rates, "SupportBuffer.add")
        self._ids.extend(int(i) for i in ids)
        self._rates.extend(float(r) for r in rates)

    def usable(self) -> bool:
        """False when empty or when all outcomes behind the pairs are one class (all rates 0 or all 1)."""
        if not self._rates:
            return False
        rates = np.fromiter(self._rates, dtype=np.float64)
        return bool((rates > 0.0).any() and (rates < 1.0).any())

    def arrays(self) -> SupportSample:
        """All pairs, oldest first."""
        return SupportSample(np.fromiter(self._ids, dtype=np.int64), np.fromiter(self._rates, dtype=np.float64))

    def sample(self, n: int = DEFAULT_SUPPORT_SIZE, rng: np.random.Generator | None = None) -> SupportSample:
        """`n` pairs drawn without replacement (all of them, shuffled, when fewer than `n` are held)."""
        if n < 1:
            raise ValueError(f"SupportBuffer.sample: n must be >= 1, got {n}")
        rng = rng if rng is not None else np.random.default_rng()
        ids, rates = self.arrays()
        take = rng.permutation(len(ids))[: min(n, len(ids))]  # [n']
        return SupportSample(ids[take], rates[take])

    def state_dict(self) -> dict[str, Any]:
        ids, rates = self.arrays()
        return {"capacity": self.capacity, "prompt_ids": ids.tolist(), "success_rates": rates.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"support buffer capacity mismatch: checkpoint has {state['capacity']}, config has {self.capacity}; "
                "resume with the same support_capacity"
            )
        self._ids.clear()
        self._rates.clear()
        self.add(state["prompt_ids"], state["success_rates"])


class BufferedPriorSource:
    """Base for sources: owns the support buffer that `observe` feeds and checkpoints it."""

    name = "base"

    def __init__(self, support: SupportBuffer | None = None):
        self.support = support if support is not None else SupportBuffer()

    def observe(self, prompt_ids, success_rates, counts=None) -> None:
        self.support.add(prompt_ids, success_rates)

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"support": self.support.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.support.load_state_dict(state["support"])


class NoPrior(BufferedPriorSource):
    """Every prior is NaN ("no prior"): the fused baseline is the plain empirical mean."""

    name = "none"

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        return np.full(len(prompts), np.nan, dtype=np.float64)  # [B]


class MeanPrior(BufferedPriorSource):
    """The same V for every prompt: the support buffer's mean success rate, V = 2·mean − 1.

    The control for "does a prior's knowledge of the prompt pay?": a value model that knew nothing about
    prompts would predict this context mean (V0's `context_mean` baseline in `v05 pretrain-v0`). NaN when
    the buffer is not usable (the same rule as V0's), so its cold start matches V0's; never ±1 otherwise,
    since a usable buffer holds both outcomes.

    >>> src = MeanPrior(SupportBuffer(4))
    >>> src.observe([1, 2], [0.0, 0.5])
    >>> src.priors([None, None]).tolist()
    [-0.5, -0.5]
    """

    name = "mean"

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        if not self.support.usable():
            return np.full(len(prompts), np.nan, dtype=np.float64)  # [B]
        mean = float(self.support.arrays().success_rates.mean())
        return np.full(len(prompts), 2.0 * mean - 1.0, dtype=np.float64)  # [B]


SuccessRateFn = Callable[[Sequence[Prompt], int, int], np.ndarray]
"""(prompts, n_rollouts, seed) -> the current policy's measured success rates. Shape: (B,) in [0, 1]."""


@dataclass(frozen=True)
class PriorRuntime:
    """What a source may need from the running trainer, handed to every factory."""

    success_rate_fn: SuccessRateFn | None = field(
        default=None, metadata={"help": "measures the current policy's success rate (needed by oracle-noise)"}
    )
    prompts_by_id: Mapping[int, Prompt] = field(
        default_factory=dict, metadata={"help": "prompt id -> Prompt for every prompt the buffer may hold (V0 context)"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device for model-based priors"})


@dataclass(frozen=True)
class PriorOptions:
    """Options of the prior sources; the trainer's config carries the same values."""

    support_capacity: int = field(default=DEFAULT_CAPACITY, metadata={"help": "support buffer capacity (paper: 512)"})
    support_size: int = field(default=DEFAULT_SUPPORT_SIZE, metadata={"help": "context rows per query (paper: 256)"})
    oracle_rollouts: int = field(default=32, metadata={"help": "oracle-noise: extra rollouts per prompt (not budgeted)"})
    noise_std: float = field(default=0.0, metadata={"help": "oracle-noise: Gaussian noise std on the [-1, 1] scale"})
    flip_fraction: float = field(default=0.0, metadata={"help": "oracle-noise: fraction of priors flipped V -> -V"})
    v0_checkpoint: str | None = field(default=None, metadata={"help": "v0: path of the V0 checkpoint file"})
    v0_features_dir: str | None = field(
        default=None,
        metadata={"help": "v0: folder written by `v05 data embed` (default <store>/features); its per-prompt "
                  "features are read, never recomputed"},
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of the source's own randomness; None = the run's seed (verl: 0)"}
    )
    history_discount: float = field(
        default=0.9,
        metadata={"help": "history: discount γ in (0, 1] of a prompt's success/failure counts (1 = never forget)"},
    )
    history_discount_unit: str = field(
        default="observation",
        metadata={"help": "history: γ applies per 'observation' of the prompt, or per training 'step' to every prompt"},
    )
    history_a0: float = field(default=1.0, metadata={"help": "history: Beta(a0, b0) prior pseudo-successes (> 0)"})
    history_b0: float = field(default=1.0, metadata={"help": "history: Beta(a0, b0) prior pseudo-failures (> 0)"})
    history_center: str = field(
        default="base-rate",
        metadata={"help": "history: Beta prior mean 'base-rate' = the support buffer's mean success rate, or "
                  "'flat' = a0/(a0+b0) (strength a0+b0 either way). base-rate is the default: with rare "
                  "successes a flat Beta(1, 1) put unseen-success prompts far too high and made k = 2 gradients "
                  "worse (`v05 bench gradient`: cosine -0.07 ± 0.04 vs GRPO; base-rate +0.01 ± 0.03)"},
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.history_discount <= 1.0:
            raise ValueError(f"PriorOptions.history_discount must be in (0, 1], got {self.history_discount}")
        if self.history_discount_unit not in HISTORY_DISCOUNT_UNITS:
            raise ValueError(
                f"PriorOptions.history_discount_unit {self.history_discount_unit!r} unknown; "
                f"use one of {', '.join(HISTORY_DISCOUNT_UNITS)}"
            )
        if self.history_center not in HISTORY_CENTERS:
            raise ValueError(
                f"PriorOptions.history_center {self.history_center!r} unknown; use one of {', '.join(HISTORY_CENTERS)}"
            )
        if not (self.history_a0 > 0 and self.history_b0 > 0):
            raise ValueError(
                f"PriorOptions.history_a0 and history_b0 must be > 0 (a prior of exactly ±1 otherwise), "
                f"got {self.history_a0}, {self.history_b0}"
            )

    def resolved_seed(self) -> int:
        return 0 if self.seed is None else int(self.seed)


def check_priors(priors: np.ndarray, n: int, source: str) -> np.ndarray:
    """Validate a source's output: shape (n,), each value in [-1, 1] or NaN."""
    v = np.asarray(priors, dtype=np.float64)
    if v.shape != (n,):
        raise ValueError(f"prior source {source!r} returned shape {v.shape}, expected ({n},)")
    finite = np.isfinite(v)
    bad = (~finite & ~np.isnan(v)) | (finite & ((v < -1.0) | (v > 1.0)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"prior source {source!r}: prior[{i}] = {float(v[i])!r} is outside [-1, 1] (NaN means no prior)")
    return v




__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SUPPORT_SIZE",
    "HISTORY_CENTERS",
    "HISTORY_DISCOUNT_UNITS",
    "BufferedPriorSource",
    "NoPrior",
    "PriorOptions",
    "PriorRuntime",
    "PriorSource",
    "SuccessRateFn",
    "SupportBuffer",
    "SupportSample",
    "check_priors",
]
