"""Recipe of `v05 demo`: the whole pipeline on the embedded default (CPU, offline), resumable.

    estimator-bench -> policies -> build-data -> v0 -> rl (V0.5 vs GRPO-16 vs DAPO at equal rollouts) -> report

Each stage calls the recipe of its command (`bench_estimator`, `build_data`, `pretrain_v0`, the
experiment grid, `write_report`), writes under `--out` and leaves a `DONE` marker last, so rerunning the
demo after an interruption skips finished stages and resumes the one that was cut off (build-data and the
RL runs resume from their own checkpoints). Sizes come from `DemoConfig`: the default preset targets
about 20 minutes on 2 cores, `--quick` about 3 minutes (it is what the end-to-end test runs).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import click

from pipelines.common import set_threads
from pipelines.config import DEFAULT_CONFIG, load_config


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of every demo stage."""

    bench_prompts: int = field(default=100_000, metadata={"help": "Monte Carlo prompts of the estimator benchmark"})
    policies: tuple[str, ...] = field(default=("tiny-s", "tiny-m", "tiny-l"), metadata={"help": "policy family of stage 1"})
    warm_start_steps: int | None = field(default=None, metadata={"help": "override of the policies' warm start (None = recipe)"})
    build_steps: int = field(default=12, metadata={"help": "GRPO steps per policy in build-data"})
    build_rollouts_per_step: int = field(default=1024, metadata={"help": "rollouts per build-data step"})
    build_group_size: int = field(default=4, metadata={"help": "GRPO group size in build-data: more prompts per (model, step) snapshot for V0"})
    v0_minutes: float = field(default=3.0, metadata={"help": "wall-clock limit of V0 pretraining"})
    v0_steps: int | None = field(default=None, metadata={"help": "optimiser steps of V0 pretraining (None = config)"})
    rl_policy: str = field(default="tiny-m", metadata={"help": "policy trained in stage 2"})
    rl_budget: int = field(default=256 * 60, metadata={"help": "rollouts per RL run (equal for every algorithm)"})
    rl_rollouts_per_step: int = field(default=256, metadata={"help": "prompt batch x rollouts per prompt"})
    eval_every: int = field(default=10, metadata={"help": "RL evaluation period (steps)"})
    eval_prompts: int = field(default=256, metadata={"help": "held-out prompts per evaluation"})
    eval_k: int = field(default=4, metadata={"help": "samples per held-out prompt (mean@k)"})
    jobs: int = field(default=2, metadata={"help": "processes in parallel (warm starts, RL runs), one thread each"})

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("DemoConfig.policies is empty; name at least one policy, e.g. ('tiny-s',)")
        for name in ("bench_prompts", "build_steps", "build_rollouts_per_step", "build_group_size", "rl_budget",
                     "rl_rollouts_per_step", "eval_prompts", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.v0_minutes > 0:
            raise ValueError(f"DemoConfig.v0_minutes must be > 0, got {self.v0_minutes}")


QUICK = DemoConfig(bench_prompts=20_000, policies=("tiny-s",), warm_start_steps=1200, build_steps=3,
                   build_rollouts_per_step=512, v0_minutes=0.5, v0_steps=10, rl_policy="tiny-s",
                   rl_budget=64 * 2, rl_rollouts_per_step=64, eval_every=1, eval_prompts=16, jobs=1)

# the demo's comparison: V0.5 vs GRPO-16 vs DAPO (the main experiment's other variants stay for `v05 experiment`)
RL_VARIANTS = ("v05", "grpo16", "dapo")


@dataclass(frozen=True)
class DemoRun:
    """What every stage needs: the output folder, the sizes, the seed and the torch threads."""

    out: Path
    cfg: DemoConfig
    seed: int = 0
    threads: int | None = None

    @property
    def store(self) -> Path:
        return self.out / "store"

    @property
    def v0_checkpoint(self) -> Path:
        return self.out / "v0" / "v0.pt"

    def policy_refs(self) -> dict[str, str]:
        """Family name -> what the later stages pass as the policy (written by the policies stage)."""
        return json.loads((self.out / "policies" / "policies.json").read_text())


def stage(out: Path, name: str, fn: Callable[[Path], Any], *, force: bool) -> None:
    """Run `fn(out / name)` unless its `DONE` marker exists (or `force`); write the marker last."""
    stage_dir = out / name
    done = stage_dir / "DONE"
    if done.exists() and not force:
        click.echo(f"[demo] {name}: already done ({stage_dir}), skipping")
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"[demo] {name}: running -> {stage_dir}")
    t0 = time.perf_counter()
    fn(stage_dir)
    secs = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": round(secs, 1)}))
    click.echo(f"[demo] {name}: done in {secs:.0f} s")


# ====================================================================================== policies


def warm_start_overrides(cfg: DemoConfig) -> dict[str, int] | None:
    """The warm-start recipe change of this preset (None: the family's own recipe)."""
    return None if cfg.warm_start_steps is None else {"steps": cfg.warm_start_steps}


def warm_start(name: str, overrides: dict[str, int] | None) -> str:
    """Build (or find cached) one warm-started policy with one torch thread; runs in a fresh process."""
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported in this process
    import torch

    torch.set_num_threads(1)
    from v05_rl.policies import ensure_policy

    return str(ensure_policy(name, progress=False, overrides=overrides))


