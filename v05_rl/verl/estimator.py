"""The V0.5 advantage estimator registered in verl as `algorithm.adv_estimator=v05`.

verl's `compute_advantage` (verl 0.9.1, `verl/trainer/ppo/ray_trainer.py`) calls every estimator that is
neither GAE nor GRPO as

    fn(token_level_rewards=[N, L], response_mask=[N, L], config=<algorithm config>,
       index=non_tensor_batch["uid"] (N,), reward_baselines=batch["reward_baselines"] (N,))

the last two only when the batch carries them. V0.5 uses that route unchanged: `RayV05Trainer` writes
the frozen value model's prior V of each row's prompt into `batch["reward_baselines"]` (the same value on
every rollout of a prompt, NaN = no prior), and this function groups rows by `uid` (groups of any size)
and calls the pure `v05_rl.estimators.v05_advantages` (paper Eq. 6-10). No math is repeated here.

Departures and conventions:
- A row whose `response_mask` is all zero is padding added by the trainer so the update splits evenly
  over data-parallel ranks; it belongs to no group and gets advantage 0 (it is never trained on).
- The sequence reward is `token_level_rewards.sum(-1)`, as in verl's GRPO. The estimator needs ±1
  outcome rewards; `reward_map` says how verl's scores become ±1: "pm1" (default: they must already be
  ±1, e.g. verl's `math_dapo` scorer), "01" (scores 0/1 → 2r - 1) or "positive" (r > 0 → +1, else -1;
  for scorers that add shaping terms). Anything else is refused, never clipped silently.
- Options come from `config["v05"]` when the config passed by the trainer has such a mapping
  (`method`, `std_floor`, `reward_map`); otherwise the paper's defaults apply.
- Without `reward_baselines` (e.g. `adv_estimator=v05` with verl's stock trainer) every prior is absent
  and the estimator reduces to (r - v̄_k) / sqrt(1 - v̄_k²) with the documented clamp.

Importing this module registers the estimator; it is imported by `v05_rl.verl.trainer` and by the task
runner in `v05_rl.verl.entry`, i.e. in every Ray process that computes advantages. Registration is
idempotent (verl refuses only a *different* function under the same name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from v05_rl.estimators import DEFAULT_STD_FLOOR, FUSION_METHODS, SAFE_SIGMA_RULE, SIGMA_RULES, v05_advantages
from verl.trainer.ppo.core_algos import register_adv_est

ESTIMATOR_NAME = "v05"
REWARD_MAPS = ("pm1", "01", "positive")


@dataclass(frozen=True)
class EstimatorOptions:
    """Options of the registered estimator, read from the `v05` section of the run's config."""

    method: str = field(default="paper", metadata={"help": "fusion method: paper, bernoulli, empirical-bayes"})
    std_floor: float = field(default=DEFAULT_STD_FLOOR, metadata={"help": "floor on sigma* = sqrt(1 - mu*^2)"})
    sigma_rule: str = field(
        default=SAFE_SIGMA_RULE,
        metadata={"help": "sigma*: noise-bound (floor 1/sqrt(k), fixes the ±1 hazard) or paper (Eq. 10 as printed)"},
    )
    reward_map: str = field(
        default="pm1", metadata={"help": "how verl scores become ±1: pm1 (as is), 01 (2r - 1), positive (r > 0)"}
    )

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(
                f"v05.method: unknown fusion method {self.method!r}; valid: {', '.join(FUSION_METHODS.names())}"
            )
        if self.sigma_rule not in SIGMA_RULES:
            raise ValueError(f"v05.sigma_rule: unknown rule {self.sigma_rule!r}; valid: {', '.join(SIGMA_RULES.names())}")
        if not self.std_floor > 0:
            raise ValueError(f"v05.std_floor: expected a positive floor (default 0.1), got {self.std_floor!r}")
        if self.reward_map not in REWARD_MAPS:
            raise ValueError(f"v05.reward_map: expected one of {', '.join(REWARD_MAPS)}, got {self.reward_map!r}")

    @classmethod
    def from_config(cls, config: Any) -> "EstimatorOptions":
        """Read `config["v05"]` (a mapping or DictConfig) if present; unknown keys there are ignored."""
        section = _get(config, "v05")
        if section is None:
            return cls()
        kw = {name: _get(section, name) for name in ("method", "std_floor", "sigma_rule", "reward_map")}
        return cls(**{k: v for k, v in kw.items() if v is not None})


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    getter = getattr(obj, "get", None)
    if getter is not None:
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - DictConfig in struct mode, dataclass configs
            return getattr(obj, key, None)
    return getattr(obj, key, None)


