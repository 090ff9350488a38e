"""The trajectory store: every rollout of every policy, as Parquet files catalogued by DuckDB.

Layout of a store directory (see DESIGN.md, "The trajectory store")::

    catalog.duckdb                 manifest of committed files, the `runs` table, persistent views
    prompts/part-<token>.parquet   prompt_id, dataset, split, text, answer, meta (JSON)
    rollouts/run=<run_id>/step-<step>-part-<part>-<token>.parquet
                                   run_id, model, step, prompt_id, sample_idx, response, reward (int8 +-1),
                                   n_tokens, finish_reason, created_at; one file per (run, step, part)
    scores/part-<token>.parquet    model, step, prompt_id, n, score (imported means, e.g. the V0 release)
    .write.lock                    held (flock) by the one process that writes

Views (the same names in `catalog.duckdb` and in every `TrajectoryStore.query`):
`prompts`, `rollouts`, `scores`, `runs`, `prompt_stats(model, step, prompt_id, n, successes, score)` =
rollouts aggregated per (model, step, prompt) union all `scores` (score = mean reward in [-1, 1], i.e.
2 p - 1 for a success rate p, the paper's value target), and `v0_pairs` = `prompt_stats` joined with
`prompts` (V0's training pairs: the prompt text and how often a policy at a checkpoint solved it).

Guarantees and how they are kept:
- **Only committed files are read.** Views are built over the explicit list of files in the manifest,
  never over a glob, so a half-written or orphaned file is invisible.
- **Atomic writes.** A part is written to a temporary name, fsynced, renamed into place, then its
  manifest row is inserted in a DuckDB transaction (which also drops the rows of the parts it replaces).
  A crash before the transaction leaves an orphan file that no view lists; the next writer deletes it.
- **Idempotent appends.** Rollout parts are keyed by (run, step, part): re-running a step replaces its
  part, never duplicates it. Score parts are keyed by a name; prompts are deduplicated by `prompt_id`.
- **One writer, many readers.** Writers hold `.write.lock` (an advisory `flock`, released by the OS if
  the process dies) for as long as the store is open for writing. Readers take no lock: they copy the
  manifest out of `catalog.duckdb` in a few milliseconds and query the Parquet files from an in-memory
  DuckDB, so a long query never blocks a writer's commit.

Choices for speed and size at the paper's scale (200+ checkpoints x ~20k rollouts): prompt ids are
signed 64-bit hashes (`make_prompt_id`), rewards int8; in a rollout file the rows of one (step, prompt)
are contiguous with sample_idx ascending (input from a generation loop already is, and is written
without a copy; other input is sorted by (step, prompt_id, sample_idx)); Parquet dictionary encoding +
zstd then store a rollout without response text in ~3 bytes, and `prompt_stats` reads four narrow
columns. `v05 bench store` measures this against DuckDB over one plain Parquet file.

Checking and repairing (`check`, `repair`; `v05 data check / repair`): every manifest row records the
file's size and a blake2b checksum taken when it was committed (rows of format-1 stores have none and are
checked by size and footer only until `repair` records one). `check` compares the manifest with the files
(missing, orphan, size, checksum, footer, row count) and builds the views; `repair` moves what is broken
(and orphans) into `<store>/quarantine/<time>/`, drops the broken parts from the manifest in one
transaction and keeps every intact file. A writer or reader that meets a missing or damaged committed
file says which one and to run `v05 data repair`; a `catalog.duckdb` that is not a DuckDB file is
reported as corrupt, not as locked.

Re-imports: a score part records where it came from (`origin`, e.g. the release folder's resolved path)
and a digest of its rows (`content`). Adding different rows under an existing part name is refused
(`PartConflictError`) unless `replace=True`; the same rows again are a no-op.

The SQL door (`read_only_session`, what `v05 sql` runs) is read-only by construction, not by inspecting
the statement: DuckDB gets no file access at all (`enable_external_access = false`, then
`lock_configuration = true`), the store's committed files are handed to it as Arrow datasets that
pyarrow opens read-only, and the session's tables and views live in a private DuckDB file opened
READ_ONLY. Departure from the obvious design, measured: DuckDB's `allowed_paths` also allows *writing*
the listed files (`COPY ... TO '<part>' (USE_TMP_FILE false)` overwrote a committed part in DuckDB
2.0.1), so the committed files are never put on an allow list. The price is a slower scan (Arrow
datasets, not DuckDB's own Parquet reader) for `v05 sql` only; `query()`, `prompt_stats()` and
`pairs()` (trusted Python callers) keep the native reader. `check_sql` only gives a friendlier message
before the session refuses.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from v0_data.tasks.base import Prompt, make_prompt_id

FORMAT_VERSION = 2  # 2: manifest rows carry checksum, content and origin
READABLE_FORMATS = ("1", "2")  # a writer migrates a format-1 catalog to 2 when it opens it
CATALOG_NAME = "catalog.duckdb"
LOCK_NAME = ".write.lock"
QUARANTINE_DIR = "quarantine"
DATA_DIRS = ("prompts", "rollouts", "scores")
RUN_STATUSES = ("running", "finished", "failed", "aborted")

# Parquet writer settings shared by every file of the store (and by `v05 bench store`'s floor file).
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "row_group_size": 1 << 18,
}

PROMPT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("text", pa.string()),
        ("answer", pa.string()),
        ("meta", pa.string()),
    ]
)
ROLLOUT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("step", pa.int64()),
        ("prompt_id", pa.int64()),
        ("sample_idx", pa.int32()),
        ("response", pa.string()),
        ("reward", pa.int8()),
        ("n_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
SCORE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("step", pa.int64()),
        ("prompt_id", pa.int64()),
        ("n", pa.int32()),
        ("score", pa.float64()),
    ]
)
SCHEMAS = {"prompts": PROMPT_SCHEMA, "rollouts": ROLLOUT_SCHEMA, "scores": SCORE_SCHEMA}

# Columns the caller must give (others are optional and filled with nulls / defaults).
_REQUIRED = {
    "prompts": ("dataset", "split", "text"),
    "rollouts": ("step", "prompt_id", "reward"),
    "scores": ("model", "step", "prompt_id", "n", "score"),
}
_NOT_NULL = {
    "prompts": ("prompt_id", "dataset", "split", "text"),
    "rollouts": ("run_id", "model", "step", "prompt_id", "sample_idx", "reward", "created_at"),
    "scores": ("model", "step", "prompt_id", "n", "score"),
}

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.int8(): "TINYINT",
    pa.float64(): "DOUBLE",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}

_PROMPT_STATS_SQL = """
SELECT model, step, prompt_id,
       count(*) AS n,
       CAST(count_if(reward > 0) AS BIGINT) AS successes,
       avg(reward) AS score
FROM rollouts GROUP BY model, step, prompt_id
UNION ALL
SELECT model, step, prompt_id,
       CAST(n AS BIGINT) AS n,
       CAST(round((score + 1) * n / 2) AS BIGINT) AS successes,
       score
FROM scores
"""

_V0_PAIRS_SQL = """
SELECT s.model, s.step, s.prompt_id, p.dataset, p.split, p.text, p.answer,
       s.n, s.successes, s.score, s.successes / s.n AS success_rate
FROM prompt_stats AS s JOIN prompts AS p ON s.prompt_id = p.prompt_id
"""

_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, policy_path VARCHAR, algorithm VARCHAR,
    config VARCHAR, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, status VARCHAR
)"""
_MANIFEST_DDL = """
CREATE TABLE IF NOT EXISTS _manifest (
    path VARCHAR PRIMARY KEY, tbl VARCHAR NOT NULL, key VARCHAR NOT NULL, run_id VARCHAR, step BIGINT,
    n_rows BIGINT NOT NULL, n_bytes BIGINT NOT NULL, committed_at TIMESTAMPTZ NOT NULL,
    checksum VARCHAR, content VARCHAR, origin VARCHAR
)"""
# Columns added by format 2 (a format-1 catalog gets them, empty, when a writer opens it).
_MANIFEST_V2_COLUMNS = ("checksum", "content", "origin")
_META_DDL = "CREATE TABLE IF NOT EXISTS _meta (key VARCHAR PRIMARY KEY, value VARCHAR)"

# Statement types a read-only query may run (everything else could write or change settings).
_READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


class StoreLockedError(RuntimeError):
    """Another process holds the store's write lock."""


class StoreDamagedError(ValueError):
    """A committed file is missing or damaged; the message names it and says to run `v05 data repair`."""


class CatalogCorruptError(ValueError):
    """`catalog.duckdb` exists but is not a readable DuckDB database."""


class PartConflictError(ValueError):
    """Different rows were added under an existing part name without `replace=True`.

    Attributes name both sides so that a command line can say which flag fixes it.
    """

    def __init__(self, message: str, *, part: str, old_origin: str | None, new_origin: str | None,
                 old_rows: int, new_rows: int):
        super().__init__(message)
        self.part, self.old_origin, self.new_origin = part, old_origin, new_origin
        self.old_rows, self.new_rows = old_rows, new_rows


class ManifestEntry(NamedTuple):
    """One committed Parquet file. `path` is relative to the store root; `key` identifies the part it fills.

    `checksum` is "blake2b:<hex>" of the file's bytes at commit time (None in format-1 stores until
    `repair` records it); `content` a digest of a score part's rows (None elsewhere); `origin` where
    the rows came from (e.g. the resolved path of an imported release), for messages.
    """

    path: str
    tbl: str
    key: str
    run_id: str | None
    step: int | None
    n_rows: int
    n_bytes: int
    committed_at: _dt.datetime
    checksum: str | None = None
    content: str | None = None
    origin: str | None = None


@dataclass(frozen=True)
class RunRollouts:
    """One run's rollouts for `TrajectoryStore.ingest` (every run of one call commits together)."""

    run_id: str = field(metadata={"help": "run id: letters, digits, '.', '_', '-'"})
    model: str = field(metadata={"help": "policy name (non-empty)"})
    rollouts: Any = field(metadata={"help": "Arrow / pandas / dict of lists with append_rollouts' columns"})
    policy_path: str | None = field(default=None, metadata={"help": "checkpoint path / Hub id"})
    algorithm: str = field(default="external", metadata={"help": "algorithm recorded for the run"})
    config: Mapping[str, Any] = field(default_factory=dict, metadata={"help": "recorded as JSON"})
    status: str = field(default="finished", metadata={"help": f"run status after the commit, one of {RUN_STATUSES}"})

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"run {self.run_id!r}: model {self.model!r} is empty; fix: give every run a policy name")
        if self.status not in RUN_STATUSES:
            raise ValueError(f"run {self.run_id!r}: status {self.status!r} unknown; fix: use one of {RUN_STATUSES}")
        _safe_run_id(self.run_id)


@dataclass(frozen=True)
class ScorePart:
    """Imported scores for `TrajectoryStore.ingest`: rows of one named part (see `add_scores`)."""

    data: Any = field(metadata={"help": "Arrow / pandas / dict of lists: model, step, prompt_id, n, score"})
    part: str = field(default="default", metadata={"help": "part name; adding under it again replaces or no-ops"})
    origin: str | None = field(default=None, metadata={"help": "where the rows came from (for messages)"})
    replace: bool = field(default=False, metadata={"help": "replace a part of that name holding other rows"})

    def __post_init__(self) -> None:
        if not isinstance(self.part, str) or not re.fullmatch(r"[A-Za-z0-9._=-]{1,100}", self.part):
            raise ValueError(f"add_scores: part {self.part!r} must be a short name of letters, digits, '.', '_', '-', '='")


