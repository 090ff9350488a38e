"""`RayV05Trainer`'s per-batch glue without Ray workers: prior query, OSLA rounds through a fake
rollout manager, per-row priors, update padding and mini-batch size, support-buffer feedback."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

import torch  # noqa: E402

from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage  # noqa: E402

from v05_rl.verl.entry import build_config  # noqa: E402
from v05_rl.verl.osla import is_padding  # noqa: E402
from v05_rl.verl.trainer import RayV05Trainer, V05Settings, check_v05_config  # noqa: E402

from tests.v05_rl.verl.test_osla import ALWAYS_DOWN, ALWAYS_UP, ALTERNATE, FakeRolloutManager, batch_dict  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[3] / "pipelines" / "configs"
NAN = float("nan")


class FakePrior:
    """A PriorSource with fixed priors by prompt text that records what it observes."""

    name = "fake"

    def __init__(self, by_text):
        self.by_text = by_text
        self.observed = []

    def priors(self, prompts):
        return np.array([self.by_text[p.text] for p in prompts], dtype=np.float64)

    def observe(self, prompt_ids, success_rates, counts=None):
        self.observed.append((np.asarray(prompt_ids).tolist(), np.asarray(success_rates).tolist()))

    def state_dict(self):
        return {"observed": self.observed}

    def load_state_dict(self, state):
        self.observed = state["observed"]


class FakeCheckpointManager:
    def __init__(self):
        self.sleeps = 0

    def sleep_replicas(self):
        self.sleeps += 1


def bare_trainer(fake_manager, prior, overrides=()):
    """A RayV05Trainer with the paper config (tiny batch) and fakes instead of Ray workers."""
    cfg = build_config(
        CONFIGS / "paper.yaml",
        [
            "v05.prior=none",
            "v05.pad_multiple=8",
            "data.train_batch_size=5",
            "actor_rollout_ref.actor.ppo_mini_batch_size=5",
            *overrides,
        ],
    )
    trainer = object.__new__(RayV05Trainer)
    trainer.config = cfg
    trainer.use_rm = False
    trainer.global_steps = 1
    trainer.async_rollout_manager = fake_manager
    trainer.checkpoint_manager = FakeCheckpointManager()
    trainer.actor_rollout_wg = None
    trainer._get_dp_size = lambda wg, role: 4
    trainer._setup_v05(prior)
    return trainer


def test_one_batch_prior_rounds_padding_and_observe():
    names = ["p0", "p1", "p2", "p3", "p4"]
    by_text = {"question p0": 0.8, "question p1": 0.8, "question p2": -0.8, "question p3": NAN, "question p4": 0.0}
    fake = FakeRolloutManager({"p0": ALWAYS_UP, "p1": ALWAYS_DOWN, "p2": ALWAYS_UP, "p3": ALTERNATE, "p4": ALTERNATE})
    prior = FakePrior(by_text)
    trainer = bare_trainer(fake, prior)
    metrics, timing = {}, {}
    batch, result, prompts = trainer._v05_rollouts(batch_dict(names), metrics, timing)

    # agent-loop workers = 8 and pad_multiple = 8 -> every dispatch a multiple of 8
    assert all(len(d) % 8 == 0 for d in fake.dispatches)
    # replicas sleep once, after the last round
    assert trainer.checkpoint_manager.sleeps == 1
    n_real = int(result.counts.sum())
    assert result.counts[1:4].tolist() == [16, 16, 16]
    # update layout: 5 // 5 = 1 mini-batch, dp 4, rollout.n 4 -> q = 4, rows padded to a multiple of 4
    pad = is_padding(batch)
    assert len(batch) % 4 == 0 and len(batch) - n_real == pad.sum() < 4
    assert batch.meta_info["v05_ppo_mini_batch_size"] == len(batch) // 4
    assert metrics["v05/update_padding"] == pad.sum()
    # every real row carries its prompt's prior; padding rows NaN and fully masked
    texts = [p.text for p in prompts]
    for row, prior_value in zip(result.prompt_row, batch.batch["reward_baselines"][~torch.as_tensor(pad)].tolist()):
        want = by_text[texts[row]]
        assert (np.isnan(want) and np.isnan(prior_value)) or prior_value == pytest.approx(want)
    assert batch.batch["response_mask"][torch.as_tensor(pad)].sum() == 0
    # uid groups keep their sizes
    sizes = Counter(batch.non_tensor_batch["uid"][~pad].tolist())
    assert sorted(sizes.values()) == sorted(result.counts.tolist())
    # metrics and per-round timing are logged
    assert metrics["v05/k_max"] == 16 and "timing_s/v05_round_0" in metrics and "v05_prior" in timing

    # advantages through verl's compute_advantage with the run's config: padding 0, real rows finite
    batch.batch["token_level_rewards"] = batch.batch["rm_scores"]
    adv = compute_advantage(batch, adv_estimator="v05", config=trainer.config).batch["advantages"]
    assert adv[torch.as_tensor(pad)].abs().sum() == 0 and torch.isfinite(adv).all()

    # the support buffer gets each prompt's success rate (successes / k): p0 all +1 -> 1, p1 -> 0, p2 -> 1
    trainer._observe(result, prompts)
    ids, rates = prior.observed[-1]
    assert ids == [1000, 1001, 1002, 1003, 1004]
    assert rates[:3] == [1.0, 0.0, 1.0]
    assert rates[3] == pytest.approx(0.5)


def test_update_actor_uses_the_batch_mini_batch_size(monkeypatch):
    trainer = bare_trainer(FakeRolloutManager({}), FakePrior({}))
    seen = []
    monkeypatch.setattr(
        RayPPOTrainer, "_update_actor", lambda self, b: seen.append(self.config.actor_rollout_ref.actor.ppo_mini_batch_size)
    )

    class B:
        meta_info = {"v05_ppo_mini_batch_size": 13}

    trainer._update_actor(B())
    assert seen == [13]
    # restored afterwards
    assert trainer.config.actor_rollout_ref.actor.ppo_mini_batch_size == 5


def test_unsupported_settings_are_refused():
    cfg = build_config(CONFIGS / "paper.yaml", ["v05.prior=none", "actor_rollout_ref.rollout.n=8"])
    with pytest.raises(ValueError, match="rollout.n=8 differs from v05.k_init=4"):
        check_v05_config(cfg)
    cfg = build_config(CONFIGS / "paper.yaml", ["v05.prior=none", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"])
    with pytest.raises(ValueError, match="token-mean"):
        check_v05_config(cfg)
    cfg = build_config(CONFIGS / "paper.yaml", ["v05.prior=none", "trainer.use_v1=true"])
    with pytest.raises(ValueError, match="use_v1"):
        check_v05_config(cfg)
    with pytest.raises(ValueError, match="v0_checkpoint"):
        check_v05_config(build_config(CONFIGS / "paper.yaml"))
    with pytest.raises(ValueError, match="unknown key"):
        V05Settings.from_section({"k_int": 4})
    with pytest.raises(ValueError, match="oracle-noise"):
        V05Settings.from_section({"prior": "oracle-noise"})


def test_fit_runs_two_steps_with_fake_workers(monkeypatch):
    """fit() end to end with fakes for every Ray worker call: 2 steps, the update sees V0.5 advantages."""
    from verl import DataProto

    names = ["p0", "p1", "p2", "p3", "p4"]
    by_text = {"question p0": 0.8, "question p1": 0.8, "question p2": -0.8, "question p3": NAN, "question p4": 0.0}
    fake = FakeRolloutManager({"p0": ALWAYS_UP, "p1": ALWAYS_DOWN, "p2": ALWAYS_UP, "p3": ALTERNATE, "p4": ALTERNATE})
    prior = FakePrior(by_text)
    trainer = bare_trainer(
        fake,
        prior,
        [
            "trainer.balance_batch=false",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=-1",
            "trainer.resume_mode=disable",
            "trainer.logger=[console]",
        ],
    )
    trainer.train_dataloader = [batch_dict(names), batch_dict(names)]
    trainer.total_training_steps = 2
    trainer.use_reference_policy = False
    trainer._init_dump_executor()

    class Pool:
        def get_n_gpus(self):
            return 1

    class Ckpt(FakeCheckpointManager):
        def update_weights(self, step):
            self.updates = getattr(self, "updates", 0) + 1

    trainer.resource_pool_manager = Pool()
    trainer.checkpoint_manager = Ckpt()

    def old_log_prob(batch):
        n, length = batch.batch["responses"].shape
        out = DataProto.from_dict(tensors={"old_log_probs": torch.zeros(n, length), "entropys": torch.ones(n, length)})
        return out, 0.0

    updates = []

    def update_actor(self, batch):
        updates.append((len(batch), self.config.actor_rollout_ref.actor.ppo_mini_batch_size, batch.batch["advantages"].clone(),
                        is_padding(batch)))
        return DataProto.from_single_dict(data={}, meta_info={"metrics": {"actor/pg_loss": [0.0]}})

    trainer._compute_old_log_prob = old_log_prob
    monkeypatch.setattr(RayPPOTrainer, "_update_actor", update_actor)
    logged = []
    from verl.utils import tracking

    monkeypatch.setattr(tracking.Tracking, "log", lambda self, data, step, **kw: logged.append((step, dict(data))))
    trainer.fit()

    assert len(updates) == 2 and len(prior.observed) == 2
    n_rows, mini, adv, pad = updates[0]
    assert n_rows % 4 == 0 and mini == n_rows // 4  # one mini-batch (5 // 5) of all rows, in prompt units of 4
    assert adv[torch.as_tensor(pad)].abs().sum() == 0 and adv[torch.as_tensor(~pad)].abs().sum() > 0
    steps = [s for s, _ in logged]
    assert steps == [1, 2]
    m = logged[0][1]
    assert m["v05/k_max"] == 16 and "actor/pg_loss" in m and "timing_s/gen" in m
    # verl's data metrics are computed on real rows only: mean response length > 0 everywhere
    assert m["response_length/min"] > 0
    assert trainer.checkpoint_manager.sleeps == 2


def test_prior_state_round_trips_with_the_prompts_it_refers_to(tmp_path):
    from v05_rl.priors import NoPrior

    names = ["a", "b"]
    fake = FakeRolloutManager({"a": ALWAYS_UP, "b": ALWAYS_DOWN})
    overrides = [f"trainer.default_local_dir={tmp_path}"]
    trainer = bare_trainer(fake, None, overrides)
    assert isinstance(trainer.prior_source, NoPrior)
    _, result, prompts = trainer._v05_rollouts(batch_dict(names), {}, {})
    trainer._observe(result, prompts)
    trainer.global_steps = 3
    trainer._save_prior_state()
    saved = trainer.prior_source.state_dict()

    fresh = bare_trainer(FakeRolloutManager({}), None, overrides)
    fresh.global_steps = 3
    fresh._load_prior_state()
    assert fresh.prior_source.state_dict() == saved
    # success rates: a all +1 -> 1.0, b all -1 -> 0.0
    assert saved["support"]["success_rates"] == [1.0, 0.0]
    assert {p.text for p in fresh.prompt_index.by_id.values()} == {"question a", "question b"}
    assert (tmp_path / "global_step_3" / "v05_prior.json").is_file()
