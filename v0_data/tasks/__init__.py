"""Task sources, chosen by name: `get_source("arith")`.

The registry lives in `registry.py`; importing this package imports the built-in source modules
(arith, parquet, v0_release), which register themselves. They are cheap to import: pyarrow, datasets
and friends are imported inside the functions that need them.
"""

from __future__ import annotations

from v0_data.tasks import arith, parquet, v0_release  # noqa: F401 - registers the built-in sources
from v0_data.tasks.base import Prompt, make_prompt_id
from v0_data.tasks.registry import SOURCES


def get_source(name: str):
    """The task-source class registered as `name` (unknown names fail with the list of valid ones)."""
    return SOURCES.get(name)


def source_names() -> list[str]:
    """Names of the registered task sources, sorted."""
    return SOURCES.names()


__all__ = ["SOURCES", "Prompt", "make_prompt_id", "get_source", "source_names"]
