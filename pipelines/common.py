"""Small pieces every recipe and the command line share: the option error, the torch thread count and
strict JSON output."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any, Mapping


class OptionError(ValueError):
    """Bad input that one command-line option controls; `option` names it (e.g. "--rename").

    Recipes raise it so that the CLI can point at the flag to change, while a recipe called from Python
    (the demo, a notebook) still gets an ordinary `ValueError`.
    """

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)` when given (torch is imported only then)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) as None, numpy / torch scalars and decimals as Python
    numbers, recursively: what `json.dumps(..., allow_nan=False)` accepts (`null`, never `NaN`)."""
    if isinstance(value, Decimal):
        value = float(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy / torch scalar
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of `value` (NaN -> null; other objects such as dates as text)."""
    return json.dumps(json_safe(value), allow_nan=False, default=str, **kwargs)


def write_json(path: str | Path, value: Any, **kwargs: Any) -> None:
    """Write strict JSON (`to_json`) to `path` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(value, **kwargs) + "\n")
    tmp.replace(path)
