"""`v05 demo`: options of `pipelines.demo.run_demo`."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click

from pipelines.cli.options import COUNT, POSITIVE, RECIPE_ERRORS, fail


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Folder for every stage's outputs; reused to resume.")
@click.option("--quick", is_flag=True, help="Smallest sizes everywhere (~3 min; used by the end-to-end test).")
@click.option("--force", is_flag=True, help="Redo stages that already finished.")
@click.option("--seed", type=COUNT, default=0, show_default=True, help="Seed for every stage.")
@click.option("--jobs", type=POSITIVE, default=None, help="Processes in parallel for warm starts and RL runs (default: 2, quick: 1).")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch CPU threads of the in-process stages (tiny models run best on one).")
def demo(out: Path, quick: bool, force: bool, seed: int, jobs: int | None, threads: int | None) -> None:
    """Run the main job on the embedded default: stage 1 (build-data, V0) -> stage 2 (V0.5 vs GRPO vs DAPO) -> report."""
    from pipelines.demo import QUICK, DemoConfig, run_demo

    cfg = QUICK if quick else DemoConfig()
    if jobs:
        cfg = replace(cfg, jobs=jobs)
    t0 = time.perf_counter()
    try:
        md = run_demo(out, cfg, seed=seed, force=force, threads=threads)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None
    click.echo(f"[demo] finished in {time.perf_counter() - t0:.0f} s; report: {md}")
