"""Task sources `parquet` (verl RL format) and `v0_release`: round trips, real data, refused bad input."""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from v0_data.tasks import SOURCES, arith, get_source, source_names
from v0_data.tasks.base import Prompt, make_prompt_id
from v0_data.tasks.parquet import ParquetSource, chat_to_text, read_verl_parquet, write_verl_parquet
from v0_data.tasks.protocol import TaskSource
from v0_data.tasks.v0_release import (
    DEFAULT_N,
    V0ReleaseSource,
    load_release,
    read_release_files,
    read_rows,
)

RELEASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "v0_release"
CHAT = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


# ---------------------------------------------------------------------------------------------------
# registry and protocol


def test_sources_registered_and_follow_the_protocol():
    names = source_names()
    assert "parquet" in names and "v0_release" in names
    for name in ("parquet", "v0_release"):
        cls = get_source(name)
        assert cls is SOURCES.get(name)
        src = cls()  # options all have defaults
        assert isinstance(src, TaskSource) and src.name == name


# ---------------------------------------------------------------------------------------------------
# parquet: verl RL format


def _verl_file(path: Path, rows: list[dict]) -> Path:
    """A file laid out like verl's examples/data_preprocess output."""
    table = pa.table(
        {
            "data_source": pa.array([r["data_source"] for r in rows], pa.string()),
            "prompt": pa.array([r["prompt"] for r in rows], CHAT),
            "ability": pa.array([r.get("ability", "math") for r in rows], pa.string()),
            "reward_model": pa.array([r["reward_model"] for r in rows]),
            "extra_info": pa.array([r["extra_info"] for r in rows]),
        }
    )
    pq.write_table(table, path)
    return path


def _gsm_row(i: int, question: str, answer: str, split: str = "train") -> dict:
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": question}],
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": i, "question": question},
    }


def test_parquet_write_read_round_trip(tmp_path):
    prompts = [
        Prompt.new("math_dapo", "train", "What is 1+1?", "2", level=1),
        Prompt.new("math_dapo", "train", r"Compute $\frac{1}{2}+\frac{1}{4}$.", r"\frac{3}{4}"),
        Prompt.new("aime24", "test", "Find the remainder of 2^10 divided by 7.", "2"),
    ]
    path = write_verl_parquet(prompts, tmp_path / "out" / "data.parquet")

    table = pq.read_table(path)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert table.schema.field("prompt").type == CHAT
    assert table.schema.field("reward_model").type == pa.struct([("style", pa.string()), ("ground_truth", pa.string())])
    first = table.slice(0, 1).to_pylist()[0]
    assert first["prompt"] == [{"role": "user", "content": "What is 1+1?"}]
    assert first["reward_model"] == {"style": "rule", "ground_truth": "2"}
    assert first["extra_info"]["prompt_id"] == prompts[0].prompt_id
    assert first["extra_info"]["index"] == 0 and first["extra_info"]["level"] == 1
    assert [r["index"] for r in table.column("extra_info").to_pylist()] == [0, 1, 2]
    assert not list(path.parent.glob(".*.tmp")), "the temporary file was renamed away"

    back = ParquetSource().load(path)
    assert [(p.prompt_id, p.dataset, p.split, p.text, p.answer) for p in back] == [
        (p.prompt_id, p.dataset, p.split, p.text, p.answer) for p in prompts
    ]
    assert back[0].meta["chat"] == [{"role": "user", "content": "What is 1+1?"}]
    assert back[0].meta["reward_style"] == "rule" and back[0].meta["ability"] == "math"
    # the id on disk equals the recomputed one: make_prompt_id(dataset, text)
    assert back[2].prompt_id == make_prompt_id("aime24", "Find the remainder of 2^10 divided by 7.")


