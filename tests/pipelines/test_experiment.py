"""`v05 experiment`: regimes, references, paired seeds, protocol notes, resumability (no training is run)."""

import pytest
import yaml

from pipelines.experiment import (
    DEFAULT_SEEDS,
    RunSpec,
    load_experiment,
    plan_runs,
    protocol_notes,
    run_one,
)


def _write(tmp_path, data):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


GRID = {
    "config": "tiny.yaml",
    "reference": ["a"],
    "common": {"rollout_budget": 512, "evaluation": {"prompts": 1024, "k": 8}},
    "regimes": {"r1": {"tasks_path": "n_prompts=3000"}, "r2": {"tasks_path": "n_prompts=2000"}},
    "variants": {"a": {"algorithm": "grpo", "group_size": 16}, "b": {"algorithm": "v05-fixed", "k": 2, "tasks_path": "n_prompts=99"}},
}


def test_regimes_multiply_the_grid_and_layer_common_regime_variant_set(tmp_path):
    source, data = load_experiment(str(_write(tmp_path, GRID)))
    specs = plan_runs(data, tmp_path / "out", seeds=None, only=[], overrides={"steps": 3}, v0_checkpoint=None,
                      source=source)
    assert len(specs) == 2 * 2 * DEFAULT_SEEDS  # regimes x variants x the default 8 seeds
    by = {(s.regime, s.variant, s.seed): s for s in specs}
    a = by[("r1", "a", 0)]
    assert a.out == tmp_path / "out" / "r1" / "a" / "seed0"
    assert a.settings["tasks_path"] == "n_prompts=3000" and a.settings["steps"] == 3  # regime, then --set
    assert by[("r2", "b", 5)].settings["tasks_path"] == "n_prompts=99"  # the variant beats the regime
    # seed-major: all 4 (regime, variant) cells of seed 0 first, so a stopped grid leaves complete pairs
    assert [s.seed for s in specs[:4]] == [0] * 4 and specs[4].seed == 1
    # paired seeds: every arm of a regime runs the same seeds
    assert {s.seed for s in specs if s.variant == "a"} == {s.seed for s in specs if s.variant == "b"} == set(range(8))
    only_r2 = plan_runs(data, tmp_path, seeds=[1], only=["a"], overrides={}, v0_checkpoint=None, source=source,
                        regimes=["r2"])
    assert [(s.regime, s.variant, s.seed) for s in only_r2] == [("r2", "a", 1)]
    with pytest.raises(ValueError, match="no regime 'r3'"):
        plan_runs(data, tmp_path, seeds=[1], only=[], overrides={}, v0_checkpoint=None, source=source, regimes=["r3"])


def test_reference_must_be_a_variant(tmp_path):
    with pytest.raises(ValueError, match="reference 'zzz' is not a variant"):
        load_experiment(str(_write(tmp_path, {**GRID, "reference": "zzz"})))


def test_protocol_notes_flag_few_seeds_and_small_evaluation(tmp_path):
    small = {**GRID, "common": {"evaluation": {"prompts": 256, "k": 4}}}
    source, data = load_experiment(str(_write(tmp_path, small)))
    specs = plan_runs(data, tmp_path, seeds=[0, 1, 2], only=[], overrides={}, v0_checkpoint=None, source=source)
    notes = protocol_notes(specs)
    assert any("3 seeds" in n for n in notes)
    assert any("r1/a: evaluation 256 prompts x 4 samples" in n for n in notes)
    source, data = load_experiment(str(_write(tmp_path, GRID)))
    assert protocol_notes(plan_runs(data, tmp_path, seeds=None, only=[], overrides={}, v0_checkpoint=None,
                                    source=source)) == []


def test_shipped_grids_follow_the_protocol(tmp_path):
    from pipelines.experiment import experiment_names

    for name in experiment_names():
        source, data = load_experiment(name)
        specs = plan_runs(data, tmp_path, seeds=None, only=[], overrides={}, v0_checkpoint=str(tmp_path / "v0.pt"),
                          source=source)
        assert protocol_notes(specs) == [], name
        assert data.get("reference"), f"{name}: names no reference arm"


def test_prior_value_grid_arms_and_regimes(tmp_path):
    from pipelines.config import load_config
    from v05_rl.engine.config import TrainConfig

    source, data = load_experiment("prior-value")
    specs = plan_runs(data, tmp_path, seeds=[0], only=[], overrides={}, v0_checkpoint=str(tmp_path / "v0.pt"),
                      source=source)
    assert {s.regime for s in specs} == {"fresh", "multi-epoch"}
    cfgs = {(s.regime, s.variant): load_config(TrainConfig, "rl", s.config, s.settings) for s in specs}
    fresh = {v: c for (r, v), c in cfgs.items() if r == "fresh"}
    assert len({c.rollout_budget for c in cfgs.values()}) == 1  # equal rollouts
    assert (fresh["grpo16"].batch_prompts, fresh["grpo4"].batch_prompts) == (16, 64)  # 16 x 16 vs 64 x 4
    assert (fresh["k2-none"].batch_prompts, fresh["k4-none"].batch_prompts) == (128, 64)
    for k in (2, 4):
        assert {fresh[f"k{k}-{p}"].prior for p in ("none", "v0", "oracle", "history")} == {
            "none", "v0", "oracle-noise", "history"}
    assert fresh["osla-eb-v0"].osla.method == "empirical-bayes" and fresh["osla-v0"].osla.method == "paper"
    # fresh: the arm drawing the most prompts (k = 2: 128 per step) never repeats one within the budget
    draws = fresh["k2-none"].rollout_budget // fresh["k2-none"].rollouts_per_step * fresh["k2-none"].batch_prompts
    assert draws <= 8000 and "n_prompts=8000" in fresh["k2-none"].tasks_path
    # multi-epoch: every arm sees each pool prompt >= 5 times (GRPO-16 draws the fewest)
    multi = {v: c for (r, v), c in cfgs.items() if r == "multi-epoch"}
    pool = multi["grpo16"].train_prompts
    steps = multi["grpo16"].rollout_budget // multi["grpo16"].rollouts_per_step
    assert 100 <= pool <= 500 and steps * multi["grpo16"].batch_prompts / pool >= 5


def test_run_one_skips_a_finished_run(tmp_path):
    spec = RunSpec("a", 0, tmp_path / "missing.yaml", {}, tmp_path / "a" / "seed0")
    spec.out.mkdir(parents=True)
    (spec.out / "DONE").write_text("ok\n")
    assert run_one(spec, threads=1) == (spec, 0, 0.0)  # no process started (its config does not even exist)
