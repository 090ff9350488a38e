"""Verifiable rewards: every response scores +1 (correct) or -1 (wrong), always with a reason.

Rewards are `r ∈ {-1, +1}` as in the paper (Sec. 2.1; its Eq. 6 noise bound 1/k relies on rewards in {-1, 1}).
A scorer never raises on what a policy wrote: an empty, unparseable or pathological response is a -1 with
a reason, so one bad sample cannot stop a training loop. Misuse by the *caller* (an unknown data source,
responses and answers of different lengths) still raises at once.

Scorers, chosen by data-source name from `REWARDS` (`score_batch` / `compute_score`):
- `math`: the answer inside the last top-level `\\boxed{...}` of the response (the whole response when it
  has none) is compared with the ground truth by `math-verify` (`parse` + `verify`): fractions vs decimals,
  `\\dfrac` vs `/`, units, sets, intervals, equations `x = 3` are handled there.
- `arith`: exact integer match, delegated to `v0_data.tasks.arith.score_arith(response, answer)`
  (imported on first use).

Why worker processes. `math-verify` bounds each parse/compare with `signal.alarm`, which works only
in the main thread of a process; inside a trainer (reward worker threads, Ray actors, async loops) it
raises instead. The `math` scorer therefore sends chunks of responses to a small module-level pool of
worker processes (`TimeoutPool` over `pebble.ProcessPool`, `min(4, CPUs)` workers, started on first
use), each running math-verify in its own main thread so that the signal timeouts (`timeout_s` per
parse/compare) work. On top of those, every chunk has a hard deadline counted from the moment a worker
took it; a worker that misses it (stuck in C code, where signals do not reach) is killed and replaced,
and its responses score -1 "timeout (worker killed)". A worker that crashes has its chunk retried once
on a fresh worker, then its responses score -1 "scorer failed: worker crashed twice".
Workers are started with multiprocessing's `spawn` method (fresh interpreters: forking a process that
runs torch or Ray threads can deadlock), so the usual multiprocessing rule applies to scripts: a script
that scores at import time needs an `if __name__ == "__main__":` guard (the `v05` CLI, pytest and Ray
workers have one). A daemonic process (e.g. a dataloader worker) may not start processes: there the
scorer runs inline, as with `use_pool=False`. A forked child starts its own workers instead of sharing
its parent's; workers are shut down at interpreter exit.
`MathRewardConfig(use_pool=False)` scores in the calling process instead (signal timeouts only on the
main thread; none elsewhere).

Deviations: the paper states only that training and evaluation use rule-based correctness rewards
without a formatting reward (Sec. 4.1.4); DAPO's own grader matches the text after
"Answer:". We use math-verify on the last `\\boxed{}` as the issue asks; it accepts more equivalent
forms, so absolute accuracies are not comparable with numbers graded by string match.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from v0_data.registry import Registry

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Typed results
# ---------------------------------------------------------------------------------------------------


class RewardResult(NamedTuple):
    """One scored response: `reward` is +1 or -1, `reason` a short human-readable explanation."""

    reward: int
    reason: str


class ScoredBatch(NamedTuple):
    """Scores of N responses.

    rewards: (N,) int8, each +1 or -1.
    reasons: N strings, one per response.
    """

    rewards: np.ndarray  # [N] int8
    reasons: list[str]


BatchScorer = Callable[[Sequence[str], Sequence[Any], "Sequence[dict | None] | None"], ScoredBatch]

REWARDS: Registry = Registry("reward")
"""Reward functions by name: `fn(responses, answers, extra_infos=None) -> ScoredBatch`.

