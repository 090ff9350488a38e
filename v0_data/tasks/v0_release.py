"""Task source `v0_release`: the data format of the V0 reference release (and of `v05 predict-v0`).

A release folder holds
- score files, one JSON object per line:
  `{"id": 5562, "score": -0.4, "type": "context", "model": "Qwen3-4B-Instruct", "step": 16, "dataset": "dapomath"}`
  where `score` is the mean ±1 reward of `model` at checkpoint `step` over n rollouts of the prompt, so
  it lies in [-1, 1] on a grid of step 2/n (the release used n = 10: -1, -0.8, ..., 1). `type` tells
  which part of a V0 task the row belongs to ("context", "train_query", ...);
- `prompt_dict.json`: `{"<dataset>_<id>": "<problem text>"}`; a row's key is `f"{dataset}_{id}"`.

`load_release(folder)` reads `context.jsonl` and `train.jsonl` (only those two by default: a held-out
`test.jsonl` next to them is never read unless named) plus `prompt_dict.json`, and returns
`ReleaseData(prompts, scores, rows)`:
- `prompts`: one `Prompt` per distinct prompt: dataset = the row's `dataset`, text from the prompt dict,
  answer None (the release has no answers), meta {"source_key": key}; split = the type of the first
  row that uses it, with "train_query" -> "train" and "test_query" -> "test";
- `scores`: an Arrow table (model: string, step: int64, prompt_id: int64, n: int32, score: float64,
  type: string), one row per input row, in file order; `n` is not in the files: it is the `n`
  argument (default `DEFAULT_N` = 10, the release's rollouts per measurement) and is needed to turn a
  score back into a success count, `successes = n (1 + score) / 2`;
- `rows`: the parsed `ReleaseRow`s with their file and line (what `predict-v0` echoes back).

Generic pair `--context FILE.jsonl --prompts prompt_dict.json`: `read_release_files([files], prompts)`;
`read_rows(path, require_score=False)` accepts query rows without a score (score NaN).

Every bad input is a `ValueError` naming the file, the line, the field and the fix: malformed JSON, a
missing or mistyped field, a score outside [-1, 1] or off the 2/n grid, a key missing from the prompt
dict, the same (model, step, prompt) twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, NamedTuple, Sequence

from v0_data.tasks.registry import SOURCES
from v0_data.tasks.base import Prompt, make_prompt_id

DEFAULT_N = 10
"""Rollouts behind each score of the V0 release (its README: mean reward over 10 rollouts)."""

RELEASE_FILES = ("context.jsonl", "train.jsonl")
PROMPT_DICT = "prompt_dict.json"
ROW_FIELDS = ("id", "score", "type", "model", "step", "dataset")
TYPE_TO_SPLIT = {"train_query": "train", "test_query": "test"}
SCORE_COLUMNS = ("model", "step", "prompt_id", "n", "score", "type")


class ReleaseRow(NamedTuple):
    """One line of a score file. `score` is NaN for query rows read with `require_score=False`."""

    id: int | str
    score: float
    type: str
    model: str
    step: int
    dataset: str
    file: str
    line: int
    raw: dict  # the decoded JSON object, every field kept (what predict-v0 echoes back with `pred`)

    @property
    def key(self) -> str:
        """The row's key in `prompt_dict.json`."""
        return f"{self.dataset}_{self.id}"

    @property
    def split(self) -> str:
        return TYPE_TO_SPLIT.get(self.type, self.type)


class ReleaseData(NamedTuple):
    """What a release folder (or a score-file + prompt-dict pair) holds."""

    prompts: list[Prompt]
    scores: Any  # pyarrow.Table with SCORE_COLUMNS, one row per ReleaseRow
    rows: list[ReleaseRow]


def _bad(file: str | Path, line: int | None, fieldname: str, problem: str, fix: str) -> ValueError:
    where = f"{file}: line {line}" if line is not None else str(file)
    return ValueError(f"{where}: field {fieldname!r}: {problem}. Fix: {fix}")


