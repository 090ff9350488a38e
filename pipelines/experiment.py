"""`v05 experiment NAME`: named grids of `v05 rl-train` runs from YAML, over several seeds.

An experiment file (`pipelines/configs/experiments/<name>.yaml`, or any path) holds:

    description: what the grid answers
    config: tiny.yaml                 # base rl-train config (relative to pipelines/configs or absolute)
    seeds: [0, 1, 2]
    common: {rollout_budget: 20000}   # TrainConfig fields applied to every run
    variants:
      v05:    {algorithm: v05, prior: v0}
      grpo16: {algorithm: grpo, group_size: 16}

Each (variant, seed) runs as `v05 rl-train` in its own process into `OUT/<variant>/seed<k>/`, and a
`DONE` marker is written only when it finished; rerunning the experiment skips finished runs and resumes
interrupted ones from their last checkpoint. `--jobs N` runs N processes at once, splitting the cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import yaml

from pipelines.config import CONFIG_DIR

EXPERIMENT_DIR = CONFIG_DIR / "experiments"


@dataclass(frozen=True)
class RunSpec:
    """One (variant, seed) cell of an experiment grid."""

    variant: str
    seed: int
    config: Path
    settings: dict[str, Any]
    out: Path

    def command(self, threads: int, resume: bool) -> list[str]:
        cmd = [sys.executable, "-m", "pipelines.cli", "rl-train", "--config", str(self.config), "--out", str(self.out),
               "--seed", str(self.seed), "--threads", str(threads), "--no-progress"]
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
        if resume:
            cmd.append("--resume")
        return cmd


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def load_experiment(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    path = Path(name_or_path)
    if not path.exists():
        path = EXPERIMENT_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise click.ClickException(f"no experiment {name_or_path!r}; named ones: {', '.join(experiment_names())}, or pass a YAML path")
    data = yaml.safe_load(path.read_text()) or {}
    for key in ("variants",):
        if key not in data:
            raise click.ClickException(f"{path}: missing top-level key {key!r} (see `v05 experiment --help`)")
    unknown = set(data) - {"description", "config", "seeds", "common", "variants"}
    if unknown:
        raise click.ClickException(f"{path}: unknown keys {sorted(unknown)}; allowed: description, config, seeds, common, variants")
    return path, data


def plan_runs(data: dict[str, Any], out: Path, *, seeds: Sequence[int] | None, only: Sequence[str],
              overrides: dict[str, Any], v0_checkpoint: str | None, source: Path) -> list[RunSpec]:
    config = Path(data.get("config", "tiny.yaml"))
    if not config.is_absolute():
        config = CONFIG_DIR / config
    seeds = list(seeds) if seeds else list(data.get("seeds", [0]))
    specs = []
    for variant, settings in data["variants"].items():
        if only and variant not in only:
            continue
        merged = {**(data.get("common") or {}), **(settings or {}), **overrides}
        if merged.get("prior") == "v0":
            ckpt = merged.get("v0_checkpoint") or v0_checkpoint
            if not ckpt:
                raise click.ClickException(
                    f"{source}: variant {variant!r} uses prior v0; pass --v0-checkpoint PATH "
                    "(made by `v05 pretrain-v0`, or by `v05 demo` under runs/demo/v0/)")
            merged["v0_checkpoint"] = str(Path(ckpt).resolve())
        for seed in seeds:
            specs.append(RunSpec(variant, int(seed), config, merged, out / variant / f"seed{seed}"))
    if not specs:
        raise click.ClickException(f"{source}: no runs selected (variants: {', '.join(data['variants'])})")
    return specs


def run_one(spec: RunSpec, threads: int) -> tuple[RunSpec, int, float]:
    done = spec.out / "DONE"
    if done.exists():
        return spec, 0, 0.0
    spec.out.mkdir(parents=True, exist_ok=True)
    resume = (spec.out / "checkpoints" / "latest").exists()
    t0 = time.perf_counter()
    with open(spec.out / "stdout.log", "a") as log:
        rc = subprocess.call(spec.command(threads, resume), stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if rc == 0:
        done.write_text("ok\n")
    return spec, rc, time.perf_counter() - t0


def run_experiment(specs: Sequence[RunSpec], jobs: int, cores: int | None = None) -> list[tuple[RunSpec, int, float]]:
    from tqdm.auto import tqdm

    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // jobs)
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(specs), desc="runs", unit="run") as bar:
        for spec, rc, secs in pool.map(lambda s: run_one(s, threads), specs):
            results.append((spec, rc, secs))
            bar.set_postfix_str(f"{spec.variant}/seed{spec.seed} {'ok' if rc == 0 else f'FAILED rc={rc}'}")
            bar.update()
    return results


@click.command()
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results folder (default: results/<NAME>); reused to skip finished runs and resume others.")
@click.option("--seeds", default=None, help="Comma-separated seeds, overriding the file's list, e.g. 0,1,2.")
@click.option("--only", default="", help="Comma-separated variants to run (default: all).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a TrainConfig field in every run.")
@click.option("--v0-checkpoint", default=None, type=click.Path(dir_okay=False), help="V0 checkpoint for variants with prior v0.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Runs in parallel processes (cores are split between them).")
@click.option("--report/--no-report", default=True, show_default=True, help="Write OUT/report after the runs.")
@click.option("--dry-run", is_flag=True, help="Print the commands and exit.")
def experiment(name, out, seeds, only, sets, v0_checkpoint, jobs, report, dry_run) -> None:
    """Run the experiment grid NAME (main, sparse, prior-quality, cost, or a YAML path)."""
    from pipelines.config import parse_set

    source, data = load_experiment(name)
    out = out or Path("results") / source.stem
    specs = plan_runs(data, out, seeds=[int(s) for s in seeds.split(",")] if seeds else None,
                      only=[s for s in only.split(",") if s], overrides=parse_set(sets),
                      v0_checkpoint=v0_checkpoint, source=source)
    if dry_run:
        for spec in specs:
            click.echo(" ".join(spec.command(1, False)))
        return
    if jobs < 1:
        raise click.BadParameter("must be >= 1", param_hint="--jobs")
    click.echo(f"{source.stem}: {len(specs)} runs -> {out}" + (f" ({data['description']})" if data.get("description") else ""))
    results = run_experiment(specs, jobs)
    failed = [(s, rc) for s, rc, _ in results if rc != 0]
    if report:
        from pipelines.report import write_report

        md = write_report([out], out / "report", title=f"Experiment {source.stem}")
        click.echo(f"report: {md}")
    if failed:
        lines = "\n".join(f"  {s.variant}/seed{s.seed}: rc={rc}, log {s.out / 'stdout.log'}" for s, rc in failed)
        raise click.ClickException(f"{len(failed)} run(s) failed:\n{lines}")
