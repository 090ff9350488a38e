"""`v05 bench store`: ingest speed, disk size and `prompt_stats` time of the trajectory store.

Synthesises N rollouts (default 10 M) over 20k prompts and 200 (model, step) keys (20 runs x 10 steps,
16 rollouts per prompt, each key drawing its own prompts), then measures, in the same process:

- ingest: `TrajectoryStore.append_rollouts` (validation, sorting, one fsynced file per step, manifest
  commits; one call per run) vs. the floor: pyarrow writing the same rows to one Parquet file with the
  same writer options;
- disk: bytes per rollout of the store's rollout files (and with the catalog) vs. the floor file;
- aggregation: `TrajectoryStore.prompt_stats()` on a freshly opened read-only handle (catalog check,
  views over the manifest's files, aggregation to Arrow; opening the handle is reported apart) vs. the
  floor: DuckDB running the same aggregation straight over one Parquet file holding the same rows in
  the same order, on an open connection (median of interleaved repeats).

Figures depend on the machine and its load; the ratios to the floor are the portable part.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.common import OptionError, write_json

N_PROMPTS = 20_000
N_RUNS = 20
N_STEPS = 10
SAMPLES_PER_PROMPT = 16

_ROLLOUT_BYTES_SQL = "SELECT CAST(sum(n_bytes) AS BIGINT) FROM _manifest WHERE tbl = 'rollouts'"

_FLOOR_SQL = """
SELECT model, step, prompt_id, count(*) AS n, CAST(count_if(reward > 0) AS BIGINT) AS successes, avg(reward) AS score
FROM read_parquet({path}) GROUP BY model, step, prompt_id
"""


def synthesise(n_rollouts: int, seed: int = 0, n_prompts: int = N_PROMPTS):
    """Prompts and per-run rollout tables (generation order: prompts in batch order, samples contiguous).

    Returns (prompts table, {run index: rollouts table}). Each (run, step) key draws
    n_rollouts / (200 * 16) prompts; a prompt's success probability depends on the prompt and the step.
    """
    from v0_data.tasks.base import make_prompt_id

    rng = np.random.default_rng(seed)
    texts = [f"bench prompt {i}: {rng.integers(1_000_000)} + {rng.integers(1_000)} =" for i in range(n_prompts)]
    ids = np.array([make_prompt_id("bench", t) for t in texts], dtype=np.int64)
    prompts = pa.table(
        {
            "prompt_id": ids,
            "dataset": pa.repeat(pa.scalar("bench"), n_prompts),
            "split": pa.repeat(pa.scalar("train"), n_prompts),
            "text": texts,
        }
    )
    difficulty = rng.uniform(-3, 3, n_prompts)
    per_key = min(n_prompts, max(1, n_rollouts // (N_RUNS * N_STEPS * SAMPLES_PER_PROMPT)))
    runs = {}
    t0 = dt.datetime(2026, 1, 1)  # naive = UTC (numpy has no time zones)
    for run in range(N_RUNS):
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "prompt_id", "sample_idx", "reward", "n_tokens", "finish")}
        created = []
        for step in range(N_STEPS):
            chosen = rng.choice(n_prompts, per_key, replace=False)
            p = 1 / (1 + np.exp(difficulty[chosen] - 0.3 * step))
            reward = np.where(rng.random((per_key, SAMPLES_PER_PROMPT)) < p[:, None], 1, -1).astype(np.int8)
            n = per_key * SAMPLES_PER_PROMPT
            cols["step"].append(np.full(n, step * 16, dtype=np.int64))
            cols["prompt_id"].append(np.repeat(ids[chosen], SAMPLES_PER_PROMPT))
            cols["sample_idx"].append(np.tile(np.arange(SAMPLES_PER_PROMPT, dtype=np.int32), per_key))
            cols["reward"].append(reward.ravel())
            cols["n_tokens"].append(rng.integers(20, 4096, n).astype(np.int32))
            cols["finish"].append(rng.random(n) < 0.05)
            created.append(np.full(n, np.datetime64(t0 + dt.timedelta(minutes=run * 100 + step), "us")))
        finish = np.concatenate(cols["finish"])
        runs[run] = pa.table(
            {
                "step": np.concatenate(cols["step"]),
                "prompt_id": np.concatenate(cols["prompt_id"]),
                "sample_idx": np.concatenate(cols["sample_idx"]),
                "reward": np.concatenate(cols["reward"]),
                "n_tokens": np.concatenate(cols["n_tokens"]),
                "finish_reason": pa.array(np.where(finish, "length", "stop")).dictionary_encode(),
                "created_at": pa.array(np.concatenate(created)).cast(pa.timestamp("us", tz="UTC")),
            }
        )
    return prompts, runs


def ingest_store(store_dir: Path, prompts, runs: dict, models: dict[int, str]) -> tuple[dict[int, str], float]:
    """Prompts, then one `append_rollouts` call per run, into a new store; (run ids, ingest seconds)."""
    from v0_data.store import TrajectoryStore

    store = TrajectoryStore.open(store_dir, create=True)
    store.add_prompts(prompts, source="bench prompts")
    run_ids = {r: store.start_run(models[r], algorithm="grpo", run_id=f"bench-run-{r:02d}") for r in runs}
    t0 = time.perf_counter()
    for r, table in tqdm(runs.items(), desc="ingest (one append per run)", unit="run", disable=None):
        store.append_rollouts(run_ids[r], table, source=f"bench run {r}")
    seconds = time.perf_counter() - t0
    store.close()
    return run_ids, seconds


def floor_ingest(path: Path, runs: dict, run_ids: dict[int, str], models: dict[int, str]) -> float:
    """Seconds to write the same rows (with run_id / model columns) to one fsynced Parquet file."""
    from v0_data.store import PARQUET_OPTIONS, fsync_path

    full = pa.concat_tables(
        [
            t.add_column(0, "run_id", pa.repeat(pa.scalar(run_ids[r]), t.num_rows)).add_column(
                1, "model", pa.repeat(pa.scalar(models[r]), t.num_rows)
            )
            for r, t in runs.items()
        ]
    )
    t0 = time.perf_counter()
    pq.write_table(full, path, **PARQUET_OPTIONS)
    fsync_path(path)
    return time.perf_counter() - t0


def time_prompt_stats(store_dir: Path, floor_file: Path, repeats: int) -> dict:
    """Interleaved repeats of `prompt_stats()` on a fresh read-only handle and of the floor query.

    Returns the lists of seconds (store, floor, opening the handle), the row count and DuckDB's threads.
    """
    import duckdb

    from v0_data.store import TrajectoryStore

    con = duckdb.connect()
    floor_sql = _FLOOR_SQL.format(path="'" + str(floor_file) + "'")
    t_store, t_floor, t_open = [], [], []
    n_groups = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        handle = TrajectoryStore.open(store_dir, read_only=True)
        t_open.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats = handle.prompt_stats()  # re-checks the catalog, builds the views, aggregates to Arrow
        t_store.append(time.perf_counter() - t0)
        handle.close()
        n_groups = stats.num_rows
        del stats
        t0 = time.perf_counter()
        rel = con.sql(floor_sql)
        floor_stats = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        t_floor.append(time.perf_counter() - t0)
        assert floor_stats.num_rows == n_groups, (floor_stats.num_rows, n_groups)
        del floor_stats
    threads = int(con.execute("SELECT current_setting('threads')").fetchone()[0])
    return {"store": t_store, "floor": t_floor, "open": t_open, "rows": n_groups, "duckdb_threads": threads}


def run_bench(n_rollouts: int, workdir: Path, repeats: int = 3, seed: int = 0, n_prompts: int = N_PROMPTS) -> dict:
    """Ingest, disk and `prompt_stats` of the store against the one-Parquet-file floor (see the module doc)."""
    from v0_data.store import PARQUET_OPTIONS, TrajectoryStore

    prompts, runs = synthesise(n_rollouts, seed, n_prompts)
    n_total = sum(t.num_rows for t in runs.values())
    models = {r: f"bench-model-{r:02d}" for r in runs}
    store_dir = workdir / "store"
    run_ids, t_ingest = ingest_store(store_dir, prompts, runs, models)
    t_floor_ingest = floor_ingest(workdir / "floor_unsorted.parquet", runs, run_ids, models)

    # Floor file for the aggregation: the store's rows in the store's order, one file.
    reader = TrajectoryStore.open(store_dir, read_only=True)
    same_rows = reader.query("SELECT * FROM rollouts")
    floor_file = workdir / "floor.parquet"
    pq.write_table(same_rows, floor_file, **PARQUET_OPTIONS)
    assert same_rows.num_rows == n_total
    del same_rows

    timed = time_prompt_stats(store_dir, floor_file, repeats)
    info = reader.info()
    rollout_bytes = reader.query(_ROLLOUT_BYTES_SQL).column(0)[0].as_py()
    reader.close()
    return summarise(timed, info, n_total=n_total, n_prompts=n_prompts, t_ingest=t_ingest,
                     t_floor_ingest=t_floor_ingest, rollout_bytes=rollout_bytes, floor_bytes=floor_file.stat().st_size)


def summarise(timed: dict, info: dict, *, n_total: int, n_prompts: int, t_ingest: float, t_floor_ingest: float,
              rollout_bytes: int, floor_bytes: int) -> dict:
    """The JSON result of `run_bench` (figures, ratios to the floor, machine)."""
    store_agg = statistics.median(timed["store"])
    floor_agg = statistics.median(timed["floor"])
    return {
        "n_rollouts": n_total,
        "n_prompts": n_prompts,
        "n_keys": N_RUNS * N_STEPS,
        "prompt_stats_rows": timed["rows"],
        "ingest_s": t_ingest,
        "ingest_rows_per_s": n_total / t_ingest,
        "floor_ingest_s": t_floor_ingest,
        "ingest_ratio_to_floor": t_ingest / t_floor_ingest,
        "bytes_per_rollout": rollout_bytes / n_total,
        "bytes_per_rollout_with_catalog": (rollout_bytes + info["catalog_bytes"]) / n_total,
        "floor_bytes_per_rollout": floor_bytes / n_total,
        "bytes_ratio_to_floor": rollout_bytes / floor_bytes,
        "rollout_files": info["files"]["rollouts"],
        "prompt_stats_s": store_agg,
        "floor_prompt_stats_s": floor_agg,
        "prompt_stats_ratio_to_floor": store_agg / floor_agg,
        "prompt_stats_s_all": timed["store"],
        "open_read_only_s": statistics.median(timed["open"]),
        "floor_prompt_stats_s_all": timed["floor"],
        "duckdb_threads": timed["duckdb_threads"],
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
    }


def format_table(result: dict) -> str:
    """The measures, their floors, ratios and targets as an aligned text table."""
    rows = [
        ("ingest", f"{result['ingest_rows_per_s'] / 1e6:.2f} M rollouts/s ({result['ingest_s']:.2f} s)",
         f"{result['floor_ingest_s']:.2f} s", f"{result['ingest_ratio_to_floor']:.2f}x", ">= 1 M/s"),
        ("disk", f"{result['bytes_per_rollout']:.2f} B/rollout ({result['bytes_per_rollout_with_catalog']:.2f} with catalog)",
         f"{result['floor_bytes_per_rollout']:.2f} B", f"{result['bytes_ratio_to_floor']:.2f}x", "<= 12 B"),
        ("prompt_stats", f"{result['prompt_stats_s']:.3f} s ({result['prompt_stats_rows']:,} rows)",
         f"{result['floor_prompt_stats_s']:.3f} s", f"{result['prompt_stats_ratio_to_floor']:.2f}x", "<= 1.5x, <= 3 s"),
    ]
    head = ("measure", "store", "floor (one Parquet file)", "ratio", "target")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def bench_store(n_rollouts: int, out_path: Path, *, repeats: int = 3, seed: int = 0, n_prompts: int = N_PROMPTS,
                workdir: Path | None = None) -> dict:
    """Run the benchmark in `workdir` (default: a temporary folder, deleted afterwards), print the table,
    write the JSON result to `out_path` and return it."""
    if n_rollouts < N_RUNS * N_STEPS * SAMPLES_PER_PROMPT:
        raise OptionError(f"need at least {N_RUNS * N_STEPS * SAMPLES_PER_PROMPT} rollouts", "--n")
    if n_prompts < 1:
        raise OptionError("must be >= 1", "--prompts")
    if repeats < 1:
        raise OptionError("must be >= 1", "--repeats")
    keep = workdir is not None
    base = workdir if keep else Path(tempfile.mkdtemp(prefix="v05-bench-store-"))
    if keep and base.exists() and any(base.iterdir()):
        raise OptionError(f"{base} is not empty; give an empty or new folder", "--workdir")
    base.mkdir(parents=True, exist_ok=True)
    try:
        click.echo(f"synthesising {n_rollouts:,} rollouts over {n_prompts:,} prompts and {N_RUNS * N_STEPS} (model, step) keys ...")
        result = run_bench(n_rollouts, base, repeats=repeats, seed=seed, n_prompts=n_prompts)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    click.echo(format_table(result))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, result, indent=2)
    click.echo(f"results written to {out_path}")
    return result
