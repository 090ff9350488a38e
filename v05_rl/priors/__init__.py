"""Where V0.5's prior V comes from: sources chosen by name from `PRIOR_SOURCES`.

- `none`          no prior: every V is NaN, so the fused baseline reduces to the empirical mean.
- `mean`          one V for every prompt, the support buffer's mean success rate: the control for
                  whether knowing the prompt pays (`base.py`).
- `oracle-noise`  the policy's measured success rate (extra, unbudgeted rollouts) plus noise: an
                  experimental upper bound (`oracle.py`).
- `v0`            the frozen V0 value model with the support buffer as context (`v0.py`).

Every source keeps the support buffer (`base.py`) that the trainer feeds after each step.
"""

from __future__ import annotations

from typing import Callable

from v0_data.registry import Registry
from v05_rl.priors.base import (
    DEFAULT_CAPACITY,
    DEFAULT_SUPPORT_SIZE,
    BufferedPriorSource,
    MeanPrior,
    NoPrior,
    PriorOptions,
    PriorRuntime,
    PriorSource,
    SuccessRateFn,
    SupportBuffer,
    SupportSample,
    check_priors,
)
from v05_rl.priors.oracle import OracleNoisePrior, noisy_prior

PriorFactory = Callable[[PriorOptions, PriorRuntime], PriorSource]
PRIOR_SOURCES: Registry[PriorFactory] = Registry("prior source")

PRIOR_HELP: dict[str, str] = {
    "none": "no prior (NaN): the fused baseline is the empirical mean",
    "mean": "one prior for every prompt, the support buffer's mean success rate (the control for V0: no prompt knowledge)",
    "oracle-noise": (
        "EXPERIMENTAL UPPER BOUND: the current policy's success rate measured with extra rollouts that are "
        "not counted in the budget, plus Gaussian noise (--prior-noise-std) and flipped priors (--prior-flip-fraction)"
    ),
    "v0": "the pretrained V0 value model (--v0-checkpoint) with the support buffer as context",
}


@PRIOR_SOURCES.register("none")
def _make_none(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    return NoPrior(SupportBuffer(opts.support_capacity))


@PRIOR_SOURCES.register("mean")
def _make_mean(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    return MeanPrior(SupportBuffer(opts.support_capacity))


@PRIOR_SOURCES.register("oracle-noise")
def _make_oracle(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    if runtime.success_rate_fn is None:
        raise ValueError("prior 'oracle-noise' needs a success_rate_fn (the trainer provides one from its rollout backend)")
    return OracleNoisePrior(
        runtime.success_rate_fn,
        n_rollouts=opts.oracle_rollouts,
        noise_std=opts.noise_std,
        flip_fraction=opts.flip_fraction,
        seed=opts.resolved_seed(),
        support=SupportBuffer(opts.support_capacity),
    )


@PRIOR_SOURCES.register("v0")
def _make_v0(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    """The V0 source: the checkpoint `opts.v0_checkpoint` on `runtime.device`, texts from the live
    `runtime.prompts_by_id` (see `v0.build_v0_source`)."""
    from v05_rl.priors.v0 import build_v0_source  # heavy (torch, transformers): only when V0 is asked for

    return build_v0_source(opts, runtime)


def make_prior_source(name: str, opts: PriorOptions | None = None, runtime: PriorRuntime | None = None) -> PriorSource:
    """Build the prior source `name` (see `PRIOR_SOURCES.names()`)."""
    return PRIOR_SOURCES.get(name)(opts or PriorOptions(), runtime or PriorRuntime())


__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SUPPORT_SIZE",
    "PRIOR_HELP",
    "PRIOR_SOURCES",
    "BufferedPriorSource",
    "MeanPrior",
    "NoPrior",
    "OracleNoisePrior",
    "PriorFactory",
    "PriorOptions",
    "PriorRuntime",
    "PriorSource",
    "SuccessRateFn",
    "SupportBuffer",
    "SupportSample",
    "check_priors",
    "make_prior_source",
    "noisy_prior",
]


# ---- `history` and `v0+history` (issue 12): per-prompt discounted Beta–Bernoulli priors (`history.py`)
from v05_rl.priors.history import DiscountedBetaTable, HistoryPrior, V0HistoryPrior  # noqa: E402

PRIOR_HELP.update({
    "history": (
        "the prompt's own earlier rollouts: discounted Beta-Bernoulli posterior (arXiv 2603.18444); "
        "NaN until the prompt was observed (useful when prompts recur)"
    ),
    "v0+history": (
        "history where the prompt was observed, with V0's estimate (--v0-checkpoint) as its Beta prior mean; "
        "V0 where it was not"
    ),
})


def _history_table(opts: PriorOptions) -> DiscountedBetaTable:
    return DiscountedBetaTable(opts.history_discount, opts.history_discount_unit)


@PRIOR_SOURCES.register("history")
def _make_history(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    return HistoryPrior(_history_table(opts), a0=opts.history_a0, b0=opts.history_b0, center=opts.history_center,
                        support=SupportBuffer(opts.support_capacity))


@PRIOR_SOURCES.register("v0+history")
def _make_v0_history(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    return V0HistoryPrior(_make_v0(opts, runtime), _history_table(opts), a0=opts.history_a0, b0=opts.history_b0)


__all__ += ["DiscountedBetaTable", "HistoryPrior", "V0HistoryPrior"]
