"""Every setting of an embedded (single-machine) RL run, each default defined once.

`TrainConfig` holds what a run is (algorithm, policy, tasks, budget, bookkeeping) and nests the settings
that belong to one component, each a frozen dataclass owned by that component:

    osla:           `v05_rl.allocation.OslaConfig`   OSLA planner and fusion method (Eq. 6-12)
    prior_options:  `v05_rl.priors.PriorOptions`     support buffer, oracle noise, V0 checkpoint
    optim:          `OptimConfig`                    AdamW, PPO-clip, KL, loss aggregation
    sampling:       `v05_rl.rollout.SamplingConfig`  training rollouts
    evaluation:     `EvalConfig`                     held-out mean@k

YAML and `--set` use the nested form (`osla: {k_init: 4}`, `--set osla.no_prior=k_init`); the flat keys of
earlier versions (`k_init`, `lr`, `eval_every`, ...) are still read through `LEGACY_KEYS`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, NamedTuple

from v05_rl.allocation import OslaConfig
from v05_rl.estimators import ESTIMATORS
from v05_rl.priors import PRIOR_SOURCES, PriorOptions
from v05_rl.rollout import SamplingConfig

ALGORITHMS = ("grpo", "dapo", "v05", "v05-fixed")
from v05_rl.losses import LOSS_AGGS
LOGGERS = ("none", "wandb", "tensorboard")


class AlgorithmDefaults(NamedTuple):
    """Per-algorithm settings used when the corresponding config field is left at None."""

    estimator: str  # `v05_rl.estimators.ESTIMATORS` name
    loss_agg: str
    kl_coef: float
    clip_high: float | None  # None: same as clip_low


ALGORITHM_TABLE: dict[str, AlgorithmDefaults] = {
    "grpo": AlgorithmDefaults("grpo", "seq-mean-token-mean", 0.001, None),
    "dapo": AlgorithmDefaults("grpo", "token-mean", 0.0, 0.28),
    "v05": AlgorithmDefaults("v05", "prompt-mean", 0.0, None),
    "v05-fixed": AlgorithmDefaults("v05", "prompt-mean", 0.0, None),
}


def _h(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


def _positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 1, got {getattr(obj, name)}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and policy loss (Eq. 10). Defaults are the paper's (§4.1.4) where it gives one."""

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

    def __post_init__(self) -> None:
        _positive(self, ("ppo_epochs", "n_minibatches", "micro_batch_size"))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"OptimConfig.lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.clip_low < 1.0:
            raise ValueError(f"OptimConfig.clip_low must be in (0, 1), got {self.clip_low}")
        if self.clip_high is not None and not self.clip_high > 0.0:
            raise ValueError(f"OptimConfig.clip_high must be > 0 or None, got {self.clip_high}")
        if self.kl_coef is not None and self.kl_coef < 0:
            raise ValueError(f"OptimConfig.kl_coef must be >= 0 or None, got {self.kl_coef}")
        if self.loss_agg is not None and self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"OptimConfig.loss_agg {self.loss_agg!r} unknown; use one of {', '.join(LOSS_AGGS)} or leave it unset")
        if self.grad_clip <= 0:
            raise ValueError(f"OptimConfig.grad_clip must be > 0, got {self.grad_clip}")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"OptimConfig.betas must be two numbers, got {self.betas!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: mean@k on the first `prompts` prompts of the evaluation split."""

    every: int = _h("evaluate every N steps (0 = only before and after training)", default=10)
    prompts: int = _h("held-out prompts used for evaluation (first N of the split)", default=256)
    k: int = _h("samples per held-out prompt for mean@k (paper: 16)", default=16)
    temperature: float = _h("evaluation temperature (paper: 1.0)", default=1.0)
    top_p: float = _h("evaluation top-p (paper: 0.7)", default=0.7)

    def __post_init__(self) -> None:
        _positive(self, ("k",))
        for name in ("every", "prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"EvalConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"EvalConfig.top_p must be in (0, 1], got {self.top_p}")