def read_prompt_dict(path: str | Path) -> dict[str, str]:
    """`{"<dataset>_<id>": text}` from a prompt-dict JSON file, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt dict not found. Fix: pass the release's {PROMPT_DICT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: byte {exc.start}: not UTF-8 text. Fix: save the prompt dict as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: line {exc.lineno}: malformed JSON ({exc.msg}). Fix: the prompt dict must be one JSON "
            'object {"<dataset>_<id>": "<problem text>"}'
        ) from exc
    if not isinstance(data, dict):
        raise _bad(path, None, "(top level)", f"expected a JSON object, got {type(data).__name__}",
                   'write {"<dataset>_<id>": "<problem text>", ...}')
    for key, text in data.items():
        if not isinstance(text, str) or not text.strip():
            raise _bad(path, None, key, f"expected a non-empty problem text, got {text!r:.60}",
                       "give every key its problem text, or drop the key")
    return data


def _int_field(value: Any, file: str, line: int, name: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(file, line, name, f"expected an integer, got {value!r:.40}", fix)
    if isinstance(value, float):
        if not value.is_integer():
            raise _bad(file, line, name, f"expected an integer, got {value!r}", fix)
        value = int(value)
    if not -(2**63) <= value < 2**63:
        raise _bad(file, line, name, f"{value:.3g} does not fit a 64-bit integer", fix)
    return value


def parse_row(
    obj: Any, file: str, line: int, *, require_score: bool = True, default_type: str | None = None
) -> ReleaseRow:
    """Validate one decoded line; raise a ValueError naming file, line, field and fix."""
    if not isinstance(obj, dict):
        raise _bad(file, line, "(row)", f"expected a JSON object, got {type(obj).__name__}",
                   'write one {"id", "score", "type", "model", "step", "dataset"} object per line')
    for name in ("id", "model", "step", "dataset"):
        if name not in obj:
            raise _bad(file, line, name, "missing", f"add {name!r} to every row (row fields: {', '.join(ROW_FIELDS)})")

    pid = obj["id"]
    if isinstance(pid, bool) or not isinstance(pid, (int, str)) or (isinstance(pid, str) and not pid.strip()):
        raise _bad(file, line, "id", f"expected an integer or a non-empty string, got {pid!r:.40}",
                   "use the prompt's id, as in its prompt-dict key <dataset>_<id>")
    for name in ("model", "dataset"):
        if not isinstance(obj[name], str) or not obj[name].strip():
            raise _bad(file, line, name, f"expected a non-empty string, got {obj[name]!r:.40}",
                       f"give every row its {name} name")
    step = _int_field(obj["step"], file, line, "step", "write the checkpoint's training step as an integer")
    if step < 0:
        raise _bad(file, line, "step", f"negative ({step})", "write the checkpoint's training step (>= 0)")

    if "type" in obj:
        rtype = obj["type"]
        if not isinstance(rtype, str) or not rtype.strip():
            raise _bad(file, line, "type", f"expected a non-empty string, got {rtype!r:.40}",
                       'use "context", "train_query" or another row type name')
    elif default_type is not None:
        rtype = default_type
    else:
        raise _bad(file, line, "type", "missing", 'add "type": "context" (or "train_query", ...) to every row')

    score = obj.get("score")
    if score is None:
        if require_score:
            raise _bad(file, line, "score", "missing", "add the mean ±1 reward over the rollouts, in [-1, 1]")
        score = math.nan
    else:
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise _bad(file, line, "score", f"expected a number, got {score!r:.40}",
                       "write the mean ±1 reward over the rollouts, a number in [-1, 1]")
        score = float(score)
        if not (-1.0 <= score <= 1.0):
            raise _bad(file, line, "score", f"{score} is outside [-1, 1]",
                       "scores are mean ±1 rewards; convert a success rate p with 2p - 1")
    return ReleaseRow(pid, score, rtype, obj["model"], step, obj["dataset"], str(file), line, obj)


def read_rows(path: str | Path, *, require_score: bool = True, default_type: str | None = None) -> list[ReleaseRow]:
    """Every row of a score file (blank lines skipped), validated, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: score file not found. Fix: pass a V0-release .jsonl file")
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: line {line_no}: byte {exc.start} of the line is not UTF-8. Fix: save the "
                                 "score file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.strip())
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}: line {line_no}: field '(row)': malformed JSON ({exc.msg} at column {exc.colno}). "
                    "Fix: write one "
                    'JSON object per line, e.g. {"id": 1, "score": 0.2, "type": "context", "model": "m", '
                    '"step": 16, "dataset": "dapomath"}'
                ) from exc
            rows.append(parse_row(obj, str(path), line_no, require_score=require_score, default_type=default_type))
    return rows


