"""The `v05` estimator as verl runs it: through verl's own `compute_advantage`, on uneven uid groups."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

import torch  # noqa: E402

from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

from v05_rl.estimators import v05_advantages  # noqa: E402
from v05_rl.verl import estimator as est  # noqa: E402

NAN = float("nan")
L = 5  # response length of the synthetic rows


def make_batch(rewards, uids, baselines, lengths=None):
    """DataProto with the reward on the last response token, as verl's reward loop writes it."""
    n = len(rewards)
    lengths = lengths if lengths is not None else [3] * n
    mask = torch.zeros(n, L)
    scores = torch.zeros(n, L)
    for i, (r, ln) in enumerate(zip(rewards, lengths)):
        mask[i, :ln] = 1
        if ln:
            scores[i, ln - 1] = r
    data = DataProto.from_dict(
        tensors={
            "token_level_rewards": scores,
            "response_mask": mask,
            "reward_baselines": torch.tensor(baselines, dtype=torch.float32),
        },
        non_tensors={"uid": np.array(uids, dtype=object)},
    )
    return data


# Three prompts with 4, 2 and 6 rollouts, interleaved (grouping must follow uid, not position):
#   "a": prior V = 0.8, rewards +1 +1 +1 -1
#   "b": prior V = -0.8, rewards +1 +1
#   "c": no prior (NaN), rewards +1 -1 -1 -1 -1 -1
UIDS = ["a", "b", "c", "a", "c", "a", "b", "c", "a", "c", "c", "c"]
REWARDS = [1, 1, 1, 1, -1, 1, 1, -1, -1, -1, -1, -1]
PRIOR = {"a": 0.8, "b": -0.8, "c": NAN}

# Hand computation (paper Eq. 6-10):
# a: k = 4, v̄ = (1+1+1-1)/4 = 0.5; (0.5 - 0.8)² = 0.09 ≤ 1/4 -> Δ̂² = 0, ŵ = 0, μ* = 0.8,
#    σ* = sqrt(1 - 0.64) = 0.6; A(+1) = 0.2/0.6 = 1/3, A(-1) = -1.8/0.6 = -3.
# b: k = 2, v̄ = 1; (1 + 0.8)² = 3.24, Δ̂² = 3.24 - 0.5 = 2.74, ŵ = 2.74/3.24 = 0.845679,
#    μ* = 0.845679·1 + 0.154321·(-0.8) = 0.722222, σ* = sqrt(1 - 0.521605) = 0.691661,
#    A(+1) = 0.277778/0.691661 = 0.401610.
# c: no prior -> μ* = v̄ = -4/6 = -0.666667, σ* = sqrt(1 - 0.444444) = 0.745356,
#    A(+1) = 1.666667/0.745356 = 2.236068, A(-1) = -0.333333/0.745356 = -0.447214.
HAND = {("a", 1): 1 / 3, ("a", -1): -3.0, ("b", 1): 0.401610, ("c", 1): 2.236068, ("c", -1): -0.447214}


def _run(data, config=None):
    return compute_advantage(data, adv_estimator="v05", config=config)


def test_registered_in_verl_registry():
    assert core_algos.get_adv_estimator_fn("v05") is est.compute_v05_outcome_advantage
    # re-registering the same function is allowed (import in several processes / twice)
    core_algos.register_adv_est("v05")(est.compute_v05_outcome_advantage)


PAPER = {"v05": {"sigma_rule": "paper"}}  # Eq. 10 as printed (the default is the noise-bound σ*)


def test_uneven_groups_match_hand_computation_through_compute_advantage():
    data = make_batch(REWARDS, UIDS, [PRIOR[u] for u in UIDS])
    out = _run(data, config=PAPER)
    adv = out.batch["advantages"]  # [N, L]
    mask = out.batch["response_mask"]
    for i, (u, r) in enumerate(zip(UIDS, REWARDS)):
        expected = HAND[(u, r)]
        assert adv[i, 0].item() == pytest.approx(expected, abs=1e-5), (i, u, r)
        # broadcast over response tokens, zero on padding tokens
        assert torch.equal(adv[i], adv[i, 0] * mask[i])
    assert torch.equal(out.batch["returns"], adv)


