"""Sequential OSLA rollout allocation (paper §3.4, Eq. 11-12, and the workflow of §4.1.3).

One call of `plan_round` decides the next dispatch for a batch of prompts:
    1. prompts with fewer than k_init rollouts are topped up to k_init (the cold-start round);
    2. otherwise each prompt's fused estimate gives Δ̂² (Eq. 7) and the target
           k_target = 1/sqrt(c) - 1/Δ̂²                                                   (Eq. 12)
       and a prompt "needs more" while Δ̂² > 0 and k < k_target and k < k_max = floor(1/sqrt(c));
    3. the round halts for the whole batch when fewer than halt_fraction (25 %) of its prompts need more;
    4. every prompt that needs more gets `step` (2) more rollouts, never past k_max;
    5. the dispatch is padded up to a multiple of pad_multiple (32); the padding rollouts go, `step` at a
       time, to the prompts that still need most (largest k_target - k after this round, then the largest
       standardized discrepancy (v̄ - V)²·k/ν), never past k_max, so none is wasted.

Where this departs from or extends the paper, and why:
- A prompt without a prior (NaN) is treated as Δ̂² = ∞, i.e. k_target = 1/sqrt(c): with nothing to fuse,
  the planner samples it like GRPO up to the cap (`no_prior="cap"`, the default). That makes a run whose
  prior source has no context yet (the first step) or no prior at all spend the cap on every prompt;
  `no_prior="k_init"` instead stops such prompts at k_init (their baseline is then the plain k_init mean).
- The fusion methods beyond the paper carry their own per-rollout noise ν (1 for "paper"), and the
  target is then the same one-step-look-ahead rule with that noise: k_target = sqrt(ν/c) - ν/Δ̂²
  (Eq. 11-12 are the case ν = 1: the empirical MSE Δ̂²ν/(kΔ̂² + ν) gains more than c from one rollout).
- If every prompt is at the cap, padding cannot be placed without waste and the dispatch stays unpadded.
- The halt rule and the cold start follow §4.1.3; the paper gives no rule for a prompt whose rollouts
  were partly lost, and this planner simply tops it up with the rest of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from v05_rl.estimators import FUSION_METHODS, SAFE_SIGMA_RULE, SIGMA_RULES, fuse, is_torch

Array = Any  # np.ndarray | torch.Tensor


@dataclass(frozen=True)
class OslaConfig:
    """OSLA allocation settings; the defaults are the paper's (§4.1.3).

    `method` and `sigma_rule` also choose how the advantage fuses and scales (`v05_rl.estimators`); the
    planner itself reads only `method` (for Δ̂²).
    """

    k_init: int = field(default=4, metadata={"help": "rollouts every prompt gets first (paper: 4, App. A.8)"})
    step: int = field(default=2, metadata={"help": "rollouts added per round to a prompt that needs more"})
    c: float = field(default=0.0039, metadata={"help": "compute cost per rollout in Eq. 11-12; cap = floor(1/sqrt(c))"})
    k_max: int | None = field(
        default=None, metadata={"help": "cap on rollouts per prompt; None = floor(1/sqrt(c)) (16 at c = 0.0039)"}
    )
    halt_fraction: float = field(
        default=0.25,
        metadata={"help": "halt the round when fewer than this fraction of the batch's prompts need more (0 = never)"},
    )
    pad_multiple: int = field(
        default=32, metadata={"help": "pad each extra dispatch to a multiple of this many rollouts (1 = no padding)"}
    )
    method: str = field(
        default="paper", metadata={"help": "fusion method for Δ̂²: paper, bernoulli or empirical-bayes"}
    )
    sigma_rule: str = field(
        default=SAFE_SIGMA_RULE,  # not the paper's: see the ±1 hazard in v05_rl.estimators
        metadata={"help": "scale σ* of the V0.5 advantage: 'noise-bound' = max(sqrt(1 - μ*²), 1/sqrt(k)) "
                  "(fixes the ±1 hazard, see v05_rl.estimators), 'paper' = sqrt(1 - μ*²) as printed (Eq. 10)"},
    )
    no_prior: str = field(
        default="cap",
        metadata={"help": "a prompt without a prior (NaN): 'cap' samples it to k_max (Eq. 12 with Δ̂² = ∞), "
                  "'k_init' stops it at k_init"},
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.k_init, int) and self.k_init >= 1):
            raise ValueError(f"OslaConfig.k_init: expected an int >= 1 (paper: 4), got {self.k_init!r}")
        if not (isinstance(self.step, int) and self.step >= 1):
            raise ValueError(f"OslaConfig.step: expected an int >= 1 (paper: 2), got {self.step!r}")
        if not (isinstance(self.c, (int, float)) and 0 < self.c < 1):
            raise ValueError(f"OslaConfig.c: expected a cost in (0, 1) (paper: 0.0039), got {self.c!r}")
        if self.k_max is not None and not (isinstance(self.k_max, int) and self.k_max >= self.k_init):
            raise ValueError(
                f"OslaConfig.k_max: expected None or an int >= k_init={self.k_init}, got {self.k_max!r}"
            )
        if self.k_max is None and self.cap < self.k_init:
            raise ValueError(
                f"OslaConfig: floor(1/sqrt(c)) = {self.cap} is below k_init={self.k_init}; "
                "lower c or set k_max explicitly"
            )
        if not (isinstance(self.halt_fraction, (int, float)) and 0 <= self.halt_fraction <= 1):
            raise ValueError(
                f"OslaConfig.halt_fraction: expected a fraction in [0, 1] (paper: 0.25), got {self.halt_fraction!r}"
            )
        if not (isinstance(self.pad_multiple, int) and self.pad_multiple >= 1):
            raise ValueError(
                f"OslaConfig.pad_multiple: expected an int >= 1 (paper: 32; 1 = no padding), got {self.pad_multiple!r}"
            )
        if self.method not in FUSION_METHODS:
            raise ValueError(
                f"OslaConfig.method: unknown fusion method {self.method!r}; valid: {', '.join(FUSION_METHODS.names())}"
            )
        if self.sigma_rule not in SIGMA_RULES:
            raise ValueError(
                f"OslaConfig.sigma_rule: unknown rule {self.sigma_rule!r}; valid: {', '.join(SIGMA_RULES.names())}"
            )
        if self.no_prior not in ("cap", "k_init"):
            raise ValueError(f"OslaConfig.no_prior: expected 'cap' or 'k_init', got {self.no_prior!r}")

    @property
    def cap(self) -> int:
        """Rollouts per prompt never exceed this: k_max, or floor(1/sqrt(c))."""
        if self.k_max is not None:
            return self.k_max
        return int(math.floor(1.0 / math.sqrt(self.c) + 1e-9))


def target_k(delta2: Any, c: float, noise: Any = 1.0) -> Array:
    """Optimal-stopping target of Eq. 12: k_target = 1/sqrt(c) - 1/Δ̂² (−inf where Δ̂² = 0).

    With a per-rollout noise ν other than 1 (the methods beyond the paper): sqrt(ν/c) - ν/Δ̂².
    Δ̂² = ∞ gives sqrt(ν/c). Shapes: delta2 (P,), noise scalar or (P,) → (P,); numpy or torch as given.
    """
    if not 0 < c < 1:
        raise ValueError(f"c: expected a cost in (0, 1), got {c!r}")
    if is_torch(delta2):
        import torch

        noise_t = torch.as_tensor(noise, dtype=delta2.dtype, device=delta2.device)
        safe = torch.where(delta2 > 0, delta2, torch.ones_like(delta2))
        out = torch.sqrt(noise_t / c) - noise_t / safe
        return torch.where(delta2 > 0, out, torch.full_like(out, -math.inf))
    delta2 = np.asarray(delta2, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    if np.any(delta2 < 0):
        raise ValueError("delta2: expected squared prior errors >= 0")
    with np.errstate(divide="ignore"):
        out = np.sqrt(noise / c) - noise / np.where(delta2 > 0, delta2, 1.0)
    return np.where(delta2 > 0, out, -np.inf)


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if is_torch(x):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array with one entry per prompt, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}: expected numbers, got dtype {arr.dtype}")
    return arr


def plan_round(counts: Any, sums: Any, priors: Any, cfg: OslaConfig = OslaConfig()) -> Array:
    """Extra rollouts per prompt for the next OSLA round (0 everywhere = stop).

    counts: rollouts so far per prompt (P,) int >= 0; sums: Σ of their ±1 rewards (P,), |sum| <= count
    and sum ≡ count (mod 2); priors: V per prompt (P,) in [-1, 1], NaN = no prior.
    Returns (P,) int64 extra rollouts, numpy or torch like `counts` (same device).
    """
    ref = counts
    k = _as_numpy(counts, "counts")
    s = _as_numpy(sums, "sums").astype(np.float64)
    v = _as_numpy(priors, "priors").astype(np.float64)
    if not (k.shape == s.shape == v.shape):
        raise ValueError(
            f"counts, sums, priors: expected equal lengths (one per prompt), got {k.shape}, {s.shape}, {v.shape}"
        )
    if k.size == 0:
        raise ValueError("counts: expected at least one prompt, got an empty batch")
    if not np.all(np.isfinite(k)) or np.any(k != np.round(k)) or np.any(k < 0):
        raise ValueError("counts: expected non-negative integer rollout counts")
    k = k.astype(np.int64)
    if not np.all(np.isfinite(s)) or np.any(np.abs(s) > k) or np.any((s + k) % 2 != 0):
        i = int(np.flatnonzero(~np.isfinite(s) | (np.abs(s) > k) | ((np.nan_to_num(s) + k) % 2 != 0))[0])
        raise ValueError(
            f"sums: expected the sum of {k[i]} rewards of ±1 for prompt {i} (an integer in [-k, k] with the "
            f"parity of k), got {s[i]!r}"
        )
    bad_v = ~np.isnan(v) & ((v < -1) | (v > 1))
    if np.any(bad_v) or np.any(np.isinf(v)):
        i = int(np.flatnonzero(bad_v | np.isinf(v))[0])
        raise ValueError(f"priors: expected values in [-1, 1] or NaN (no prior), got {v[i]!r} for prompt {i}")
    cap = cfg.cap
    if np.any(k > cap):
        i = int(np.flatnonzero(k > cap)[0])
        raise ValueError(f"counts: prompt {i} already has {k[i]} rollouts, above the cap k_max={cap}")
    extra = _plan(k, s, v, cfg, cap)
    if is_torch(ref):
        import torch

        return torch.as_tensor(extra, dtype=torch.long, device=ref.device)
    return extra


def _plan(k: np.ndarray, s: np.ndarray, v: np.ndarray, cfg: OslaConfig, cap: int) -> np.ndarray:
    """The planner on validated numpy arrays. Shapes: (P,) each → (P,) int64."""
    if np.any(k < cfg.k_init):  # cold start: top every prompt up to k_init
        return np.maximum(cfg.k_init - k, 0).astype(np.int64)
    mean = s / k  # [P]
    kf = k.astype(np.float64)
    fz = fuse(mean, kf, v, method=cfg.method)
    no_prior = np.isnan(v)
    delta2 = np.where(no_prior, np.inf, fz.delta2)  # [P]
    target = target_k(delta2, cfg.c, fz.noise)  # [P]
    if cfg.no_prior == "k_init":
        target = np.where(no_prior, float(cfg.k_init), target)
    room = cap - k  # [P]
    need = (kf < target) & (room > 0)
    if need.sum() == 0 or need.sum() < cfg.halt_fraction * k.size:
        return np.zeros_like(k)
    extra = np.where(need, np.minimum(cfg.step, room), 0).astype(np.int64)  # [P]
    total = int(extra.sum())
    surplus = -total % cfg.pad_multiple
    if surplus == 0:
        return extra
    # priority for padding: remaining need, then how far the discrepancy is beyond the noise
    remaining = target - (kf + extra)  # [P], -inf where Δ̂² = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        no_prior_z = np.inf if cfg.no_prior == "cap" else 0.0  # padding goes to them last under "k_init"
        zscore = np.where(no_prior, no_prior_z, (mean - np.nan_to_num(v)) ** 2 * kf / np.maximum(fz.noise, 1e-12))
    order = np.lexsort((np.arange(k.size), -zscore, -remaining))  # highest priority first
    left = room - extra  # [P]
    order = order[left[order] > 0]
    while surplus > 0 and order.size:
        give = np.minimum(left[order], cfg.step)
        cum = np.cumsum(give)
        n = int(np.searchsorted(cum, surplus, side="left")) + 1
        n = min(n, order.size)
        grant = give[:n].copy()
        over = int(cum[n - 1]) - surplus
        if over > 0:
            grant[-1] -= over
        extra[order[:n]] += grant
        left[order[:n]] -= grant
        surplus -= int(grant.sum())
        order = order[left[order] > 0]
    return extra


__all__ = ["OslaConfig", "plan_round", "target_k"]
