"""Recipe of `v05 experiment NAME`: named grids of `v05 rl-train` runs from YAML, over paired seeds.

An experiment file (`pipelines/configs/experiments/<name>.yaml`, or any path) holds:

    description: what the grid answers
    config: tiny.yaml                 # base rl-train config (relative to pipelines/configs or absolute)
    seeds: [0, 1, 2, 3, 4, 5, 6, 7]   # default: the first DEFAULT_SEEDS seeds
    reference: grpo16                 # the arm(s) every other arm is compared with, seed by seed (or a list)
    common: {rollout_budget: 15360}   # TrainConfig settings applied to every run
    regimes:                          # optional axis: every variant runs once per regime
      fresh: {}
      multi-epoch: {train_prompts: 192}
    variants:
      v05:      {algorithm: v05, prior: v0}
      v05-c001: {algorithm: v05, prior: v0, osla: {c: 0.001}}   # nested sections as in the config file
      grpo16:   {algorithm: grpo, group_size: 16}

Settings are merged as dotted keys (`osla.c`), common < regime < variant < `--set`, and handed to each run
as `--set KEY=VALUE`. Each (regime, variant, seed) runs as `v05 rl-train` in its own process into
`OUT/[<regime>/]<variant>/seed<k>/`; a `DONE` marker is written only when it finished, so rerunning the
experiment skips finished runs and resumes interrupted ones from their last checkpoint. `--jobs N` runs N
processes at once and splits the cores between them (one thread each on 2 cores with `--jobs 2`).

The measurement protocol (DESIGN.md "Measuring RL outcomes"): seeds are *paired* — the engine seeds the
prompt order (`PromptSampler(n, seed)`), the initial policy (`torch.manual_seed(seed)` before loading it)
and the evaluation sampling (`derive_seed(seed, 0xE7A1)`) with the run seed, and always evaluates the first
`evaluation.prompts` prompts of the evaluation split — so run `seed k` of every arm shares them. The report
(`pipelines.report`) turns the runs into means with t-based 95 % CIs and paired differences against
`reference`, at equal rollouts and at equal optimizer steps. `protocol_notes` lists where a grid falls short
of the protocol (fewer than `PROTOCOL_SEEDS` seeds, fewer than `PROTOCOL_EVAL_PROMPTS` x `PROTOCOL_EVAL_K`
evaluation samples); the recipe prints them, it does not refuse to run.
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
from pipelines.config import CONFIG_DIR, flatten, load_config, warn_deprecated

EXPERIMENT_DIR = CONFIG_DIR / "experiments"
V0_CHECKPOINT_KEY = "prior_options.v0_checkpoint"  # where a variant with prior v0 names its checkpoint
V0_PRIORS = ("v0", "v0+history")  # prior sources that need a V0 checkpoint
TOP_LEVEL_KEYS = ("description", "config", "seeds", "reference", "common", "regimes", "variants")
DEFAULT_SEEDS = 8  # seeds 0..7 when a grid names none
PROTOCOL_SEEDS = 8  # DESIGN.md: at least 8 paired seeds ...
PROTOCOL_EVAL_PROMPTS = 1024  # ... and at least 1,024 held-out prompts ...
PROTOCOL_EVAL_K = 8  # ... x 8 samples each


@dataclass(frozen=True)
class RunSpec:
    """One (regime, variant, seed) cell of an experiment grid; `regime` is "" in a grid without regimes."""

    variant: str
    seed: int
    config: Path
    settings: dict[str, Any]
    out: Path
    regime: str = ""

    def command(self, threads: int, resume: bool) -> list[str]:
        cmd = [sys.executable, "-m", "pipelines.cli", "rl-train", "--config", str(self.config), "--out", str(self.out),
               "--seed", str(self.seed), "--threads", str(threads), "--no-progress"]
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
        if resume:
            cmd.append("--resume")
        return cmd

    @property
    def name(self) -> str:
        return f"{self.regime}/{self.variant}" if self.regime else self.variant


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
    unknown = set(data) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    for ref in grid_references(data):
        if ref not in data["variants"]:
            raise ValueError(f"{path}: reference {ref!r} is not a variant; name variants of "
                             f"{', '.join(data['variants'])}")
    regimes = data.get("regimes")
    if regimes is not None and not (isinstance(regimes, dict) and regimes):
        raise ValueError(f"{path}: 'regimes' must map regime names to settings, e.g. {{fresh: {{}}}}")
    return path, data


def grid_references(data: dict[str, Any]) -> list[str]:
    """The grid's `reference` arms (a name or a list of names); [] when it names none."""
    ref = data.get("reference")
    if ref is None:
        return []
    return [str(r) for r in ([ref] if isinstance(ref, str) else ref)]


