"""Recipe of `v05 rl-train`: one RL run on the embedded engine (`rl_train`), or a launch on verl (`launch_verl`).

The embedded engine takes a resolved `TrainConfig` (defaults < YAML < options, see `pipelines.config`)
and writes the run folder: `config.yaml` (the nested config, written here), `config.json`,
`metrics.jsonl`, `checkpoints/` and `policy/` (written by `v05_rl.engine.run_training`). verl takes a
Hydra config file (`pipelines/configs/paper.yaml`, ...) and `KEY=VALUE` overrides instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import click

from pipelines.config import to_yaml

if TYPE_CHECKING:
    from v05_rl.engine.config import TrainConfig

ENGINES = ("local", "verl")


def rl_train(cfg: TrainConfig, out: Path, *, resume: bool = False, backend: str = "hf", progress: bool = True):
    """Train with the embedded engine into `out`; print the first and last evaluation; returns the trainer."""
    from v05_rl.engine import run_training

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg, "rl"))
    trainer = run_training(cfg, out, resume=resume, backend_name=backend, progress=progress)
    evals = [r for r in trainer.history if r.get("kind") == "eval"]
    if evals:
        first, last = evals[0], evals[-1]
        click.echo(f"mean@{cfg.evaluation.k} on {cfg.eval_split}: {first.get('mean_at_k', float('nan')):.4f} "
                   f"(step {first['step']}) -> {last.get('mean_at_k', float('nan')):.4f} (step {last['step']}); "
                   f"rollouts {trainer.rollouts_used}")
    click.echo(f"outputs in {out}")
    return trainer


def launch_verl(config_path: Path, out: Path, *, settings: Sequence[str] = (), overrides: Sequence[str] = (),
                resume: bool = False) -> None:
    """Hand a Hydra config to `v05_rl.verl.entry.launch` (imported only here, so the embedded engine never
    needs verl). Hydra overrides in order: `settings` (from named options), the run folder `out`, resume,
    then the user's `overrides` (which win)."""
    if importlib.util.find_spec("verl") is None:
        raise RuntimeError("--engine verl needs the verl extra: pip install 'v05[verl]' (and a GPU cluster)")
    try:
        from v05_rl.verl.entry import launch
    except ImportError as exc:
        raise RuntimeError(f"--engine verl: cannot import v05_rl.verl.entry ({exc}); install 'v05[verl]'") from None
    args = [*settings, f"trainer.default_local_dir={out}"]
    if resume:
        args.append("trainer.resume_mode=auto")
    launch(config_path, args + list(overrides))


__all__ = ["ENGINES", "launch_verl", "rl_train"]
