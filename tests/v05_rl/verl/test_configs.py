"""Every verl YAML shipped in pipelines/configs composes with verl's `ppo_trainer` defaults and passes
verl's own `validate_config`; the paper's settings are what the paper states (§4.1.3-4.1.4)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

from v05_rl.verl.entry import build_config, launch, validate  # noqa: E402
from v05_rl.verl.trainer import V05Settings  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[3] / "pipelines" / "configs"
# every YAML that layers itself on verl's defaults (tiny.yaml etc. belong to the embedded trainer)
VERL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if "pkg://verl.trainer.config" in p.read_text())
NEEDS = {"paper.yaml": ["v05.v0_checkpoint=/nonexistent/v0.pt"]}


@pytest.fixture(scope="module", params=VERL_CONFIGS)
def composed(request):
    return request.param, build_config(CONFIGS / request.param, NEEDS.get(request.param, []))


def test_the_three_configs_are_shipped():
    assert {"paper.yaml", "grpo.yaml", "dapo.yaml"} <= set(VERL_CONFIGS)


def test_composes_and_validates(composed):
    name, cfg = composed
    validate(cfg, check_files=False)  # verl's validate_config (+ V0.5's checks for paper.yaml; no V0 file here)
    # keys that only verl's defaults provide are present, so the file was layered on ppo_trainer
    assert cfg.actor_rollout_ref.rollout.mode == "async"
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen3-4B-Instruct-2507"


def test_common_paper_settings(composed):
    name, cfg = composed
    actor = cfg.actor_rollout_ref.actor
    assert actor.optim.lr == pytest.approx(1e-6)
    assert actor.optim.lr_warmup_steps == 10
    assert actor.optim.lr_scheduler_type == "constant"  # no lr decay
    assert actor.optim.clip_grad == 1.0
    assert cfg.data.max_response_length == 4096
    assert cfg.algorithm.use_kl_in_reward is False
    # compute matched per step: prompt batch × rollouts per prompt = 512 × 16
    assert cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n == 512 * 16
    # evaluation mean@16 at temperature 1.0, top-p 0.7
    vk = cfg.actor_rollout_ref.rollout.val_kwargs
    assert (vk.n, vk.temperature, vk.top_p, vk.do_sample) == (16, 1.0, 0.7, True)
    assert cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node == 32


def test_paper_v05_settings():
    cfg = build_config(CONFIGS / "paper.yaml", NEEDS["paper.yaml"])
    s = V05Settings.from_section(cfg.v05)
    assert (s.osla.k_init, s.osla.step, s.osla.c, s.osla.cap) == (4, 2, 0.0039, 16)
    assert (s.osla.halt_fraction, s.osla.pad_multiple, s.osla.method) == (0.25, 32, "paper")
    assert (s.prior_options.support_capacity, s.prior_options.support_size) == (512, 256)
    assert cfg.actor_rollout_ref.rollout.n == 4 and cfg.data.train_batch_size == 2048
    assert cfg.algorithm.adv_estimator == "v05" and cfg.trainer.use_v1 is False
    assert cfg.actor_rollout_ref.actor.use_kl_loss is False


def test_baselines():
    grpo = build_config(CONFIGS / "grpo.yaml")
    assert grpo.algorithm.adv_estimator == "grpo" and grpo.data.train_batch_size == 512
    assert grpo.actor_rollout_ref.rollout.n == 16
    assert grpo.actor_rollout_ref.actor.use_kl_loss is True and grpo.actor_rollout_ref.actor.kl_loss_coef == 0.001
    dapo = build_config(CONFIGS / "dapo.yaml")
    actor = dapo.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)
    assert dapo.algorithm.filter_groups.enable is True
    assert dapo.algorithm.filter_groups.max_inflight_gen_batches == 3  # generation batch 512 × 3
    assert dapo.trainer.use_v1 is True and actor.use_kl_loss is False


def test_overrides_and_dry_run(capsys):
    cfg = launch(CONFIGS / "paper.yaml", ["v05.prior=none", "v05.c=0.01", "data.train_batch_size=64"], dry_run=True)
    assert cfg.v05.c == 0.01 and cfg.data.train_batch_size == 64
    assert V05Settings.from_section(cfg.v05).osla.cap == 10  # floor(1/sqrt(0.01))
    assert "adv_estimator: v05" in capsys.readouterr().out


def test_launch_refuses_a_missing_v0_checkpoint_before_ray():
    # the V0 file is checked in the launcher (dry run included), not at the first prior query on the task runner
    with pytest.raises(FileNotFoundError, match="/nonexistent/v0.pt"):
        launch(CONFIGS / "paper.yaml", NEEDS["paper.yaml"], dry_run=True)


def test_six_validation_benchmarks_and_one_reward_rule(composed):
    name, cfg = composed
    # the paper's six benchmarks (§4.1.4), one parquet each, each under its own data_source
    assert [Path(f).stem for f in cfg.data.val_files] == [
        "aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench"
    ]
    from v05_rl.verl.reward import MATH_SOURCES
    from verl.trainer.ppo.reward import get_custom_reward_fn

    assert {Path(f).stem for f in cfg.data.val_files} < set(MATH_SOURCES)
    score = get_custom_reward_fn(cfg)  # what verl's reward manager calls, loaded from pkg://v05_rl.verl.reward
    for source in ("amc23", "minerva_math", "math_dapo"):
        right = score(data_source=source, solution_str="so the answer is Answer: 42", ground_truth="42", extra_info={})
        wrong = score(data_source=source, solution_str="Answer: 41", ground_truth="42", extra_info={})
        assert (right["score"], wrong["score"]) == (1.0, -1.0)


def test_verl_accepts_a_list_of_validation_files(tmp_path):
    """verl's own dataset class reads every file of `data.val_files` (one RLHFDataset over all of them)."""
    from transformers import AutoTokenizer  # noqa: F401
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from v0_data.tasks.base import Prompt
    from v0_data.tasks.parquet import write_verl_parquet
    from v05_rl.policies import build_char_tokenizer

    files = [str(write_verl_parquet([Prompt.new(src, "test", f"{i}+{i}", str(2 * i)) for i in range(n)],
                                    tmp_path / f"{src}.parquet"))
             for src, n in (("aime24", 3), ("amc23", 2))]
    cfg = build_config(CONFIGS / "paper.yaml", ["v05.prior=none", "data.max_prompt_length=64",
                                                "data.filter_overlong_prompts=false", f"data.val_files={files}"])
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ds = RLHFDataset(cfg.data.val_files, tok, cfg.data)
    assert len(ds) == 5 and sorted({ds[i]["data_source"] for i in range(5)}) == ["aime24", "amc23"]


def test_bad_config_path():
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_config(CONFIGS / "nope.yaml")
