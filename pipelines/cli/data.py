"""`v05 data ...` and `v05 sql`: options of the store recipes in `pipelines.data`.

`data import` adds a task source's prompts (and, for sources that carry measurements such as the V0
release, their per-(model, step, prompt) scores); `data ingest-rollouts` bulk-loads rollouts generated
elsewhere; `data info` summarises a store; `data check` / `data repair` find and quarantine damaged
files; `sql` runs DuckDB SQL over its tables and views in a session that can only read the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pipelines import data as recipes
from pipelines.embed import embed_command
from pipelines.cli.options import COUNT, RECIPE_ERRORS, RegistryChoice, fail
from v0_data.tasks import source_names

_STORE_HELP = "trajectory store directory (created by `data import` / `ingest-rollouts` when absent)"

INGEST_COLUMNS = """\b
Columns of FILE (Parquet, or JSON lines with --format jsonl):
  model          str    policy name (or give --model)
  step           int    checkpoint / training step, >= 0
  reward         num    -1 or +1 per rollout (0/1 with --zero-one-rewards)
  prompt_id      int64  make_prompt_id(dataset, text) of a prompt in the store, or instead:
  dataset, prompt str   dataset name (or --dataset; `data_source` works too) + prompt text: ids are computed
  run_id         str    optional: one run per distinct run_id (default: one per model, "ingest-<model>")
  sample_idx     int    optional: numbered 0.. per (step, prompt) in file order when absent
  response       str    optional generated text (costs disk; omit to keep ~3 B/rollout)
  n_tokens       int    optional response length in tokens
  finish_reason  str    optional, e.g. stop / length
  created_at     time   optional (ingest time when absent)
  split          str    optional, with --add-prompts: the split of new prompts (default train)