`extra_infos` (one dict or None per response, verl's `extra_info`) carries per-prompt options, e.g.
`answer_format` for `arith`."""

# verl data-source names (and other common ones) that are graded as `math`.
MATH_DATA_SOURCES = frozenset(
    {
        "math_dapo",
        "dapomath",
        "dapo_math",
        "lighteval/MATH",
        "DigitalLearningGmbH/MATH-lighteval",
        "HuggingFaceH4/MATH-500",
        "math500",
        "openai/gsm8k",
        "gsm8k",
        "aime",
        "aime24",
        "aime25",
        "aime2024",
        "aime2025",
        "amc",
        "amc23",
        "BytedTsinghua-SIA/DAPO-Math-17k",
        "BytedTsinghua-SIA/AIME-2024",
        "minerva",
        "olympiadbench",
    }
)
_MATH_PREFIXES = ("math", "aime", "amc", "dapo", "gsm8k", "olympiad", "minerva", "numina", "deepscaler")


def resolve_data_source(data_source: str) -> str:
    """Name of the reward in `REWARDS` that grades `data_source`.

    A registered name maps to itself; the math data sets verl and the paper use (`math_dapo`,
    `lighteval/MATH`, `aime24`, ... and any name starting with math/aime/amc/dapo/gsm8k/olympiad/
    minerva/numina/deepscaler, case-insensitive, after an optional `org/`) map to `math`.
    Anything else raises `KeyError` naming the valid choices.
    """
    if data_source in REWARDS:
        return data_source
    if data_source in MATH_DATA_SOURCES:
        return "math"
    base = data_source.rsplit("/", 1)[-1].lower()
    if base.startswith(_MATH_PREFIXES):
        return "math"
    valid = ", ".join(REWARDS.names())
    raise KeyError(
        f"no reward for data source {data_source!r}; registered rewards: {valid}; math data sources: "
        f"{', '.join(sorted(MATH_DATA_SOURCES))} (or any name starting with {', '.join(_MATH_PREFIXES)}). "
        "Fix: rename the data_source column, or register a reward with "
        "`@v0_data.rewards.REWARDS.register(name)`."
    )


def score_batch(
    data_source: str,
    responses: Sequence[str],
    answers: Sequence[Any],
    extra_infos: Sequence[dict | None] | None = None,
) -> ScoredBatch:
    """Score N responses against N ground truths with the reward of `data_source`.

    Shape: responses (N,), answers (N,), extra_infos (N,) or None -> rewards (N,) int8 in {-1, +1},
    reasons (N,).
    """
    if len(responses) != len(answers) or (extra_infos is not None and len(extra_infos) != len(responses)):
        extra = "" if extra_infos is None else f" and {len(extra_infos)} extra_infos"
        raise ValueError(
            f"score_batch: {len(responses)} responses but {len(answers)} answers{extra}; pass one answer "
            "(and extra_info) per response (repeat a prompt's answer for each of its rollouts)"
        )
    return REWARDS.get(resolve_data_source(data_source))(responses, answers, extra_infos)


def score_one(data_source: str, response: str, answer: Any, extra_info: dict | None = None) -> RewardResult:
    """Score a single response (see `score_batch`)."""
    batch = score_batch(data_source, [response], [answer], [extra_info])
    return RewardResult(int(batch.rewards[0]), batch.reasons[0])


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    return_dict: bool = False,
    **kwargs: Any,
) -> float | dict[str, float]:
    """verl custom reward function: `custom_reward_function.path=<this file>`, `.name=compute_score`.

    Returns the reward as a float (+1.0 or -1.0). With `return_dict=True` (set it through
    `custom_reward_function.reward_kwargs`) it returns `{"score": ±1.0, "acc": 1.0 or 0.0}`, the dict
    form verl's reward managers accept (`score` is the reward, other keys are logged as extra info;
    every call returns the same keys, all numeric, so verl can average them). `extra_info` is passed
    to the reward (e.g. `answer_format` for `arith`); other keyword arguments verl passes are ignored.
    Never raises on the response.
    """
    del kwargs
    result = score_one(data_source, solution_str, ground_truth, extra_info if isinstance(extra_info, dict) else None)
    score = float(result.reward)
    if return_dict:
        return {"score": score, "acc": 1.0 if result.reward > 0 else 0.0}
    return score


def compute_score_batch(
    data_sources: Sequence[str],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[dict | None] | None = None,
    *,
    return_dict: bool = False,
    **kwargs: Any,
) -> list[float] | list[dict[str, float]]:
    """verl batched reward function (`reward_model.reward_manager=batch`,
    `custom_reward_function.name=compute_score_batch`): one call per batch, so the `math` workers
    score the batch in parallel. Same values as `compute_score`, in input order. Shape: (N,) -> (N,).
    """
    del kwargs
    n = len(solution_strs)
    if not (len(data_sources) == len(ground_truths) == n) or (extra_infos is not None and len(extra_infos) != n):
        raise ValueError(
            f"compute_score_batch: {len(data_sources)} data_sources, {n} solution_strs, {len(ground_truths)} "
            f"ground_truths{'' if extra_infos is None else f', {len(extra_infos)} extra_infos'}; pass one of each per response"
        )
    infos = [x if isinstance(x, dict) else None for x in (extra_infos if extra_infos is not None else [None] * n)]
    groups: dict[str, list[int]] = {}
    for i, ds in enumerate(data_sources):
        groups.setdefault(resolve_data_source(ds), []).append(i)
    rewards = np.zeros(n, dtype=np.int8)  # [N]
    for name, idx in groups.items():
        batch = REWARDS.get(name)([solution_strs[i] for i in idx], [ground_truths[i] for i in idx], [infos[i] for i in idx])
        rewards[idx] = batch.rewards
    if return_dict:
        return [{"score": float(r), "acc": 1.0 if r > 0 else 0.0} for r in rewards]
    return [float(r) for r in rewards]


# ---------------------------------------------------------------------------------------------------
# Answer extraction (pure string functions)
# ---------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """Top-level `\\boxed{...}` / `\\fbox{...}` spans as (start, content_start, content_end).

    Braces are matched, so `\\boxed{\\frac{1}{2}}` yields `\\frac{1}{2}`; a box nested inside another is
    part of the outer span, not a span of its own. An unclosed box is ignored.
    """
    spans = []
    i = 0
    n = len(text)
    while i < n:
        starts = [(text.find(cmd, i), cmd) for cmd in _BOX_COMMANDS]
        starts = [(s, cmd) for s, cmd in starts if s >= 0]
        if not starts:
            break
        start, cmd = min(starts)
        j = start + len(cmd)
        while j < n and text[j] == " ":
            j += 1
        if j >= n or text[j] != "{":
            i = start + len(cmd)
            continue
        depth = 0
        k = j
        while k < n:
            if text[k] == "{" and text[k - 1] != "\\":
                depth += 1
            elif text[k] == "}" and text[k - 1] != "\\":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        if depth != 0:  # unclosed: ignore and move on
            i = j + 1
            continue
        spans.append((start, j + 1, k))
        i = k + 1
    return spans


def last_boxed(text: str) -> str | None:
    """Content of the last top-level `\\boxed{}` in `text`, unwrapped from nested boxes; None if none.

    >>> last_boxed(r"so \\boxed{1} or rather \\boxed{\\boxed{\\frac{1}{2}}}.")
    '\\\\frac{1}{2}'
    """
    spans = _boxed_spans(text)
    if not spans:
        return None
    _, lo, hi = spans[-1]
    content = text[lo:hi].strip()
    while True:  # \boxed{\boxed{x}} -> x
        inner = _boxed_spans(content)
        if len(inner) == 1 and inner[0][0] == 0 and inner[0][2] == len(content) - 1:
            content = content[inner[0][1] : inner[0][2]].strip()
        else:
            return content


# ---------------------------------------------------------------------------------------------------
# math-verify on one (response, answer): runs inside a pool worker (or in-process as a fallback)
# ---------------------------------------------------------------------------------------------------


_INTEGER = re.compile(r"-?\d+")


def _plain_integer(text: str) -> int | None:
    """The value of `text` when it is a bare integer such as "42" or "-7" (after trimming `$` and spaces)."""
    text = text.strip().strip("$").strip()
    if len(text) > 1000 or not _INTEGER.fullmatch(text):  # leave giant numbers to math-verify
        return None
    return int(text)


def _gold_text(answer: str) -> str:
    boxed = last_boxed(answer)
    return answer.strip() if boxed is None else boxed


def _integer_verdict(response: str, answer: str) -> tuple[int, str] | None:
    """Exact verdict when the last boxed answer and the ground truth are both bare integers, else None.

    Every DAPO-Math-17k and AIME answer is an integer; comparing them as integers gives math-verify's
    verdict (tests check this) without parsing LaTeX, and needs no timeout, so it runs in the caller.
    """
    g = _plain_integer(_gold_text(answer))
    if g is None:
        return None
    boxed = last_boxed(response)
    r = _plain_integer(boxed) if boxed else None
    if r is None:
        return None
    return (1, f"correct (\\boxed{{}}: {r})") if g == r else (-1, f"wrong (\\boxed{{}}: {r} vs {g})")


_GOLD_CACHE: dict[tuple[str, int | None], tuple[Any, str]] = {}
_GOLD_CACHE_SIZE = 4096


def _parse_gold(gold_text: str, timeout_s: int | None) -> tuple[Any, str]:
    """(parsed gold or None, failure reason); memoised, since every rollout of a prompt shares its gold."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify.errors import TimeoutException

    key = (gold_text, timeout_s)
    hit = _GOLD_CACHE.get(key)
    if hit is not None:
        return hit
    latex, expr = LatexExtractionConfig(), ExprExtractionConfig()
    try:
        gold = parse("\\boxed{" + gold_text + "}", [latex], parsing_timeout=timeout_s, raise_on_error=True)
        if not gold:
            gold = parse(gold_text, [latex, expr], parsing_timeout=timeout_s, raise_on_error=True)
        result = (gold, "") if gold else (None, f"unparseable ground truth {gold_text!r}")
    except TimeoutException:
        return None, "timeout while parsing the ground truth"  # not memoised: may pass next time
    except Exception as exc:  # noqa: BLE001 - math-verify/sympy raise anything
        result = (None, f"unparseable ground truth {gold_text!r}: {type(exc).__name__}")
    if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
        _GOLD_CACHE.clear()
    _GOLD_CACHE[key] = result
    return result


