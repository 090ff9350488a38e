"""Baselines and advantages for binary-reward RL: V0.5's fused baseline and the group baselines it is
compared with.

Everything here is pure array math, vectorized over a whole batch of prompts whose groups may have
different sizes. A batch is described by
    rewards      (N,)  one ±1 reward per rollout
    group_index  (N,)  int in [0, G): which prompt (group) each rollout belongs to; any order
    prior        (G,)  the value-model prior V in [-1, 1] per group, NaN = "no prior"
NumPy arrays or torch tensors go in and the same kind comes out (torch keeps device and dtype; integer
rewards give float32 tensors / float64 arrays).

The paper (§3.3, Eq. 6-9), for one group with k rollouts and mean v̄_k:
    σ̂²  = 1/k                                   noise bound of v̄_k            (Eq. 6)
    Δ̂²  = max(0, (v̄_k - V)² - 1/k)              prior bias, a hypothesis test  (Eq. 7, App. A.4)
    ŵ   = Δ̂² / (Δ̂² + 1/k)                                                    (Eq. 8)
    μ*  = ŵ v̄_k + (1 - ŵ) V                                                  (Eq. 9)
    A_i = (r_i - μ*) / σ*,   σ* = sqrt(1 - μ*²)                               (Eq. 10)

Where this module departs from or extends the paper, and why:
- σ* may have a floor tied to k (`sigma_rule="noise-bound"`; the default of the engine's
  `OslaConfig.sigma_rule`, while the functions here default to the paper like `method`): σ* =
  max(sqrt(1 - μ*²), 1/sqrt(k), std_floor). The paper's rule σ* = sqrt(1 - μ*²) (`sigma_rule="paper"`,
  with only the clamp std_floor = 0.1 that keeps μ* = ±1 finite) has a hazard: a prior at exactly ±1
  with one contradicting rollout of k = 4 passes Eq. 7 ((0.5 - 1)² = 0.25 is not > 1/4), so μ* = V = 1,
  σ* = 0.1 and that rollout gets advantage (-1 - 1)/0.1 = -20; V = 0.98 gives -1.98/sqrt(1 - 0.98²) = -9.9 (at k = 16 one or two
  failures pass the test and get the same). Why the floor 1/sqrt(k): the normaliser should be the
  root-mean-square of r - μ*, i.e. E[(r - μ*)²] = (1 - μ²) + (μ - μ*)², not only the first term. When the
  test keeps the prior it has certified only (v̄_k - V)² <= 1/k: an error (μ - μ*)² up to the noise bound
  σ̂² = 1/k of Eq. 6 is invisible to it, so σ*² >= 1/k is the smallest second moment the data cannot rule
  out. The floor acts only where sqrt(1 - μ*²) < 1/sqrt(k) (|μ*| > 0.87 at k = 4, > 0.71 at k = 2), it
  bounds a contradicting rollout's advantage by 2 sqrt(k) (4 at k = 4 instead of 20), and it leaves the
  advantage of an agreeing rollout small ((1 - μ*) sqrt(k)). Clipping V to ±(1 - ε) alone would not do:
  V = 0.98 is already -9.9. See `SIGMA_RULES` and tests/v05_rl/test_hazard.py for the measured table.
- No prior (NaN): μ* = v̄_k and ŵ = 1 (the cold start of the paper's support buffer); Δ̂² is NaN there.
- Two fusion methods beyond the paper, off by default (`method="paper"` is Eq. 6-9 exactly):
  * "bernoulli": the noise bound uses the Bernoulli variance implied by the prior, (1 - V²)/k, instead
    of the maximum-entropy 1/k; everything else as Eq. 7-9. A prior of exactly ±1 then tolerates no
    contradiction at all (noise 0 → any contradicting rollout gives ŵ = 1).
  * "empirical-bayes": estimates the prior's error variance τ² (and a calibration shift) from the whole
    batch by the method of moments, separately for confident (|V| >= 0.9) and other priors, and returns
    the Beta-binomial posterior mean (precision-weighted shrinkage, weight k/(k + n0) on v̄), keeping the
    protection against hallucinating priors as a soft test: the posterior probability that V carries no
    information moves ŵ towards 1. Batch-level: the result for one prompt depends on the others in the
    call. Its constants were chosen once on `v05 bench estimator`. See `_fuse_empirical_bayes`.
- GRPO follows verl's `compute_grpo_outcome_advantage`: (r - mean) / (std + eps) with Bessel's
  correction (torch.std), and a group of one rollout uses mean 0 and std 1, as verl does. RLOO and
  Dr.GRPO follow verl's conventions for single-rollout groups too (baseline 0).
- MC-GRPO (median-centred GRPO, Kim 2026) is implemented as (r - median) / (std + eps). For ±1 rewards
  the group median is sign(sum of rewards) (0 for a tied even group, as numpy's median averages the
  two middle values). The extra "pivot" rollout of that paper is a sampling choice, not done here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from v0_data.registry import Registry

try:  # torch is a dependency of the project, but this module works with numpy alone
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None  # type: ignore[assignment]

Array = Any  # np.ndarray | torch.Tensor

#: Default floor on σ* = sqrt(1 - μ*²) in the V0.5 and prior-only advantages (see module docstring).
DEFAULT_STD_FLOOR = 0.1
# "empirical-bayes" constants (see `_fuse_empirical_bayes`); chosen once on the estimator benchmark.
#: Smallest prior error variance τ² estimated (a τ of 0.01).
EB_TAU2_FLOOR = 1e-4
#: Prior probability that a prompt's prior hallucinates (carries no information).
EB_HALLUCINATION_PRIOR = 0.005
#: The prior mean of p is kept in [EB_MEAN_CLIP, 1 - EB_MEAN_CLIP] (a prior of ±1 is not a certainty).
EB_MEAN_CLIP = 0.02
#: Smallest Beta concentration n0 (when τ² exceeds what a Beta with that mean allows).
EB_N0_FLOOR = 0.5
#: τ² is estimated separately for bands of |V| with these inner edges (confident priors err less) ...
EB_BANDS = (0.9,)
#: ... each shrunk towards the batch-wide estimate with this many pseudo-prompts.
EB_BAND_PSEUDO = 32.0
#: ... and the calibration shift of each band is shrunk towards 0 with this many.
EB_CAL_PSEUDO = 64.0
#: Alternations between estimating τ² and the hallucination probabilities.
EB_ITERATIONS = 2


# --------------------------------------------------------------------------------------------------
# backend helpers (numpy or torch, chosen by the rewards / mean argument)
# --------------------------------------------------------------------------------------------------


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _xp(x: Any):
    return torch if is_torch(x) else np


def _float_like(x: Array) -> Array:
    """`x` as a floating array of its own backend (int → float64 numpy / float32 torch)."""
    if is_torch(x):
        return x if x.is_floating_point() else x.to(torch.get_default_dtype())
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def _like(x: Any, ref: Array, *, name: str) -> Array:
    """Convert `x` (list, numpy, torch, scalar) to the backend, dtype and device of `ref`."""
    if is_torch(ref):
        if is_torch(x):
            return x.to(device=ref.device, dtype=ref.dtype)
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=ref.dtype, device=ref.device)
    if is_torch(x):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=ref.dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected numbers, got {type(x).__name__} ({exc})") from None


def _index_like(idx: Any, ref: Array) -> Array:
    """Group index as int64 on the backend/device of `ref`."""
    if is_torch(ref):
        if is_torch(idx):
            return idx.to(device=ref.device, dtype=torch.long)
        return torch.as_tensor(np.asarray(idx), dtype=torch.long, device=ref.device)
    if is_torch(idx):
        idx = idx.detach().cpu().numpy()
    return np.asarray(idx)


def _num_groups(prior: Any) -> int | None:
    """G implied by a prior argument (None → infer from the index)."""
    if prior is None:
        return None
    shape = getattr(prior, "shape", None)
    if shape is None:
        shape = np.shape(prior)
    return int(shape[0]) if len(shape) else 1


def _any(mask: Array) -> bool:
    return bool(mask.any())


def _first(mask: Array) -> int:
    if is_torch(mask):
        return int(torch.nonzero(mask)[0, 0])
    return int(np.flatnonzero(mask)[0])


def _group_sum(values: Array, index: Array, num_groups: int) -> Array:
    """Σ values per group.  Shapes: values (N,), index (N,) → (G,)."""
    if is_torch(values):
        out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
        return out.index_add_(0, index, values)
    return np.bincount(index, weights=values, minlength=num_groups).astype(values.dtype, copy=False)


def _group_count(index: Array, num_groups: int, ref: Array) -> Array:
    """Number of rollouts per group, as floats of `ref`'s dtype.  Shape: (G,)."""
    if is_torch(ref):
        return torch.bincount(index, minlength=num_groups).to(ref.dtype)
    return np.bincount(index, minlength=num_groups).astype(ref.dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------------


def _check_rewards(rewards: Any) -> Array:
    """Rewards as a float 1-D array; every entry must be exactly -1 or +1."""
    if not is_torch(rewards):
        rewards = np.asarray(rewards)
        if rewards.dtype == object or not np.issubdtype(rewards.dtype, np.number):
            raise ValueError(f"rewards: expected a numeric array of ±1, got dtype {rewards.dtype}")
    rewards = _float_like(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards: expected shape (N,), got {tuple(rewards.shape)}")
    if rewards.shape[0] == 0:
        raise ValueError("rewards: expected at least one reward, got an empty array")
    bad = (rewards != 1) & (rewards != -1)
    if _any(bad):
        i = _first(bad)
        raise ValueError(
            f"rewards: expected every reward to be -1 or +1 (binary outcome rewards), "
            f"got {float(rewards[i])!r} at position {i}; map 0/1 rewards with 2*r - 1"
        )
    return rewards


def _check_index(group_index: Any, rewards: Array, num_groups: int | None) -> tuple[Array, int]:
    """Validate the group index against `rewards`; return it (int64, rewards' backend) and G."""
    idx = _index_like(group_index, rewards)
    if not is_torch(idx) and not np.issubdtype(idx.dtype, np.integer):
        if np.issubdtype(idx.dtype, np.floating) and np.all(np.isfinite(idx)) and np.all(idx == np.round(idx)):
            idx = idx.astype(np.int64)
        else:
            raise ValueError(
                f"group_index: expected integer group ids 0..G-1, got dtype {idx.dtype}; "
                "map prompt uids to integers first (e.g. np.unique(uids, return_inverse=True)[1])"
            )
    if tuple(idx.shape) != tuple(rewards.shape):
        raise ValueError(
            f"group_index: expected the same shape as rewards {tuple(rewards.shape)}, got {tuple(idx.shape)}"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0:
        raise ValueError(f"group_index: expected ids >= 0, got {lo}")
    if num_groups is None:
        num_groups = hi + 1
    elif hi >= num_groups:
        raise ValueError(f"group_index: id {hi} is out of range for num_groups={num_groups}")
    return idx, int(num_groups)


def _check_prior(prior: Any, ref: Array, num_groups: int, *, name: str = "prior") -> Array:
    """Prior as a (G,) array of ref's backend; values in [-1, 1] or NaN (no prior)."""
    if prior is None:
        out = _like(np.full(num_groups, np.nan), ref, name=name)
        return out
    out = _like(prior, ref, name=name)
    if out.ndim == 0:
        out = out.reshape(1)
    if tuple(out.shape) != (num_groups,):
        raise ValueError(f"{name}: expected one value per group, shape ({num_groups},), got {tuple(out.shape)}")
    xp = _xp(out)
    finite = ~xp.isnan(out)
    bad = finite & ((out < -1) | (out > 1))
    if _any(bad):
        i = _first(bad)
        raise ValueError(
            f"{name}: expected values in [-1, 1] (reward scale, V = 2 p̂ - 1) or NaN for 'no prior', "
            f"got {float(out[i])!r} for group {i}; it is not clipped for you"
        )
    return out


# --------------------------------------------------------------------------------------------------
# group statistics
# --------------------------------------------------------------------------------------------------


class GroupStats(NamedTuple):
    """Per-group sufficient statistics of ±1 rewards.  Every field has shape (G,)."""

    count: Array  # number of rollouts k
    total: Array  # Σ r
    mean: Array  # v̄_k = total / count


def group_stats(rewards: Any, group_index: Any, num_groups: int | None = None) -> GroupStats:
    """Count, sum and mean of the rewards of each group.

    Shapes: rewards (N,), group_index (N,) int in [0, G) → GroupStats of (G,) each.
    Raises ValueError for non-±1 rewards, a mismatched index, or a group in 0..G-1 without rollouts.
    """
    rewards = _check_rewards(rewards)
    idx, num_groups = _check_index(group_index, rewards, num_groups)
    return _group_stats(rewards, idx, num_groups)


def _group_stats(rewards: Array, idx: Array, num_groups: int) -> GroupStats:
    count = _group_count(idx, num_groups, rewards)  # [G]
    empty = count == 0
    if _any(empty):
        xp = _xp(empty)
        missing = [int(i) for i in xp.nonzero(empty)[0][:10]]
        raise ValueError(
            f"group_index: groups {missing} (of 0..{num_groups - 1}) have no rewards; every group needs at "
            "least one rollout - re-index the groups to 0..G-1 or drop their priors"
        )
    total = _group_sum(rewards, idx, num_groups)  # [G]
    return GroupStats(count=count, total=total, mean=total / count)


# --------------------------------------------------------------------------------------------------
# fusion of prior and empirical mean (Eq. 6-9)
# --------------------------------------------------------------------------------------------------


class Fusion(NamedTuple):
    """Result of fusing a prior with k rollouts.  Every field has shape (G,).

    mu:     fused baseline μ* (Eq. 9)
    w:      weight ŵ of the empirical mean, in [0, 1] (Eq. 8)
    delta2: estimated squared prior error Δ̂² (Eq. 7); NaN where there is no prior
    noise:  per-rollout reward variance the method assumes (1 for "paper"); the noise of v̄_k is noise/k
    """

    mu: Array
    w: Array
    delta2: Array
    noise: Array


FusionFn = Callable[[Array, Array, Array], tuple[Array, Array, Array, Array]]
#: Fusion methods: (mean, k, prior) of the groups that have a prior → (mu, w, delta2, noise).
FUSION_METHODS: Registry[FusionFn] = Registry("fusion method")


def _weight(delta2: Array, noise_of_mean: Array) -> Array:
    """ŵ = Δ̂² / (Δ̂² + σ̂²) with ŵ = 0 where Δ̂² = 0 (also when σ̂² = 0).  Eq. 8."""
    xp = _xp(delta2)
    denom = delta2 + noise_of_mean
    safe = xp.where(denom > 0, denom, xp.ones_like(denom))
    return xp.where(delta2 > 0, delta2 / safe, xp.zeros_like(delta2))


@FUSION_METHODS.register("paper")
def _fuse_paper(mean: Array, k: Array, prior: Array) -> tuple[Array, Array, Array, Array]:
    """Eq. 6-8: σ̂² = 1/k, Δ̂² = max(0, (v̄ - V)² - 1/k), ŵ = Δ̂²/(Δ̂² + 1/k)."""
    noise = _xp(mean).ones_like(mean)  # max-entropy variance of one ±1 reward
    s2 = noise / k  # [G]
    delta2 = ((mean - prior) ** 2 - s2).clip(min=0)  # [G]
    w = _weight(delta2, s2)
    return w * mean + (1 - w) * prior, w, delta2, noise


@FUSION_METHODS.register("bernoulli")
def _fuse_bernoulli(mean: Array, k: Array, prior: Array) -> tuple[Array, Array, Array, Array]:
    """As Eq. 6-8 but with the Bernoulli variance implied by the prior: σ̂² = (1 - V²)/k."""
    noise = (1 - prior**2).clip(min=0)  # [G]
    s2 = noise / k
    delta2 = ((mean - prior) ** 2 - s2).clip(min=0)
    w = _weight(delta2, s2)
    return w * mean + (1 - w) * prior, w, delta2, noise


@FUSION_METHODS.register("empirical-bayes")
def _fuse_empirical_bayes(mean: Array, k: Array, prior: Array) -> tuple[Array, Array, Array, Array]:
    """Empirical-Bayes shrinkage with a hallucination test (beyond the paper).  Shapes: (G,) → (G,) × 4.

    Model for one prompt with prior V and x successes in k rollouts (v̄ = 2x/k - 1):
      - "good" prior (probability 1 - π): p ~ Beta with mean m = clip((1 + V')/2, c, 1 - c), c = EB_MEAN_CLIP,
        and variance τ²/4 (prior error variance τ² on the reward scale), i.e. concentration
        n0 = max(4 m (1 - m)/τ² - 1, EB_N0_FLOOR). V' is V after a calibration shift (step 1);
      - "hallucinating" prior (probability π = EB_HALLUCINATION_PRIOR): V says nothing, p ~ Uniform(0, 1).
    1. Prompts are put in bands of |V| (edges EB_BANDS): a confident prior errs differently from an unsure
       one. Per band b, with weights 1 - h (h = probability of hallucination, 0 at first):
         calibration shift  s_b = Σ (1-h) sign(V) (v̄ - V) / (Σ (1-h) + EB_CAL_PSEUDO),  V' = clip(V + sign(V) s_b)
           (v̄ is unbiased for μ, so this is the band's mean error, shrunk towards 0; e.g. a prior clipped at
           ±1 overstates the certainty);
         method of moments  E[(v̄ - V')²] = τ² + E[1 - μ²]/k, and (1 - v̄²)/(k - 1) is unbiased for
           (1 - μ²)/k (the Bessel-corrected variance of k rewards of ±1 is k/(k-1)·(1 - v̄²)), so
           τ̂²_b = Σ (1-h)[(v̄ - V')² - (1 - v̄²)/(k - 1)] / Σ (1-h), shrunk towards the batch-wide value with
           EB_BAND_PSEUDO pseudo-prompts and floored at EB_TAU2_FLOOR. (k = 1 uses (1 - V'²)/k.)
    2. h = π P_unif(x) / (π P_unif(x) + (1 - π) P_betabinom(x | m, n0)), P_unif(x) = 1/(k + 1): the paper's
       hypothesis test (App. A.4) made soft and exact for binary rewards. Steps 1-2 alternate EB_ITERATIONS times.
    3. Posterior mean: a good prior gives the Beta-binomial posterior (x + n0 m)/(k + n0), i.e. precision-
       weighted shrinkage with weight k/(k + n0) on v̄; a hallucinating prior gives v̄ (ŵ = 1, as the paper's
       test does). So ŵ = h + (1 - h)·k/(k + n0) and μ* = ŵ v̄ + (1 - ŵ) V'' with V'' = 2m - 1.
    Reported: ŵ (relative to V''), noise ν = 4 m (1 - m) (Bernoulli variance at the prior) and
    Δ̂² = ν ŵ / (k (1 - ŵ)), so that ŵ = Δ̂²/(Δ̂² + ν/k) as in Eq. 8 (Δ̂² = ∞ where ŵ = 1).
    """
    if is_torch(mean):
        out = _eb_numpy(*(t.detach().cpu().double().numpy() for t in (mean, k, prior)))
        return tuple(torch.as_tensor(o, dtype=mean.dtype, device=mean.device) for o in out)  # type: ignore[return-value]
    return _eb_numpy(mean.astype(np.float64), k.astype(np.float64), prior.astype(np.float64))


def _lgamma(x: np.ndarray) -> np.ndarray:
    """lnΓ(x) elementwise (numpy has none: torch's CPU kernel on a zero-copy view, else math.lgamma)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if torch is not None:
        return torch.lgamma(torch.from_numpy(x)).numpy()
    return np.vectorize(math.lgamma, otypes=[np.float64])(x)  # pragma: no cover - torch is a dependency


def _log_betabinom(x: np.ndarray, k: np.ndarray, a: np.ndarray, b: np.ndarray, log_choose: np.ndarray) -> np.ndarray:
    """log P(x | k, Beta(a, b)) = log C(k, x) + lnB(x + a, k - x + b) - lnB(a, b).  Shapes: (G,) → (G,)."""
    lg = _lgamma(np.stack([x + a, k - x + b, a + b, a, b, k + a + b]))  # [6, G], one kernel call
    return log_choose + lg[0] + lg[1] + lg[2] - lg[3] - lg[4] - lg[5]


def _band_mean(
    values: np.ndarray, weight: np.ndarray, band: np.ndarray, n_bands: int, toward: float, pseudo: float
) -> np.ndarray:
    """Weighted mean of `values` per band, shrunk towards `toward` with `pseudo` pseudo-prompts,
    broadcast back to the prompts.  Shapes: (G,) × 3 → (G,)."""
    w_b = np.bincount(band, weights=weight, minlength=n_bands)  # [B]
    s_b = np.bincount(band, weights=weight * values, minlength=n_bands)
    return ((s_b + pseudo * toward) / (w_b + pseudo))[band]


def _eb_numpy(mean: np.ndarray, k: np.ndarray, prior: np.ndarray) -> tuple[np.ndarray, ...]:
    kk = np.rint(k).astype(np.int64)  # [G]
    x = np.rint((mean + 1) / 2 * k).astype(np.int64)  # successes
    xf, kf = x.astype(np.float64), kk.astype(np.float64)
    lc = _lgamma(np.stack([kf + 1, xf + 1, kf - xf + 1]))
    log_choose = lc[0] - lc[1] - lc[2]  # log C(k, x)
    p_unif = 1.0 / (k + 1)  # [G]
    pi = EB_HALLUCINATION_PRIOR
    band = np.searchsorted(np.asarray(EB_BANDS), np.abs(prior), side="right")  # [G] band of |V|
    n_bands = len(EB_BANDS) + 1
    sign = np.sign(prior)
    h = np.zeros_like(mean)
    for _ in range(EB_ITERATIONS):
        keep = 1 - h
        shift = _band_mean(sign * (mean - prior), keep, band, n_bands, 0.0, EB_CAL_PSEUDO)  # [G]
        v_cal = np.clip(prior + sign * shift, -1, 1)  # calibrated prior V'
        var_mean = np.where(kk > 1, (1 - mean**2) / np.maximum(k - 1, 1), (1 - v_cal**2) / k)  # [G]
        excess = (mean - v_cal) ** 2 - var_mean  # [G], unbiased for the squared prior error
        pooled = float((keep * excess).sum() / max(keep.sum(), 1e-12))
        tau2 = _band_mean(excess, keep, band, n_bands, pooled, EB_BAND_PSEUDO).clip(min=EB_TAU2_FLOOR)  # [G]
        m = np.clip((1 + v_cal) / 2, EB_MEAN_CLIP, 1 - EB_MEAN_CLIP)  # prior mean of p
        n0 = np.maximum(4 * m * (1 - m) / tau2 - 1, EB_N0_FLOOR)  # [G]
        p_good = np.exp(_log_betabinom(xf, kf, n0 * m, n0 * (1 - m), log_choose))
        h = pi * p_unif / (pi * p_unif + (1 - pi) * p_good)
    w = h + (1 - h) * k / (k + n0)  # [G]
    mu = w * mean + (1 - w) * (2 * m - 1)
    noise = 4 * m * (1 - m)
    with np.errstate(divide="ignore"):
        delta2 = np.where(w < 1, noise * w / (k * np.maximum(1 - w, 1e-300)), np.inf)
    return mu, w, delta2, noise


def fusion_methods() -> list[str]:
    """Names accepted by `method=`."""
    return FUSION_METHODS.names()


def _check_group_arrays(mean: Any, k: Any, prior: Any) -> tuple[Array, Array, Array]:
    mean = _float_like(mean) if is_torch(mean) else _float_like(np.asarray(mean, dtype=np.float64))
    k = _like(k, mean, name="k")
    if mean.ndim == 0:
        mean, k = mean.reshape(1), k.reshape(1)
    if tuple(k.shape) != tuple(mean.shape):
        raise ValueError(f"k: expected the shape of mean {tuple(mean.shape)}, got {tuple(k.shape)}")
    xp = _xp(mean)
    if _any(xp.isnan(mean) | (mean < -1) | (mean > 1)):
        i = _first(xp.isnan(mean) | (mean < -1) | (mean > 1))
        raise ValueError(f"mean: expected group means in [-1, 1], got {float(mean[i])!r} for group {i}")
    if _any(xp.isnan(k) | (k < 1)):
        i = _first(xp.isnan(k) | (k < 1))
        raise ValueError(f"k: expected rollout counts >= 1 per group, got {float(k[i])!r} for group {i}")
    prior = _check_prior(prior, mean, mean.shape[0])
    return mean, k, prior


def fuse(mean: Any, k: Any, prior: Any, *, method: str = "paper") -> Fusion:
    """Fuse the prior V with the empirical mean of k rollouts (Eq. 6-9), all four outputs.

    Shapes: mean (G,), k (G,), prior (G,) with NaN for "no prior" → Fusion of (G,) each.
    With no prior: μ* = v̄, ŵ = 1, Δ̂² = NaN.
    """
    fn = FUSION_METHODS.get(method)
    mean, k, prior = _check_group_arrays(mean, k, prior)
    return _fuse(mean, k, prior, fn)


def _fuse(mean: Array, k: Array, prior: Array, fn: FusionFn) -> Fusion:
    xp = _xp(mean)
    has = ~xp.isnan(prior)  # [G]
    if bool(has.all()):
        return Fusion(*fn(mean, k, prior))
    mu = mean.clone() if is_torch(mean) else mean.copy()
    delta2 = xp.full_like(mean, float("nan"))
    noise, w = xp.ones_like(mean), xp.ones_like(mean)
    if _any(has):
        mu[has], w[has], delta2[has], noise[has] = fn(mean[has], k[has], prior[has])
    return Fusion(mu=mu, w=w, delta2=delta2, noise=noise)


def fused_baseline(mean: Any, k: Any, prior: Any, *, method: str = "paper") -> tuple[Array, Array, Array]:
    """V0.5 fused baseline (Eq. 6-9): returns (μ*, ŵ, Δ̂²), each of shape (G,).

    mean: v̄_k per group (G,); k: rollouts per group (G,); prior: V per group (G,), NaN = no prior
    (then μ* = v̄_k, ŵ = 1, Δ̂² = NaN). `method`: "paper" (default, Eq. 6-9 exactly), "bernoulli",
    "empirical-bayes" (see the module docstring). "empirical-bayes" pools the whole batch passed in.
    """
    out = fuse(mean, k, prior, method=method)
    return out.mu, out.w, out.delta2


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------


class V05GroupStats(NamedTuple):
    """Per-group diagnostics of the V0.5 estimator for logging.  Every field has shape (G,)."""

    count: Array  # k
    mean: Array  # v̄_k
    prior: Array  # V (NaN = none)
    mu: Array  # μ*
    w: Array  # ŵ
    delta2: Array  # Δ̂² (NaN where no prior)
    sigma: Array  # σ* of the sigma rule (with the std_floor clamp)


SigmaFn = Callable[[Array, Array, float], Array]
#: Rules for σ*, the scale of the V0.5 advantage: (μ* (G,), k (G,), std_floor) → σ* (G,). See the module docstring.
SIGMA_RULES: Registry[SigmaFn] = Registry("sigma rule")
#: The rule that fixes the ±1 hazard (the engine's default, `OslaConfig.sigma_rule`); "paper" is Eq. 10 as printed.
SAFE_SIGMA_RULE = "noise-bound"


@SIGMA_RULES.register("paper")
def _sigma_paper(mu: Array, k: Array, std_floor: float) -> Array:
    """σ* = max(sqrt(1 - μ*²), std_floor) (Eq. 10 with a clamp that keeps μ* = ±1 finite).  (G,), (G,) → (G,)."""
    xp = _xp(mu)
    return xp.sqrt((1 - mu**2).clip(min=0)).clip(min=std_floor)  # [G]


@SIGMA_RULES.register("noise-bound")
def _sigma_noise_bound(mu: Array, k: Array, std_floor: float) -> Array:
    """σ* = max(sqrt(1 - μ*²), 1/sqrt(k), std_floor): never below the noise bound of Eq. 6.  (G,), (G,) → (G,)."""
    xp = _xp(mu)
    floor = 1 / xp.sqrt(k)  # [G]
    return xp.maximum(_sigma_paper(mu, k, std_floor), floor)  # [G]


def sigma_rules() -> list[str]:
    """Names accepted by `sigma_rule=`."""
    return SIGMA_RULES.names()


def _sigma_star(mu: Array, k: Array, std_floor: float, rule: str) -> Array:
    """σ* of rule `rule` (`SIGMA_RULES`).  Shape: mu (G,), k (G,) → (G,)."""
    if not std_floor > 0:
        raise ValueError(f"std_floor: expected a positive floor on sqrt(1 - mu*^2), got {std_floor!r}")
    return SIGMA_RULES.get(rule)(mu, k, std_floor)


def _standardize(rewards: Array, idx: Array, mu: Array, sigma: Array) -> Array:
    """A_i = (r_i - μ_g) / σ_g.  Shapes: (N,), (N,), (G,), (G,) → (N,)."""
    return (rewards - mu[idx]) / sigma[idx]


def v05_group_stats(
    rewards: Any,
    group_index: Any,
    *,
    prior: Any = None,
    method: str = "paper",
    std_floor: float = DEFAULT_STD_FLOOR,
    sigma_rule: str = "paper",
) -> V05GroupStats:
    """Per-group V0.5 quantities (k, v̄, V, μ*, ŵ, Δ̂², σ*) for logging.  Shapes: (N,), (N,), (G,) → (G,)."""
    fn = FUSION_METHODS.get(method)
    rewards, idx, n_groups, prior = _prepare(rewards, group_index, prior)
    st = _group_stats(rewards, idx, n_groups)
    fz = _fuse(st.mean, st.count, prior, fn)
    sigma = _sigma_star(fz.mu, st.count, std_floor, sigma_rule)
    return V05GroupStats(st.count, st.mean, prior, fz.mu, fz.w, fz.delta2, sigma)


def _prepare(rewards: Any, group_index: Any, prior: Any) -> tuple[Array, Array, int, Array]:
    rewards = _check_rewards(rewards)
    idx, n_groups = _check_index(group_index, rewards, _num_groups(prior))
    prior = _check_prior(prior, rewards, n_groups)
    return rewards, idx, n_groups, prior


ESTIMATORS: Registry[Callable[..., Array]] = Registry("advantage estimator")


@ESTIMATORS.register("v05")
def v05_advantages(
    rewards: Any,
    group_index: Any,
    *,
    prior: Any = None,
    method: str = "paper",
    std_floor: float = DEFAULT_STD_FLOOR,
    sigma_rule: str = "paper",
) -> Array:
    """V0.5 advantage A_i = (r_i - μ*) / σ* (Eq. 9-10).

    σ* by `sigma_rule`: "paper" (default, Eq. 10) max(sqrt(1 - μ*²), std_floor); "noise-bound"
    max(sqrt(1 - μ*²), 1/sqrt(k), std_floor), which avoids the ±1 hazard (see the module docstring).
    Shapes: rewards (N,), group_index (N,) int in [0, G), prior (G,) (NaN or None = no prior) → (N,).
    """
    fn = FUSION_METHODS.get(method)
    SIGMA_RULES.get(sigma_rule)  # fail on a bad name before any work
    rewards, idx, n_groups, prior = _prepare(rewards, group_index, prior)
    st = _group_stats(rewards, idx, n_groups)
    mu = _fuse(st.mean, st.count, prior, fn).mu  # [G]
    return _standardize(rewards, idx, mu, _sigma_star(mu, st.count, std_floor, sigma_rule))


@ESTIMATORS.register("prior-only")
def prior_only_advantages(
    rewards: Any, group_index: Any, *, prior: Any = None, std_floor: float = DEFAULT_STD_FLOOR,
    sigma_rule: str = "paper",
) -> Array:
    """Advantage with the prior alone as baseline: (r_i - V) / σ, σ by `sigma_rule` at μ = V (as `v05_advantages`).

    Groups without a prior (NaN) fall back to their empirical mean. Shapes: (N,), (N,), (G,) → (N,).
    """
    rewards, idx, n_groups, prior = _prepare(rewards, group_index, prior)
    xp = _xp(rewards)
    has = ~xp.isnan(prior)
    st = _group_stats(rewards, idx, n_groups)
    mu = prior if bool(has.all()) else xp.where(has, prior, st.mean)
    return _standardize(rewards, idx, mu, _sigma_star(mu, st.count, std_floor, sigma_rule))


def _mean_std(rewards: Array, idx: Array, n_groups: int) -> tuple[Array, Array, Array]:
    """verl's group mean and Bessel std; singleton groups get mean 0, std 1.  → (G,) each."""
    st = _group_stats(rewards, idx, n_groups)
    xp = _xp(rewards)
    single = st.count == 1
    mean = xp.where(single, xp.zeros_like(st.mean), st.mean)
    ss = _group_sum((rewards - st.mean[idx]) ** 2, idx, n_groups)  # [G]
    dof = xp.where(single, xp.ones_like(st.count), st.count - 1)
    std = xp.where(single, xp.ones_like(ss), xp.sqrt(ss / dof))
    return mean, std, st.count


@ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: Any, group_index: Any, *, prior: Any = None, eps: float = 1e-6, norm_by_std: bool = True
) -> Array:
    """GRPO: (r_i - mean_g) / (std_g + eps), std with Bessel's correction as verl (torch.std).

    `norm_by_std=False` gives r_i - mean_g. A single-rollout group uses mean 0, std 1 (verl).
    `prior` is accepted and ignored. Shapes: (N,), (N,) → (N,).
    """
    rewards = _check_rewards(rewards)
    idx, n_groups = _check_index(group_index, rewards, _num_groups(prior))
    mean, std, _ = _mean_std(rewards, idx, n_groups)
    adv = rewards - mean[idx]
    return adv / (std[idx] + eps) if norm_by_std else adv


@ESTIMATORS.register("drgrpo")
def drgrpo_advantages(rewards: Any, group_index: Any, *, prior: Any = None) -> Array:
    """Dr.GRPO: r_i - mean_g (no std normalization); a single-rollout group uses mean 0 (verl)."""
    return grpo_advantages(rewards, group_index, prior=prior, norm_by_std=False)


@ESTIMATORS.register("rloo")
def rloo_advantages(rewards: Any, group_index: Any, *, prior: Any = None) -> Array:
    """RLOO: r_i - mean of the other k-1 rewards = k/(k-1) (r_i - mean_g); a single rollout keeps r_i."""
    rewards = _check_rewards(rewards)
    idx, n_groups = _check_index(group_index, rewards, _num_groups(prior))
    st = _group_stats(rewards, idx, n_groups)
    xp = _xp(rewards)
    k = st.count[idx]  # [N]
    single = k == 1
    scale = k / xp.where(single, xp.ones_like(k), k - 1)
    return xp.where(single, rewards, scale * (rewards - st.mean[idx]))


@ESTIMATORS.register("mcgrpo")
def mcgrpo_advantages(
    rewards: Any, group_index: Any, *, prior: Any = None, eps: float = 1e-6, norm_by_std: bool = True
) -> Array:
    """MC-GRPO: (r_i - median_g) / (std_g + eps); for ±1 rewards median_g = sign(Σ r).

    A single-rollout group uses median 0 and std 1 like GRPO. Shapes: (N,), (N,) → (N,).
    """
    rewards = _check_rewards(rewards)
    idx, n_groups = _check_index(group_index, rewards, _num_groups(prior))
    mean, std, count = _mean_std(rewards, idx, n_groups)
    xp = _xp(rewards)
    median = xp.sign(mean)  # singleton groups already have mean 0 → median 0
    adv = rewards - median[idx]
    return adv / (std[idx] + eps) if norm_by_std else adv


def get_estimator(name: str) -> Callable[..., Array]:
    """The advantage estimator registered as `name`; signature (rewards, group_index, *, prior=None, **kw)."""
    return ESTIMATORS.get(name)


def estimator_names() -> list[str]:
    return ESTIMATORS.names()


__all__ = [
    "is_torch",
    "DEFAULT_STD_FLOOR",
    "ESTIMATORS",
    "FUSION_METHODS",
    "Fusion",
    "GroupStats",
    "SAFE_SIGMA_RULE",
    "SIGMA_RULES",
    "V05GroupStats",
    "drgrpo_advantages",
    "estimator_names",
    "fuse",
    "fused_baseline",
    "fusion_methods",
    "get_estimator",
    "group_stats",
    "grpo_advantages",
    "mcgrpo_advantages",
    "prior_only_advantages",
    "rloo_advantages",
    "sigma_rules",
    "v05_advantages",
    "v05_group_stats",
]