class IngestResult(NamedTuple):
    """What one `TrajectoryStore.ingest` call committed."""

    prompts: int  # new prompts
    rollouts: dict[str, int]  # run_id -> rollouts written
    scores: int  # score rows written (0 when `scores_unchanged`)
    scores_unchanged: bool  # the same rows were already stored under that part name


@dataclass(frozen=True)
class Problem:
    """One finding of `TrajectoryStore.check` (kind: missing, size, checksum, unreadable, rows, orphan, views)."""

    kind: str
    tbl: str | None
    path: str | None
    n_rows: int | None
    detail: str

    def __str__(self) -> str:
        where = f"{self.tbl}: {self.path}" if self.path else (self.tbl or "store")
        rows = f" ({self.n_rows:,} rows)" if self.n_rows is not None else ""
        return f"{self.kind:<10} {where}{rows}: {self.detail}"


@dataclass(frozen=True)
class CheckReport:
    """`TrajectoryStore.check`'s result: problems (empty when healthy) and what was looked at."""

    root: str
    files: int  # committed files checked
    checksummed: int  # of those, with a recorded checksum (the rest: size and footer only)
    problems: tuple[Problem, ...]
    writer_active: bool  # another process held the write lock (its files in flight show as orphans)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def broken(self) -> tuple[Problem, ...]:
        """Problems with committed files (what `repair` drops from the manifest)."""
        return tuple(p for p in self.problems if p.kind not in ("orphan", "views"))


@dataclass(frozen=True)
class RepairReport:
    """`TrajectoryStore.repair`'s result: what was dropped or moved, and where it went."""

    dropped: tuple[Problem, ...]  # committed parts removed from the manifest (their rows are gone)
    quarantined: tuple[str, ...]  # files moved, relative to the store root
    quarantine_dir: str | None
    checksums_recorded: int  # intact format-1 rows that got their checksum


# ----------------------------------------------------------------------------------------------
# Small helpers (no store state).


def _to_arrow(relation) -> pa.Table:
    """A DuckDB relation as an Arrow table (duckdb 1.x and 2.x spell this differently)."""
    if hasattr(relation, "to_arrow_table"):
        return relation.to_arrow_table()
    return relation.arrow()


def _sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:48] or "run"


def _safe_run_id(run_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run_id):
        raise ValueError(
            f"run_id {run_id!r} is not allowed; fix: use letters, digits, '.', '_' or '-' "
            "(at most 128 characters, not starting with a punctuation mark)"
        )
    return run_id


