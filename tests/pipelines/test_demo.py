"""`v05 demo --quick` end to end: every stage runs, the report renders, a rerun resumes (skips all)."""

import json

import pytest
from click.testing import CliRunner


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("V05_CACHE", str(tmp_path / "cache"))
    from pipelines.cli import main

    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for stage in ("estimator-bench", "policies", "build-data", "v0", "rl", "report"):
        assert (out / stage / "DONE").exists(), stage
    # stage 1 filled the store with every rollout, and V0 was trained on it
    assert (out / "v0" / "v0.pt").stat().st_size > 0
    # stage 2: the three algorithms ran at the same rollout budget, each logged evaluations
    summary = json.loads((out / "report" / "summary.json").read_text())
    variants = {row["variant"]: row for row in summary["rows"]}
    assert set(variants) == {"v05", "grpo16", "dapo"}
    budget = 64 * 2
    for row in variants.values():
        assert budget <= row["rollouts"] < budget + 64 * 16  # stops at the first step past the budget
    assert (out / "report" / "accuracy_vs_rollouts.png").stat().st_size > 1000
    assert (out / "report" / "k_distribution.png").exists()  # from the per-step k_hist of the runs
    assert (out / "report" / "calibration.png").exists()  # V0 calibration, copied from the V0 report
    # rerun: every finished stage is skipped
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("already done") == 5
