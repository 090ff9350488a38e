"""Run folders nothing can corrupt (issue 14, Deliver 4): the lock, checksummed checkpoints with fallback,
`latest` confined to `checkpoints/`, weights-only loading, refused starts that change nothing, and a
non-finite step that stops the run before anything of it is saved.

Trainers use the fake backend of `test_engine` (real tiny policy, controlled rewards); `run_training`
tests use a saved fresh policy and a 40-prompt arith world (about a second per run).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.v05_rl.test_engine import base_cfg, make_trainer
from v05_rl.engine import run_training
from v05_rl.engine.config import TrainConfig, with_overrides
from v05_rl.engine.run_folder import (
    CheckpointWarning,
    CorruptCheckpoint,
    RunFolderError,
    RunLock,
    TrainingDiverged,
    check_finite,
    checksum_path,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from v05_rl.types import UpdateStats

torch.set_num_threads(1)

P_SUCCESS = [0.2, 0.5, 0.8, 0.5, 0.3, 0.7, 0.4, 0.6]


def without_times(history):
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in history]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file below `folder` (what "unchanged" means in these tests)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trained(tmp_path, steps=4, name="run", **kw):
    """A finished fake-backend run saving every step and keeping 3 checkpoints."""
    cfg = base_cfg(algorithm="grpo", steps=steps, save_every=1, keep_checkpoints=3, **kw)
    t, _ = make_trainer(cfg, tmp_path, P_SUCCESS, name=name)
    t.train()
    return t, cfg


def resume(tmp_path, cfg, name="run"):
    t, _ = make_trainer(cfg, tmp_path, P_SUCCESS, name=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = t.load_checkpoint()
    return t, ok, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


# ====================================================================================== checksums


def test_every_checkpoint_has_a_matching_sha256_sidecar_and_pruning_removes_both(tmp_path):
    t, _ = trained(tmp_path, steps=5)
    ckpt = t.out / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*.pt")) == ["step_0000003.pt", "step_0000004.pt", "step_0000005.pt"]
    assert sorted(p.name for p in ckpt.glob("*.sha256")) == [p + ".sha256" for p in
                                                             ["step_0000003.pt", "step_0000004.pt", "step_0000005.pt"]]
    for pt in ckpt.glob("step_*.pt"):
        digest, name = checksum_path(pt).read_text().split()
        assert name == pt.name and digest == hashlib.sha256(pt.read_bytes()).hexdigest()
    assert (ckpt / "latest").read_text() == "step_0000005.pt"
    assert not list(ckpt.glob("*.tmp*"))  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, damage):
    t, cfg = trained(tmp_path)
    newest = t.out / "checkpoints" / "step_0000004.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte changed: only the checksum can tell
        newest.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    elif damage == "no_sidecar":
        checksum_path(newest).unlink()
    else:
        newest.write_bytes(b"")
    again, ok, warned = resume(tmp_path, cfg)
    assert ok and again.step == 3
    assert any("step_0000004.pt" in w for w in warned), warned  # the warning names the damaged file
    assert any("resuming from" in w and "step_0000003.pt" in w for w in warned), warned


def test_the_fallback_resume_continues_like_an_uninterrupted_run(tmp_path):
    """Resuming from the older intact checkpoint replays the lost step exactly (same weights, same log)."""
    cfg = base_cfg(algorithm="grpo", steps=4, save_every=1, keep_checkpoints=3)
    full, _ = make_trainer(cfg, tmp_path, P_SUCCESS, name="full")
    full.train()
    first, _ = make_trainer(cfg, tmp_path, P_SUCCESS, name="split")
    first.train()
    newest = first.out / "checkpoints" / "step_0000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    second, ok, _ = resume(tmp_path, cfg, name="split")
    assert ok and second.step == 3
    second.train()
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert without_times(second.history) == without_times(full.history)


def test_no_intact_checkpoint_is_an_error_and_changes_nothing(tmp_path):
    t, cfg = trained(tmp_path)
    for pt in (t.out / "checkpoints").glob("step_*.pt"):
        pt.write_bytes(b"garbage")
    before = snapshot(t.out)
    with pytest.raises(RunFolderError, match="no intact checkpoint"):
        resume(tmp_path, cfg)
    assert snapshot(t.out) == before


# ====================================================================================== latest and unpickling


@pytest.mark.parametrize("latest", ["../../etc/passwd", "/etc/passwd", "step_0000002.pt/../../../x",
                                    "../checkpoints/step_0000004.pt", "step_0000009.pt", ""])
def test_latest_is_confined_to_the_checkpoints_folder(tmp_path, latest):
    t, cfg = trained(tmp_path)
    (t.out / "checkpoints" / "latest").write_text(latest)
    again, ok, warned = resume(tmp_path, cfg)
    assert ok and again.step == 4  # the newest checkpoint found by listing the folder, not by following latest
    assert any("ignoring it" in w for w in warned), warned


def test_a_checkpoint_that_links_outside_the_folder_is_not_followed(tmp_path):
    t, cfg = trained(tmp_path)
    newest = t.out / "checkpoints" / "step_0000004.pt"
    outside = tmp_path / "outside.pt"
    outside.write_bytes(newest.read_bytes())
    newest.unlink()
    newest.symlink_to(outside)
    again, ok, warned = resume(tmp_path, cfg)
    assert ok and again.step == 3 and any("not a plain file" in w for w in warned)


class Boom:
    """Unpickling this object would create a file: proof that a checkpoint ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_are_loaded_without_unpickling_objects(tmp_path):
    t, cfg = trained(tmp_path)
    newest = t.out / "checkpoints" / "step_0000004.pt"
    state = read_checkpoint(newest)
    marker = tmp_path / "code-ran"
    state["evil"] = Boom(str(marker))
    torch.save(state, newest)  # a checkpoint with an object in it and a *valid* checksum
    checksum_path(newest).write_text(hashlib.sha256(newest.read_bytes()).hexdigest() + "  step_0000004.pt\n")
    with pytest.raises(CorruptCheckpoint, match="plain tensors"):
        read_checkpoint(newest)
    again, ok, warned = resume(tmp_path, cfg)
    assert ok and again.step == 3
    assert not marker.exists()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in the legacy numpy state
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.random(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.normal(), np.random.random(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# ====================================================================================== the lock


def test_a_second_lock_on_the_same_folder_is_refused_until_the_first_is_released(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderError, match="in use by another run"):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):  # released: usable again
        pass


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(run / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match="in use by another run"):
            with RunLock(run):
                pass
    finally:
        holder.kill()  # kill -9 of the holder: no stale lock
        holder.wait()
    with RunLock(run):
        pass


def test_a_failed_start_removes_the_folder_it_created(tmp_path):
    with pytest.raises(ValueError, match="bad policy"):
        with RunLock(tmp_path / "new"):
            raise ValueError("bad policy")
    assert not (tmp_path / "new").exists()


# ====================================================================================== run_training


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from v05_rl.policies import PolicySpec, build_policy

    path = tmp_path_factory.mktemp("policy") / "fresh"
    model, tok = build_policy(PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def small_cfg(policy: str, **kw) -> TrainConfig:
    values = dict(policy=policy, algorithm="grpo", tasks="arith", tasks_path="n_prompts=40", rollouts_per_step=8,
                  group_size=4, steps=2, save_every=1, max_new_tokens=3, eval_prompts=0, lr=1e-3)
    values.update(kw)
    return with_overrides(TrainConfig(policy=policy), values)


def test_run_training_writes_the_config_and_refuses_a_second_fresh_start(tmp_path, policy_dir):
    out = tmp_path / "run"
    run_training(small_cfg(policy_dir), out, progress=False, files={"config.yaml": "rl: {}\n"})
    assert json.loads((out / "config.json").read_text())["policy"] == policy_dir
    assert (out / "config.yaml").read_text() == "rl: {}\n" and (out / ".lock").exists()
    before = snapshot(out)
    with pytest.raises(RunFolderError, match="already holds a run"):
        run_training(small_cfg(policy_dir, steps=3), out, progress=False)
    assert snapshot(out) == before


def test_a_refused_resume_leaves_every_file_as_it_was(tmp_path, policy_dir):
    """Before: config.json was rewritten with the new settings before the checkpoint refused them."""
    out = tmp_path / "run"
    run_training(small_cfg(policy_dir), out, progress=False)
    before = snapshot(out)
    with pytest.raises(ValueError, match="optim.lr"):
        run_training(small_cfg(policy_dir, lr=5e-3, steps=3), out, resume=True, progress=False)
    assert snapshot(out) == before
    trainer = run_training(small_cfg(policy_dir, steps=3), out, resume=True, progress=False)  # allowed change
    assert trainer.step == 3


def test_a_locked_run_folder_is_refused_before_anything_is_read_or_written(tmp_path, policy_dir):
    out = tmp_path / "run"
    run_training(small_cfg(policy_dir), out, progress=False)
    before = snapshot(out)
    with RunLock(out):
        assert snapshot(out) == before  # taking the lock writes nothing
        with pytest.raises(RunFolderError, match="in use"):
            run_training(small_cfg(policy_dir, steps=3), out, resume=True, progress=False)
        assert snapshot(out) == before


# ====================================================================================== non-finite


def test_check_finite_names_what_went_wrong():
    model = torch.nn.Linear(2, 2)
    check_finite(0, UpdateStats(pg_loss=0.1, grad_norm=1.0), model, 1e-3)  # all finite: nothing raised
    with pytest.raises(TrainingDiverged, match="policy loss"):
        check_finite(3, UpdateStats(pg_loss=math.nan, grad_norm=1.0), model, 1e-3)
    with pytest.raises(TrainingDiverged, match="gradient norm"):
        check_finite(3, UpdateStats(pg_loss=0.1, grad_norm=math.inf), model, 1e-3)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(TrainingDiverged, match="step 3: non-finite weights"):
        check_finite(3, UpdateStats(pg_loss=0.1, grad_norm=1.0), model, 1e-3)


def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path, policy_dir):
    """lr 1e30 (what the CLI now refuses; the engine must stop on its own too): the weights overflow on the
    first update and the run stops at the next step, before that step is logged or checkpointed."""
    out = tmp_path / "run"
    cfg = small_cfg(policy_dir, lr=1e30, steps=4, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match="non-finite") as err:
        run_training(cfg, out, progress=False)
    assert "optim.lr" in str(err.value)
    steps_logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    diverged_at = int(str(err.value).split()[1].rstrip(":"))
    assert diverged_at >= 1 and steps_logged == list(range(1, diverged_at))  # no line for the diverged step
    for pt in saved:
        state = read_checkpoint(pt)
        assert int(state["step"]) < diverged_at
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "policy").exists()


def test_the_lock_is_released_when_a_run_fails(tmp_path, policy_dir):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged):
        run_training(small_cfg(policy_dir, lr=1e30, steps=4, warmup_steps=0), out, progress=False)
    t0 = time.perf_counter()
    with RunLock(out):
        pass
    assert time.perf_counter() - t0 < 1.0
    assert os.path.exists(out / ".lock")