def test_matches_pure_function():
    rng = np.random.default_rng(0)
    sizes = [1, 2, 3, 5, 8, 16, 4]
    uids = np.concatenate([[f"p{g}"] * k for g, k in enumerate(sizes)])
    perm = rng.permutation(len(uids))
    uids = uids[perm]
    rewards = rng.choice([-1.0, 1.0], size=len(uids))
    prior_g = np.array([0.3, -0.9, NAN, 0.0, 1.0, -1.0, 0.55])
    gid = np.array([int(u[1:]) for u in uids])
    data = make_batch(rewards.tolist(), uids.tolist(), prior_g[gid].tolist())
    for method in ("paper", "bernoulli", "empirical-bayes"):
        got = _run(data, config={"v05": {"method": method, "sigma_rule": "paper"}}).batch["advantages"][:, 0]
        # the pure function on groups renumbered in order of first appearance (what the adapter does)
        first_seen = {u: i for i, u in enumerate(dict.fromkeys(uids))}
        dense = np.array([first_seen[u] for u in uids])
        prior_dense = np.empty(len(first_seen))
        for u, i in first_seen.items():
            prior_dense[i] = prior_g[int(u[1:])]
        want = v05_advantages(torch.tensor(rewards, dtype=torch.float32), torch.tensor(dense), prior=torch.tensor(prior_dense, dtype=torch.float32), method=method)
        torch.testing.assert_close(got, want.to(torch.float32), rtol=1e-5, atol=1e-5)


def test_default_sigma_has_the_noise_floor_of_k():
    # noise-bound σ* = max(sqrt(1 - μ*²), 1/sqrt(k)): only "b" changes (k = 2: σ* 0.691661 < 1/sqrt(2) = 0.707107),
    # A(+1) = 0.277778 / 0.707107 = 0.392837; "a" (0.6 > 1/2) and "c" (0.745356 > 1/sqrt(6)) keep HAND's values
    data = make_batch(REWARDS, UIDS, [PRIOR[u] for u in UIDS])
    adv = _run(data).batch["advantages"][:, 0]
    for i, (u, r) in enumerate(zip(UIDS, REWARDS)):
        want = 0.392837 if u == "b" else HAND[(u, r)]
        assert adv[i].item() == pytest.approx(want, abs=1e-5), (i, u, r)


def test_padding_rows_get_zero_and_do_not_join_groups():
    # group "a" as above plus one masked row that claims uid "a" and reward -1: it must be ignored
    uids = ["a", "a", "a", "a", "a"]
    rewards = [1, 1, 1, -1, -1]
    data = make_batch(rewards, uids, [0.8] * 5, lengths=[3, 3, 3, 3, 0])
    adv = _run(data).batch["advantages"][:, 0]
    # a: with the masked row ignored, k = 4 and the values of HAND["a"] hold
    assert adv[:4].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, -3.0], abs=1e-5)
    assert adv[4].item() == 0.0


def test_reward_maps():
    # 0/1 scores with reward_map=01 equal ±1 scores with pm1
    data01 = make_batch([1, 1, 1, 0], ["a"] * 4, [0.8] * 4)
    adv = _run(data01, config={"v05": {"reward_map": "01"}}).batch["advantages"][:, 0]
    assert adv.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, -3.0], abs=1e-5)
    with pytest.raises(ValueError, match="reward_map"):
        _run(make_batch([1, 1, 1, 0], ["a"] * 4, [0.8] * 4))
    # shaped scores with "positive": 0.7 -> +1, -0.2 -> -1
    shaped = make_batch([0.7, 0.7, 0.7, -0.2], ["a"] * 4, [0.8] * 4)
    adv = _run(shaped, config={"v05": {"reward_map": "positive"}}).batch["advantages"][:, 0]
    assert adv.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, -3.0], abs=1e-5)


def test_no_reward_baselines_means_no_prior():
    # c from above without any prior column: μ* = v̄ = -2/3
    data = make_batch([1, -1, -1, -1, -1, -1], ["c"] * 6, [NAN] * 6)
    data.batch.pop("reward_baselines")
    adv = _run(data).batch["advantages"][:, 0]
    assert adv[0].item() == pytest.approx(2.236068, abs=1e-5)
    assert adv[1].item() == pytest.approx(-0.447214, abs=1e-5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="disagree within one uid group"):
        _run(make_batch([1, -1], ["a", "a"], [0.8, 0.5]))
    data = make_batch([1, -1], ["a", "a"], [0.8, 0.8])
    data.non_tensor_batch.pop("uid")
    with pytest.raises(ValueError, match="uid"):
        _run(data)
    with pytest.raises(ValueError, match="prior"):
        _run(make_batch([1, -1], ["a", "a"], [1.5, 1.5]))
    with pytest.raises(ValueError, match="v05.method"):
        _run(make_batch([1, -1], ["a", "a"], [0.8, 0.8]), config={"v05": {"method": "nope"}})


def test_uid_groups_first_appearance_order():
    gid, first = est.uid_groups(np.array(["x", "y", "x", "z", "y"], dtype=object), np.ones(5, dtype=bool))
    assert gid.tolist() == [0, 1, 0, 2, 1]
    assert first.tolist() == [0, 1, 3]
    assert math.isclose(est.EstimatorOptions.from_config({"v05": {"std_floor": 0.2}}).std_floor, 0.2)
