"""Recipe of `v05 rl-train`: one RL run on the embedded engine (`rl_train`), or a launch on verl (`launch_verl`).

The embedded engine takes a resolved `TrainConfig` (defaults < YAML < options, see `pipelines.config`)
and writes the run folder: `config.yaml` (the nested config), `config.json`, `metrics.jsonl`,
`checkpoints/` and `policy/`, all through `v05_rl.engine.run_training`, which locks the folder and writes
nothing before its checks pass. Learning rates above `LR_MAX` and devices this machine lacks are refused
before the run folder is touched. verl takes a
Hydra config file (`pipelines/configs/paper.yaml`, ...) and `KEY=VALUE` overrides instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import click

from pipelines.common import OptionError
from pipelines.config import to_yaml

if TYPE_CHECKING:
    from v05_rl.engine.config import TrainConfig

ENGINES = ("local", "verl")


def rl_train(cfg: TrainConfig, out: Path, *, resume: bool = False, backend: str = "hf", progress: bool = True):
    """Train with the embedded engine into `out`; print the first and last evaluation; returns the trainer."""
    from v05_rl.engine import run_training

    check_learning_rate(cfg.optim.lr)
    check_device(cfg.device)
    trainer = run_training(cfg, out, resume=resume, backend_name=backend, progress=progress,
                           files={"config.yaml": to_yaml(cfg, "rl")})
    evals = [r for r in trainer.history if r.get("kind") == "eval"]
    if evals:
        first, last = evals[0], evals[-1]
        click.echo(f"mean@{cfg.evaluation.k} on {cfg.eval_split}: {first.get('mean_at_k', float('nan')):.4f} "
                   f"(step {first['step']}) -> {last.get('mean_at_k', float('nan')):.4f} (step {last['step']}); "
                   f"rollouts {trainer.rollouts_used}")
    click.echo(f"outputs in {out}")
    return trainer


# AdamW learning rates above this draw a warning; above `LR_MAX` the run is refused (the paper: 1e-6; the tiny
# embedded policies train at 1e-4 .. 1e-3). A finite but absurd rate makes weights overflow within a step or two.
LR_WARN = 1e-2
LR_MAX = 1.0


def check_learning_rate(lr: float) -> None:
    """Refuse `lr > LR_MAX` (an `OptionError` on --lr), warn on stderr above `LR_WARN`. Non-finite and
    non-positive rates are already refused by `OptimConfig`."""
    if lr > LR_MAX:
        raise OptionError(f"optim.lr = {lr:g} is above {LR_MAX:g}: AdamW would overflow the weights within a step; "
                          f"use a rate such as 1e-4 (tiny policies) or 1e-6 (the paper)", "--lr")
    if lr > LR_WARN:
        click.echo(f"warning: optim.lr = {lr:g} is above {LR_WARN:g}, far above the paper's 1e-6 and the tiny "
                   "policies' 1e-4; the run stops with an error if the loss or weights become non-finite", err=True)


def check_device(device: str) -> None:
    """Refuse a device torch cannot use here (`cuda` without a visible GPU, an unknown name) with one message."""
    import torch

    try:
        kind = torch.device(device).type if device != "auto" else "cpu"
    except (RuntimeError, TypeError):
        raise OptionError(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or auto", "--device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {device!r}: no CUDA GPU is visible to torch {torch.__version__} on this machine; "
                          "use --device cpu (or auto)", "--device")
    index = torch.device(device).index if device != "auto" else None
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise OptionError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                          "from 0", "--device")
    if kind not in ("cpu", "cuda"):
        if kind == "mps" and torch.backends.mps.is_available():
            return
        raise OptionError(f"device {device!r} is not available here; use --device cpu, cuda or auto", "--device")


def verl_run_overrides(out: Path, resume: bool) -> list[str]:
    """The Hydra overrides `--out` and `--resume` stand for: verl writes its checkpoints
    (`global_step_N/`, with V0.5's `v05_prior.json`) into `out`; a fresh run is `resume_mode=disable` (and
    `v05_rl.verl.entry.check_run_folder` refuses a non-empty `out`), `--resume` is `resume_mode=auto`
    (continue from the newest `global_step_N` in `out`; start fresh when there is none)."""
    return [f"trainer.default_local_dir={out}", f"trainer.resume_mode={'auto' if resume else 'disable'}"]


def require_answers(prompts: Sequence[Any], *, tasks: str, path: str | None, split: str) -> None:
    """Refuse prompts without a verifiable answer where rewards need one (evaluation, RL): scoring them
    would report 0 % instead of an error. Names the data set and the fix."""
    missing = [p for p in prompts if p.answer is None or str(p.answer) == ""]
    if missing:
        datasets = sorted({p.dataset for p in missing})
        raise OptionError(
            f"{len(missing)} of {len(prompts)} prompts of task source {tasks!r} (path {path!r}, split {split!r}, "
            f"data set(s) {', '.join(datasets)}) have no answer to score responses against; use a source with "
            "answers (arith, or verl parquet with reward_model.ground_truth)", "--tasks")


def launch_verl(config_path: Path, out: Path, *, settings: Sequence[str] = (), overrides: Sequence[str] = (),
                resume: bool = False, dry_run: bool = False) -> None:
    """Hand a Hydra config to `v05_rl.verl.entry.launch` (imported only here, so the embedded engine never
    needs verl). Hydra overrides in order: `settings` (from named options), the run folder `out` and resume
    mode (`verl_run_overrides`), then the user's `overrides` (which win). dry_run: compose, validate and
    check the run folder, print the config, start nothing."""
    if importlib.util.find_spec("verl") is None:
        raise RuntimeError("--engine verl needs the verl extra: pip install 'v05[verl]' (and a GPU cluster)")
    try:
        from v05_rl.verl.entry import launch
    except ImportError as exc:
        raise RuntimeError(f"--engine verl: cannot import v05_rl.verl.entry ({exc}); install 'v05[verl]'") from None
    launch(config_path, [*settings, *verl_run_overrides(out, resume), *overrides], dry_run=dry_run)


__all__ = ["ENGINES", "LR_MAX", "LR_WARN", "check_device", "check_learning_rate", "launch_verl", "require_answers",
           "rl_train", "verl_run_overrides"]
