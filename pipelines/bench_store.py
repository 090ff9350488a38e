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
import json
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

N_PROMPTS = 20_000
N_RUNS = 20
N_STEPS = 10
SAMPLES_PER_PROMPT = 16

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


def run_bench(n_rollouts: int, workdir: Path, repeats: int = 3, seed: int = 0, n_prompts: int = N_PROMPTS) -> dict:
    import duckdb

    from v0_data.store import PARQUET_OPTIONS, TrajectoryStore, _fsync_path

    prompts, runs = synthesise(n_rollouts, seed, n_prompts)
    n_total = sum(t.num_rows for t in runs.values())
    models = {r: f"bench-model-{r:02d}" for r in runs}

    # Ingest into the store.
    store_dir = workdir / "store"
    store = TrajectoryStore.open(store_dir, create=True)
    store.add_prompts(prompts, source="bench prompts")
    run_ids = {r: store.start_run(models[r], algorithm="grpo", run_id=f"bench-run-{r:02d}") for r in runs}
    t0 = time.perf_counter()
    for r, table in tqdm(runs.items(), desc="ingest (one append per run)", unit="run", disable=None):
        store.append_rollouts(run_ids[r], table, source=f"bench run {r}")
    t_ingest = time.perf_counter() - t0
    store.close()

    # Floor ingest: the same rows (with run_id / model columns) written to one Parquet file.
    full = pa.concat_tables(
        [
            t.add_column(0, "run_id", pa.repeat(pa.scalar(run_ids[r]), t.num_rows)).add_column(
                1, "model", pa.repeat(pa.scalar(models[r]), t.num_rows)
            )
            for r, t in runs.items()
        ]
    )
    floor_raw = workdir / "floor_unsorted.parquet"
    t0 = time.perf_counter()
    pq.write_table(full, floor_raw, **PARQUET_OPTIONS)
    _fsync_path(floor_raw)
    t_floor_ingest = time.perf_counter() - t0
    del full

    # Floor file for the aggregation: the store's rows in the store's order, one file.
    reader = TrajectoryStore.open(store_dir, read_only=True)
    same_rows = reader.query("SELECT * FROM rollouts")
    floor_file = workdir / "floor.parquet"
    pq.write_table(same_rows, floor_file, **PARQUET_OPTIONS)
    assert same_rows.num_rows == n_total
    del same_rows

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

    info = reader.info()
    rollout_bytes = sum(e.n_bytes for e in reader._manifest if e.tbl == "rollouts")
    reader.close()
    store_agg = statistics.median(t_store)
    floor_agg = statistics.median(t_floor)
    return {
        "n_rollouts": n_total,
        "n_prompts": n_prompts,
        "n_keys": N_RUNS * N_STEPS,
        "prompt_stats_rows": n_groups,
        "ingest_s": t_ingest,
        "ingest_rows_per_s": n_total / t_ingest,
        "floor_ingest_s": t_floor_ingest,
        "ingest_ratio_to_floor": t_ingest / t_floor_ingest,
        "bytes_per_rollout": rollout_bytes / n_total,
        "bytes_per_rollout_with_catalog": (rollout_bytes + info["catalog_bytes"]) / n_total,
        "floor_bytes_per_rollout": floor_file.stat().st_size / n_total,
        "bytes_ratio_to_floor": rollout_bytes / floor_file.stat().st_size,
        "rollout_files": info["files"]["rollouts"],
        "prompt_stats_s": store_agg,
        "floor_prompt_stats_s": floor_agg,
        "prompt_stats_ratio_to_floor": store_agg / floor_agg,
        "prompt_stats_s_all": t_store,
        "open_read_only_s": statistics.median(t_open),
        "floor_prompt_stats_s_all": t_floor,
        "duckdb_threads": int(con.execute("SELECT current_setting('threads')").fetchone()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
    }


def _table(result: dict) -> str:
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


@click.command("store")
@click.option("--n", "n_rollouts", type=int, default=10_000_000, show_default=True, help="rollouts to synthesise")
@click.option("--quick", is_flag=True, help="1 M rollouts instead of the default (overrides --n)")
@click.option("--repeats", type=int, default=3, show_default=True, help="timed repeats of the aggregation (median reported)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the synthetic data")
@click.option("--prompts", "n_prompts", type=int, default=N_PROMPTS, show_default=True, help="distinct prompts")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where to build the store and floor files (default: a temporary folder, deleted afterwards)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("bench_store.json"),
              show_default=True, help="JSON file for the results")
def store(
    n_rollouts: int, quick: bool, repeats: int, seed: int, n_prompts: int, workdir: Path | None, out_path: Path
) -> None:
    """Ingest rate, bytes per rollout and prompt_stats time of the trajectory store vs. one Parquet file."""
    if quick:
        n_rollouts = 1_000_000
    if n_rollouts < N_RUNS * N_STEPS * SAMPLES_PER_PROMPT:
        raise click.BadParameter(f"need at least {N_RUNS * N_STEPS * SAMPLES_PER_PROMPT} rollouts", param_hint="--n")
    if n_prompts < 1:
        raise click.BadParameter("must be >= 1", param_hint="--prompts")
    if repeats < 1:
        raise click.BadParameter("must be >= 1", param_hint="--repeats")
    keep = workdir is not None
    base = workdir if keep else Path(tempfile.mkdtemp(prefix="v05-bench-store-"))
    if keep and base.exists() and any(base.iterdir()):
        raise click.BadParameter(f"{base} is not empty; give an empty or new folder", param_hint="--workdir")
    base.mkdir(parents=True, exist_ok=True)
    try:
        click.echo(f"synthesising {n_rollouts:,} rollouts over {n_prompts:,} prompts and {N_RUNS * N_STEPS} (model, step) keys ...")
        result = run_bench(n_rollouts, base, repeats=repeats, seed=seed, n_prompts=n_prompts)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    click.echo(_table(result))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    click.echo(f"results written to {out_path}")