def as_table(data: Any, *, argument: str) -> pa.Table:
    """Accept an Arrow table / record batch, a pandas DataFrame or a dict of equal-length lists."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    try:
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            return pa.Table.from_pandas(data, preserve_index=False)
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    if isinstance(data, Mapping):
        lengths = {name: len(values) for name, values in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{argument}: columns have different lengths {lengths}; fix: give every column one value per row")
        try:
            return pa.table({name: values for name, values in data.items()})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(f"{argument}: could not build a table from the dict of lists ({err}); fix: give one type per column") from None
    raise ValueError(
        f"{argument}: expected a pyarrow.Table, a pandas.DataFrame or a dict of lists, got {type(data).__name__}"
    )


def _kind_ok(source_type: pa.DataType, target: pa.DataType, column: str) -> bool:
    """Whether a column of `source_type` may be cast to `target` (refuse lossy or surprising casts)."""
    if pa.types.is_dictionary(source_type):
        source_type = source_type.value_type
    if pa.types.is_null(source_type):
        return True
    if pa.types.is_string(target):
        return pa.types.is_string(source_type) or pa.types.is_large_string(source_type)
    if pa.types.is_timestamp(target):
        return pa.types.is_timestamp(source_type) or pa.types.is_date(source_type)
    if pa.types.is_floating(target):
        return pa.types.is_integer(source_type) or pa.types.is_floating(source_type)
    if pa.types.is_integer(target):
        if column == "prompt_id":  # 64-bit hashes do not survive a float
            return pa.types.is_integer(source_type)
        return pa.types.is_integer(source_type) or pa.types.is_floating(source_type)
    return False


def _first_failing_row(column: pa.ChunkedArray, target: pa.DataType) -> int:
    """Index of the first value that does not cast safely to `target` (bisection over slices)."""
    lo, hi = 0, len(column)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(column.slice(lo, mid - lo), target, safe=True)
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    return lo


def coerce(table: pa.Table, tbl: str, *, source: str, fixes: Mapping[str, str] | None = None) -> pa.Table:
    """Cast `table` to the schema of store table `tbl`; missing optional columns become nulls.

    Raises ValueError naming `source`, the column, the first bad row and the fix for: missing required
    columns, columns of the wrong kind (text where a number belongs...) and values that do not fit the
    type (1.5 as an int, 300 as an int8). Timestamps are truncated to microseconds (naive = UTC).
    Nulls are checked by `check_not_null`, after defaults are filled in.
    """
    schema = SCHEMAS[tbl]
    fixes = dict(fixes or {})
    missing = [c for c in _REQUIRED[tbl] if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing} for {tbl} (columns present: {table.column_names}); "
            f"fix: add them — {tbl} needs {list(_REQUIRED[tbl])} and may have {[f.name for f in schema]}"
        )
    columns = {}
    for field in schema:
        if field.name not in table.column_names:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
            continue
        col = table.column(field.name)
        if not _kind_ok(col.type, field.type, field.name):
            raise ValueError(
                f"{source}: column {field.name!r} has type {col.type}, expected {field.type}; "
                f"fix: {fixes.get(field.name, f'convert the column to {field.type} before adding it')}"
            )
        if col.type != field.type:
            try:
                col = pc.cast(col, field.type, safe=not pa.types.is_timestamp(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                row = _first_failing_row(table.column(field.name), field.type)
                value = table.column(field.name)[row].as_py()
                raise ValueError(
                    f"{source}: row {row} column {field.name!r}: value {value!r} does not fit {field.type} ({err}); "
                    f"fix: {fixes.get(field.name, f'give values that fit {field.type}')}"
                ) from None
        columns[field.name] = col
    return pa.table(columns, schema=schema)


def check_not_null(table: pa.Table, tbl: str, *, source: str, fixes: Mapping[str, str] | None = None) -> None:
    fixes = dict(fixes or {})
    for name in _NOT_NULL[tbl]:
        col = table.column(name)
        if col.null_count:
            row = pc.index(pc.is_null(col), True).as_py()
            raise ValueError(
                f"{source}: row {row} column {name!r} is null; fix: {fixes.get(name, f'give every row a {name}')}"
            )


def _first_false(mask: pa.ChunkedArray | pa.Array) -> int | None:
    if pc.all(mask).as_py():
        return None
    return pc.index(mask, False).as_py()


_ROLLOUT_FIXES = {
    "reward": "rewards must be -1 or +1 (int8); map 0/1 rewards with 2*r-1",
    "prompt_id": "use v0_data.tasks.make_prompt_id(dataset, text) (a signed int64)",
    "step": "give the checkpoint / training step as an integer >= 0",
    "sample_idx": "number the rollouts of one (step, prompt) 0, 1, 2, ...",
}
_SCORE_FIXES = {
    "score": "give the mean reward in [-1, 1] (2 * success_rate - 1)",
    "n": "give the number of rollouts behind each score (an integer >= 1)",
    "prompt_id": "use v0_data.tasks.make_prompt_id(dataset, text) (a signed int64)",
}


def _check_run_columns(table: pa.Table, *, run_id: str, model: str, source: str) -> None:
    """Refuse `run_id` / `model` columns (optional in rollout input) that name another run or model."""
    for name, expected in (("run_id", run_id), ("model", model)):
        if name in table.column_names:
            col = table.column(name)
            if not _kind_ok(col.type, pa.string(), name):
                raise ValueError(f"{source}: column {name!r} has type {col.type}, expected string")
            bad = pc.fill_null(pc.not_equal(pc.cast(col, pa.string()), expected), True)
            if pc.any(bad).as_py():
                row = pc.index(bad, True).as_py()
                raise ValueError(
                    f"{source}: row {row} column {name!r} is {col[row].as_py()!r} but the rows are appended to run "
                    f"{run_id!r} of model {model!r}; fix: split the input per run and append each to its own run"
                )


def _check_rollout_values(table: pa.Table, *, source: str) -> None:
    """Refuse rewards other than -1 / +1 and negative step, sample_idx or n_tokens (ROLLOUT_SCHEMA table)."""
    reward = table.column("reward")
    row = _first_false(pc.or_(pc.equal(reward, 1), pc.equal(reward, -1)))
    if row is not None:
        raise ValueError(f"{source}: row {row} column 'reward' is {reward[row].as_py()}, not -1 or +1; fix: {_ROLLOUT_FIXES['reward']}")
    for name in ("step", "sample_idx", "n_tokens"):
        col = table.column(name)
        row = _first_false(pc.fill_null(pc.greater_equal(col, 0), True))
        if row is not None:
            raise ValueError(f"{source}: row {row} column {name!r} is {col[row].as_py()}, negative; fix: give values >= 0")


def _group_rollouts(table: pa.Table, *, numbered: bool, source: str) -> pa.Table:
    """Rows laid out by `group_order`; `numbered`: the input had no sample_idx, so number the samples.

    Runs of one prompt id compress to almost nothing (dictionary + RLE) and each step becomes one
    contiguous file. Input from a generation loop already is grouped and is kept as is; other input is
    sorted by (step, prompt_id, sample_idx).
    """
    step = table.column("step").to_numpy()
    pid = table.column("prompt_id").to_numpy()
    sidx = None if numbered else table.column("sample_idx").to_numpy()
    order, new_idx, dup = group_order(step, pid, sidx)
    if dup is not None:
        i, j = dup
        raise ValueError(
            f"{source}: rows {i} and {j} repeat (step, prompt_id, sample_idx) = "
            f"({step[i]}, {pid[i]}, {sidx[i]}); fix: number the samples of each (step, prompt) uniquely "
            "(or drop the sample_idx column to have them numbered)"
        )
    if order is not None:
        table = table.take(pa.array(order))
    if new_idx is not None:
        table = table.set_column(4, "sample_idx", pa.array(new_idx))
    return table


def _check_score_values(table: pa.Table, *, source: str) -> None:
    """Refuse scores outside [-1, 1] and counts n < 1 (SCORE_SCHEMA table)."""
    score = table.column("score")
    nan = pc.is_nan(score)
    if pc.any(nan).as_py():
        row = pc.index(nan, True).as_py()
        raise ValueError(f"{source}: row {row} column 'score' is NaN; fix: drop the row or give the measured mean reward")
    row = _first_false(pc.and_(pc.greater_equal(score, -1.0), pc.less_equal(score, 1.0)))
    if row is not None:
        raise ValueError(f"{source}: row {row} column 'score' is {score[row].as_py()}, outside [-1, 1]; fix: {_SCORE_FIXES['score']}")
    row = _first_false(pc.greater_equal(table.column("n"), 1))
    if row is not None:
        raise ValueError(f"{source}: row {row} column 'n' is {table.column('n')[row].as_py()}; fix: {_SCORE_FIXES['n']}")


# ----------------------------------------------------------------------------------------------
# The store.


class TrajectoryStore:
    """A directory of Parquet files plus `catalog.duckdb` (see the module docstring).

    Open with `TrajectoryStore.open(path)`; use as a context manager or call `close()` to release the
    write lock. `read_only=True` opens without the lock (any number of readers, beside one writer).
    """

    def __init__(self, root: Path, *, read_only: bool, lock_fd: int | None):
        import duckdb

        self.root = root
        self.read_only = read_only
        self._lock_fd = lock_fd
        self._duck = duckdb.connect(":memory:")
        # Committed files never change (a replaced part gets a new name), so footers may be cached.
        self._duck.execute("SET parquet_metadata_cache = true")
        if not read_only:
            # A commit is durable once DuckDB has fsynced its write-ahead log; folding the log into the
            # catalog file on every detach would cost a second write + fsync per commit. Fold it when
            # it passes 1 MB (keeps attaching cheap for readers, who replay it) and on close.
            self._duck.execute("PRAGMA disable_checkpoint_on_shutdown")
            self._duck.execute("SET checkpoint_threshold = '1MB'")
        self._manifest: list[ManifestEntry] = []
        self._runs: pa.Table | None = None
        self._views_stale = True
        self._known_ids: pa.Array | None = None
        self._generation: str | None = None
        self._closed = False
        try:
            if not read_only:
                _init_catalog(self._duck, root)
            self._reload()
        except BaseException:
            self._closed = True  # `open` releases the lock; __del__ must not close its fd again
            self._duck.close()
            raise

    # -- opening, locking, closing ------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = True, read_only: bool = False,
             clean_orphans: bool = True) -> "TrajectoryStore":
        """Open the store at `path`; create it when `create` (and not `read_only`) and absent.

        Opening for writing takes the write lock (one writer at a time), then deletes orphan files left
        by a crashed writer (unless `clean_orphans=False`: `repair` quarantines them instead).
        """
        root = Path(path).expanduser().resolve()
        catalog = root / CATALOG_NAME
        if not catalog.exists():
            if read_only or not create:
                raise ValueError(
                    f"no trajectory store at {root} ({CATALOG_NAME} is missing); fix: create one with "
                    f"TrajectoryStore.open({str(root)!r}, create=True) or `v05 data import ... --store {root}`"
                )
            if root.exists() and not root.is_dir():
                raise ValueError(f"store path {root} is a file; fix: pass a directory")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"cannot create the store {root} ({err.strerror}); fix: choose a writable folder") from None
        if read_only:
            return cls(root, read_only=True, lock_fd=None)
        lock_fd = _acquire_lock(root)
        try:
            store = cls(root, read_only=False, lock_fd=lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise
        if clean_orphans:
            store.clean_orphans()
        return store

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only:
                with _catalog(self._duck, self.root, read_only=False, timeout_s=5.0) as con:
                    con.execute(f"CHECKPOINT {_CATALOG_ALIAS}")
        except Exception:  # noqa: BLE001 - the log is replayed by the next open; closing must go on
            pass
        try:
            self._duck.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> "TrajectoryStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten store must not keep the write lock
        try:
            self.close()
        except Exception:
            pass

    def _require_writer(self, what: str) -> None:
        if self._closed:
            raise ValueError(f"{what}: the store {self.root} is closed; fix: open it again")
        if self.read_only:
            raise ValueError(f"{what}: the store {self.root} was opened read_only; fix: open it with read_only=False")

    # -- manifest and views ---------------------------------------------------------------------

    def _reload(self) -> None:
        """Copy the manifest and the runs out of the catalog (views are rebuilt on next use).

        Skipped when the catalog's generation counter (bumped by every commit) has not moved.
        """
        with _catalog(self._duck, self.root, read_only=True) as con:
            meta = dict(con.execute("SELECT key, value FROM _meta").fetchall())
            if meta.get("format_version", str(FORMAT_VERSION)) not in READABLE_FORMATS:
                raise ValueError(
                    f"store {self.root} has format version {meta['format_version']}, this code reads versions "
                    f"{' and '.join(READABLE_FORMATS)}; fix: use the matching v05 version"
                )
            generation = meta.get("generation")
            if generation is not None and generation == self._generation:
                return
            self._generation = generation
            manifest = _read_manifest(con, legacy=meta.get("format_version") == "1")
            self._set_runs(con)
        self._manifest = manifest
        self._known_ids = None
        self._views_stale = True

    def _paths(self, tbl: str) -> list[str]:
        """Absolute paths of the committed files of `tbl`."""
        return [str(self.root / e.path) for e in self._manifest if e.tbl == tbl]

    def _views(self):
        """The in-memory DuckDB connection, its views rebuilt if the manifest or runs changed."""
        if self._views_stale:
            self._build_views()
        return self._duck

    def _missing_files(self) -> list[ManifestEntry]:
        """Committed files that are not on disk (a stat per file: ~1 us each)."""
        return [e for e in self._manifest if not (self.root / e.path).is_file()]

    def _build_views(self) -> None:
        missing = self._missing_files()
        if missing and self.read_only:  # a writer may just have replaced a part: read the manifest again
            self._reload()
            missing = self._missing_files()
        if missing:
            e = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise StoreDamagedError(
                f"the store {self.root} lists {e.path} ({e.tbl}, {e.n_rows:,} rows) but the file is missing{more}; "
                f"fix: {repair_hint(self.root)}"
            )
        con = self._duck
        con.execute("DROP TABLE IF EXISTS runs")
        con.register("_runs_arrow", self._runs)
        con.execute("CREATE TABLE runs AS SELECT * FROM _runs_arrow")
        con.unregister("_runs_arrow")
        manifest = pa.Table.from_pylist([e._asdict() for e in self._manifest], schema=_MANIFEST_ARROW)
        con.register("_manifest_arrow", manifest)
        con.execute("CREATE OR REPLACE TABLE _manifest AS SELECT * FROM _manifest_arrow")
        con.unregister("_manifest_arrow")
        import duckdb

        try:
            for sql in _view_statements({tbl: self._paths(tbl) for tbl in DATA_DIRS}, temporary=False):
                con.execute(sql)
        except duckdb.Error as err:  # a damaged file's footer (views bind to the first file of each table)
            raise StoreDamagedError(
                f"the store {self.root} has a damaged committed file ({str(err).splitlines()[0]}); "
                f"fix: {repair_hint(self.root)}"
            ) from None
        self._views_stale = False

    def refresh(self) -> None:
        """Re-read the catalog (a reader sees what writers committed since it opened)."""
        if self.read_only:
            self._reload()

    # -- writing files ----------------------------------------------------------------------------

    def _write_parts(self, parts: list[tuple[pa.Table, str]]) -> list[tuple[int, str]]:
        """Write each (table, relpath) durably under its final name; returns (size in bytes, checksum) each.

        Each table goes to a temporary name first; all are checksummed and fsynced (in parallel threads:
        hashing and fsync release the GIL), then renamed into place, then each folder is fsynced once so
        the renames survive a power cut. Nothing lists these files until `_commit`.
        """
        tmps = []
        try:
            for table, rel in parts:
                final = self.root / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
                tmps.append((tmp, final))
                pq.write_table(table, tmp, **PARQUET_OPTIONS)
            checksums = _seal_all([tmp for tmp, _ in tmps])
            for tmp, final in tmps:
                os.replace(tmp, final)
            _fsync_all(sorted({final.parent for _, final in tmps}))
            return [(final.stat().st_size, checksum) for (_, final), checksum in zip(tmps, checksums)]
        except Exception:  # e.g. disk full: remove what this call wrote, nothing lists it
            for tmp, final in tmps:
                _unlink_quietly(tmp)
                _unlink_quietly(final)
            raise

    def _commit(self, entries: list[ManifestEntry], runs: Sequence[tuple] = ()) -> None:
        """Insert `entries` (and upsert `runs` rows) in one transaction, replacing the parts with the same keys.

        `runs`: (run_id, model, policy_path, algorithm, config JSON, status) tuples. The files of replaced
        parts are deleted after the commit (a crash before that leaves orphans for the next writer to
        clean). If the transaction fails (an error, not a crash), the new files are deleted at once and
        the store is as before.
        """
        keys = sorted({e.key for e in entries})
        committed = False
        try:
            self._commit_transaction(entries, keys, runs)
            committed = True
        finally:
            if not committed:
                for e in entries:
                    _unlink_quietly(self.root / e.path)

    def _commit_transaction(self, entries: list[ManifestEntry], keys: list[str], runs: Sequence[tuple]) -> None:
        with _catalog(self._duck, self.root, read_only=False) as con:
            with _transaction(con):
                replaced = [
                    row[0]
                    for row in con.execute(
                        "SELECT path FROM _manifest WHERE key IN (SELECT unnest(?))", [keys]
                    ).fetchall()
                ]
                con.execute("DELETE FROM _manifest WHERE key IN (SELECT unnest(?))", [keys])
                con.register("_new_entries", pa.Table.from_pylist([e._asdict() for e in entries], schema=_MANIFEST_ARROW))
                con.execute("INSERT INTO _manifest BY NAME SELECT * FROM _new_entries")
                con.unregister("_new_entries")
                for run in runs:
                    _upsert_run(con, *run)
                manifest = _read_manifest(con)
                _refresh_catalog_views(con, self.root, manifest, tables={e.tbl for e in entries})
                self._generation = _bump_generation(con)
            if runs:
                self._set_runs(con)
        self._manifest = manifest
        self._views_stale = True
        for rel in replaced:
            if rel not in {e.path for e in entries}:
                _unlink_quietly(self.root / rel)

    def clean_orphans(self) -> list[str]:
        """Delete files under the data folders that the manifest does not list (crash leftovers).

        Only a writer may do this (it holds the lock, so no other writer has a file in flight).
        Returns the deleted paths, relative to the root.
        """
        self._require_writer("clean_orphans")
        listed = {e.path for e in self._manifest}
        removed = []
        for folder in DATA_DIRS:
            base = self.root / folder
            if not base.exists():
                continue
            for path in sorted(base.rglob("*")):
                if path.is_file():
                    rel = path.relative_to(self.root).as_posix()
                    if rel not in listed:
                        _unlink_quietly(path)
                        removed.append(rel)
        return removed

    # -- prompts ------------------------------------------------------------------------------------

    def _existing_prompt_ids(self) -> pa.Array:
        if self._known_ids is None:
            ids = _to_arrow(self._views().sql("SELECT prompt_id FROM prompts")).column(0).combine_chunks()
            self._known_ids = ids
        return self._known_ids

    def add_prompts(self, prompts: Sequence[Prompt] | pa.Table | Any, *, source: str = "prompts") -> int:
        """Add prompts; ids already in the store are skipped when identical. Returns the number added.

        Accepts a list of `Prompt`s or a table with columns dataset, split, text, [answer, meta,
        prompt_id]. A given `prompt_id` must equal `make_prompt_id(dataset, text)`; a missing one is
        computed. `meta` may be a JSON string or a dict.
        """
        return self.ingest(prompts=prompts, source=source).prompts

    def _new_prompts(self, prompts: Any, *, source: str) -> pa.Table | None:
        """The rows of `prompts` not yet in the store (checked, deduplicated, sorted by id), or None."""
        table = _prompts_table(prompts, source=source)
        if table.num_rows == 0:
            return None
        # Deduplicate inside the input (identical rows) and refuse conflicting duplicates.
        table = _dedupe_prompts(table, source=source)
        existing_ids = self._existing_prompt_ids()
        is_old = pc.is_in(table.column("prompt_id"), value_set=existing_ids)
        if pc.any(is_old).as_py():
            old = table.filter(is_old)
            self._views().register("_incoming", old)
            conflicts = self._views().execute(
                """SELECT i.prompt_id, i.dataset, i.text, p.dataset, p.text, i.answer, p.answer
                   FROM _incoming i JOIN prompts p ON i.prompt_id = p.prompt_id
                   WHERE i.dataset IS DISTINCT FROM p.dataset OR i.text IS DISTINCT FROM p.text
                      OR i.answer IS DISTINCT FROM p.answer LIMIT 1"""
            ).fetchall()
            self._duck.unregister("_incoming")
            if conflicts:
                pid = conflicts[0][0]
                row = pc.index(table.column("prompt_id"), pa.scalar(pid, pa.int64())).as_py()
                raise ValueError(
                    f"{source}: row {row} column 'answer'/'text': prompt_id {pid} is already in the store with "
                    f"another dataset/text/answer (store: dataset={conflicts[0][3]!r}, answer={conflicts[0][6]!r}; "
                    f"new: dataset={conflicts[0][1]!r}, answer={conflicts[0][5]!r}); fix: prompts are immutable — "
                    "import the new version under another dataset name or into a new store"
                )
            table = table.filter(pc.invert(is_old))
        if table.num_rows == 0:
            return None
        return table.sort_by([("prompt_id", "ascending")])

    def ingest(self, *, prompts: Any = None, runs: Sequence[RunRollouts] = (), scores: ScorePart | None = None,
               part: int = 0, source: str = "input") -> IngestResult:
        """Validate everything, then commit new prompts, whole runs of rollouts and a score part at once.

        Nothing is written until every prompt, run and row has passed the checks of `add_prompts`,
        `append_rollouts` and `add_scores` (rollouts and scores may use the prompts of the same call);
        then all files commit in one manifest transaction together with the `runs` rows, so a failure
        anywhere leaves the store exactly as it was. `part` keys the rollout files as in `append_rollouts`.
        """
        self._require_writer("ingest")
        if not isinstance(part, (int, np.integer)) or part < 0:
            raise ValueError(f"ingest: part must be an integer >= 0, got {part!r}")
        new_prompts = None if prompts is None else self._new_prompts(prompts, source=source)
        extra_ids = None if new_prompts is None else new_prompts.column("prompt_id").combine_chunks()
        staged_runs = self._stage_runs(runs, extra_ids=extra_ids, source=source)
        staged_scores = None if scores is None else self._stage_scores(scores, extra_ids=extra_ids, source=source)
        unchanged = staged_scores is not None and staged_scores[0] is None
        parts: list[tuple[pa.Table, str]] = []
        meta: list[tuple] = []  # (tbl, key, run_id, step, content, origin) per part
        if new_prompts is not None:
            token = uuid.uuid4().hex[:12]
            parts.append((new_prompts, f"prompts/part-{token}.parquet"))
            meta.append(("prompts", f"prompts|{token}", None, None, None, source))
        for run, table in staged_runs:
            for chunk, rel, step in _step_parts(table, run.run_id, part):
                parts.append((chunk, rel))
                meta.append(("rollouts", f"rollouts|{run.run_id}|{step}|{int(part)}", run.run_id, step, None, None))
        if staged_scores is not None and not unchanged and staged_scores[0].num_rows:
            table, spec, content = staged_scores
            rel = f"scores/part-{hashlib.blake2b(spec.part.encode(), digest_size=6).hexdigest()}-{uuid.uuid4().hex[:8]}.parquet"
            parts.append((table, rel))
            meta.append(("scores", f"scores|{spec.part}", None, None, content, spec.origin or source))
        run_rows = [
            (r.run_id, r.model, r.policy_path, r.algorithm, json.dumps(dict(r.config), sort_keys=True, default=str), r.status)
            for r, _ in staged_runs
        ]
        if parts or run_rows:
            sealed = self._write_parts(parts) if parts else []
            now = _now()
            entries = [
                ManifestEntry(rel, tbl, key, rid, step, chunk.num_rows, n_bytes, now, checksum, content, origin)
                for (chunk, rel), (n_bytes, checksum), (tbl, key, rid, step, content, origin) in zip(parts, sealed, meta)
            ]
            self._commit(entries, runs=run_rows)
            self._known_ids = None
        return IngestResult(
            prompts=0 if new_prompts is None else new_prompts.num_rows,
            rollouts={r.run_id: t.num_rows for r, t in staged_runs},
            scores=0 if staged_scores is None or unchanged else staged_scores[0].num_rows,
            scores_unchanged=unchanged,
        )

    def _stage_runs(self, runs: Sequence[RunRollouts], *, extra_ids: pa.Array | None,
                    source: str) -> list[tuple[RunRollouts, pa.Table]]:
        """Each run's rollouts validated (see `_validate_rollouts`); refuses a run id given twice or
        registered for another model."""
        known = dict(zip(self._runs.column("run_id").to_pylist(), self._runs.column("model").to_pylist()))
        seen: set[str] = set()
        staged = []
        for run in runs:
            if not isinstance(run, RunRollouts):
                raise ValueError(f"ingest: runs must be RunRollouts, got {type(run).__name__}")
            if run.run_id in seen:
                raise ValueError(f"{source}: run {run.run_id!r} is given twice; fix: one RunRollouts per run id")
            seen.add(run.run_id)
            if known.get(run.run_id, run.model) != run.model:
                raise ValueError(
                    f"{source}: run_id {run.run_id!r} already exists for model {known[run.run_id]!r}, not {run.model!r}; "
                    "fix: pass another run id"
                )
            label = source if len(runs) == 1 else f"{source} (rows of run {run.run_id!r}, numbered within them)"
            table = as_table(run.rollouts, argument=label)
            staged.append((run, self._validate_rollouts(table, run_id=run.run_id, model=run.model, source=label,
                                                        extra_ids=extra_ids)))
        return staged

    # -- runs ---------------------------------------------------------------------------------------

    def start_run(
        self,
        model: str,
        policy_path: str | None = None,
        algorithm: str = "grpo",
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Register a run (one policy trained or evaluated over steps) and return its id.

        Restarting an existing `run_id` with the same model sets it running again (resuming a crashed
        run); another model under the same id is refused.
        """
        self._require_writer("start_run")
        if not isinstance(model, str) or not model:
            raise ValueError(f"start_run: model must be a non-empty string, got {model!r}")
        config_json = json.dumps(dict(config or {}), sort_keys=True, default=str)
        if run_id is None:
            run_id = f"{_slug(model)}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        _safe_run_id(run_id)
        with _catalog(self._duck, self.root, read_only=False) as con:
            old = con.execute("SELECT model FROM runs WHERE run_id = ?", [run_id]).fetchall()
            if old and old[0][0] != model:
                raise ValueError(
                    f"start_run: run_id {run_id!r} already exists for model {old[0][0]!r}, not {model!r}; "
                    "fix: pass another run_id (or none, to get a fresh one)"
                )
            _upsert_run(con, run_id, model, policy_path, algorithm, config_json, "running")
            self._generation = _bump_generation(con)
            self._set_runs(con)
        return run_id

    def finish_run(self, run_id: str, status: str = "finished") -> None:
        """Mark a run finished (or failed / aborted)."""
        self._require_writer("finish_run")
        if status not in RUN_STATUSES:
            raise ValueError(f"finish_run: status {status!r} unknown; fix: use one of {RUN_STATUSES}")
        self._run_model(run_id, what="finish_run")
        with _catalog(self._duck, self.root, read_only=False) as con:
            con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", [status, _now(), run_id])
            self._generation = _bump_generation(con)
            self._set_runs(con)

    def _set_runs(self, con) -> None:
        self._runs = _to_arrow(con.sql("SELECT * FROM runs ORDER BY started_at, run_id"))
        self._views_stale = True

    def _run_model(self, run_id: str, *, what: str) -> str:
        ids = self._runs.column("run_id").to_pylist()
        if run_id not in ids:
            known = ", ".join(ids[-5:]) or "(none)"
            raise ValueError(
                f"{what}: unknown run_id {run_id!r} (latest runs: {known}); fix: create it with start_run(model, ...) first"
            )
        return self._runs.column("model")[ids.index(run_id)].as_py()

    def runs(self) -> pa.Table:
        return self._runs

    def manifest(self) -> list[ManifestEntry]:
        """The committed files this handle sees (a reader: as of its last refresh)."""
        return list(self._manifest)

    # -- rollouts -----------------------------------------------------------------------------------

    def append_rollouts(self, run_id: str, data: Any, *, part: int = 0, source: str = "rollouts") -> int:
        """Append rollouts of run `run_id`; returns the number of rows written.

        `data` (Arrow / pandas / dict of lists) has columns step, prompt_id, reward (+-1) and optionally
        sample_idx (numbered per (step, prompt) in input order when absent), response, n_tokens,
        finish_reason, created_at (now when absent), model and run_id (must match the run).
        One file is written per step; the key of each is (run_id, step, part), so appending the same
        (run, step, part) again **replaces** the earlier rows (a re-run step never duplicates). Use
        part=1, 2, ... for further chunks of the same step. All files of one call commit together.
        """
        self._require_writer("append_rollouts")
        model = self._run_model(run_id, what="append_rollouts")
        if not isinstance(part, (int, np.integer)) or part < 0:
            raise ValueError(f"append_rollouts: part must be an integer >= 0, got {part!r}")
        table = as_table(data, argument=source)
        table = self._validate_rollouts(table, run_id=run_id, model=model, source=source)
        if table.num_rows == 0:
            return 0
        parts = _step_parts(table, run_id, part)
        sealed = self._write_parts([(chunk, rel) for chunk, rel, _ in parts])
        committed_at = _now()
        entries = [
            ManifestEntry(rel, "rollouts", f"rollouts|{run_id}|{step}|{int(part)}", run_id, step, chunk.num_rows,
                          n_bytes, committed_at, checksum)
            for (chunk, rel, step), (n_bytes, checksum) in zip(parts, sealed)
        ]
        self._commit(entries)
        return table.num_rows

    def _validate_rollouts(self, table: pa.Table, *, run_id: str, model: str, source: str,
                           extra_ids: pa.Array | None = None) -> pa.Table:
        """`table` checked and cast to ROLLOUT_SCHEMA, defaults filled in, rows grouped per (step, prompt).

        `extra_ids`: prompt ids about to be committed with these rollouts (they count as known).
        """
        _check_run_columns(table, run_id=run_id, model=model, source=source)
        created_missing = "created_at" not in table.column_names
        idx_missing = "sample_idx" not in table.column_names
        table = coerce(table, "rollouts", source=source, fixes=_ROLLOUT_FIXES)
        n = table.num_rows
        table = table.set_column(0, "run_id", pa.repeat(pa.scalar(run_id, pa.string()), n))
        table = table.set_column(1, "model", pa.repeat(pa.scalar(model, pa.string()), n))
        if created_missing:
            table = table.set_column(9, "created_at", pa.repeat(pa.scalar(_now(), pa.timestamp("us", tz="UTC")), n))
        if idx_missing:
            table = table.set_column(4, "sample_idx", pa.array(np.zeros(n, dtype=np.int32)))
        check_not_null(table, "rollouts", source=source, fixes=_ROLLOUT_FIXES)
        if n == 0:
            return table
        _check_rollout_values(table, source=source)
        self._check_known_prompts(table, extra_ids=extra_ids, source=source)
        self._check_not_scored(table, model=model, source=source)
        return _group_rollouts(table, numbered=idx_missing, source=source)

    def _check_known_prompts(self, table: pa.Table, *, extra_ids: pa.Array | None, source: str) -> None:
        """Refuse a `prompt_id` that is neither in the store nor among `extra_ids`."""
        known = self._existing_prompt_ids()
        if extra_ids is not None and len(extra_ids):
            known = pa.concat_arrays([known, extra_ids.cast(pa.int64())])
        row = _first_false(pc.is_in(table.column("prompt_id"), value_set=known))
        if row is not None:
            raise ValueError(
                f"{source}: row {row} column 'prompt_id': {table.column('prompt_id')[row].as_py()} is not in the store's "
                "prompts; fix: add the prompts first (TrajectoryStore.add_prompts or `v05 data import`)"
            )

    def _check_not_scored(self, table: pa.Table, *, model: str, source: str) -> None:
        """Refuse rollouts for a (model, step, prompt) that imported scores already cover (it would
        appear twice in prompt_stats). Costs nothing when the store has no scores for this model."""
        if not self._paths("scores"):
            return
        con = self._views()
        steps = pc.unique(table.column("step"))
        scored = _to_arrow(
            con.sql(
                "SELECT step, prompt_id FROM scores WHERE model = $1 AND step IN (SELECT unnest($2))",
                params=[model, steps.to_pylist()],
            )
        )
        if scored.num_rows == 0:
            return
        con.register("_incoming", table.select(["step", "prompt_id"]).append_column("_row", pa.array(np.arange(table.num_rows))))
        con.register("_scored", scored)
        try:
            clash = con.execute(
                "SELECT min(i._row), i.step, i.prompt_id FROM _incoming i JOIN _scored s USING (step, prompt_id) "
                "GROUP BY ALL ORDER BY 1 LIMIT 1"
            ).fetchall()
        finally:
            con.unregister("_incoming")
            con.unregister("_scored")
        if clash:
            row, step, pid = clash[0]
            raise ValueError(
                f"{source}: row {row}: model {model!r} step {step} prompt_id {pid} already has imported scores in the "
                "store; fix: drop these rows, or give the rollouts another step or model name"
            )

    # -- scores -------------------------------------------------------------------------------------

    def add_scores(self, data: Any, *, part: str = "default", source: str = "scores", origin: str | None = None,
                   replace: bool = False) -> int:
        """Add imported per-(model, step, prompt) mean rewards (when single rollouts are unavailable).

        Columns model, step, prompt_id, n (rollouts behind the mean, >= 1), score (mean reward in
        [-1, 1], not NaN). A part is identified by its name and a digest of its rows: adding the same
        rows under the same name again is a no-op (returns 0); different rows under an existing name
        are refused with `PartConflictError` unless `replace=True`. `origin` (e.g. the resolved path of
        the release) is recorded for that message. A (model, step, prompt_id) already scored by another
        part, or with rollouts in the store, is refused. Returns the rows written.
        """
        spec = ScorePart(data, part=part, origin=origin, replace=replace)
        return self.ingest(scores=spec, source=source).scores

    def _stage_scores(self, spec: ScorePart, *, extra_ids: pa.Array | None,
                      source: str) -> tuple[pa.Table | None, ScorePart, str]:
        """(sorted score rows, spec, content digest) checked; rows None when the part already holds them."""
        table = coerce(as_table(spec.data, argument=source), "scores", source=source, fixes=_SCORE_FIXES)
        check_not_null(table, "scores", source=source, fixes=_SCORE_FIXES)
        _check_score_values(table, source=source)
        table = table.sort_by([("model", "ascending"), ("step", "ascending"), ("prompt_id", "ascending")])
        content = table_digest(table)
        key = f"scores|{spec.part}"
        old = [e for e in self._manifest if e.key == key]
        if old:
            old_content = old[0].content or table_digest(_read_committed(self.root, old[0]))
            if old_content == content:
                return None, spec, content
            if not spec.replace:
                raise PartConflictError(
                    f"{source}: score part {spec.part!r} already holds other rows ({old[0].n_rows:,} rows from "
                    f"{old[0].origin or 'an earlier import (origin not recorded)'}; new: {table.num_rows:,} rows from "
                    f"{spec.origin or source}); fix: pass replace=True to replace them, or add under another part name",
                    part=spec.part, old_origin=old[0].origin, new_origin=spec.origin or source,
                    old_rows=old[0].n_rows, new_rows=table.num_rows,
                )
        if table.num_rows:
            self._check_known_prompts(table, extra_ids=extra_ids, source=source)
            self._check_scores_unique(table, key=key, source=source)
        return table, spec, content

    def _check_scores_unique(self, table: pa.Table, *, key: str, source: str) -> None:
        """Refuse a (model, step, prompt_id) given twice in `table`, scored by a score part other than
        `key`, or measured by rollouts in the store (it would count twice in prompt_stats)."""
        con = self._views()
        con.register("_incoming", table.append_column("_row", pa.array(np.arange(table.num_rows))))
        try:
            dup = con.execute(
                """SELECT min(_row), max(_row), model, step, prompt_id FROM _incoming
                   GROUP BY model, step, prompt_id HAVING count(*) > 1 ORDER BY 1 LIMIT 1"""
            ).fetchall()
            if dup:
                raise ValueError(
                    f"{source}: rows {dup[0][0]} and {dup[0][1]} repeat (model, step, prompt_id) = {dup[0][2:]}; "
                    "fix: give one score per (model, step, prompt)"
                )
            other = [str(self.root / e.path) for e in self._manifest if e.tbl == "scores" and e.key != key]
            clash_sql = (
                "SELECT i._row, i.model, i.step, i.prompt_id, 'scores part' FROM _incoming i JOIN "
                f"read_parquet([{', '.join(_sql_str(p) for p in other)}]) s USING (model, step, prompt_id)"
                if other
                else None
            )
            clash = con.execute(clash_sql + " ORDER BY 1 LIMIT 1").fetchall() if clash_sql else []
            if not clash and self._paths("rollouts"):
                clash = con.execute(
                    """SELECT i._row, i.model, i.step, i.prompt_id, 'rollouts' FROM _incoming i
                       WHERE EXISTS (SELECT 1 FROM rollouts r WHERE r.model = i.model AND r.step = i.step
                                     AND r.prompt_id = i.prompt_id) ORDER BY 1 LIMIT 1"""
                ).fetchall()
            if clash:
                raise ValueError(
                    f"{source}: row {clash[0][0]}: (model, step, prompt_id) = {clash[0][1:4]} already has {clash[0][4]} "
                    "in the store; fix: re-add under the same part name with replace=True to replace it, or drop the row"
                )
        finally:
            con.unregister("_incoming")

    # -- reading ------------------------------------------------------------------------------------

    def query(self, sql: str, read_only: bool = True, params: Sequence[Any] | None = None) -> pa.Table:
        """Run DuckDB SQL over the store's views and return the last statement's result as Arrow.

        With `read_only` (the default) only SELECT / EXPLAIN statements run (WITH ..., FROM ...,
        DESCRIBE, SHOW, SUMMARIZE count as SELECT); anything that could write is refused.
        `read_only=False` runs any statement in the store's in-memory DuckDB session (e.g. a temporary
        table, or COPY ... TO an export file); the store's own files and manifest are changed only
        through the methods of this class.
        """
        if self._closed:
            raise ValueError(f"query: the store {self.root} is closed; fix: open it again")
        statements = check_sql(sql) if read_only else None

        def run(con):
            if statements is None or len(statements) <= 1:
                return _to_arrow(con.sql(sql, params=params) if params else con.sql(sql))
            for statement in statements[:-1]:
                con.execute(statement.query)
            return _to_arrow(con.sql(statements[-1].query))

        return self._read(run)

    def _read(self, fn, attempts: int = 5):
        """Run `fn(connection)` on fresh views. A reader whose listed file was just replaced by the
        writer (and deleted) re-reads the manifest and tries again; other file errors are explained."""
        for attempt in range(attempts):
            if self.read_only:
                self.refresh()
            try:
                return fn(self._views())
            except Exception as err:
                damaged = isinstance(err, StoreDamagedError)
                missing = damaged or "No files found" in str(err) or "No such file" in str(err)
                if self.read_only and missing and attempt + 1 < attempts:
                    self._views_stale = True
                    time.sleep(0.01 * (attempt + 1))
                    continue
                if not damaged:
                    _raise_store_io_error(err, self.root)
                raise

    def prompt_stats(self) -> pa.Table:
        """The `prompt_stats` view: (model, step, prompt_id, n, successes, score) as Arrow."""
        return self.query("SELECT * FROM prompt_stats")

    def pairs(self, models: Iterable[str] | None = None) -> pa.Table:
        """The `v0_pairs` view (optionally only the given models), ordered by model, step, prompt_id."""
        if models is None:
            return self.query("SELECT * FROM v0_pairs ORDER BY model, step, prompt_id")
        models = [models] if isinstance(models, str) else list(models)
        return self.query(
            "SELECT * FROM v0_pairs WHERE model IN (SELECT unnest($1)) ORDER BY model, step, prompt_id", params=[models]
        )

    def info(self) -> dict[str, Any]:
        """Counts (per table, per (model, step)) and disk size, from the manifest (no data scan)."""
        if self.read_only:
            self.refresh()
        con = self._views()
        per_key = con.execute(
            """WITH r AS (SELECT runs.model, m.step, sum(m.n_rows) AS rollouts, 0 AS scores
                          FROM _manifest m JOIN runs USING (run_id) WHERE m.tbl = 'rollouts' GROUP BY ALL),
                    s AS (SELECT model, step, 0 AS rollouts, count(*) AS scores FROM scores GROUP BY ALL)
               SELECT model, step, CAST(sum(rollouts) AS BIGINT), CAST(sum(scores) AS BIGINT)
               FROM (SELECT * FROM r UNION ALL SELECT * FROM s) GROUP BY model, step ORDER BY model, step"""
        ).fetchall()
        count = {tbl: sum(e.n_rows for e in self._manifest if e.tbl == tbl) for tbl in DATA_DIRS}
        files = {tbl: sum(1 for e in self._manifest if e.tbl == tbl) for tbl in DATA_DIRS}
        data_bytes = sum(e.n_bytes for e in self._manifest)
        catalog_bytes = (self.root / CATALOG_NAME).stat().st_size
        return {
            "root": str(self.root),
            "format_version": FORMAT_VERSION,
            "prompts": count["prompts"],
            "runs": self._runs.num_rows,
            "rollouts": count["rollouts"],
            "scores": count["scores"],
            "files": files,
            "data_bytes": data_bytes,
            "catalog_bytes": catalog_bytes,
            "disk_bytes": data_bytes + catalog_bytes,
            "bytes_per_rollout": (
                sum(e.n_bytes for e in self._manifest if e.tbl == "rollouts") / count["rollouts"] if count["rollouts"] else None
            ),
            "per_model_step": [
                {"model": m, "step": s, "rollouts": r, "scores": sc} for m, s, r, sc in per_key
            ],
        }

    def verify(self) -> list[str]:
        """Problems with committed files (missing, size, checksum, footer, rows) as text; empty when healthy."""
        return [str(p) for p in self.check(views=False).broken]

    # -- checking and repairing ---------------------------------------------------------------------

    def check(self, *, views: bool = True) -> CheckReport:
        """Compare the manifest with the files: missing, orphan, size, checksum, footer and row count;
        with `views`, also build the read-only views and count their rows (only when no file is broken).

        Reads every committed file once to checksum it (rows of format-1 stores without a checksum are
        checked by size, footer and row count). Works on a read-only handle; no lock is taken, so a writer
        running meanwhile shows its files in flight as orphans (`writer_active` says so).
        """
        if self._closed:
            raise ValueError(f"check: the store {self.root} is closed; fix: open it again")
        if self.read_only:
            self.refresh()
        problems = [p for e in self._manifest if (p := _check_entry(self.root, e)) is not None]
        listed = {e.path for e in self._manifest}
        for rel in _data_files(self.root):
            if rel not in listed:
                problems.append(Problem("orphan", rel.split("/", 1)[0], rel, None, "on disk but not in the manifest"))
        if views and not problems:
            problems.extend(self._check_views())
        return CheckReport(
            root=str(self.root),
            files=len(self._manifest),
            checksummed=sum(1 for e in self._manifest if e.checksum),
            problems=tuple(problems),
            writer_active=self.read_only and _writer_active(self.root),
        )

    def _check_views(self) -> list[Problem]:
        """Build the read-only session's views and compare each table's row count with the manifest."""
        problems = []
        try:
            with self.read_only_session() as session:
                for tbl in DATA_DIRS:
                    got = session.execute(f"SELECT count(*) AS n FROM {tbl}").column(0)[0].as_py()
                    want = sum(e.n_rows for e in self._manifest if e.tbl == tbl)
                    if got != want:
                        problems.append(Problem("views", tbl, None, got, f"{got:,} rows, the manifest says {want:,}"))
                for view in ("prompt_stats", "v0_pairs"):
                    session.execute(f"SELECT * FROM {view} LIMIT 0")
        except ValueError as err:
            problems.append(Problem("views", None, None, None, f"the views do not build: {err}"))
        return problems

    def repair(self) -> RepairReport:
        """Quarantine what `check` finds broken, keep every intact file, rebuild the views.

        Broken committed files (missing, wrong size or checksum, unreadable, wrong row count) and orphans
        are moved to `<store>/quarantine/<UTC time>/<their path>`; the broken parts leave the manifest in
        one transaction that also records the checksum of intact rows that had none (format-1 stores) and
        rebuilds the catalog's views. Files move first: a crash in between leaves parts listed but missing,
        which the next `repair` drops. Needs a writer opened with `clean_orphans=False` (else the orphans
        were already deleted on opening). Returns what was dropped and moved.
        """
        self._require_writer("repair")
        report = self.check(views=False)
        stamp = _now().strftime("%Y%m%dT%H%M%S.%fZ")
        quarantine = self.root / QUARANTINE_DIR / stamp
        moved = []
        for problem in report.problems:
            src = self.root / problem.path
            if problem.path and src.is_file():
                dest = quarantine / problem.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
                moved.append(problem.path)
        if moved:
            _fsync_all(sorted({(quarantine / rel).parent for rel in moved} | {(self.root / rel).parent for rel in moved}))
        broken = {p.path for p in report.broken}
        record = {e.path: file_checksum(self.root / e.path) for e in self._manifest if not e.checksum and e.path not in broken}
        if broken or record:
            self._repair_transaction(sorted(broken), record)
        return RepairReport(
            dropped=report.broken,
            quarantined=tuple(moved),
            quarantine_dir=str(quarantine) if moved else None,
            checksums_recorded=len(record),
        )

    def _repair_transaction(self, drop: list[str], checksums: Mapping[str, str]) -> None:
        """Drop manifest rows `drop`, record `checksums`, rebuild every catalog view: one transaction."""
        with _catalog(self._duck, self.root, read_only=False) as con, _transaction(con):
            con.execute("DELETE FROM _manifest WHERE path IN (SELECT unnest(?))", [drop])
            for rel, checksum in checksums.items():
                con.execute("UPDATE _manifest SET checksum = ? WHERE path = ?", [checksum, rel])
            manifest = _read_manifest(con)
            _refresh_catalog_views(con, self.root, manifest)
            self._generation = _bump_generation(con)
        self._manifest = manifest
        self._known_ids = None
        self._views_stale = True

    def read_only_session(self) -> "ReadOnlySession":
        """A DuckDB session over this store that cannot write anything or read other files (`v05 sql`).

        See `ReadOnlySession`. Refuses up front when a committed file is missing (names it and the fix).
        """
        if self._closed:
            raise ValueError(f"read_only_session: the store {self.root} is closed; fix: open it again")
        if self.read_only:
            self.refresh()
        missing = self._missing_files()
        if missing:
            raise StoreDamagedError(
                f"the store {self.root} lists {missing[0].path} ({missing[0].tbl}) but the file is missing; "
                f"fix: {repair_hint(self.root)}"
            )
        return ReadOnlySession(self.root, self._manifest, self._runs)


