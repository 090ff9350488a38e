"""The embedded RL engine: one training loop, algorithms as configuration.

Per step: draw a prompt batch -> (v05) ask the prior source for V -> generate rollouts (OSLA rounds
for `v05`, refills for `dapo`) -> rewards -> advantages from `v05_rl.estimators` -> PPO-clip update of
the policy -> log, evaluate, checkpoint. The algorithms differ only in the settings below
(`ALGORITHM_TABLE`), never in a separate loop:

| algorithm   | rollouts per prompt            | advantage                 | loss aggregation     | KL (k3) | clip       |
|-------------|--------------------------------|---------------------------|----------------------|---------|------------|
| `grpo`      | G (default 16)                 | group mean / std          | seq-mean-token-mean  | 0.001   | 0.2 / 0.2  |
| `dapo`      | G, zero-variance groups refilled| group mean / std         | token-mean           | 0       | 0.2 / 0.28 |
| `v05`       | k_init = 4 + OSLA rounds       | fused baseline (Eq. 6–9)  | prompt-mean (Eq. 10) | 0       | 0.2 / 0.2  |
| `v05-fixed` | k ∈ {1, 2, 4, 8}               | fused baseline (Eq. 6–9)  | prompt-mean (Eq. 10) | 0       | 0.2 / 0.2  |

Compute is matched as in the paper (§4.1.4): the prompt batch is `rollouts_per_step // k`, with k the
group size (G, k, or k_init), so prompt batch × rollouts per prompt is constant. Every generated rollout
is counted in `rollouts_used` — OSLA's extra rounds and padding, DAPO's dropped groups — and a run can
stop at `rollout_budget` instead of `steps` (or after `max_minutes` of training time; that stop is the
one thing a resumed run does not reproduce exactly). The oracle prior's measuring rollouts are *not* budgeted
(it is an upper-bound experiment) and are logged separately as `oracle_rollouts`.

Where this departs from the paper, and why:
- Eq. 10 writes a sequence-level ratio ρ_i; like verl we use per-token ratios and clip per token (a
  product of token ratios over a long response is numerically useless). "prompt-mean" keeps Eq. 10's
  weighting: the token-mean of each response, averaged over the k_i responses of its prompt, averaged
  over prompts (a prompt with 16 rollouts weighs as much as one with 4).
- KL to the reference policy uses the k3 estimator (verl's `low_var_kl`, clamped to [-10, 10]) added to
  the loss, as in verl's GRPO with `use_kl_loss`.
- DAPO: dynamic sampling draws a fresh prompt batch per try and keeps groups with non-zero reward
  variance until the batch is full or `dapo_max_tries` is spent (then trains on what it has, where
  verl would raise). The overlong-response reward shaping of DAPO is not used (responses here are short).
- With one PPO epoch and one mini-batch (the default) the update is exactly on-policy, so the "old"
  log-probabilities are the detached current ones (ratio ≡ 1, clip fraction 0); otherwise they are
  recomputed once per step by a forward pass, as verl does, rather than taken from the sampler.
- The learning-rate schedule is linear warm-up then constant (the paper: 10 warm-up steps, no decay).
- `v05` with `prior: none` is legal but not V0.5: the planner treats a missing prior as maximal doubt and
  samples every prompt up to the cap (k = 16), i.e. GRPO-16 on a 4× larger prompt batch. `v05-fixed`
  with `prior: none` uses μ* = v̄_k (the empirical mean) and σ* = sqrt(1 − v̄_k²).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from v0_data.tasks.base import Prompt
from v05_rl.prior import (
    PRIOR_SOURCES,
    PriorOptions,
    PriorRuntime,
    PriorSource,
    check_priors,
    make_prior_source,
)

ALGORITHMS = ("grpo", "dapo", "v05", "v05-fixed")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "prompt-mean")
LOGGERS = ("none", "wandb", "tensorboard")


class AlgorithmDefaults(NamedTuple):
    """Per-algorithm settings used when the corresponding config field is left at None."""

    loss_agg: str
    kl_coef: float
    clip_high: float | None  # None: same as clip_low


ALGORITHM_TABLE: dict[str, AlgorithmDefaults] = {
    "grpo": AlgorithmDefaults("seq-mean-token-mean", 0.001, None),
    "dapo": AlgorithmDefaults("token-mean", 0.0, 0.28),
    "v05": AlgorithmDefaults("prompt-mean", 0.0, None),
    "v05-fixed": AlgorithmDefaults("prompt-mean", 0.0, None),
}


def _h(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a local RL run. Defaults are the paper's where it gives one (§4.1.4);
    `pipelines/configs/tiny.yaml` overrides them for the embedded CPU world."""

    # what to train
    algorithm: str = _h(f"one of {', '.join(ALGORITHMS)}", default="grpo")
    policy: str = _h("policy: tiny family name (tiny-s/tiny-m/tiny-l), local path or Hugging Face id", default="Qwen/Qwen3-4B-Instruct-2507")
    tasks: str = _h("task source name (v0_data.tasks registry)", default="arith")
    tasks_path: str | None = _h("path or spec handed to the task source's load() (arith: 'n_prompts=2000,seed=0')", default=None)
    train_split: str = _h("split of the task source used for training", default="train")
    eval_split: str = _h("held-out split used for evaluation", default="test")
    # compute
    rollouts_per_step: int = _h("prompt batch × rollouts per prompt (paper: 512 × 16); sets the prompt batch", default=8192)
    prompt_batch: int | None = _h("prompts per step; None = rollouts_per_step // group size", default=None)
    group_size: int = _h("G: rollouts per prompt for grpo / dapo (paper: 16)", default=16)
    k: int = _h("rollouts per prompt for v05-fixed (paper: 1, 2, 4 or 8)", default=4)
    steps: int = _h("training steps (the run also stops at rollout_budget when set)", default=100)
    rollout_budget: int | None = _h("stop once this many rollouts were generated (every rollout counts)", default=None)
    max_minutes: float | None = _h("stop once the training steps (not evaluation) took this many wall-clock minutes", default=None)
    # V0.5 / OSLA
    k_init: int = _h("v05: initial rollouts per prompt (paper: 4)", default=4)
    osla_step: int = _h("v05: rollouts added per OSLA round to a prompt that needs more (paper: 2)", default=2)
    osla_c: float = _h("v05: compute cost per rollout c (paper: 0.0039, so k <= 16)", default=0.0039)
    osla_k_max: int | None = _h("v05: cap on rollouts per prompt; None = floor(1/sqrt(c))", default=None)
    halt_fraction: float = _h("v05: halt a round when fewer than this share of prompts need more (paper: 0.25)", default=0.25)
    pad_multiple: int = _h("v05: pad each extra dispatch to a multiple of this (paper: 32)", default=32)
    fusion_method: str = _h("v05: fusion method of the estimator (paper, bernoulli, empirical-bayes)", default="paper")
    osla_no_prior: str = _h("v05: prompts without a prior (no prior source, or an empty support buffer): "
                            "'cap' samples them to the cap (paper, Eq. 12), 'k_init' stops at k_init", default="cap")
    # prior
    prior: str = _h("prior source: none, oracle-noise (experimental upper bound), v0", default="none")
    v0_checkpoint: str | None = _h("V0 checkpoint for --prior v0", default=None)
    support_capacity: int = _h("support buffer capacity (paper: 512)", default=512)
    support_size: int = _h("support pairs sampled as context per query (paper: 256)", default=256)
    oracle_rollouts: int = _h("oracle-noise: extra rollouts per prompt to measure the success rate (not budgeted)", default=32)
    prior_noise_std: float = _h("oracle-noise: Gaussian noise std on the [-1, 1] scale", default=0.0)
    prior_flip_fraction: float = _h("oracle-noise: fraction of priors flipped V -> -V", default=0.0)
    # DAPO
    dapo_max_tries: int = _h("dapo: generation tries per step to fill the batch with non-zero-variance groups", default=3)
    # optimisation
    lr: float = _h("AdamW learning rate (paper: 1e-6)", default=1e-6)
    warmup_steps: int = _h("linear warm-up steps, then constant (paper: 10)", default=10)
    weight_decay: float = _h("AdamW weight decay", default=0.01)
    betas: tuple[float, float] = _h("AdamW betas", default=(0.9, 0.999))
    grad_clip: float = _h("global gradient-norm clip (paper: 1.0)", default=1.0)
    ppo_epochs: int = _h("passes over each step's rollouts", default=1)
    n_minibatches: int = _h("optimizer steps per epoch (the batch is split into this many mini-batches)", default=1)
    micro_batch_size: int = _h("rows per forward pass (memory only; does not change the result)", default=256)
    clip_low: float = _h("PPO clip ε (lower side; also the upper side unless clip_high is set)", default=0.2)
    clip_high: float | None = _h("PPO upper clip; None = algorithm default (dapo 0.28, else clip_low)", default=None)
    kl_coef: float | None = _h("KL(k3) coefficient to the frozen reference; None = algorithm default (grpo 0.001)", default=None)
    loss_agg: str | None = _h(f"loss aggregation ({', '.join(LOSS_AGGS)}); None = algorithm default", default=None)
    entropy_coef: float = _h("entropy bonus coefficient", default=0.0)
    grpo_eps: float = _h("epsilon added to the group std in GRPO advantages (verl: 1e-6)", default=1e-6)
    # sampling
    temperature: float = _h("sampling temperature for training rollouts", default=1.0)
    top_p: float = _h("nucleus sampling for training rollouts", default=1.0)
    max_new_tokens: int = _h("maximum response length in tokens (paper: 4096)", default=4096)
    # evaluation
    eval_every: int = _h("evaluate every N steps (0 = only before and after training)", default=10)
    eval_prompts: int = _h("held-out prompts used for evaluation (first N of the split)", default=256)
    eval_k: int = _h("samples per held-out prompt for mean@k (paper: 16)", default=16)
    eval_temperature: float = _h("evaluation temperature (paper: 1.0)", default=1.0)
    eval_top_p: float = _h("evaluation top-p (paper: 0.7)", default=0.7)
    # bookkeeping
    seed: int = _h("seed of prompt order, sampling and the prior's noise", default=0)
    save_every: int = _h("write a checkpoint every N steps (0 = only at the end)", default=10)
    keep_checkpoints: int = _h("checkpoints kept on disk (oldest removed first)", default=2)
    store: str | None = _h("trajectory store directory; every rollout is written there when set", default=None)
    store_model: str | None = _h("model name recorded in the store (default: the policy name)", default=None)
    store_run_id: str | None = _h("run id in the store; a fixed id makes a restarted run replace its own rows", default=None)
    logger: str = _h(f"extra metrics logger: {', '.join(LOGGERS)}", default="none")
    device: str = _h("torch device (cpu, cuda, auto)", default="cpu")

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"TrainConfig.algorithm {self.algorithm!r} unknown; use one of {', '.join(ALGORITHMS)}")
        if self.prior not in PRIOR_SOURCES:
            raise ValueError(f"TrainConfig.prior {self.prior!r} unknown; use one of {', '.join(PRIOR_SOURCES.names())}")
        if self.algorithm in ("grpo", "dapo") and self.prior != "none":
            raise ValueError(f"TrainConfig.prior={self.prior!r} has no effect with algorithm {self.algorithm!r}; set prior: none or algorithm: v05")
        if self.prior == "v0" and not self.v0_checkpoint:
            raise ValueError("TrainConfig.prior='v0' needs v0_checkpoint (path of a `v05 pretrain-v0` checkpoint)")
        if self.algorithm == "dapo" and self.group_size < 2:
            raise ValueError("dapo needs group_size >= 2 (zero-variance filtering is meaningless with one rollout)")
        positive = ("rollouts_per_step", "group_size", "k", "steps", "k_init", "osla_step", "dapo_max_tries",
                    "ppo_epochs", "n_minibatches", "micro_batch_size", "max_new_tokens", "eval_k",
                    "support_capacity", "support_size", "oracle_rollouts", "pad_multiple")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig.max_minutes must be > 0 or None, got {self.max_minutes}")
        for name in ("prompt_batch", "rollout_budget", "osla_k_max"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value}")
        if self.group_k > self.rollouts_per_step and self.prompt_batch is None:
            raise ValueError(
                f"rollouts_per_step={self.rollouts_per_step} is smaller than {self.group_k} rollouts per prompt; "
                "raise rollouts_per_step or set prompt_batch"
            )
        if not 0.0 < self.osla_c < 1.0:
            raise ValueError(f"TrainConfig.osla_c must be in (0, 1), got {self.osla_c}")
        if not 0.0 <= self.halt_fraction <= 1.0:
            raise ValueError(f"TrainConfig.halt_fraction must be in [0, 1], got {self.halt_fraction}")
        if self.osla_k_max is not None and self.osla_k_max < self.k_init:
            raise ValueError(f"TrainConfig.osla_k_max={self.osla_k_max} is below k_init={self.k_init}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints", "eval_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.clip_low < 1.0:
            raise ValueError(f"TrainConfig.clip_low must be in (0, 1), got {self.clip_low}")
        if self.clip_high is not None and not self.clip_high > 0.0:
            raise ValueError(f"TrainConfig.clip_high must be > 0 or None, got {self.clip_high}")
        if self.kl_coef is not None and self.kl_coef < 0:
            raise ValueError(f"TrainConfig.kl_coef must be >= 0 or None, got {self.kl_coef}")
        if self.loss_agg is not None and self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"TrainConfig.loss_agg {self.loss_agg!r} unknown; use one of {', '.join(LOSS_AGGS)} or leave it unset")
        if not self.temperature > 0 or not self.eval_temperature > 0:
            raise ValueError("TrainConfig.temperature and eval_temperature must be > 0")
        if not (0.0 < self.top_p <= 1.0 and 0.0 < self.eval_top_p <= 1.0):
            raise ValueError("TrainConfig.top_p and eval_top_p must be in (0, 1]")
        if self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0, got {self.grad_clip}")
        if self.logger not in LOGGERS:
            raise ValueError(f"TrainConfig.logger {self.logger!r} unknown; use one of {', '.join(LOGGERS)}")
        if self.prior_noise_std < 0 or not 0.0 <= self.prior_flip_fraction <= 1.0:
            raise ValueError("TrainConfig.prior_noise_std must be >= 0 and prior_flip_fraction in [0, 1]")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")

    # ------------------------------------------------------------------ derived settings
    @property
    def group_k(self) -> int:
        """Rollouts per prompt before any OSLA round: G, k or k_init."""
        return {"grpo": self.group_size, "dapo": self.group_size, "v05": self.k_init, "v05-fixed": self.k}[self.algorithm]

    @property
    def batch_prompts(self) -> int:
        """Prompts per step: explicit `prompt_batch`, else rollouts_per_step // group_k (compute matching)."""
        return self.prompt_batch if self.prompt_batch is not None else self.rollouts_per_step // self.group_k

    @property
    def resolved_loss_agg(self) -> str:
        return self.loss_agg or ALGORITHM_TABLE[self.algorithm].loss_agg

    @property
    def resolved_kl_coef(self) -> float:
        return ALGORITHM_TABLE[self.algorithm].kl_coef if self.kl_coef is None else self.kl_coef

    @property
    def resolved_clip_high(self) -> float:
        if self.clip_high is not None:
            return self.clip_high
        default = ALGORITHM_TABLE[self.algorithm].clip_high
        return self.clip_low if default is None else default

    def prior_options(self) -> PriorOptions:
        return PriorOptions(
            support_capacity=self.support_capacity,
            support_size=self.support_size,
            oracle_rollouts=self.oracle_rollouts,
            noise_std=self.prior_noise_std,
            flip_fraction=self.prior_flip_fraction,
            v0_checkpoint=self.v0_checkpoint,
            seed=self.seed,
        )

    def resolved(self) -> dict[str, Any]:
        """`asdict(cfg)` plus the derived values actually used (what is written next to a run)."""
        out = asdict(self)
        out["resolved"] = {
            "prompt_batch": self.batch_prompts,
            "group_k": self.group_k,
            "loss_agg": self.resolved_loss_agg,
            "kl_coef": self.resolved_kl_coef,
            "clip_high": self.resolved_clip_high,
        }
        return out


