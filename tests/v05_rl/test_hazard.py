"""The ±1 hazard of Eq. 7-10 (issue 12, item 6): hand-computed advantages under the paper's σ* and the fix.

`sigma_rule="paper"` (the estimator functions' default): σ* = max(sqrt(1 - μ*²), 0.1).
`sigma_rule="noise-bound"` (the engine's default, `OslaConfig.sigma_rule`): σ* also >= 1/sqrt(k).
"""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v05_rl.allocation import OslaConfig
from v05_rl.estimators import (
    SAFE_SIGMA_RULE,
    SIGMA_RULES,
    prior_only_advantages,
    v05_advantages,
    v05_group_stats,
)


def _one_group(rewards, prior, sigma_rule="noise-bound", **kw):
    r = np.asarray(rewards, dtype=float)
    return v05_advantages(r, np.zeros(len(r), dtype=int), prior=np.array([prior]), sigma_rule=sigma_rule, **kw)


def test_the_engine_uses_the_fix_and_the_functions_the_paper():
    assert OslaConfig().sigma_rule == SAFE_SIGMA_RULE == "noise-bound"
    assert set(SIGMA_RULES.names()) == {"paper", "noise-bound"}
    r, g = np.array([1.0, 1.0, 1.0, -1.0]), np.zeros(4, dtype=int)
    assert v05_advantages(r, g, prior=np.array([1.0]))[-1] == pytest.approx(-20)  # function default: the paper
    with pytest.raises(ValueError, match="sigma_rule"):
        OslaConfig(sigma_rule="clip")


def test_paper_rule_reproduces_minus_20_at_v_plus_1_k4():
    # V = 1, rewards (1, 1, 1, -1): v̄ = 0.5, (0.5 - 1)² = 0.25, 1/k = 0.25 -> Δ̂² = max(0, 0) = 0 (kept)
    # ŵ = 0 -> μ* = V = 1 -> sqrt(1 - 1) = 0 -> σ* = floor 0.1
    # successes: (1 - 1)/0.1 = 0; the failure: (-1 - 1)/0.1 = -20
    adv = _one_group([1, 1, 1, -1], 1.0, sigma_rule="paper")
    np.testing.assert_allclose(adv, [0, 0, 0, -20], atol=1e-12)


def test_paper_rule_v_098_gives_minus_9_9():
    # V = 0.98: (0.5 - 0.98)² = 0.2304 < 0.25 -> kept, μ* = 0.98, σ* = sqrt(1 - 0.9604) = sqrt(0.0396) = 0.198997
    # failure: -1.98/0.198997 = -9.9499; successes: 0.02/0.198997 = 0.100504
    adv = _one_group([1, 1, 1, -1], 0.98, sigma_rule="paper")
    s = math.sqrt(1 - 0.98**2)
    np.testing.assert_allclose(adv, [0.02 / s] * 3 + [-1.98 / s], rtol=1e-12)
    assert adv[-1] == pytest.approx(-9.9499, abs=1e-4)


def test_fix_bounds_the_contradicting_rollout_at_k4():
    # noise-bound: σ* = max(sqrt(1 - μ*²), 1/sqrt(4) = 0.5, 0.1)
    # V = 1: μ* = 1 -> σ* = 0.5 -> failure (-1 - 1)/0.5 = -4, successes 0
    np.testing.assert_allclose(_one_group([1, 1, 1, -1], 1.0), [0, 0, 0, -4], atol=1e-12)
    # V = 0.98: sqrt(0.0396) = 0.199 < 0.5 -> σ* = 0.5 -> failure -1.98/0.5 = -3.96, successes 0.02/0.5 = 0.04
    np.testing.assert_allclose(_one_group([1, 1, 1, -1], 0.98), [0.04] * 3 + [-3.96], atol=1e-12)
    # V = -1 mirrors it: one success of 4 -> (1 - (-1))/0.5 = +4
    np.testing.assert_allclose(_one_group([-1, -1, -1, 1], -1.0), [0, 0, 0, 4], atol=1e-12)


def test_k2_the_test_rejects_one_contradiction_under_both_rules():
    # V = 1, rewards (1, -1): v̄ = 0, (0 - 1)² = 1 > 1/2 -> Δ̂² = 0.5, ŵ = 0.5/(0.5 + 0.5) = 0.5
    # μ* = 0.5·0 + 0.5·1 = 0.5, sqrt(1 - 0.25) = 0.866 > 1/sqrt(2) = 0.707 -> the floor does not act
    # A = (1 - 0.5)/0.866 = 0.57735, (-1 - 0.5)/0.866 = -1.73205
    expected = [0.5 / math.sqrt(0.75), -1.5 / math.sqrt(0.75)]
    for rule in ("paper", "noise-bound"):
        np.testing.assert_allclose(_one_group([1, -1], 1.0, sigma_rule=rule), expected, rtol=1e-12)


