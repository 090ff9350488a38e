"""`RayV05Trainer.fit()` with the REAL V0 prior source (a tiny V0 checkpoint) for 4 steps, uninterrupted
and as 2 steps + save + resume in a fresh trainer + 2 steps: the prior state (support buffer, query
counter, texts) and the per-step V0.5 metrics must agree. Ray workers are faked (rollout manager of
`test_osla`, worker group, dataloader); everything else is the trainer's own code.

What this pins down (issue 13, items 1 and 3):
- step 2 used to crash (`KeyError: V0 prior: no text for prompt ids`): the source copied the prompt index
  when it was built (empty), and at step 1 returned NaN before remembering the batch's texts;
- `global_step_N/v05_prior.json` used to miss step N (the buffer was fed after the save).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

import torch  # noqa: E402

from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer  # noqa: E402

from tests.v05_rl.verl.test_osla import ALTERNATE, ALWAYS_DOWN, ALWAYS_UP, FakeRolloutManager, batch_dict  # noqa: E402
from tests.v05_rl.verl.test_trainer import FakeCheckpointManager, bare_trainer  # noqa: E402
from tests.v05_rl.verl.tiny_v0 import tiny_v0_checkpoint  # noqa: E402
from v05_rl.priors.v0 import V0PriorSource  # noqa: E402
from v05_rl.verl.trainer import PRIOR_FILE  # noqa: E402

STEPS = 4
SCRIPT = [ALWAYS_UP, ALWAYS_DOWN, ALTERNATE, ALTERNATE, ALWAYS_UP]  # rewards of prompt i of every step


def step_prompts(step: int) -> list[str]:
    return [f"s{step}p{i}" for i in range(len(SCRIPT))]


def prompt_id(step: int, i: int) -> int:
    return 5000 + 10 * step + i


def step_batch(step: int) -> dict:
    """The dataloader batch of `step`: new prompts every step, each with its own prompt id."""
    names = step_prompts(step)
    out = batch_dict(names)
    out["extra_info"] = np.array(
        [{"prompt_id": prompt_id(step, i), "index": i, "name": q} for i, q in enumerate(names)], dtype=object
    )
    return out


class Loader:
    """A stateful dataloader (verl saves/restores `state_dict` with each checkpoint)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class FakeWorkerGroup:
    """Actor checkpoints as marker files."""

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        Path(local_path).mkdir(parents=True, exist_ok=True)
        (Path(local_path) / "step.txt").write_text(str(global_step))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        assert (Path(local_path) / "step.txt").is_file()


class Pool:
    def get_n_gpus(self):
        return 1


class Ckpt(FakeCheckpointManager):
    def update_weights(self, step):
        pass


def run_fit(ckpt: Path, run_dir: Path, total_steps: int, resume: bool, monkeypatch) -> tuple:
    """Build a fresh trainer with the `v0` prior from the registry and run `fit()`; returns
    (trainer, logged metrics by step)."""
    names = [q for s in range(1, STEPS + 1) for q in step_prompts(s)]
    fake = FakeRolloutManager({q: SCRIPT[int(q.split("p")[1])] for q in names})
    trainer = bare_trainer(
        fake,
        None,
        [
            "v05.prior=v0",
            f"v05.v0_checkpoint={ckpt}",
            "v05.support_size=8",
            "trainer.balance_batch=false",
            "trainer.val_before_train=false",
            "trainer.test_freq=-1",
            "trainer.save_freq=2",
            f"trainer.resume_mode={'auto' if resume else 'disable'}",
            f"trainer.default_local_dir={run_dir}",
            "trainer.logger=[console]",
        ],
    )
    assert isinstance(trainer.prior_source, V0PriorSource)
    trainer.train_dataloader = Loader([step_batch(s) for s in range(1, STEPS + 1)])
    trainer.total_training_steps = total_steps
    trainer.use_reference_policy = False
    trainer.use_critic = False
    trainer.actor_rollout_wg = FakeWorkerGroup()
    trainer.resource_pool_manager = Pool()
    trainer.checkpoint_manager = Ckpt()
    trainer._init_dump_executor()

    def old_log_prob(batch):
        n, length = batch.batch["responses"].shape
        return DataProto.from_dict(tensors={"old_log_probs": torch.zeros(n, length), "entropys": torch.ones(n, length)}), 0.0

    trainer._compute_old_log_prob = old_log_prob
    monkeypatch.setattr(
        RayPPOTrainer, "_update_actor",
        lambda self, b: DataProto.from_single_dict(data={}, meta_info={"metrics": {"actor/pg_loss": [0.0]}}),
    )
    logged: dict[int, dict] = {}
    from verl.utils import tracking

    monkeypatch.setattr(tracking.Tracking, "log", lambda self, data, step, **kw: logged.setdefault(step, dict(data)))
    trainer.fit()
    return trainer, logged


