"""Task source `parquet`: verl's RL data format, read and written.

One row per prompt (the layout of verl's `examples/data_preprocess/*.py` and of the DAPO recipe's
DAPO-Math-17k file):

    data_source   str                                   e.g. "math_dapo", "openai/gsm8k"
    prompt        list<struct<role: str, content: str>> the chat; usually one user message
    ability       str                                   e.g. "math" (optional)
    reward_model  struct<style: str, ground_truth: str> the verifiable answer (optional)
    extra_info    struct<...>                           free-form: split, index, ... (optional)

Reading (`ParquetSource().load(path, split=None)`): `path` is a `.parquet` file, a folder (every
`*.parquet` below it, sorted) or a glob; `hf:<dataset id>[:<config>]` loads a Hugging Face `datasets` id,
only when asked for in this explicit form (`datasets` is not a dependency of this package). Each row
becomes a `Prompt`:
- `dataset` = `data_source`; `text` = the content of the only user message (any system message is kept
  in `meta["chat"]`), or, for multi-turn chats, the chat rendered as "role: content" blocks;
- `answer` = `reward_model.ground_truth` (None when absent);
- `prompt_id` = `extra_info.prompt_id` when the file carries one (files we wrote), else
  `make_prompt_id(data_source, text)`;
- `split` = the `split` argument when given (a label: local files do not say which split they are; for
  `hf:` ids it selects the split), else `extra_info.split`, else the file stem when it is a split name
  (`train.parquet`), else "train";
- `meta` = {"chat", "ability", "reward_style", "extra_info"} (plain Python values, JSON-ready).
Rows repeating an earlier prompt (same id; DAPO-Math-17k repeats each problem many times) are dropped;
a repeat whose ground truth differs is an error.

Writing (`write_verl_parquet(prompts, path)`) produces the same layout, with
`extra_info = {"prompt_id", "index", "split", ...}` so the V0.5 prior can be looked up by `prompt_id`
inside a verl run. The write is atomic (temporary file, then rename).
"""

from __future__ import annotations

import glob as globlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

from v0_data.tasks.registry import SOURCES
from v0_data.tasks.base import Prompt, make_prompt_id

REQUIRED_COLUMNS = ("data_source", "prompt")
SPLIT_NAMES = ("train", "test", "val", "validation", "dev", "eval")
HF_PREFIX = "hf:"
_META_KEYS = ("chat", "ability", "reward_style", "extra_info")


def _err(where: str, row: int | None, fieldname: str, problem: str, fix: str) -> ValueError:
    at = f"{where}: row {row}" if row is not None else where
    return ValueError(f"{at}: field {fieldname!r}: {problem}. Fix: {fix}")


