"""`v05 report` renders from a small fixture run; the protocol's statistics; `v05 experiment` plans its grid."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from pipelines.common import json_safe
from pipelines.report import (
    mean_band,
    mean_ci95,
    paired_rows,
    read_run,
    rollouts_to_reach,
    t_quantile_975,
    write_report,
)


def _fake_run(path, *, slope, seed, steps=6, per_step=256):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
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
    grid, mean, half = mean_band([a, b], n_grid=3)
    # common range [0, 10]; at x=5: a=0.5, b=1.5 -> mean 1.0, sd (ddof 1) = sqrt(0.5) = 0.7071,
    # CI half-width = t(0.975, 1) · sd / sqrt(2) = 12.7062 · 0.5 = 6.3531
    assert grid.tolist() == [0.0, 5.0, 10.0]
    assert mean[1] == pytest.approx(1.0) and half[1] == pytest.approx(6.3531, abs=1e-3)


def test_t_quantile_matches_scipy():
    from scipy import stats

    for df in list(range(1, 41)) + [60, 100, 500]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-7), df


def test_mean_ci95_hand_values():
    # [0.60, 0.62, 0.64]: mean 0.62, sd (ddof 1) = 0.02, t(0.975, 2) = 4.302653 -> 4.302653 · 0.02 / sqrt(3) = 0.049683
    mean, half = mean_ci95([0.60, 0.62, 0.64])
    assert mean == pytest.approx(0.62) and half == pytest.approx(0.049683, abs=1e-6)
    assert math.isnan(mean_ci95([0.5])[1])  # one seed: no interval
    assert mean_ci95([0.5, float("nan"), 0.7])[0] == pytest.approx(0.6)  # NaN values are dropped


def _eval_only_run(path, seed, accs, steps_per_eval=10, per_step=256):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    with open(path / "metrics.jsonl", "w") as fh:
        for i, acc in enumerate(accs):
            step = i * steps_per_eval
            fh.write(json.dumps({"kind": "eval", "step": step, "rollouts_used": step * per_step, "mean_at_k": acc}) + "\n")
            fh.write(json.dumps({"kind": "train", "step": step + 1, "rollouts_used": (step + 1) * per_step}) + "\n")


def test_final_accuracy_is_the_mean_of_the_last_two_evaluations(tmp_path):
    _eval_only_run(tmp_path / "r", 0, [0.2, 0.4, 0.6, 0.7])
    run = read_run(tmp_path / "r")
    assert run.final_acc == pytest.approx(0.65)  # (0.6 + 0.7) / 2
    assert run.seed == 0 and run.acc_at("step", 15) == pytest.approx(0.5)  # steps 10 -> 20: halfway 0.4 -> 0.6


def test_paired_rows_pair_by_seed(tmp_path):
    # reference accs 0.50, 0.52, 0.54 (seeds 0-2); variant 0.53, 0.56, 0.56 and a seed 3 without a partner
    # diffs 0.03, 0.04, 0.02: mean 0.03, sd 0.01, CI 4.302653 · 0.01 / sqrt(3) = 0.024841
    for seed, (a, b) in enumerate([(0.50, 0.53), (0.52, 0.56), (0.54, 0.56)]):
        _eval_only_run(tmp_path / "ref" / f"seed{seed}", seed, [a, a])
        _eval_only_run(tmp_path / "var" / f"seed{seed}", seed, [b, b])
    _eval_only_run(tmp_path / "var" / "seed3", 3, [0.9, 0.9])
    from pipelines.report import by_variant, discover_runs

    rows = paired_rows(by_variant(discover_runs([tmp_path])), ["ref"], lambda r: r.final_acc)
    assert len(rows) == 1
    row = rows[0]
    assert (row["variant"], row["reference"], row["n_pairs"]) == ("var", "ref", 3)
    assert row["diff"] == pytest.approx(0.03) and row["ci95"] == pytest.approx(0.024841, abs=1e-6)


def test_summary_json_protocol_schema_equal_steps_and_no_nan(tmp_path):
    exp = tmp_path / "exp"
    for seed in (0, 1, 2):
        _eval_only_run(exp / "grpo16" / f"seed{seed}", seed, [0.2, 0.3, 0.4, 0.5 + 0.01 * seed])  # evals at 0..30
        _eval_only_run(exp / "osla" / f"seed{seed}", seed, [0.2, 0.35, 0.5 + 0.01 * seed])  # fewer steps: 0..20
    _eval_only_run(exp / "single" / "seed0", 0, [0.2, 0.3, 0.4])  # one seed: no CI -> null
    write_report([exp], tmp_path / "rep", reference=["grpo16"])
    text = (tmp_path / "rep" / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text)
    assert {tuple(sorted(v)) for v in summary["variants"]} == {
        ("final_acc", "final_acc_ci95", "rollouts", "seeds", "steps", "variant")}
    assert {tuple(sorted(p)) for p in summary["paired"]} == {("ci95", "diff", "n_pairs", "reference", "variant")}
    v = {row["variant"]: row for row in summary["variants"]}
    assert v["single"]["final_acc_ci95"] is None and v["single"]["seeds"] == 1
    # grpo16 final per seed s: (0.4 + 0.5 + 0.01 s)/2 -> 0.45, 0.455, 0.46; osla: (0.35 + 0.5 + 0.01 s)/2
    assert v["grpo16"]["final_acc"] == pytest.approx(0.455)
    paired = {(p["variant"], p["reference"]): p for p in summary["paired"]}
    # osla - grpo16 = (0.35 - 0.4)/2 = -0.025 for every seed: CI half-width 0
    assert paired[("osla", "grpo16")]["diff"] == pytest.approx(-0.025) and paired[("osla", "grpo16")]["n_pairs"] == 3
    assert paired[("osla", "grpo16")]["ci95"] == pytest.approx(0.0, abs=1e-12)
    # equal steps: the common step is 20 (osla and single evaluated up to 20); grpo16 at step 20 = 0.4,
    # osla 0.5 + 0.01 s -> diffs 0.10, 0.11, 0.12: mean 0.11, CI 4.302653 · 0.01 / sqrt(3) = 0.024841
    eq = summary["equal_steps"]
    assert eq["step"] == 20
    eq_paired = {(p["variant"], p["reference"]): p for p in eq["paired"]}
    assert eq_paired[("osla", "grpo16")]["diff"] == pytest.approx(0.11)
    assert eq_paired[("osla", "grpo16")]["ci95"] == pytest.approx(0.024841, abs=1e-6)
    assert "| osla | grpo16 | -2.5 ± 0.0 | +11.0 ± 2.5 | 3 |" in (tmp_path / "rep" / "report.md").read_text()
    # the paired differences are drawn (a forest plot), first among the figures
    assert summary["figures"][0] == "paired_differences.png"
    assert (tmp_path / "rep" / "paired_differences.png").stat().st_size > 1000


def test_line_styles_are_distinct_for_many_variants():
    from pipelines.report import line_style

    for n in (3, 12, 25):
        styles = [line_style(i, n) for i in range(n)]
        assert len({(tuple(c), ls) for c, ls in styles}) == n


def test_no_paired_figure_without_pairs(tmp_path):
    from pipelines.report import paired_figure

    assert not paired_figure([], tmp_path / "p.png") and not (tmp_path / "p.png").exists()
    one_pair = [{"variant": "a", "reference": "b", "diff": 0.01, "ci95": None, "n_pairs": 1}]
    assert not paired_figure(one_pair, tmp_path / "p.png")  # one pair: no CI, nothing to draw


def test_json_safe_replaces_non_finite():
    assert json_safe({"a": [float("nan"), 1.0, np.float64("inf")], "b": np.int64(3)}) == {"a": [None, 1.0, None], "b": 3}


@pytest.mark.slow
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