def saved_prior(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / f"global_step_{step}" / PRIOR_FILE).read_text())


@pytest.fixture(scope="module")
def v0_ckpt(tmp_path_factory):
    return tiny_v0_checkpoint(tmp_path_factory.mktemp("tiny_v0"))


def test_v0_prior_through_fit_resumes_like_an_uninterrupted_run(v0_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("V05_CACHE_DIR", str(tmp_path / "cache"))
    full, full_log = run_fit(v0_ckpt, tmp_path / "full", STEPS, resume=False, monkeypatch=monkeypatch)

    # every step ran; no prior at step 1 (empty buffer), V0's prior for every prompt from step 2 on
    assert sorted(full_log) == [1, 2, 3, 4]
    assert full_log[1]["v05/prior_coverage"] == 0.0
    assert all(full_log[s]["v05/prior_coverage"] == 1.0 for s in (2, 3, 4))
    assert "timing_s/v05_prior" in full_log[2] and "timing_s/v05_prior_wait" in full_log[2]

    # the state saved at step 2 includes step 2 (observe before save): buffer = steps 1 and 2, in order;
    # success rates of the scripted prompts: up 1, down 0, alternate 0.5
    at2 = saved_prior(tmp_path / "full", 2)["state"]
    assert at2["support"]["prompt_ids"] == [prompt_id(s, i) for s in (1, 2) for i in range(5)]
    assert at2["support"]["success_rates"] == [1.0, 0.0, 0.5, 0.5, 1.0] * 2
    assert at2["calls"] == 1  # step 1 returned NaN without drawing a context; step 2 drew one
    assert set(at2["texts"]) == {str(prompt_id(s, i)) for s in (1, 2) for i in range(5)}

    # interrupted: 2 steps, then a fresh trainer (fresh V0 source) resumes from global_step_2 in the same folder
    part, part_log = run_fit(v0_ckpt, tmp_path / "part", 2, resume=False, monkeypatch=monkeypatch)
    assert sorted(part_log) == [1, 2]
    assert saved_prior(tmp_path / "part", 2) == saved_prior(tmp_path / "full", 2)
    resumed, resumed_log = run_fit(v0_ckpt, tmp_path / "part", STEPS, resume=True, monkeypatch=monkeypatch)
    assert sorted(resumed_log) == [3, 4]

    # the prior state equals the uninterrupted run's: support buffer, calls, texts; in memory and on disk
    assert resumed.prior_source.state_dict() == full.prior_source.state_dict()
    assert saved_prior(tmp_path / "part", 4) == saved_prior(tmp_path / "full", 4)
    assert full.prior_source.state_dict()["calls"] == 3
    # and so did what the prior decided: the same priors -> the same OSLA rounds and fused baselines
    for step in (3, 4):
        v05 = {k: v for k, v in full_log[step].items() if k.startswith("v05/")}
        assert {k: resumed_log[step][k] for k in v05} == pytest.approx(v05)


def test_v0_source_remembers_texts_when_it_returns_nan_and_reads_the_live_index(v0_ckpt, tmp_path, monkeypatch):
    """The V0 source alone: a NaN answer still records the batch's texts; the live index is read at query time."""
    from v0_data.tasks.base import Prompt
    from v05_rl.priors import PriorOptions, PriorRuntime
    from v05_rl.priors.v0 import build_v0_source

    monkeypatch.setenv("V05_CACHE_DIR", str(tmp_path / "cache"))
    index: dict[int, Prompt] = {}
    src = build_v0_source(PriorOptions(v0_checkpoint=str(v0_ckpt), support_size=4), PriorRuntime(prompts_by_id=index))
    first = [Prompt(prompt_id(1, i), "toy", "train", f"question s1p{i}", "") for i in range(3)]
    assert np.isnan(src.priors(first)).all()  # empty buffer
    src.observe([p.prompt_id for p in first], [0.0, 1.0, 0.5])
    second = [Prompt(prompt_id(2, i), "toy", "train", f"question s2p{i}", "") for i in range(2)]
    v = src.priors(second)  # context = the first batch: known from the NaN call
    assert v.shape == (2,) and np.isfinite(v).all() and (np.abs(v) < 1).all()

    # a prompt the trainer indexes after the source was built is found there (not a copy made at build time)
    late = Prompt(prompt_id(3, 0), "toy", "train", "question late", "")
    src.observe([late.prompt_id], [0.0])
    with pytest.raises(KeyError, match="no text for prompt ids"):
        src.support_size = 16  # draw the whole buffer, `late` included
        src.priors(second)
    index[late.prompt_id] = late
    assert np.isfinite(src.priors(second)).all()
