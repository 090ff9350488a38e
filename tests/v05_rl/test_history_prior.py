"""The `history` and `v0+history` prior sources: per-prompt discounted Beta–Bernoulli posteriors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v0_data.tasks.base import Prompt
from v05_rl.priors import (
    PRIOR_HELP,
    PRIOR_SOURCES,
    DiscountedBetaTable,
    HistoryPrior,
    PriorOptions,
    PriorRuntime,
    PriorSource,
    V0HistoryPrior,
    make_prior_source,
)
from v05_rl.priors.history import beta_posterior_mean, history_over_v0, prior_from_success


def prompts(n: int) -> list[Prompt]:
    return [Prompt.new("arith", "train", f"{i}*3=", str(3 * i)) for i in range(n)]


def ids(ps: list[Prompt]) -> list[int]:
    return [p.prompt_id for p in ps]


# ------------------------------------------------------------------------------------------ math by hand


def test_history_prior_by_hand():
    ps = prompts(3)
    src = HistoryPrior(DiscountedBetaTable(discount=0.5), a0=1.0, b0=1.0)
    assert isinstance(src, PriorSource)
    assert np.isnan(src.priors(ps)).all()  # never observed: no prior
    src.observe(ids(ps[:2]), [1.0, 0.25], counts=[4, 4])
    # prompt 0: α = 4, β = 0 -> p̂ = (4 + 1) / (4 + 0 + 2) = 5/6 -> V = 2/3
    # prompt 1: α = 1, β = 3 -> p̂ = (1 + 1) / (4 + 2) = 1/3 -> V = -1/3
    np.testing.assert_allclose(src.priors(ps)[:2], [2 / 3, -1 / 3], rtol=1e-12)
    assert np.isnan(src.priors(ps)[2])
    src.observe(ids(ps[:1]), [0.5], counts=[2])
    # prompt 0: α = 0.5·4 + 1 = 3, β = 0.5·0 + 1 = 1 -> p̂ = (3 + 1) / (4 + 2) = 2/3 -> V = 1/3
    np.testing.assert_allclose(src.priors(ps)[0], 1 / 3, rtol=1e-12)


def test_a_rate_without_counts_is_one_observation_of_weight_one():
    ps = prompts(1)
    src = HistoryPrior(DiscountedBetaTable(discount=1.0))
    src.observe(ids(ps), [0.75])
    # α = 0.75, β = 0.25 -> p̂ = (0.75 + 1) / (1 + 2) = 7/12 -> V = 1/6
    np.testing.assert_allclose(src.priors(ps), [1 / 6], rtol=1e-12)


def test_step_discount_fades_unseen_prompts_and_lazy_equals_eager():
    """Loop-vs-reference equivalence: the lazy γ^(steps since seen) equals decaying every prompt every step."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        table = DiscountedBetaTable(discount=0.8, unit="step")
        eager_a, eager_b = np.zeros(6), np.zeros(6)
        for _step in range(12):
            chosen = rng.choice(6, size=rng.integers(1, 4), replace=False)
            rates = rng.integers(0, 5, size=len(chosen)) / 4
            table.update(chosen, rates, counts=np.full(len(chosen), 4))
            eager_a, eager_b = 0.8 * eager_a, 0.8 * eager_b
            eager_a[chosen] += 4 * rates
            eager_b[chosen] += 4 * (1 - rates)
            alpha, beta, seen = table.lookup(np.arange(6))
            np.testing.assert_allclose(alpha[seen], eager_a[seen], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(beta[seen], eager_b[seen], rtol=1e-12, atol=1e-12)


def test_observation_discount_ignores_steps_in_between():
    table = DiscountedBetaTable(discount=0.5, unit="observation")
    table.update([1], [1.0], counts=[4])
    for _ in range(10):
        table.update([2], [0.0], counts=[4])  # other prompts' steps do not age prompt 1
    assert table.lookup([1])[0].tolist() == [4.0]
    table.update([1, 1], [0.0, 0.0], counts=[2, 2])  # a repeated id is observed twice, in order
    # α: 4 -> 0.5·4 + 0 = 2 -> 0.5·2 = 1; β: 0 -> 2 -> 0.5·2 + 2 = 3
    a, b, _ = table.lookup([1])
    assert (a.tolist(), b.tolist()) == ([1.0], [3.0])


@settings(max_examples=60, deadline=None)
@given(
    obs=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 64), st.integers(1, 64)), min_size=1, max_size=30),
    discount=st.floats(0.05, 1.0),
    unit=st.sampled_from(["observation", "step"]),
    a0=st.floats(1e-3, 5.0),
    b0=st.floats(1e-3, 5.0),
)
def test_history_prior_is_never_plus_minus_one(obs, discount, unit, a0, b0):
    ps = prompts(3)
    src = HistoryPrior(DiscountedBetaTable(discount, unit), a0=a0, b0=b0)
    for i, succ, n in obs:
        succ = min(succ, n)
        src.observe([ps[i].prompt_id], [succ / n], counts=[n])
        v = src.priors(ps)
        assert np.all(np.isnan(v) | (np.abs(v) < 1.0))


