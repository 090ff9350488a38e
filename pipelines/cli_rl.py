"""`v05 rl-train`, `v05 build-data` and `v05 evaluate`: thin entry points over `v05_rl.trainer`.

Configuration: dataclass defaults < `--config` YAML (default: the embedded `pipelines/configs/tiny.yaml`)
< command-line options (including any field through `--set KEY=VALUE`). The resolved config is written
next to every run's outputs (`config.json` and `config.yaml`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click

from pipelines.config import DEFAULT_CONFIG, ConfigError, load_config, parse_set, to_yaml

ENGINES = ("local", "verl")
_TRAINER_ALGORITHMS = ("grpo", "dapo", "v05", "v05-fixed")  # = v05_rl.trainer.ALGORITHMS (checked in tests)
_PRIORS = ("none", "oracle-noise", "v0")  # = v05_rl.prior.PRIOR_SOURCES.names() (checked in tests)
_TINY_FAMILY = ("tiny-s", "tiny-m", "tiny-l")  # = v05_rl.policies.FAMILY (checked in tests)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


# ====================================================================================== rl-train


@click.command("rl-train")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: the embedded single-machine engine; verl: the distributed engine (needs the [verl] extra).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"YAML config (section 'rl'); default: the embedded {DEFAULT_CONFIG.name}.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: metrics.jsonl, checkpoints/, config.json, policy/.")
@click.option("--algorithm", type=click.Choice(_TRAINER_ALGORITHMS), default=None, help="grpo, dapo, v05 (OSLA) or v05-fixed.")
@click.option("--prior", type=click.Choice(_PRIORS), default=None,
              help="Prior source for v05: none; oracle-noise (EXPERIMENTAL UPPER BOUND: the policy's true success rate "
                   "from extra unbudgeted rollouts plus noise); v0 (needs --v0-checkpoint).")
@click.option("--v0-checkpoint", type=click.Path(dir_okay=False), default=None, help="V0 checkpoint for --prior v0.")
@click.option("--policy", default=None, help="Policy: tiny-s / tiny-m / tiny-l, a local save_pretrained folder or a Hub id.")
@click.option("--rollout-budget", type=int, default=None, help="Stop after this many generated rollouts (all counted).")
@click.option("--steps", type=int, default=None, help="Training steps (the run also stops at --rollout-budget).")
@click.option("--max-minutes", type=float, default=None, help="Stop after this many minutes of training steps (evaluation excluded).")
@click.option("--rollouts-per-step", type=int, default=None, help="Prompt batch × rollouts per prompt (compute matching).")
@click.option("--k", type=int, default=None, help="Rollouts per prompt for v05-fixed.")
@click.option("--group-size", type=int, default=None, help="G for grpo / dapo.")
@click.option("--lr", type=float, default=None, help="AdamW learning rate.")
@click.option("--seed", type=int, default=None, help="Seed of prompt order, sampling and prior noise.")
@click.option("--prior-noise-std", type=float, default=None, help="oracle-noise: Gaussian noise std on [-1, 1].")
@click.option("--prior-flip-fraction", type=float, default=None, help="oracle-noise: fraction of flipped priors.")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Trajectory store: write every rollout there.")
@click.option("--logger", type=click.Choice(("none", "wandb", "tensorboard")), default=None,
              help="Extra metrics logger (when installed).")
@click.option("--device", default=None, help="cpu, cuda or auto.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config field, e.g. --set eval_every=5.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (bit-for-bit the same schedule).")
@click.option("--backend", type=click.Choice(("hf", "vllm")), default="hf", show_default=True, help="Rollout backend of the local engine.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
@click.argument("overrides", nargs=-1)
def rl_train(engine, config_path, out, algorithm, prior, v0_checkpoint, policy, rollout_budget, steps, max_minutes, rollouts_per_step,
             k, group_size, lr, seed, prior_noise_std, prior_flip_fraction, store, logger, device, sets, resume,
             backend, threads, progress, overrides) -> None:
    """RL training with GRPO, DAPO or V0.5 (embedded CPU engine or verl).

    OVERRIDES are KEY=VALUE pairs: fields of the 'rl' section for the local engine (like --set), Hydra
    overrides (e.g. v05.v0_checkpoint=PATH) for --engine verl.
    """
    sets = tuple(sets) + tuple(overrides)
    options = dict(algorithm=algorithm, prior=prior, v0_checkpoint=v0_checkpoint, policy=policy,
                   rollout_budget=rollout_budget, steps=steps, max_minutes=max_minutes, rollouts_per_step=rollouts_per_step, k=k,
                   group_size=group_size, lr=lr, seed=seed, prior_noise_std=prior_noise_std,
                   prior_flip_fraction=prior_flip_fraction, store=store, logger=logger, device=device)
    if engine == "verl":
        _run_verl(config_path, out, options, sets, resume)
        return
    from v05_rl.trainer import TrainConfig, run_training

    try:
        overrides = {**parse_set(sets), **{k_: v for k_, v in options.items() if v is not None}}
        cfg = load_config(TrainConfig, "rl", config_path or DEFAULT_CONFIG, overrides)
    except ConfigError as exc:
        raise _fail(exc) from None
    _set_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg, "rl"))
    try:
        trainer = run_training(cfg, out, resume=resume, backend_name=backend, progress=progress)
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        raise _fail(exc) from None
    evals = [r for r in trainer.history if r.get("kind") == "eval"]
    if evals:
        first, last = evals[0], evals[-1]
        click.echo(f"mean@{cfg.eval_k} on {cfg.eval_split}: {first.get('mean_at_k', float('nan')):.4f} (step {first['step']}) "
                   f"-> {last.get('mean_at_k', float('nan')):.4f} (step {last['step']}); rollouts {trainer.rollouts_used}")
    click.echo(f"outputs in {out}")


# click option -> Hydra key of a verl config (pipelines/configs/paper.yaml); other options do not apply to verl
_VERL_KEYS = {
    "prior": "v05.prior",
    "v0_checkpoint": "v05.v0_checkpoint",
    "steps": "trainer.total_training_steps",
    "lr": "actor_rollout_ref.actor.optim.lr",
}


def _run_verl(config_path: Path | None, out: Path, options: dict[str, Any], sets: tuple[str, ...], resume: bool) -> None:
    """Hand over to `v05_rl.verl.entry.launch` (imported only here, so the local engine never needs verl)."""
    if config_path is None:
        raise click.ClickException("--engine verl needs --config pointing to a verl config, e.g. pipelines/configs/paper.yaml")
    given = {k: v for k, v in options.items() if v is not None}
    unsupported = sorted(set(given) - set(_VERL_KEYS))
    if unsupported:
        raise click.ClickException(
            f"--engine verl: option(s) {', '.join('--' + u.replace('_', '-') for u in unsupported)} belong to the local "
            "engine; give verl settings as Hydra overrides (KEY=VALUE arguments)"
        )
    if importlib.util.find_spec("verl") is None:
        raise click.ClickException("--engine verl needs the verl extra: pip install 'v05[verl]' (and a GPU cluster)")
    try:
        entry = importlib.import_module("v05_rl.verl.entry")
    except ImportError as exc:
        raise click.ClickException(f"--engine verl: cannot import v05_rl.verl.entry ({exc}); install 'v05[verl]'") from None
    overrides = [f"{_VERL_KEYS[k]}={v}" for k, v in given.items()] + [f"trainer.default_local_dir={out}"]
    if resume:
        overrides.append("trainer.resume_mode=auto")
    overrides += list(sets)
    entry.launch(config_path, overrides)


# ====================================================================================== build-data


@dataclass(frozen=True)
class BuildDataConfig:
    """Stage one of the paper: GRPO runs over a policy family, every rollout of every step stored."""

    policies: tuple[str, ...] = field(default=_TINY_FAMILY, metadata={"help": "policies to train (names, paths or Hub ids)"})
    steps: int = field(default=30, metadata={"help": "GRPO steps per policy (every step's rollouts are stored)"})
    seed: int = field(default=0, metadata={"help": "seed of every run (the policy's own seed is part of its recipe)"})

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("BuildDataConfig.policies is empty; name at least one policy, e.g. [tiny-s]")
        if self.steps < 1:
            raise ValueError(f"BuildDataConfig.steps must be >= 1, got {self.steps}")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def model_name(policy: str) -> str:
    """The model name recorded in the store: a family name or Hub id as given, a local folder's name."""
    path = Path(policy).expanduser()
    return path.resolve().name if path.exists() else policy