def test_parquet_round_trip_of_arith_prompts(tmp_path):
    prompts = arith.ArithSource().load("n_prompts=12,seed=3", split="test")
    assert prompts
    back = get_source("parquet")().load(write_verl_parquet(prompts, tmp_path / "arith.parquet"))
    assert [(p.prompt_id, p.text, p.answer, p.split, p.dataset) for p in back] == [
        (p.prompt_id, p.text, p.answer, p.split, p.dataset) for p in prompts
    ]
    # per-prompt options reach verl's compute_score through extra_info
    assert all(b.meta["extra_info"]["answer_format"] == p.meta["answer_format"] for b, p in zip(back, prompts))


def test_parquet_system_prompt_instruction_and_chats(tmp_path):
    prompts = [Prompt.new("math", "train", "2+2?", "4")]
    path = write_verl_parquet(
        prompts, tmp_path / "x.parquet", system_prompt="Think step by step.", instruction="Box the answer."
    )
    (back,) = read_verl_parquet(path)
    assert back.meta["chat"] == [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "2+2?\n\nBox the answer."},
    ]
    assert back.text == "2+2?\n\nBox the answer."  # the user message; the system message stays in meta
    assert back.prompt_id == prompts[0].prompt_id  # extra_info.prompt_id wins over the changed text
    multi = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert chat_to_text(multi) == "user: a\n\nassistant: b\n\nuser: c"


def test_parquet_verl_example_file_splits_and_duplicates(tmp_path):
    rows = [
        _gsm_row(0, "Q one?", "1"),
        _gsm_row(1, "Q two?", "2", split="test"),
        _gsm_row(2, "Q one?", "1"),  # a repeat (DAPO-Math-17k repeats each problem): dropped
    ]
    path = _verl_file(tmp_path / "train.parquet", rows)
    got = read_verl_parquet(path)
    assert [p.text for p in got] == ["Q one?", "Q two?"]
    assert [p.split for p in got] == ["train", "test"]  # from extra_info.split
    assert got[0].prompt_id == make_prompt_id("openai/gsm8k", "Q one?")
    assert got[0].meta["extra_info"] == {"split": "train", "index": 0, "question": "Q one?"}
    assert [p.split for p in read_verl_parquet(path, split="val")] == ["val", "val"]  # a label for local files
    # repeats are found across Arrow batches too (one row per batch here)
    assert [p.prompt_id for p in ParquetSource(batch_size=1).load(path)] == [p.prompt_id for p in got]

    no_split = [dict(r, extra_info={"index": i}) for i, r in enumerate(rows[:2])]
    assert {p.split for p in read_verl_parquet(_verl_file(tmp_path / "test.parquet", no_split))} == {"test"}
    assert {p.split for p in read_verl_parquet(_verl_file(tmp_path / "dapo.parquet", no_split))} == {"train"}


def test_row_to_prompt_accepts_verl_batch_values():
    """verl's non-tensor batch holds numpy object arrays; the public row reader takes them as lists."""
    import numpy as np

    from v0_data.tasks.parquet import row_to_prompt

    chat = np.array([{"role": "user", "content": "What is 2+3?"}], dtype=object)
    row = {"data_source": "math_dapo", "prompt": chat, "reward_model": {"ground_truth": "5", "style": "rule"},
           "extra_info": {"index": np.int64(4), "prompt_id": 123}}
    p = row_to_prompt(row, "verl batch", 0)
    assert (p.prompt_id, p.text, p.answer, p.split) == (123, "What is 2+3?", "5", "train")
    assert p.meta["extra_info"]["index"] == 4 and type(p.meta["extra_info"]["index"]) is int
    del row["extra_info"]
    assert row_to_prompt(row, "verl batch", 0).prompt_id == make_prompt_id("math_dapo", "What is 2+3?")


def test_parquet_plain_string_prompts_are_one_user_message(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"data_source": ["d", "d", "d"], "prompt": ["x?", "y?", "x?"]}), path)
    got = read_verl_parquet(path)
    assert [(p.text, p.answer, p.meta["chat"]) for p in got] == [
        ("x?", None, [{"role": "user", "content": "x?"}]),
        ("y?", None, [{"role": "user", "content": "y?"}]),
    ]


