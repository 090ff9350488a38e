"""`v05 experiment NAME`: options of `pipelines.experiment.experiment`."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.cli.options import POSITIVE, RECIPE_ERRORS, fail
from pipelines.config import parse_set


@click.command()
@click.argument("name")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results folder (default: results/<NAME>); reused to skip finished runs and resume others.")
@click.option("--seeds", default=None, help="Comma-separated seeds, overriding the file's list, e.g. 0,1,2.")
@click.option("--only", default="", help="Comma-separated variants to run (default: all).")
@click.option("--regimes", default="", help="Comma-separated regimes to run, for a grid with a `regimes` axis (default: all).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a TrainConfig field in every run.")
@click.option("--v0-checkpoint", default=None, type=click.Path(dir_okay=False), help="V0 checkpoint for variants with prior v0.")
@click.option("--jobs", type=POSITIVE, default=1, show_default=True, help="Runs in parallel processes (cores are split between them).")
@click.option("--report/--no-report", default=True, show_default=True, help="Write OUT/report (OUT/<regime>/report per regime) after the runs.")
@click.option("--dry-run", is_flag=True, help="Print the commands and exit.")
def experiment(name, out, seeds, only, regimes, sets, v0_checkpoint, jobs, report, dry_run) -> None:
    """Run the experiment grid NAME (a file of pipelines/configs/experiments, or a YAML path) over paired seeds.

    Finished runs are skipped and interrupted ones resumed, so the same command continues a grid. The
    report gives each arm's final accuracy (mean of the last two evaluations) with a t-based 95 % CI and
    the paired difference against the grid's `reference` arm, at equal rollouts and at equal steps.
    """
    from pipelines.experiment import experiment as recipe

    try:
        recipe(name, out, seeds=_seeds(seeds),
               only=[s for s in only.split(",") if s], overrides=parse_set(sets), v0_checkpoint=v0_checkpoint,
               jobs=jobs, report=report, dry_run=dry_run,
               regimes=[r for r in regimes.split(",") if r])
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None


def _seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; a value that is not a non-negative integer is a usage error."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        if not part.strip().isdigit():
            raise click.BadParameter(f"{part.strip()!r} is not a seed; give non-negative integers, e.g. 0,1,2",
                                     param_hint="'--seeds'")
        out.append(int(part))
    return out
