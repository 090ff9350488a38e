"""`v05 report` renders from a small fixture run; `v05 experiment` plans its grid."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.report import mean_band, rollouts_to_reach, write_report


def _fake_run(path, *, slope, seed, steps=6, per_step=256):
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(path / "metrics.jsonl", "w") as fh:
        for step in range(steps + 1):
            acc = 0.2 + slope * step + 0.01 * rng.standard_normal()
            fh.write(json.dumps({"kind": "eval", "step": step, "rollouts_used": step * per_step, "mean_at_k": acc}) + "\n")
            if step:
                fh.write(json.dumps({"kind": "train", "step": step, "rollouts_used": step * per_step, "grad_norm": 1.0 / step,
                                     "entropy": 1.0, "prior_reject": 0.1, "k_mean": 4.5, "t_step": 0.5,
                                     "k_hist": {"4": 50, "6": 10}}) + "\n")


def test_rollouts_to_reach_interpolates():
    # curve (0, 0.1) -> (100, 0.3): 0.2 is reached halfway, at x = 50
    assert rollouts_to_reach(np.array([0.0, 100.0]), np.array([0.1, 0.3]), 0.2) == pytest.approx(50.0)
    assert math.isnan(rollouts_to_reach(np.array([0.0, 100.0]), np.array([0.1, 0.3]), 0.5))


def test_mean_band_over_common_range():
    a = (np.array([0.0, 10.0]), np.array([0.0, 1.0]))
    b = (np.array([0.0, 20.0]), np.array([1.0, 3.0]))
    grid, mean, std = mean_band([a, b], n_grid=3)
    # common range [0, 10]; at x=5: a=0.5, b=1.5 -> mean 1.0, std 0.5
    assert grid.tolist() == [0.0, 5.0, 10.0]
    assert mean[1] == pytest.approx(1.0) and std[1] == pytest.approx(0.5)


def test_report_renders_from_fixture(tmp_path):
    exp = tmp_path / "exp"
    for seed in (0, 1):
        _fake_run(exp / "grpo16" / f"seed{seed}", slope=0.02, seed=seed)
        _fake_run(exp / "v05" / f"seed{seed}", slope=0.05, seed=seed, per_step=128)
    md = write_report([exp], tmp_path / "rep")
    text = md.read_text()
    assert "| v05 |" in text and "| grpo16 |" in text
    for png in ("accuracy_vs_rollouts.png", "grad_norm.png", "k_distribution.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["rows"]}
    assert summary["reference"] == "grpo16"
    # v05 learns faster per rollout: it reaches grpo16's final accuracy with fewer rollouts
    assert rows["v05"]["rollouts_to_ref_final"] < rows["grpo16"]["rollouts"]
    assert rows["v05"]["final_acc"] > rows["grpo16"]["final_acc"]


def test_report_cli_rejects_folder_without_runs(tmp_path):
    from pipelines.cli import main

    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code != 0 and "no run found" in res.output


@pytest.mark.parametrize("name", ["main", "sparse", "prior-quality", "cost"])
def test_experiment_grids_plan(name, tmp_path):
    from pipelines.experiment import load_experiment, plan_runs

    source, data = load_experiment(name)
    specs = plan_runs(data, tmp_path, seeds=None, only=[], overrides={}, v0_checkpoint=str(tmp_path / "v0.pt"),
                      source=source)
    assert len(specs) == len(data["variants"]) * len(data["seeds"])
    assert len(data["seeds"]) >= 3
    from pipelines.config import dotted_keys
    from v05_rl.engine.config import TrainConfig

    keys = set(dotted_keys(TrainConfig))
    for spec in specs:
        assert set(spec.settings) <= keys, set(spec.settings) - keys  # settings travel as dotted keys
    for spec in specs:
        cmd = spec.command(1, resume=False)
        assert cmd[cmd.index("--out") + 1] == str(spec.out)


def test_experiment_v0_prior_needs_checkpoint(tmp_path):
    from pipelines.experiment import load_experiment, plan_runs

    source, data = load_experiment("main")
    with pytest.raises(ValueError, match="--v0-checkpoint"):
        plan_runs(data, tmp_path, seeds=None, only=[], overrides={}, v0_checkpoint=None, source=source)
