"""`SOURCES`, the task-source registry: each source module registers its class here on import.

Kept apart from the package's `__init__` so that the source modules (arith, parquet, v0_release) and
the package, which imports them, do not import each other.
"""

from __future__ import annotations

from v0_data.registry import Registry

SOURCES: Registry = Registry("task source")

__all__ = ["SOURCES"]