def test_huge_counts_still_stay_inside_the_open_interval():
    ps = prompts(2)
    src = HistoryPrior(DiscountedBetaTable(discount=1.0), a0=1e-3, b0=1e-3)
    src.observe(ids(ps), [1.0, 0.0], counts=[1e20, 1e20])  # p̂ rounds to 1.0 / 0.0 in float64
    v = src.priors(ps)
    assert v[0] < 1.0 and v[1] > -1.0 and abs(v[0]) > 0.999


# ------------------------------------------------------------------------------------------ state


def test_state_round_trips_through_json_exactly():
    ps = prompts(5)
    rng = np.random.default_rng(0)
    first = make_prior_source("history", PriorOptions(history_discount=0.7, history_discount_unit="step"))
    for _ in range(4):
        sel = rng.choice(5, size=3, replace=False)
        first.observe([ps[i].prompt_id for i in sel], rng.random(3), counts=rng.integers(1, 9, size=3))
    state = json.loads(json.dumps(first.state_dict()))  # what the verl trainer writes and reads
    second = make_prior_source("history", PriorOptions(history_discount=0.7, history_discount_unit="step"))
    second.load_state_dict(state)
    assert second.state_dict() == first.state_dict()
    for src in (first, second):
        src.observe(ids(ps[:2]), [0.3, 0.9], counts=[3, 5])
    assert np.array_equal(first.priors(ps), second.priors(ps), equal_nan=True)  # bit for bit
    other = make_prior_source("history", PriorOptions(history_discount=0.9))
    with pytest.raises(ValueError, match="resume with the same history_discount"):
        other.load_state_dict(state)


# ------------------------------------------------------------------------------------------ errors


def test_bad_input_and_options_are_refused():
    src = make_prior_source("history")
    with pytest.raises(ValueError, match=r"success_rates\[1\] = 2.0 is not a success rate"):
        src.observe([1, 2], [0.5, 2.0])
    with pytest.raises(ValueError, match=r"counts\[0\]"):
        src.observe([1], [0.5], counts=[-1])
    with pytest.raises(ValueError, match="one entry per prompt"):
        src.observe([1, 2], [0.5], counts=[4, 4])
    with pytest.raises(ValueError, match="history_discount must be in"):
        PriorOptions(history_discount=0.0)
    with pytest.raises(ValueError, match="history_discount_unit 'epoch' unknown"):
        PriorOptions(history_discount_unit="epoch")
    with pytest.raises(ValueError, match="must be > 0"):
        PriorOptions(history_a0=0.0)
    with pytest.raises(ValueError, match="a0 > 0 and b0 > 0"):
        HistoryPrior(a0=0.0)
    with pytest.raises(ValueError, match="needs --v0-checkpoint"):
        make_prior_source("v0+history")


def test_registered_with_help():
    for name in ("history", "v0+history"):
        assert name in PRIOR_SOURCES and PRIOR_HELP[name]


# ------------------------------------------------------------------------------------------ v0+history


def test_history_over_v0_rule_by_hand():
    v0 = np.array([0.6, 0.6, np.nan, np.nan, 1.0])
    alpha = np.array([0.0, 3.0, 3.0, 0.0, 0.0])
    beta = np.array([0.0, 1.0, 1.0, 0.0, 0.0])
    seen = np.array([False, True, True, False, False])
    v = history_over_v0(v0, alpha, beta, seen, 1.0, 1.0)
    assert v[0] == 0.6  # unseen: V0 as is
    # seen with V0 = 0.6: m = 0.8, n0 = 2 -> p̂ = (3 + 1.6) / (4 + 2) = 4.6/6 -> V = 2·4.6/6 - 1 = 0.5333…
    np.testing.assert_allclose(v[1], 2 * 4.6 / 6 - 1, rtol=1e-12)
    # seen, V0 absent: the flat Beta(1, 1) -> p̂ = 4/6 -> V = 1/3
    np.testing.assert_allclose(v[2], 1 / 3, rtol=1e-12)
    assert np.isnan(v[3])  # neither
    assert v[4] == 1.0  # unseen prompts keep V0's value verbatim (V0's own clip applies)
    # the history part is the plain history prior when V0 says exactly a0 / (a0 + b0)
    np.testing.assert_allclose(history_over_v0(np.array([0.0]), alpha[1:2], beta[1:2], seen[1:2], 1.0, 1.0),
                               prior_from_success(beta_posterior_mean(alpha[1:2], beta[1:2], 1.0, 1.0)))