Use --rename OLD=NEW to map other names. A verl dump (trainer.rollout_data_dir/<step>.jsonl: input,
output, score, step) goes in with: --model NAME --dataset NAME --rename input=prompt
--rename output=response --rename score=reward --threshold 0 --add-prompts (its `input` is the
chat-templated prompt, so its ids differ from those of the raw dataset unless the texts match).
Rows replace those of the same (run, step, part): re-ingesting a file never duplicates.
"""


def parse_pairs(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
    """KEY=VALUE options -> {key: JSON value, or the text when it is not JSON}."""
    out: dict[str, Any] = {}
    for item in pairs:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=flag)
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@click.group("data")
def data() -> None:
    """Build and inspect a trajectory store (prompts, runs, rollouts, scores)."""


data.add_command(embed_command)  # `v05 data embed`: V0 features precomputed once per dataset


@data.command("export-verl")
@click.argument("path", required=False)
@click.option("--source", "source_name", type=RegistryChoice(source_names), default="arith", show_default=True,
              help="task source that reads PATH (arith needs no PATH: it generates)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="verl RL parquet file to write (atomically)")
@click.option("--split", default=None, help="export only this split, e.g. train or test")
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
              help="option of the source's constructor, e.g. --set batch_size=4096 for parquet (repeatable); "
                   "arith takes its spec as PATH, e.g. \"n_prompts=2000,seed=1\"")
@click.option("--data-source", default=None,
              help="reward name written in every row's data_source (default: each prompt's dataset)")
@click.option("--instruction", default=None,
              help='text appended to each user message, e.g. "Put the final answer in \\boxed{}."')
@click.option("--allow-missing-answers", is_flag=True,
              help="export prompts without an answer too (their ground_truth is ''; refused by default)")
def export_verl(path, source_name, out_path, split, options, data_source, instruction, allow_missing_answers) -> None:
    """Write a task source as verl RL parquet with a prior-ready `extra_info`.

    Every row keeps `extra_info.prompt_id` (the store's id), so the V0 prior and the support buffer
    of `v05 rl-train --engine verl` can look the prompt up; `reward_model.ground_truth` holds the answer.
    """
    kwargs = parse_pairs(options, "--set")
    try:
        recipes.export_verl(path, out_path, source_name=source_name, split=split, options=kwargs,
                            data_source=data_source, instruction=instruction,
                            allow_missing_answers=allow_missing_answers)
    except RECIPE_ERRORS as err:
        raise fail(err) from None


@data.command("import")
@click.argument("path", required=False)
@click.option("--source", "source_name", type=RegistryChoice(source_names), required=True,
              help="task source that reads PATH (the v0_release source also imports its scores)")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help=_STORE_HELP)
@click.option("--split", default=None, help="keep / label only this split (see the source's documentation)")
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
              help="option of the source's constructor, e.g. --set n=10 for v0_release (repeatable)")
@click.option("--name", default=None,
              help="name of the imported scores (default: PATH's folder name); another name keeps both releases")
@click.option("--replace", is_flag=True, help="replace scores imported earlier under the same name from other content")
def import_(path: str | None, source_name: str, store_dir: Path, split: str | None, options: tuple[str, ...],
            name: str | None, replace: bool) -> None:
    """Add the prompts of PATH (and its scores, when the source has them) to the store.

    PATH is what the source reads: a verl .parquet file / folder / glob (parquet), a V0 release folder
    (v0_release), or a generator spec such as "n_prompts=500,seed=1" (arith; optional).
    Prompts already in the store are skipped. Scores are stored under a name (--name, default the
    folder name) together with the resolved path and a digest of their rows: importing the same rows
    again changes nothing; other rows under an existing name are refused unless --replace (or give
    another --name to keep both). Nothing is written unless everything is valid.
    """
    kwargs = parse_pairs(options, "--set")
    try:
        recipes.import_source(path, store_dir, source_name=source_name, split=split, options=kwargs, name=name,
                              replace=replace)
    except RECIPE_ERRORS as err:
        raise fail(err) from None


@data.command("ingest-rollouts", epilog=INGEST_COLUMNS)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help=_STORE_HELP)
@click.option("--format", "fmt", type=click.Choice(["auto", "parquet", "jsonl"]), default="auto", show_default=True,
              help="file format (auto: by extension)")
@click.option("--model", default=None, help="policy name for every row (when FILE has no model column)")
@click.option("--run-id", default=None, help="run id (only for files holding one model; default derived from FILE)")
@click.option("--algorithm", default="external", show_default=True, help="algorithm recorded for the run(s)")
@click.option("--policy-path", default=None, help="checkpoint path / Hub id recorded for the run(s)")
@click.option("--part", type=COUNT, default=0, show_default=True,
              help="part number: ingesting again with the same run, step and part replaces those rows")
@click.option("--zero-one-rewards", is_flag=True, help="rewards are 0/1 (or False/True): map r -> 2r - 1")
@click.option("--threshold", type=float, default=None,
              help="rewards are scores: +1 where score > THRESHOLD, else -1 (e.g. 0 for verl's math scores)")
@click.option("--dataset", default=None, help="dataset name for every row (with a prompt text column)")
@click.option("--add-prompts", is_flag=True, help="add prompts missing from the store (needs dataset + prompt columns)")
@click.option("--rename", "renames", multiple=True, metavar="OLD=NEW", help="rename a column before reading (repeatable)")
def ingest_rollouts(
    file: Path, store_dir: Path, fmt: str, model: str | None, run_id: str | None, algorithm: str,
    policy_path: str | None, part: int, zero_one_rewards: bool, threshold: float | None, dataset: str | None,
    add_prompts: bool, renames: tuple[str, ...],
) -> None:
    """Bulk-import rollouts generated elsewhere (e.g. a verl run's dumped generations) from FILE.

    The whole file is checked first; then its prompts, runs and rollouts commit together (a refused file
    leaves the store unchanged).
    """
    mapping = {k: str(v) for k, v in parse_pairs(renames, "--rename").items()}
    try:
        recipes.ingest_rollouts(file, store_dir, fmt=fmt, model=model, run_id=run_id, algorithm=algorithm,
                                policy_path=policy_path, part=part, zero_one_rewards=zero_one_rewards,
                                threshold=threshold, dataset=dataset, add_prompts=add_prompts, renames=mapping)
    except RECIPE_ERRORS as err:
        raise fail(err) from None


@data.command("info")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="trajectory store directory")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="output format (json: strict JSON, NaN as null)")
@click.option("--json", "as_json", is_flag=True, help="same as --format json")
def info(store_dir: Path, fmt: str, as_json: bool) -> None:
    """Counts per table and per (model, step), and the disk size of a store."""
    try:
        summary = recipes.store_summary(store_dir)
    except RECIPE_ERRORS as err:
        raise fail(err) from None
    as_json = as_json or fmt == "json"
    click.echo(recipes.to_json(summary, indent=2) if as_json else recipes.format_summary(summary))


@data.command("check")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="trajectory store directory")
def check(store_dir: Path) -> None:
    """Compare the manifest with the files (missing, orphan, size, checksum, rows) and build the views.

    Exit code 0 when the store is intact, 1 when a problem was found (listed, with the fix).
    Reads every committed file once; takes no lock.
    """
    try:
        report = recipes.check_store(store_dir)
    except RECIPE_ERRORS as err:
        raise fail(err) from None
    click.echo(recipes.format_check(report))
    if not report.ok:
        raise SystemExit(1)


@data.command("repair")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="trajectory store directory")
def repair(store_dir: Path) -> None:
    """Quarantine what `data check` finds broken, keep every intact file, rebuild the views.

    Broken committed files and orphans move to STORE/quarantine/<time>/; their parts leave the manifest
    in one transaction (printed: table, file, rows). Takes the write lock.
    """
    try:
        report = recipes.repair_store(store_dir)
    except RECIPE_ERRORS as err:
        raise fail(err) from None
    click.echo(recipes.format_repair(report))


@click.command("sql")
@click.argument("query")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="trajectory store directory")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="output format (json: one array of row objects)")
@click.option("--max-rows", type=COUNT, default=100, show_default=True, help="rows shown by --format table (0: all)")
def sql(query: str, store_dir: Path, fmt: str, max_rows: int) -> None:
    """Run DuckDB SQL over a store in a session that can only read the store.

    \b
    Tables and views: prompts, runs, rollouts, scores, prompt_stats, v0_pairs, _manifest.
    Example: v05 sql "SELECT model, step, avg(score) FROM prompt_stats GROUP BY ALL" --store runs/store
    Allowed: SELECT / WITH / FROM / DESCRIBE / SHOW / SUMMARIZE / EXPLAIN [ANALYZE] of them, and TEMP
    tables that vanish with the command. Refused by DuckDB itself: writing any file (COPY, EXPORT),
    reading any file but the store's (read_csv, read_text, glob, ...), ATTACH, INSTALL / LOAD, SET /
    RESET / PRAGMA settings, CREATE / INSERT / UPDATE / DELETE / DROP on the store's tables and views.
    """
    try:
        result = recipes.run_sql(query, store_dir)
    except RECIPE_ERRORS as err:
        raise fail(err) from None
    click.echo(recipes.format_result(result, fmt, max_rows), nl=False)
