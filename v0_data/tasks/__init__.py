"""Task sources, chosen by name: `get_source("arith")`.

Each source module registers itself in `SOURCES` on import; `get_source` imports the built-in
modules lazily so that `import v0_data` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util

from v0_data.registry import Registry
from v0_data.tasks.base import Prompt, make_prompt_id

SOURCES: Registry = Registry("task source")

_BUILTIN_MODULES = ("v0_data.tasks.arith", "v0_data.tasks.parquet", "v0_data.tasks.v0_release")


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def get_source(name: str):
    _load_builtins()
    return SOURCES.get(name)


def source_names() -> list[str]:
    _load_builtins()
    return SOURCES.names()


__all__ = ["SOURCES", "Prompt", "make_prompt_id", "get_source", "source_names"]