def test_parquet_folder_glob_and_no_datasets_needed(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    _verl_file(d / "a.parquet", [_gsm_row(0, "A?", "1")])
    _verl_file(d / "b.parquet", [_gsm_row(0, "B?", "2")])
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    assert [p.text for p in ParquetSource().load(d)] == ["A?", "B?"]
    assert [p.text for p in ParquetSource().load(str(d / "b*.parquet"))] == ["B?"]
    with pytest.raises(ImportError, match="pip install datasets"):
        ParquetSource().load("hf:BytedTsinghua-SIA/DAPO-Math-17k")


def test_parquet_extra_info_that_does_not_fit_one_struct_is_kept_as_json(tmp_path):
    prompts = [
        Prompt(1, "m", "train", "a", "1", {"extra_info": {"tag": 5}}),
        Prompt(2, "m", "train", "b", "2", {"extra_info": {"tag": "five", "empty": {}}}),
    ]
    path = write_verl_parquet(prompts, tmp_path / "mixed.parquet")
    assert "source_extra_info" in pq.read_table(path).column("extra_info").type.names
    back = read_verl_parquet(path)
    assert back[0].meta["extra_info"]["tag"] == 5 and back[1].meta["extra_info"]["tag"] == "five"
    assert [p.prompt_id for p in back] == [1, 2]


def _bad_rows(kind: str) -> list[dict]:
    good = _gsm_row(0, "fine?", "1")
    if kind == "data_source":
        return [good, dict(good, data_source="")]
    if kind == "prompt":
        return [good, dict(good, prompt=[])]
    if kind == "conflict":
        return [good, _gsm_row(1, "fine?", "999")]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, must_contain",
    [
        ("data_source", ["row 1", "'data_source'", "Fix:"]),
        ("prompt", ["row 1", "'prompt'", "chat list", "Fix:"]),
        ("conflict", ["row 1", "ground_truth", "row 0", "Fix:"]),
    ],
)
def test_parquet_bad_rows_are_refused(tmp_path, kind, must_contain):
    path = tmp_path / f"{kind}.parquet"
    rows = _bad_rows(kind)
    if kind == "prompt":  # an empty chat list cannot be typed by the helper; write it directly
        table = pa.table(
            {
                "data_source": ["d", "d"],
                "prompt": pa.array([rows[0]["prompt"], []], CHAT),
                "reward_model": pa.array([r["reward_model"] for r in rows]),
            }
        )
        pq.write_table(table, path)
    else:
        _verl_file(path, rows)
    with pytest.raises(ValueError) as err:
        read_verl_parquet(path)
    msg = str(err.value)
    assert str(path) in msg
    for piece in must_contain:
        assert piece in msg, msg


def test_parquet_bad_files_are_refused(tmp_path):
    no_prompt = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"data_source": ["d"], "question": ["q"]}), no_prompt)
    with pytest.raises(ValueError, match=r"cols\.parquet: missing column\(s\) \['prompt'\].*Fix"):
        read_verl_parquet(no_prompt)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable parquet file.*Fix"):
        read_verl_parquet(junk)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        read_verl_parquet(tmp_path / "nothing_here.parquet")
    with pytest.raises(ValueError, match="no prompts"):
        write_verl_parquet([], tmp_path / "empty.parquet")


# ---------------------------------------------------------------------------------------------------
# v0_release