def verify_math(response: str, answer: str, timeout_s: int | None, *, fast_path: bool = True) -> tuple[int, str]:
    """±1 and a reason for one response; every math-verify error or timeout becomes -1.

    `timeout_s` bounds each parse and each compare via `signal.alarm` (None: no bound, for threads).
    `fast_path`: decide bare-integer pairs with `_integer_verdict`; False always runs math-verify.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    latex = LatexExtractionConfig()
    expr = ExprExtractionConfig()

    if fast_path:
        verdict = _integer_verdict(response, answer)
        if verdict is not None:
            return verdict
    gold_text = _gold_text(answer)
    gold, why = _parse_gold(gold_text, timeout_s)
    if gold is None:
        return -1, why

    boxed = last_boxed(response)
    try:
        if boxed is not None:
            if not boxed:
                return -1, "empty \\boxed{}"
            pred = parse("\\boxed{" + boxed + "}", [latex, expr], parsing_timeout=timeout_s, raise_on_error=True)
            where = "\\boxed{}"
        else:
            pred = parse(response, [latex, expr], parsing_timeout=timeout_s, raise_on_error=True)
            where = "response (no \\boxed{})"
    except TimeoutException:
        return -1, "timeout while parsing the response"
    except Exception as exc:  # noqa: BLE001
        return -1, f"unparseable response: {type(exc).__name__}"
    if not pred:
        if boxed is None:
            return -1, "no \\boxed{} and no parseable answer"
        return -1, f"unparseable \\boxed{{{_short(boxed)}}}"

    timed_out = False
    for g in gold:
        for t in pred:
            try:
                if verify(g, t, timeout_seconds=timeout_s, raise_on_error=True):
                    return 1, f"correct ({where}: {_short(str(pred[-1]))})"
            except TimeoutException:
                timed_out = True
            except Exception:  # noqa: BLE001 - an error on one pair must not hide the others
                pass
    if timed_out:
        return -1, "timeout while comparing"
    return -1, f"wrong ({where}: {_short(str(pred[-1]))} vs {_short(gold_text)})"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verify_math_chunk(items: list[tuple[str, str]], timeout_s: int) -> list[tuple[int, str]]:
    """Pool task: score a chunk of (response, answer) pairs in the worker's main thread."""
    return [verify_math(r, a, timeout_s) for r, a in items]


