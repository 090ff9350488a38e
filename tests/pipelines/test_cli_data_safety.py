"""Bad and hostile input to `v05 data ...` and `v05 sql` (issue 14): each case asserts the exit code, the
message, and that the store is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from v0_data.store import TrajectoryStore

RELEASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "v0_release"
QUESTIONS = {"What is 1+1?": "2", "What is 2*3?": "6", "What is 10-4?": "6"}

pytestmark = pytest.mark.slow  # end to end through the CLI: `make test` runs it, `make test-fast` leaves it out


def _run(*args, code: int | None = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if code is not None:
        assert result.exit_code == code, result.output
    return result


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> blake2b of every file under `root`, except the lock file (holds the writer's pid)."""
    return {
        p.relative_to(root).as_posix(): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".write.lock"
    }


@pytest.fixture
def store(tmp_path) -> Path:
    """A store with 3 prompts (dataset toy_math) and one ingested run."""
    verl = tmp_path / "train.parquet"
    pq.write_table(pa.table({
        "data_source": ["toy_math"] * 3,
        "prompt": [[{"role": "user", "content": q}] for q in QUESTIONS],
        "reward_model": [{"style": "rule", "ground_truth": a} for a in QUESTIONS.values()],
    }), verl)
    root = tmp_path / "store"
    _run("data", "import", verl, "--source", "parquet", "--store", root)
    rollouts = tmp_path / "gen.parquet"
    pq.write_table(pa.table({"model": ["m"] * 3, "step": [0] * 3, "dataset": ["toy_math"] * 3,
                             "prompt": list(QUESTIONS), "reward": [1, -1, 1]}), rollouts)
    _run("data", "ingest-rollouts", rollouts, "--store", root)
    return root


def _committed_part(root: Path) -> Path:
    with TrajectoryStore.open(root, read_only=True) as s:
        return root / next(e.path for e in s.manifest() if e.tbl == "rollouts")


# ---------------------------------------------------------------------------------------------
# v05 sql


@pytest.mark.parametrize("template", [
    "EXPLAIN ANALYZE COPY (SELECT 1 AS reward) TO '{part}' (FORMAT parquet)",  # the attack
    "EXPLAIN ANALYZE COPY (SELECT 1 AS reward) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/*')",
    "SELECT 1; COPY (SELECT 1) TO '{out}'",
    "ATTACH '{out}' AS x",
    "SET enable_external_access = true",
    "INSTALL httpfs",
    "PRAGMA threads = 1",
])
def test_sql_refuses_writes_and_outside_reads(store, tmp_path, template):
    statement = template.format(part=_committed_part(store), out=tmp_path / "out.csv")
    before = snapshot(tmp_path)
    out = _run("sql", statement, "--store", store, code=2).output
    assert "refused" in out, out
    assert snapshot(tmp_path) == before


def test_sql_outputs_valid_json_csv_of_nested_columns(store):
    out = _run("sql", "SELECT 'nan'::DOUBLE AS a, 'inf'::DOUBLE AS b, 1.5 AS c", "--store", store, "--format", "json").output
    assert json.loads(out) == [{"a": None, "b": None, "c": 1.5}]
    out = _run("sql", "SELECT [1, 2] AS xs, {'k': 'v'} AS s, 3 AS n", "--store", store, "--format", "csv").output
    assert out.splitlines() == ['"xs","s","n"', '"[1, 2]","{""k"": ""v""}",3']
    _run("sql", "SELECT 1", "--store", store, "--max-rows", "-1", code=2)


def test_sql_and_writers_name_a_missing_file_and_the_repair(store, tmp_path):
    part = _committed_part(store)
    part.unlink()
    out = _run("sql", "SELECT count(*) FROM rollouts", "--store", store, code=2).output
    assert f"{part.relative_to(store)}" in out and "but the file is missing" in out and "v05 data repair" in out
    rollouts = tmp_path / "more.parquet"
    pq.write_table(pa.table({"model": ["m2"], "step": [1], "dataset": ["toy_math"], "prompt": ["What is 1+1?"],
                             "reward": [1]}), rollouts)
    before = snapshot(store)
    out = _run("data", "ingest-rollouts", rollouts, "--store", store, code=2).output
    assert "but the file is missing" in out and "v05 data repair" in out
    assert snapshot(store) == before

    out = _run("data", "check", "--store", store, code=1).output
    assert "missing" in out and str(part.relative_to(store)) in out and "v05 data repair" in out
    out = _run("data", "repair", "--store", store).output
    assert f"dropped rollouts part {part.relative_to(store)}: 3 rows (missing" in out
    assert "ok: every committed file is intact" in _run("data", "check", "--store", store).output
    _run("data", "ingest-rollouts", rollouts, "--store", store)  # writable again


def test_corrupt_catalog_is_called_corrupt(store):
    (store / "catalog.duckdb").write_bytes(b"garbage" * 1000)
    for args in (("sql", "SELECT 1"), ("data", "info"), ("data", "check")):
        out = _run(*args, "--store", store, code=2).output
        assert "is corrupt" in out and "another process" not in out


# ---------------------------------------------------------------------------------------------
# data import: identity of a release


