"""Tests of the trajectory store (v0_data/store.py): round trips, idempotence, crashes, bad input, SQL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from v0_data.store import PartConflictError, StoreDamagedError, StoreLockedError, TrajectoryStore, check_sql
from v0_data.tasks.base import Prompt, make_prompt_id

RELEASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "v0_release"

PROMPTS = [Prompt.new("arith", "train", f"{a}+{a}=", str(2 * a), level=a % 3) for a in range(1, 6)]
P = [p.prompt_id for p in PROMPTS]


@pytest.fixture
def store(tmp_path):
    s = TrajectoryStore.open(tmp_path / "store")
    s.add_prompts(PROMPTS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One store for the tests that only read or whose input is refused (nothing gets written)."""
    s = TrajectoryStore.open(tmp_path_factory.mktemp("shared") / "store")
    s.add_prompts(PROMPTS)
    s.start_run("tiny-a", run_id="tiny-a-run")
    yield s
    s.close()


def _rollout_files(root: Path) -> list[Path]:
    return sorted((root / "rollouts").rglob("*.parquet"))


def _stats(store) -> dict[tuple, tuple]:
    t = store.prompt_stats().to_pylist()
    return {(r["model"], r["step"], r["prompt_id"]): (r["n"], r["successes"], r["score"]) for r in t}


# ---------------------------------------------------------------------------------------------
# Round trips


def test_prompts_round_trip_and_dedupe(store):
    back = store.query("SELECT * FROM prompts ORDER BY text").to_pylist()
    assert [r["text"] for r in back] == sorted(p.text for p in PROMPTS)
    first = next(r for r in back if r["text"] == "1+1=")
    assert first["prompt_id"] == make_prompt_id("arith", "1+1=")
    assert first["answer"] == "2" and first["split"] == "train"
    assert json.loads(first["meta"]) == {"level": 1}
    # Adding the same prompts again adds nothing; a table without ids gets them computed.
    assert store.add_prompts(PROMPTS) == 0
    assert store.add_prompts({"dataset": ["arith", "arith"], "split": ["test", "test"], "text": ["9+9=", "9+9="],
                              "answer": ["18", "18"]}) == 1
    assert store.query("SELECT count(*) AS n FROM prompts").column("n")[0].as_py() == 6


def test_rollouts_round_trip_from_dict_pandas_arrow(store):
    run = store.start_run("tiny-a", policy_path="/ckpt/a", algorithm="grpo", config={"lr": 1e-3})
    # step 0: prompt 0 gets rewards +1, -1, +1 -> n 3, successes 2, score (1 - 1 + 1) / 3 = 1/3
    store.append_rollouts(run, {"step": [0, 0, 0], "prompt_id": [P[0]] * 3, "reward": [1, -1, 1],
                                "response": ["2", "3", "2"]})
    # step 1 from pandas, prompt 1 all wrong -> n 2, successes 0, score -1
    store.append_rollouts(run, pd.DataFrame({"step": [1, 1], "prompt_id": [P[1]] * 2, "reward": [-1.0, -1.0],
                                             "sample_idx": [0, 1], "n_tokens": [4, 5]}))
    # step 2 from Arrow with float rewards that are exactly +-1
    store.append_rollouts(run, pa.table({"step": pa.array([2], pa.int32()), "prompt_id": [P[2]], "reward": [1.0],
                                         "finish_reason": ["stop"]}))
    stats = _stats(store)
    assert stats[("tiny-a", 0, P[0])] == (3, 2, pytest.approx(1 / 3))
    assert stats[("tiny-a", 1, P[1])] == (2, 0, -1.0)
    assert stats[("tiny-a", 2, P[2])] == (1, 1, 1.0)
    rows = store.query("SELECT * FROM rollouts WHERE step = 0 ORDER BY sample_idx").to_pylist()
    assert [r["sample_idx"] for r in rows] == [0, 1, 2]  # numbered in input order
    assert [r["response"] for r in rows] == ["2", "3", "2"]
    assert all(r["run_id"] == run and r["model"] == "tiny-a" for r in rows)
    assert rows[0]["created_at"] is not None
    types = dict(zip(store.query("SELECT * FROM rollouts").schema.names, store.query("SELECT * FROM rollouts").schema.types))
    assert types["reward"] == pa.int8() and types["prompt_id"] == pa.int64()
    store.finish_run(run)
    runs = store.query("SELECT * FROM runs").to_pylist()
    assert runs[0]["status"] == "finished" and json.loads(runs[0]["config"]) == {"lr": 0.001}
    # A reader in the same process sees the same data (no lock needed).
    with TrajectoryStore.open(store.root, read_only=True) as reader:
        assert _stats(reader) == stats