@click.command("build-data")
@click.option("--store", type=click.Path(file_okay=False), required=True, help="Trajectory store to fill (created if absent).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the per-policy runs (checkpoints, metrics); default: <store>/build-data.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"YAML config (sections 'build_data' and 'rl'); default: the embedded {DEFAULT_CONFIG.name}.")
@click.option("--policies", default=None, help="Comma-separated policies (default: the tiny family).")
@click.option("--steps", type=int, default=None, help="GRPO steps per policy.")
@click.option("--seed", type=int, default=None, help="Seed of every run.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a field of the 'rl' section (GRPO settings).")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def build_data(store, out, config_path, policies, steps, seed, sets, threads, progress) -> None:
    """Run GRPO over a list of policies and record every rollout at every step into the store.

    Resumable per policy: a finished policy (DONE marker) is skipped, an interrupted one continues from
    its last checkpoint, and re-written steps replace their earlier rows in the store.
    """
    from v05_rl.trainer import TrainConfig, run_training

    path = config_path or DEFAULT_CONFIG
    try:
        bcfg = load_config(BuildDataConfig, "build_data", path,
                           {"policies": policies, "steps": steps, "seed": seed})
        base = load_config(TrainConfig, "rl", path, parse_set(sets), override_source="--set")
    except ConfigError as exc:
        raise _fail(exc) from None
    _set_threads(threads)
    out = out or Path(store) / "build-data"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(bcfg, "build_data") + to_yaml(base, "rl"))
    from tqdm.auto import tqdm

    total = len(bcfg.policies) * bcfg.steps
    done_steps = 0
    bar = tqdm(total=total, desc="build-data", unit="step", disable=not progress, position=0)
    try:
        for name in bcfg.policies:
            run_dir = out / _safe_name(model_name(name))
            if (run_dir / "DONE").exists():
                done_steps += bcfg.steps
                bar.update(bcfg.steps)
                click.echo(f"[build-data] {name}: done already, skipping")
                continue
            cfg = replace(base, algorithm="grpo", prior="none", policy=name, steps=bcfg.steps, seed=bcfg.seed,
                          store=str(store), store_model=model_name(name),
                          store_run_id=f"build-data-{_safe_name(model_name(name))}-seed{bcfg.seed}")
            resume = (run_dir / "checkpoints" / "latest").exists()
            bar.set_postfix(policy=name)
            def on_step(stats, _base=done_steps):
                bar.n = _base + stats.step
                bar.refresh()

            try:
                trainer = run_training(cfg, run_dir, resume=resume, progress=False, on_step=on_step)
            except (FileExistsError, FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
                raise _fail(exc) from None
            (run_dir / "DONE").write_text(json.dumps({"rollouts": trainer.rollouts_used, "steps": trainer.step}))
            done_steps += bcfg.steps
    finally:
        bar.close()
    click.echo(f"[build-data] stored every rollout of {len(bcfg.policies)} policies in {store}")


# ====================================================================================== evaluate


@click.command("evaluate")
@click.option("--policy", required=True, help="Policy: tiny family name, save_pretrained folder or Hub id.")
@click.option("--tasks", default="arith", show_default=True, help="Task source (arith, parquet, v0_release, ...).")
@click.option("--path", "tasks_path", default=None, help="Path or spec for the task source (parquet file, arith spec).")
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--n-prompts", type=int, default=None, help="Evaluate only the first N prompts.")
@click.option("--k", type=int, default=16, show_default=True, help="Samples per prompt (mean@k).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature (paper: 1.0).")
@click.option("--top-p", type=float, default=0.7, show_default=True, help="Nucleus sampling (paper: 0.7).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Maximum response length in tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the result as JSON here.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
def evaluate(policy, tasks, tasks_path, split, n_prompts, k, temperature, top_p, max_new_tokens, seed, device, out, threads) -> None:
    """mean@k accuracy of a policy on a task source (paper: temperature 1.0, top-p 0.7, k = 16)."""
    _set_threads(threads)
    from v0_data.rewards import score_one
    from v05_rl.evaluate import evaluate_policy
    from v05_rl.policies import load_policy
    from v05_rl.rollout import SamplingConfig
    from v05_rl.trainer import load_task_prompts, resolve_device

    try:
        prompts = load_task_prompts(tasks, tasks_path, split)
        if n_prompts:
            prompts = prompts[:n_prompts]
        model, tokenizer = load_policy(policy, resolve_device(device))
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise _fail(exc) from None
    by_ds: dict[str, list] = {}
    for p in prompts:
        by_ds.setdefault(p.dataset, []).append(p)
    results = {}
    for ds, group in by_ds.items():
        def reward(response, answer, _ds=ds):
            return score_one(_ds, response, answer).reward

        res = evaluate_policy(model, tokenizer, group, reward, k, sampling, seed=seed, progress=True)
        res.pop("per_prompt", None)
        results[ds] = res
        click.echo(f"{ds}: mean@{k} = {res['mean_at_k']:.4f} over {res['n_prompts']} prompts "
                   f"(share of prompts with 0 < rate < 1: {res['frac_in_0_1']:.3f})")
        for level, row in res.get("per_level", {}).items():
            click.echo(f"  {str(level):>12}  n={row['n']:<5d} mean@{k}={row['mean_at_k']:.4f}")
    if len(results) > 1:
        avg = sum(r["mean_at_k"] for r in results.values()) / len(results)
        click.echo(f"average over {len(results)} data sets: {avg:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"policy": policy, "tasks": tasks, "k": k, "results": results}, indent=2, default=str))