def _release_copy(dest: Path, *, model_suffix: str = "") -> Path:
    dest.mkdir(parents=True)
    for name in ("prompt_dict.json", "README.md"):
        shutil.copy(RELEASE / name, dest / name)
    for name in ("context.jsonl", "train.jsonl"):
        lines = (RELEASE / name).read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        for row in rows:
            row["model"] += model_suffix
        (dest / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


@pytest.mark.slow
@pytest.mark.skipif(not RELEASE.is_dir(), reason=f"V0 release sample not found at {RELEASE}")
def test_import_refuses_another_release_under_the_same_name(tmp_path):
    a = _release_copy(tmp_path / "A" / "release")
    b = _release_copy(tmp_path / "B" / "release", model_suffix="-other")
    root = tmp_path / "store"
    assert "3,264 scores imported as 'v0_release-release'" in _run("data", "import", a, "--source", "v0_release",
                                                                   "--store", root).output
    before = snapshot(root)
    out = _run("data", "import", b, "--source", "v0_release", "--store", root, code=2).output
    assert f"from {a.resolve()} (3,264 rows)" in out and f"{b.resolve()} holds different scores" in out
    assert "--replace" in out and "--name" in out and "nothing was imported" in out
    assert snapshot(root) == before
    # The same content from another folder is the same release: nothing changes.
    c = _release_copy(tmp_path / "C" / "release")
    assert "unchanged (same content already imported)" in _run("data", "import", c, "--source", "v0_release",
                                                               "--store", root).output
    assert snapshot(root) == before
    # --replace replaces; --name keeps both.
    _run("data", "import", b, "--source", "v0_release", "--store", root, "--replace")
    got = json.loads(_run("sql", "SELECT count(*) AS n, count_if(model LIKE '%-other') AS b FROM scores", "--store", root,
                          "--format", "json").output)
    assert got == [{"n": 3264, "b": 3264}]  # only B's rows
    _run("data", "import", a, "--source", "v0_release", "--store", root, "--name", "a-again")
    got = json.loads(_run("sql", "SELECT count(*) AS n, count_if(model LIKE '%-other') AS b FROM scores", "--store", root,
                          "--format", "json").output)
    assert got == [{"n": 6528, "b": 3264}]  # 3,264 of A + 3,264 of B


# ---------------------------------------------------------------------------------------------
# ingest-rollouts: all or nothing, refuse rather than guess


def _two_models(path: Path, rewards_b: list, model_b: str = "b") -> Path:
    questions = list(QUESTIONS)
    pq.write_table(pa.table({
        "model": ["a"] * 3 + [model_b] * 3, "step": [0] * 6, "dataset": ["toy_math"] * 6,
        "prompt": questions * 2, "reward": [1, -1, 1] + rewards_b,
    }), path)
    return path


@pytest.mark.parametrize("rewards_b, model_b, message", [
    ([1, 0, 1], "b", r"rows of run 'ingest-b'.*row 1 column 'reward' is 0, not -1 or \+1"),
    ([1, 1, 1], "", r"row 3 column 'model' is empty"),
    ([1, 1, 1], "  ", r"row 3 column 'model' is empty"),
])
def test_ingest_is_all_or_nothing(store, tmp_path, rewards_b, model_b, message):
    import re

    dump = _two_models(tmp_path / "two.parquet", rewards_b, model_b)
    before = snapshot(store)
    out = _run("data", "ingest-rollouts", dump, "--store", store, code=2).output
    assert re.search(message, out, re.S), out
    assert snapshot(store) == before


def test_ingest_refuses_nan(store, tmp_path):
    dump = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"model": ["m"] * 2, "step": [0, 0], "dataset": ["toy_math"] * 2,
                             "prompt": list(QUESTIONS)[:2], "reward": [0.5, float("nan")]}), dump)
    before = snapshot(store)
    out = _run("data", "ingest-rollouts", dump, "--store", store, "--threshold", "nan", code=2).output
    assert "--threshold" in out and "not a finite number" in out
    out = _run("data", "ingest-rollouts", dump, "--store", store, "--threshold", "0", code=2).output
    assert "scores.parquet: row 1 column 'reward' is NaN" in out
    _run("data", "ingest-rollouts", dump, "--store", store, "--part", "-1", code=2)
    assert snapshot(store) == before


def test_ingest_names_the_line_of_bad_json_lines(store, tmp_path):
    good = json.dumps({"model": "m", "step": 0, "dataset": "toy_math", "prompt": "What is 1+1?", "reward": 1})
    for body, message in (
        (good.encode() + b"\n" + b'{"model": "m\xff"}\n', "line 2 is not UTF-8 (byte 12 of the line is 0xff)"),
        (good.encode() + b"\n" + good.encode() + b"\n{oops\n", "line 3 is not JSON"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_bytes(body)
        before = snapshot(store)
        out = _run("data", "ingest-rollouts", path, "--store", store, code=2).output
        assert f"bad.jsonl: {message}" in out, out
        assert snapshot(store) == before


# ---------------------------------------------------------------------------------------------
# export-verl and info


def test_export_verl_refuses_prompts_without_answers(tmp_path):
    src = tmp_path / "noanswer.parquet"
    pq.write_table(pa.table({
        "data_source": ["toy_math"] * 2,
        "prompt": [[{"role": "user", "content": q}] for q in list(QUESTIONS)[:2]],
        "reward_model": [{"style": "rule", "ground_truth": "2"}, {"style": "rule", "ground_truth": ""}],
    }), src)
    out_file = tmp_path / "out.parquet"
    out = _run("data", "export-verl", src, "--source", "parquet", "--out", out_file, code=2).output
    assert "1 of 2 prompts have no answer (first: row 1" in out and "--allow-missing-answers" in out
    assert not out_file.exists()
    assert "2 prompts ->" in _run("data", "export-verl", src, "--source", "parquet", "--out", out_file,
                                  "--allow-missing-answers").output


def test_info_json_is_strict_json(store, tmp_path):
    empty = tmp_path / "empty"
    TrajectoryStore.open(empty).close()
    for root in (store, empty):
        out = _run("data", "info", "--store", root, "--format", "json").output
        summary = json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
        assert summary["root"] == str(root.resolve())
    assert json.loads(_run("data", "info", "--store", empty, "--json").output)["bytes_per_rollout"] is None