def test_pairs_and_scores_union(store):
    run = store.start_run("tiny-a")
    store.append_rollouts(run, {"step": [4] * 4, "prompt_id": [P[0]] * 4, "reward": [1, 1, 1, -1]})
    # imported means: n=10, score -0.6 -> successes 10 * (1 - 0.6) / 2 = 2
    store.add_scores({"model": ["big"], "step": [16], "prompt_id": [P[1]], "n": [10], "score": [-0.6]}, part="rel")
    pairs = store.pairs().to_pylist()
    assert [(r["model"], r["step"], r["n"], r["successes"]) for r in pairs] == [("big", 16, 10, 2), ("tiny-a", 4, 4, 3)]
    assert pairs[0]["text"] == PROMPTS[1].text and pairs[0]["success_rate"] == pytest.approx(0.2)
    assert pairs[1]["score"] == pytest.approx(0.5)  # (1 + 1 + 1 - 1) / 4
    assert [r["model"] for r in store.pairs(models=["tiny-a"]).to_pylist()] == ["tiny-a"]
    info = store.info()
    assert (info["prompts"], info["runs"], info["rollouts"], info["scores"]) == (5, 1, 4, 1)
    assert info["per_model_step"] == [
        {"model": "big", "step": 16, "rollouts": 0, "scores": 1},
        {"model": "tiny-a", "step": 4, "rollouts": 4, "scores": 0},
    ]
    # Re-adding other rows under the same part name needs replace=True; the same rows again are a no-op.
    other = {"model": ["big"], "step": [16], "prompt_id": [P[1]], "n": [10], "score": [0.2]}
    with pytest.raises(PartConflictError, match=r"score part 'rel' already holds other rows .*fix: pass replace=True"):
        store.add_scores(other, part="rel")
    assert _stats(store)[("big", 16, P[1])] == (10, 2, -0.6)  # unchanged
    store.add_scores(other, part="rel", replace=True)
    assert _stats(store)[("big", 16, P[1])] == (10, 6, 0.2)  # 10 * 1.2 / 2 = 6
    assert store.add_scores(other, part="rel") == 0  # same rows: nothing written


def test_multi_step_append_writes_one_file_per_step_and_sorts(store):
    run = store.start_run("tiny-a", run_id="r1")
    store.append_rollouts(run, {"step": [3, 1, 3, 1], "prompt_id": [P[1], P[0], P[0], P[0]], "reward": [1, -1, 1, 1],
                                "sample_idx": [0, 1, 0, 0]})
    files = _rollout_files(store.root)
    assert [f.name.split("-part")[0] for f in files] == ["step-000000001", "step-000000003"]
    step1 = pq.read_table(files[0]).to_pylist()
    assert [r["sample_idx"] for r in step1] == [0, 1]  # sorted by (prompt_id, sample_idx)
    step3 = pq.read_table(files[1]).column("prompt_id").to_pylist()
    assert step3 == sorted([P[1], P[0]])


