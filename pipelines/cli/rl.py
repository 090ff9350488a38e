"""`v05 rl-train`, `v05 build-data` and `v05 evaluate`: options of the recipes `pipelines.rl_train`,
`pipelines.build_data` and `pipelines.evaluate`.

Configuration: dataclass defaults < `--config` YAML (default: the embedded `pipelines/configs/tiny.yaml`)
< command-line options (including any field through `--set KEY=VALUE`, dotted for nested sections).
The resolved config is written next to every run's outputs (`config.json` and `config.yaml`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipelines.cli.options import COUNT, POSITIVE, RECIPE_ERRORS, RegistryChoice, check_device_option, fail
from pipelines.common import set_threads
from pipelines.config import DEFAULT_CONFIG, ConfigError, load_config, parse_set
from pipelines.rl_train import ENGINES


def _algorithms() -> tuple[str, ...]:
    from v05_rl.engine.config import ALGORITHMS

    return ALGORITHMS


def _priors() -> list[str]:
    from v05_rl.priors import PRIOR_SOURCES

    return PRIOR_SOURCES.names()


def _loggers() -> tuple[str, ...]:
    from v05_rl.engine.config import LOGGERS

    return LOGGERS


def _backends() -> list[str]:
    from v05_rl.rollout import BACKENDS

    return BACKENDS.names()


def option_fields(options: dict[str, Any]) -> dict[str, Any]:
    """Named rl-train options -> TrainConfig keys: an option named like a former flat field (`--lr`,
    `--v0-checkpoint`, `--prior-noise-std`) sets that field's nested key (`optim.lr`, ...)."""
    from v05_rl.engine.config import LEGACY_KEYS

    return {LEGACY_KEYS.get(name, name): value for name, value in options.items()}


# ====================================================================================== rl-train


@click.command("rl-train")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: the embedded single-machine engine; verl: the distributed engine (needs the [verl] extra).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"YAML config (section 'rl'); default: the embedded {DEFAULT_CONFIG.name}.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: metrics.jsonl, checkpoints/, config.json, policy/.")
@click.option("--algorithm", type=RegistryChoice(_algorithms), default=None, help="grpo, dapo, v05 (OSLA) or v05-fixed.")
@click.option("--prior", type=RegistryChoice(_priors), default=None,
              help="Prior source for v05: none; oracle-noise (EXPERIMENTAL UPPER BOUND: the policy's true success rate "
                   "from extra unbudgeted rollouts plus noise); v0 (needs --v0-checkpoint).")
@click.option("--v0-checkpoint", type=click.Path(dir_okay=False), default=None, help="V0 checkpoint for --prior v0.")
@click.option("--policy", default=None, help="Policy: tiny-s / tiny-m / tiny-l, a local save_pretrained folder or a Hub id.")
@click.option("--rollout-budget", type=POSITIVE, default=None, help="Stop after this many generated rollouts (all counted).")
@click.option("--steps", type=COUNT, default=None, help="Training steps (the run also stops at --rollout-budget).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after this many minutes of training steps (evaluation excluded).")
@click.option("--rollouts-per-step", type=POSITIVE, default=None, help="Prompt batch × rollouts per prompt (compute matching).")
@click.option("--k", type=POSITIVE, default=None, help="Rollouts per prompt for v05-fixed.")
@click.option("--group-size", type=POSITIVE, default=None, help="G for grpo / dapo.")
@click.option("--lr", type=float, default=None, help="AdamW learning rate.")
@click.option("--seed", type=COUNT, default=None, help="Seed of prompt order, sampling and prior noise.")
@click.option("--prior-noise-std", type=float, default=None, help="oracle-noise: Gaussian noise std on [-1, 1].")
@click.option("--prior-flip-fraction", type=float, default=None, help="oracle-noise: fraction of flipped priors.")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Trajectory store: write every rollout there.")
@click.option("--logger", type=RegistryChoice(_loggers), default=None, help="Extra metrics logger (when installed).")
@click.option("--device", default=None, callback=check_device_option, help="cpu, cuda or auto.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config field, e.g. --set evaluation.every=5 or --set osla.no_prior=k_init.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (bit-for-bit the same schedule).")
@click.option("--backend", type=RegistryChoice(_backends), default="hf", show_default=True, help="Rollout backend of the local engine.")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
@click.option("--dry-run", is_flag=True,
              help="--engine verl: compose and validate the config, check the run folder and the V0 / TabPFN files, "
                   "print the config and stop before Ray starts.")
@click.argument("overrides", nargs=-1)
def rl_train(engine, config_path, out, sets, resume, backend, threads, progress, dry_run, overrides, **options) -> None:
    """RL training with GRPO, DAPO or V0.5 (embedded CPU engine or verl).

    OVERRIDES are KEY=VALUE pairs: fields of the 'rl' section for the local engine (like --set), Hydra
    overrides (e.g. v05.v0_checkpoint=PATH) for --engine verl. The named options (--algorithm, --lr, ...)
    are shortcuts for fields of the same config.
    """
    sets = tuple(sets) + tuple(overrides)
    if dry_run and engine != "verl":
        raise click.UsageError("--dry-run applies to --engine verl only")
    if engine == "verl":
        _launch_verl(config_path, out, options, sets, resume, dry_run)
        return
    from pipelines.rl_train import rl_train as recipe
    from v05_rl.engine.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, "rl", config_path or DEFAULT_CONFIG, [parse_set(sets), option_fields(options)])
    except ConfigError as exc:
        raise fail(exc) from None
    set_threads(threads)
    try:
        recipe(cfg, out, resume=resume, backend=backend, progress=progress)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None


