"""`v05 demo`: the main job on the embedded default, as far as the pipeline exists.

Each stage writes its outputs under `--out` and a `DONE` marker last, so rerunning the demo after an
interruption skips the stages that finished and redoes only the one that was cut off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


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
    done.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Folder for every stage's outputs; reused to resume.")
@click.option("--quick", is_flag=True, help="Smallest sizes everywhere (used by the end-to-end test).")
@click.option("--force", is_flag=True, help="Redo stages that already finished.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every stage.")
def demo(out: Path, quick: bool, force: bool, seed: int) -> None:
    """Run the main job on the embedded default (CPU, offline)."""
    def estimator_stage(stage_dir: Path) -> None:
        from pipelines.bench_estimator import estimator

        args = ["--seed", str(seed), "--out", str(stage_dir)] + (["--quick"] if quick else [])
        estimator.main(args, standalone_mode=False)

    _stage(out, "estimator-bench", estimator_stage, force=force)
    click.echo(f"[demo] finished; outputs under {out}")
