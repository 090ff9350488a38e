"""`v05 data ...` and `v05 sql`: build, extend and inspect a trajectory store from the command line.

`data import` adds a task source's prompts (and, for sources that carry measurements such as the V0
release, their per-(model, step, prompt) scores); `data ingest-rollouts` bulk-loads rollouts generated
elsewhere; `data info` summarises a store; `sql` runs read-only DuckDB SQL over its tables and views.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

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


def _fail(err: Exception) -> click.ClickException:
    return click.ClickException(str(err))


def _open_store(store_dir: Path, *, read_only: bool, create: bool = False):
    from v0_data.store import StoreLockedError, TrajectoryStore

    try:
        return TrajectoryStore.open(store_dir, create=create, read_only=read_only)
    except (ValueError, StoreLockedError) as err:
        raise _fail(err) from None


def _parse_options(pairs: tuple[str, ...], flag: str) -> dict[str, Any]:
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


# Subcommands: import, export-verl, ingest-rollouts, info (below).


@data.command("export-verl")
@click.argument("path", required=False)
@click.option("--source", "source_name", type=click.Choice(source_names()), default="arith", show_default=True,
              help="task source that reads PATH (arith needs no PATH: it generates)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="verl RL parquet file to write (atomically)")
@click.option("--split", default=None, help="export only this split, e.g. train or test")
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
              help="option of the source's constructor, e.g. --set n_prompts=2000 for arith (repeatable)")
@click.option("--data-source", default=None,
              help="reward name written in every row's data_source (default: each prompt's dataset)")
@click.option("--instruction", default=None,
              help='text appended to each user message, e.g. "Put the final answer in \\boxed{}."')
def export_verl(path, source_name, out_path, split, options, data_source, instruction) -> None:
    """Write a task source as verl RL parquet with a prior-ready `extra_info`.

    Every row keeps `extra_info.prompt_id` (the store's id), so the V0 prior and the support buffer
    of `v05 rl-train --engine verl` can look the prompt up; `reward_model.ground_truth` holds the answer.
    """
    from v0_data.tasks import get_source
    from v0_data.tasks.parquet import write_verl_parquet

    kwargs = _parse_options(options, "--set")
    try:
        source = get_source(source_name)(**kwargs)
    except TypeError as err:
        raise click.BadParameter(f"{err}", param_hint="--set") from None
    try:
        prompts = source.load(path, split=split)
        if not prompts:
            raise ValueError(f"{path or source_name}: no prompts" + (f" in split {split!r}" if split else ""))
        written = write_verl_parquet(prompts, out_path, data_source=data_source, instruction=instruction)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from None
    click.echo(f"{len(prompts):,} prompts -> {written}")


@data.command("import")
@click.argument("path", required=False)
@click.option("--source", "source_name", type=click.Choice(source_names()), required=True,
              help="task source that reads PATH (the v0_release source also imports its scores)")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help=_STORE_HELP)
@click.option("--split", default=None, help="keep / label only this split (see the source's documentation)")
@click.option("--set", "options", multiple=True, metavar="KEY=VALUE",
              help="option of the source's constructor, e.g. --set n=10 for v0_release (repeatable)")
def import_(path: str | None, source_name: str, store_dir: Path, split: str | None, options: tuple[str, ...]) -> None:
    """Add the prompts of PATH (and its scores, when the source has them) to the store.

    PATH is what the source reads: a verl .parquet file / folder / glob (parquet), a V0 release folder
    (v0_release), or a generator spec such as "n_prompts=500,seed=1" (arith; optional).
    Idempotent: prompts already in the store are skipped; scores replace those of an earlier import of
    the same source and folder name.
    """
    from v0_data.tasks import get_source

    kwargs = _parse_options(options, "--set")
    try:
        source = get_source(source_name)(**kwargs)
    except TypeError as err:
        raise click.BadParameter(f"{err}", param_hint="--set") from None
    except ValueError as err:
        raise _fail(err) from None
    label = path if path is not None else source_name
    try:
        prompts = source.load(path, split=split)
        scores = source.load_scores(path) if hasattr(source, "load_scores") and path is not None else None
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err) from None
    if scores is not None and split is not None:
        keep = {p.prompt_id for p in prompts}
        import pyarrow as pa
        import pyarrow.compute as pc

        scores = scores.filter(pc.is_in(scores.column("prompt_id"), value_set=pa.array(sorted(keep), pa.int64())))
    with _open_store(store_dir, read_only=False, create=True) as store:
        try:
            added = store.add_prompts(prompts, source=str(label))
            n_scores = 0
            if scores is not None:
                part = f"{source_name}-{re.sub(r'[^A-Za-z0-9._-]+', '-', Path(path).resolve().name)}"
                if split is not None:
                    part += f"-{re.sub(r'[^A-Za-z0-9._-]+', '-', split)}"
                n_scores = store.add_scores(scores, part=part[:100], source=str(label))
        except ValueError as err:
            raise _fail(err) from None
        click.echo(
            f"{label}: {len(prompts):,} prompts read, {added:,} new"
            + (f"; {n_scores:,} scores imported" if scores is not None else "")
            + f" -> {store.root}"
        )


def _read_rollout_file(path: Path, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "parquet"
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        import pyarrow.json as pj

        return pj.read_json(path, read_options=pj.ReadOptions(block_size=1 << 26))
    except (pa.ArrowInvalid, OSError) as err:
        raise click.ClickException(
            f"{path}: not a readable {fmt} file ({err}); fix: pass a {fmt} file (or set --format)"
        ) from None


@data.command("ingest-rollouts", epilog=INGEST_COLUMNS)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help=_STORE_HELP)
@click.option("--format", "fmt", type=click.Choice(["auto", "parquet", "jsonl"]), default="auto", show_default=True,
              help="file format (auto: by extension)")
@click.option("--model", default=None, help="policy name for every row (when FILE has no model column)")
@click.option("--run-id", default=None, help="run id (only for files holding one model; default derived from FILE)")
@click.option("--algorithm", default="external", show_default=True, help="algorithm recorded for the run(s)")
@click.option("--policy-path", default=None, help="checkpoint path / Hub id recorded for the run(s)")
@click.option("--part", type=int, default=0, show_default=True,
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
    """Bulk-import rollouts generated elsewhere (e.g. a verl run's dumped generations) from FILE."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from v0_data.tasks.base import make_prompt_id

    table = _read_rollout_file(file, fmt)
    mapping = {k: str(v) for k, v in _parse_options(renames, "--rename").items()}
    missing = [k for k in mapping if k not in table.column_names]
    if missing:
        raise click.BadParameter(f"{file} has no column(s) {missing}; it has {table.column_names}", param_hint="--rename")
    table = table.rename_columns([mapping.get(c, c) for c in table.column_names])
    if "data_source" in table.column_names and "dataset" not in table.column_names:
        table = table.rename_columns(["dataset" if c == "data_source" else c for c in table.column_names])
    where = str(file)
    if dataset is not None:
        if "dataset" in table.column_names:
            raise click.BadParameter(f"{file} already has a dataset column", param_hint="--dataset")
        table = table.append_column("dataset", pa.repeat(pa.scalar(dataset), table.num_rows))
    if zero_one_rewards and threshold is not None:
        raise click.BadParameter("give either --zero-one-rewards or --threshold", param_hint="--threshold")
    if threshold is not None and "reward" in table.column_names:
        reward = table.column("reward")
        if not (pa.types.is_integer(reward.type) or pa.types.is_floating(reward.type) or pa.types.is_boolean(reward.type)):
            raise click.ClickException(f"{where}: column 'reward' has type {reward.type}; fix: give numeric scores")
        if reward.null_count:
            row = pc.index(pc.is_null(reward), True).as_py()
            raise click.ClickException(f"{where}: row {row} column 'reward' is null; fix: give every rollout a score")
        above = pc.greater(pc.cast(reward, pa.float64()), threshold)
        table = table.set_column(
            table.column_names.index("reward"), "reward", pc.if_else(above, pa.scalar(1, pa.int8()), pa.scalar(-1, pa.int8()))
        )
    if model is not None:
        if "model" in table.column_names:
            raise click.BadParameter(f"{file} already has a model column", param_hint="--model")
        table = table.append_column("model", pa.repeat(pa.scalar(model), table.num_rows))
    if "model" not in table.column_names:
        raise click.ClickException(
            f"{where}: missing column 'model' (columns present: {table.column_names}); fix: add it or pass --model"
        )
    if table.column("model").null_count:
        row = pc.index(pc.is_null(table.column("model")), True).as_py()
        raise click.ClickException(f"{where}: row {row} column 'model' is null; fix: give every row its policy name")
    if zero_one_rewards and "reward" in table.column_names:
        reward = table.column("reward")
        if pa.types.is_boolean(reward.type):
            reward = pc.cast(reward, pa.int8())
        if not (pa.types.is_integer(reward.type) or pa.types.is_floating(reward.type)):
            raise click.ClickException(f"{where}: column 'reward' has type {reward.type}; fix: give 0/1 numbers")
        ok = pc.fill_null(pc.or_(pc.equal(reward, 0), pc.equal(reward, 1)), False)
        if not pc.all(ok).as_py():
            row = pc.index(ok, False).as_py()
            raise click.ClickException(
                f"{where}: row {row} column 'reward' is {reward[row].as_py()}, not 0 or 1; fix: drop --zero-one-rewards "
                "for +-1 rewards, or binarise the scores first"
            )
        reward = pc.subtract(pc.multiply(pc.cast(reward, pa.int8()), pa.scalar(2, pa.int8())), pa.scalar(1, pa.int8()))
        table = table.set_column(table.column_names.index("reward"), "reward", reward)
    new_prompts = None
    if "prompt_id" not in table.column_names:
        if not {"dataset", "prompt"} <= set(table.column_names):
            raise click.ClickException(
                f"{where}: missing column 'prompt_id' (columns present: {table.column_names}); fix: add prompt_id "
                "(make_prompt_id(dataset, text)) or the dataset and prompt text columns"
            )
        datasets = table.column("dataset").to_pylist()
        texts = table.column("prompt").to_pylist()
        bad = next((i for i, (d, t) in enumerate(zip(datasets, texts)) if not isinstance(d, str) or not isinstance(t, str)), None)
        if bad is not None:
            raise click.ClickException(f"{where}: row {bad} columns 'dataset'/'prompt' must be non-null text")
        cache: dict[tuple[str, str], int] = {}
        ids = [cache.setdefault((d, t), make_prompt_id(d, t)) for d, t in zip(datasets, texts)]
        table = table.append_column("prompt_id", pa.array(ids, pa.int64()))
        if add_prompts:
            splits = table.column("split").to_pylist() if "split" in table.column_names else ["train"] * table.num_rows
            first = {}
            for i, key in enumerate(zip(datasets, texts)):
                first.setdefault(key, i)
            rows = sorted(first.values())
            new_prompts = pa.table({
                "dataset": [datasets[i] for i in rows],
                "split": [splits[i] or "train" for i in rows],
                "text": [texts[i] for i in rows],
            })
    elif add_prompts:
        raise click.BadParameter("needs dataset + prompt text columns, not prompt_id", param_hint="--add-prompts")

    run_col = "run_id" if "run_id" in table.column_names else "model"
    groups = pc.unique(table.column(run_col)).to_pylist()
    if run_id is not None and len(groups) > 1:
        raise click.BadParameter(f"{file} holds {len(groups)} {run_col}s; --run-id needs one", param_hint="--run-id")
    with _open_store(store_dir, read_only=False, create=True) as store:
        try:
            if new_prompts is not None:
                added = store.add_prompts(new_prompts, source=where)
                click.echo(f"{added:,} new prompts added")
            total = 0
            for key in groups:
                mask = pc.equal(table.column(run_col), key)
                subset = table if len(groups) == 1 else table.filter(mask)
                models = pc.unique(subset.column("model")).to_pylist()
                if len(models) > 1:
                    raise ValueError(f"{where}: run {key!r} has several models {models[:3]}; fix: one model per run_id")
                rid = run_id or (key if run_col == "run_id" else f"ingest-{_slug(models[0])}")
                rid = _slug(rid) if run_col != "run_id" else rid
                rid = store.start_run(models[0], policy_path=policy_path, algorithm=algorithm,
                                      config={"ingested_from": str(file.resolve())}, run_id=rid)
                label = where if len(groups) == 1 else f"{where} (rows of {run_col} {key!r}, numbered within them)"
                drop = [c for c in ("dataset", "prompt", "split") if c in subset.column_names]
                n = store.append_rollouts(rid, subset.drop_columns(drop), part=part, source=label)
                store.finish_run(rid, "finished")
                total += n
                click.echo(f"run {rid}: {n:,} rollouts")
        except ValueError as err:
            raise _fail(err) from None
        click.echo(f"{total:,} rollouts ingested from {file} -> {store.root}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")[:60] or "run"


@data.command("info")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="trajectory store directory")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def info(store_dir: Path, as_json: bool) -> None:
    """Counts per table and per (model, step), and the disk size of a store."""
    with _open_store(store_dir, read_only=True) as store:
        summary = store.info()
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    bpr = summary["bytes_per_rollout"]
    click.echo(f"store {summary['root']} (format {summary['format_version']})")
    click.echo(
        f"  prompts {summary['prompts']:,}   runs {summary['runs']:,}   rollouts {summary['rollouts']:,}   "
        f"scores {summary['scores']:,}"
    )
    click.echo(
        f"  disk {_human(summary['disk_bytes'])} (data {_human(summary['data_bytes'])} in "
        f"{sum(summary['files'].values())} files, catalog {_human(summary['catalog_bytes'])})"
        + (f", {bpr:.2f} B/rollout" if bpr else "")
    )
    rows = summary["per_model_step"]
    if rows:
        width = max(len("model"), *(len(r["model"]) for r in rows))
        click.echo(f"  {'model':<{width}}  {'step':>8}  {'rollouts':>12}  {'scores':>8}")
        for r in rows:
            click.echo(f"  {r['model']:<{width}}  {r['step']:>8}  {r['rollouts']:>12,}  {r['scores']:>8,}")


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"


@click.command("sql")
@click.argument("query")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="trajectory store directory")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="output format (json: one array of row objects)")
@click.option("--max-rows", type=int, default=100, show_default=True, help="rows shown by --format table (0: all)")
def sql(query: str, store_dir: Path, fmt: str, max_rows: int) -> None:
    """Run read-only DuckDB SQL over a store.

    \b
    Tables and views: prompts, runs, rollouts, scores, prompt_stats, v0_pairs, _manifest.
    Example: v05 sql "SELECT model, step, avg(score) FROM prompt_stats GROUP BY ALL" --store runs/store
    Statements that could write (INSERT, COPY, CREATE, ATTACH, SET, ...) are refused.
    """
    from v0_data.store import check_sql

    try:
        check_sql(query)
    except ValueError as err:
        raise _fail(err) from None
    with _open_store(store_dir, read_only=True) as store:
        try:
            result = store.query(query)
        except ValueError as err:
            raise _fail(err) from None
        except Exception as err:  # DuckDB errors: bad column, type mismatch, ...
            raise click.ClickException(f"query failed: {err}") from None
    if fmt == "csv":
        import pyarrow.csv as pcsv

        import pyarrow as pa

        sink = pa.BufferOutputStream()
        pcsv.write_csv(result, sink)
        click.echo(sink.getvalue().to_pybytes().decode("utf-8"), nl=False)
    elif fmt == "json":
        click.echo(json.dumps(result.to_pylist(), default=str))
    else:
        import pandas as pd

        frame = result.to_pandas()
        shown = frame if max_rows <= 0 else frame.head(max_rows)
        with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
            click.echo(shown.to_string(index=False, na_rep="NULL") if len(frame.columns) else "(no columns)")
        if max_rows > 0 and len(frame) > max_rows:
            click.echo(f"... {len(frame) - max_rows:,} more rows ({len(frame):,} in all; --max-rows 0 shows every row)")