class ReadOnlySession:
    """DuckDB SQL over a store that can only read the store's committed files (what `v05 sql` runs).

    Read-only by construction, whatever the statement (no statement is inspected):
    - the views and the `runs` / `_manifest` tables live in a private DuckDB file (a fresh temporary
      folder, deleted on close) that is opened READ_ONLY: CREATE / INSERT / UPDATE / DELETE / DROP /
      ALTER on them fail; no writable database is attached ("memory" is not there, and ATTACH needs files);
    - DuckDB has no file access at all: `enable_external_access = false` with an empty allow list, so
      COPY ... TO, EXPORT DATABASE, ATTACH, INSTALL / LOAD of extension files, read_csv / read_text /
      read_blob / glob / read_parquet of any path fail; extension auto-loading and persistent secrets
      are off, Python replacement scans are off;
    - `lock_configuration = true` last: SET / RESET / PRAGMA of any setting fail, so none of the above
      can be undone;
    - the committed files reach DuckDB as Arrow datasets that pyarrow opens for reading (DuckDB's own
      `allowed_paths` would also let COPY overwrite the listed files, see the module docstring).
    What remains allowed: SELECT (WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN [ANALYZE] of them),
    PRAGMA table functions, and TEMP tables / views / macros that live in this process's memory (a large
    sort may spill to the private temporary folder) and vanish with the session.
    """

    def __init__(self, root: Path, manifest: Sequence[ManifestEntry], runs: pa.Table):
        import duckdb

        self.root = root
        self._dir = tempfile.mkdtemp(prefix="v05-sql-")
        path = os.path.join(self._dir, "session.duckdb")
        try:
            sources = _session_sources(root, manifest, runs)
            writer = duckdb.connect(path)
            try:
                for name, source in sources.items():
                    writer.register(f"_arrow_{name}", source)
                for name in sources:  # runs and _manifest are small: real (read-only) tables
                    kind = "TABLE" if name in ("runs", "_manifest") else "VIEW"
                    writer.execute(f"CREATE {kind} {name} AS SELECT * FROM _arrow_{name}")
                for sql in (f"CREATE VIEW prompt_stats AS {_PROMPT_STATS_SQL}", f"CREATE VIEW v0_pairs AS {_V0_PAIRS_SQL}"):
                    writer.execute(sql)
            finally:
                writer.close()
            self._con = duckdb.connect(path, read_only=True, config=_SESSION_CONFIG)
            for name, source in sources.items():
                if name in DATA_DIRS:
                    self._con.register(f"_arrow_{name}", source)
            self._con.execute("SET enable_external_access = false")
            self._con.execute("SET lock_configuration = true")
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    def execute(self, sql: str) -> pa.Table:
        """Run the statement(s) in `sql`; the last one's result as Arrow (empty when it returns none).

        Raises ValueError: "SQL does not parse", "refused: ..." (the session's guard fired), or
        "query failed: ..." (any other DuckDB error: a bad column, a type mismatch, ...).
        """
        import duckdb

        statements = sql_statements(sql)
        result = None
        for statement in statements:
            try:
                relation = self._con.sql(statement.query)
                result = _to_arrow(relation) if relation is not None else pa.table({})
            except duckdb.Error as err:
                raise ValueError(_explain_refusal(err, statement.query)) from None
        return result

    def close(self) -> None:
        con, self._con = getattr(self, "_con", None), None
        if con is not None:
            con.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "ReadOnlySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# Set when the session's connection starts (these cannot be changed later: the configuration is locked).