def config_help() -> dict[str, str]:
    """field name -> help text (used by the CLI and the YAML loader)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig)}


# ====================================================================================== pure helpers


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, round, ...), stable across machines."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def group_reward_stats(rewards: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group rollout counts and reward sums. Shapes: rewards (N,), group (N,) -> (G,), (G,)."""
    counts = np.bincount(group, minlength=n_groups).astype(np.int64)  # [G]
    sums = np.bincount(group, weights=rewards, minlength=n_groups)  # [G]
    return counts, sums


def row_weights(group: torch.Tensor, group_counts: torch.Tensor, lengths: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-token weight scale of each row so that Σ_t weight·loss_t / Σ weight is the chosen aggregation.

    - token-mean: every response token weighs 1.
    - seq-mean-token-mean: each response weighs 1 in total, spread evenly over its tokens (1/len).
    - prompt-mean (Eq. 10): each response weighs 1/k_g, spread over its tokens: (1/k_g)·(1/len).
    Shapes: group (N,), group_counts (G,), lengths (N,) -> (N,), to be multiplied by the response mask.
    """
    ones = torch.ones_like(lengths, dtype=torch.float64)
    if loss_agg == "token-mean":
        return ones
    per_seq = ones / lengths.clamp(min=1).to(torch.float64)  # [N]
    if loss_agg == "seq-mean-token-mean":
        return per_seq
    if loss_agg == "prompt-mean":
        return per_seq / group_counts[group].to(torch.float64)  # [N]
    raise ValueError(f"loss_agg {loss_agg!r} unknown; use one of {', '.join(LOSS_AGGS)}")


def ppo_clip_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A) (Eq. 10, token-level ratio).

    Shapes: logp, old_logp (N, R), adv (N,) -> loss (N, R), clipped indicator (N, R).
    """
    ratio = torch.exp(logp - old_logp)  # [N, R]
    a = adv[:, None]  # [N, 1]
    unclipped = -a * ratio  # [N, R]
    clipped = -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [N, R]
    loss = torch.maximum(unclipped, clipped)  # [N, R]
    return loss, (clipped > unclipped).to(logp.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π‖π_ref) per token, exp(ref − logp) − (ref − logp) − 1, clamped to [−10, 10]
    (verl's `low_var_kl`). Shapes: (N, R) -> (N, R)."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)  # [N, R]
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


# ====================================================================================== containers


@dataclass(frozen=True)
class Chunk:
    """The rollouts of one generation call that take part in the update.

    batch: a `v05_rl.rollout.RolloutBatch` of n rows; group (n,) index of each row's prompt in the
    step's prompt list; rewards (n,) ±1.
    """

    batch: Any
    group: np.ndarray
    rewards: np.ndarray

    def __len__(self) -> int:
        return len(self.rewards)


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


# ====================================================================================== adapters to sibling modules


def _estimators():
    return importlib.import_module("v05_rl.estimators")


def _allocation():
    return importlib.import_module("v05_rl.allocation")


def _rollout():
    return importlib.import_module("v05_rl.rollout")


def make_sampling(max_new_tokens: int, temperature: float, top_p: float):
    """A `v05_rl.rollout.SamplingConfig` with the given settings."""
    return _rollout().SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)


def default_reward_fn(prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
    """±1 rewards of `responses[i]` to `prompts[i]`, graded by `v0_data.rewards` by each prompt's dataset
    (arith: exact integer match; math data sets: math-verify). Shapes: (N,), (N,) -> (N,) float64."""
    from v0_data.rewards import score_batch

    out = np.empty(len(responses), dtype=np.float64)  # [N]
    by_ds: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_ds.setdefault(p.dataset, []).append(i)
    for ds, idx in by_ds.items():
        scored = score_batch(ds, [responses[i] for i in idx], [prompts[i].answer for i in idx])
        out[idx] = np.asarray(scored.rewards, dtype=np.float64)
    return out


RewardFn = Callable[[Sequence[Prompt], Sequence[str]], np.ndarray]
"""(prompts aligned with responses, responses) -> ±1 rewards. Shapes: (N,), (N,) -> (N,)."""


def _finish_reasons(batch, n: int) -> list[str]:
    fr = getattr(batch, "finish_reason", None)
    if fr is None:
        return [""] * n
    return [str(x) for x in list(fr)]


# ====================================================================================== prompt sampler


class PromptSampler:
    """Epoch-wise shuffled prompt order; its whole state is (epoch, position), so resume is exact."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no training prompts: the task source returned an empty split")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> np.ndarray:
        return np.random.default_rng(derive_seed(self.seed, 0x5A3, self.epoch)).permutation(self.n)

    def take(self, m: int) -> np.ndarray:
        out = []
        while len(out) < m:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            take = min(m - len(out), self.n - self.pos)
            out.extend(self._order[self.pos : self.pos + take].tolist())
            self.pos += take
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


# ====================================================================================== trainer


class Trainer:
    """The loop. Components are injected so tests (and verl's smoke tests) can pass a fake backend.

    backend: any object with `generate(prompts, n_per_prompt, sampling, *, seed) -> RolloutBatch`.
    evaluate_fn: `(model, prompts) -> dict` of evaluation metrics, or None to skip evaluation.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: torch.nn.Module,
        backend: Any,
        train_prompts: Sequence[Prompt],
        out_dir: str | Path,
        ref_model: torch.nn.Module | None = None,
        eval_prompts: Sequence[Prompt] = (),
        reward_fn: RewardFn = default_reward_fn,
        prior_source: PriorSource | None = None,
        sampling: Any = None,
        evaluate_fn: Callable[[torch.nn.Module, Sequence[Prompt]], Mapping[str, float]] | None = None,
        store: Any = None,
        store_model: str | None = None,
        policy_path: str | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.model = model
        self.backend = backend
        self.train_prompts = list(train_prompts)
        self.eval_prompts = list(eval_prompts)
        self.reward_fn = reward_fn
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sampling = sampling if sampling is not None else make_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        self.evaluate_fn = evaluate_fn
        self.progress = progress
        self.device = next(model.parameters()).device
        self.kl_coef = cfg.resolved_kl_coef
        if self.kl_coef > 0 and ref_model is None:
            raise ValueError(f"algorithm {cfg.algorithm!r} uses KL {self.kl_coef} to a reference policy: pass ref_model")
        self.ref_model = ref_model if self.kl_coef > 0 else None
        if self.ref_model is not None:
            self.ref_model.eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        if prior_source is None:
            runtime = PriorRuntime(
                success_rate_fn=self.measure_success_rate,
                prompts_by_id={p.prompt_id: p for p in self.train_prompts},
                device=str(self.device),
            )
            prior_source = make_prior_source(cfg.prior, cfg.prior_options(), runtime)
        self.prior_source = prior_source
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
        )
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        )
        self.sampler = PromptSampler(len(self.train_prompts), cfg.seed)
        self.step = 0
        self.rollouts_used = 0
        self.oracle_rollouts = 0
        self.train_seconds = 0.0  # wall-clock time of training steps so far (evaluation excluded)
        self.store = store
        self.store_model = store_model or cfg.store_model or cfg.policy
        self.policy_path = policy_path or cfg.policy
        self.run_id: str | None = None
        self.owns_store = False  # True when build_trainer opened the store (run_training closes it)
        self._extra_logger = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: Sequence[Prompt], n: int | Sequence[int], seed: int):
        return self.backend.generate([p.text for p in prompts], n, self.sampling, seed=seed)

    def _score(self, prompts: Sequence[Prompt], batch) -> np.ndarray:
        idx = np.asarray(batch.prompt_index, dtype=np.int64).reshape(-1)  # [N]
        rewards = np.asarray(self.reward_fn([prompts[i] for i in idx], list(batch.responses)), dtype=np.float64)
        if rewards.shape != idx.shape or not np.all(np.abs(rewards) == 1.0):
            raise ValueError(f"reward_fn must return one ±1 reward per response (shape {idx.shape}), got {rewards[:8]!r}")
        return rewards

    @torch.no_grad()
    def measure_success_rate(self, prompts: Sequence[Prompt], n: int, seed: int) -> np.ndarray:
        """The current policy's success rate on each prompt from `n` fresh rollouts (oracle prior)."""
        batch = self._generate(prompts, n, seed)
        rewards = self._score(prompts, batch)
        idx = np.asarray(batch.prompt_index, dtype=np.int64)
        counts, sums = group_reward_stats(rewards, idx, len(prompts))
        self.oracle_rollouts += int(counts.sum())
        return (sums / np.maximum(counts, 1) + 1.0) / 2.0

    # ------------------------------------------------------------------ one step's rollouts
    def _collect(self, step: int) -> dict[str, Any]:
        """Generate this step's rollouts according to the algorithm. Returns prompts, chunks, priors, stats."""
        cfg = self.cfg
        B = cfg.batch_prompts
        t_prior = t_alloc = 0.0
        t0 = time.perf_counter()
        info: dict[str, Any] = {"osla_rounds": 0, "dapo_tries": 0, "generated": 0}
        if cfg.algorithm == "dapo":
            prompts: list[Prompt] = []
            chunks: list[Chunk] = []
            zero_var = n_groups = 0
            for attempt in range(cfg.dapo_max_tries):
                info["dapo_tries"] = attempt + 1
                cand = [self.train_prompts[i] for i in self.sampler.take(B)]
                batch = self._generate(cand, cfg.group_size, derive_seed(cfg.seed, step, attempt))
                rewards = self._score(cand, batch)
                idx = np.asarray(batch.prompt_index, dtype=np.int64)
                info["generated"] += len(rewards)
                self._record(step, cand, batch, rewards)
                counts, sums = group_reward_stats(rewards, idx, len(cand))
                sq = np.bincount(idx, weights=rewards**2, minlength=len(cand))
                var = sq / np.maximum(counts, 1) - (sums / np.maximum(counts, 1)) ** 2  # [B]
                keep = np.flatnonzero(var > 1e-12)
                n_groups += len(cand)
                zero_var += len(cand) - len(keep)
                keep = keep[: B - len(prompts)]
                if len(keep):
                    remap = np.full(len(cand), -1, dtype=np.int64)
                    remap[keep] = np.arange(len(keep)) + len(prompts)
                    rows = np.flatnonzero(remap[idx] >= 0)
                    chunks.append(Chunk(batch.select(rows), remap[idx[rows]], rewards[rows]))
                    prompts.extend(cand[i] for i in keep)
                if len(prompts) >= B:
                    break
            info["zero_var"] = zero_var / max(n_groups, 1)
            priors = np.full(len(prompts), np.nan)
        else:
            prompts = [self.train_prompts[i] for i in self.sampler.take(B)]
            priors = np.full(B, np.nan)
            if cfg.algorithm in ("v05", "v05-fixed"):
                tp = time.perf_counter()
                priors = check_priors(self.prior_source.priors(prompts), B, cfg.prior)
                t_prior = time.perf_counter() - tp
            k0 = cfg.group_k
            t_gen0 = time.perf_counter()
            batch = self._generate(prompts, k0, derive_seed(cfg.seed, step, 0))
            rewards = self._score(prompts, batch)
            idx = np.asarray(batch.prompt_index, dtype=np.int64)
            self._record(step, prompts, batch, rewards)
            chunks = [Chunk(batch, idx, rewards)]
            info["generated"] += len(rewards)
            t_gen = time.perf_counter() - t_gen0
            if cfg.algorithm == "v05":
                allocation = _allocation()
                osla = self._osla_config()
                counts, sums = group_reward_stats(rewards, idx, B)
                max_rounds = max(1, math.ceil((osla.cap - cfg.k_init) / cfg.osla_step) + 1)  # safety bound
                for rnd in range(1, max_rounds + 1):
                    ta = time.perf_counter()
                    extra = np.asarray(allocation.plan_round(counts, sums, priors, osla), dtype=np.int64)  # [B]
                    t_alloc += time.perf_counter() - ta
                    if extra.sum() <= 0:
                        break
                    info["osla_rounds"] = rnd
                    sel = np.flatnonzero(extra > 0)
                    sub = [prompts[i] for i in sel]
                    tg = time.perf_counter()
                    b = self._generate(sub, extra[sel].tolist(), derive_seed(cfg.seed, step, rnd))
                    r = self._score(sub, b)
                    t_gen += time.perf_counter() - tg
                    g = sel[np.asarray(b.prompt_index, dtype=np.int64)]
                    self._record(step, sub, b, r)
                    chunks.append(Chunk(b, g, r))
                    info["generated"] += len(r)
                    c2, s2 = group_reward_stats(r, g, B)
                    counts, sums = counts + c2, sums + s2
            all_r = np.concatenate([c.rewards for c in chunks])
            all_g = np.concatenate([c.group for c in chunks])
            counts, sums = group_reward_stats(all_r, all_g, B)
            sq = np.bincount(all_g, weights=all_r**2, minlength=B)
            var = sq / np.maximum(counts, 1) - (sums / np.maximum(counts, 1)) ** 2
            info["zero_var"] = float(np.mean(var <= 1e-12))
            info["t_generate_only"] = t_gen
        info["t_collect"] = time.perf_counter() - t0
        info.update(prompts=prompts, chunks=chunks, priors=priors, t_prior=t_prior, t_alloc=t_alloc)
        return info

    def _osla_config(self):
        cfg = self.cfg
        kwargs = dict(k_init=cfg.k_init, step=cfg.osla_step, c=cfg.osla_c, halt_fraction=cfg.halt_fraction,
                      pad_multiple=cfg.pad_multiple, method=cfg.fusion_method, no_prior=cfg.osla_no_prior)
        if cfg.osla_k_max is not None:
            kwargs["k_max"] = cfg.osla_k_max
        return _allocation().OslaConfig(**kwargs)

    # ------------------------------------------------------------------ advantages
    def _advantages(self, rewards: np.ndarray, group: np.ndarray, priors: np.ndarray, n_groups: int) -> tuple[np.ndarray, dict[str, float]]:
        """Per-row advantages and fusion statistics. Shapes: rewards, group (N,), priors (G,) -> (N,)."""
        cfg = self.cfg
        est = _estimators()
        stats = {"prior_reject": float("nan"), "w_mean": 1.0, "prior_missing": float("nan")}
        if cfg.algorithm in ("grpo", "dapo"):
            adv = est.grpo_advantages(rewards, group, eps=cfg.grpo_eps, norm_by_std=True)
            return np.asarray(adv, dtype=np.float64), stats
        adv = est.v05_advantages(rewards, group, prior=priors, method=cfg.fusion_method)
        gs = est.v05_group_stats(rewards, group, prior=priors, method=cfg.fusion_method)
        w, delta2 = np.asarray(gs.w, dtype=np.float64), np.asarray(gs.delta2, dtype=np.float64)
        has = ~np.isnan(priors)
        stats["prior_missing"] = float(np.mean(~has))
        stats["prior_reject"] = float(np.mean(delta2[has] > 0)) if has.any() else float("nan")
        stats["w_mean"] = float(np.mean(w))
        return np.asarray(adv, dtype=np.float64), stats

    # ------------------------------------------------------------------ update
    def _update(self, chunks: Sequence[Chunk], adv: np.ndarray, step: int) -> dict[str, float]:
        """PPO-clip update over all rows of all chunks (Eq. 10); returns token-averaged metrics."""
        cfg = self.cfg
        model = self.model
        token_stats = _rollout().sequence_logprobs_and_entropy
        clip_hi = cfg.resolved_clip_high
        n_rows = sum(len(c) for c in chunks)
        offsets = np.cumsum([0] + [len(c) for c in chunks])  # chunk j holds global rows offsets[j]:offsets[j+1]
        all_group = torch.as_tensor(np.concatenate([c.group for c in chunks]))  # [N]
        group_counts = torch.bincount(all_group).to(torch.float64)  # [G]
        lengths = torch.cat([c.batch.response_mask.sum(-1).cpu() for c in chunks]).to(torch.float64)  # [N]
        row_scale = row_weights(all_group, group_counts, lengths, cfg.resolved_loss_agg)  # [N]
        adv_t = torch.as_tensor(adv, dtype=torch.float32)  # [N]
        on_policy = cfg.ppo_epochs == 1 and cfg.n_minibatches == 1

        def micro(rows: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
            """(sub-batch, global row ids) in micro-batches, one chunk at a time."""
            chunk_of = np.searchsorted(offsets, rows, side="right") - 1
            for ci in np.unique(chunk_of):
                g = rows[chunk_of == ci]
                for s in range(0, len(g), cfg.micro_batch_size):
                    gg = g[s : s + cfg.micro_batch_size]
                    yield chunks[ci].batch.select(gg - offsets[ci]), gg

        # log-probs of the old (sampling) policy and of the reference, once per step, without grad
        old_lp: dict[int, torch.Tensor] = {}
        ref_lp: dict[int, torch.Tensor] = {}
        if not on_policy or self.ref_model is not None:
            model.eval()
            with torch.no_grad():
                for sub, glob in micro(np.arange(n_rows)):
                    for store, net in ((old_lp, None if on_policy else model), (ref_lp, self.ref_model)):
                        if net is None:
                            continue
                        lp = token_stats(net, sub, cfg.temperature).logprobs  # [n, R]
                        store.update({int(g): lp[j] for j, g in enumerate(glob)})

        model.train()
        sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_frac": 0.0, "tokens": 0.0}
        grad_norms = []
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, step, 0xB47C))
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(n_rows, generator=gen).numpy() if cfg.n_minibatches > 1 else np.arange(n_rows)
            for mb in np.array_split(order, cfg.n_minibatches):
                if len(mb) == 0:
                    continue
                mb = np.sort(mb)
                mb_t = torch.as_tensor(mb)
                denom = max(float((row_scale[mb_t] * lengths[mb_t]).sum()), 1e-12)  # Σ token weights
                self.optimizer.zero_grad(set_to_none=True)
                for sub, glob in micro(mb):
                    glob_t = torch.as_tensor(glob)
                    ts = token_stats(model, sub, cfg.temperature)
                    logp, ent = ts.logprobs, ts.entropy  # [n, R]
                    mask = sub.response_mask.to(logp.dtype)  # [n, R]
                    old = logp.detach() if on_policy else torch.stack([old_lp[int(g)] for g in glob])
                    pg, clipped = ppo_clip_loss(logp, old, adv_t[glob_t].to(logp.device), cfg.clip_low, clip_hi)
                    loss_tok = pg  # [n, R]
                    kl = None
                    if self.ref_model is not None:
                        kl = k3_kl(logp, torch.stack([ref_lp[int(g)] for g in glob]))  # [n, R]
                        loss_tok = loss_tok + self.kl_coef * kl
                    if cfg.entropy_coef:
                        loss_tok = loss_tok - cfg.entropy_coef * ent
                    wt = mask * row_scale[glob_t].to(device=mask.device, dtype=mask.dtype)[:, None]  # [n, R]
                    ((loss_tok * wt).sum() / denom).backward()
                    sums["tokens"] += float(mask.sum())
                    sums["pg_loss"] += float((pg.detach() * mask).sum())
                    sums["entropy"] += float((ent.detach() * mask).sum())
                    sums["clip_frac"] += float((clipped * mask).sum())
                    if kl is not None:
                        sums["kl"] += float((kl.detach() * mask).sum())
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
                self.optimizer.step()
        self.scheduler.step()
        model.eval()
        tok = max(sums["tokens"], 1.0)
        return {
            "pg_loss": sums["pg_loss"] / tok,
            "kl": sums["kl"] / tok,
            "entropy": sums["entropy"] / tok,
            "clip_frac": sums["clip_frac"] / tok,
            "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "response_len": float(lengths.mean()) if n_rows else float("nan"),
        }

    # ------------------------------------------------------------------ store
    def _record(self, step, prompts, batch, rewards) -> None:
        """Queue one generation call's rollouts for the store (written once per step by `_flush_store`)."""
        if self.store is None or self.run_id is None:
            return
        idx = np.asarray(batch.prompt_index, dtype=np.int64)
        n_tokens = np.asarray(getattr(batch, "n_tokens", np.zeros(len(idx))), dtype=np.int64).reshape(-1)
        table = {
            "step": [int(step)] * len(idx),
            "prompt_id": [int(prompts[i].prompt_id) for i in idx],
            "response": [str(r) for r in batch.responses],
            "reward": [int(r) for r in rewards],
            "n_tokens": n_tokens.tolist(),
            "finish_reason": _finish_reasons(batch, len(idx)),
        }
        self._pending.append(table)

    def _flush_store(self, step: int) -> None:
        if self.store is None or self.run_id is None or not self._pending:
            self._pending = []
            return
        merged: dict[str, list] = {}
        for t in self._pending:
            for key, col in t.items():
                merged.setdefault(key, []).extend(col)
        # no sample_idx: the store numbers each (step, prompt)'s rollouts in input order, i.e. over all
        # OSLA rounds / DAPO tries of the step
        self.store.append_rollouts(self.run_id, merged)
        self._pending = []

    def _start_store_run(self) -> None:
        """Register (or, resuming, re-open) the run in the store; rows of re-run steps replace old ones."""
        if self.store is None:
            return
        self.store.add_prompts(self.train_prompts)
        self.run_id = self.store.start_run(self.store_model, self.policy_path, self.cfg.algorithm, self.cfg.resolved(),
                                           run_id=self.run_id or self.cfg.store_run_id)

    # ------------------------------------------------------------------ logging
    def _log(self, record: Mapping[str, Any]) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.history.append(dict(record))
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._extra_logger is not None:
            self._extra_logger.log(record)

    def evaluate(self) -> dict[str, Any] | None:
        if self.evaluate_fn is None or not self.eval_prompts:
            return None
        t0 = time.perf_counter()
        res = dict(self.evaluate_fn(self.model, self.eval_prompts))
        rec = {"kind": "eval", "step": self.step, "rollouts_used": self.rollouts_used, **res,
               "t_eval": time.perf_counter() - t0}
        self._log(rec)
        return rec

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepStats:
        cfg = self.cfg
        t0 = time.perf_counter()
        self._pending = []
        oracle_before = self.oracle_rollouts
        self.model.eval()
        info = self._collect(self.step)
        prompts, chunks, priors = info["prompts"], info["chunks"], info["priors"]
        self.rollouts_used += info["generated"]
        n_groups = len(prompts)
        t_alloc = info["t_alloc"]
        adv_stats = {"prior_reject": float("nan"), "w_mean": float("nan"), "prior_missing": float("nan")}
        upd = {"pg_loss": float("nan"), "kl": float("nan"), "entropy": float("nan"), "clip_frac": float("nan"),
               "grad_norm": float("nan"), "response_len": float("nan")}
        t_update = 0.0
        rewards = np.concatenate([c.rewards for c in chunks]) if chunks else np.zeros(0)
        group = np.concatenate([c.group for c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
        counts = np.bincount(group, minlength=n_groups) if n_groups else np.zeros(0, dtype=np.int64)
        if n_groups:
            ta = time.perf_counter()
            adv, adv_stats = self._advantages(rewards, group, priors, n_groups)
            t_alloc += time.perf_counter() - ta
            # feed the support buffer after the priors of this step were drawn (no leakage)
            sums = np.bincount(group, weights=rewards, minlength=n_groups)
            self.prior_source.observe([p.prompt_id for p in prompts], (sums / np.maximum(counts, 1) + 1.0) / 2.0)
            tu = time.perf_counter()
            upd = self._update(chunks, adv, self.step)
            t_update = time.perf_counter() - tu
        else:
            self.scheduler.step()
        prior_err = float("nan")
        truth = getattr(self.prior_source, "last_truth", None)
        if truth is not None and cfg.algorithm in ("v05", "v05-fixed") and len(truth) == len(priors):
            prior_err = float(np.nanmean(np.abs(priors - truth)))
        self._flush_store(self.step)
        self.step += 1
        t_prior = info["t_prior"]
        t_generate = info.get("t_generate_only", info["t_collect"] - t_prior - info["t_alloc"])
        stats = StepStats(
            step=self.step,
            rollouts=info["generated"],
            rollouts_used=self.rollouts_used,
            oracle_rollouts=self.oracle_rollouts - oracle_before,
            prompts=n_groups,
            reward=float(rewards.mean()) if len(rewards) else float("nan"),
            accuracy=float((rewards > 0).mean()) if len(rewards) else float("nan"),
            k_mean=float(counts.mean()) if n_groups else float("nan"),
            k_max=int(counts.max()) if n_groups else 0,
            k_hist={str(int(k)): int(c) for k, c in zip(*np.unique(np.asarray(counts), return_counts=True))},
            osla_rounds=info["osla_rounds"],
            prior_reject=adv_stats["prior_reject"],
            prior_missing=adv_stats["prior_missing"],
            w_mean=adv_stats["w_mean"],
            prior_abs_err=prior_err,
            zero_var_groups=float(info.get("zero_var", float("nan"))),
            dapo_tries=info["dapo_tries"],
            pg_loss=upd["pg_loss"],
            kl=upd["kl"],
            entropy=upd["entropy"],
            clip_frac=upd["clip_frac"],
            grad_norm=upd["grad_norm"],
            lr=float(self.optimizer.param_groups[0]["lr"]),
            response_len=upd["response_len"],
            t_generate=t_generate,
            t_prior=t_prior,
            t_alloc=t_alloc,
            t_update=t_update,
            t_step=time.perf_counter() - t0,
        )
        self.train_seconds += stats.t_step
        self._log(stats.as_dict())
        return stats

    # ------------------------------------------------------------------ the loop
    def done(self) -> bool:
        """Stop at `steps`, at `rollout_budget` generated rollouts, or after `max_minutes` of training steps."""
        cfg = self.cfg
        if self.step >= cfg.steps:
            return True
        if cfg.rollout_budget is not None and self.rollouts_used >= cfg.rollout_budget:
            return True
        return cfg.max_minutes is not None and self.train_seconds >= 60.0 * cfg.max_minutes

    def train(self, on_step: Callable[[StepStats], None] | None = None) -> list[dict[str, Any]]:
        """Run until `steps` or `rollout_budget`; evaluates, checkpoints and logs along the way.

        `on_step` is called with each step's statistics (e.g. an outer progress bar)."""
        cfg = self.cfg
        self._pending = []
        self._start_store_run()
        self._extra_logger = make_logger(cfg.logger, self.out, cfg.resolved())
        if self.step == 0:
            self.evaluate()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algorithm}", unit="step", dynamic_ncols=True)
        try:
            while not self.done():
                s = self.train_step()
                if on_step is not None:
                    on_step(s)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(acc=f"{s.accuracy:.3f}", k=f"{s.k_mean:.1f}", used=s.rollouts_used, t=f"{s.t_step:.2f}s")
                last = self.done()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    self.evaluate()
                if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                    if last:
                        self.evaluate()
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if self._extra_logger is not None:
                self._extra_logger.close()
        if self.store is not None and self.run_id is not None and hasattr(self.store, "finish_run"):
            self.store.finish_run(self.run_id)
        return self.history

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": asdict(self.cfg),
            "step": self.step,
            "rollouts_used": self.rollouts_used,
            "oracle_rollouts": self.oracle_rollouts,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "prior": self.prior_source.state_dict(),
            "run_id": self.run_id,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_checkpoint(self) -> Path:
        ckpt_dir = self.out / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{self.step:07d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        (ckpt_dir / "latest").write_text(path.name)
        kept = sorted(ckpt_dir.glob("step_*.pt"))
        for old in kept[: max(0, len(kept) - max(1, self.cfg.keep_checkpoints))]:
            old.unlink()
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        """Restore the latest (or the given) checkpoint; returns False when there is none."""
        ckpt_dir = self.out / "checkpoints"
        if path is None:
            latest = ckpt_dir / "latest"
            if not latest.exists():
                return False
            path = ckpt_dir / latest.read_text().strip()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist; remove {ckpt_dir / 'latest'} or pass a valid path")
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = dict(state["config"])
        now = asdict(self.cfg)
        differ = [k for k in now if k not in _RESUME_MAY_CHANGE
                  and _norm(saved.get(k)) != _norm(now[k])]
        if differ:
            raise ValueError(
                f"checkpoint {path} was written with a different config ({', '.join(differ)}); "
                "resume with the same settings or start a new --out"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.prior_source.load_state_dict(state["prior"])
        self.step = int(state["step"])
        self.rollouts_used = int(state["rollouts_used"])
        self.oracle_rollouts = int(state["oracle_rollouts"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.run_id = state.get("run_id")
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint so the resumed log reads as one run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= self.step:
                keep.append(line)
        path.write_text("".join(x + "\n" for x in keep))
        self.history = [json.loads(x) for x in keep]

    def save_policy(self, path: str | Path, tokenizer: Any = None) -> Path:
        """Write the current policy with `save_pretrained` (loadable by `AutoModelForCausalLM`)."""
        path = Path(path)
        self.model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path


_RESUME_MAY_CHANGE = ("steps", "rollout_budget", "max_minutes", "eval_every", "save_every", "keep_checkpoints", "logger", "device")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


# ====================================================================================== extra loggers


class _Logger:
    def log(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


class _WandbLogger(_Logger):
    def __init__(self, out: Path, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("--logger wandb needs the wandb package: pip install wandb") from None
        self._wandb = wandb
        self.run = wandb.init(project="v05", dir=str(out), config=dict(config))

    def log(self, record):
        data = {f"{record.get('kind', 'train')}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
        self.run.log(data, step=int(record.get("step", 0)))

    def close(self):
        self.run.finish()


class _TensorboardLogger(_Logger):
    def __init__(self, out: Path, config: Mapping[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("--logger tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", json.dumps(dict(config), indent=1, default=str))

    def log(self, record):
        step = int(record.get("step", 0))
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and k != "step":
                self.writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self):
        self.writer.close()


def make_logger(name: str, out: Path, config: Mapping[str, Any]) -> _Logger | None:
    """The optional extra logger (`none`, `wandb`, `tensorboard`), imported only when asked for."""
    if name == "none":
        return None
    if name == "wandb":
        return _WandbLogger(out, config)
    if name == "tensorboard":
        return _TensorboardLogger(out, config)
    raise ValueError(f"logger {name!r} unknown; use one of {', '.join(LOGGERS)}")


# ====================================================================================== assembly


def load_task_prompts(source: str, path: str | None, split: str) -> list[Prompt]:
    """Prompts of `split` from task source `source` (v0_data.tasks registry)."""
    from v0_data.tasks import get_source

    prompts = get_source(source)().load(path, split=split)
    if not prompts:
        raise ValueError(f"task source {source!r} (path {path!r}) has no prompts in split {split!r}")
    return prompts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_trainer(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    backend_name: str = "hf",
    store: Any = None,
    progress: bool = True,
) -> tuple[Trainer, Any]:
    """Assemble a trainer from the config: policy, reference, backend, tasks, prior, evaluation, store.

    Returns (trainer, tokenizer).
    """
    policies = importlib.import_module("v05_rl.policies")
    rollout = _rollout()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer = policies.load_policy(cfg.policy, device)
    ref_model = None
    if cfg.resolved_kl_coef > 0:
        ref_model, _ = policies.load_policy(cfg.policy, device)
    backend = rollout.get_backend(backend_name, model, tokenizer)
    train_prompts = load_task_prompts(cfg.tasks, cfg.tasks_path, cfg.train_split)
    eval_prompts: list[Prompt] = []
    evaluate_fn = None
    if cfg.eval_prompts > 0:
        eval_prompts = load_task_prompts(cfg.tasks, cfg.tasks_path, cfg.eval_split)[: cfg.eval_prompts]
        evaluate_fn = make_evaluate_fn(cfg, tokenizer, backend)

    owns_store = False
    if store is None and cfg.store:
        from v0_data.store import TrajectoryStore

        store = TrajectoryStore.open(cfg.store)
        owns_store = True
    trainer = Trainer(
        cfg,
        model=model,
        backend=backend,
        train_prompts=train_prompts,
        out_dir=out_dir,
        ref_model=ref_model,
        eval_prompts=eval_prompts,
        evaluate_fn=evaluate_fn,
        store=store,
        progress=progress,
    )
    trainer.owns_store = owns_store
    return trainer, tokenizer


def make_evaluate_fn(cfg: TrainConfig, tokenizer: Any, backend: Any = None) -> Callable[[torch.nn.Module, Sequence[Prompt]], dict]:
    """mean@k on held-out prompts with `v05_rl.evaluate.evaluate_policy` (paper: T = 1.0, top-p 0.7, k = 16).

    Seeded with the run seed, so every evaluation of a run sees the same sampling noise stream.
    """
    from v0_data.rewards import score_one

    ev = importlib.import_module("v05_rl.evaluate")
    sampling = make_sampling(cfg.max_new_tokens, cfg.eval_temperature, cfg.eval_top_p)

    def evaluate_fn(model: torch.nn.Module, prompts: Sequence[Prompt]) -> dict[str, Any]:
        datasets = {p.dataset for p in prompts}
        dataset = max(datasets, key=lambda d: sum(p.dataset == d for p in prompts))

        def reward(response: str, answer: Any) -> int:
            return score_one(dataset, response, answer).reward

        res = ev.evaluate_policy(model, tokenizer, prompts, reward, cfg.eval_k, sampling, backend=backend,
                                 seed=derive_seed(cfg.seed, 0xE7A1))
        res.pop("per_prompt", None)
        res["per_level"] = {str(k): v for k, v in res.get("per_level", {}).items()}
        return res

    return evaluate_fn


def run_training(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, backend_name: str = "hf",
                 progress: bool = True, on_step: Callable[[StepStats], None] | None = None) -> Trainer:
    """Build, optionally resume, train, and write `config.json` and the final policy under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "checkpoints" / "latest").exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    (out / "config.json").write_text(json.dumps(cfg.resolved(), indent=2, default=str))
    trainer, tokenizer = build_trainer(cfg, out, backend_name=backend_name, progress=progress)
    try:
        resumed = trainer.load_checkpoint() if resume else False
        if not resumed and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # a fresh start: no log lines of an earlier attempt
        trainer.train(on_step=on_step)
        trainer.save_policy(out / "policy", tokenizer)
    finally:
        if trainer.owns_store:
            trainer.store.close()
    return trainer


__all__ = [
    "ALGORITHMS",
    "ALGORITHM_TABLE",
    "LOSS_AGGS",
    "TrainConfig",
    "StepStats",
    "Chunk",
    "Trainer",
    "PromptSampler",
    "build_trainer",
    "run_training",
    "row_weights",
    "ppo_clip_loss",
    "k3_kl",
    "derive_seed",
    "group_reward_stats",
    "default_reward_fn",
    "config_help",
    "load_task_prompts",
]
