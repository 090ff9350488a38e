"""`v05 experiment NAME`: options of `pipelines.experiment.experiment`."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.cli.options import RECIPE_ERRORS, fail
from pipelines.config import parse_set


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
    from pipelines.experiment import experiment as recipe

    try:
        recipe(name, out, seeds=[int(s) for s in seeds.split(",")] if seeds else None,
               only=[s for s in only.split(",") if s], overrides=parse_set(sets), v0_checkpoint=v0_checkpoint,
               jobs=jobs, report=report, dry_run=dry_run)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None
