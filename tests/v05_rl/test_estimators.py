"""Tests of v05_rl.estimators: hand-computed paper examples, Theorem 3.4, loop vs vectorized, numpy vs torch."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v05_rl.estimators import (
    DEFAULT_STD_FLOOR,
    estimator_names,
    fuse,
    fused_baseline,
    fusion_methods,
    get_estimator,
    group_stats,
    grpo_advantages,
    v05_advantages,
    v05_group_stats,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Appendix A.8 worked examples (paper method, prior V = 0.8, k = 4)
# ---------------------------------------------------------------------------------------------


def _one(mean: float, k: int, prior: float, method: str = "paper"):
    mu, w, d2 = fused_baseline(np.array([mean]), np.array([k]), np.array([prior]), method=method)
    return float(mu[0]), float(w[0]), float(d2[0])


def test_a8_all_correct_keeps_prior():
    # v̄ = 1: (1 - 0.8)² = 0.04 <= 1/4  → Δ̂² = 0, ŵ = 0, μ* = V = 0.8
    mu, w, d2 = _one(1.0, 4, 0.8)
    assert d2 == 0.0 and w == 0.0 and mu == pytest.approx(0.8)


def test_a8_three_of_four_keeps_prior():
    # v̄ = (3 - 1)/4 = 0.5: (0.5 - 0.8)² = 0.09 <= 0.25 → prior kept, μ* = 0.8
    mu, w, d2 = _one(0.5, 4, 0.8)
    assert d2 == 0.0 and w == 0.0 and mu == pytest.approx(0.8)


def test_a8_strong_contradiction_weight_near_one():
    # v̄ = -1 (0 of 4): (−1 − 0.8)² = 3.24; Δ̂² = 3.24 − 0.25 = 2.99; ŵ = 2.99 / 3.24 = 0.922840
    # μ* = 0.922840·(−1) + 0.077160·0.8 = −0.861111
    mu, w, d2 = _one(-1.0, 4, 0.8)
    assert d2 == pytest.approx(2.99)
    assert w == pytest.approx(2.99 / 3.24)
    assert mu == pytest.approx(-0.8611111, abs=1e-6)


def test_a8_two_of_four_partial_rejection():
    # v̄ = 0: (0 − 0.8)² = 0.64 > 0.25 → Δ̂² = 0.39, ŵ = 0.39/0.64 = 0.609375, μ* = 0.390625·0.8 = 0.3125
    mu, w, d2 = _one(0.0, 4, 0.8)
    assert (d2, w, mu) == pytest.approx((0.39, 0.609375, 0.3125))


def test_a8_small_k_rejects_prior():
    # k = 2, one success: v̄ = 0, (0 − 0.8)² = 0.64 > 1/2 → rejected (ŵ = 0.14/0.64 = 0.21875)
    mu, w, _ = _one(0.0, 2, 0.8)
    assert w == pytest.approx(0.21875)


def test_v05_advantage_hand_example():
    # group 0: prior 0.8, rewards (1, 1, 1, −1): v̄ = 0.5, prior kept, μ* = 0.8, σ* = sqrt(1 − 0.64) = 0.6
    #   A = (1 − 0.8)/0.6 = 1/3 for the successes, (−1 − 0.8)/0.6 = −3 for the failure
    # group 1: no prior, rewards (1, −1): μ* = v̄ = 0, σ* = 1 → A = ±1
    r = np.array([1, 1, -1, 1, 1, -1], dtype=float)
    g = np.array([0, 0, 1, 0, 1, 0])
    adv = v05_advantages(r, g, prior=np.array([0.8, np.nan]))
    np.testing.assert_allclose(adv, [1 / 3, 1 / 3, -1, 1 / 3, 1, -3], atol=1e-12)


def test_std_floor_makes_certain_groups_finite():
    # prior 1, 4 of 4 correct: (1 − 1)² = 0 → μ* = 1, σ* = max(0, 0.1) = 0.1, A = 0 (not NaN)
    # prior 1, 3 of 4: (0.5 − 1)² = 0.25, not > 0.25 → μ* = 1; the failure gets (−1 − 1)/0.1 = −20
    r = np.array([1, 1, 1, 1, 1, 1, 1, -1], dtype=float)
    g = np.repeat([0, 1], 4)
    adv = v05_advantages(r, g, prior=np.array([1.0, 1.0]))
    assert np.all(np.isfinite(adv))
    np.testing.assert_allclose(adv, [0, 0, 0, 0, 0, 0, 0, -2 / DEFAULT_STD_FLOOR])


def test_no_prior_means_empirical_mean():
    mu, w, d2 = fused_baseline(np.array([0.5, -0.25]), np.array([4, 8]), np.array([np.nan, np.nan]))
    np.testing.assert_allclose(mu, [0.5, -0.25])
    np.testing.assert_allclose(w, [1.0, 1.0])
    assert np.all(np.isnan(d2))


def test_bernoulli_method_hand_example():
    # prior 0.8, k = 4: σ̂² = (1 − 0.64)/4 = 0.09. v̄ = 0.5: (0.5 − 0.8)² = 0.09, not > 0.09 → kept.
    # v̄ = 0: 0.64 − 0.09 = 0.55 → ŵ = 0.55/0.64 = 0.859375, μ* = 0.140625·0.8 = 0.1125
    assert _one(0.5, 4, 0.8, "bernoulli")[1] == pytest.approx(0.0, abs=1e-12)  # boundary, up to rounding
    mu, w, d2 = _one(0.0, 4, 0.8, "bernoulli")
    assert (d2, w, mu) == pytest.approx((0.55, 0.859375, 0.1125))


# ---------------------------------------------------------------------------------------------
# Theorem 3.4 and weight bounds (property tests)
# ---------------------------------------------------------------------------------------------


def _exact_bias(p: float, prior: float, k: int) -> float:
    """E[μ*] − (2p − 1) by enumerating the Binomial(k, p) number of successes."""
    x = np.arange(k + 1)
    pmf = np.array([math.comb(k, int(i)) * p**i * (1 - p) ** (k - i) for i in x])
    mean = 2 * x / k - 1
    mu, _, _ = fused_baseline(mean, np.full(k + 1, k), np.full(k + 1, prior))
    return float(pmf @ mu - (2 * p - 1))


@settings(max_examples=300, deadline=None)
@given(
    p=st.floats(0.0, 1.0),
    prior=st.floats(-1.0, 1.0),
    k=st.integers(1, 32),
)
def test_theorem_3_4_bias_bound(p, prior, k):
    assert abs(_exact_bias(p, prior, k)) <= 1 / math.sqrt(k) + 1e-12


def test_theorem_3_4_bound_is_nearly_attained():
    # the bound is not vacuous: search a grid for the largest |bias| at k = 4; it must exceed half the bound
    worst = max(abs(_exact_bias(p, v, 4)) for p in np.linspace(0, 1, 21) for v in np.linspace(-1, 1, 21))
    assert 0.25 < worst <= 0.5


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(1, 20), st.floats(0, 1), st.one_of(st.floats(-1, 1), st.just(float("nan")))),
        min_size=1,
        max_size=30,
    ),
    method=st.sampled_from(["paper", "bernoulli", "empirical-bayes"]),
)
def test_weight_in_unit_interval(data, method):
    k = np.array([d[0] for d in data], dtype=float)
    x = np.array([round(d[1] * d[0]) for d in data], dtype=float)
    mean = 2 * x / k - 1
    prior = np.array([d[2] for d in data])
    mu, w, d2 = fused_baseline(mean, k, prior, method=method)
    assert np.all((w >= 0) & (w <= 1))
    assert np.all((mu >= -1 - 1e-12) & (mu <= 1 + 1e-12))
    has = ~np.isnan(prior)
    assert np.all(d2[has] >= 0)


# ---------------------------------------------------------------------------------------------
# loop reference vs vectorized, unequal groups, shuffled order
# ---------------------------------------------------------------------------------------------


def _batch(seed: int, n_groups: int = 23):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 12, n_groups)
    g = np.repeat(np.arange(n_groups), sizes)
    rng.shuffle(g)
    p = rng.random(n_groups)
    r = np.where(rng.random(g.size) < p[g], 1.0, -1.0)
    prior = np.clip(2 * p - 1 + rng.normal(0, 0.3, n_groups), -1, 1)
    prior[rng.random(n_groups) < 0.2] = np.nan
    return r, g, prior


def _loop_reference(name: str, r, g, prior):
    """Straightforward per-group python loops, written from the formulas (verl conventions)."""
    groups = defaultdict(list)
    for i, gi in enumerate(g):
        groups[int(gi)].append(i)
    out = np.zeros_like(r)
    for gi, members in groups.items():
        vals = r[members]
        k = len(vals)
        mean = float(np.mean(vals))
        std = float(np.std(vals, ddof=1)) if k > 1 else 1.0
        V = float(prior[gi])
        for i in members:
            if name == "grpo":
                m0 = mean if k > 1 else 0.0
                out[i] = (r[i] - m0) / (std + 1e-6)
            elif name == "drgrpo":
                out[i] = r[i] - (mean if k > 1 else 0.0)
            elif name == "rloo":
                out[i] = r[i] if k == 1 else r[i] - (np.sum(vals) - r[i]) / (k - 1)
            elif name == "mcgrpo":
                med = float(np.median(vals)) if k > 1 else 0.0
                out[i] = (r[i] - med) / (std + 1e-6)
            elif name == "prior-only":
                b = mean if math.isnan(V) else V
                out[i] = (r[i] - b) / max(math.sqrt(1 - b * b), DEFAULT_STD_FLOOR)
            elif name == "v05":
                if math.isnan(V):
                    mu = mean
                else:
                    d2 = max(0.0, (mean - V) ** 2 - 1 / k)
                    w = d2 / (d2 + 1 / k)
                    mu = w * mean + (1 - w) * V
                out[i] = (r[i] - mu) / max(math.sqrt(max(1 - mu * mu, 0.0)), DEFAULT_STD_FLOOR)
            else:  # pragma: no cover
                raise KeyError(name)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "mcgrpo", "prior-only", "v05"])
def test_loop_vs_vectorized(name, seed):
    r, g, prior = _batch(seed)
    got = get_estimator(name)(r, g, prior=prior)
    np.testing.assert_allclose(got, _loop_reference(name, r, g, prior), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["bernoulli", "empirical-bayes"])
def test_v05_methods_loop_vs_vectorized(method, seed):
    # the per-group fusion is vectorized over (G,), the standardization is per rollout: check the latter by loop
    r, g, prior = _batch(seed)
    stats = v05_group_stats(r, g, prior=prior, method=method)
    adv = v05_advantages(r, g, prior=prior, method=method)
    for i in range(r.size):
        gi = g[i]
        mu = float(stats.mu[gi])
        assert adv[i] == pytest.approx((r[i] - mu) / max(math.sqrt(1 - mu * mu), DEFAULT_STD_FLOOR))
    # and group statistics are those of the loop
    for gi in range(prior.size):
        vals = r[g == gi]
        assert stats.count[gi] == vals.size and stats.mean[gi] == pytest.approx(vals.mean())


def test_every_registered_estimator_is_tested():
    assert set(estimator_names()) == {"grpo", "drgrpo", "rloo", "mcgrpo", "prior-only", "v05"}
    assert set(fusion_methods()) == {"paper", "bernoulli", "empirical-bayes"}


def test_permutation_invariance_empirical_bayes():
    r, g, prior = _batch(7)
    perm = np.random.default_rng(0).permutation(r.size)
    a = v05_advantages(r, g, prior=prior, method="empirical-bayes")
    b = v05_advantages(r[perm], g[perm], prior=prior, method="empirical-bayes")
    np.testing.assert_allclose(a[perm], b, atol=1e-12)


def test_grpo_matches_torch_std_reference():
    # verl: (r − mean) / (torch.std(r) + eps) with Bessel's correction; singleton groups: mean 0, std 1
    r, g, _ = _batch(11)
    rt = torch.tensor(r, dtype=torch.float32)
    ref = torch.empty_like(rt)
    for gi in np.unique(g):
        sel = torch.tensor(g == gi)
        vals = rt[sel]
        if vals.numel() == 1:
            m, s = torch.tensor(0.0), torch.tensor(1.0)
        else:
            m, s = vals.mean(), vals.std()
        ref[sel] = (vals - m) / (s + 1e-6)
    torch.testing.assert_close(grpo_advantages(rt, torch.tensor(g)), ref)


# ---------------------------------------------------------------------------------------------
# numpy vs torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "mcgrpo", "prior-only", "v05"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_torch_equal(name, dtype):
    r, g, prior = _batch(3)
    a_np = get_estimator(name)(r, g, prior=prior)
    a_t = get_estimator(name)(torch.tensor(r, dtype=dtype), torch.tensor(g), prior=torch.tensor(prior))
    assert isinstance(a_t, torch.Tensor) and a_t.dtype == dtype and isinstance(a_np, np.ndarray)
    np.testing.assert_allclose(a_t.numpy(), a_np, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["paper", "bernoulli", "empirical-bayes"])
def test_fusion_numpy_torch_equal(method):
    r, g, prior = _batch(5)
    a_np = v05_advantages(r, g, prior=prior, method=method)
    a_t = v05_advantages(torch.tensor(r), torch.tensor(g), prior=torch.tensor(prior), method=method)
    assert a_t.dtype == torch.float64
    np.testing.assert_allclose(a_t.numpy(), a_np, rtol=1e-12, atol=1e-12)


def test_integer_rewards_accepted():
    out = grpo_advantages(np.array([1, -1, 1, 1], dtype=np.int8), np.array([0, 0, 1, 1]))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [1 / (math.sqrt(2) + 1e-6), -1 / (math.sqrt(2) + 1e-6), 0, 0])


# ---------------------------------------------------------------------------------------------
# empirical Bayes behaviour
# ---------------------------------------------------------------------------------------------


def _sim(sigma: float, n: int = 2000, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.beta(0.8, 0.8, n)
    mu = 2 * p - 1
    prior = np.clip(mu + rng.normal(0, sigma, n), -1, 1)
    x = rng.binomial(k, p)
    return 2 * x / k - 1, np.full(n, k), prior, mu


def test_empirical_bayes_beats_paper_and_mean_with_good_prior():
    mean, k, prior, mu = _sim(0.1)
    mse = {m: np.mean((fused_baseline(mean, k, prior, method=m)[0] - mu) ** 2) for m in ["paper", "empirical-bayes"]}
    assert mse["empirical-bayes"] < 0.5 * mse["paper"]
    assert mse["empirical-bayes"] < 0.5 * np.mean((mean - mu) ** 2)


def test_empirical_bayes_trusts_prior_less_when_it_is_worse():
    w_good = fused_baseline(*_sim(0.05)[:3], method="empirical-bayes")[1].mean()
    w_bad = fused_baseline(*_sim(0.6)[:3], method="empirical-bayes")[1].mean()
    assert w_good < 0.2 < w_bad


def test_empirical_bayes_rejects_a_hallucinating_prior():
    # a good batch plus one prompt whose prior says 0.9 while 0 of 8 rollouts succeed
    mean, k, prior, _ = _sim(0.1, n=500, k=8)
    mean = np.append(mean, -1.0)
    k = np.append(k, 8)
    prior = np.append(prior, 0.9)
    mu, w, d2 = fused_baseline(mean, k, prior, method="empirical-bayes")
    assert w[-1] > 0.95 and mu[-1] < -0.85


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rewards, index, prior, match",
    [
        ([1.0, float("nan")], [0, 0], None, "rewards"),
        ([1.0, 0.0], [0, 0], None, r"rewards: expected every reward to be -1 or \+1"),
        ([1.0, -1.0], [0, 0, 1], None, "group_index: expected the same shape"),
        ([1.0, -1.0], [0, 2], None, r"groups \[1\]"),
        ([1.0, -1.0], [0, 0], [0.5, 0.1], r"groups \[1\]"),
        ([1.0, -1.0], [0, 1], [1.5, 0.0], r"prior: expected values in \[-1, 1\]"),
        ([1.0, -1.0], [0, 1], [0.5], r"group_index: id 1 is out of range"),
        ([1.0, -1.0], [0.5, 1], None, "group_index: expected integer"),
        ([], [], None, "rewards"),
    ],
)
def test_bad_input(rewards, index, prior, match):
    with pytest.raises(ValueError, match=match):
        v05_advantages(np.array(rewards), np.array(index), prior=None if prior is None else np.array(prior))


def test_bad_input_other_paths():
    with pytest.raises(ValueError, match="k: expected rollout counts"):
        fused_baseline(np.array([0.0]), np.array([0]), np.array([0.1]))
    with pytest.raises(ValueError, match="mean: expected group means"):
        fused_baseline(np.array([1.5]), np.array([4]), np.array([0.1]))
    with pytest.raises(ValueError, match="k: expected the shape"):
        fused_baseline(np.array([0.5, 0.0]), np.array([4]), np.array([0.1, 0.2]))
    with pytest.raises(KeyError, match="valid names"):
        fuse(np.array([0.5]), np.array([4]), np.array([0.1]), method="nope")
    with pytest.raises(KeyError, match="valid names"):
        get_estimator("ppo")
    with pytest.raises(ValueError, match="std_floor"):
        v05_advantages(np.array([1.0]), np.array([0]), std_floor=0.0)
    with pytest.raises(ValueError, match="rewards"):
        group_stats(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