def test_store_directory_can_move(store, tmp_path):
    run = store.start_run("tiny-a")
    store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [1]})
    store.close()
    moved = tmp_path / "moved"
    shutil.copytree(store.root, moved)
    shutil.rmtree(store.root)
    with TrajectoryStore.open(moved, read_only=True) as reader:
        assert reader.query("SELECT count(*) AS n FROM rollouts").column("n")[0].as_py() == 1
    with TrajectoryStore.open(moved) as writer:  # the writer refreshes the catalog's absolute paths
        writer.append_rollouts(run, {"step": [1], "prompt_id": [P[0]], "reward": [-1]})
        assert writer.info()["rollouts"] == 2


# ---------------------------------------------------------------------------------------------
# Idempotence and crashes


def test_reappend_same_step_and_part_replaces(store):
    run = store.start_run("tiny-a")
    data = {"step": [0, 0], "prompt_id": [P[0], P[0]], "reward": [1, -1]}
    store.append_rollouts(run, data)
    store.append_rollouts(run, data)  # a re-run of the same step
    assert _stats(store)[("tiny-a", 0, P[0])] == (2, 1, 0.0)
    assert len(_rollout_files(store.root)) == 1  # the replaced file was deleted
    store.append_rollouts(run, {"step": [0, 0], "prompt_id": [P[0], P[0]], "reward": [1, 1]})  # new values win
    assert _stats(store)[("tiny-a", 0, P[0])] == (2, 2, 1.0)
    store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [-1], "sample_idx": [2]}, part=1)
    assert _stats(store)[("tiny-a", 0, P[0])] == (3, 2, pytest.approx(1 / 3))  # (1 + 1 - 1) / 3


def test_crash_between_file_write_and_manifest(store, monkeypatch):
    run = store.start_run("tiny-a")
    store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [1]})

    def crash(self, entries):
        raise RuntimeError("simulated crash after rename, before the manifest row")

    monkeypatch.setattr(TrajectoryStore, "_commit", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.append_rollouts(run, {"step": [1, 1], "prompt_id": [P[1], P[1]], "reward": [1, -1]})
    monkeypatch.undo()
    orphans = [f for f in _rollout_files(store.root) if "step-000000001" in f.name]
    assert len(orphans) == 1  # the file reached its final name ...
    with TrajectoryStore.open(store.root, read_only=True) as reader:  # ... but no reader sees it
        assert _stats(reader) == {("tiny-a", 0, P[0]): (1, 1, 1.0)}
    # A half-written temporary file from a crash inside the write is ignored too.
    tmp = orphans[0].with_name(".step-000000002-part-0000-x.parquet.1234.tmp")
    tmp.write_bytes(b"PAR1 half written")
    with TrajectoryStore.open(store.root, read_only=True) as reader:
        assert reader.info()["rollouts"] == 1
    store.close()  # the crashed writer goes away
    with TrajectoryStore.open(store.root) as writer:  # the next writer cleans the orphans
        assert not orphans[0].exists() and not tmp.exists()
        writer.append_rollouts(run, {"step": [1, 1], "prompt_id": [P[1], P[1]], "reward": [1, -1]})  # retry
        writer.append_rollouts(run, {"step": [1, 1], "prompt_id": [P[1], P[1]], "reward": [1, -1]})  # and again
        assert _stats(writer) == {("tiny-a", 0, P[0]): (1, 1, 1.0), ("tiny-a", 1, P[1]): (2, 1, 0.0)}
        assert len(_rollout_files(writer.root)) == 2


def test_failed_transaction_removes_its_files(store, monkeypatch):
    run = store.start_run("tiny-a")
    store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [1]})
    before = _rollout_files(store.root)
    import v0_data.store as store_module

    def fail(*args, **kwargs):
        raise OSError("simulated: catalog write failed inside the transaction")

    monkeypatch.setattr(store_module, "_refresh_catalog_views", fail)
    with pytest.raises(OSError, match="simulated"):
        store.append_rollouts(run, {"step": [0, 1], "prompt_id": [P[1], P[1]], "reward": [1, 1]})
    monkeypatch.undo()
    assert _rollout_files(store.root) == before  # new files removed, the replaced one kept
    assert _stats(store) == {("tiny-a", 0, P[0]): (1, 1, 1.0)}
    with TrajectoryStore.open(store.root, read_only=True) as reader:
        assert _stats(reader) == {("tiny-a", 0, P[0]): (1, 1, 1.0)}


