"""Recipes that build, extend and inspect a trajectory store (`v05 data ...` and `v05 sql`).

- `import_source`   a task source's prompts (and, for sources with measurements such as the V0 release,
                    their per-(model, step, prompt) scores) into a store;
- `export_verl`     a task source as verl RL parquet;
- `ingest_rollouts` rollouts generated elsewhere (a verl generation dump, any Parquet / JSON-lines file);
- `store_summary` / `format_summary`, `run_sql` / `format_result`: what `data info` and `sql` print;
- `check_store` / `repair_store` (+ `format_check` / `format_repair`): `data check` and `data repair`.

Every command that writes validates all of its input first and commits it in one manifest transaction
(`TrajectoryStore.ingest`): a refused import or ingest leaves the store exactly as it was. Bad input
raises `ValueError` naming the file, the row and the fix (`OptionError` when one command-line option
controls it); the CLI turns both into click errors. JSON output maps NaN / infinity to null.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import click

from pipelines.common import OptionError, json_safe, to_json


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
                instruction: str | None = None, allow_missing_answers: bool = False) -> Path:
    """Write the prompts of `path` (read by task source `source_name`) as verl RL parquet; returns the file.

    Prompts without an answer are refused (verl's reward would compare every response with an empty
    `ground_truth` and score it 0) unless `allow_missing_answers`.
    """
    from v0_data.tasks.parquet import write_verl_parquet

    source = make_source(source_name, options or {})
    prompts = source.load(path, split=split)
    if not prompts:
        raise ValueError(f"{path or source_name}: no prompts" + (f" in split {split!r}" if split else ""))
    missing = [i for i, p in enumerate(prompts) if p.answer is None or not str(p.answer).strip()]
    if missing and not allow_missing_answers:
        first = prompts[missing[0]]
        raise ValueError(
            f"{path or source_name}: {len(missing):,} of {len(prompts):,} prompts have no answer (first: row "
            f"{missing[0]}, {first.text[:50]!r}); verl would write ground_truth '' and score every response as wrong; "
            "fix: give the answers, or pass --allow-missing-answers to export them anyway"
        )
    written = write_verl_parquet(prompts, out_path, data_source=data_source, instruction=instruction)
    click.echo(f"{len(prompts):,} prompts -> {written}")
    return written


def import_source(path: str | None, store_dir: Path, *, source_name: str, split: str | None = None,
                  options: Mapping[str, Any] | None = None, name: str | None = None,
                  replace: bool = False) -> tuple[int, int]:
    """Add the prompts of `path` (and its scores, when the source has them) to the store, in one commit.

    The scores go to the part `<source>-<name>` (`name` defaults to the folder name of `path`, plus the
    split). A part remembers the resolved path it came from and a digest of its rows: importing the same
    rows again is a no-op, different rows under an existing name are refused unless `replace` (or give
    another `name` to keep both). Prompts already in the store are skipped. Returns (new prompts, scores
    written).
    """
    from v0_data.store import PartConflictError, ScorePart

    source = make_source(source_name, options or {})
    label = path if path is not None else source_name
    prompts = source.load(path, split=split)
    scores = source.load_scores(path) if hasattr(source, "load_scores") and path is not None else None
    if scores is not None and split is not None:
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = {p.prompt_id for p in prompts}
        scores = scores.filter(pc.is_in(scores.column("prompt_id"), value_set=pa.array(sorted(keep), pa.int64())))
    spec = None
    if scores is not None:
        origin = str(Path(path).resolve())
        spec = ScorePart(scores, part=score_part_name(source_name, path, split, name), origin=origin, replace=replace)
    with open_store(store_dir, read_only=False, create=True) as store:
        try:
            result = store.ingest(prompts=prompts, scores=spec, source=str(label))
        except PartConflictError as err:
            raise ValueError(
                f"{label}: the store {store.root} already has scores imported as {err.part!r} from "
                f"{err.old_origin or 'an earlier import'} ({err.old_rows:,} rows), and {err.new_origin} holds different "
                f"scores ({err.new_rows:,} rows); nothing was imported; fix: pass --replace to replace them, or "
                "--name NAME to keep both"
            ) from None
        note = ""
        if spec is not None:
            note = (f"; scores {spec.part!r} unchanged (same content already imported)" if result.scores_unchanged
                    else f"; {result.scores:,} scores imported as {spec.part!r}")
        click.echo(f"{label}: {len(prompts):,} prompts read, {result.prompts:,} new{note} -> {store.root}")
    return result.prompts, result.scores


def score_part_name(source_name: str, path: str, split: str | None, name: str | None) -> str:
    """`<source>-<name or folder name>[-<split>]`, made of `[A-Za-z0-9._-]`, at most 100 characters."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", name):
        raise OptionError(f"{name!r} must be 1-80 letters, digits, '.', '_' or '-'", "--name")
    part = f"{source_name}-{name or re.sub(r'[^A-Za-z0-9._-]+', '-', Path(path).resolve().name)}"
    if split is not None:
        part += f"-{re.sub(r'[^A-Za-z0-9._-]+', '-', split)}"
    return part[:100]


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

        if not is_utf8(path):  # pyarrow's JSON reader lets invalid UTF-8 through into the strings
            raise ValueError(f"{path}: {first_bad_json_line(path)}; fix: write the file as UTF-8 JSON lines")

        return pj.read_json(path, read_options=pj.ReadOptions(block_size=1 << 26))
    except (pa.ArrowInvalid, OSError) as err:
        where = first_bad_json_line(path) if fmt == "jsonl" else None
        if where is not None:
            raise ValueError(f"{path}: {where}; fix: write the file as UTF-8 JSON lines, one object per line") from None
        raise ValueError(f"{path}: not a readable {fmt} file ({err}); fix: pass a {fmt} file (or set --format)") from None