_SESSION_CONFIG = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_persistent_secrets": False,
    "python_enable_replacements": False,
}


def _session_sources(root: Path, manifest: Sequence[ManifestEntry], runs: pa.Table) -> dict[str, Any]:
    """The Arrow objects behind a session's base views: a read-only dataset per data table, plus tables."""
    import pyarrow.dataset as ds

    sources: dict[str, Any] = {}
    for tbl in DATA_DIRS:
        paths = [str(root / e.path) for e in manifest if e.tbl == tbl]
        sources[tbl] = ds.dataset(paths, schema=SCHEMAS[tbl], format="parquet") if paths else SCHEMAS[tbl].empty_table()
    sources["runs"] = runs
    sources["_manifest"] = pa.Table.from_pylist([e._asdict() for e in manifest], schema=_MANIFEST_ARROW)
    return sources


def _explain_refusal(err: Exception, statement: str) -> str:
    """A session error as one message: what the guard refused and why, or the query's own error."""
    first = str(err).splitlines()[0]
    text = statement.strip()[:80]
    fix = ("Fix: change the store through `v05 data ...` or the Python API (TrajectoryStore); copy results "
           "with `v05 sql ... --format csv > out.csv`")
    if "disabled by configuration" in first or "disabled through configuration" in first:
        return (f"refused: {text!r} would read or write a file other than the store's committed Parquet files "
                f"(DuckDB: {first}); `v05 sql` only reads the store. {fix}")
    if "configuration has been locked" in first:
        return f"refused: {text!r} changes a setting; the settings of `v05 sql` are locked (DuckDB: {first}). {fix}"
    if any(sign in first for sign in ("read-only mode", "Can only update base table", "Can only delete from base table",
                                      "is not an table")):
        return f"refused: {text!r} would change the store's tables or views; `v05 sql` is read-only (DuckDB: {first}). {fix}"
    return f"query failed: {first}"


