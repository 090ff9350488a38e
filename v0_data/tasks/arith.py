"""`arith`: a seeded synthetic arithmetic world with exact integer answers (the embedded default).

The paper trains Qwen3 policies on DAPO-Math; on a laptop we need a task that a ~1 M-parameter
character-level policy can partly solve, so that per-prompt success rates spread over (0, 1) and RL
visibly improves them. Problems are integer expressions such as ``"47+8="``; the difficulty ladder
varies the number of operands, the digits per operand and the operators (see `LEVELS`).

Answer format: the policy writes the answer's digits **least significant first** (``"47+8="`` ->
``"55"``, ``"47+18="`` -> ``"56"`` for 65), which lets a left-to-right model propagate carries (the
first probe in DESIGN.md found it helps the warm start; not re-measured against plain order here).
`Prompt.answer` always holds the true integer in ordinary
notation; `score_arith` undoes the format. ``answer_format="plain"`` is available for policies that
write ordinary numbers (e.g. a pretrained Qwen3 checkpoint).

Splits never share a prompt: a problem belongs to ``test`` when a hash of its text falls below
`ArithConfig.test_fraction`, otherwise to ``train``, whatever the seed or the number of prompts.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from v0_data.tasks.registry import SOURCES
from v0_data.tasks.base import Prompt, make_prompt_id

DATASET = "arith"
ANSWER_FORMATS = ("reversed", "plain")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Level:
    """One rung of the difficulty ladder: `n_operands` numbers of `digits` digits joined by `ops`."""

    n_operands: int
    digits: tuple[int, ...]  # digits of each operand, e.g. (2, 1) for "47+8"
    ops: str  # operators drawn uniformly for each position, e.g. "+-"


# The ladder (index = `meta["level"]`), roughly ordered by difficulty for the tiny family. The
# one-digit rungs hold only 55-100 distinct problems (about a fifth of them in the test split); the
# others hold hundreds to thousands, so they make up most of any large split.
LEVELS: tuple[Level, ...] = (
    Level(2, (1, 1), "+"),  # 0: 3+5
    Level(2, (1, 1), "-"),  # 1: 8-5 (results are never negative)
    Level(2, (1, 1), "*"),  # 2: 7*8
    Level(2, (2, 1), "+"),  # 3: 47+8
    Level(2, (2, 1), "-"),  # 4: 47-8
    Level(3, (1, 1, 1), "+"),  # 5: 3+5+2
    Level(3, (1, 1, 1), "+-"),  # 6: 3+5-2
    Level(2, (2, 2), "+"),  # 7: 47+18
    Level(2, (2, 2), "-"),  # 8: 47-18
    Level(2, (3, 2), "+-"),  # 9: 347+18, 347-18
    Level(2, (2, 1), "*"),  # 10: 47*8
)


@dataclass(frozen=True)
class ArithConfig:
    """How many arithmetic prompts to draw and from which rungs of the ladder."""

    n_prompts: int = field(default=2000, metadata={"help": "prompts per split (fewer if a level runs out of distinct problems)"})
    seed: int = field(default=0, metadata={"help": "seed of the problem generator"})
    levels: tuple[int, ...] = field(
        default=tuple(range(len(LEVELS))), metadata={"help": f"ladder rungs to use, 0..{len(LEVELS) - 1} (see arith.LEVELS)"}
    )
    test_fraction: float = field(default=0.2, metadata={"help": "share of all problems (by text hash) that belong to the test split"})
    answer_format: str = field(default="reversed", metadata={"help": f"how the policy writes answers: {', '.join(ANSWER_FORMATS)}"})

    def __post_init__(self) -> None:
        if self.n_prompts < 1:
            raise ValueError(f"ArithConfig.n_prompts must be >= 1, got {self.n_prompts}")
        if not self.levels:
            raise ValueError("ArithConfig.levels is empty; give at least one level, e.g. levels=(0, 1, 2)")
        bad = [lv for lv in self.levels if not 0 <= lv < len(LEVELS)]
        if bad:
            raise ValueError(f"ArithConfig.levels has unknown levels {bad}; valid levels are 0..{len(LEVELS) - 1}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"ArithConfig.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"ArithConfig.answer_format {self.answer_format!r} unknown; use one of {ANSWER_FORMATS}")

    @classmethod
    def from_spec(cls, spec: "ArithConfig | Mapping[str, Any] | str | None") -> "ArithConfig":
        """Build a config from None (defaults), a mapping, or a string ``"n_prompts=500,seed=1,levels=0-4"``."""
        if spec is None:
            return cls()
        if isinstance(spec, ArithConfig):
            return spec
        if isinstance(spec, str):
            spec = _parse_spec_string(spec)
        if not isinstance(spec, Mapping):
            raise TypeError(f"arith spec must be None, ArithConfig, a mapping or 'key=value,...', got {type(spec).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - names)
        if unknown:
            raise ValueError(f"arith spec has unknown keys {unknown}; valid keys: {sorted(names)}")
        kwargs = dict(spec)
        if "levels" in kwargs:
            kwargs["levels"] = _parse_levels(kwargs["levels"])
        return cls(**kwargs)


def _parse_levels(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        out: list[int] = []
        for part in value.replace(";", " ").replace("|", " ").split():
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        return tuple(out)
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _parse_spec_string(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"arith spec item {item!r} is not key=value (example: 'n_prompts=500,seed=1,levels=0-4')")
        key, value = (s.strip() for s in item.split("=", 1))
        if key == "levels":
            out[key] = value
        elif key in ("n_prompts", "seed"):
            out[key] = int(value)
        elif key == "test_fraction":
            out[key] = float(value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------
# Pure helpers: evaluation of expressions, answer formats, splits, scoring.


def evaluate_expression(text: str) -> int:
    """Exact integer value of ``"a op b op c"`` with ``*`` binding tighter than ``+`` and ``-``."""
    tokens = re.findall(r"\d+|[+\-*]", text.replace(" ", "").rstrip("="))
    if not tokens or len(tokens) % 2 == 0:
        raise ValueError(f"not an arithmetic expression: {text!r}")
    terms: list[int] = []  # signed products
    sign, product = 1, int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            product *= int(num)
        else:
            terms.append(sign * product)
            sign, product = (1 if op == "+" else -1), int(num)
    terms.append(sign * product)
    return sum(terms)


def format_answer(value: int, answer_format: str = "reversed") -> str:
    """The response a perfect policy writes for `value`: ``format_answer(65) == "56"``; sign first."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r} unknown; use one of {ANSWER_FORMATS}")
    digits = str(abs(int(value)))
    body = digits[::-1] if answer_format == "reversed" else digits
    return ("-" if value < 0 else "") + body


