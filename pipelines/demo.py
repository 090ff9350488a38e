"""`v05 demo`: the whole pipeline on the embedded default (CPU, offline), resumable.

    estimator-bench -> policies -> build-data -> v0 -> rl (V0.5 vs GRPO-16 vs DAPO at equal rollouts) -> report

Each stage writes under `--out` and leaves a `DONE` marker last, so rerunning the demo after an
interruption skips finished stages and resumes the one that was cut off (build-data and the RL runs
resume from their own checkpoints). Sizes come from `DemoConfig`: the default preset targets about
20 minutes on 2 cores, `--quick` about 3 minutes (it is what the end-to-end test runs).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click


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
    jobs: int = field(default=2, metadata={"help": "processes in parallel (warm starts, RL runs), one thread each"})


QUICK = DemoConfig(bench_prompts=20_000, policies=("tiny-s",), warm_start_steps=1200, build_steps=3,
                   build_rollouts_per_step=512, v0_minutes=0.5, v0_steps=10, rl_policy="tiny-s",
                   rl_budget=64 * 2, rl_rollouts_per_step=64, eval_every=1, eval_prompts=16, jobs=1)


def _stage(out: Path, name: str, fn, *, force: bool) -> None:
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


def _policy_ref(name: str, cfg: DemoConfig) -> str:
    """A family name, or the path of a member with a shortened warm start (a separate cache entry)."""
    if cfg.warm_start_steps is None:
        return name
    from v05_rl.policies import ensure_policy

    return str(ensure_policy(name, overrides={"steps": cfg.warm_start_steps}))


def _warm_start_parallel(names: list[str], cfg: DemoConfig, jobs: int) -> None:
    """Build (or find cached) warm-started policies, `jobs` processes at a time with one thread each.

    Warm starts dominate a fresh demo; separate processes use the cores far better than torch's
    intra-op threads do for models this small.
    """
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    overrides = {} if cfg.warm_start_steps is None else {"steps": cfg.warm_start_steps}
    code = "import sys, json, torch; torch.set_num_threads(1); from v05_rl.policies import ensure_policy; " \
           "ensure_policy(sys.argv[1], progress=False, overrides=json.loads(sys.argv[2]) or None)"

    def build(name: str) -> int:
        click.echo(f"[demo] warm start {name} ...")
        return subprocess.call([sys.executable, "-c", code, name, json.dumps(overrides)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"})

    # Largest first, so the longest build starts at once.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(build, sorted(names, key=lambda n: {"tiny-l": 0, "tiny-m": 1}.get(n, 2))))
    if any(codes):
        raise click.ClickException(f"warm start failed for {[n for n, c in zip(names, codes) if c]}")


def run_demo(out: Path, cfg: DemoConfig, *, seed: int = 0, force: bool = False, threads: int | None = None) -> Path:
    """Run every stage; returns the path of the final report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    store = out / "store"
    v0_ckpt = out / "v0" / "v0.pt"
    threads_args = ["--threads", str(threads)] if threads else []

    def estimator_stage(stage_dir: Path) -> None:
        from pipelines.bench_estimator import estimator

        estimator.main(["--seed", str(seed), "--prompts", str(cfg.bench_prompts), "--out", str(stage_dir)],
                       standalone_mode=False)

    def policies_stage(stage_dir: Path) -> None:
        names = list(dict.fromkeys((*cfg.policies, cfg.rl_policy)))
        _warm_start_parallel(names, cfg, jobs=max(1, cfg.jobs))
        refs = {name: _policy_ref(name, cfg) for name in names}
        (stage_dir / "policies.json").write_text(json.dumps(refs, indent=2))

    def refs() -> dict[str, str]:
        return json.loads((out / "policies" / "policies.json").read_text())

    def build_stage(stage_dir: Path) -> None:
        from pipelines.cli_rl import build_data

        policies = ",".join(refs()[p] for p in cfg.policies)
        build_data.main(["--store", str(store), "--out", str(stage_dir), "--policies", policies,
                         "--steps", str(cfg.build_steps), "--seed", str(seed),
                         "--set", f"rollouts_per_step={cfg.build_rollouts_per_step}", "--set", f"group_size={cfg.build_group_size}",
                         "--set", "eval_every=0",
                         *threads_args], standalone_mode=False)

    def v0_stage(stage_dir: Path) -> None:
        from pipelines.cli_v0 import pretrain_v0

        args = ["--store", str(store), "--out", str(v0_ckpt), "--max-minutes", str(cfg.v0_minutes), "--seed", str(seed)]
        if cfg.v0_steps is not None:
            args += ["--max-steps", str(cfg.v0_steps)]
        pretrain_v0.main(args + threads_args, standalone_mode=False)

    def rl_stage(stage_dir: Path) -> None:
        from pipelines.experiment import load_experiment, plan_runs, run_experiment

        source, data = load_experiment("main")
        overrides = {"policy": refs()[cfg.rl_policy], "rollout_budget": cfg.rl_budget,
                     "rollouts_per_step": cfg.rl_rollouts_per_step, "eval_every": cfg.eval_every,
                     "eval_prompts": cfg.eval_prompts, "steps": 10_000}
        # the demo's comparison: V0.5 vs GRPO-16 vs DAPO (the experiment's other variants stay for `v05 experiment`)
        specs = plan_runs(data, stage_dir, seeds=[seed], only=["v05", "grpo16", "dapo"], overrides=overrides,
                          v0_checkpoint=str(v0_ckpt), source=source)
        failed = [(s, rc) for s, rc, _ in run_experiment(specs, cfg.jobs) if rc != 0]
        if failed:
            raise click.ClickException("RL run(s) failed: " + ", ".join(f"{s.variant} (log {s.out / 'stdout.log'})" for s, _ in failed))

    def report_stage(stage_dir: Path) -> None:
        from pipelines.report import write_report

        images = sorted((out / "v0").glob("**/*.png")) + [out / "estimator-bench" / "estimator_bench.png"]
        write_report([out / "rl"], stage_dir, title="v05 demo: V0.5 vs GRPO-16 vs DAPO on the embedded arith world",
                     extra_images=images)

    _stage(out, "estimator-bench", estimator_stage, force=force)
    _stage(out, "policies", policies_stage, force=force)
    _stage(out, "build-data", build_stage, force=force)
    _stage(out, "v0", v0_stage, force=force)
    _stage(out, "rl", rl_stage, force=force)
    _stage(out, "report", report_stage, force=True)
    return out / "report" / "report.md"


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Folder for every stage's outputs; reused to resume.")
@click.option("--quick", is_flag=True, help="Smallest sizes everywhere (~3 min; used by the end-to-end test).")
@click.option("--force", is_flag=True, help="Redo stages that already finished.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every stage.")
@click.option("--jobs", type=int, default=None, help="Processes in parallel for warm starts and RL runs (default: 2, quick: 1).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads of the in-process stages (tiny models run best on one).")
def demo(out: Path, quick: bool, force: bool, seed: int, jobs: int | None, threads: int | None) -> None:
    """Run the main job on the embedded default: stage 1 (build-data, V0) -> stage 2 (V0.5 vs GRPO vs DAPO) -> report."""
    cfg = QUICK if quick else DemoConfig()
    if jobs:
        cfg = replace(cfg, jobs=jobs)
    t0 = time.perf_counter()
    md = run_demo(out, cfg, seed=seed, force=force, threads=threads)
    click.echo(f"[demo] finished in {time.perf_counter() - t0:.0f} s; report: {md}")