def grid_seeds(data: dict[str, Any], seeds: Sequence[int] | None = None) -> list[int]:
    """`seeds` when given, else the grid's `seeds`, else 0..DEFAULT_SEEDS-1."""
    if seeds:
        return [int(s) for s in seeds]
    return [int(s) for s in data.get("seeds", range(DEFAULT_SEEDS))]


def variant_settings(data: dict[str, Any], variant: str, overrides: dict[str, Any], source: Path,
                     regime: str = "") -> dict[str, Any]:
    """`common`, the regime's settings, the variant's own, then `overrides`, as dotted TrainConfig keys
    (later win).

    Nested mappings (`osla: {c: 0.01}`) and legacy flat keys (`osla_c`, one deprecation line each) are
    accepted; unknown keys fail naming the file and the variant (or regime).
    """
    from v05_rl.engine.config import TrainConfig

    deprecated: list[tuple[str, str, str]] = []
    merged: dict[str, Any] = {}
    layers = [(f"{source} [common]", data.get("common") or {})]
    if regime:
        layers.append((f"{source} [regimes.{regime}]", data["regimes"][regime] or {}))
    layers += [(f"{source} [variants.{variant}]", data["variants"][variant] or {}), ("--set", overrides)]
    for where, values in layers:
        merged.update(flatten(TrainConfig, values, where=where, deprecated=deprecated))
    warn_deprecated(deprecated)
    return merged


def _with_v0_checkpoint(merged: dict[str, Any], v0_checkpoint: str | None, source: Path,
                        variant: str) -> dict[str, Any]:
    """A variant whose prior needs V0 gets the checkpoint (its own, else `--v0-checkpoint`) as an absolute path."""
    if merged.get("prior") not in V0_PRIORS:
        return merged
    ckpt = merged.get(V0_CHECKPOINT_KEY) or v0_checkpoint
    if not ckpt:
        raise ValueError(
            f"{source}: variant {variant!r} uses prior {merged['prior']}; pass --v0-checkpoint PATH "
            "(made by `v05 pretrain-v0`, or by `v05 demo` under runs/demo/v0/)")
    return {**merged, V0_CHECKPOINT_KEY: str(Path(ckpt).resolve())}


def plan_runs(data: dict[str, Any], out: Path, *, seeds: Sequence[int] | None, only: Sequence[str],
              overrides: dict[str, Any], v0_checkpoint: str | None, source: Path,
              regimes: Sequence[str] = ()) -> list[RunSpec]:
    """One `RunSpec` per (seed, selected regime, selected variant); a variant with a V0 prior gets the checkpoint.

    Seed-major order: every arm of seed 0 comes before any run of seed 1, so a grid stopped part-way leaves
    complete pairs. Runs of a grid with `regimes` go to `out/<regime>/<variant>/seed<k>`, others to
    `out/<variant>/seed<k>`.
    """
    config = Path(data.get("config", "tiny.yaml"))
    if not config.is_absolute():
        config = CONFIG_DIR / config
    all_regimes = list(data.get("regimes") or {})
    unknown = [r for r in regimes if r not in all_regimes]
    if unknown:
        raise ValueError(f"{source}: no regime {unknown[0]!r}; regimes: {', '.join(all_regimes) or '(none)'}")
    selected = [r for r in all_regimes if not regimes or r in regimes] or [""]
    cells = []  # (regime, variant, settings)
    for regime in selected:
        for variant in data["variants"]:
            if not only or variant in only:
                merged = variant_settings(data, variant, overrides, source, regime)
                cells.append((regime, variant, _with_v0_checkpoint(merged, v0_checkpoint, source, variant)))
    specs = [RunSpec(variant, seed, config, merged, (out / regime if regime else out) / variant / f"seed{seed}", regime)
             for seed in grid_seeds(data, seeds) for regime, variant, merged in cells]
    if not specs:
        raise ValueError(f"{source}: no runs selected (variants: {', '.join(data['variants'])})")
    return specs


