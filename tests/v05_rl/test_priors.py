"""Prior sources and the support buffer (paper §4.1.3, Step 1)."""

from __future__ import annotations


import numpy as np
import pytest

from v0_data.tasks.base import Prompt
from v05_rl.priors import (
    PRIOR_SOURCES,
    MeanPrior,
    NoPrior,
    OracleNoisePrior,
    PriorOptions,
    PriorRuntime,
    PriorSource,
    SupportBuffer,
    check_priors,
    make_prior_source,
    noisy_prior,
)


def prompts(n: int) -> list[Prompt]:
    return [Prompt.new("arith", "train", f"{i}+1=", str(i + 1)) for i in range(n)]


# ------------------------------------------------------------------------------------------ buffer


def test_buffer_is_fifo_with_capacity():
    buf = SupportBuffer(capacity=3)
    buf.add([10, 11], [0.0, 0.5])
    buf.add([12, 13], [1.0, 0.25])  # 10 is evicted (oldest first)
    ids, rates = buf.arrays()
    assert ids.tolist() == [11, 12, 13]
    assert rates.tolist() == [0.5, 1.0, 0.25]
    assert len(buf) == 3


def test_buffer_default_capacity_is_the_papers():
    buf = SupportBuffer()
    buf.add(np.arange(600), np.full(600, 0.5))
    assert len(buf) == 512
    assert buf.arrays().prompt_ids[0] == 600 - 512  # the 88 oldest pairs left


def test_buffer_usable_needs_two_classes():
    buf = SupportBuffer()
    assert not buf.usable()  # empty: cold start
    buf.add([1, 2], [0.0, 0.0])
    assert not buf.usable()  # every rollout failed: one class only
    buf2 = SupportBuffer()
    buf2.add([1, 2], [1.0, 1.0])
    assert not buf2.usable()  # every rollout succeeded
    buf2.add([3], [0.0])
    assert buf2.usable()
    buf3 = SupportBuffer()
    buf3.add([1], [0.5])  # a prompt solved half the time holds both outcomes
    assert buf3.usable()


def test_buffer_sample_without_replacement():
    buf = SupportBuffer()
    buf.add(np.arange(300), np.linspace(0, 1, 300))
    s = buf.sample(256, np.random.default_rng(0))
    assert len(s.prompt_ids) == 256 and len(set(s.prompt_ids.tolist())) == 256
    # pairs stay aligned: rate of id i is i / 299
    assert np.allclose(s.success_rates, s.prompt_ids / 299)
    small = SupportBuffer()
    small.add([5, 6, 7], [0.1, 0.2, 0.3])
    got = small.sample(256, np.random.default_rng(1))
    assert sorted(got.prompt_ids.tolist()) == [5, 6, 7]  # fewer than n held: all of them
    # seeded: same rng seed, same sample
    assert buf.sample(16, np.random.default_rng(3)).prompt_ids.tolist() == buf.sample(16, np.random.default_rng(3)).prompt_ids.tolist()


def test_buffer_state_round_trip_and_errors():
    buf = SupportBuffer(capacity=4)
    buf.add([1, 2, 3], [0.0, 0.5, 1.0])
    other = SupportBuffer(capacity=4)
    other.load_state_dict(buf.state_dict())
    assert other.state_dict() == buf.state_dict()
    with pytest.raises(ValueError, match="capacity mismatch"):
        SupportBuffer(capacity=5).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match=r"success_rates\[1\] = -1.0"):
        buf.add([1, 2], [0.5, -1.0])  # a ±1 reward is not a rate
    with pytest.raises(ValueError, match="2 entries but success_rates has 1"):
        buf.add([1, 2], [0.5])
    with pytest.raises(ValueError, match="capacity"):
        SupportBuffer(capacity=0)


# ------------------------------------------------------------------------------------------ sources


def test_registry_names_and_unknown_source():
    assert {"none", "oracle-noise", "v0"} <= set(PRIOR_SOURCES.names())
    with pytest.raises(KeyError, match="valid names: .*none.*oracle-noise"):
        make_prior_source("magic")


def test_none_gives_nan_and_feeds_its_buffer():
    src = make_prior_source("none", PriorOptions(support_capacity=8))
    assert isinstance(src, PriorSource) and isinstance(src, NoPrior)
    v = src.priors(prompts(3))
    assert v.shape == (3,) and np.isnan(v).all()
    src.observe([1, 2], [0.25, 0.75])
    assert len(src.support) == 2 and src.support.capacity == 8