# click option -> Hydra key of a verl config (pipelines/configs/paper.yaml); other options do not apply to verl
VERL_KEYS = {
    "prior": "v05.prior",
    "v0_checkpoint": "v05.v0_checkpoint",
    "steps": "trainer.total_training_steps",
    "lr": "actor_rollout_ref.actor.optim.lr",
}


def _launch_verl(config_path: Path | None, out: Path, options: dict[str, Any], sets: tuple[str, ...], resume: bool,
                 dry_run: bool = False) -> None:
    """Check that the given options apply to verl, then launch (`pipelines.rl_train.launch_verl`)."""
    from pipelines.rl_train import launch_verl

    if config_path is None:
        raise click.UsageError("--engine verl needs --config pointing to a verl config, e.g. pipelines/configs/paper.yaml")
    given = {k: v for k, v in options.items() if v is not None}
    unsupported = sorted(set(given) - set(VERL_KEYS))
    if unsupported:
        raise click.UsageError(
            f"--engine verl: option(s) {', '.join('--' + u.replace('_', '-') for u in unsupported)} belong to the local "
            "engine; give verl settings as Hydra overrides (KEY=VALUE arguments)"
        )
    try:
        launch_verl(config_path, out, settings=[f"{VERL_KEYS[k]}={v}" for k, v in given.items()], overrides=sets,
                    resume=resume, dry_run=dry_run)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None


# ====================================================================================== build-data


@click.command("build-data")
@click.option("--store", type=click.Path(file_okay=False), required=True, help="Trajectory store to fill (created if absent).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the per-policy runs (checkpoints, metrics); default: <store>/build-data.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"YAML config (sections 'build_data' and 'rl'); default: the embedded {DEFAULT_CONFIG.name}.")
@click.option("--policies", default=None, help="Comma-separated policies (default: the tiny family).")
@click.option("--steps", type=COUNT, default=None, help="GRPO steps per policy.")
@click.option("--seed", type=COUNT, default=None, help="Seed of every run.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field of the 'rl' section (GRPO settings).")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def build_data(store, out, config_path, policies, steps, seed, sets, threads, progress) -> None:
    """Run GRPO over a list of policies and record every rollout at every step into the store.

    Resumable per policy: a finished policy (DONE marker) is skipped, an interrupted one continues from
    its last checkpoint, and re-written steps replace their earlier rows in the store.
    """
    from pipelines.build_data import BuildDataConfig
    from pipelines.build_data import build_data as recipe
    from v05_rl.engine.config import TrainConfig

    path = config_path or DEFAULT_CONFIG
    try:
        bcfg = load_config(BuildDataConfig, "build_data", path, {"policies": policies, "steps": steps, "seed": seed})
        base = load_config(TrainConfig, "rl", path, parse_set(sets), override_source="--set")
    except ConfigError as exc:
        raise fail(exc) from None
    set_threads(threads)
    try:
        recipe(bcfg, base, store, out, progress=progress)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None


# ====================================================================================== evaluate


@click.command("evaluate")
@click.option("--policy", required=True, help="Policy: tiny family name, save_pretrained folder or Hub id.")
@click.option("--tasks", default="arith", show_default=True, help="Task source (arith, parquet, v0_release, ...).")
@click.option("--path", "tasks_path", default=None, help="Path or spec for the task source (parquet file, arith spec).")
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--n-prompts", type=POSITIVE, default=None, help="Evaluate only the first N prompts.")
@click.option("--k", type=POSITIVE, default=16, show_default=True, help="Samples per prompt (mean@k).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True, help="Sampling temperature (paper: 1.0).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.7, show_default=True, help="Nucleus sampling (paper: 0.7).")
@click.option("--max-new-tokens", type=POSITIVE, default=16, show_default=True, help="Maximum response length in tokens.")
@click.option("--seed", type=COUNT, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", default="cpu", show_default=True, callback=check_device_option, help="cpu, cuda or auto.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the result as JSON here.")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads.")
def evaluate(policy, tasks, tasks_path, split, n_prompts, k, temperature, top_p, max_new_tokens, seed, device, out,
             threads) -> None:
    """mean@k accuracy of a policy on a task source (paper: temperature 1.0, top-p 0.7, k = 16)."""
    from pipelines.evaluate import evaluate as recipe
    from pipelines.rl_train import require_answers
    from v05_rl.engine import load_task_prompts

    set_threads(threads)
    try:
        require_answers(load_task_prompts(tasks, tasks_path, split), tasks=tasks, path=tasks_path, split=split)
        recipe(policy, tasks=tasks, tasks_path=tasks_path, split=split, n_prompts=n_prompts, k=k,
               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, device=device, out=out)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None
