"""Recipe of `v05 experiment NAME`: named grids of `v05 rl-train` runs from YAML, over several seeds.

An experiment file (`pipelines/configs/experiments/<name>.yaml`, or any path) holds:

    description: what the grid answers
    config: tiny.yaml                 # base rl-train config (relative to pipelines/configs or absolute)
    seeds: [0, 1, 2]
    common: {rollout_budget: 20000}   # TrainConfig settings applied to every run
    variants:
      v05:      {algorithm: v05, prior: v0}
      v05-c001: {algorithm: v05, prior: v0, osla: {c: 0.001}}   # nested sections as in the config file
      grpo16:   {algorithm: grpo, group_size: 16}

Settings are merged as dotted keys (`osla.c`), common < variant < `--set`, and handed to each run as
`--set KEY=VALUE`. Each (variant, seed) runs as `v05 rl-train` in its own process into `OUT/<variant>/seed<k>/`, and a
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

from pipelines.common import OptionError
from pipelines.config import CONFIG_DIR, flatten, warn_deprecated

EXPERIMENT_DIR = CONFIG_DIR / "experiments"
V0_CHECKPOINT_KEY = "prior_options.v0_checkpoint"  # where a variant with prior v0 names its checkpoint


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
    """The experiments shipped in `pipelines/configs/experiments/`."""
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def load_experiment(name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """(file, its mapping) of a named experiment or a YAML path; unknown top-level keys are refused."""
    path = Path(name_or_path)
    if not path.exists():
        path = EXPERIMENT_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"no experiment {name_or_path!r}; named ones: {', '.join(experiment_names())}, or pass a YAML path")
    data = yaml.safe_load(path.read_text()) or {}
    if "variants" not in data:
        raise ValueError(f"{path}: missing top-level key 'variants' (see `v05 experiment --help`)")
    unknown = set(data) - {"description", "config", "seeds", "common", "variants"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: description, config, seeds, common, variants")
    return path, data


def variant_settings(data: dict[str, Any], variant: str, overrides: dict[str, Any], source: Path) -> dict[str, Any]:
    """`common`, then the variant's own settings, then `overrides`, as dotted TrainConfig keys (later win).

    Nested mappings (`osla: {c: 0.01}`) and legacy flat keys (`osla_c`, one deprecation line each) are
    accepted; unknown keys fail naming the file and the variant.
    """
    from v05_rl.engine.config import TrainConfig

    deprecated: list[tuple[str, str, str]] = []
    merged: dict[str, Any] = {}
    layers = ((f"{source} [common]", data.get("common") or {}),
              (f"{source} [variants.{variant}]", data["variants"][variant] or {}),
              ("--set", overrides))
    for where, values in layers:
        merged.update(flatten(TrainConfig, values, where=where, deprecated=deprecated))
    warn_deprecated(deprecated)
    return merged


def plan_runs(data: dict[str, Any], out: Path, *, seeds: Sequence[int] | None, only: Sequence[str],
              overrides: dict[str, Any], v0_checkpoint: str | None, source: Path) -> list[RunSpec]:
    """One `RunSpec` per (selected variant, seed); a variant with prior v0 gets the V0 checkpoint."""
    config = Path(data.get("config", "tiny.yaml"))
    if not config.is_absolute():
        config = CONFIG_DIR / config
    seeds = list(seeds) if seeds else list(data.get("seeds", [0]))
    specs = []
    for variant in data["variants"]:
        if only and variant not in only:
            continue
        merged = variant_settings(data, variant, overrides, source)
        if merged.get("prior") == "v0":
            ckpt = merged.get(V0_CHECKPOINT_KEY) or v0_checkpoint
            if not ckpt:
                raise ValueError(
                    f"{source}: variant {variant!r} uses prior v0; pass --v0-checkpoint PATH "
                    "(made by `v05 pretrain-v0`, or by `v05 demo` under runs/demo/v0/)")
            merged[V0_CHECKPOINT_KEY] = str(Path(ckpt).resolve())
        for seed in seeds:
            specs.append(RunSpec(variant, int(seed), config, merged, out / variant / f"seed{seed}"))
    if not specs:
        raise ValueError(f"{source}: no runs selected (variants: {', '.join(data['variants'])})")
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


def experiment(name: str, out: Path | None = None, *, seeds: Sequence[int] | None = None, only: Sequence[str] = (),
               overrides: dict[str, Any] | None = None, v0_checkpoint: str | None = None, jobs: int = 1,
               report: bool = True, dry_run: bool = False) -> list[tuple[RunSpec, int, float]]:
    """Run the grid `name` into `out` (default results/<name>), then its report; returns (spec, rc, seconds).

    `dry_run` prints the commands and runs nothing. Failed runs are listed in a `RuntimeError` after the
    report is written.
    """
    source, data = load_experiment(name)
    out = out or Path("results") / source.stem
    specs = plan_runs(data, out, seeds=seeds, only=only, overrides=overrides or {}, v0_checkpoint=v0_checkpoint,
                      source=source)
    if dry_run:
        for spec in specs:
            click.echo(" ".join(spec.command(1, False)))
        return []
    if jobs < 1:
        raise OptionError("must be >= 1", "--jobs")
    click.echo(f"{source.stem}: {len(specs)} runs -> {out}" + (f" ({data['description']})" if data.get("description") else ""))
    results = run_experiment(specs, jobs)
    failed = [(s, rc) for s, rc, _ in results if rc != 0]
    if report:
        from pipelines.report import write_report

        md = write_report([out], out / "report", title=f"Experiment {source.stem}")
        click.echo(f"report: {md}")
    if failed:
        lines = "\n".join(f"  {s.variant}/seed{s.seed}: rc={rc}, log {s.out / 'stdout.log'}" for s, rc in failed)
        raise RuntimeError(f"{len(failed)} run(s) failed:\n{lines}")
    return results
