"""The store's safety guarantees (issue 14): a SQL session that only reads, checksums, check / repair,
all-or-nothing ingest, re-import identity, corrupt catalogs and format-1 stores."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from v0_data.store import (
    CatalogCorruptError,
    PartConflictError,
    RunRollouts,
    StoreDamagedError,
    TrajectoryStore,
    file_checksum,
    table_digest,
)
from v0_data.tasks.base import Prompt

PROMPTS = [Prompt.new("arith", "train", f"{a}*{a}=", str(a * a)) for a in range(1, 5)]
P = [p.prompt_id for p in PROMPTS]


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> blake2b of every file under `root` (what must not change), except the lock file
    (each writer writes its pid there)."""
    return {
        p.relative_to(root).as_posix(): hashlib.blake2b(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".write.lock"
    }


def _filled(root: Path) -> Path:
    """A store with prompts, one run of rollouts over two steps and one score part."""
    with TrajectoryStore.open(root) as store:
        store.add_prompts(PROMPTS)
        run = store.start_run("tiny", run_id="tiny-run")
        store.append_rollouts(run, {"step": [0, 0, 1, 1], "prompt_id": [P[0], P[1], P[0], P[1]], "reward": [1, -1, 1, 1]})
        store.add_scores({"model": ["big"], "step": [3], "prompt_id": [P[2]], "n": [4], "score": [0.5]}, part="rel")
    return root


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """(workspace, store root): a filled store inside a workspace whose every file the tests watch."""
    work = tmp_path_factory.mktemp("sql")
    root = _filled(work / "store")
    pq.write_table(pa.table({"x": [1]}), root / "prompts" / "orphan.parquet")  # on disk, not committed
    (work / "outside").mkdir()
    (work / "outside" / "secret.csv").write_text("a,b\n1,2\n")
    return work, root


# ---------------------------------------------------------------------------------------------
# The SQL door: refused by DuckDB's settings alone (the session runs no string check).

WRITE_STATEMENTS = [
    "COPY (SELECT 42 AS reward) TO '{part}' (FORMAT parquet)",
    "COPY (SELECT 42 AS reward) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",  # allowed_paths would let this through
    "COPY prompts TO '{out}/x.csv'",
    "COPY (SELECT 1) TO '{out}/y.parquet' (FORMAT parquet, USE_TMP_FILE false)",
    "EXPORT DATABASE '{out}/export'",
    "ATTACH '{out}/x.duckdb' AS x",
    "ATTACH ':memory:' AS m",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{out}/evil.duckdb_extension'",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET lock_configuration",
    "SET threads = 1",
    "SET temp_directory = '{out}'",
    "PRAGMA enable_profiling",
    "PRAGMA profiling_output = '{out}/profile.json'",
    "CALL enable_logging(storage = 'file', storage_path = '{out}/log')",
    "CREATE TABLE t AS SELECT 1 AS x",
    "CREATE VIEW v AS SELECT 1 AS x",
    "CREATE MACRO m(x) AS x + 1",
    "INSERT INTO runs (run_id, model) VALUES ('x', 'y')",
    "UPDATE runs SET status = 'failed'",
    "DELETE FROM runs",
    "DELETE FROM prompts",
    "DROP VIEW prompts",
    "DROP TABLE runs",
    "ALTER TABLE runs ADD COLUMN z INTEGER",
    "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",  # refused: no secret types without extensions
]
# DuckDB cannot EXPLAIN these (a parse error), nor create an s3 secret without httpfs: refused, but not by the guard.
NOT_BY_THE_GUARD = ("EXPLAIN ANALYZE EXPORT", "EXPLAIN ANALYZE ATTACH", "CREATE PERSISTENT SECRET",
                    "EXPLAIN ANALYZE CREATE PERSISTENT SECRET")
READ_OUTSIDE = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM glob('{root}/**')",
    "SELECT * FROM read_csv('{out}/secret.csv')",
    "SELECT * FROM read_parquet('{root}/prompts/orphan.parquet')",
    "SELECT * FROM read_parquet('{part}')",  # a committed file, but not through the views
    "SELECT * FROM read_text('{part}/../../../outside/secret.csv')",
    "SELECT * FROM parquet_metadata('{part}')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM read_json_objects('/etc/passwd')",
]
ATTACKS = (
    WRITE_STATEMENTS
    + [f"EXPLAIN ANALYZE {s}" for s in WRITE_STATEMENTS if not s.startswith(("SET", "RESET", "PRAGMA", "CALL"))]
    + READ_OUTSIDE
    + [f"EXPLAIN ANALYZE {s}" for s in READ_OUTSIDE[:3]]
    + ["SELECT 1; COPY (SELECT 1) TO '{out}/multi.csv'", "SELECT count(*) FROM prompts; DROP VIEW prompts",
       "SELECT 1; SET enable_external_access = true; SELECT * FROM read_text('/etc/hostname')"]
)


