"""Stage one of the paper (`v05 build-data`): GRPO runs over a policy family, every rollout of every step
written to a trajectory store, which then holds the (prompt, success rate) pairs V0 is trained on.

Each policy trains in its own run folder `<out>/<model name>/` with the embedded engine (algorithm grpo,
no prior; every other setting from the `rl` section of the config). Resumable per policy: a finished
policy (`DONE` marker) is skipped, an interrupted one continues from its last checkpoint, and re-written
steps replace their earlier rows in the store (the run id is fixed per policy and seed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipelines.config import to_yaml
from v05_rl.policies import FAMILY

if TYPE_CHECKING:
    from v05_rl.engine.config import TrainConfig


@dataclass(frozen=True)
class BuildDataConfig:
    """Stage one of the paper: GRPO runs over a policy family, every rollout of every step stored."""

    policies: tuple[str, ...] = field(default=FAMILY, metadata={"help": "policies to train (names, paths or Hub ids)"})
    steps: int = field(default=30, metadata={"help": "GRPO steps per policy (every step's rollouts are stored)"})
    seed: int = field(default=0, metadata={"help": "seed of every run (the policy's own seed is part of its recipe)"})

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("BuildDataConfig.policies is empty; name at least one policy, e.g. [tiny-s]")
        if self.steps < 1:
            raise ValueError(f"BuildDataConfig.steps must be >= 1, got {self.steps}")


def safe_name(name: str) -> str:
    """A folder name made of letters, digits and `-_.`."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def model_name(policy: str) -> str:
    """The model name recorded in the store: a family name or Hub id as given, a local folder's name."""
    path = Path(policy).expanduser()
    return path.resolve().name if path.exists() else policy


def policy_config(base: TrainConfig, cfg: BuildDataConfig, policy: str, store: str | Path) -> TrainConfig:
    """The GRPO run of one policy: `base` with the policy, steps, seed and the store's names filled in."""
    name = model_name(policy)
    return replace(base, algorithm="grpo", prior="none", policy=policy, steps=cfg.steps, seed=cfg.seed,
                   store=str(store), store_model=name, store_run_id=f"build-data-{safe_name(name)}-seed{cfg.seed}")


def build_data(cfg: BuildDataConfig, base: TrainConfig, store: str | Path, out: Path | None = None, *,
               progress: bool = True) -> Path:
    """Run GRPO over `cfg.policies` and record every rollout at every step into `store`.

    `out` holds the per-policy run folders (default `<store>/build-data`) and the resolved config;
    returns it.
    """
    from tqdm.auto import tqdm

    out = out or Path(store) / "build-data"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg, "build_data") + to_yaml(base, "rl"))
    bar = tqdm(total=len(cfg.policies) * cfg.steps, desc="build-data", unit="step", disable=not progress, position=0)
    try:
        for i, policy in enumerate(cfg.policies):
            train_policy(policy_config(base, cfg, policy, store), out / safe_name(model_name(policy)), bar,
                         done_steps=i * cfg.steps)
    finally:
        bar.close()
    click.echo(f"[build-data] stored every rollout of {len(cfg.policies)} policies in {store}")
    return out


def train_policy(cfg: TrainConfig, run_dir: Path, bar, *, done_steps: int) -> None:
    """One policy's GRPO run into `run_dir` (skipped when `DONE`, resumed from its checkpoint otherwise)."""
    from v05_rl.engine import run_training

    if (run_dir / "DONE").exists():
        bar.update(cfg.steps)
        click.echo(f"[build-data] {cfg.policy}: done already, skipping")
        return
    resume = (run_dir / "checkpoints" / "latest").exists()
    bar.set_postfix(policy=cfg.policy)

    def on_step(stats) -> None:
        bar.n = done_steps + stats.step
        bar.refresh()

    trainer = run_training(cfg, run_dir, resume=resume, progress=False, on_step=on_step)
    (run_dir / "DONE").write_text(json.dumps({"rollouts": trainer.rollouts_used, "steps": trainer.step}))


__all__ = ["BuildDataConfig", "build_data", "model_name", "policy_config", "safe_name", "train_policy"]