def protocol_notes(specs: Sequence[RunSpec]) -> list[str]:
    """Where the planned grid falls short of the measurement protocol (seeds, evaluation size); [] if nowhere."""
    from v05_rl.engine.config import TrainConfig

    notes = []
    seeds = {s.seed for s in specs}
    if len(seeds) < PROTOCOL_SEEDS:
        notes.append(f"{len(seeds)} seeds (protocol: >= {PROTOCOL_SEEDS} paired seeds)")
    for name, spec in {s.name: s for s in specs}.items():
        ev = load_config(TrainConfig, "rl", spec.config, spec.settings).evaluation
        if ev.prompts < PROTOCOL_EVAL_PROMPTS or ev.k < PROTOCOL_EVAL_K:
            notes.append(f"{name}: evaluation {ev.prompts} prompts x {ev.k} samples "
                         f"(protocol: >= {PROTOCOL_EVAL_PROMPTS} x {PROTOCOL_EVAL_K})")
    return notes


def run_one(spec: RunSpec, threads: int) -> tuple[RunSpec, int, float]:
    """Run one cell unless its `DONE` marker exists (then rc 0 and 0 s); resumes from its last checkpoint."""
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
    """Run `specs` in `jobs` parallel processes of max(1, cores // jobs) threads each; (spec, rc, seconds)."""
    from tqdm.auto import tqdm

    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // jobs)
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(specs), desc="runs", unit="run") as bar:
        for spec, rc, secs in pool.map(lambda s: run_one(s, threads), specs):
            results.append((spec, rc, secs))
            bar.set_postfix_str(f"{spec.name}/seed{spec.seed} {'ok' if rc == 0 else f'FAILED rc={rc}'}")
            bar.update()
    return results


def write_reports(specs: Sequence[RunSpec], out: Path, title: str, references: Sequence[str]) -> list[Path]:
    """One report per regime (`out/<regime>/report`), or `out/report` for a grid without regimes."""
    from pipelines.report import write_report

    written = []
    for regime in dict.fromkeys(s.regime for s in specs):
        base = out / regime if regime else out
        if not any(base.glob("**/metrics.jsonl")):
            continue
        written.append(write_report([base], base / "report", title=f"{title} {regime}".strip(),
                                    reference=list(references) or None))
    return written


def experiment(name: str, out: Path | None = None, *, seeds: Sequence[int] | None = None, only: Sequence[str] = (),
               overrides: dict[str, Any] | None = None, v0_checkpoint: str | None = None, jobs: int = 1,
               report: bool = True, dry_run: bool = False,
               regimes: Sequence[str] = ()) -> list[tuple[RunSpec, int, float]]:
    """Run the grid `name` into `out` (default results/<name>), then its report(s); returns (spec, rc, seconds).

    `dry_run` prints the commands and runs nothing. Failed runs are listed in a `RuntimeError` after the
    reports are written.
    """
    source, data = load_experiment(name)
    out = out or Path("results") / source.stem
    specs = plan_runs(data, out, seeds=seeds, only=only, overrides=overrides or {}, v0_checkpoint=v0_checkpoint,
                      source=source, regimes=regimes)
    if dry_run:
        for spec in specs:
            click.echo(" ".join(spec.command(1, False)))
        return []
    if jobs < 1:
        raise OptionError("must be >= 1", "--jobs")
    click.echo(f"{source.stem}: {len(specs)} runs -> {out}" + (f" ({data['description']})" if data.get("description") else ""))
    for note in protocol_notes(specs):
        click.echo(f"note: below the measurement protocol: {note}", err=True)
    results = run_experiment(specs, jobs)
    failed = [(s, rc) for s, rc, _ in results if rc != 0]
    if report:
        for md in write_reports(specs, out, f"Experiment {source.stem}", grid_references(data)):
            click.echo(f"report: {md}")
    if failed:
        lines = "\n".join(f"  {s.name}/seed{s.seed}: rc={rc}, log {s.out / 'stdout.log'}" for s, rc in failed)
        raise RuntimeError(f"{len(failed)} run(s) failed:\n{lines}")
    return results