def _resolve(rows: Sequence[ReleaseRow], prompt_dict: Mapping[str, str], prompts_path: str | Path) -> list[int]:
    """prompt_id of every row; unknown keys raise."""
    ids = []
    cache: dict[str, int] = {}
    for r in rows:
        key = r.key
        pid = cache.get(key)
        if pid is None:
            text = prompt_dict.get(key)
            if text is None:
                raise _bad(r.file, r.line, "id", f"key {key!r} (dataset + '_' + id) is not in {prompts_path}",
                           f"add {key!r} with its problem text to the prompt dict, or fix the row's dataset/id")
            pid = cache[key] = make_prompt_id(r.dataset, text)
        ids.append(pid)
    return ids


def score_table(
    rows: Sequence[ReleaseRow],
    prompt_dict: Mapping[str, str],
    *,
    n: int = DEFAULT_N,
    prompts_path: str | Path = PROMPT_DICT,
    check_grid: bool = True,
):
    """Arrow table (model, step, prompt_id, n, score, type) of `rows`, in order.

    With `check_grid`, every score must be a mean of `n` ±1 rewards: `n (1 + score) / 2` an integer
    (within 1e-6). The same (model, step, prompt) twice is refused.
    """
    import pyarrow as pa

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"score_table: n={n!r}; set the number of rollouts behind each score (>= 1)")
    prompt_ids = _resolve(rows, prompt_dict, prompts_path)
    seen: dict[tuple[str, int, int], ReleaseRow] = {}
    for r, pid in zip(rows, prompt_ids):
        if check_grid and not math.isnan(r.score):
            successes = n * (1.0 + r.score) / 2.0
            if abs(successes - round(successes)) > 1e-6:
                raise _bad(r.file, r.line, "score",
                           f"{r.score} is not a mean of n={n} ±1 rewards (n(1+score)/2 = {successes:.4g} successes)",
                           "pass the number of rollouts behind the scores as n (--n)")
        k = (r.model, r.step, pid)
        first = seen.get(k)
        if first is not None:
            raise _bad(r.file, r.line, "id",
                       f"model {r.model!r} step {r.step} prompt {r.key!r} already measured at "
                       f"{first.file}: line {first.line}",
                       "keep one row per (model, step, prompt); average repeated measurements first")
        seen[k] = r
    return pa.table(
        {
            "model": pa.array([r.model for r in rows], pa.string()),
            "step": pa.array([r.step for r in rows], pa.int64()),
            "prompt_id": pa.array(prompt_ids, pa.int64()),
            "n": pa.array([n] * len(rows), pa.int32()),
            "score": pa.array([r.score for r in rows], pa.float64()),
            "type": pa.array([r.type for r in rows], pa.string()),
        }
    )


def prompts_for_rows(
    rows: Iterable[ReleaseRow], prompt_dict: Mapping[str, str], *, prompts_path: str | Path = PROMPT_DICT
) -> list[Prompt]:
    """One `Prompt` per distinct prompt the rows use, in order of first use."""
    rows = list(rows)
    out: dict[int, Prompt] = {}
    for r, pid in zip(rows, _resolve(rows, prompt_dict, prompts_path)):
        if pid not in out:
            out[pid] = Prompt(pid, r.dataset, r.split, prompt_dict[r.key], None, {"source_key": r.key})
    return list(out.values())