def _paper_sampling() -> SamplingConfig:
    return SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=4096)  # paper: responses up to 4096 tokens


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
    train_prompts: int | None = _h("train on the first N prompts of the training split only (None = all); a small pool "
                                   "makes prompts recur (the multi-epoch regime)", default=None)
    # compute
    rollouts_per_step: int = _h("prompt batch × rollouts per prompt (paper: 512 × 16); sets the prompt batch", default=8192)
    prompt_batch: int | None = _h("prompts per step; None = rollouts_per_step // group size", default=None)
    group_size: int = _h("G: rollouts per prompt for grpo / dapo (paper: 16)", default=16)
    k: int = _h("rollouts per prompt for v05-fixed (paper: 1, 2, 4 or 8)", default=4)
    steps: int = _h("training steps (the run also stops at rollout_budget when set)", default=100)
    rollout_budget: int | None = _h("stop once this many rollouts were generated (every rollout counts)", default=None)
    max_minutes: float | None = _h("stop once the training steps (not evaluation) took this many wall-clock minutes", default=None)
    # V0.5
    estimator: str | None = _h("advantage estimator (v05_rl.estimators registry); None = algorithm default "
                               "(grpo for grpo/dapo, v05 for v05/v05-fixed)", default=None)
    prior: str = _h("prior source (v05_rl.priors registry): none, oracle-noise (experimental upper bound), v0, "
                    "history (the prompt's own earlier rollouts), v0+history", default="none")
    prior_options: PriorOptions = _h("support buffer, oracle noise, V0 checkpoint", default_factory=PriorOptions)
    osla: OslaConfig = _h("v05: OSLA planner and fusion method", default_factory=OslaConfig)
    dapo_max_tries: int = _h("dapo: generation tries per step to fill the batch with non-zero-variance groups", default=3)
    # optimisation, sampling, evaluation
    optim: OptimConfig = _h("optimizer and PPO-clip loss", default_factory=OptimConfig)
    sampling: SamplingConfig = _h("sampling of training rollouts", default_factory=_paper_sampling)
    evaluation: EvalConfig = _h("held-out evaluation", default_factory=EvalConfig)
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
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise ValueError(f"TrainConfig.estimator {self.estimator!r} unknown; use one of {', '.join(ESTIMATORS.names())}")
        if self.algorithm in ("grpo", "dapo") and self.prior != "none":
            raise ValueError(f"TrainConfig.prior={self.prior!r} has no effect with algorithm {self.algorithm!r}; set prior: none or algorithm: v05")
        if self.prior in ("v0", "v0+history") and not self.prior_options.v0_checkpoint:
            raise ValueError(f"TrainConfig.prior={self.prior!r} needs prior_options.v0_checkpoint (path of a `v05 pretrain-v0` checkpoint)")
        if self.algorithm == "dapo" and self.group_size < 2:
            raise ValueError("dapo needs group_size >= 2 (zero-variance filtering is meaningless with one rollout)")
        _positive(self, ("rollouts_per_step", "group_size", "k", "steps", "dapo_max_tries"))
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig.max_minutes must be > 0 or None, got {self.max_minutes}")
        for name in ("prompt_batch", "rollout_budget", "train_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value}")
        if self.group_k > self.rollouts_per_step and self.prompt_batch is None:
            raise ValueError(
                f"rollouts_per_step={self.rollouts_per_step} is smaller than {self.group_k} rollouts per prompt; "
                "raise rollouts_per_step or set prompt_batch"
            )
        for name in ("save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.logger not in LOGGERS:
            raise ValueError(f"TrainConfig.logger {self.logger!r} unknown; use one of {', '.join(LOGGERS)}")
        po = self.prior_options
        if po.noise_std < 0 or not 0.0 <= po.flip_fraction <= 1.0:
            raise ValueError("TrainConfig.prior_options: noise_std must be >= 0 and flip_fraction in [0, 1]")
        _positive(po, ("support_capacity", "support_size", "oracle_rollouts"))
        if self.sampling.temperature <= 0:
            raise ValueError("TrainConfig.sampling.temperature must be > 0 for training rollouts")

    # ------------------------------------------------------------------ derived settings
    @property
    def group_k(self) -> int:
        """Rollouts per prompt before any OSLA round: G, k or k_init."""
        return {"grpo": self.group_size, "dapo": self.group_size, "v05": self.osla.k_init, "v05-fixed": self.k}[self.algorithm]

    @property
    def batch_prompts(self) -> int:
        """Prompts per step: explicit `prompt_batch`, else rollouts_per_step // group_k (compute matching)."""
        return self.prompt_batch if self.prompt_batch is not None else self.rollouts_per_step // self.group_k

    @property
    def uses_prior(self) -> bool:
        return self.algorithm in ("v05", "v05-fixed")

    @property
    def resolved_estimator(self) -> str:
        return self.estimator or ALGORITHM_TABLE[self.algorithm].estimator

    @property
    def resolved_loss_agg(self) -> str:
        return self.optim.loss_agg or ALGORITHM_TABLE[self.algorithm].loss_agg

    @property
    def resolved_kl_coef(self) -> float:
        return ALGORITHM_TABLE[self.algorithm].kl_coef if self.optim.kl_coef is None else self.optim.kl_coef

    @property
    def resolved_clip_high(self) -> float:
        if self.optim.clip_high is not None:
            return self.optim.clip_high
        default = ALGORITHM_TABLE[self.algorithm].clip_high
        return self.optim.clip_low if default is None else default

    def resolved_prior_options(self) -> PriorOptions:
        """The prior options with the run's seed filled in (`prior_options.seed: None`)."""
        po = self.prior_options
        return po if po.seed is not None else dataclasses.replace(po, seed=self.seed)

    def resolved(self) -> dict[str, Any]:
        """`asdict(cfg)` plus the derived values actually used (what is written next to a run)."""
        out = asdict(self)
        out["resolved"] = {
            "prompt_batch": self.batch_prompts,
            "group_k": self.group_k,
            "estimator": self.resolved_estimator,
            "loss_agg": self.resolved_loss_agg,
            "kl_coef": self.resolved_kl_coef,
            "clip_high": self.resolved_clip_high,
        }
        return out


def _legacy_keys() -> dict[str, str]:
    """Flat keys of earlier versions -> dotted path in the nested config."""
    out = {f"osla_{n}": f"osla.{n}" for n in ("step", "c", "k_max", "no_prior")}
    out.update({"k_init": "osla.k_init", "halt_fraction": "osla.halt_fraction", "pad_multiple": "osla.pad_multiple",
                "fusion_method": "osla.method"})
    out.update({n: f"prior_options.{n}" for n in ("v0_checkpoint", "support_capacity", "support_size", "oracle_rollouts")})
    out.update({"prior_noise_std": "prior_options.noise_std", "prior_flip_fraction": "prior_options.flip_fraction"})
    out.update({f.name: f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)})
    out.update({f.name: f"sampling.{f.name}" for f in dataclasses.fields(SamplingConfig)})
    out.update({f"eval_{f.name}": f"evaluation.{f.name}" for f in dataclasses.fields(EvalConfig)})
    return out


LEGACY_KEYS: dict[str, str] = _legacy_keys()


def with_overrides(cfg: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """`cfg` with settings replaced, given by dotted path (`osla.k_init`) or by legacy flat key (`k_init`).

    No type coercion (the YAML loader in `pipelines.config` checks types); unknown keys raise ValueError.
    """
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        path = LEGACY_KEYS.get(key, key) if key not in names else key
        head, _, rest = path.partition(".")
        if head not in names:
            raise ValueError(f"TrainConfig has no setting {key!r}; valid: {', '.join(sorted(names | set(LEGACY_KEYS)))}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        top[head] = dataclasses.replace(top.get(head, getattr(cfg, head)), **sub)
    return dataclasses.replace(cfg, **top)


def config_help() -> dict[str, str]:
    """Dotted field name -> help text, nested sections included (used by the CLI and the YAML loader)."""
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = f.metadata.get("help", "")

    walk(TrainConfig, "")
    return out


__all__ = [
    "ALGORITHMS",
    "ALGORITHM_TABLE",
    "LEGACY_KEYS",
    "LOGGERS",
    "LOSS_AGGS",
    "EvalConfig",
    "OptimConfig",
    "TrainConfig",
    "config_help",
    "with_overrides",
]