def test_fix_leaves_ordinary_groups_alone():
    # V = 0.2, rewards (1, 1, -1, -1): v̄ = 0, (0 - 0.2)² = 0.04 < 0.25 -> μ* = 0.2, σ* = sqrt(0.96) = 0.9798 > 0.5
    r = [1, 1, -1, -1]
    np.testing.assert_allclose(_one_group(r, 0.2), _one_group(r, 0.2, sigma_rule="paper"), rtol=1e-12)
    # no prior: μ* = v̄; for 0 < successes < k, 1 - v̄² >= 4(k - 1)/k² >= 1/k (k >= 2): never floored
    for k in range(2, 17):
        for s in range(1, k):
            rr = np.array([1.0] * s + [-1.0] * (k - s))
            a = v05_advantages(rr, np.zeros(k, dtype=int), prior=np.array([np.nan]), sigma_rule="noise-bound")
            b = v05_advantages(rr, np.zeros(k, dtype=int), prior=np.array([np.nan]), sigma_rule="paper")
            np.testing.assert_allclose(a, b, rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 16), s=st.data(), prior=st.one_of(st.floats(-1, 1), st.just(float("nan"))))
def test_fix_bounds_every_advantage_by_2_sqrt_k(k, s, prior):
    # |r - μ*| <= 2 and σ* >= 1/sqrt(k) -> |A| <= 2 sqrt(k), whatever the prior (exactly ±1 included)
    successes = s.draw(st.integers(0, k))
    r = np.array([1.0] * successes + [-1.0] * (k - successes))
    adv = v05_advantages(r, np.zeros(k, dtype=int), prior=np.array([prior]), sigma_rule="noise-bound")
    assert np.all(np.abs(adv) <= 2 * math.sqrt(k) + 1e-9)


def test_paper_rule_at_k16_lets_two_failures_through():
    # k = 16, V = 1, 14 successes: v̄ = 12/16 = 0.75, (0.25)² = 0.0625 = 1/16 -> kept, μ* = 1
    # paper: each failure (-2)/0.1 = -20; fix: σ* = 1/4 -> -8
    r = [1] * 14 + [-1] * 2
    assert _one_group(r, 1.0, sigma_rule="paper")[-1] == pytest.approx(-20)
    assert _one_group(r, 1.0)[-1] == pytest.approx(-8)


def test_group_stats_report_the_rule_sigma_and_torch_agrees():
    r = np.array([1, 1, 1, -1, 1, -1], dtype=float)
    g = np.array([0, 0, 0, 0, 1, 1])
    prior = np.array([1.0, 0.0])
    gs = v05_group_stats(r, g, prior=prior, sigma_rule="noise-bound")
    # group 0: μ* = 1, σ* = 1/sqrt(4) = 0.5; group 1: V = 0, v̄ = 0 -> μ* = 0, σ* = 1
    np.testing.assert_allclose(gs.sigma, [0.5, 1.0])
    assert v05_group_stats(r, g, prior=prior, sigma_rule="paper").sigma[0] == pytest.approx(0.1)
    at = v05_advantages(torch.tensor(r), torch.tensor(g), prior=torch.tensor(prior), sigma_rule="noise-bound")
    np.testing.assert_allclose(at.numpy(), v05_advantages(r, g, prior=prior, sigma_rule="noise-bound"), rtol=1e-6)


def test_prior_only_uses_the_same_rule():
    # baseline V = 1 for 4 rollouts: paper (-1 - 1)/0.1 = -20, fix (-2)/0.5 = -4
    r = np.array([1.0, 1.0, 1.0, -1.0])
    g = np.zeros(4, dtype=int)
    assert prior_only_advantages(r, g, prior=np.array([1.0]), sigma_rule="paper")[-1] == pytest.approx(-20)
    assert prior_only_advantages(r, g, prior=np.array([1.0]), sigma_rule="noise-bound")[-1] == pytest.approx(-4)


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(KeyError, match="noise-bound"):
        _one_group([1, -1], 0.5, sigma_rule="nope")


def second_moment(prior: float, k: int, p: float, rule: str) -> float:
    """E[A²] per rollout over all 2^k outcomes of k rollouts with success probability p (exact enumeration)."""
    total = 0.0
    for outcome in itertools.product((1.0, -1.0), repeat=k):
        prob = math.prod(p if r > 0 else 1 - p for r in outcome)
        adv = _one_group(outcome, prior, sigma_rule=rule)
        total += prob * float(np.mean(adv**2))
    return total


def test_fix_keeps_the_advantage_second_moment_near_one_when_the_prior_overclaims():
    # V = 1 claims p = 1; true p = 0.95, k = 4. Paper: a single failure (P = 4·0.05·0.95³ = 0.1715) contributes
    # 20²/4 = 100 per rollout -> E[A²] >= 17; the fix caps that term at 4²/4 = 4 -> E[A²] < 1.5
    # (the exact enumeration gives paper 17.16, fix 0.70).
    paper, fix = second_moment(1.0, 4, 0.95, "paper"), second_moment(1.0, 4, 0.95, "noise-bound")
    assert paper > 17 and fix < 1.5