def resolve_parquet_files(path: str | Path) -> list[Path]:
    """The parquet files `path` names: the file itself, every `*.parquet` under a folder, or a glob."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise FileNotFoundError(f"{p}: folder holds no *.parquet file; point at a verl RL parquet file")
        return files
    matches = sorted(Path(m) for m in globlib.glob(str(path), recursive=True) if Path(m).is_file())
    if matches:
        return matches
    raise FileNotFoundError(
        f"{path}: no such file, folder or glob match. Fix: give a local .parquet file/folder/glob, or "
        f"'{HF_PREFIX}<dataset id>' to load a Hugging Face dataset (needs `pip install datasets`)"
    )


def _chat_from_value(value: Any, where: str, row: int) -> list[dict[str, str]]:
    fix = "store the prompt as a list of {'role': ..., 'content': ...} dicts (verl's chat format)"
    if isinstance(value, str):  # lenient: a bare string is one user message
        if not value.strip():
            raise _err(where, row, "prompt", "empty string", fix)
        return [{"role": "user", "content": value}]
    if hasattr(value, "tolist"):  # numpy arrays from pandas-based readers
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise _err(where, row, "prompt", f"expected a non-empty chat list, got {type(value).__name__}", fix)
    chat = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict) or "content" not in msg or "role" not in msg:
            raise _err(where, row, f"prompt[{j}]", f"expected {{role, content}}, got {msg!r:.80}", fix)
        role, content = msg["role"], msg["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise _err(where, row, f"prompt[{j}]", "role and content must be strings", fix)
        chat.append({"role": role, "content": content})
    return chat


def chat_to_text(chat: Sequence[dict[str, str]]) -> str:
    """The prompt text of a chat: the only user message's content, else "role: content" blocks."""
    users = [m for m in chat if m["role"] == "user"]
    if len(users) == 1 and all(m["role"] in ("user", "system") for m in chat):
        return users[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in chat)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _row_to_prompt(row: dict[str, Any], where: str, index: int, split: str | None, default_split: str) -> Prompt:
    data_source = row.get("data_source")
    if not isinstance(data_source, str) or not data_source.strip():
        raise _err(where, index, "data_source", f"expected a non-empty string, got {data_source!r:.60}",
                   "name the data set of every row, e.g. 'math_dapo'")
    chat = _chat_from_value(row.get("prompt"), where, index)
    text = chat_to_text(chat)

    reward_model = row.get("reward_model")
    answer = None
    style = None
    if reward_model is not None:
        if not isinstance(reward_model, dict):
            raise _err(where, index, "reward_model", f"expected a struct, got {type(reward_model).__name__}",
                       "store {'style': 'rule', 'ground_truth': <answer>}")
        gt = reward_model.get("ground_truth")
        if gt is not None:
            gt = _jsonable(gt)
            answer = gt if isinstance(gt, str) else json.dumps(gt) if isinstance(gt, (list, dict)) else str(gt)
        style = reward_model.get("style")

    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        raise _err(where, index, "extra_info", f"expected a struct, got {type(extra).__name__}",
                   "store extra_info as a struct/dict (or drop the column)")
    extra = _jsonable(extra) if extra else {}
    packed = extra.get("source_extra_info")
    if isinstance(packed, str):  # written by write_verl_parquet's JSON fallback: unpack it
        try:
            unpacked = json.loads(packed)
        except json.JSONDecodeError:
            unpacked = None
        if isinstance(unpacked, dict):
            extra = {**unpacked, **{k: v for k, v in extra.items() if k != "source_extra_info"}}

    pid = extra.get("prompt_id")
    if isinstance(pid, bool) or not isinstance(pid, int):
        if pid is not None:
            raise _err(where, index, "extra_info.prompt_id", f"expected a 64-bit integer, got {pid!r:.40}",
                       "drop extra_info.prompt_id (it is recomputed) or write integers")
        pid = make_prompt_id(data_source, text)
    row_split = split or (extra.get("split") if isinstance(extra.get("split"), str) else None) or default_split
    meta = {"chat": chat, "ability": row.get("ability"), "reward_style": style, "extra_info": extra}
    return Prompt(int(pid), data_source, row_split, text, answer, meta)


def row_to_prompt(
    row: dict[str, Any], where: str, index: int, split: str | None = None, default_split: str = "train"
) -> Prompt:
    """One verl RL row (a dict with data_source, prompt, reward_model, extra_info, ability) as a `Prompt`,
    by the rules of the module docstring; `where`/`index` name the row in error messages. Used on
    verl's in-memory batches too (numpy arrays are accepted where lists are expected)."""
    return _row_to_prompt(row, where, index, split, default_split)


def _dedupe(prompts: Iterable[tuple[Prompt, str]]) -> list[Prompt]:
    seen: dict[int, tuple[Prompt, str]] = {}
    out = []
    for p, where in prompts:
        first = seen.get(p.prompt_id)
        if first is None:
            seen[p.prompt_id] = (p, where)
            out.append(p)
        elif first[0].answer != p.answer:
            raise ValueError(
                f"{where}: field 'reward_model.ground_truth': prompt {p.text[:60]!r} already appeared at "
                f"{first[1]} with ground truth {first[0].answer!r}, here {p.answer!r}. Fix: keep one of the "
                "two rows, or give them different data_source values"
            )
    return out