def warm_start_parallel(names: list[str], cfg: DemoConfig, jobs: int) -> None:
    """Build (or find cached) warm-started policies, `jobs` processes at a time with one thread each.

    Warm starts dominate a fresh demo; separate processes use the cores far better than torch's
    intra-op threads do for models this small. Each policy gets a fresh (spawned) process.
    """
    order = sorted(names, key=lambda n: {"tiny-l": 0, "tiny-m": 1}.get(n, 2))  # largest first: it takes longest
    failed = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = {}
        for name in order:
            click.echo(f"[demo] warm start {name} ...")
            futures[name] = pool.submit(warm_start, name, warm_start_overrides(cfg))
        for name, future in futures.items():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - any failure of a child is reported with its policy
                print(f"[demo] warm start {name} failed: {exc!r}", file=sys.stderr)
                failed.append(name)
    if failed:
        raise RuntimeError(f"warm start failed for {failed}")


def policy_ref(name: str, cfg: DemoConfig) -> str:
    """A family name, or the path of a member with a shortened warm start (a separate cache entry)."""
    if cfg.warm_start_steps is None:
        return name
    from v05_rl.policies import ensure_policy

    return str(ensure_policy(name, overrides=warm_start_overrides(cfg)))


# ====================================================================================== stages


def estimator_stage(run: DemoRun, stage_dir: Path) -> None:
    from pipelines.bench.estimator import BenchConfig, bench_estimator

    bench_estimator(BenchConfig(prompts=run.cfg.bench_prompts, seed=run.seed), stage_dir)


def policies_stage(run: DemoRun, stage_dir: Path) -> None:
    names = list(dict.fromkeys((*run.cfg.policies, run.cfg.rl_policy)))
    warm_start_parallel(names, run.cfg, jobs=max(1, run.cfg.jobs))
    refs = {name: policy_ref(name, run.cfg) for name in names}
    (stage_dir / "policies.json").write_text(json.dumps(refs, indent=2))


def build_stage(run: DemoRun, stage_dir: Path) -> None:
    from pipelines.build_data import BuildDataConfig, build_data
    from v05_rl.engine.config import TrainConfig

    cfg = run.cfg
    policies = tuple(run.policy_refs()[p] for p in cfg.policies)
    bcfg = load_config(BuildDataConfig, "build_data", DEFAULT_CONFIG,
                       {"policies": policies, "steps": cfg.build_steps, "seed": run.seed})
    base = load_config(TrainConfig, "rl", DEFAULT_CONFIG, {"rollouts_per_step": cfg.build_rollouts_per_step,
                                                           "group_size": cfg.build_group_size, "evaluation.every": 0},
                       override_source="--set")
    set_threads(run.threads)
    build_data(bcfg, base, run.store, stage_dir)


def v0_stage(run: DemoRun, stage_dir: Path) -> None:
    from pipelines.pretrain_v0 import pretrain_v0

    pretrain_v0(run.v0_checkpoint, store=str(run.store), max_minutes=run.cfg.v0_minutes, max_steps=run.cfg.v0_steps,
                seed=run.seed, threads=run.threads or None)


def rl_stage(run: DemoRun, stage_dir: Path) -> None:
    from pipelines.experiment import load_experiment, plan_runs, run_experiment

    cfg = run.cfg
    source, data = load_experiment("main")
    overrides = {"policy": run.policy_refs()[cfg.rl_policy], "rollout_budget": cfg.rl_budget,
                 "rollouts_per_step": cfg.rl_rollouts_per_step, "evaluation.every": cfg.eval_every,
                 "evaluation.prompts": cfg.eval_prompts, "evaluation.k": cfg.eval_k, "steps": 10_000}
    specs = plan_runs(data, stage_dir, seeds=[run.seed], only=list(RL_VARIANTS), overrides=overrides,
                      v0_checkpoint=str(run.v0_checkpoint), source=source)
    failed = [(s, rc) for s, rc, _ in run_experiment(specs, cfg.jobs) if rc != 0]
    if failed:
        raise RuntimeError("RL run(s) failed: " + ", ".join(f"{s.variant} (log {s.out / 'stdout.log'})" for s, _ in failed))


def report_stage(run: DemoRun, stage_dir: Path) -> None:
    from pipelines.report import write_report

    images = sorted((run.out / "v0").glob("**/*.png")) + [run.out / "estimator-bench" / "estimator_bench.png"]
    write_report([run.out / "rl"], stage_dir, title="v05 demo: V0.5 vs GRPO-16 vs DAPO on the embedded arith world",
                 extra_images=images)


STAGES: tuple[tuple[str, Callable[[DemoRun, Path], None]], ...] = (
    ("estimator-bench", estimator_stage),
    ("policies", policies_stage),
    ("build-data", build_stage),
    ("v0", v0_stage),
    ("rl", rl_stage),
    ("report", report_stage),  # always redone: it is cheap and reads whatever the runs left
)


def run_demo(out: Path, cfg: DemoConfig, *, seed: int = 0, force: bool = False, threads: int | None = None) -> Path:
    """Run every stage; returns the path of the final report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    run = DemoRun(out, cfg, seed, threads)
    for name, fn in STAGES:
        stage(out, name, lambda stage_dir, fn=fn: fn(run, stage_dir), force=force or name == "report")
    return out / "report" / "report.md"


__all__ = ["QUICK", "RL_VARIANTS", "STAGES", "DemoConfig", "DemoRun", "run_demo"]