def _write_release(folder: Path, context: list, train: list, prompt_dict: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("context.jsonl", context), ("train.jsonl", train)):
        (folder / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    (folder / "prompt_dict.json").write_text(json.dumps(prompt_dict))
    return folder


def _row(pid, score, typ="context", model="m1", step=16, dataset="ds"):
    return {"id": pid, "score": score, "type": typ, "model": model, "step": step, "dataset": dataset}


TINY_DICT = {"ds_1": "one?", "ds_2": "two?", "ds_3": "three?"}


def test_v0_release_tiny_fixture(tmp_path):
    folder = _write_release(
        tmp_path / "rel",
        [_row(1, -1.0), _row(2, 0.6), _row(1, 0.2, step=64)],
        [_row(3, 1.0, typ="train_query")],
        TINY_DICT,
    )
    (folder / "test.jsonl").write_text(json.dumps(_row(99, 0.0)) + "\n")  # held out: never read by default
    data = load_release(folder)
    t = data.scores.to_pydict()
    assert data.scores.column_names == ["model", "step", "prompt_id", "n", "score", "type"]
    assert t["score"] == [-1.0, 0.6, 0.2, 1.0]
    assert t["step"] == [16, 16, 64, 16]
    assert t["n"] == [DEFAULT_N] * 4 == [10] * 4
    assert t["type"] == ["context", "context", "context", "train_query"]
    assert t["prompt_id"] == [make_prompt_id("ds", TINY_DICT[k]) for k in ("ds_1", "ds_2", "ds_1", "ds_3")]
    assert [(p.text, p.split, p.answer, p.meta) for p in data.prompts] == [
        ("one?", "context", None, {"source_key": "ds_1"}),
        ("two?", "context", None, {"source_key": "ds_2"}),
        ("three?", "train", None, {"source_key": "ds_3"}),
    ]
    assert [(r.file.endswith("train.jsonl"), r.line) for r in data.rows][-1] == (True, 1)

    src = get_source("v0_release")()
    assert [p.text for p in src.load(folder, split="train")] == ["three?"]
    with pytest.raises(ValueError, match="splits present: context, train"):
        src.load(folder, split="validation")
    assert V0ReleaseSource(n=5).load_scores(folder).column("n").to_pylist() == [5] * 4  # 0.6 = 2*4/5 - 1: on grid


def test_v0_release_generic_context_and_query_files(tmp_path):
    folder = _write_release(tmp_path / "rel", [_row(1, 0.2), _row(2, -0.4)], [], TINY_DICT)
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": 3, "type": "query", "model": "m1", "step": 16, "dataset": "ds"}) + "\n")
    ctx = read_release_files([folder / "context.jsonl"], folder / "prompt_dict.json")
    assert ctx.scores.num_rows == 2
    q = read_rows(queries, require_score=False)
    assert len(q) == 1 and math.isnan(q[0].score) and q[0].key == "ds_3"
    assert q[0].raw == {"id": 3, "type": "query", "model": "m1", "step": 16, "dataset": "ds"}
    qdata = read_release_files([queries], folder / "prompt_dict.json", require_score=False)
    assert qdata.prompts[0].text == "three?" and qdata.prompts[0].split == "query"
    with pytest.raises(ValueError, match=r"queries\.jsonl: line 1: field 'score': missing"):
        read_rows(queries)


BAD_LINES = [
    ('{"id": 1, "score": 0.2,', "(row)", "malformed JSON"),
    ("[1, 2]", "'(row)'", "expected a JSON object"),
    (json.dumps({k: v for k, v in _row(1, 0.2).items() if k != "model"}), "'model'", "missing"),
    (json.dumps({k: v for k, v in _row(1, 0.2).items() if k != "type"}), "'type'", "missing"),
    (json.dumps(_row(1, 1.5)), "'score'", "outside [-1, 1]"),
    (json.dumps(_row(1, -1.2)), "'score'", "outside [-1, 1]"),
    (json.dumps(_row(1, "0.2")), "'score'", "expected a number"),
    (json.dumps(_row(1, 0.35)), "'score'", "not a mean of n=10"),  # 10 * 1.35 / 2 = 6.75 successes
    (json.dumps(_row(1, 0.2, step=-1)), "'step'", "negative"),
    (json.dumps(_row(1, 0.2, step="16")), "'step'", "expected an integer"),
    (json.dumps(_row(True, 0.2)), "'id'", "expected an integer or a non-empty string"),
    (json.dumps(_row(1, 0.2, model="")), "'model'", "non-empty string"),
    (json.dumps(_row(7, 0.2)), "'id'", "'ds_7'"),  # key not in the prompt dict
    (json.dumps(_row(1, 0.4)), "'id'", "already measured at"),  # same (m1, 16, ds_1) as line 1
]


@pytest.mark.parametrize("line, fieldname, problem", BAD_LINES, ids=[b[2] + " " + b[1] for b in BAD_LINES])
def test_v0_release_bad_rows_are_refused(tmp_path, line, fieldname, problem):
    folder = _write_release(tmp_path / "rel", [_row(1, 0.2), line], [], TINY_DICT)
    with pytest.raises(ValueError) as err:
        load_release(folder)
    msg = str(err.value)
    assert f"{folder / 'context.jsonl'}: line 2" in msg, msg
    assert fieldname in msg and problem in msg and "Fix:" in msg, msg
    if "ds_7" in problem:
        assert "prompt_dict.json" in msg


@pytest.mark.parametrize(
    "content, problem",
    [
        ('["not", "a", "dict"]', "expected a JSON object"),
        ('{"ds_1": ""}', "non-empty problem text"),
        ('{"ds_1": ', "malformed JSON"),
    ],
)
def test_v0_release_bad_prompt_dict_is_refused(tmp_path, content, problem):
    folder = _write_release(tmp_path / "rel", [_row(1, 0.2)], [], TINY_DICT)
    (folder / "prompt_dict.json").write_text(content)
    with pytest.raises(ValueError, match="Fix") as err:
        load_release(folder)
    assert str(folder / "prompt_dict.json") in str(err.value) and problem in str(err.value)


def test_v0_release_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="context.jsonl, train.jsonl"):
        load_release(tmp_path)
    _write_release(tmp_path / "rel", [_row(1, 0.2)], [], TINY_DICT)
    (tmp_path / "rel" / "prompt_dict.json").unlink()
    with pytest.raises(FileNotFoundError, match="prompt_dict.json: missing"):
        load_release(tmp_path / "rel")


