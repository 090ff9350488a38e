"""Tests of v05_rl.allocation: Eq. 12, the cap, the halt rule, padding to a multiple of 32."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from v05_rl.allocation import OslaConfig, plan_round, target_k


def test_defaults_are_the_papers():
    cfg = OslaConfig()
    assert asdict(cfg) == {
        "k_init": 4, "step": 2, "c": 0.0039, "k_max": None, "halt_fraction": 0.25, "pad_multiple": 32, "method": "paper",
        "no_prior": "cap", "sigma_rule": "noise-bound",
    }
    # 1/sqrt(0.0039) = 16.0128 → cap 16
    assert cfg.cap == 16
    assert OslaConfig(c=1 / 64).cap == 8  # 1/sqrt(1/64) = 8 exactly, no rounding loss
    assert OslaConfig(k_max=12).cap == 12


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k_init": 0}, "k_init"),
        ({"step": 0}, "step"),
        ({"c": 0.0}, "c"),
        ({"c": 1.5}, "c"),
        ({"k_max": 2}, "k_max"),
        ({"c": 0.5}, "floor"),
        ({"halt_fraction": 1.5}, "halt_fraction"),
        ({"pad_multiple": 0}, "pad_multiple"),
        ({"method": "magic"}, "valid: bernoulli, empirical-bayes, paper"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OslaConfig(**kwargs)


def test_target_k_eq12():
    # 1/sqrt(0.0039) = 16.012815; Δ̂² = 0.1 → 16.0128 − 10 = 6.0128; Δ̂² = 0 → −inf; Δ̂² = ∞ → 16.0128
    out = target_k(np.array([0.1, 0.0, np.inf, 2.99]), 0.0039)
    base = 1 / math.sqrt(0.0039)
    np.testing.assert_allclose(out[[0, 2, 3]], [base - 10, base, base - 1 / 2.99])
    assert out[1] == -np.inf
    # generalized noise ν: sqrt(ν/c) − ν/Δ̂²; ν = 0.25, c = 1/64, Δ̂² = 0.5 → 4 − 0.5 = 3.5
    assert target_k(np.array([0.5]), 1 / 64, 0.25)[0] == pytest.approx(3.5)
    t = target_k(torch.tensor([0.1, 0.0]), 0.0039)
    assert isinstance(t, torch.Tensor) and t[1] == -math.inf


def test_cold_start_tops_up_to_k_init():
    extra = plan_round(np.array([0, 0, 3, 4]), np.array([0, 0, 1, 2]), np.array([0.1, np.nan, 0.2, 0.3]))
    np.testing.assert_array_equal(extra, [4, 4, 1, 0])


def _contradicting_batch(n_prompts: int, n_bad: int):
    # every prior is 0.8 and every prompt has 4 rollouts. Good prompts: 4 of 4 correct (sum 4) → Δ̂² = 0.
    # Bad prompts: 0 of 4 (sum −4): Δ̂² = 3.24 − 0.25 = 2.99, k_target = 16.0128 − 1/2.99 = 15.68 > 4 → need.
    counts = np.full(n_prompts, 4)
    sums = np.full(n_prompts, 4)
    sums[:n_bad] = -4
    return counts, sums, np.full(n_prompts, 0.8)


def test_halt_rule_fewer_than_a_quarter():
    # 64 prompts: 25 % is 16. With 15 needing more the whole round halts; with 16 it does not.
    assert plan_round(*_contradicting_batch(64, 15)).sum() == 0
    extra = plan_round(*_contradicting_batch(64, 16))
    # 16 prompts × 2 = 32, already a multiple of 32: no padding
    np.testing.assert_array_equal(extra, [2] * 16 + [0] * 48)
    # halt_fraction 0: one needing prompt is enough
    assert plan_round(*_contradicting_batch(64, 1), OslaConfig(halt_fraction=0.0))[0] >= 2


def test_padding_goes_to_prompts_that_still_need_most():
    # 17 needing prompts × 2 = 34 → padded to 64: 30 padding rollouts. The 17 still need more after this
    # round (target 15.68 > 6), so the padding goes to them, 2 at a time: 15 get 4, 2 get 2; others 0.
    extra = plan_round(*_contradicting_batch(64, 17))
    assert extra.sum() == 64
    assert np.all(extra[17:] == 0)
    assert sorted(extra[:17].tolist()) == [2, 2] + [4] * 15


def test_padding_prefers_larger_remaining_need():
    # prompts 0..15 need more (0 of 4 correct against prior 0.8); among them prompt 5 has no prior
    # (target = cap) and prompts 10..15 a weaker contradiction: prior 0.2, v̄ = −1 → Δ̂² = 1.44 − .25 = 1.19,
    # target 16.01 − 0.84 = 15.17, below the 15.68 of the others, so they come last for padding.
    counts, sums, priors = _contradicting_batch(64, 16)
    priors[10:16] = 0.2
    priors[5] = np.nan
    sums[16] = 2  # a good prompt (3 of 4 correct), never needs
    cfg = OslaConfig(pad_multiple=48)  # 32 needed + 16 padding
    extra = plan_round(counts, sums, priors, cfg)
    assert extra.sum() == 48
    assert extra[5] == 4  # no prior: largest need
    assert np.all(extra[10:16] == 2)  # weaker need: no padding
    assert np.all(extra[16:] == 0)


def test_cap_is_never_exceeded_and_partial_steps():
    # prompts at 14, 15, 16 rollouts that all contradict their prior: +2, +1, +0
    counts = np.array([14, 15, 16, 4])
    sums = -counts
    extra = plan_round(counts, sums, np.full(4, 0.9), OslaConfig(pad_multiple=1))
    np.testing.assert_array_equal(extra, [2, 1, 0, 2])


def test_no_waste_when_everyone_is_at_the_cap():
    counts = np.array([15, 16, 16])
    extra = plan_round(counts, -counts, np.full(3, 0.9), OslaConfig())
    np.testing.assert_array_equal(extra, [1, 0, 0])  # cannot pad to 32 without exceeding the cap


def test_torch_in_torch_out():
    counts, sums, priors = _contradicting_batch(64, 16)
    out = plan_round(torch.tensor(counts), torch.tensor(sums), torch.tensor(priors))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    np.testing.assert_array_equal(out.numpy(), plan_round(counts, sums, priors))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 200),
    halt=st.sampled_from([0.0, 0.25, 0.5]),
    pad=st.sampled_from([1, 8, 32]),
    method=st.sampled_from(["paper", "bernoulli", "empirical-bayes"]),
)
def test_planner_properties(seed, n, halt, pad, method):
    rng = np.random.default_rng(seed)
    cfg = OslaConfig(halt_fraction=halt, pad_multiple=pad, method=method)
    counts = rng.integers(cfg.k_init, cfg.cap + 1, n)
    succ = rng.binomial(counts, rng.random(n))
    sums = 2 * succ - counts
    priors = np.where(rng.random(n) < 0.1, np.nan, rng.uniform(-1, 1, n))
    extra = plan_round(counts, sums, priors, cfg)
    assert extra.dtype == np.int64 and np.all(extra >= 0)
    assert np.all(counts + extra <= cfg.cap)  # never past the cap
    total = int(extra.sum())
    if total:
        # padded to the multiple unless every prompt reached the cap
        assert total % pad == 0 or np.all(counts + extra == cfg.cap)
        # the halt rule: more rollouts only if at least halt_fraction of prompts got the base step
        assert np.count_nonzero(extra) >= halt * n


def test_osla_loop_terminates_within_cap():
    rng = np.random.default_rng(0)
    p = rng.random(512)
    prior = np.clip(2 * p - 1 + rng.normal(0, 0.5, 512), -1, 1)
    rewards = np.where(rng.random((512, 16)) < p[:, None], 1, -1)
    cfg = OslaConfig(halt_fraction=0.0)
    counts = np.zeros(512, dtype=np.int64)
    for _ in range(20):
        sums = np.array([rewards[i, : counts[i]].sum() for i in range(512)])
        extra = plan_round(counts, sums, prior, cfg)
        if extra.sum() == 0:
            break
        counts += extra
    else:  # pragma: no cover
        pytest.fail("OSLA did not stop")
    assert counts.min() >= 4 and counts.max() <= 16


@pytest.mark.parametrize(
    "counts, sums, priors, match",
    [
        ([4, 4], [4], [0.1, 0.2], "equal lengths"),
        ([4], [3], [0.1], "parity"),
        ([4], [6], [0.1], "sums"),
        ([4], [2], [1.2], "priors"),
        ([17], [17], [0.1], "cap"),
        ([-1], [1], [0.1], "counts"),
        ([], [], [], "empty"),
    ],
)
def test_bad_input(counts, sums, priors, match):
    with pytest.raises(ValueError, match=match):
        plan_round(np.array(counts), np.array(sums), np.array(priors, dtype=float))


def test_no_prior_k_init_stops_prompts_without_a_prior():
    # a batch with no prior at all: 'cap' samples every prompt on, 'k_init' stops after the cold start
    counts, sums = np.full(8, 4), np.zeros(8)
    priors = np.full(8, np.nan)
    assert np.all(plan_round(counts, sums, priors, OslaConfig(pad_multiple=1)) == 2)
    assert np.all(plan_round(counts, sums, priors, OslaConfig(pad_multiple=1, no_prior="k_init")) == 0)
    # mixed batch: prompts with a contradicted prior still get more; the prior-less one only padding, last
    counts, sums, priors = _contradicting_batch(32, 16)
    priors[5] = np.nan
    extra = plan_round(counts, sums, priors, OslaConfig(pad_multiple=1, no_prior="k_init"))
    assert extra[5] == 0 and np.all(extra[:16][np.arange(16) != 5] == 2) and np.all(extra[16:] == 0)
    extra = plan_round(counts, sums, priors, OslaConfig(pad_multiple=32, no_prior="k_init"))
    assert extra.sum() == 32 and extra[5] == 0  # 30 needed + 2 padding, which goes to prompts with a prior
    with pytest.raises(ValueError, match="no_prior"):
        OslaConfig(no_prior="never")