def test_crash_after_commit_before_deleting_replaced_file(store, monkeypatch):
    run = store.start_run("tiny-a")
    store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [1]})
    old = _rollout_files(store.root)
    import v0_data.store as store_module

    monkeypatch.setattr(store_module, "_unlink_quietly", lambda path: None)  # the process dies before unlinking
    store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [-1]})
    monkeypatch.undo()
    assert len(_rollout_files(store.root)) == 2  # old file still on disk, no longer listed
    assert _stats(store) == {("tiny-a", 0, P[0]): (1, 0, -1.0)}
    store.close()
    with TrajectoryStore.open(store.root) as writer:
        assert not old[0].exists()
        assert _stats(writer) == {("tiny-a", 0, P[0]): (1, 0, -1.0)}


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_one_writer_many_readers(store):
    with pytest.raises(StoreLockedError, match=r"being written by another process .*pid .*read_only=True"):
        TrajectoryStore.open(store.root)
    run = store.start_run("tiny-a")
    reader = TrajectoryStore.open(store.root, read_only=True)
    assert reader.info()["rollouts"] == 0
    store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [1]})
    assert reader.info()["rollouts"] == 1  # readers refresh from the manifest on every read
    with pytest.raises(ValueError, match="opened read_only"):
        reader.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [1]})
    reader.close()
    store.close()
    TrajectoryStore.open(store.root).close()  # the lock is free again


def test_other_format_version_refused(store):
    import duckdb

    store.close()
    con = duckdb.connect(str(store.root / "catalog.duckdb"))
    con.execute("UPDATE _meta SET value = '99' WHERE key = 'format_version'")
    con.close()
    for read_only in (False, True):
        with pytest.raises(ValueError, match=r"format version 99, this code reads versions 1 and 2; fix"):
            TrajectoryStore.open(store.root, read_only=read_only)


def test_open_missing_store_read_only(tmp_path):
    with pytest.raises(ValueError, match=r"no trajectory store at .*fix: create one"):
        TrajectoryStore.open(tmp_path / "nope", read_only=True)


# ---------------------------------------------------------------------------------------------
# Bad input: every message names the argument/file, the row and column, and the fix.


BAD_ROLLOUTS = [
    ({"step": [0], "prompt_id": [P[0]]}, r"my.parquet: missing column\(s\) \['reward'\].*fix: add them"),
    ({"step": [0, 0, 0], "prompt_id": [P[0]] * 3, "reward": [1, -1, 0]},
     r"my.parquet: row 2 column 'reward' is 0, not -1 or \+1; fix: .*2\*r-1"),
    ({"step": [0, 0], "prompt_id": [P[0]] * 2, "reward": [1.0, 0.5]},
     r"my.parquet: row 1 column 'reward': value 0.5 does not fit int8.*fix: rewards must be -1 or \+1"),
    ({"step": [0, 0], "prompt_id": [P[0]] * 2, "reward": [1, 300]}, r"row 1 column 'reward': value 300 does not fit int8"),
    ({"step": [0], "prompt_id": [str(P[0])], "reward": [1]},
     r"my.parquet: column 'prompt_id' has type string, expected int64; fix: use v0_data.tasks.make_prompt_id"),
    ({"step": [0], "prompt_id": [float(P[0])], "reward": [1]}, r"column 'prompt_id' has type double, expected int64"),
    ({"step": ["zero"], "prompt_id": [P[0]], "reward": [1]}, r"column 'step' has type string, expected int64"),
    ({"step": [0, 0], "prompt_id": [P[0], 12345], "reward": [1, 1]},
     r"my.parquet: row 1 column 'prompt_id': 12345 is not in the store's prompts; fix: add the prompts first"),
    ({"step": [0, 0], "prompt_id": [P[0]] * 2, "reward": [1, None]}, r"my.parquet: row 1 column 'reward' is null; fix:"),
    ({"step": [0, -3], "prompt_id": [P[0]] * 2, "reward": [1, 1]}, r"row 1 column 'step' is -3, negative; fix: give values >= 0"),
    ({"step": [0, 0, 0], "prompt_id": [P[0], P[1], P[0]], "reward": [1, 1, 1], "sample_idx": [0, 0, 0]},
     r"rows 0 and 2 repeat \(step, prompt_id, sample_idx\).*fix: number the samples"),
    ({"step": [0], "prompt_id": [P[0]], "reward": [1], "model": ["other"]},
     r"row 0 column 'model' is 'other' but the rows are appended to run .* of model 'tiny-a'; fix: split"),
    ({"step": [0, 0], "prompt_id": [P[0]] * 2, "reward": [1]}, r"my.parquet: columns have different lengths"),
]


