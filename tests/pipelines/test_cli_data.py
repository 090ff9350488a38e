"""CLI tests of `v05 data import / ingest-rollouts / info`, `v05 sql` and `v05 bench store` (click CliRunner)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from v0_data.store import TrajectoryStore
from v0_data.tasks.base import make_prompt_id

RELEASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "v0_release"
QUESTIONS = {"What is 1+1?": "2", "What is 2*3?": "6", "What is 10-4?": "6"}


def _run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result


@pytest.fixture
def verl_file(tmp_path) -> Path:
    """A verl RL parquet file (data_source, prompt chat, reward_model.ground_truth)."""
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.table(
            {
                "data_source": ["toy_math"] * 3,
                "prompt": [[{"role": "user", "content": q}] for q in QUESTIONS],
                "ability": ["math"] * 3,
                "reward_model": [{"style": "rule", "ground_truth": a} for a in QUESTIONS.values()],
            }
        ),
        path,
    )
    return path


def _rollouts_file(path: Path, rewards: list, **extra) -> Path:
    """Rollouts as a generation dump with prompt text: 2 steps x 3 questions x 2 samples = 12 rows."""
    questions = list(QUESTIONS)
    rows = {
        "model": ["qwen-tiny"] * 12,
        "step": [0] * 6 + [8] * 6,
        "data_source": ["toy_math"] * 12,
        "prompt": [questions[i // 2 % 3] for i in range(12)],
        "reward": rewards,
        "response": [f"answer {i}" for i in range(12)],
    }
    rows.update(extra)
    pq.write_table(pa.table(rows), path)
    return path


def test_import_parquet_source_is_idempotent(tmp_path, verl_file):
    store = tmp_path / "store"
    out = _run("data", "import", verl_file, "--source", "parquet", "--store", store).output
    assert "3 prompts read, 3 new" in out
    assert "0 new" in _run("data", "import", verl_file, "--source", "parquet", "--store", store).output
    result = _run("sql", "SELECT prompt_id, text, answer FROM prompts ORDER BY text", "--store", store, "--format", "json")
    rows = json.loads(result.output)
    assert [r["text"] for r in rows] == sorted(QUESTIONS)
    assert rows[0]["prompt_id"] == make_prompt_id("toy_math", rows[0]["text"])
    assert {r["text"]: r["answer"] for r in rows} == QUESTIONS


def test_ingest_rollouts_round_trip_idempotent(tmp_path, verl_file):
    store = tmp_path / "store"
    _run("data", "import", verl_file, "--source", "parquet", "--store", store)
    # 0/1 rewards; per (step, question) two samples.
    rewards = [1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 0, 1]
    dump = _rollouts_file(tmp_path / "gen.parquet", rewards)
    out = _run("data", "ingest-rollouts", dump, "--store", store, "--zero-one-rewards").output
    assert "12 rollouts ingested" in out
    _run("data", "ingest-rollouts", dump, "--store", store, "--zero-one-rewards")  # again: replaces, no duplicates
    result = _run("sql", "SELECT step, p.text, n, successes, score FROM prompt_stats JOIN prompts p USING (prompt_id) "
                  "ORDER BY step, p.text", "--store", store, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.output)))
    # step 0: '1+1' rewards (1, 1) -> 2 successes, score 1; '2*3' (0, 1) -> 1, score 0; '10-4' (0, 0) -> 0, score -1
    # step 8: '1+1' (1, 1) -> 2; '2*3' (1, 1) -> 2; '10-4' (0, 1) -> 1
    got = [(int(r["step"]), r["text"], int(r["n"]), int(r["successes"]), float(r["score"])) for r in rows]
    assert got == [
        (0, "What is 1+1?", 2, 2, 1.0), (0, "What is 10-4?", 2, 0, -1.0), (0, "What is 2*3?", 2, 1, 0.0),
        (8, "What is 1+1?", 2, 2, 1.0), (8, "What is 10-4?", 2, 1, 0.0), (8, "What is 2*3?", 2, 2, 1.0),
    ]
    info = _run("data", "info", "--store", store).output
    assert "rollouts 12" in info and "qwen-tiny" in info
    summary = json.loads(_run("data", "info", "--store", store, "--json").output)
    assert summary["per_model_step"] == [
        {"model": "qwen-tiny", "step": 0, "rollouts": 6, "scores": 0},
        {"model": "qwen-tiny", "step": 8, "rollouts": 6, "scores": 0},
    ]
    runs = json.loads(_run("sql", "SELECT run_id, status, algorithm FROM runs", "--store", store, "--format", "json").output)
    assert runs == [{"run_id": "ingest-qwen-tiny", "status": "finished", "algorithm": "external"}]


def test_ingest_rollouts_add_prompts_and_rename(tmp_path):
    store = tmp_path / "store"
    dump = _rollouts_file(tmp_path / "gen.parquet", [1.0, -1.0] * 6)
    table = pq.read_table(dump).rename_columns(["model", "step", "data_source", "prompt", "score", "output"])
    pq.write_table(table, dump)
    out = _run("data", "ingest-rollouts", dump, "--store", store, "--add-prompts",
               "--rename", "score=reward", "--rename", "output=response").output
    assert "3 new prompts added" in out
    with TrajectoryStore.open(store, read_only=True) as s:
        assert s.info()["rollouts"] == 12
        assert s.query("SELECT count(*) AS n FROM rollouts WHERE response LIKE 'answer %'").column("n")[0].as_py() == 12


def test_ingest_rollouts_bad_input_messages(tmp_path, verl_file):
    store = tmp_path / "store"
    _run("data", "import", verl_file, "--source", "parquet", "--store", store)
    bad = _rollouts_file(tmp_path / "bad.parquet", [1, -1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    out = _run("data", "ingest-rollouts", bad, "--store", store, ok=False).output
    assert "bad.parquet: row 3 column 'reward' is 0, not -1 or +1" in out and "2*r-1" in out
    out = _run("data", "ingest-rollouts", bad, "--store", store, "--zero-one-rewards", ok=False).output
    assert "row 1 column 'reward' is -1, not 0 or 1" in out
    unknown = tmp_path / "unknown.parquet"
    pq.write_table(pa.table({"model": ["m"], "step": [0], "prompt_id": [42], "reward": [1]}), unknown)
    out = _run("data", "ingest-rollouts", unknown, "--store", store, ok=False).output
    assert "unknown.parquet: row 0 column 'prompt_id': 42 is not in the store's prompts" in out
    no_model = tmp_path / "nomodel.parquet"
    pq.write_table(pa.table({"step": [0], "prompt_id": [42], "reward": [1]}), no_model)
    out = _run("data", "ingest-rollouts", no_model, "--store", store, ok=False).output
    assert "missing column 'model'" in out and "--model" in out
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    out = _run("data", "ingest-rollouts", corrupt, "--store", store, ok=False).output
    assert "corrupt.parquet: not a readable parquet file" in out
    with TrajectoryStore.open(store, read_only=True) as s:
        assert s.info()["rollouts"] == 0


def test_sql_refuses_writes_and_formats(tmp_path, verl_file):
    store = tmp_path / "store"
    _run("data", "import", verl_file, "--source", "parquet", "--store", store)
    target = tmp_path / "out.csv"
    for statement in ("DELETE FROM prompts", f"COPY prompts TO '{target}'", "CREATE TABLE x AS SELECT 1"):
        out = _run("sql", statement, "--store", store, ok=False).output
        assert "refused" in out and "read-only" in out
    assert not target.exists()
    table = _run("sql", "SELECT count(*) AS n FROM prompts", "--store", store).output
    assert table.split() == ["n", "3"]
    out = _run("sql", "SELECT no_such_column FROM prompts", "--store", store, ok=False).output
    assert "query failed" in out and "no_such_column" in out
    out = _run("sql", "SELECT 1", "--store", tmp_path / "missing", ok=False).output
    assert "no trajectory store" in out


@pytest.mark.skipif(not RELEASE.is_dir(), reason=f"V0 release sample not found at {RELEASE}")
def test_import_v0_release(tmp_path):
    store = tmp_path / "store"
    out = _run("data", "import", RELEASE, "--source", "v0_release", "--store", store).output
    assert "3,264 scores imported" in out
    _run("data", "import", RELEASE, "--source", "v0_release", "--store", store)  # idempotent
    result = _run("sql", "SELECT split, count(*) AS n, count(DISTINCT model || step) AS keys FROM v0_pairs "
                  "GROUP BY split ORDER BY split", "--store", store, "--format", "json")
    # 2 models x 3 steps = 6 keys; 512 context rows and 32 train queries per key
    assert json.loads(result.output) == [{"split": "context", "n": 3072, "keys": 6}, {"split": "train", "n": 192, "keys": 6}]
    first = json.loads((RELEASE / "train.jsonl").read_text().splitlines()[0])
    texts = json.loads((RELEASE / "prompt_dict.json").read_text())
    pid = make_prompt_id(first["dataset"], texts[f"{first['dataset']}_{first['id']}"])
    got = json.loads(_run("sql", f"SELECT score, n FROM prompt_stats WHERE prompt_id = {pid} AND model = "
                              f"'{first['model']}' AND step = {first['step']}", "--store", store, "--format", "json").output)
    assert got == [{"score": first["score"], "n": 10}]


@pytest.mark.slow
def test_bench_store_smoke(tmp_path):
    out_json = tmp_path / "bench.json"
    out = _run("bench", "store", "--n", "3200", "--prompts", "50", "--repeats", "1", "--out", out_json).output
    assert "prompt_stats" in out and "ingest" in out
    result = json.loads(out_json.read_text())
    assert result["n_rollouts"] == 3200  # 200 keys x 1 prompt x 16 samples
    assert result["prompt_stats_rows"] == 200
    assert result["ingest_rows_per_s"] > 0 and result["bytes_per_rollout"] > 0
    assert result["prompt_stats_ratio_to_floor"] > 0


def test_ingest_verl_generation_dump(tmp_path):
    """verl's trainer.rollout_data_dir/<step>.jsonl: input, output, gts, score, step (one file per step)."""
    store = tmp_path / "store"
    for step, scores in ((3, [1.0, -1.0, 0.0, 1.0]), (6, [1.0, 1.0, 0.5, -1.0])):
        lines = [json.dumps({"input": f"user: q{i % 2}", "output": f"o{i}", "gts": "1", "score": sc, "step": step})
                 for i, sc in enumerate(scores)]
        (tmp_path / f"{step}.jsonl").write_text("\n".join(lines) + "\n")
        _run("data", "ingest-rollouts", tmp_path / f"{step}.jsonl", "--store", store, "--model", "qwen3-0.6b",
             "--dataset", "dapo", "--rename", "input=prompt", "--rename", "output=response", "--rename", "score=reward",
             "--threshold", "0", "--add-prompts")
    _run("data", "ingest-rollouts", tmp_path / "6.jsonl", "--store", store, "--model", "qwen3-0.6b", "--dataset", "dapo",
         "--rename", "input=prompt", "--rename", "output=response", "--rename", "score=reward", "--threshold", "0",
         "--add-prompts")  # again: replaces step 6
    rows = json.loads(_run("sql", "SELECT step, p.text, n, successes FROM prompt_stats JOIN prompts p USING (prompt_id) "
                                  "ORDER BY step, p.text", "--store", store, "--format", "json").output)
    # rows alternate q0, q1; score > 0 is a success. step 3: q0 (1.0, 0.0) -> 1 of 2; q1 (-1.0, 1.0) -> 1 of 2
    # step 6: q0 (1.0, 0.5) -> 2 of 2; q1 (1.0, -1.0) -> 1 of 2
    assert rows == [
        {"step": 3, "text": "user: q0", "n": 2, "successes": 1}, {"step": 3, "text": "user: q1", "n": 2, "successes": 1},
        {"step": 6, "text": "user: q0", "n": 2, "successes": 2}, {"step": 6, "text": "user: q1", "n": 2, "successes": 1},
    ]
    runs = json.loads(_run("sql", "SELECT run_id FROM runs", "--store", store, "--format", "json").output)
    assert runs == [{"run_id": "ingest-qwen3-0.6b"}]  # one run per model across the step files


