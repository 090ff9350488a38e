"""`v05 bench estimator` and `v05 bench store`: options of the benchmarks in `pipelines.bench`."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.bench.estimator import BenchConfig, bench_estimator
from pipelines.bench.store import N_PROMPTS, bench_store
from pipelines.cli.options import COUNT, POSITIVE, RECIPE_ERRORS, fail


@click.command("estimator")
@click.option("--prompts", type=POSITIVE, default=BenchConfig.prompts, show_default=True,
              help="Simulated prompts per (difficulty distribution, prior-error regime).")
@click.option("--seed", type=COUNT, default=0, show_default=True, help="Seed of the Monte Carlo.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for estimator_bench.json and estimator_bench.png (created if missing).")
@click.option("--quick", is_flag=True, help="20,000 prompts instead of the default: a fast, noisier check.")
@click.option("--speed", is_flag=True,
              help="Also time V0.5 advantages + plan_round on 512 prompts x 16 rollouts (median us per call).")
@click.option("--scores", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="V0 release context.jsonl for the real score distribution (default: ../shared/data/...).")
def estimator(prompts: int, seed: int, out_dir: Path | None, quick: bool, speed: bool, scores: Path | None) -> None:
    """Monte Carlo benchmark of the V0.5 fused baseline, its variants and OSLA against GRPO and an oracle."""
    if quick:
        prompts = min(prompts, 20_000)
    try:
        cfg = BenchConfig(prompts=prompts, seed=seed, scores_path=str(scores) if scores else None)
        bench_estimator(cfg, out_dir, speed=speed)
    except RECIPE_ERRORS as err:
        raise fail(err) from None


@click.command("store")
@click.option("--n", "n_rollouts", type=POSITIVE, default=10_000_000, show_default=True, help="rollouts to synthesise")
@click.option("--quick", is_flag=True, help="1 M rollouts instead of the default (overrides --n)")
@click.option("--repeats", type=POSITIVE, default=3, show_default=True, help="timed repeats of the aggregation (median reported)")
@click.option("--seed", type=COUNT, default=0, show_default=True, help="seed of the synthetic data")
@click.option("--prompts", "n_prompts", type=POSITIVE, default=N_PROMPTS, show_default=True, help="distinct prompts")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where to build the store and floor files (default: a temporary folder, deleted afterwards)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench_store.json"),
              show_default=True, help="JSON file for the results")
def store(
    n_rollouts: int, quick: bool, repeats: int, seed: int, n_prompts: int, workdir: Path | None, out_path: Path
) -> None:
    """Ingest rate, bytes per rollout and prompt_stats time of the trajectory store vs. one Parquet file."""
    if quick:
        n_rollouts = 1_000_000
    try:
        bench_store(n_rollouts, out_path, repeats=repeats, seed=seed, n_prompts=n_prompts, workdir=workdir)
    except RECIPE_ERRORS as err:
        raise fail(err) from None