@pytest.mark.parametrize("data, message", BAD_ROLLOUTS)
def test_bad_rollouts_refused(shared_store, data, message):
    with pytest.raises(ValueError, match=message):
        shared_store.append_rollouts("tiny-a-run", data, source="my.parquet")
    assert shared_store.info()["rollouts"] == 0 and _rollout_files(shared_store.root) == []


def test_bad_rollout_arguments(store):
    with pytest.raises(ValueError, match=r"unknown run_id 'nope'.*fix: create it with start_run"):
        store.append_rollouts("nope", {"step": [0], "prompt_id": [P[0]], "reward": [1]})
    run = store.start_run("tiny-a")
    with pytest.raises(ValueError, match="expected a pyarrow.Table, a pandas.DataFrame or a dict of lists"):
        store.append_rollouts(run, [1, 2, 3])
    with pytest.raises(ValueError, match="part must be an integer >= 0"):
        store.append_rollouts(run, {"step": [0], "prompt_id": [P[0]], "reward": [1]}, part=-1)
    with pytest.raises(ValueError, match=r"run_id 'tiny-a' already exists for model 'tiny-a', not 'b'"):
        store.start_run("b", run_id="tiny-a") if store.start_run("tiny-a", run_id="tiny-a") else None
    with pytest.raises(ValueError, match=r"run_id 'a/b' is not allowed; fix"):
        store.start_run("m", run_id="a/b")
    with pytest.raises(ValueError, match=r"status 'done' unknown; fix: use one of"):
        store.finish_run(run, "done")


def test_bad_prompts_refused(store):
    with pytest.raises(ValueError, match=r"p.jsonl: row 1 column 'prompt_id' is 7, but make_prompt_id\(dataset, text\)"):
        store.add_prompts({"prompt_id": [make_prompt_id("a", "x"), 7], "dataset": ["a", "a"], "split": ["train"] * 2,
                           "text": ["x", "y"]}, source="p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl: row 0 .*prompt_id .* is already in the store with another"):
        store.add_prompts([Prompt.new("arith", "train", "1+1=", "3")], source="p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl: row 1 column 'text' is empty; fix"):
        store.add_prompts({"dataset": ["a", "a"], "split": ["train"] * 2, "text": ["x", ""]}, source="p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl: missing column\(s\) \['split'\]"):
        store.add_prompts({"dataset": ["a"], "text": ["x"]}, source="p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl: row 0 column 'meta' is not valid JSON"):
        store.add_prompts({"dataset": ["a"], "split": ["t"], "text": ["x"], "meta": ["{oops"]}, source="p.jsonl")
    with pytest.raises(ValueError, match=r"rows 0 and 1 have the same \(dataset, text\) but different answers"):
        store.add_prompts({"dataset": ["a", "a"], "split": ["t", "t"], "text": ["x", "x"], "answer": ["1", "2"]})
    assert store.info()["prompts"] == 5