def _check_entry(root: Path, e: ManifestEntry) -> Problem | None:
    """The first problem of one committed file (missing, size, checksum, unreadable footer, rows), or None."""
    path = root / e.path
    if not path.is_file():
        return Problem("missing", e.tbl, e.path, e.n_rows, "listed in the manifest but not on disk")
    size = path.stat().st_size
    if size != e.n_bytes:
        return Problem("size", e.tbl, e.path, e.n_rows, f"{size:,} bytes on disk, {e.n_bytes:,} committed")
    if e.checksum and file_checksum(path) != e.checksum:
        return Problem("checksum", e.tbl, e.path, e.n_rows, f"content changed since it was committed ({e.checksum})")
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # noqa: BLE001 - any reader error means a corrupt file
        return Problem("unreadable", e.tbl, e.path, e.n_rows, f"not a readable Parquet file ({err})")
    if rows != e.n_rows:
        return Problem("rows", e.tbl, e.path, e.n_rows, f"{rows:,} rows on disk, {e.n_rows:,} committed")
    return None


def _data_files(root: Path) -> list[str]:
    """Every file under the data folders, relative to `root` (committed parts, orphans, temporary files)."""
    out = []
    for folder in DATA_DIRS:
        base = root / folder
        if base.exists():
            out.extend(p.relative_to(root).as_posix() for p in sorted(base.rglob("*")) if p.is_file())
    return out


