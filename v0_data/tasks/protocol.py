"""The one interface every task source implements (`arith`, `parquet`, `v0_release`, ...).

A task source is a **class** registered in `v0_data.tasks.SOURCES` (defined in `registry.py`) under
its name when its module is imported (the package imports the built-in ones):

    @SOURCES.register("parquet")
    class ParquetSource:
        name = "parquet"
        def __init__(self, *, <options with defaults>): ...
        def load(self, path, *, split=None) -> list[Prompt]: ...

    prompts = get_source("parquet")().load("dapo_math_17k.parquet")

Rules of the contract:
- The constructor takes keyword-only options, all with defaults, so `cls()` always works (the CLI builds
  sources by name with no arguments).
- `load(path, *, split=None)` returns a list of `Prompt`s with unique `prompt_id`s, in a deterministic
  order. `path` is where the data lives (a file, a folder, a glob); generated sources accept `None`.
- `split`: the split the caller wants. Sources that know the split of each prompt (generated sources,
  hub datasets, the V0 release) return only the prompts of that split; sources reading local files
  whose split is not recorded label every prompt with it. `None` means every prompt, each with the
  split the data gives it.
- Bad input raises `ValueError` whose message names the file, the row (line or row index), the field
  and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from v0_data.tasks.base import Prompt


@runtime_checkable
class TaskSource(Protocol):
    """A named source of `Prompt`s (see the module docstring for the contract)."""

    name: ClassVar[str]

    def load(self, path: str | Path | None, *, split: str | None = None) -> list[Prompt]:
        """Every prompt of `path` (of `split` only when given), unique ids, deterministic order."""
        ...