def test_bad_scores_refused(store):
    good = {"model": ["m"], "step": [1], "prompt_id": [P[0]], "n": [10], "score": [0.2]}
    with pytest.raises(ValueError, match=r"s.jsonl: row 0 column 'score' is 1.5, outside \[-1, 1\]; fix"):
        store.add_scores({**good, "score": [1.5]}, source="s.jsonl")
    with pytest.raises(ValueError, match=r"s.jsonl: row 0 column 'n' is 0; fix"):
        store.add_scores({**good, "n": [0]}, source="s.jsonl")
    with pytest.raises(ValueError, match=r"rows 0 and 1 repeat \(model, step, prompt_id\)"):
        store.add_scores({k: v * 2 for k, v in good.items()}, source="s.jsonl")
    with pytest.raises(ValueError, match=r"row 0 column 'prompt_id': 99 is not in the store's prompts"):
        store.add_scores({**good, "prompt_id": [99]}, source="s.jsonl")
    store.add_scores(good, part="a")
    with pytest.raises(ValueError, match=r"row 0: .* already has scores part in the store; fix"):
        store.add_scores(good, part="b")
    run = store.start_run("m")
    store.append_rollouts(run, {"step": [2], "prompt_id": [P[0]], "reward": [1]})
    with pytest.raises(ValueError, match=r"row 0: .* already has rollouts in the store"):
        store.add_scores({**good, "step": [2]}, part="c")
    # ... and the other way round: rollouts for a scored (model, step, prompt)
    with pytest.raises(ValueError, match=r"row 1: model 'm' step 1 prompt_id .* already has imported scores in the store; fix"):
        store.append_rollouts(run, {"step": [1, 1], "prompt_id": [P[1], P[0]], "reward": [1, 1]})
    store.append_rollouts(run, {"step": [1], "prompt_id": [P[1]], "reward": [1]})  # another prompt is fine


def test_corrupt_committed_file_is_reported(store):
    run = store.start_run("tiny-a")
    store.append_rollouts(run, {"step": [0, 0], "prompt_id": [P[0], P[1]], "reward": [1, -1]})
    (path,) = _rollout_files(store.root)
    path.write_bytes(path.read_bytes()[:40])  # truncated by a disk fault
    assert any("bytes on disk" in p for p in store.verify())
    with pytest.raises(StoreDamagedError, match=r"damaged committed file .*No magic bytes.*step-0+-part.*fix: run "
                       r"`v05 data check --store .*` .* `v05 data repair --store"):
        store.prompt_stats()


# ---------------------------------------------------------------------------------------------
# SQL


@pytest.mark.parametrize(
    "statement",
    ["INSERT INTO runs VALUES ('x')", "DELETE FROM prompts", "COPY prompts TO 'x.csv'", "ATTACH 'x.duckdb' AS x",
     "CREATE TABLE t AS SELECT 1", "SET threads = 1", "SELECT 1; DROP VIEW prompts", "INSTALL httpfs", "CHECKPOINT"],
)
def test_sql_refuses_writes(shared_store, statement):
    with pytest.raises(ValueError, match=r"refused: \w+ statement .* could write; .*only SELECT .* Fix:"):
        shared_store.query(statement)
    with pytest.raises(ValueError, match="refused"):
        check_sql(statement)


def test_sql_allows_reads(shared_store):
    store = shared_store
    assert store.query("WITH x AS (SELECT count(*) AS n FROM prompts) SELECT n FROM x").column("n")[0].as_py() == 5
    assert store.query("DESCRIBE prompt_stats").num_rows == 6
    assert store.query("EXPLAIN SELECT * FROM v0_pairs").num_rows >= 1
    assert store.query("FROM prompts SELECT text WHERE prompt_id = $1", params=[P[0]]).column(0)[0].as_py() == "1+1="


