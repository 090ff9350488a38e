"""Recipes that build, extend and inspect a trajectory store (`v05 data ...` and `v05 sql`).

- `import_source`   a task source's prompts (and, for sources with measurements such as the V0 release,
                    their per-(model, step, prompt) scores) into a store;
- `export_verl`     a task source as verl RL parquet;
- `ingest_rollouts` rollouts generated elsewhere (a verl generation dump, any Parquet / JSON-lines file);
- `store_summary` / `format_summary`, `run_sql` / `format_result`: what `data info` and `sql` print.

Bad input raises `ValueError` naming the file, the row and the fix (`OptionError` when one command-line
option controls it); the CLI turns both into click errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import click

from pipelines.common import OptionError


def slug(text: str) -> str:
    """A run id / file part made of `[A-Za-z0-9._-]`, at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")[:60] or "run"


def open_store(store_dir: Path, *, read_only: bool, create: bool = False):
    """`TrajectoryStore.open` (imported here: the store pulls in DuckDB and pyarrow)."""
    from v0_data.store import TrajectoryStore

    return TrajectoryStore.open(store_dir, create=create, read_only=read_only)


def make_source(name: str, options: Mapping[str, Any]):
    """The task source `name` built with `options`; an unknown option is an `--set` error."""
    from v0_data.tasks import get_source

    try:
        return get_source(name)(**options)
    except TypeError as err:
        raise OptionError(f"{err}", "--set") from None


# ====================================================================================== import / export


def export_verl(path: str | None, out_path: Path, *, source_name: str = "arith", split: str | None = None,
                options: Mapping[str, Any] | None = None, data_source: str | None = None,
                instruction: str | None = None) -> Path:
    """Write the prompts of `path` (read by task source `source_name`) as verl RL parquet; returns the file."""
    from v0_data.tasks.parquet import write_verl_parquet

    source = make_source(source_name, options or {})
    prompts = source.load(path, split=split)
    if not prompts:
        raise ValueError(f"{path or source_name}: no prompts" + (f" in split {split!r}" if split else ""))
    written = write_verl_parquet(prompts, out_path, data_source=data_source, instruction=instruction)
    click.echo(f"{len(prompts):,} prompts -> {written}")
    return written


