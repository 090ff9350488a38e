"""Where V0.5's prior V comes from: sources chosen by name from `PRIOR_SOURCES`.

- `none`          no prior: every V is NaN, so the fused baseline reduces to the empirical mean.
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
        seed=opts.resolved_seed(),
        support=SupportBuffer(opts.support_capacity),
    )


@PRIOR_SOURCES.register("v0")
def _make_v0(opts: PriorOptions, runtime: PriorRuntime) -> PriorSource:
    """The V0 source: the checkpoint `opts.v0_checkpoint`, texts of `runtime.prompts_by_id`."""
    if not opts.v0_checkpoint:
        raise ValueError("prior 'v0' needs --v0-checkpoint PATH (a file written by `v05 pretrain-v0`)")
    from v0_model.checkpoint import load_predictor  # heavy (torch, transformers): only when V0 is asked for
    from v05_rl.priors.v0 import V0PriorSource

    predictor = load_predictor(opts.v0_checkpoint)
    texts = {int(pid): p.text for pid, p in dict(runtime.prompts_by_id).items()}
    return V0PriorSource(predictor, SupportBuffer(opts.support_capacity), texts=texts,
                         support_size=opts.support_size, seed=opts.resolved_seed())


def make_prior_source(name: str, opts: PriorOptions | None = None, runtime: PriorRuntime | None = None) -> PriorSource:
    """Build the prior source `name` (see `PRIOR_SOURCES.names()`)."""
    return PRIOR_SOURCES.get(name)(opts or PriorOptions(), runtime or PriorRuntime())


__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_SUPPORT_SIZE",
    "PRIOR_HELP",
    "PRIOR_SOURCES",
    "BufferedPriorSource",
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