def scores_to_pm1(scores: torch.Tensor, reward_map: str = "pm1") -> torch.Tensor:
    """Map verl sequence scores to ±1 outcome rewards.  Shape: (N,) → (N,) float.

    Raises ValueError naming the first offending row when the scores do not fit `reward_map`.
    """
    scores = scores.to(torch.float32)
    if reward_map == "pm1":
        bad = (scores != 1) & (scores != -1)
        fix = "set v05.reward_map=01 for 0/1 scores or v05.reward_map=positive for shaped scores"
        out = scores
    elif reward_map == "01":
        bad = (scores != 0) & (scores != 1)
        fix = "set v05.reward_map=pm1 for ±1 scores or v05.reward_map=positive for shaped scores"
        out = 2 * scores - 1
    elif reward_map == "positive":
        bad = ~torch.isfinite(scores)
        fix = "make the reward function return finite numbers"
        out = torch.where(scores > 0, torch.ones_like(scores), -torch.ones_like(scores))
    else:
        raise ValueError(f"reward_map: expected one of {', '.join(REWARD_MAPS)}, got {reward_map!r}")
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"v05 estimator: sequence reward {float(scores[i])!r} at row {i} does not fit "
            f"v05.reward_map={reward_map!r}; {fix}"
        )
    return out


def uid_groups(index: Any, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense group ids 0..G-1 for the kept rows, in order of first appearance.

    Shapes: index (N,) of hashable uids, keep (N,) bool → (group_of_kept_row (n,), first_row_of_group (G,)).
    """
    uids = np.asarray(index, dtype=object)[keep]
    order: dict[Any, int] = {}
    gid = np.fromiter((order.setdefault(u, len(order)) for u in uids), dtype=np.int64, count=uids.shape[0])
    first = np.unique(gid, return_index=True)[1].astype(np.int64)  # ids are 0..G-1, so sorted = by id
    return gid, first


def group_priors(baselines: torch.Tensor, gid: np.ndarray, first: np.ndarray) -> torch.Tensor:
    """The prior of each group from per-row baselines; all rows of a group must agree.

    Shapes: baselines (n,) float (NaN = no prior), gid (n,), first (G,) → (G,).
    """
    g = torch.as_tensor(gid, dtype=torch.long)
    prior = baselines[torch.as_tensor(first, dtype=torch.long)]  # [G]
    per_row = prior[g]  # [n]
    same = (per_row == baselines) | (torch.isnan(per_row) & torch.isnan(baselines))
    if not bool(same.all()):
        i = int(torch.nonzero(~same)[0, 0])
        raise ValueError(
            f"v05 estimator: reward_baselines disagree within one uid group (row {i}: {float(baselines[i])!r} vs "
            f"{float(per_row[i])!r}); every rollout of a prompt must carry that prompt's prior"
        )
    return prior


@register_adv_est(ESTIMATOR_NAME)
def compute_v05_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    reward_baselines: torch.Tensor | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V0.5 advantage for verl (paper Eq. 9-10) with groups of unequal size.

    Shapes: token_level_rewards [N, L], response_mask [N, L], index (N,) uids, reward_baselines (N,)
    (the prior V of each row's prompt, NaN = none) → (advantages [N, L], returns [N, L]), equal, the
    per-sequence advantage broadcast over the response tokens.
    """
    if index is None:
        raise ValueError(
            "v05 estimator: the batch has no 'uid' column; V0.5 groups rollouts by uid (set by the trainer)"
        )
    opts = EstimatorOptions.from_config(config)
    n = token_level_rewards.shape[0]
    with torch.no_grad():
        real = response_mask.sum(dim=-1) > 0  # [N]
        real_np = real.cpu().numpy()
        adv = torch.zeros(n, dtype=torch.float32, device=token_level_rewards.device)  # [N]
        if real_np.any():
            scores = scores_to_pm1(token_level_rewards[real].sum(dim=-1).cpu(), opts.reward_map)  # [n]
            gid, first = uid_groups(index, real_np)
            if reward_baselines is None:
                prior = torch.full((first.shape[0],), float("nan"))
            else:
                prior = group_priors(reward_baselines[real].detach().cpu().to(torch.float32), gid, first)  # [G]
            a = v05_advantages(
                scores, torch.as_tensor(gid), prior=prior, method=opts.method, std_floor=opts.std_floor,
                sigma_rule=opts.sigma_rule,
            )  # [n]
            adv[real.to(adv.device)] = a.to(adv.device, torch.float32)
        out = adv.unsqueeze(-1) * response_mask  # [N, L]
    return out, out


__all__ = [
    "ESTIMATOR_NAME",
    "EstimatorOptions",
    "REWARD_MAPS",
    "compute_v05_outcome_advantage",
    "group_priors",
    "scores_to_pm1",
    "uid_groups",
]