def _row_signatures(batch) -> list[str | None] | None:
    """Per row, data_source + roles + contents + ground truth as one string (None where a part is null),
    computed in Arrow; None when the batch's types do not allow it (then every row is converted)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = batch.schema.names
    prompt = batch.column(names.index("prompt"))
    t = prompt.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return None
    fields = {t.value_type.field(i).name for i in range(t.value_type.num_fields)}
    if prompt.null_count or not {"role", "content"} <= fields:
        return None
    try:
        lists = type(prompt)
        roles = lists.from_arrays(prompt.offsets, prompt.values.field("role").cast(pa.string()))
        contents = lists.from_arrays(prompt.offsets, prompt.values.field("content").cast(pa.string()))
        parts = [
            batch.column(names.index("data_source")).cast(pa.string()),
            pc.binary_join(roles, "\x1e"),
            pc.binary_join(contents, "\x1e"),
        ]
        if "reward_model" in names:
            rm = batch.column(names.index("reward_model"))
            if not pa.types.is_struct(rm.type):
                return None
            rm_fields = {rm.type.field(i).name for i in range(rm.type.num_fields)}
            if "ground_truth" in rm_fields:
                parts.append(rm.field("ground_truth").cast(pa.string()))
        return pc.binary_join_element_wise(*parts, "\x1f").to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def read_verl_parquet(path: str | Path, *, split: str | None = None, batch_size: int = 65536) -> list[Prompt]:
    """Prompts of a local verl RL parquet file, folder or glob (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    files = resolve_parquet_files(path)
    pairs: list[tuple[Prompt, str]] = []
    seen_rows: set[str] = set()
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
            raise ValueError(f"{f}: not a readable parquet file ({exc}). Fix: re-export it as parquet") from exc
        names = pf.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise ValueError(
                f"{f}: missing column(s) {missing} (has {names}). Fix: write verl's RL format: data_source, "
                "prompt (chat list), reward_model {style, ground_truth}, extra_info"
            )
        default_split = f.stem.lower() if f.stem.lower() in SPLIT_NAMES else "train"
        start = 0
        n_rows = pf.metadata.num_rows
        with tqdm(total=n_rows, desc=f"reading {f.name}", unit="row", disable=n_rows < 100_000) as bar:
            for batch in pf.iter_batches(batch_size=batch_size):
                rows = list(range(batch.num_rows))
                sigs = _row_signatures(batch)
                if sigs is not None:  # skip exact repeats before the (slow) conversion to Python
                    keep = []
                    for i, sig in enumerate(sigs):
                        if sig is None or sig not in seen_rows:
                            keep.append(i)
                            if sig is not None:
                                seen_rows.add(sig)
                    if len(keep) < batch.num_rows:
                        batch, rows = batch.take(pa.array(keep, pa.int64())), keep
                for i, row in zip(rows, batch.to_pylist()):
                    index = start + i
                    pairs.append((_row_to_prompt(row, str(f), index, split, default_split), f"{f}: row {index}"))
                start += len(sigs) if sigs is not None else len(rows)
                bar.update(len(sigs) if sigs is not None else len(rows))
    return _dedupe(pairs)


def read_hf_dataset(dataset_id: str, *, split: str | None = None) -> list[Prompt]:
    """Prompts of a Hugging Face dataset in verl's RL format (`datasets` must be installed).

    `dataset_id` may end in `:<config>`; `split` selects the split (None: every split).
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"{HF_PREFIX}{dataset_id}: loading a hub dataset needs the `datasets` package. Fix: "
            "`pip install datasets`, or download the parquet file and pass its local path"
        ) from exc
    name, _, config = dataset_id.partition(":")
    loaded = datasets.load_dataset(name, config or None, split=split)
    parts = {split: loaded} if split else dict(loaded)
    pairs = []
    for part_name, part in parts.items():
        missing = [c for c in REQUIRED_COLUMNS if c not in part.column_names]
        if missing:
            raise ValueError(
                f"{HF_PREFIX}{dataset_id} split {part_name}: missing column(s) {missing}. Fix: use a dataset "
                "in verl's RL format (data_source, prompt, reward_model, extra_info)"
            )
        where = f"{HF_PREFIX}{dataset_id}[{part_name}]"
        for i, row in enumerate(part):
            pairs.append((_row_to_prompt(row, where, i, part_name, part_name), f"{where}: row {i}"))
    return _dedupe(pairs)


@SOURCES.register("parquet")
class ParquetSource:
    """verl RL parquet (local file/folder/glob, or `hf:<id>`); see the module docstring."""

    name: ClassVar[str] = "parquet"

    def __init__(self, *, batch_size: int = 65536):
        if batch_size < 1:
            raise ValueError(f"ParquetSource(batch_size={batch_size}): set a positive number of rows")
        self.batch_size = batch_size

    def load(self, path: str | Path | None, *, split: str | None = None) -> list[Prompt]:
        if path is None:
            raise ValueError("parquet source: PATH is required (a .parquet file, folder, glob or hf:<dataset id>)")
        if isinstance(path, str) and path.startswith(HF_PREFIX):
            return read_hf_dataset(path[len(HF_PREFIX) :], split=split)
        return read_verl_parquet(path, split=split, batch_size=self.batch_size)


def write_verl_parquet(
    prompts: Iterable[Prompt],
    path: str | Path,
    *,
    data_source: str | None = None,
    ability: str = "math",
    reward_style: str = "rule",
    system_prompt: str | None = None,
    instruction: str | None = None,
) -> Path:
    """Write `prompts` as a verl RL parquet file (atomic: temporary file, then rename); return the path.

    - `data_source`: the reward's name for every row (default: each prompt's `dataset`);
    - `system_prompt`: prepended as a system message (unless the prompt's chat already has one);
    - `instruction`: appended to the user message (e.g. "Put the final answer in \\boxed{}");
      applied only to prompts without a stored chat;
    - `extra_info` = the prompt's scalar `meta` fields (e.g. arith's `level`, `answer_format`, which
      the reward reads) and its own `meta["extra_info"]` (if any), plus `prompt_id`, `index` (row
      number) and `split`; when the merged dicts do not fit one struct type, the original extra info is
      kept as a JSON string under `source_extra_info`.
    Prompts with no answer get `ground_truth` "" (the `math` reward scores them -1).
    """
    import pyarrow as pa

    rows = []
    merged_extras = []
    for index, p in enumerate(prompts):
        if not isinstance(p, Prompt):
            raise TypeError(f"write_verl_parquet: item {index} is {type(p).__name__}, expected a Prompt")
        merged_extras.append(_extra_info_parts(p, index))
        rows.append(
            {
                "data_source": data_source or p.dataset,
                "prompt": _verl_chat(p, system_prompt, instruction),
                "ability": p.meta.get("ability") or ability,
                "reward_model": {"style": p.meta.get("reward_style") or reward_style, "ground_truth": p.answer or ""},
            }
        )
    if not rows:
        raise ValueError(f"write_verl_parquet({path}): no prompts to write; pass at least one Prompt")
    columns = _verl_columns(rows)

    def build(json_fallback: bool) -> pa.Table:
        return pa.table({**columns, "extra_info": _extra_info_column(merged_extras, json_fallback)})

    return _write_atomically(build, Path(path))


def _verl_chat(p: Prompt, system_prompt: str | None, instruction: str | None) -> list[dict[str, str]]:
    """The chat messages of one verl row: the prompt's stored chat, else one user message."""
    chat = p.meta.get("chat")
    if chat:
        chat = [{"role": str(m["role"]), "content": str(m["content"])} for m in chat]
    else:
        content = p.text if not instruction else f"{p.text}\n\n{instruction}"
        chat = [{"role": "user", "content": content}]
    if system_prompt and not any(m["role"] == "system" for m in chat):
        chat = [{"role": "system", "content": system_prompt}] + chat
    return chat