def import_source(path: str | None, store_dir: Path, *, source_name: str, split: str | None = None,
                  options: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Add the prompts of `path` (and its scores, when the source has them) to the store.

    Idempotent: prompts already in the store are skipped; scores replace those of an earlier import of
    the same source and folder name. Returns (new prompts, scores imported).
    """
    source = make_source(source_name, options or {})
    label = path if path is not None else source_name
    prompts = source.load(path, split=split)
    scores = source.load_scores(path) if hasattr(source, "load_scores") and path is not None else None
    if scores is not None and split is not None:
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = {p.prompt_id for p in prompts}
        scores = scores.filter(pc.is_in(scores.column("prompt_id"), value_set=pa.array(sorted(keep), pa.int64())))
    with open_store(store_dir, read_only=False, create=True) as store:
        added = store.add_prompts(prompts, source=str(label))
        n_scores = 0
        if scores is not None:
            part = f"{source_name}-{re.sub(r'[^A-Za-z0-9._-]+', '-', Path(path).resolve().name)}"
            if split is not None:
                part += f"-{re.sub(r'[^A-Za-z0-9._-]+', '-', split)}"
            n_scores = store.add_scores(scores, part=part[:100], source=str(label))
        click.echo(
            f"{label}: {len(prompts):,} prompts read, {added:,} new"
            + (f"; {n_scores:,} scores imported" if scores is not None else "")
            + f" -> {store.root}"
        )
    return added, n_scores


# ====================================================================================== ingest-rollouts


def read_rollout_file(path: Path, fmt: str = "auto"):
    """A Parquet or JSON-lines file as an Arrow table (`fmt` auto: by extension)."""
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
        raise ValueError(f"{path}: not a readable {fmt} file ({err}); fix: pass a {fmt} file (or set --format)") from None


def rename_columns(table, renames: Mapping[str, str], file: Path):
    """Apply OLD=NEW renames, then read a `data_source` column as `dataset`."""
    missing = [k for k in renames if k not in table.column_names]
    if missing:
        raise OptionError(f"{file} has no column(s) {missing}; it has {table.column_names}", "--rename")
    table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    if "data_source" in table.column_names and "dataset" not in table.column_names:
        table = table.rename_columns(["dataset" if c == "data_source" else c for c in table.column_names])
    return table


def add_constant(table, name: str, value: str | None, file: Path, option: str):
    """Add column `name` filled with `value` (given by `option`); refuse when the file has it already."""
    import pyarrow as pa

    if value is None:
        return table
    if name in table.column_names:
        raise OptionError(f"{file} already has a {name} column", option)
    return table.append_column(name, pa.repeat(pa.scalar(value), table.num_rows))


def rewards_from_threshold(table, threshold: float, where: str):
    """Scores -> rewards: +1 where score > threshold, else -1 (int8)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "reward" not in table.column_names:
        return table
    reward = table.column("reward")
    if not (pa.types.is_integer(reward.type) or pa.types.is_floating(reward.type) or pa.types.is_boolean(reward.type)):
        raise ValueError(f"{where}: column 'reward' has type {reward.type}; fix: give numeric scores")
    if reward.null_count:
        row = pc.index(pc.is_null(reward), True).as_py()
        raise ValueError(f"{where}: row {row} column 'reward' is null; fix: give every rollout a score")
    above = pc.greater(pc.cast(reward, pa.float64()), threshold)
    rewards = pc.if_else(above, pa.scalar(1, pa.int8()), pa.scalar(-1, pa.int8()))
    return table.set_column(table.column_names.index("reward"), "reward", rewards)


def rewards_from_zero_one(table, where: str):
    """0/1 (or False/True) rewards -> 2r - 1 (int8); anything else is refused with its row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "reward" not in table.column_names:
        return table
    reward = table.column("reward")
    if pa.types.is_boolean(reward.type):
        reward = pc.cast(reward, pa.int8())
    if not (pa.types.is_integer(reward.type) or pa.types.is_floating(reward.type)):
        raise ValueError(f"{where}: column 'reward' has type {reward.type}; fix: give 0/1 numbers")
    ok = pc.fill_null(pc.or_(pc.equal(reward, 0), pc.equal(reward, 1)), False)
    if not pc.all(ok).as_py():
        row = pc.index(ok, False).as_py()
        raise ValueError(
            f"{where}: row {row} column 'reward' is {reward[row].as_py()}, not 0 or 1; fix: drop --zero-one-rewards "
            "for +-1 rewards, or binarise the scores first"
        )
    reward = pc.subtract(pc.multiply(pc.cast(reward, pa.int8()), pa.scalar(2, pa.int8())), pa.scalar(1, pa.int8()))
    return table.set_column(table.column_names.index("reward"), "reward", reward)


def require_model(table, where: str) -> None:
    """Every row must name its policy."""
    import pyarrow.compute as pc

    if "model" not in table.column_names:
        raise ValueError(f"{where}: missing column 'model' (columns present: {table.column_names}); fix: add it or pass --model")
    if table.column("model").null_count:
        row = pc.index(pc.is_null(table.column("model")), True).as_py()
        raise ValueError(f"{where}: row {row} column 'model' is null; fix: give every row its policy name")


def attach_prompt_ids(table, where: str, *, add_prompts: bool):
    """Compute `prompt_id` from dataset + prompt text when absent; returns (table, new prompts or None).

    With `add_prompts`, the new prompts are the first row of each distinct (dataset, text), in file order.
    """
    import pyarrow as pa

    from v0_data.tasks.base import make_prompt_id

    if "prompt_id" in table.column_names:
        if add_prompts:
            raise OptionError("needs dataset + prompt text columns, not prompt_id", "--add-prompts")
        return table, None
    if not {"dataset", "prompt"} <= set(table.column_names):
        raise ValueError(
            f"{where}: missing column 'prompt_id' (columns present: {table.column_names}); fix: add prompt_id "
            "(make_prompt_id(dataset, text)) or the dataset and prompt text columns"
        )
    datasets = table.column("dataset").to_pylist()
    texts = table.column("prompt").to_pylist()
    bad = next((i for i, (d, t) in enumerate(zip(datasets, texts)) if not isinstance(d, str) or not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{where}: row {bad} columns 'dataset'/'prompt' must be non-null text")
    cache: dict[tuple[str, str], int] = {}
    ids = [cache.setdefault((d, t), make_prompt_id(d, t)) for d, t in zip(datasets, texts)]
    table = table.append_column("prompt_id", pa.array(ids, pa.int64()))
    if not add_prompts:
        return table, None
    splits = table.column("split").to_pylist() if "split" in table.column_names else ["train"] * table.num_rows
    first: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(datasets, texts)):
        first.setdefault(key, i)
    rows = sorted(first.values())
    new_prompts = pa.table({
        "dataset": [datasets[i] for i in rows],
        "split": [splits[i] or "train" for i in rows],
        "text": [texts[i] for i in rows],
    })
    return table, new_prompts


def prepare_rollouts(table, file: Path, *, model: str | None = None, zero_one: bool = False,
                     threshold: float | None = None, dataset: str | None = None, add_prompts: bool = False,
                     renames: Mapping[str, str] | None = None):
    """A rollout file's table in the store's columns (model, rewards ±1, prompt ids); (table, new prompts)."""
    where = str(file)
    table = rename_columns(table, renames or {}, file)
    table = add_constant(table, "dataset", dataset, file, "--dataset")
    if zero_one and threshold is not None:
        raise OptionError("give either --zero-one-rewards or --threshold", "--threshold")
    if threshold is not None:
        table = rewards_from_threshold(table, threshold, where)
    table = add_constant(table, "model", model, file, "--model")
    require_model(table, where)
    if zero_one:
        table = rewards_from_zero_one(table, where)
    return attach_prompt_ids(table, where, add_prompts=add_prompts)


def write_rollouts(store, table, file: Path, *, run_id: str | None, algorithm: str, policy_path: str | None,
                   part: int) -> int:
    """Append `table` to the store, one run per distinct run_id (else per model); returns the rows written."""
    import pyarrow.compute as pc

    where = str(file)
    run_col = "run_id" if "run_id" in table.column_names else "model"
    groups = pc.unique(table.column(run_col)).to_pylist()
    total = 0
    for key in groups:
        subset = table if len(groups) == 1 else table.filter(pc.equal(table.column(run_col), key))
        models = pc.unique(subset.column("model")).to_pylist()
        if len(models) > 1:
            raise ValueError(f"{where}: run {key!r} has several models {models[:3]}; fix: one model per run_id")
        rid = run_id or (key if run_col == "run_id" else f"ingest-{slug(models[0])}")
        rid = slug(rid) if run_col != "run_id" else rid
        rid = store.start_run(models[0], policy_path=policy_path, algorithm=algorithm,
                              config={"ingested_from": str(file.resolve())}, run_id=rid)
        label = where if len(groups) == 1 else f"{where} (rows of {run_col} {key!r}, numbered within them)"
        drop = [c for c in ("dataset", "prompt", "split") if c in subset.column_names]
        n = store.append_rollouts(rid, subset.drop_columns(drop), part=part, source=label)
        store.finish_run(rid, "finished")
        total += n
        click.echo(f"run {rid}: {n:,} rollouts")
    return total


def ingest_rollouts(file: Path, store_dir: Path, *, fmt: str = "auto", model: str | None = None,
                    run_id: str | None = None, algorithm: str = "external", policy_path: str | None = None,
                    part: int = 0, zero_one_rewards: bool = False, threshold: float | None = None,
                    dataset: str | None = None, add_prompts: bool = False,
                    renames: Mapping[str, str] | None = None) -> int:
    """Bulk-import rollouts generated elsewhere from `file`; returns the rollouts written.

    Rows replace those of the same (run, step, part): ingesting a file again never duplicates.
    """
    import pyarrow.compute as pc

    table = read_rollout_file(file, fmt)
    table, new_prompts = prepare_rollouts(table, file, model=model, zero_one=zero_one_rewards,
                                          threshold=threshold, dataset=dataset, add_prompts=add_prompts,
                                          renames=renames)
    run_col = "run_id" if "run_id" in table.column_names else "model"
    n_runs = len(pc.unique(table.column(run_col)))
    if run_id is not None and n_runs > 1:
        raise OptionError(f"{file} holds {n_runs} {run_col}s; --run-id needs one", "--run-id")
    with open_store(store_dir, read_only=False, create=True) as store:
        if new_prompts is not None:
            added = store.add_prompts(new_prompts, source=str(file))
            click.echo(f"{added:,} new prompts added")
        total = write_rollouts(store, table, file, run_id=run_id, algorithm=algorithm, policy_path=policy_path,
                               part=part)
        click.echo(f"{total:,} rollouts ingested from {file} -> {store.root}")
    return total


# ====================================================================================== info and sql


def store_summary(store_dir: Path) -> dict[str, Any]:
    """`TrajectoryStore.info()` of a store opened read-only."""
    with open_store(store_dir, read_only=True) as store:
        return store.info()


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"


def format_summary(summary: Mapping[str, Any]) -> str:
    """Counts per table and per (model, step), and the disk size, as `v05 data info` prints them."""
    bpr = summary["bytes_per_rollout"]
    lines = [
        f"store {summary['root']} (format {summary['format_version']})",
        f"  prompts {summary['prompts']:,}   runs {summary['runs']:,}   rollouts {summary['rollouts']:,}   "
        f"scores {summary['scores']:,}",
        f"  disk {human_bytes(summary['disk_bytes'])} (data {human_bytes(summary['data_bytes'])} in "
        f"{sum(summary['files'].values())} files, catalog {human_bytes(summary['catalog_bytes'])})"
        + (f", {bpr:.2f} B/rollout" if bpr else ""),
    ]
    rows = summary["per_model_step"]
    if rows:
        width = max(len("model"), *(len(r["model"]) for r in rows))
        lines.append(f"  {'model':<{width}}  {'step':>8}  {'rollouts':>12}  {'scores':>8}")
        for r in rows:
            lines.append(f"  {r['model']:<{width}}  {r['step']:>8}  {r['rollouts']:>12,}  {r['scores']:>8,}")
    return "\n".join(lines)


def run_sql(query: str, store_dir: Path):
    """Read-only DuckDB SQL over a store, as an Arrow table (writing statements are refused)."""
    from v0_data.store import check_sql

    check_sql(query)
    with open_store(store_dir, read_only=True) as store:
        try:
            return store.query(query)
        except ValueError:
            raise
        except Exception as err:  # DuckDB errors: bad column, type mismatch, ...
            raise ValueError(f"query failed: {err}") from None


def format_result(result, fmt: str = "table", max_rows: int = 100) -> str:
    """An Arrow table as `v05 sql` prints it (csv, one JSON array, or an aligned table); ends with a newline."""
    if fmt == "csv":
        import pyarrow as pa
        import pyarrow.csv as pcsv

        sink = pa.BufferOutputStream()
        pcsv.write_csv(result, sink)
        return sink.getvalue().to_pybytes().decode("utf-8")
    if fmt == "json":
        return json.dumps(result.to_pylist(), default=str) + "\n"
    import pandas as pd

    frame = result.to_pandas()
    shown = frame if max_rows <= 0 else frame.head(max_rows)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        text = (shown.to_string(index=False, na_rep="NULL") if len(frame.columns) else "(no columns)") + "\n"
    if max_rows > 0 and len(frame) > max_rows:
        text += f"... {len(frame) - max_rows:,} more rows ({len(frame):,} in all; --max-rows 0 shows every row)\n"
    return text


__all__ = [
    "attach_prompt_ids",
    "export_verl",
    "format_result",
    "format_summary",
    "import_source",
    "ingest_rollouts",
    "make_source",
    "open_store",
    "prepare_rollouts",
    "read_rollout_file",
    "run_sql",
    "slug",
    "store_summary",
    "write_rollouts",
]