@pytest.mark.parametrize("template", ATTACKS)
def test_sql_session_refuses_writes_and_outside_reads(sandbox, template):
    work, root = sandbox
    with TrajectoryStore.open(root, read_only=True) as store:
        part = str(root / next(e.path for e in store.manifest() if e.tbl == "rollouts"))
        statement = template.format(part=part, out=work / "outside", root=root)
        before = snapshot(work)
        expected = r"^SQL does not parse|^query failed: " if template.startswith(NOT_BY_THE_GUARD) else r"^refused: "
        with store.read_only_session() as session:
            with pytest.raises(ValueError, match=expected):
                session.execute(statement)
            # The session is still usable and still locked down afterwards.
            assert session.execute("SELECT count(*) AS n FROM prompts").column("n")[0].as_py() == 4
        assert snapshot(work) == before  # byte-identical store, no new file anywhere in the workspace


def test_sql_session_refusal_messages_say_why(sandbox):
    work, root = sandbox
    with TrajectoryStore.open(root, read_only=True) as store, store.read_only_session() as session:
        with pytest.raises(ValueError, match=r"refused: .* would read or write a file other than the store's"):
            session.execute(f"COPY prompts TO '{work}/outside/p.csv'")
        with pytest.raises(ValueError, match=r"refused: .* changes a setting; the settings of `v05 sql` are locked"):
            session.execute("SET threads = 1")
        with pytest.raises(ValueError, match=r"refused: .* would change the store's tables or views"):
            session.execute("DROP VIEW prompts")
        with pytest.raises(ValueError, match=r"query failed: .*no_such_column"):
            session.execute("SELECT no_such_column FROM prompts")


def test_sql_session_reads_everything_the_store_shows(sandbox):
    _, root = sandbox
    with TrajectoryStore.open(root, read_only=True) as store, store.read_only_session() as session:
        expected = store.prompt_stats().sort_by([("model", "ascending"), ("step", "ascending"), ("prompt_id", "ascending")])
        got = session.execute("SELECT * FROM prompt_stats ORDER BY model, step, prompt_id")
        assert got.to_pylist() == expected.to_pylist()
        assert session.execute("SELECT count(*) AS n FROM v0_pairs").column("n")[0].as_py() == 5  # 4 rollout keys + 1 score
        assert session.execute("SELECT run_id FROM runs").column(0).to_pylist() == ["tiny-run"]
        assert session.execute("SELECT count(*) FROM _manifest").column(0)[0].as_py() == 4  # prompts, 2 steps, scores
        assert session.execute("DESCRIBE rollouts").num_rows == 10
        assert session.execute("EXPLAIN ANALYZE SELECT count(*) FROM rollouts").num_rows >= 1
        assert session.execute("SUMMARIZE prompts").num_rows == 6
        # Scratch space in memory is allowed and vanishes with the session.
        assert session.execute("CREATE TEMP TABLE t AS SELECT 1 AS x; SELECT x FROM t").column(0)[0].as_py() == 1


# ---------------------------------------------------------------------------------------------
# Checksums, check and repair


def test_commit_records_checksums(tmp_path):
    root = _filled(tmp_path / "store")
    with TrajectoryStore.open(root, read_only=True) as store:
        for e in store.manifest():
            assert e.checksum == file_checksum(root / e.path)
        report = store.check()
        assert report.ok and report.files == report.checksummed == 4