def _writer_active(root: Path) -> bool:
    """Whether another process holds the write lock now."""
    path = root / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Catalog, lock and SQL helpers.

_MANIFEST_ARROW = pa.schema(
    [
        ("path", pa.string()),
        ("tbl", pa.string()),
        ("key", pa.string()),
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("n_rows", pa.int64()),
        ("n_bytes", pa.int64()),
        ("committed_at", pa.timestamp("us", tz="UTC")),
        ("checksum", pa.string()),
        ("content", pa.string()),
        ("origin", pa.string()),
    ]
)


_CATALOG_ALIAS = "_v05_catalog"


def _read_manifest(con, legacy: bool = False) -> list[ManifestEntry]:
    """The manifest of the attached catalog; `legacy`: a format-1 catalog (no checksum/content/origin:
    None), which only readers see (a writer migrates the catalog when it opens it)."""
    if not legacy:
        cols = ", ".join(ManifestEntry._fields)
        return [ManifestEntry(*row) for row in con.execute(f"SELECT {cols} FROM _manifest ORDER BY tbl, key").fetchall()]
    present = {
        row[0]
        for row in con.execute(
            f"SELECT column_name FROM duckdb_columns() WHERE database_name = '{_CATALOG_ALIAS}' AND table_name = '_manifest'"
        ).fetchall()
    }
    cols = ", ".join(f if f in present else f"NULL AS {f}" for f in ManifestEntry._fields)
    return [ManifestEntry(*row) for row in con.execute(f"SELECT {cols} FROM _manifest ORDER BY tbl, key").fetchall()]


class _catalog:
    """catalog.duckdb attached to `con` for a moment (the default catalog while inside), then detached.

    Attaching to the store's in-memory DuckDB costs a few ms, a new DuckDB instance ~10x more; holding
    the file only briefly lets other processes' readers and the writer take turns. A lock held by
    another process is waited for (with back-off) up to `timeout_s`.
    """

    def __init__(self, con, root: Path, *, read_only: bool, timeout_s: float = 30.0):
        self.con, self.root, self.read_only, self.timeout_s = con, root, read_only, timeout_s

    def __enter__(self):
        import duckdb

        path = str(self.root / CATALOG_NAME)
        mode = " (READ_ONLY)" if self.read_only else ""
        deadline = time.monotonic() + self.timeout_s
        delay = 0.005
        while True:
            try:
                self.con.execute(f"ATTACH {_sql_str(path)} AS {_CATALOG_ALIAS}{mode}")
                break
            except duckdb.Error as err:
                first = str(err).splitlines()[0]
                if "lock" not in first.lower():
                    raise CatalogCorruptError(
                        f"the store's catalog {path} is corrupt ({first}); fix: restore {CATALOG_NAME} from a backup "
                        "(the Parquet files under prompts/, rollouts/ and scores/ are not touched by this error), or "
                        "move the store aside and rebuild it with `v05 data import` / `ingest-rollouts`"
                    ) from None
                if time.monotonic() > deadline:
                    raise ValueError(
                        f"cannot open {path} ({first}); fix: another process keeps the catalog open "
                        "(a DuckDB shell?) — close it and retry"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        self.con.execute(f"USE {_CATALOG_ALIAS}")
        return self.con

    def __exit__(self, *exc: Any) -> None:
        self.con.execute("USE memory")
        self.con.execute(f"DETACH {_CATALOG_ALIAS}")


@contextlib.contextmanager
def _transaction(con) -> Iterable[Any]:
    """BEGIN ... COMMIT on the catalog connection `con`; any error rolls back and is re-raised, so the
    manifest and the views change together or not at all."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - a failed COMMIT has already rolled back
            pass
        raise


def _init_catalog(duck, root: Path) -> None:
    with _catalog(duck, root, read_only=False) as con:
        con.execute(_MANIFEST_DDL)
        con.execute(_RUNS_DDL)
        con.execute(_META_DDL)
        version = con.execute("SELECT value FROM _meta WHERE key = 'format_version'").fetchall()
        if version and version[0][0] not in READABLE_FORMATS:
            raise ValueError(
                f"store {root} has format version {version[0][0]}, this code reads versions {' and '.join(READABLE_FORMATS)}; "
                "fix: use the matching v05 version"
            )
        for column in _MANIFEST_V2_COLUMNS:  # format 1 -> 2; existing rows keep NULL (checked by size)
            con.execute(f"ALTER TABLE _manifest ADD COLUMN IF NOT EXISTS {column} VARCHAR")
        con.execute("INSERT OR REPLACE INTO _meta VALUES ('format_version', ?)", [str(FORMAT_VERSION)])
        con.execute("INSERT OR IGNORE INTO _meta VALUES ('generation', '0')")
        old_root = con.execute("SELECT value FROM _meta WHERE key = 'root'").fetchall()
        views = {row[0] for row in con.execute(f"SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = '{_CATALOG_ALIAS}'").fetchall()}
        if not old_root or old_root[0][0] != str(root) or "v0_pairs" not in views:
            _refresh_catalog_views(con, root, _read_manifest(con))
            con.execute("INSERT OR REPLACE INTO _meta VALUES ('root', ?)", [str(root)])


def _bump_generation(con) -> str:
    """Increment the catalog's change counter (readers skip re-reading an unchanged catalog)."""
    return con.execute(
        "UPDATE _meta SET value = CAST(CAST(value AS BIGINT) + 1 AS VARCHAR) WHERE key = 'generation' RETURNING value"
    ).fetchall()[0][0]


def _refresh_catalog_views(con, root: Path, manifest: list[ManifestEntry], tables: Iterable[str] = DATA_DIRS) -> None:
    """The persistent views of catalog.duckdb (absolute paths: for the duckdb shell; refreshed on moves).

    Only the views of `tables` are rebuilt; `prompt_stats` and `v0_pairs` name them and bind at query time.
    """
    tables = set(tables)
    paths = {tbl: [str(root / e.path) for e in manifest if e.tbl == tbl] for tbl in DATA_DIRS}
    for sql in _view_statements(paths, temporary=False, tables=tables, derived=tables == set(DATA_DIRS)):
        con.execute(sql)


def _view_statements(
    paths: Mapping[str, list[str]], *, temporary: bool, tables: Iterable[str] = DATA_DIRS, derived: bool = True
) -> list[str]:
    kind = "TEMPORARY VIEW" if temporary else "VIEW"
    out = []
    for tbl in [t for t in DATA_DIRS if t in set(tables)]:
        schema = SCHEMAS[tbl]
        cols = ", ".join(f.name for f in schema)
        if paths[tbl]:
            files = ", ".join(_sql_str(p) for p in paths[tbl])
            body = f"SELECT {cols} FROM read_parquet([{files}])"
        else:
            typed = ", ".join(f"CAST(NULL AS {_DUCK_TYPES[f.type]}) AS {f.name}" for f in schema)
            body = f"SELECT {typed} WHERE false"
        out.append(f"CREATE OR REPLACE {kind} {tbl} AS {body}")
    if derived:
        out.append(f"CREATE OR REPLACE {kind} prompt_stats AS {_PROMPT_STATS_SQL}")
        out.append(f"CREATE OR REPLACE {kind} v0_pairs AS {_V0_PAIRS_SQL}")
    return out


def sql_statements(sql: str) -> list:
    """DuckDB's parsed statements of `sql`; a ValueError naming the fix when it does not parse or is empty."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise ValueError(f"SQL does not parse: {str(err).splitlines()[0]}") from None
    if not statements:
        raise ValueError("SQL is empty; fix: give a statement such as 'SELECT * FROM prompt_stats LIMIT 5'")
    return statements


def check_sql(sql: str) -> list:
    """Parse `sql` and refuse statements that are not plain reads; returns the parsed statements.

    Only a friendlier, earlier message: the guard of `v05 sql` is `ReadOnlySession`, which refuses
    whatever this misses. EXPLAIN [ANALYZE] is judged by the statement it explains.
    """
    statements = sql_statements(sql)
    for statement in statements:
        kind = str(statement.type).rsplit(".", 1)[-1]
        if kind == "EXPLAIN":
            inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?(\([^)]*\)\s*)?", "", statement.query, flags=re.IGNORECASE)
            if inner.strip() and inner != statement.query:
                check_sql(inner)
            continue
        if kind not in _READ_ONLY_STATEMENTS:
            text = statement.query.strip()
            raise ValueError(
                f"refused: {kind} statement {text[:60]!r} could write; queries on a store are read-only — "
                "only SELECT (incl. WITH/FROM/DESCRIBE/SHOW/SUMMARIZE) and EXPLAIN run. Fix: change the store "
                "through the Python API (TrajectoryStore) or `v05 data ...`, or copy results with "
                "`v05 sql ... --format csv > out.csv`"
            )
    return statements


def _raise_store_io_error(err: Exception, root: Path) -> None:
    text = str(err)
    if "parquet" in text.lower() or "No files found" in text or "No such file" in text:
        raise StoreDamagedError(
            f"reading the store {root} failed: {text.splitlines()[0]}; fix: a committed file is missing or corrupt — "
            f"{repair_hint(root)}"
        ) from err


def _acquire_lock(root: Path) -> int:
    path = root / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(
            f"cannot write the store {root}: {path} cannot be opened ({err.strerror}); fix: the folder is read-only "
            "to you — read it (`v05 sql`, `v05 data info`, TrajectoryStore.open(..., read_only=True)) or copy it to "
            "a writable place to change it"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StoreLockedError(
            f"the store {root} is being written by another process ({holder}; lock file {path}); only one writer "
            "at a time — fix: wait for it to finish, or open with read_only=True to read meanwhile"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {_now().isoformat(timespec='seconds')}".encode(), 0)
    return fd


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder: its entries) to disk. `v05 bench store` uses it for its floor file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_all(paths: Sequence[Path]) -> None:
    if len(paths) <= 1:
        for path in paths:
            fsync_path(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        list(pool.map(fsync_path, paths))


def file_checksum(path: Path) -> str:
    """"blake2b:<hex>" (128-bit) of a file's bytes, read in 8 MiB blocks (hashlib releases the GIL)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 23), b""):
            digest.update(block)
    return f"blake2b:{digest.hexdigest()}"


def _seal(path: Path) -> str:
    checksum = file_checksum(path)
    fsync_path(path)
    return checksum


def _seal_all(paths: Sequence[Path]) -> list[str]:
    """Checksum and fsync every file (threads when several); returns the checksums in order."""
    if len(paths) <= 1:
        return [_seal(path) for path in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        return list(pool.map(_seal, paths))


def _upsert_run(con, run_id: str, model: str, policy_path: str | None, algorithm: str, config_json: str,
                status: str) -> None:
    """Insert a run, or set an existing one's status (its model was checked before the transaction)."""
    finished = None if status == "running" else _now()
    if con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchall():
        con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", [status, finished, run_id])
    else:
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, model, policy_path, algorithm, config_json, _now(), finished, status],
        )