def split_of(text: str, test_fraction: float = 0.2) -> str:
    """``"test"`` when the text's stable hash falls in the lowest `test_fraction`, else ``"train"``."""
    bucket = (make_prompt_id(DATASET, text) & 0xFFFFFFFF) / 2**32  # uniform in [0, 1)
    return "test" if bucket < test_fraction else "train"


_FINAL_INT = re.compile(r"-?\d+")


def score_arith(response: str, answer: str, *, answer_format: str = "reversed") -> tuple[int, str]:
    """Reward +1 when the last integer in `response` (read in `answer_format`) equals `answer`, else -1.

    Never raises: a response without an integer, or an unusable ground truth, scores -1 with a reason.
    Returns (reward, reason) with reason one of "correct", "wrong answer", "no integer in response",
    "bad ground truth".
    """
    try:
        truth = int(str(answer).strip())
    except (TypeError, ValueError):
        return -1, "bad ground truth"
    found = _FINAL_INT.findall(str(response)) if response is not None else []
    if not found:
        return -1, "no integer in response"
    text = found[-1]
    negative = text.startswith("-")
    digits = text.lstrip("-")
    if answer_format == "reversed":
        digits = digits[::-1]
    elif answer_format != "plain":
        return -1, f"unknown answer_format {answer_format!r}"
    value = -int(digits) if negative else int(digits)
    return (1, "correct") if value == truth else (-1, "wrong answer")