def test_export_verl_arith_round_trip(tmp_path):
    """`v05 data export-verl` writes arith as verl parquet that the parquet source reads back unchanged."""
    from click.testing import CliRunner

    from pipelines.cli import main
    from v0_data.tasks import get_source

    out = tmp_path / "arith_train.parquet"
    res = CliRunner().invoke(main, ["data", "export-verl", "--source", "arith", "--split", "train", "--out", str(out)])
    assert res.exit_code == 0, res.output
    back = get_source("parquet")().load(str(out))
    orig = get_source("arith")().load(None, split="train")
    assert [p.prompt_id for p in back] == [p.prompt_id for p in orig]
    assert [p.answer for p in back] == [p.answer for p in orig]
    import pyarrow.parquet as pq

    extra = pq.read_table(out).column("extra_info").to_pylist()
    assert extra[0]["prompt_id"] == orig[0].prompt_id


def test_export_verl_empty_split_is_refused(tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main

    res = CliRunner().invoke(main, ["data", "export-verl", "--source", "arith", "--split", "nope",
                                    "--out", str(tmp_path / "x.parquet")])
    assert res.exit_code != 0


def test_export_verl_help_examples_work(tmp_path, verl_file):
    """The examples of `data export-verl --help`: an arith spec as PATH, a constructor option through --set."""
    out = _run("data", "export-verl", "n_prompts=20,seed=1", "--source", "arith", "--split", "train",
               "--out", tmp_path / "arith.parquet").output
    assert "20 prompts ->" in out
    out = _run("data", "export-verl", verl_file, "--source", "parquet", "--set", "batch_size=4096",
               "--out", tmp_path / "copy.parquet").output
    assert "3 prompts ->" in out
    out = _run("data", "export-verl", "--source", "arith", "--set", "n_prompts=2000", "--out", tmp_path / "x.parquet",
               ok=False).output
    assert "Invalid value for '--set'" in out or "Invalid value for --set" in out  # arith takes its spec as PATH
