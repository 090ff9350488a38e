"""Where the V0 prior runs (issue 13 item 4): `v05.prior_device` reaches the V0 loader, and the task runner
that hosts the prior asks Ray for matching resources (CPUs = v05.prior_threads, a GPU for a cuda prior)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

from tests.v05_rl.verl.test_osla import FakeRolloutManager  # noqa: E402
from tests.v05_rl.verl.test_trainer import bare_trainer  # noqa: E402
from v05_rl.verl.entry import build_config, task_runner_resources  # noqa: E402
from v05_rl.verl.trainer import V05Settings  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[3] / "pipelines" / "configs"


class RecordingPredictor:
    """Stands in for `V0Predictor`; records the device `load_predictor` was called with."""

    def __init__(self, device):
        self.device, self.cache = device, set()

    def known(self, pid):
        return False


@pytest.fixture
def recorded(monkeypatch):
    import v0_model.checkpoint

    calls = []

    def fake_load(path, device="cpu", **kwargs):
        calls.append((path, device))
        return RecordingPredictor(device)

    monkeypatch.setattr(v0_model.checkpoint, "load_predictor", fake_load)
    return calls


def test_build_v0_source_loads_on_the_runtime_device_and_reads_the_live_index(recorded):
    from v05_rl.priors import PriorOptions, PriorRuntime
    from v05_rl.priors.v0 import build_v0_source

    index = {}
    src = build_v0_source(PriorOptions(v0_checkpoint="v0.pt"), PriorRuntime(prompts_by_id=index, device="cuda:1"))
    assert recorded == [("v0.pt", "cuda:1")]
    assert src.prompts_by_id is index  # the trainer's mapping itself, not a copy


def test_trainer_hands_prior_device_to_the_prior_runtime(monkeypatch):
    import v05_rl.verl.trainer as trainer_mod

    seen = []
    real = trainer_mod.make_prior_source
    monkeypatch.setattr(trainer_mod, "make_prior_source",
                        lambda name, opts, runtime: seen.append(runtime) or real("none", opts, runtime))
    trainer = bare_trainer(FakeRolloutManager({}), None, ["v05.prior_device=cuda:1"])
    assert seen[0].device == "cuda:1"
    assert seen[0].prompts_by_id is trainer.prompt_index.by_id  # live: batches added later are visible


def test_registry_v0_factory_passes_device_and_live_index(recorded):
    from v05_rl.priors import PriorOptions, PriorRuntime, make_prior_source

    index = {}
    src = make_prior_source("v0", PriorOptions(v0_checkpoint="v0.pt"), PriorRuntime(prompts_by_id=index, device="cuda"))
    assert recorded == [("v0.pt", "cuda")] and src.prompts_by_id is index


def test_task_runner_resources_follow_the_prior():
    # CPU prior: prior_threads CPUs, no GPU
    assert V05Settings.from_section({"prior_threads": 16}).task_runner_resources() == {"num_cpus": 16, "num_gpus": 0.0}
    # cuda prior: one whole GPU by default (verl's workers reserve whole GPUs), or what prior_num_gpus says
    assert V05Settings.from_section({"prior_device": "cuda"}).task_runner_resources() == {"num_cpus": 8, "num_gpus": 1.0}
    assert V05Settings.from_section({"prior_device": "cuda:0", "prior_num_gpus": 0.5}).task_runner_resources()["num_gpus"] == 0.5
    # through the composed config, as `launch` builds the task runner
    cfg = build_config(CONFIGS / "paper.yaml", ["v05.v0_checkpoint=x.pt", "v05.prior_device=cuda", "v05.prior_threads=4"])
    assert task_runner_resources(cfg) == {"num_cpus": 4, "num_gpus": 1.0}
    assert task_runner_resources(build_config(CONFIGS / "grpo.yaml")) == {"num_cpus": 1, "num_gpus": 0.0}


def test_bad_prior_resources_are_refused():
    with pytest.raises(ValueError, match="prior_device"):
        V05Settings.from_section({"prior_device": "gpu"})
    with pytest.raises(ValueError, match="prior_threads"):
        V05Settings.from_section({"prior_threads": 0})
    with pytest.raises(ValueError, match="prior_num_gpus=0 with v05.prior_device=cuda"):
        V05Settings.from_section({"prior_device": "cuda", "prior_num_gpus": 0})
    with pytest.raises(ValueError, match="loss_agg"):
        V05Settings.from_section({"loss_agg": "seq-mean"})