def _damage(root: Path) -> dict[str, Path]:
    """Break a store three ways (and add an orphan); returns the damaged paths by kind."""
    with TrajectoryStore.open(root, read_only=True) as store:
        steps = sorted((e for e in store.manifest() if e.tbl == "rollouts"), key=lambda e: e.step)
        scores = next(e for e in store.manifest() if e.tbl == "scores")
    flipped, missing = root / steps[0].path, root / steps[1].path
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum sees it
    flipped.write_bytes(bytes(data))
    missing.unlink()
    truncated = root / scores.path
    truncated.write_bytes(truncated.read_bytes()[:30])
    orphan = root / "rollouts" / "stray.parquet"
    pq.write_table(pa.table({"x": [1]}), orphan)
    return {"checksum": flipped, "missing": missing, "size": truncated, "orphan": orphan}


def test_check_finds_every_kind_of_damage_and_repair_keeps_the_intact_files(tmp_path):
    root = _filled(tmp_path / "store")
    damaged = _damage(root)
    prompts_before = {p: d for p, d in snapshot(root).items() if p.startswith("prompts/")}
    with TrajectoryStore.open(root, read_only=True) as store:
        report = store.check()
    kinds = {p.kind: p.path for p in report.problems}
    assert set(kinds) == {"checksum", "missing", "size", "orphan"}
    for kind, path in damaged.items():
        assert kinds[kind] == path.relative_to(root).as_posix()

    with TrajectoryStore.open(root, clean_orphans=False) as store:
        repaired = store.repair()
    assert sorted(p.kind for p in repaired.dropped) == ["checksum", "missing", "size"]
    assert sorted(p.n_rows for p in repaired.dropped) == [1, 2, 2]  # score part 1 row, each step 2 rows
    quarantine = Path(repaired.quarantine_dir)
    for kind in ("checksum", "size", "orphan"):  # moved, not deleted
        assert (quarantine / damaged[kind].relative_to(root)).is_file() and not damaged[kind].exists()
    with TrajectoryStore.open(root, read_only=True) as store:
        assert store.check().ok
        assert store.info()["rollouts"] == 0 and store.info()["scores"] == 0 and store.info()["prompts"] == 4
    assert {p: d for p, d in snapshot(root).items() if p.startswith("prompts/")} == prompts_before
    # The store is writable again.
    with TrajectoryStore.open(root) as store:
        store.append_rollouts("tiny-run", {"step": [5], "prompt_id": [P[3]], "reward": [1]})


def test_writer_and_reader_name_the_missing_file_and_the_repair(tmp_path):
    root = _filled(tmp_path / "store")
    with TrajectoryStore.open(root, read_only=True) as store:
        prompt_part = next(e.path for e in store.manifest() if e.tbl == "prompts")
    (root / prompt_part).unlink()
    pattern = rf"lists {prompt_part} \(prompts, 4 rows\) but the file is missing; fix: run `v05 data check .* `v05 data repair"
    with TrajectoryStore.open(root) as store:
        with pytest.raises(StoreDamagedError, match=pattern):
            store.add_prompts([Prompt.new("arith", "train", "9*9=", "81")])
    with TrajectoryStore.open(root, read_only=True) as store:
        with pytest.raises(StoreDamagedError, match=pattern):
            store.prompt_stats()
        with pytest.raises(StoreDamagedError, match="but the file is missing"):
            store.read_only_session()


def test_garbage_catalog_is_reported_as_corrupt_not_locked(tmp_path):
    root = _filled(tmp_path / "store")
    (root / "catalog.duckdb").write_bytes(b"not a database " * 1000)
    for read_only in (True, False):
        with pytest.raises(CatalogCorruptError, match=r"catalog .*catalog.duckdb is corrupt .*not a valid DuckDB") as err:
            TrajectoryStore.open(root, read_only=read_only)
        assert "another process" not in str(err.value)


def test_read_only_folder_is_one_clear_message(tmp_path, monkeypatch):
    import os

    import v0_data.store as store_module

    root = _filled(tmp_path / "store")
    real_open = os.open

    def deny_lock(path, *args, **kwargs):  # what a read-only folder does (the tests run as root)
        if str(path).endswith(".write.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", deny_lock)
    with pytest.raises(ValueError, match=r"cannot write the store .*\.write\.lock cannot be opened \(Permission denied\); "
                                         r"fix: the folder is read-only"):
        TrajectoryStore.open(root)


# ---------------------------------------------------------------------------------------------
# Format-1 stores (no checksums) are read, checked by size, and migrated


