"""`v05 build-data` and `v05 evaluate` end to end on tiny fresh policies (CLI -> recipe -> engine -> store)."""

from __future__ import annotations

import json

import pytest

def _save_fresh_policy(path, seed):
    from v05_rl.policies import PolicySpec, build_policy

    model, tok = build_policy(PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_build_data_stores_every_step_of_every_policy_and_resumes(tmp_path):
    from click.testing import CliRunner

    from pipelines.cli.rl import build_data
    from v0_data.store import TrajectoryStore

    pols = [_save_fresh_policy(tmp_path / "pol-a", 0), _save_fresh_policy(tmp_path / "pol-b", 1)]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "rl:\n  tasks_path: 'n_prompts=40'\n  rollouts_per_step: 16\n  group_size: 4\n  max_new_tokens: 3\n"
        "  lr: 1.0e-3\n  eval_prompts: 0\n  save_every: 1\n"
        "build_data:\n  steps: 2\n"
    )
    store_dir = tmp_path / "store"
    args = ["--store", str(store_dir), "--config", str(cfg), "--policies", ",".join(pols), "--no-progress", "--threads", "1"]
    res = CliRunner().invoke(build_data, args)
    assert res.exit_code == 0, res.output
    with TrajectoryStore.open(store_dir, read_only=True) as store:
        rows = store.query("SELECT model, step, count(*) AS n FROM rollouts GROUP BY model, step ORDER BY model, step")
        # 2 policies × 2 steps × (16 // 4 = 4 prompts × 4 rollouts = 16)
        assert rows.to_pylist() == [
            {"model": "pol-a", "step": 0, "n": 16}, {"model": "pol-a", "step": 1, "n": 16},
            {"model": "pol-b", "step": 0, "n": 16}, {"model": "pol-b", "step": 1, "n": 16},
        ]
        stats = store.query("SELECT count(*) AS n FROM prompt_stats").column("n")[0].as_py()
        assert stats == 16  # 2 models × 2 steps × 4 prompts
    res = CliRunner().invoke(build_data, args)  # everything done: skipped, nothing duplicated
    assert res.exit_code == 0 and res.output.count("done already, skipping") == 2
    with TrajectoryStore.open(store_dir, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM rollouts").column("n")[0].as_py() == 64
    # a crash of pol-a before its first checkpoint: the rerun trains it again under the same run id, and
    # its re-written steps replace the earlier rows instead of adding to them
    import shutil

    run_a = store_dir / "build-data" / "pol-a"
    (run_a / "DONE").unlink()
    shutil.rmtree(run_a / "checkpoints")
    res = CliRunner().invoke(build_data, args)
    assert res.exit_code == 0, res.output
    with TrajectoryStore.open(store_dir, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM rollouts").column("n")[0].as_py() == 64
        assert store.query("SELECT count(*) AS n FROM runs").column("n")[0].as_py() == 2


def test_evaluate_cli(tmp_path):
    from click.testing import CliRunner

    from pipelines.cli.rl import evaluate

    pol = _save_fresh_policy(tmp_path / "pol", 0)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(evaluate, ["--policy", pol, "--tasks", "arith", "--path", "n_prompts=50", "--n-prompts", "6",
                                        "--k", "2", "--max-new-tokens", "3", "--out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["results"]["arith"]["n_prompts"] == 6 and result["results"]["arith"]["k"] == 2
    assert 0.0 <= result["results"]["arith"]["mean_at_k"] <= 1.0