def _extra_info_parts(p: Prompt, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the prompt's own extra info, the fields every row gets) for the `extra_info` column."""
    own_extra = {  # scalar meta (e.g. arith's level, answer_format) travels in extra_info too
        k: v
        for k, v in p.meta.items()
        if k not in _META_KEYS and (v is None or isinstance(v, (str, int, float, bool)))
    }
    own_extra.update(p.meta.get("extra_info") or {})
    return own_extra, {"prompt_id": int(p.prompt_id), "index": index, "split": p.split}


def _verl_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Arrow columns data_source, prompt (list of role/content structs), ability, reward_model."""
    import pyarrow as pa

    chat_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return {
        "data_source": pa.array([r["data_source"] for r in rows], pa.string()),
        "prompt": pa.array([r["prompt"] for r in rows], chat_type),
        "ability": pa.array([r["ability"] for r in rows], pa.string()),
        "reward_model": pa.array(
            [r["reward_model"] for r in rows], pa.struct([("style", pa.string()), ("ground_truth", pa.string())])
        ),
    }


def _extra_info_column(merged_extras: list[tuple[dict, dict]], json_fallback: bool):
    """The `extra_info` column: own fields merged as a struct, or (fallback) kept as one JSON string."""
    import pyarrow as pa

    if json_fallback:
        extras = [
            {**base, "source_extra_info": json.dumps(_jsonable(own), sort_keys=True)}
            for own, base in merged_extras
        ]
    else:
        extras = [{**{k: v for k, v in own.items() if k not in base}, **base} for own, base in merged_extras]
    return pa.array(extras)


def _write_atomically(build, path: Path) -> Path:
    """Write `build(json_fallback=False)` to `path` through a temporary file, or `build(True)` when the
    merged extra info does not fit one struct type parquet can store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:  # the prompts' own extra_info, merged, when it fits one struct type parquet can store
            pq.write_table(build(json_fallback=False), tmp)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
            pq.write_table(build(json_fallback=True), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = [
    "ParquetSource",
    "chat_to_text",
    "read_hf_dataset",
    "read_verl_parquet",
    "resolve_parquet_files",
    "row_to_prompt",
    "write_verl_parquet",
]
