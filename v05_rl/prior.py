"""Where V0.5's prior V comes from: the `PriorSource` interface, the support buffer and a registry.

The paper (§4.1.3, Step 1) keeps a global support buffer of capacity 512 holding the current policy's
recent (prompt, success rate) pairs; for every prior query it samples 256 of them as the capability
context C_π and asks the value model for p̂, giving the prior V = 2p̂ - 1 on the reward scale [-1, 1].

Sources, chosen by name from `PRIOR_SOURCES`:
- `none`          no prior: every V is NaN, so the fused baseline reduces to the empirical mean.
- `oracle-noise`  the current policy's own success rate on each prompt, measured with many extra
                  rollouts that are *not* counted in the rollout budget, plus Gaussian noise of a chosen
                  standard deviation on the reward scale (clipped to [-1, 1]) and an optional fraction of
                  flipped priors (V -> -V, the "hallucinating" regime). An experimental upper bound on
                  what any value model could give, not a method one could deploy.
- `v0`            the pretrained V0 value model; provided by `v0_model.prior` (see `_make_v0`).

Departures from the paper, and why:
- "No usable context" is defined as: the buffer is empty, or every rollout behind its pairs had the same
  outcome (all success rates 0, or all 1). An in-context classifier cannot learn anything from a single
  class, so the prior is absent (NaN) and μ* falls back to the empirical mean, as the paper prescribes
  for a cold start.
- The buffer is a plain FIFO of pairs; a prompt observed twice appears twice (its newer rate is closer to
  the current policy, its older one ages out). The paper does not say how duplicates are handled.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from v0_data.registry import Registry
from v0_data.tasks.base import Prompt

DEFAULT_CAPACITY = 512  # paper §4.1.3: support buffer capacity
DEFAULT_SUPPORT_SIZE = 256  # paper §4.1.3: support batch size (context rows per query)


@runtime_checkable
class PriorSource(Protocol):
    """Gives a prior V ∈ [-1, 1] (or NaN for "no prior") for a batch of prompts in one call."""

    name: str

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """Priors for `prompts`. Shape: (B,), float64, each in [-1, 1] or NaN."""
        ...

    def observe(self, prompt_ids: Sequence[int] | np.ndarray, success_rates: Sequence[float] | np.ndarray) -> None:
        """Feed the support buffer with the current policy's measured success rates in [0, 1]."""
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

    def observe(self, prompt_ids, success_rates) -> None:
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


SuccessRateFn = Callable[[Sequence[Prompt], int, int], np.ndarray]
"""(prompts, n_rollouts, seed) -> the current policy's measured success rates. Shape: (B,) in [0, 1]."""


def noisy_prior(
    success_rate: np.ndarray, noise_std: float, flip_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """V = clip(2p - 1 + σ·ε, -1, 1), then V -> -V for each prompt with probability `flip_fraction`.

    Shapes: success_rate (B,) -> (B,). ε ~ N(0, 1) drawn from `rng` (always B draws, then B uniforms, so
    the stream does not depend on σ or the flip fraction).
    """
    truth = 2.0 * np.asarray(success_rate, dtype=np.float64) - 1.0  # [B]
    eps = rng.standard_normal(truth.shape)  # [B]
    flips = rng.random(truth.shape) < flip_fraction  # [B]
    v = np.clip(truth + noise_std * eps, -1.0, 1.0)  # [B]
    return np.where(flips, -v, v)


class OracleNoisePrior(BufferedPriorSource):
    """Upper-bound prior: the policy's measured success rate (extra rollouts, outside the budget) + noise.

    `success_rate_fn` generates `n_rollouts` fresh rollouts per prompt with the *current* policy. Each call
    uses its own seed derived from (seed, call index), so a resumed run draws the same priors.
    `last_truth` holds 2p - 1 of the latest call, for logging the prior's error.
    """

    name = "oracle-noise"

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
        return noisy_prior(p, self.noise_std, self.flip_fraction, np.random.default_rng(call_seed))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.calls = int(state["calls"])


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
    seed: int = field(default=0, metadata={"help": "seed of the source's own randomness"})


PriorFactory = Callable[[PriorOptions, PriorRuntime], PriorSource]
PRIOR_SOURCES: Registry[PriorFactory] = Registry("prior source")

PRIOR_HELP: dict[str, str] = {
    "none": "no prior (V = NaN): the baseline is the empirical mean",
    "oracle-noise": (
        "EXPERIMENTAL UPPER BOUND: the current policy's success rate measured with extra rollouts that are "
        "not counted in the budget, plus Gaussian noise (--prior-noise-std) and flipped priors (--prior-flip-fraction)"
    ),
    "v0": "the pretrained V0 value model (--v0-checkpoint) with the support buffer as context",
}


@PRIOR_SOURCES.register("none")
def _make_none(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    return NoPrior(SupportBuffer(opts.support_capacity))


@PRIOR_SOURCES.register("oracle-noise")
def _make_oracle(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    if runtime.success_rate_fn is None:
        raise ValueError("prior 'oracle-noise' needs a success_rate_fn (the trainer provides one from its rollout backend)")
    return OracleNoisePrior(
        runtime.success_rate_fn,
        n_rollouts=opts.oracle_rollouts,
        noise_std=opts.noise_std,
        flip_fraction=opts.flip_fraction,
        seed=opts.seed,
        support=SupportBuffer(opts.support_capacity),
    )


V0_FACTORY = "v0_model.prior:make_prior_source"
"""Contract for the V0 source: `make_prior_source(opts: PriorOptions, runtime: PriorRuntime,
support: SupportBuffer) -> PriorSource`, returning NaN priors while `support.usable()` is False."""


@PRIOR_SOURCES.register("v0")
def _make_v0(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    module_name, attr = V0_FACTORY.split(":")
    if importlib.util.find_spec("v0_model") is None or importlib.util.find_spec(module_name) is None:
        raise RuntimeError(
            "prior 'v0': the v0 prior source arrives with v0_model (module v0_model.prior is missing); "
            "use --prior none or --prior oracle-noise until it is installed"
        )
    if not opts.v0_checkpoint:
        raise ValueError("prior 'v0' needs --v0-checkpoint PATH (a file written by `v05 pretrain-v0`)")
    module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise RuntimeError(f"prior 'v0': {module_name} has no {attr}(opts, runtime, support); update v0_model")
    return factory(opts, runtime, SupportBuffer(opts.support_capacity))


def make_prior_source(name: str, opts: PriorOptions | None = None, runtime: PriorRuntime | None = None) -> PriorSource:
    """Build the prior source `name` (see `PRIOR_SOURCES.names()`)."""
    return PRIOR_SOURCES.get(name)(opts or PriorOptions(), runtime or PriorRuntime())


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
    "PriorSource",
    "SupportBuffer",
    "SupportSample",
    "BufferedPriorSource",
    "NoPrior",
    "OracleNoisePrior",
    "PriorOptions",
    "PriorRuntime",
    "PRIOR_SOURCES",
    "PRIOR_HELP",
    "make_prior_source",
    "noisy_prior",
    "check_priors",
]