# ---------------------------------------------------------------------------------------------
# The V0 release


@pytest.mark.skipif(not RELEASE.is_dir(), reason=f"V0 release sample not found at {RELEASE}")
def test_v0_release_import_gives_source_scores(tmp_path):
    from v0_data.tasks.v0_release import load_release

    release = load_release(RELEASE)
    with TrajectoryStore.open(tmp_path / "store") as store:
        store.add_prompts(release.prompts, source=str(RELEASE))
        store.add_scores(release.scores, part="v0_release", source=str(RELEASE))
        stats = store.query("SELECT split, count(*) AS n FROM v0_pairs GROUP BY split ORDER BY split").to_pylist()
        assert stats == [{"split": "context", "n": 3072}, {"split": "train", "n": 192}]  # 3,072 + 192 = 3,264
        got = {(r["model"], r["step"], r["prompt_id"]): (r["score"], r["n"], r["successes"])
               for r in store.prompt_stats().to_pylist()}
    # Independent reading of the source files.
    texts = json.loads((RELEASE / "prompt_dict.json").read_text())
    expected = {}
    for name in ("context.jsonl", "train.jsonl"):
        for line in (RELEASE / name).read_text().splitlines():
            row = json.loads(line)
            pid = make_prompt_id(row["dataset"], texts[f"{row['dataset']}_{row['id']}"])
            expected[(row["model"], row["step"], pid)] = row["score"]
    assert len(got) == len(expected) == 3264
    for key, score in expected.items():
        assert got[key][0] == score and got[key][1] == 10
        assert got[key][2] == round(10 * (1 + score) / 2)  # e.g. score -0.8 -> 1 success of 10


# ---------------------------------------------------------------------------------------------
# Row layout (group_order): properties checked row by row over random and generation-order inputs


@pytest.mark.parametrize("seed", range(4))
def test_group_order_properties(seed):
    import numpy as np

    from v0_data.store import group_order

    rng = np.random.default_rng(seed)
    for trial in range(300):
        if trial % 2:  # generation order: runs of one prompt, steps ascending or shuffled runs
            k = int(rng.integers(1, 6))
            steps, pids, reps = np.sort(rng.integers(0, 3, k)), rng.permutation(10)[:k], rng.integers(1, 5, k)
            if trial % 4 == 1:
                perm = rng.permutation(k)
                steps, pids, reps = steps[perm], pids[perm], reps[perm]
            step, pid = np.repeat(steps, reps), np.repeat(pids, reps)
            sidx = np.concatenate([np.arange(r) for r in reps])
        else:  # arbitrary rows, duplicates possible
            n = int(rng.integers(1, 30))
            step, pid, sidx = rng.integers(0, 3, n), rng.integers(-3, 3, n), rng.integers(0, 4, n)
        given = sidx if trial % 3 else None
        order, numbered, dup = group_order(step, pid, given)
        out = list(range(len(step))) if order is None else order.tolist()
        triples = list(zip(step.tolist(), pid.tolist(), sidx.tolist()))
        if given is not None and len(set(triples)) < len(triples):
            assert dup is not None and triples[dup[0]] == triples[dup[1]] and dup[0] < dup[1]
            continue
        assert dup is None
        if given is None:
            # groups in (step, prompt_id) order... unless the input was already grouped with steps ascending
            keys = [(step[r], pid[r]) for r in out]
            assert all(keys[i] != keys[i + 1] or out[i] < out[i + 1] for i in range(len(out) - 1))
            assert sorted(out) == list(range(len(step))) and [k[0] for k in keys] == sorted(k[0] for k in keys)
            firsts = {}
            for i, key in enumerate(keys):
                firsts.setdefault(key, i)
                assert numbered[i] == i - firsts[key]  # 0, 1, ... within each (step, prompt) in input order
            assert len({k for k in keys}) == len([i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]])
        else:
            keys = [triples[r] for r in out]
            assert sorted(out) == list(range(len(step)))  # a permutation: no row lost or repeated
            # same (step, prompt) rows contiguous with sample_idx ascending, steps ascending
            assert [k[0] for k in keys] == sorted(k[0] for k in keys)
            groups = [k[:2] for k in keys]
            assert len(set(groups)) == len([i for i in range(len(groups)) if i == 0 or groups[i] != groups[i - 1]])
            assert all(keys[i][2] < keys[i + 1][2] for i in range(len(keys) - 1) if groups[i] == groups[i + 1])