def test_mean_prior_is_the_buffer_mean_for_every_prompt_and_resumes():
    src = make_prior_source("mean", PriorOptions(support_capacity=4))
    assert isinstance(src, MeanPrior) and src.name == "mean"
    assert np.isnan(src.priors(prompts(2))).all()  # empty buffer: no prior
    src.observe([1, 2], [0.0, 0.0])
    assert np.isnan(src.priors(prompts(2))).all()  # one class only: not usable, as for V0
    src.observe([3], [0.75])
    # mean rate (0 + 0 + 0.75) / 3 = 0.25 -> V = 2 * 0.25 - 1 = -0.5, the same for every prompt
    assert src.priors(prompts(3)).tolist() == [-0.5, -0.5, -0.5]
    src.observe([4, 5], [1.0, 1.0])  # capacity 4: (1, 0.0) is evicted -> rates 0, 0.75, 1, 1 -> mean 0.6875
    assert src.priors(prompts(1)).tolist() == [2 * 0.6875 - 1]
    again = make_prior_source("mean", PriorOptions(support_capacity=4))
    again.load_state_dict(src.state_dict())
    assert again.priors(prompts(2)).tolist() == src.priors(prompts(2)).tolist()


def test_noisy_prior_by_hand():
    rng = np.random.default_rng(0)
    p = np.array([0.0, 0.25, 1.0])
    # σ = 0, no flips: V = 2p - 1 = [-1, -0.5, 1]
    assert noisy_prior(p, 0.0, 0.0, rng).tolist() == [-1.0, -0.5, 1.0]
    # every prior flipped: V = -(2p - 1)
    assert noisy_prior(p, 0.0, 1.0, rng).tolist() == [1.0, 0.5, -1.0]
    # σ large: clipped into [-1, 1]
    v = noisy_prior(np.full(1000, 0.5), 5.0, 0.0, np.random.default_rng(1))
    assert v.min() >= -1.0 and v.max() <= 1.0 and (np.abs(v) == 1.0).mean() > 0.5
    # σ = 0.1 around V = 0: sample std ≈ 0.1 (20k draws: standard error of the std ≈ 0.0005)
    v = noisy_prior(np.full(20000, 0.5), 0.1, 0.0, np.random.default_rng(2))
    assert abs(v.std() - 0.1) < 0.003
    # flip fraction 0.3 of V = +1 (p = 1, σ = 0): share of -1 ≈ 0.3 (std error ≈ 0.003)
    v = noisy_prior(np.ones(20000), 0.0, 0.3, np.random.default_rng(3))
    assert abs((v == -1.0).mean() - 0.3) < 0.015


def test_oracle_measures_with_extra_rollouts_and_is_resumable():
    calls = []

    def rate_fn(batch, n, seed):
        calls.append((len(batch), n, seed))
        return np.linspace(0.0, 1.0, len(batch))

    opts = PriorOptions(oracle_rollouts=64, noise_std=0.2, flip_fraction=0.1, seed=7)
    src = make_prior_source("oracle-noise", opts, PriorRuntime(success_rate_fn=rate_fn))
    assert isinstance(src, OracleNoisePrior)
    a = src.priors(prompts(5))
    assert np.allclose(src.last_truth, [-1.0, -0.5, 0.0, 0.5, 1.0])  # 2p - 1
    state = src.state_dict()
    b = src.priors(prompts(5))
    assert calls[0][:2] == (5, 64) and calls[0][2] != calls[1][2]  # each call its own seed
    assert not np.array_equal(a, b)
    # a fresh source restored from the state draws exactly the second call's priors again
    again = make_prior_source("oracle-noise", opts, PriorRuntime(success_rate_fn=rate_fn))
    again.load_state_dict(state)
    assert np.array_equal(again.priors(prompts(5)), b)
    assert calls[2][2] == calls[1][2]


def test_oracle_needs_a_measuring_function_and_sane_options():
    with pytest.raises(ValueError, match="success_rate_fn"):
        make_prior_source("oracle-noise")
    with pytest.raises(ValueError, match="flip_fraction"):
        OracleNoisePrior(lambda b, n, s: np.zeros(len(b)), flip_fraction=1.5)


def test_v0_source_errors_are_clear():
    with pytest.raises(ValueError, match="--v0-checkpoint"):
        make_prior_source("v0", PriorOptions())


def test_check_priors():
    assert np.isnan(check_priors(np.array([np.nan, 0.5]), 2, "s")[0])
    with pytest.raises(ValueError, match=r"prior\[1\] = 1.5"):
        check_priors(np.array([0.0, 1.5]), 2, "s")
    with pytest.raises(ValueError, match="shape"):
        check_priors(np.zeros(3), 2, "s")
