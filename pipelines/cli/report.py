"""`v05 report RUN_DIR...`: options of `pipelines.report.write_report`."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.cli.options import RECIPE_ERRORS, fail


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where report.md, summary.json and the PNGs go (default: the first RUN_DIR/report).")
@click.option("--title", default="V0.5 report", show_default=True, help="Title of the markdown report.")
@click.option("--reference", "references", multiple=True,
              help="Reference arm for the paired differences, repeatable; the first is also the accuracy target "
                   "of rollouts_to_ref_final (default: the first variant named grpo*).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Extra PNG to include, e.g. a V0 calibration plot (repeatable).")
def report(run_dirs: tuple[Path, ...], out: Path | None, title: str, references: tuple[str, ...],
           images: tuple[Path, ...]) -> None:
    """Render a markdown report, summary.json and plots from RUN_DIR... (runs or experiment folders).

    Final accuracy = mean of each run's last two evaluations; mean over seeds with a t-based 95 % CI; paired
    differences (by seed) against the reference arm(s), at equal rollouts and at equal optimizer steps.
    """
    from pipelines.report import write_report

    out = out or (run_dirs[0] / "report")
    try:
        md = write_report(run_dirs, out, title=title, reference=list(references) or None, extra_images=images)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None
    click.echo(f"report written to {md}")