# ----------------------------------------------------------------------------------------------
# Generation


def _draw_problem(rng: random.Random, level: Level) -> str:
    """One expression for `level`; subtraction results are kept non-negative by redrawing."""
    while True:
        nums = []
        for d in level.digits:
            lo = 0 if d == 1 else 10 ** (d - 1)
            nums.append(rng.randint(lo, 10**d - 1))
        ops = [rng.choice(level.ops) for _ in range(level.n_operands - 1)]
        text = str(nums[0]) + "".join(op + str(n) for op, n in zip(ops, nums[1:]))
        if evaluate_expression(text) >= 0:
            return text + "="


def _level_meta(level_id: int, text: str, value: int) -> dict[str, Any]:
    level = LEVELS[level_id]
    nums = [int(n) for n in re.findall(r"\d+", text)]
    carries = 0
    if level.n_operands == 2 and "*" not in text:
        a, b = nums
        sub = "-" in text
        carry = 0
        while a or b:
            da, db = a % 10, b % 10
            if sub:
                carry = 1 if da - db - carry < 0 else 0
            else:
                carry = 1 if da + db + carry >= 10 else 0
            carries += carry
            a, b = a // 10, b // 10
    return {
        "level": level_id,
        "n_operands": level.n_operands,
        "digits": max(level.digits),
        "ops": "".join(sorted(set(re.findall(r"[+\-*]", text)))),
        "answer_digits": len(str(abs(value))),
        "carries": carries,
    }


def generate(config: ArithConfig, split: str) -> list[Prompt]:
    """`config.n_prompts` distinct prompts of `split`, levels interleaved round-robin, seeded.

    A level with few distinct problems (1-digit + has 100) contributes what its split holds; the
    others fill the remainder. Deterministic in (config, split).
    """
    if split not in SPLITS:
        raise ValueError(f"arith split {split!r} unknown; use one of {SPLITS}")
    rng = random.Random(f"{config.seed}:{split}")
    seen: set[str] = set()
    out: list[Prompt] = []
    active = list(config.levels)
    misses = {lv: 0 for lv in active}
    while len(out) < config.n_prompts and active:
        for level_id in list(active):
            if len(out) >= config.n_prompts:
                break
            text = _draw_problem(rng, LEVELS[level_id])
            if text in seen or split_of(text, config.test_fraction) != split:
                misses[level_id] += 1
                if misses[level_id] > 2000:  # this level's split is exhausted
                    active.remove(level_id)
                continue
            misses[level_id] = 0
            seen.add(text)
            value = evaluate_expression(text)
            meta = _level_meta(level_id, text, value)
            meta["answer_format"] = config.answer_format
            out.append(Prompt.new(DATASET, split, text, str(value), **meta))
    return out


@SOURCES.register("arith")
class ArithSource:
    """Task source `arith`: seeded synthetic arithmetic with exact integer answers.

    `load(spec, split=...)` takes None (defaults), an `ArithConfig`, a mapping of its fields, or a
    string such as ``"n_prompts=500,seed=1,levels=0-4"``. With `split=None` both splits are returned
    (train first).
    """

    name = DATASET

    def load(self, path_or_spec: Any = None, *, split: str | None = None) -> list[Prompt]:
        config = ArithConfig.from_spec(path_or_spec)
        splits = SPLITS if split is None else (split,)
        return [p for s in splits for p in generate(config, s)]

    @staticmethod
    def score(response: str, answer: str, *, answer_format: str = "reversed") -> tuple[int, str]:
        return score_arith(response, answer, answer_format=answer_format)


def load_arith(spec: Any = None, *, split: str | None = None) -> list[Prompt]:
    """Shorthand for `ArithSource().load(spec, split=split)`."""
    return ArithSource().load(spec, split=split)
