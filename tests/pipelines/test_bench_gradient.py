"""`v05 bench gradient`: statistics by hand, the shared-forward gradients, pairing, and the mechanism itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipelines.bench.gradient import (
    Arm,
    GradientBenchConfig,
    arm_advantages,
    arm_gradients,
    build_arms,
    cosines,
    distinct_directions,
    rank_in_group,
    reference_advantages,
    run_gradient_bench,
    smoothed_success,
    t_ci95,
)

REQUIRED = {"name", "k", "prior", "method", "cos_batch", "cos_batch_ci95", "cos_heldout", "cos_heldout_ci95", "n_repeats"}
GOOD_FIRST = set("0123456789abcdefghijklmnopqrstuvwxyz")  # 36 of the 98 tokens: p ≈ 0.37 for a fresh policy


def first_char_reward(prompts, responses) -> np.ndarray:
    """+1 when the response starts with a digit or a lower-case letter: learnable by any tiny policy."""
    return np.array([1.0 if r[:1] in GOOD_FIRST else -1.0 for r in responses])


def fresh_policy(path, seed: int = 0) -> str:
    from v05_rl.policies import PolicySpec, build_policy

    model, tok = build_policy(PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------------------------------ by hand


def test_t_ci95_by_hand():
    mean, half = t_ci95([1.0, 2.0, 3.0])
    # mean 2, sd (ddof 1) = 1, t_{0.975, 2} = 4.302653 -> half = 4.302653 / sqrt(3) = 2.484138
    assert mean == 2.0 and half == pytest.approx(2.484138, abs=1e-6)
    assert math.isnan(t_ci95([0.5])[1]) and t_ci95([0.5])[0] == 0.5
    assert t_ci95([1.0, float("nan"), 3.0])[0] == 2.0  # NaN repeats are left out


def test_reference_advantages_by_hand():
    rewards = np.array([1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    group = np.array([0, 0, 0, 0, 1, 1])
    adv = reference_advantages(rewards, group, "none")
    # group 0: 1 - mean(-1, -1, -1) = 2; -1 - mean(1, -1, -1) = -2/3; group 1 (all agree): 0
    np.testing.assert_allclose(adv, [2.0, -2 / 3, -2 / 3, -2 / 3, 0.0, 0.0])
    std = reference_advantages(rewards, group, "std")
    # group 0: 1 success of 4 -> p̃ = 1.5 / 5 = 0.3 -> σ̂ = 2·sqrt(0.21)
    np.testing.assert_allclose(std[:4], adv[:4] / (2 * math.sqrt(0.21)))
    np.testing.assert_allclose(smoothed_success(np.array([0, 32]), 32), [0.5 / 33, 32.5 / 33])


def test_rank_in_group_and_distinct_directions():
    assert rank_in_group(np.array([1, 0, 1, 0, 2, 1])).tolist() == [0, 0, 1, 1, 0, 2]
    a, b = np.array([1.0, -1.0, 0.5]), np.array([1.0, 1.0, 0.0])
    keep, back = distinct_directions(np.stack([a, 2 * a, b, 0 * a, -a]))
    assert keep.tolist() == [0, 2, 3, 4] and back.tolist() == [0, 0, 1, 2, 3]  # -a points the other way
    assert distinct_directions(np.stack([a, a * (1 + 1e-3)]) + [[0, 0, 0], [0, 1e-3, 0]])[0].tolist() == [0, 1]


def test_grpo_and_v05_without_prior_point_the_same_way():
    rng = np.random.default_rng(0)
    for k in (2, 4, 8):
        rewards = rng.choice([-1.0, 1.0], size=10 * k)
        group = np.repeat(np.arange(10), k)
        a = np.stack([arm_advantages(Arm("g", k, "none", "group-mean-std"), rewards, group, {}),
                      arm_advantages(Arm("v", k, "none", "paper"), rewards, group, {})])
        assert distinct_directions(a)[0].tolist() == [0]  # sqrt(1 - v̄²) is the population std of ±1 rewards


def test_arms_of_the_brief():
    names = [a.name for a in build_arms(GradientBenchConfig(), with_v0=True)]
    assert len(names) == 2 * (2 + 6 * 2) and "v05-oracle-noise0.4-empirical-bayes-k2" in names
    assert "v05-v0-paper-k4" in names and "v05-history-paper-k4" in names and "v05-mean-paper-k4" in names
    assert not any("v0" in a.prior for a in build_arms(GradientBenchConfig(), with_v0=False))
    with pytest.raises(ValueError, match="methods"):
        GradientBenchConfig(methods=("nope",))
    with pytest.raises(ValueError, match="ks must be"):
        GradientBenchConfig(ks=(1,))


# ------------------------------------------------------------------------------------------ gradients


def test_arm_gradients_equal_batch_gradient_per_arm(tmp_path):
    from v05_rl.engine.update import UpdateSettings, batch_gradient
    from v05_rl.policies import load_policy
    from v05_rl.rollout import SamplingConfig, get_backend
    from v05_rl.types import Chunk

    torch.manual_seed(0)
    model, tok = load_policy(fresh_policy(tmp_path / "pol"))
    batch = get_backend("hf", model, tok).generate(["1+1=", "2*3=", "9-4="], 3, SamplingConfig(max_new_tokens=4), seed=1)
    group = np.asarray(batch.prompt_index, dtype=np.int64)
    rewards = np.where(np.arange(len(group)) % 2 == 0, 1.0, -1.0)
    adv = np.stack([rewards * 0.7, np.where(group == 1, 0.0, rewards - 0.2)])  # arm 2 skips prompt 1's rows
    got = arm_gradients(model, batch, group, adv, 1.0, micro_batch_size=4)  # several micro-batches
    settings = UpdateSettings(loss_agg="prompt-mean", clip_low=0.2, clip_high=0.2, kl_coef=0.0, entropy_coef=0.0,
                              grad_clip=1.0, ppo_epochs=1, n_minibatches=1, micro_batch_size=256, temperature=1.0)
    for m in range(2):
        want = batch_gradient(model, [Chunk(batch, group, rewards)], adv[m], settings)
        torch.testing.assert_close(got[m], want, rtol=1e-4, atol=1e-7)
    assert cosines(got, got[0])[0] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ end to end


def tiny_cfg(policy: str, **kw) -> GradientBenchConfig:
    base = dict(policy=policy, tasks_path="n_prompts=200", batch_prompts=8, heldout_prompts=6, ref_rollouts=8, ks=(2, 4),
                repeats=3, oracle_rollouts=8, history_rollouts=2, noise_stds=(0.4,), max_new_tokens=3)
    return GradientBenchConfig(**{**base, **kw})


@pytest.mark.slow
def test_bench_writes_the_schema_and_pairs_the_arms(tmp_path, monkeypatch):
    from v05_rl.engine.collect import RolloutSource

    calls = []
    original = RolloutSource.__call__

    def spy(self, prompts, n, seed, *, record=True):
        calls.append((len(prompts), n, seed))
        return original(self, prompts, n, seed, record=record)

    monkeypatch.setattr(RolloutSource, "__call__", spy)
    cfg = tiny_cfg(fresh_policy(tmp_path / "pol"), history_center="base-rate")
    result = run_gradient_bench(cfg, tmp_path / "out", progress=False, reward_fn=first_char_reward)
    data = json.loads((tmp_path / "out" / "gradient.json").read_text())
    assert (tmp_path / "out" / "gradient.png").stat().st_size > 0 and (tmp_path / "out" / "gradient.md").exists()
    assert len(data["arms"]) == len(build_arms(cfg, with_v0=False)) == 2 * (2 + 4 * 2)
    for arm in data["arms"]:
        assert REQUIRED <= set(arm) and arm["n_repeats"] == 3
        assert arm["cos_batch_ci95"] >= 0 and -1 <= arm["cos_batch"] <= 1
    assert "v0 arms skipped: no --v0-checkpoint" in data["notes"]
    # pairing: one draw of max(k) = 4 rollouts per batch prompt per repeat, each with its own seed
    draws = [c for c in calls if c[:2] == (8, 4)]
    assert len(draws) == 3 and len({c[2] for c in draws}) == 3
    # ... shared by the arms of a repeat: grpo and v05-none point the same way on the same draw
    arms = {a["name"]: a for a in result["arms"]}
    for k in (2, 4):
        assert arms[f"grpo-k{k}"]["cos_batch_repeats"] == arms[f"v05-none-k{k}"]["cos_batch_repeats"]
        assert arms[f"v05-none-k{k}"]["diff_vs_grpo_batch"] == pytest.approx(0.0, abs=1e-12)
    assert arms["v05-oracle-paper-k2"]["cos_batch_repeats"] != arms["grpo-k2"]["cos_batch_repeats"]


@pytest.mark.slow
def test_a_perfect_prior_restores_the_k2_gradient(tmp_path):
    """The mechanism: at k = 2 about half the groups are degenerate, so grpo throws their rollouts away; an
    oracle prior uses them. Over 20 paired repeats the oracle arm must align better with the reference."""
    cfg = tiny_cfg(fresh_policy(tmp_path / "pol"), batch_prompts=24, ref_rollouts=32, oracle_rollouts=64, repeats=20,
                   ks=(2,), noise_stds=(), methods=("paper",), history_rollouts=4)
    result = run_gradient_bench(cfg, tmp_path / "out", progress=False, reward_fn=first_char_reward)
    arms = {a["name"]: a for a in result["arms"]}
    oracle = arms["v05-oracle-paper-k2"]
    assert result["degenerate_groups"]["2"] > 0.3
    assert oracle["diff_vs_grpo_batch"] - oracle["diff_vs_grpo_batch_ci95"] > 0.0, oracle


def test_policy_from_a_run_folder(tmp_path):
    from pipelines.bench.gradient import load_bench_policy
    from v05_rl.policies import load_policy

    base = fresh_policy(tmp_path / "base", seed=0)
    trained, _ = load_policy(fresh_policy(tmp_path / "other", seed=1))  # stands in for the weights after training
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"config": {"policy": base}, "model": trained.state_dict()}, run / "checkpoints" / "step_0000003.pt")
    (run / "checkpoints" / "latest").write_text("step_0000003.pt")
    model, _ = load_bench_policy(str(run), "cpu")  # before the run wrote policy/: the latest checkpoint
    for a, b in zip(model.parameters(), trained.parameters()):
        assert torch.equal(a, b)
    fresh_policy(run / "policy", seed=2)  # a finished run: policy/ wins
    model, _ = load_bench_policy(str(run), "cpu")
    want, _ = load_policy(run / "policy")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), want.parameters()))
    with pytest.raises(FileNotFoundError, match="run folder"):
        load_bench_policy(str(tmp_path), "cpu")


def test_command_help_and_errors():
    from click.testing import CliRunner

    from pipelines.bench.gradient import gradient

    res = CliRunner().invoke(gradient, ["--help"])
    assert res.exit_code == 0 and "--v0-checkpoint" in res.output and "--quick" in res.output
    res = CliRunner().invoke(gradient, ["--ks", "1,4", "--out", "unused"])
    assert res.exit_code != 0 and "ks must be rollouts per prompt >= 2" in res.output
    res = CliRunner().invoke(gradient, ["--noise", "0.2,x", "--out", "unused"])
    assert res.exit_code != 0 and "--noise" in res.output and "comma-separated list of floats" in res.output