def table_digest(table: pa.Table) -> str:
    """A digest of a table's rows ("blake2b:<hex>"): equal for equal values in equal order and columns.

    Independent of Parquet encoding, chunking and library versions (numbers hash as little-endian
    fixed-width arrays, text as JSON), so a re-import of the same release compares equal.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        digest.update(f"{name}:{col.type}:{col.null_count};".encode())
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            values = col.fill_null(0).to_numpy(zero_copy_only=False)
            digest.update(np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"))).tobytes())
            if col.null_count:
                digest.update(np.asarray(col.is_null()).tobytes())
        else:
            digest.update(json.dumps(col.to_pylist(), default=str).encode())
    return f"blake2b:{digest.hexdigest()}"


def _step_parts(table: pa.Table, run_id: str, part: int) -> list[tuple[pa.Table, str, int]]:
    """One (rows, relative path, step) per step of a rollout table sorted by step."""
    if table.num_rows == 0:
        return []
    steps = table.column("step").to_numpy()
    bounds = np.flatnonzero(np.diff(steps)) + 1  # table is sorted by step
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(steps)]])
    out = []
    for start, end in zip(starts.tolist(), ends.tolist()):
        step = int(steps[start])
        rel = f"rollouts/run={run_id}/step-{step:09d}-part-{int(part):04d}-{uuid.uuid4().hex[:8]}.parquet"
        out.append((table.slice(start, end - start), rel, step))
    return out


def _read_committed(root: Path, entry: ManifestEntry) -> pa.Table:
    """A committed file's rows (for a format-1 score part's digest); a missing one names `v05 data repair`."""
    path = root / entry.path
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise StoreDamagedError(
            f"the store {root}: committed file {entry.path} ({entry.tbl}) cannot be read ({err}); fix: "
            f"{repair_hint(root)}"
        ) from None


def repair_hint(root: Path) -> str:
    """The fix named by every message about a missing or damaged committed file."""
    return (f"run `v05 data check --store {root}` to list the damage, then `v05 data repair --store {root}` "
            "to quarantine the broken parts (intact files are kept), or restore the file from a backup")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def group_order(
    step: np.ndarray, pid: np.ndarray, sidx: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None, tuple[int, int] | None]:
    """How to lay out rollouts so that each (step, prompt) is one contiguous run, steps ascending.

    Shapes: step, pid, sidx (N,). Returns (order, sample_idx, duplicate):
    - order (N,) row permutation, or None when the input already is laid out so (the common case of
      a generation loop: every prompt's samples together, steps in order) — no copy is made then;
    - sample_idx (N,) int32 in the *output* order when `sidx` is None: 0, 1, ... within each
      (step, prompt) in input order; else None;
    - duplicate: (row, row) of the input repeating a (step, prompt_id, sample_idx), else None.
    Cost O(N) for grouped input (work is done per run of rows, not per row); otherwise one lexsort.
    """
    n = len(step)
    if n == 0:
        return None, (np.zeros(0, np.int32) if sidx is None else None), None
    new_run = np.empty(n, dtype=bool)  # [N] first row of a run of equal (step, prompt_id)
    new_run[0] = True
    np.not_equal(pid[1:], pid[:-1], out=new_run[1:])
    new_run[1:] |= step[1:] != step[:-1]
    starts = np.flatnonzero(new_run)  # [R]
    lengths = np.diff(np.append(starts, n))  # [R]
    if sidx is None:
        increasing = True
    else:
        up = np.empty(n, dtype=bool)
        up[0] = True
        np.greater(sidx[1:], sidx[:-1], out=up[1:])
        increasing = bool(np.all(up | new_run))
    run_step, run_pid = step[starts], pid[starts]
    run_order = np.lexsort((run_pid, run_step))  # [R]
    s_step, s_pid = run_step[run_order], run_pid[run_order]
    unique_runs = not bool(np.any((s_step[1:] == s_step[:-1]) & (s_pid[1:] == s_pid[:-1])))
    if increasing and unique_runs:
        # Every (step, prompt) is one run with increasing sample_idx: move whole runs if needed.
        numbered = None
        if np.all(run_step[1:] >= run_step[:-1]):
            order = None
        else:
            ends = starts + lengths
            order = _expand_runs(starts[run_order], ends[run_order] - starts[run_order])
            lengths = lengths[run_order]
        if sidx is None:
            offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [N] start of each row's run
            numbered = (np.arange(n) - offsets).astype(np.int32)
        return order, numbered, None
    return _sorted_layout(step, pid, sidx)


def _sorted_layout(
    step: np.ndarray, pid: np.ndarray, sidx: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int] | None]:
    """`group_order` for input that is not grouped: one stable lexsort by (step, prompt_id[, sample_idx]).

    Shapes: step, pid, sidx (N,), N >= 1. Same return values as `group_order`.
    """
    n = len(step)
    if sidx is None:
        order = np.lexsort((pid, step))  # stable: input order numbers the samples
        s_step, s_pid = step[order], pid[order]
        first = np.empty(n, dtype=bool)
        first[0] = True
        first[1:] = (s_step[1:] != s_step[:-1]) | (s_pid[1:] != s_pid[:-1])
        group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        return order, (np.arange(n) - group_start).astype(np.int32), None
    order = np.lexsort((sidx, pid, step))
    s_step, s_pid, s_idx = step[order], pid[order], sidx[order]
    dup = (s_step[1:] == s_step[:-1]) & (s_pid[1:] == s_pid[:-1]) & (s_idx[1:] == s_idx[:-1])
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        a, b = sorted((int(order[i]), int(order[i + 1])))
        return order, None, (a, b)
    return order, None, None


def _expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row indices of the runs [starts[r], starts[r] + lengths[r]) concatenated. Shapes: (R,) -> (sum lengths,)."""
    out_start = np.cumsum(lengths) - lengths  # [R]
    return np.arange(int(lengths.sum())) - np.repeat(out_start - starts, lengths)


def _prompts_table(prompts: Any, *, source: str) -> pa.Table:
    """Prompts as a PROMPT_SCHEMA table; ids computed when absent and checked when given."""
    if isinstance(prompts, (list, tuple)) and (not prompts or isinstance(prompts[0], Prompt)):
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, Prompt)), None)
        if bad is not None:
            raise ValueError(f"{source}: row {bad} is a {type(prompts[bad]).__name__}, not a Prompt; fix: give only Prompts")
        table = pa.table(
            {
                "prompt_id": pa.array([p.prompt_id for p in prompts], pa.int64()),
                "dataset": [p.dataset for p in prompts],
                "split": [p.split for p in prompts],
                "text": [p.text for p in prompts],
                "answer": pa.array([p.answer for p in prompts], pa.string()),
                "meta": [json.dumps(p.meta, sort_keys=True, default=str) for p in prompts],
            }
        )
    else:
        table = as_table(prompts, argument=source)
    if "meta" in table.column_names and not _kind_ok(table.column("meta").type, pa.string(), "meta"):
        meta = [None if m is None else json.dumps(m, sort_keys=True, default=str) for m in table.column("meta").to_pylist()]
        table = table.set_column(table.column_names.index("meta"), "meta", pa.array(meta, pa.string()))
    has_id = "prompt_id" in table.column_names
    if "answer" in table.column_names and not _kind_ok(table.column("answer").type, pa.string(), "answer"):
        answers = [None if a is None else str(a) for a in table.column("answer").to_pylist()]
        table = table.set_column(table.column_names.index("answer"), "answer", pa.array(answers, pa.string()))
    table = coerce(
        table,
        "prompts",
        source=source,
        fixes={"prompt_id": "use v0_data.tasks.make_prompt_id(dataset, text) (a signed int64) or drop the column"},
    )
    datasets = table.column("dataset").to_pylist()
    texts = table.column("text").to_pylist()
    for name, values in (("dataset", datasets), ("text", texts), ("split", table.column("split").to_pylist())):
        bad = next((i for i, v in enumerate(values) if v is None or v == ""), None)
        if bad is not None:
            raise ValueError(f"{source}: row {bad} column {name!r} is empty; fix: give every prompt a {name}")
    expected = pa.array([make_prompt_id(d, t) for d, t in zip(datasets, texts)], pa.int64())
    if has_id:
        given = table.column("prompt_id")
        row = _first_false(pc.fill_null(pc.equal(given, expected), False))
        if row is not None:
            raise ValueError(
                f"{source}: row {row} column 'prompt_id' is {given[row].as_py()}, but make_prompt_id(dataset, text) is "
                f"{expected[row].as_py()}; fix: ids are the hash of (dataset, text) — drop the column to have them computed"
            )
    table = table.set_column(0, "prompt_id", expected)
    bad = next((i for i, m in enumerate(table.column("meta").to_pylist()) if m is not None and not _is_json(m)), None)
    if bad is not None:
        raise ValueError(f"{source}: row {bad} column 'meta' is not valid JSON; fix: give a JSON object string or a dict")
    return table


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _dedupe_prompts(table: pa.Table, *, source: str) -> pa.Table:
    ids = table.column("prompt_id").to_numpy()
    if len(np.unique(ids)) == len(ids):
        return table
    keep: dict[int, int] = {}
    rows = table.select(["dataset", "text", "answer"]).to_pylist()
    selected = []
    for i, pid in enumerate(ids.tolist()):
        if pid in keep:
            if rows[keep[pid]] != rows[i]:
                raise ValueError(
                    f"{source}: rows {keep[pid]} and {i} have the same (dataset, text) but different answers; "
                    "fix: keep one answer per prompt"
                )
            continue
        keep[pid] = i
        selected.append(i)
    return table.take(pa.array(selected))


__all__ = [
    "TrajectoryStore",
    "StoreLockedError",
    "StoreDamagedError",
    "CatalogCorruptError",
    "PartConflictError",
    "ManifestEntry",
    "RunRollouts",
    "ScorePart",
    "IngestResult",
    "Problem",
    "CheckReport",
    "RepairReport",
    "ReadOnlySession",
    "repair_hint",
    "file_checksum",
    "table_digest",
    "PROMPT_SCHEMA",
    "ROLLOUT_SCHEMA",
    "SCORE_SCHEMA",
    "PARQUET_OPTIONS",
    "check_sql",
    "as_table",
    "coerce",
    "fsync_path",
    "group_order",
]