def _as_format_1(root: Path) -> None:
    import duckdb

    con = duckdb.connect(str(root / "catalog.duckdb"))
    for column in ("checksum", "content", "origin"):
        con.execute(f"ALTER TABLE _manifest DROP COLUMN {column}")
    con.execute("UPDATE _meta SET value = '1' WHERE key = 'format_version'")
    con.close()


def test_format_1_store_is_read_checked_by_size_and_repair_records_checksums(tmp_path):
    root = _filled(tmp_path / "store")
    _as_format_1(root)
    with TrajectoryStore.open(root, read_only=True) as store:
        report = store.check()
        assert report.ok and report.checksummed == 0 and report.files == 4
        assert store.info()["rollouts"] == 4
    with TrajectoryStore.open(root, clean_orphans=False) as store:  # a writer migrates the catalog to format 2
        assert store.repair().checksums_recorded == 4
        # The same rows under the old part name are recognised (digest of the committed file): a no-op.
        assert store.add_scores({"model": ["big"], "step": [3], "prompt_id": [P[2]], "n": [4], "score": [0.5]},
                                part="rel") == 0
    with TrajectoryStore.open(root, read_only=True) as store:
        assert store.check().checksummed == 4


# ---------------------------------------------------------------------------------------------
# All-or-nothing ingest and score-part identity


def test_ingest_commits_nothing_when_any_run_is_bad(tmp_path):
    root = _filled(tmp_path / "store")
    before = snapshot(root)
    new = Prompt.new("arith", "train", "7*7=", "49")
    good = RunRollouts("a-run", "a", {"step": [0], "prompt_id": [new.prompt_id], "reward": [1]})
    bad = RunRollouts("b-run", "b", {"step": [0, 0], "prompt_id": [P[0], P[0]], "reward": [1, 0]})
    with TrajectoryStore.open(root) as store:
        with pytest.raises(ValueError, match=r"rows of run 'b-run'.*row 1 column 'reward' is 0, not -1 or \+1"):
            store.ingest(prompts=[new], runs=[good, bad])
    assert snapshot(root) == before
    with TrajectoryStore.open(root) as store:
        result = store.ingest(prompts=[new], runs=[good, RunRollouts("b-run", "b", {"step": [0], "prompt_id": [P[0]],
                                                                                     "reward": [-1]})])
        assert result.prompts == 1 and result.rollouts == {"a-run": 1, "b-run": 1}
        assert set(store.runs().column("run_id").to_pylist()) == {"tiny-run", "a-run", "b-run"}
        assert store.runs().filter(pa.compute.equal(store.runs().column("run_id"), "a-run")).column("status")[0].as_py() == "finished"


def test_run_rollouts_refuses_empty_model_and_bad_run_id():
    with pytest.raises(ValueError, match=r"run 'r': model '' is empty"):
        RunRollouts("r", "", {})
    with pytest.raises(ValueError, match=r"run_id '../x' is not allowed"):
        RunRollouts("../x", "m", {})


def test_score_part_identity(tmp_path):
    root = _filled(tmp_path / "store")
    same = {"model": ["big"], "step": [3], "prompt_id": [P[2]], "n": [4], "score": [0.5]}
    other = {**same, "score": [0.25]}
    with TrajectoryStore.open(root) as store:
        before = snapshot(root)
        assert store.add_scores(same, part="rel", origin="/b/release") == 0
        with pytest.raises(PartConflictError) as err:
            store.add_scores(other, part="rel", origin="/b/release")
        assert (err.value.old_rows, err.value.new_rows, err.value.new_origin) == (1, 1, "/b/release")
        assert snapshot(root) == before
        with pytest.raises(ValueError, match=r"row 0 column 'score' is NaN"):
            store.add_scores({**same, "score": [float("nan")]}, part="nan")
        assert store.add_scores(other, part="rel", origin="/b/release", replace=True) == 1
        assert store.query("SELECT score FROM scores").column(0).to_pylist() == [0.25]


def test_table_digest_ignores_chunking_but_not_values():
    a = pa.table({"x": [1, 2, 3], "s": ["a", "b", None]})
    chunked = pa.concat_tables([a.slice(0, 1), a.slice(1)])
    assert table_digest(a) == table_digest(chunked)
    assert table_digest(a) != table_digest(pa.table({"x": [1, 2, 4], "s": ["a", "b", None]}))
    assert table_digest(a) != table_digest(pa.table({"x": [1, 2, 3], "s": ["a", "b", ""]}))
