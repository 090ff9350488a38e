"""THE OSLA round loop (paper §4.1.3, Steps 2-4), shared by the embedded engine and verl.

    round 0   every prompt gets k_init rollouts (the cold start: `plan_round` on empty counts);
    round r   `v05_rl.allocation.plan_round(counts, sums, priors)` says how many more each prompt gets
              (Eq. 11-12, the cap floor(1/sqrt(c)), the 25 % halt rule, padding to pad_multiple);
              an all-zero plan ends the loop.

The loop knows nothing about models, tokens or verl: a *dispatch* function receives the plan (B,) and the
round index, generates `extra[i]` rollouts for each prompt i, and returns which prompt each new rollout
belongs to and its ±1 reward. The engine's dispatch calls its rollout backend; verl's repeats `DataProto`
rows and calls the agent-loop manager.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np

from v05_rl.allocation import OslaConfig, plan_round


class Dispatched(NamedTuple):
    """What one dispatch generated. Shapes: rows (n,) int64 prompt index of each rollout; rewards (n,) ±1."""

    rows: np.ndarray
    rewards: np.ndarray


DispatchFn = Callable[[np.ndarray, int], Dispatched]
"""(extra (B,) int64 rollouts to generate per prompt, round index) -> Dispatched."""


class Round(NamedTuple):
    """One dispatch: round index (0 = cold start), prompts that got rollouts, rollouts, seconds in dispatch."""

    index: int
    prompts: int
    rollouts: int
    seconds: float


class OslaResult(NamedTuple):
    """counts (B,) int64 rollouts per prompt (k_i); sums (B,) float64 Σ ±1 rewards per prompt; rounds: one
    `Round` per dispatch; t_plan: seconds spent in the planner; priors (B,) the priors used (resolved)."""

    counts: np.ndarray
    sums: np.ndarray
    rounds: tuple[Round, ...]
    t_plan: float
    priors: np.ndarray


def run_osla(
    priors: np.ndarray | Callable[[], np.ndarray],
    cfg: OslaConfig,
    dispatch: DispatchFn,
    *,
    n_prompts: int | None = None,
    max_rounds: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> OslaResult:
    """Cold start, then OSLA rounds until the planner asks for nothing (or `max_rounds` dispatches).

    priors: (B,) V per prompt, NaN = no prior; or a zero-argument callable returning them, called after the
    cold-start dispatch (the cold start gives every prompt k_init whatever the prior says, so the prior can be
    computed while round 0 generates, e.g. `future.result`); then `n_prompts` must be given.
    The cap bounds the loop by 1 + ceil((k_max - k_init) / step) dispatches; `max_rounds` is an optional
    tighter bound.
    """
    pending = priors if callable(priors) else None
    if pending is None:
        priors = _check_priors(priors, None)
        n = priors.shape[0]
    elif n_prompts is None:
        raise ValueError("run_osla: give n_prompts when the priors come from a callable")
    else:
        n = int(n_prompts)
        priors = np.full(n, np.nan)  # the cold start does not look at the prior
    counts = np.zeros(n, dtype=np.int64)  # [B]
    sums = np.zeros(n, dtype=np.float64)  # [B]
    rounds: list[Round] = []
    t_plan = 0.0
    while max_rounds is None or len(rounds) < max_rounds:
        t0 = clock()
        extra = np.asarray(plan_round(counts, sums, priors, cfg), dtype=np.int64)  # [B]
        t1 = clock()
        t_plan += t1 - t0
        if int(extra.sum()) == 0:
            break
        out = dispatch(extra, len(rounds))
        rows = np.asarray(out.rows, dtype=np.int64)  # [n]
        rewards = np.asarray(out.rewards, dtype=np.float64)  # [n]
        if rows.shape != rewards.shape or rows.size != int(extra.sum()):
            raise RuntimeError(
                f"OSLA dispatch of round {len(rounds)} asked for {int(extra.sum())} rollouts but returned "
                f"{rows.size} rows and {rewards.size} rewards"
            )
        counts += np.bincount(rows, minlength=n)
        sums += np.bincount(rows, weights=rewards, minlength=n)
        rounds.append(Round(len(rounds), int((extra > 0).sum()), int(rows.size), clock() - t1))
        if pending is not None:  # after the cold start: the planner needs the prior from now on
            priors, pending = _check_priors(pending(), n), None
    if not rounds and n:
        raise RuntimeError("OSLA: the planner dispatched nothing in the cold start; check OslaConfig.k_init")
    if pending is not None:
        priors = _check_priors(pending(), n)
    return OslaResult(counts, sums, tuple(rounds), t_plan, priors)


def _check_priors(priors: np.ndarray, n: int | None) -> np.ndarray:
    out = np.asarray(priors, dtype=np.float64)  # [B]
    if out.ndim != 1 or (n is not None and out.shape[0] != n):
        raise ValueError(f"priors: expected shape ({n if n is not None else 'B'},), one per prompt, got {out.shape}")
    return out


__all__ = ["DispatchFn", "Dispatched", "OslaResult", "Round", "run_osla"]