_WRITER = """
import sys
from v0_data.store import TrajectoryStore
from v0_data.tasks.base import Prompt
root, mode = sys.argv[1], sys.argv[2]
if mode == "locked":
    try:
        TrajectoryStore.open(root)
    except Exception as err:
        print(type(err).__name__, err)
        sys.exit(3)
    sys.exit(0)
prompts = [Prompt.new("arith", "train", f"{a}+{a}=", str(2 * a), level=a % 3) for a in range(1, 6)]
if mode == "die":  # commit, write an orphan, then die without closing anything
    import os
    store = TrajectoryStore.open(root)
    run = store.start_run("w", run_id="w-run")
    store.append_rollouts(run, {"step": [0, 0], "prompt_id": [prompts[0].prompt_id] * 2, "reward": [1, -1]})
    store._commit = lambda entries: os._exit(0)  # killed between the file rename and the manifest row
    store.append_rollouts(run, {"step": [1], "prompt_id": [prompts[0].prompt_id], "reward": [1]})
with TrajectoryStore.open(root) as store:
    run = store.start_run("w", run_id="w-run")
    print("ready", flush=True)
    for i in range(40):  # re-appends of 5 steps: replaced files are deleted while the reader reads
        store.append_rollouts(run, {"step": [i % 5] * 10, "prompt_id": [p.prompt_id for p in prompts] * 2,
                                    "reward": [1, -1] * 5, "sample_idx": [0] * 5 + [1] * 5})
"""


def _subprocess(*args):
    import subprocess
    import sys

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-c", _WRITER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_second_writer_process_is_refused(store):
    proc = _subprocess(store.root, "locked")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    assert "StoreLockedError" in out and "being written by another process (pid" in out and "read_only=True" in out


@pytest.mark.slow
def test_reader_process_beside_writer_process(store):
    store.close()  # hand the write lock to the other process
    proc = _subprocess(store.root, "write")
    assert proc.stdout.readline().strip() == "ready"
    counts = []
    with TrajectoryStore.open(store.root, read_only=True) as reader:
        while proc.poll() is None:
            counts.append(reader.query("SELECT count(*) AS n FROM rollouts").column("n")[0].as_py())
        counts.append(reader.query("SELECT count(*) AS n FROM rollouts").column("n")[0].as_py())
    assert proc.wait() == 0, proc.stdout.read()
    assert all(c % 10 == 0 and c <= 50 for c in counts)  # whole parts only: 10 rows each, 5 steps at most
    assert counts[-1] == 50


@pytest.mark.slow
def test_killed_writer_process_loses_nothing_committed(store):
    store.close()
    proc = _subprocess(store.root, "die")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert len(_rollout_files(store.root)) == 2  # the committed part and the orphan
    with TrajectoryStore.open(store.root, read_only=True) as reader:  # no close, no checkpoint: still readable
        assert _stats(reader) == {("w", 0, P[0]): (2, 1, 0.0)}
    with TrajectoryStore.open(store.root) as writer:  # the lock died with the process; the orphan goes
        assert len(_rollout_files(writer.root)) == 1
        assert writer.query("SELECT status FROM runs").column(0).to_pylist() == ["running"]