@pytest.mark.skipif(
    not RELEASE.is_dir(), reason=f"V0 release sample not found at {RELEASE} (../shared beside the repo)"
)
def test_v0_release_real_sample_matches_the_source_files():
    data = load_release(RELEASE)
    prompt_dict = json.loads((RELEASE / "prompt_dict.json").read_text())
    raw = [
        json.loads(line)
        for name in ("context.jsonl", "train.jsonl")
        for line in (RELEASE / name).read_text().splitlines()
        if line.strip()
    ]
    # README: 3,072 context rows + 192 train rows = 3,264 measurements, 512 / 32 per (model, step)
    assert data.scores.num_rows == len(raw) == 3072 + 192
    t = data.scores.to_pydict()
    assert t["score"] == [r["score"] for r in raw]
    assert t["model"] == [r["model"] for r in raw] and t["step"] == [r["step"] for r in raw]
    assert t["prompt_id"] == [make_prompt_id(r["dataset"], prompt_dict[f"{r['dataset']}_{r['id']}"]) for r in raw]
    per_key = collections.Counter((m, s, ty) for m, s, ty in zip(t["model"], t["step"], t["type"]))
    assert set(per_key.values()) == {512, 32} and len(per_key) == 12  # 2 models x 3 steps x 2 types
    assert len({(m, s, p) for m, s, p in zip(t["model"], t["step"], t["prompt_id"])}) == 3264  # no repeats
    # one prompt per distinct key, and train prompts never occur in context (README)
    assert len(data.prompts) == len({f"{r['dataset']}_{r['id']}" for r in raw})
    ctx = {p for p, ty in zip(t["prompt_id"], t["type"]) if ty == "context"}
    trn = {p for p, ty in zip(t["prompt_id"], t["type"]) if ty == "train_query"}
    assert not ctx & trn
    assert {p.prompt_id for p in data.prompts if p.split == "train"} == trn
    assert all(p.answer is None and p.dataset == "dapomath" for p in data.prompts)
