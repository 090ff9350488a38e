"""What every task source yields: `Prompt` rows with a stable id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


def make_prompt_id(dataset: str, text: str) -> int:
    """Stable signed 64-bit id of a prompt: the first 8 bytes of blake2b(dataset, 0x1f, text).

    The same (dataset, text) gets the same id on every machine and in every run, so stores built
    separately can be joined on it. Integers keep the rollout table small and aggregations fast.
    """
    digest = hashlib.blake2b(f"{dataset}\x1f{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True)
class Prompt:
    """One task prompt. `answer` is the verifiable ground truth (None when unknown, e.g. V0 release)."""

    prompt_id: int
    dataset: str
    split: str
    text: str
    answer: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, dataset: str, split: str, text: str, answer: str | None, **meta: Any) -> "Prompt":
        return cls(make_prompt_id(dataset, text), dataset, split, text, answer, dict(meta))