class FakePredictor:
    """Stands in for `v0_model.model.V0Predictor`: p̂ = 0.2 for every query, texts 'embedded' on demand."""

    def __init__(self):
        self.cache: dict[int, str] = {}
        self.contexts: list[int] = []

    def ensure_texts(self, texts, progress=False):
        self.cache.update(texts)

    def known(self, prompt_id) -> bool:  # no stored features: every text must come from the prompts
        return False

    def predict(self, ctx_ids, ctx_rates, query_ids):
        self.contexts.append(len(ctx_ids))
        return np.full(len(query_ids), 0.2)


def test_v0_history_factory_feeds_v0_and_combines(monkeypatch):
    import v0_model.checkpoint

    fake = FakePredictor()
    monkeypatch.setattr(v0_model.checkpoint, "load_predictor", lambda path, **kw: fake)
    ps = prompts(6)
    runtime = PriorRuntime(prompts_by_id={p.prompt_id: p for p in ps})
    src = make_prior_source("v0+history", PriorOptions(v0_checkpoint="unused.pt", history_discount=0.5), runtime)
    assert isinstance(src, (PriorSource, V0HistoryPrior))
    assert np.isnan(src.priors(ps)).all()  # cold start: V0 has no context, no prompt observed
    src.observe(ids(ps[:3]), [0.0, 0.5, 1.0], counts=[4, 4, 4])
    assert len(src.support) == 3  # V0's support buffer was fed
    v = src.priors(ps)
    np.testing.assert_allclose(v[3:], [2 * 0.2 - 1] * 3)  # unseen: V0's prior (p̂ = 0.2)
    # seen: m = 0.2, n0 = 2 -> p̂ = (s + 0.4) / (4 + 2); s = 0, 2, 4
    np.testing.assert_allclose(v[:3], [2 * (s + 0.4) / 6 - 1 for s in (0, 2, 4)], rtol=1e-12)
    assert fake.contexts[-1] == 3
    state = json.loads(json.dumps(src.state_dict()))
    assert state["support"]["prompt_ids"] == ids(ps[:3]) and state["history"]["tick"] == 1
    again = make_prior_source("v0+history", PriorOptions(v0_checkpoint="unused.pt", history_discount=0.5), runtime)
    again.load_state_dict(state)
    assert again.state_dict() == src.state_dict()


def test_base_rate_center_by_hand():
    ps = prompts(4)
    src = make_prior_source("history", PriorOptions(history_center="base-rate"))
    assert src.beta_prior() == (1.0, 1.0)  # empty support buffer: the flat prior
    src.observe(ids(ps[:3]), [0.0, 0.0, 0.3], counts=[4, 4, 4])
    # support mean m = 0.1, n0 = a0 + b0 = 2 -> Beta(0.2, 1.8)
    np.testing.assert_allclose(src.beta_prior(), (0.2, 1.8))
    # prompt 0: α = 0, β = 4 -> p̂ = 0.2 / 6 -> V = 2·0.2/6 - 1 = -0.9333…
    np.testing.assert_allclose(src.priors(ps)[0], 2 * 0.2 / 6 - 1, rtol=1e-12)
    assert PriorOptions().history_center == "base-rate"  # the default (flat made k = 2 gradients worse)
    flat = make_prior_source("history", PriorOptions(history_center="flat"))
    flat.observe(ids(ps[:3]), [0.0, 0.0, 0.3], counts=[4, 4, 4])
    np.testing.assert_allclose(flat.priors(ps)[0], 2 * 1 / 6 - 1, rtol=1e-12)  # Beta(1, 1): V = -0.667
    with pytest.raises(ValueError, match="history_center 'mean' unknown"):
        PriorOptions(history_center="mean")