def read_release_files(
    score_files: Sequence[str | Path],
    prompts_path: str | Path,
    *,
    n: int = DEFAULT_N,
    require_score: bool = True,
    check_grid: bool = True,
) -> ReleaseData:
    """Prompts, score table and rows of some score files plus their prompt dict."""
    if not score_files:
        raise ValueError("read_release_files: no score files given; pass at least one .jsonl file")
    prompt_dict = read_prompt_dict(prompts_path)
    rows = [r for f in score_files for r in read_rows(f, require_score=require_score)]
    table = score_table(rows, prompt_dict, n=n, prompts_path=prompts_path, check_grid=check_grid)
    return ReleaseData(prompts_for_rows(rows, prompt_dict, prompts_path=prompts_path), table, rows)


def release_files(path: str | Path, files: Sequence[str] = RELEASE_FILES) -> tuple[list[Path], Path]:
    """(score files, prompt dict) of a release folder, or of one score file with a sibling prompt dict."""
    path = Path(path)
    if path.is_file():
        folder, score_files = path.parent, [path]
    elif path.is_dir():
        folder = path
        score_files = [path / name for name in files if (path / name).is_file()]
        if not score_files:
            raise FileNotFoundError(
                f"{path}: none of {', '.join(files)} found. Fix: point at a V0-release folder (context.jsonl, "
                f"train.jsonl, {PROMPT_DICT}) or at one .jsonl score file"
            )
    else:
        raise FileNotFoundError(f"{path}: no such file or folder. Fix: point at a V0-release folder")
    prompts = folder / PROMPT_DICT
    if not prompts.is_file():
        raise FileNotFoundError(f"{prompts}: missing. Fix: put the release's {PROMPT_DICT} next to the score files")
    return score_files, prompts


def load_release(path: str | Path, *, n: int = DEFAULT_N, files: Sequence[str] = RELEASE_FILES) -> ReleaseData:
    """Everything in a release folder (by default `context.jsonl` + `train.jsonl`; see module docstring)."""
    score_files, prompts = release_files(path, files)
    return read_release_files(score_files, prompts, n=n)


@SOURCES.register("v0_release")
class V0ReleaseSource:
    """The V0 release folder format; see the module docstring."""

    name: ClassVar[str] = "v0_release"

    def __init__(self, *, n: int = DEFAULT_N, files: Sequence[str] = RELEASE_FILES):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"V0ReleaseSource(n={n!r}): set the number of rollouts behind each score (>= 1)")
        self.n = n
        self.files = tuple(files)

    def load(self, path: str | Path | None, *, split: str | None = None) -> list[Prompt]:
        """Prompts of the release at `path`; `split` keeps those of one split ("context", "train", ...)."""
        if path is None:
            raise ValueError("v0_release source: PATH is required (a release folder or a .jsonl score file)")
        prompts = load_release(path, n=self.n, files=self.files).prompts
        if split is None:
            return prompts
        kept = [p for p in prompts if p.split == split]
        if not kept:
            have = sorted({p.split for p in prompts})
            raise ValueError(f"{path}: no prompt of split {split!r}; splits present: {', '.join(have)}")
        return kept

    def load_scores(self, path: str | Path):
        """The score table (model, step, prompt_id, n, score, type) of the release at `path`."""
        return load_release(path, n=self.n, files=self.files).scores


__all__ = [
    "DEFAULT_N",
    "RELEASE_FILES",
    "ReleaseData",
    "ReleaseRow",
    "SCORE_COLUMNS",
    "V0ReleaseSource",
    "load_release",
    "parse_row",
    "prompts_for_rows",
    "read_prompt_dict",
    "read_release_files",
    "read_rows",
    "release_files",
    "score_table",
]