def warm_up_worker() -> None:
    """Pool initializer: import math-verify (and sympy) before the worker takes its first task, so the
    import is not counted in a task's deadline. A failure is left for the task to report."""
    try:
        import math_verify  # noqa: F401
    except Exception:  # noqa: BLE001 - the task's own import raises it again, with its reason
        pass


# ---------------------------------------------------------------------------------------------------
# The worker pool
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MathRewardConfig:
    """How the `math` reward runs math-verify."""

    timeout_s: int = field(
        default=5,
        metadata={"help": "seconds math-verify may spend on one parse or one compare (signal.alarm, whole seconds)"},
    )
    workers: int = field(default=0, metadata={"help": "worker processes for math-verify; 0 = min(4, CPU count)"})
    chunk_size: int = field(default=16, metadata={"help": "responses sent to a worker per task"})
    hard_timeout_slack_s: float = field(
        default=5.0,
        metadata={"help": "extra seconds a task may run past its math-verify budget before its worker is killed"},
    )
    startup_timeout_s: float = field(
        default=120.0,
        metadata={"help": "seconds the pool may go without starting or finishing a task before the batch gives up "
                          "(workers that cannot start: importing sympy/math-verify hangs)"},
    )
    use_pool: bool = field(
        default=True,
        metadata={"help": "False: run math-verify in the calling process (signal timeouts only on the main thread)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int) or self.timeout_s < 1:
            raise ValueError(
                f"MathRewardConfig.timeout_s={self.timeout_s!r}: math-verify's signal.alarm takes whole "
                "seconds; set an integer >= 1"
            )
        if self.workers < 0:
            raise ValueError(f"MathRewardConfig.workers={self.workers}: set 0 (automatic) or a positive count")
        if self.chunk_size < 1:
            raise ValueError(f"MathRewardConfig.chunk_size={self.chunk_size}: set a positive integer")
        if self.hard_timeout_slack_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("MathRewardConfig.hard_timeout_slack_s and startup_timeout_s must be > 0 seconds")

    @property
    def n_workers(self) -> int:
        return self.workers or max(1, min(4, os.cpu_count() or 1))

    def task_deadline_s(self, n_items: int) -> float:
        """Hard bound on one task of `n_items` responses: per item a gold parse, a response parse and
        up to 4 compares (math-verify returns ≤ 2 candidates each), each ≤ timeout_s, plus the slack."""
        return n_items * 6 * self.timeout_s + self.hard_timeout_slack_s


class Outcome(NamedTuple):
    """Result of one pool task: `ok` False means it failed (`error` says how: "timeout", a crash, ...)."""

    ok: bool
    value: Any
    error: str


class TimeoutPool:
    """Worker processes with a hard deadline per task: a thin layer over `pebble.ProcessPool`.

    `run(fn, arg_tuples, task_deadline_s)` runs `fn(*args)` for every tuple and returns one `Outcome`
    per tuple, in order. pebble counts a task's deadline from the moment a worker took it; a task past
    it gets `Outcome(False, None, "timeout")` and its worker is killed (SIGTERM, then SIGKILL: signals
    cannot stop code stuck in C) and replaced. A task whose worker crashed is retried once on a fresh
    worker, then reported as "worker crashed twice"; an exception raised by the task is reported as
    "<type>: <message>". If for `startup_timeout_s` no task of the call starts or finishes (workers
    that cannot start), the rest fail with "no worker could start" and the pool is rebuilt next time.
    Workers are `spawn`ed (fresh interpreters; forking a process that runs torch or Ray threads can
    deadlock) and run `initializer` (default `warm_up_worker`) before their first task. `fn` and
    `initializer` must be picklable by reference (module-level functions). Calls are serialised by a
    lock. A forked child gets a pool of its own.
    """

    def __init__(self, workers: int, startup_timeout_s: float = 120.0, initializer: Callable[[], Any] | None = None):
        if workers < 1:
            raise ValueError(f"TimeoutPool needs at least 1 worker, got {workers}")
        self.n_workers = workers
        self.startup_timeout_s = startup_timeout_s
        self.initializer = initializer  # None: `warm_up_worker`
        self._pool = None  # pebble.ProcessPool, started on first use
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _pebble_pool(self):
        """The pebble pool of this process, (re)built when missing, broken, or inherited through fork."""
        from pebble import ProcessPool

        if self._pid != os.getpid():  # forked child: those workers are the parent's; never stop them here
            self._pool, self._pid = None, os.getpid()
        if self._pool is not None and not self._pool.active:
            self._stop()
        if self._pool is None:
            from v0_data.rewards import warm_up_worker  # by its importable name (see `_run_in_pool`)

            self._pool = ProcessPool(
                max_workers=self.n_workers,
                initializer=self.initializer or warm_up_worker,
                context=multiprocessing.get_context("spawn"),
            )
        return self._pool

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join()

    def shutdown(self) -> None:
        """Stop every worker (they restart on the next `run`)."""
        with self._lock:
            if self._pid != os.getpid():
                self._pool, self._pid = None, os.getpid()
            self._stop()

    def run(self, fn: Callable, arg_tuples: Sequence[tuple], task_deadline_s: float) -> list[Outcome]:
        arg_tuples = list(arg_tuples)
        outcomes: list[Outcome | None] = [None] * len(arg_tuples)
        with self._lock:
            todo = list(range(len(arg_tuples)))
            for attempt in range(2):  # a task whose worker crashed runs once more on a fresh worker
                if not todo:
                    break
                pool = self._pebble_pool()
                futures = [pool.schedule(fn, args=arg_tuples[i], timeout=task_deadline_s) for i in todo]
                self._wait(futures)
                crashed = []
                for i, future in zip(todo, futures):
                    outcomes[i] = _outcome(future, "worker crashed twice" if attempt else None)
                    if outcomes[i] is None:
                        crashed.append(i)
                todo = crashed
        return [o if o is not None else Outcome(False, None, "not run") for o in outcomes]

    def _wait(self, futures: list) -> None:
        """Wait for every future; give up on the rest when none starts or finishes for startup_timeout_s.

        On any interruption (e.g. Ctrl-C mid-batch) the unfinished tasks are cancelled, which kills
        their workers: a late answer must never reach the next call.
        """
        from concurrent.futures import FIRST_COMPLETED, wait

        pending, last_progress = set(futures), time.monotonic()
        try:
            while pending:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                if done or any(f.running() for f in pending):
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > self.startup_timeout_s:
                    logger.warning("math-verify workers did not start within %.0f s; giving up on %d tasks",
                                   self.startup_timeout_s, len(pending))
                    break
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        if pending:  # stalled: cancelled tasks report "no worker could start"; the pool is rebuilt next time
            for f in pending:
                f.cancel()
            self._stop()


def _outcome(future, crash_error: str | None) -> Outcome | None:
    """The `Outcome` of a finished pebble future; None for a crashed worker when `crash_error` is None."""
    from concurrent.futures import CancelledError
    from concurrent.futures import TimeoutError as FutureTimeout  # the builtin TimeoutError from 3.11 on

    from pebble import ProcessExpired

    try:
        return Outcome(True, future.result(timeout=0), "")
    except (TimeoutError, FutureTimeout):
        return Outcome(False, None, "timeout")
    except ProcessExpired:
        return None if crash_error is None else Outcome(False, None, crash_error)
    except CancelledError:
        return Outcome(False, None, "no worker could start (start-up timeout)")
    except Exception as exc:  # noqa: BLE001 - the task's own exception, or a broken pool
        return Outcome(False, None, f"{type(exc).__name__}: {exc}")


_POOL: TimeoutPool | None = None
_POOL_LOCK = threading.Lock()
_CONFIG = MathRewardConfig()
_ATEXIT_REGISTERED = False
_WARNED_DAEMON = False


def configure_math_reward(config: MathRewardConfig) -> None:
    """Use `config` for the `math` reward from now on (restarts the workers if their number changes)."""
    global _CONFIG
    if not isinstance(config, MathRewardConfig):
        raise TypeError(f"configure_math_reward expects a MathRewardConfig, got {type(config).__name__}")
    old, _CONFIG = _CONFIG, config
    if old.n_workers != config.n_workers or old.startup_timeout_s != config.startup_timeout_s:
        shutdown_pool()


def math_reward_config() -> MathRewardConfig:
    """The configuration the `math` reward uses now."""
    return _CONFIG


def _get_pool() -> TimeoutPool:
    global _POOL, _ATEXIT_REGISTERED
    with _POOL_LOCK:
        if not _ATEXIT_REGISTERED:  # on first use, not at import
            atexit.register(shutdown_pool)
            _ATEXIT_REGISTERED = True
        if _POOL is None:
            _POOL = TimeoutPool(_CONFIG.n_workers, _CONFIG.startup_timeout_s)
        return _POOL


def shutdown_pool() -> None:
    """Stop the math-verify worker processes (they restart on the next call). Runs at exit."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown()


def _run_inline(items: list[tuple[str, str]], timeout_s: int) -> list[tuple[int, str]]:
    on_main = threading.current_thread() is threading.main_thread()
    return [verify_math(r, a, timeout_s if on_main else None) for r, a in items]


def _in_daemon_process() -> bool:
    """Whether this is a daemonic multiprocessing child, which may not start worker processes."""
    global _WARNED_DAEMON
    if not multiprocessing.current_process().daemon:
        return False
    if not _WARNED_DAEMON:
        logger.warning("math reward: daemonic process, scoring inline (no worker processes, no hard deadline)")
        _WARNED_DAEMON = True
    return True


def _run_in_pool(items: list[tuple[str, str]], cfg: MathRewardConfig) -> list[tuple[int, str]]:
    """Score (response, answer) pairs in the worker pool, `cfg.chunk_size` per task; a failed task
    gives each of its responses -1 with the failure as the reason."""
    chunks = [items[s : s + cfg.chunk_size] for s in range(0, len(items), cfg.chunk_size)]
    deadline = cfg.task_deadline_s(min(cfg.chunk_size, len(items)))
    # pickled by reference as v0_data.rewards.verify_math_chunk even when verl loaded this file
    # under another module name (custom_reward_function.path), which a worker could not import
    from v0_data.rewards import verify_math_chunk

    outcomes = _get_pool().run(verify_math_chunk, [(c, cfg.timeout_s) for c in chunks], deadline)
    results: list[tuple[int, str]] = []
    for chunk, out in zip(chunks, outcomes):
        if out.ok:
            results.extend(out.value)
        else:
            reason = "timeout (worker killed)" if out.error == "timeout" else f"scorer failed: {out.error}"
            results.extend([(-1, reason)] * len(chunk))
    return results

# ---------------------------------------------------------------------------------------------------
# Registered rewards
# ---------------------------------------------------------------------------------------------------


def _answer_text(answer: Any) -> str | None:
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        return None
    if isinstance(answer, (list, tuple)):  # some verl sets hold a list of acceptable answers
        return str(answer[0]) if len(answer) == 1 else None
    return str(answer)


@REWARDS.register("math")
def math_reward(
    responses: Sequence[str], answers: Sequence[Any], extra_infos: Sequence[dict | None] | None = None
) -> ScoredBatch:
    """`math`: math-verify on the last `\\boxed{}` (or the whole response). Shape: (N,), (N,) -> (N,)."""
    del extra_infos  # no per-prompt options
    cfg = _CONFIG
    n = len(responses)
    rewards = np.full(n, -1, dtype=np.int8)  # [N]
    reasons = [""] * n
    todo: list[int] = []
    for i, (resp, ans) in enumerate(zip(responses, answers)):
        gold = _answer_text(ans)
        if gold is None or not gold.strip():
            reasons[i] = "no ground truth"
        elif not isinstance(resp, str) or not resp.strip():
            reasons[i] = "empty response"
        else:
            verdict = _integer_verdict(resp, gold)
            if verdict is None:
                todo.append(i)  # needs math-verify
            else:
                rewards[i], reasons[i] = verdict
    if not todo:
        return ScoredBatch(rewards, reasons)

    items = [(responses[i], _answer_text(answers[i])) for i in todo]
    if cfg.use_pool and not _in_daemon_process():
        results = _run_in_pool(items, cfg)
    else:
        results = _run_inline(items, cfg.timeout_s)
    for i, (reward, reason) in zip(todo, results):
        rewards[i] = 1 if reward > 0 else -1
        reasons[i] = reason
    return ScoredBatch(rewards, reasons)


@REWARDS.register("arith")
def arith_reward(
    responses: Sequence[str], answers: Sequence[Any], extra_infos: Sequence[dict | None] | None = None
) -> ScoredBatch:
    """`arith`: exact integer match via `v0_data.tasks.arith.score_arith`. Shape: (N,), (N,) -> (N,).

    An `answer_format` in a response's extra_info (the prompt's meta, carried by the verl export) is
    passed on; otherwise `score_arith`'s default applies.
    """
    from v0_data.tasks.arith import score_arith

    n = len(responses)
    rewards = np.full(n, -1, dtype=np.int8)  # [N]
    reasons = [""] * n
    for i, (resp, ans) in enumerate(zip(responses, answers)):
        info = extra_infos[i] if extra_infos is not None else None
        fmt = info.get("answer_format") if isinstance(info, dict) else None
        try:
            kwargs = {"answer_format": fmt} if isinstance(fmt, str) else {}
            reward, reason = score_arith(resp if isinstance(resp, str) else "", ans, **kwargs)
        except Exception as exc:  # noqa: BLE001 - never raise on a response
            reward, reason = -1, f"scorer failed: {type(exc).__name__}: {exc}"
        rewards[i] = 1 if reward > 0 else -1
        reasons[i] = reason
    return ScoredBatch(rewards, reasons)


__all__ = [
    "REWARDS",
    "MATH_DATA_SOURCES",
    "MathRewardConfig",
    "Outcome",
    "RewardResult",
    "ScoredBatch",
    "TimeoutPool",
    "compute_score",
    "compute_score_batch",
    "configure_math_reward",
    "last_boxed",
    "math_reward",
    "arith_reward",
    "math_reward_config",
    "resolve_data_source",
    "score_batch",
    "score_one",
    "shutdown_pool",
    "verify_math",
    "verify_math_chunk",
    "warm_up_worker",
]