def is_utf8(path: Path) -> bool:
    """Whether a file is valid UTF-8 (streamed in 8 MiB blocks)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        try:
            for block in iter(lambda: handle.read(1 << 23), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def first_bad_json_line(path: Path) -> str | None:
    """'line N ...' for the first line of a JSON-lines file that is not UTF-8 or not a JSON object, else None."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 (byte {err.start} of the line is 0x{raw[err.start]:02x})"
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                return f"line {number} is not JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object"
    return None


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
    """Scores -> rewards: +1 where score > threshold, else -1 (int8). NaN thresholds and scores are refused."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not math.isfinite(threshold):
        raise OptionError(f"{threshold} is not a finite number; give the score above which a rollout succeeded, e.g. 0",
                          "--threshold")
    if "reward" not in table.column_names:
        return table
    reward = table.column("reward")
    if not (pa.types.is_integer(reward.type) or pa.types.is_floating(reward.type) or pa.types.is_boolean(reward.type)):
        raise ValueError(f"{where}: column 'reward' has type {reward.type}; fix: give numeric scores")
    if reward.null_count:
        row = pc.index(pc.is_null(reward), True).as_py()
        raise ValueError(f"{where}: row {row} column 'reward' is null; fix: give every rollout a score")
    as_float = pc.cast(reward, pa.float64())
    nan = pc.is_nan(as_float)
    if pc.any(nan).as_py():
        row = pc.index(nan, True).as_py()
        raise ValueError(f"{where}: row {row} column 'reward' is NaN; fix: drop the row or give its score")
    above = pc.greater(as_float, threshold)
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
    import pyarrow as pa

    model = table.column("model")
    if not (pa.types.is_string(model.type) or pa.types.is_large_string(model.type)):
        raise ValueError(f"{where}: column 'model' has type {model.type}, expected text; fix: give policy names")
    blank = pc.equal(pc.utf8_trim_whitespace(model), "")
    if pc.any(blank).as_py():
        row = pc.index(blank, True).as_py()
        raise ValueError(f"{where}: row {row} column 'model' is empty; fix: give every row its policy name (or --model)")


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


def group_runs(table, file: Path, *, run_id: str | None, algorithm: str, policy_path: str | None) -> list:
    """`RunRollouts`, one per distinct run_id (else per model), of a prepared rollout table.

    Every run is checked here (one model per run, a valid run id) before anything is written.
    """
    import pyarrow.compute as pc

    from v0_data.store import RunRollouts

    where = str(file)
    run_col = "run_id" if "run_id" in table.column_names else "model"
    if table.column(run_col).null_count:
        row = pc.index(pc.is_null(table.column(run_col)), True).as_py()
        raise ValueError(f"{where}: row {row} column {run_col!r} is null; fix: give every row its {run_col}")
    groups = pc.unique(table.column(run_col)).to_pylist()
    runs = []
    for key in groups:
        subset = table if len(groups) == 1 else table.filter(pc.equal(table.column(run_col), key))
        models = pc.unique(subset.column("model")).to_pylist()
        if len(models) > 1:
            raise ValueError(f"{where}: run {key!r} has several models {models[:3]}; fix: one model per run_id")
        rid = run_id or (key if run_col == "run_id" else f"ingest-{slug(models[0])}")
        rid = slug(rid) if run_col != "run_id" else rid
        drop = [c for c in ("dataset", "prompt", "split") if c in subset.column_names]
        try:
            runs.append(RunRollouts(run_id=rid, model=models[0], rollouts=subset.drop_columns(drop),
                                    policy_path=policy_path, algorithm=algorithm,
                                    config={"ingested_from": str(file.resolve())}))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return runs


def ingest_rollouts(file: Path, store_dir: Path, *, fmt: str = "auto", model: str | None = None,
                    run_id: str | None = None, algorithm: str = "external", policy_path: str | None = None,
                    part: int = 0, zero_one_rewards: bool = False, threshold: float | None = None,
                    dataset: str | None = None, add_prompts: bool = False,
                    renames: Mapping[str, str] | None = None) -> int:
    """Bulk-import rollouts generated elsewhere from `file`; returns the rollouts written.

    The whole file is validated (every run, every row) before anything is written, then its new prompts,
    rollout files and runs commit in one transaction: a refused file leaves the store unchanged. Rows
    replace those of the same (run, step, part): ingesting a file again never duplicates.
    """
    table = read_rollout_file(file, fmt)
    table, new_prompts = prepare_rollouts(table, file, model=model, zero_one=zero_one_rewards,
                                          threshold=threshold, dataset=dataset, add_prompts=add_prompts,
                                          renames=renames)
    runs = group_runs(table, file, run_id=run_id, algorithm=algorithm, policy_path=policy_path)
    if run_id is not None and len(runs) > 1:
        run_col = "run_id" if "run_id" in table.column_names else "model"
        raise OptionError(f"{file} holds {len(runs)} {run_col}s; --run-id needs one", "--run-id")
    with open_store(store_dir, read_only=False, create=True) as store:
        result = store.ingest(prompts=new_prompts, runs=runs, part=part, source=str(file))
        if new_prompts is not None:
            click.echo(f"{result.prompts:,} new prompts added")
        for rid, n in result.rollouts.items():
            click.echo(f"run {rid}: {n:,} rollouts")
        total = sum(result.rollouts.values())
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
    """DuckDB SQL over a store in a session that can only read the store's committed files (Arrow table).

    The guard is `ReadOnlySession` (DuckDB's own settings); `check_sql` before it only words the refusal
    of an obviously writing statement more plainly.
    """
    from v0_data.store import check_sql

    check_sql(query)
    with open_store(store_dir, read_only=True) as store, store.read_only_session() as session:
        return session.execute(query)


def flatten_nested(result):
    """Columns of list / struct / map type JSON-encoded as text (CSV has no nested values)."""
    import pyarrow as pa

    for i, column in enumerate(result.schema):
        if pa.types.is_nested(column.type):
            values = [None if v is None else to_json(v) for v in result.column(i).to_pylist()]
            result = result.set_column(i, column.name, pa.array(values, pa.string()))
    return result


def format_result(result, fmt: str = "table", max_rows: int = 100) -> str:
    """An Arrow table as `v05 sql` prints it (csv, one JSON array, or an aligned table); ends with a newline.

    CSV writes list / struct columns as JSON text; JSON writes NaN and infinities as null.
    """
    if fmt == "csv":
        import pyarrow as pa
        import pyarrow.csv as pcsv

        sink = pa.BufferOutputStream()
        pcsv.write_csv(flatten_nested(result), sink)
        return sink.getvalue().to_pybytes().decode("utf-8")
    if fmt == "json":
        return to_json(result.to_pylist()) + "\n"
    import pandas as pd

    frame = result.to_pandas()
    shown = frame if max_rows <= 0 else frame.head(max_rows)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 60):
        text = (shown.to_string(index=False, na_rep="NULL") if len(frame.columns) else "(no columns)") + "\n"
    if max_rows > 0 and len(frame) > max_rows:
        text += f"... {len(frame) - max_rows:,} more rows ({len(frame):,} in all; --max-rows 0 shows every row)\n"
    return text


# ====================================================================================== check and repair


def check_store(store_dir: Path):
    """`TrajectoryStore.check()` of a store opened read-only (no lock: safe beside a writer)."""
    with open_store(store_dir, read_only=True) as store:
        return store.check()


def format_check(report) -> str:
    """What `v05 data check` prints: a verdict line, then one line per problem, then the fix."""
    extra = f"; {report.files - report.checksummed:,} without a recorded checksum (size and footer only)" \
        if report.checksummed < report.files else ""
    head = f"store {report.root}: {report.files:,} committed files checked{extra}"
    if report.ok:
        return f"{head}\nok: every committed file is intact, no orphans, the views build"
    lines = [head, f"{len(report.problems)} problem(s):"] + [f"  {p}" for p in report.problems]
    if report.writer_active:
        lines.append("  (a writer holds the lock: its files in flight show as orphans; check again when it is done)")
    lines.append(f"fix: `v05 data repair --store {report.root}` moves the broken parts and orphans to "
                 f"{report.root}/quarantine/ and keeps every intact file")
    return "\n".join(lines)


def repair_store(store_dir: Path):
    """`TrajectoryStore.repair()` under the write lock (orphans are quarantined, not deleted)."""
    from v0_data.store import TrajectoryStore

    with TrajectoryStore.open(store_dir, create=False, clean_orphans=False) as store:
        return store.repair()


def format_repair(report) -> str:
    """What `v05 data repair` prints: every dropped part (table, file, rows), the quarantine folder."""
    lines = []
    for p in report.dropped:
        lines.append(f"dropped {p.tbl} part {p.path}: {p.n_rows:,} rows ({p.kind}: {p.detail})")
    orphans = len(report.quarantined) - sum(1 for p in report.dropped if p.path in set(report.quarantined))
    if report.quarantine_dir:
        lines.append(f"moved {len(report.quarantined)} file(s) ({orphans} orphan(s)) to {report.quarantine_dir}")
    if report.checksums_recorded:
        lines.append(f"recorded the checksum of {report.checksums_recorded:,} intact file(s) committed without one")
    if not report.dropped:
        lines.append("nothing to drop: every committed file is intact")
    else:
        rows = sum(p.n_rows or 0 for p in report.dropped)
        lines.append(f"{len(report.dropped)} part(s), {rows:,} rows dropped; the views were rebuilt over the intact files")
    return "\n".join(lines)


__all__ = [
    "attach_prompt_ids",
    "check_store",
    "first_bad_json_line",
    "flatten_nested",
    "format_check",
    "format_repair",
    "group_runs",
    "json_safe",
    "repair_store",
    "score_part_name",
    "to_json",
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
]
