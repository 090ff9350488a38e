"""Stage 1 of an embedded RL step: draw prompts, ask the prior, generate and score rollouts.

One collector per way of spending rollouts (the only place the engine branches on the algorithm):
- `collect_fixed`  every prompt gets k rollouts (grpo: G; v05-fixed: k);
- `collect_osla`   V0.5: cold start at k_init, then OSLA rounds (`v05_rl.osla_loop.run_osla`);
- `collect_dapo`   DAPO's dynamic sampling: fresh prompt batches until the batch holds B groups with
                   non-zero reward variance, or `dapo_max_tries` is spent (then it trains on what it has,
                   where verl would raise).
Every generated rollout is counted in `Collected.generated` and queued for the store through `record`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from v0_data.tasks.base import Prompt
from v05_rl.allocation import OslaConfig
from v05_rl.engine.sampler import derive_seed
from v05_rl.osla_loop import Dispatched, run_osla
from v05_rl.priors import PriorSource, check_priors
from v05_rl.types import Chunk, Collected, zero_variance

RewardFn = Callable[[Sequence[Prompt], Sequence[str]], np.ndarray]
"""(prompts aligned with responses, responses) -> ±1 rewards. Shapes: (N,), (N,) -> (N,)."""
RecordFn = Callable[[Sequence[Prompt], Any, np.ndarray], None]
"""(prompts of the call, RolloutBatch, rewards (N,)) -> None: queue rollouts for the store."""


def default_reward_fn(prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
    """±1 rewards of `responses[i]` to `prompts[i]`, graded by `v0_data.rewards` by each prompt's dataset
    (arith: exact integer match; math data sets: math-verify). Shapes: (N,), (N,) -> (N,) float64."""
    from v0_data.rewards import score_batch

    out = np.empty(len(responses), dtype=np.float64)  # [N]
    by_ds: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_ds.setdefault(p.dataset, []).append(i)
    for ds, idx in by_ds.items():
        scored = score_batch(ds, [responses[i] for i in idx], [prompts[i].answer for i in idx])
        out[idx] = np.asarray(scored.rewards, dtype=np.float64)
    return out


class RolloutSource:
    """Generates rollouts with a backend and scores them: `(prompts, n, seed) -> (batch, rewards)`.

    backend: anything with `generate(texts, n_per_prompt, sampling, *, seed) -> RolloutBatch`.
    """

    def __init__(self, backend: Any, reward_fn: RewardFn, sampling: Any, record: RecordFn | None = None):
        self.backend, self.reward_fn, self.sampling, self.record = backend, reward_fn, sampling, record

    def __call__(self, prompts: Sequence[Prompt], n: int | Sequence[int], seed: int, *, record: bool = True):
        batch = self.backend.generate([p.text for p in prompts], n, self.sampling, seed=seed)
        idx = np.asarray(batch.prompt_index, dtype=np.int64).reshape(-1)  # [N]
        rewards = np.asarray(self.reward_fn([prompts[i] for i in idx], list(batch.responses)), dtype=np.float64)
        if rewards.shape != idx.shape or not np.all(np.abs(rewards) == 1.0):
            raise ValueError(f"reward_fn must return one ±1 reward per response (shape {idx.shape}), got {rewards[:8]!r}")
        if record and self.record is not None:
            self.record(prompts, batch, rewards)
        return batch, rewards


def query_priors(source: PriorSource, prompts: Sequence[Prompt], name: str) -> tuple[np.ndarray, float]:
    """(priors (B,) checked to lie in [-1, 1] or be NaN, seconds spent in the source)."""
    t0 = time.perf_counter()
    priors = check_priors(source.priors(prompts), len(prompts), name)
    return priors, time.perf_counter() - t0


def collect_fixed(prompts: list[Prompt], k: int, gen: RolloutSource, seed: int, *, priors: np.ndarray | None = None,
                  t_prior: float = 0.0) -> Collected:
    """k rollouts for every prompt in one generation call (GRPO's G, or V0.5 with a fixed k)."""
    t0 = time.perf_counter()
    batch, rewards = gen(prompts, k, seed)
    idx = np.asarray(batch.prompt_index, dtype=np.int64)
    chunk = Chunk(batch, idx, rewards)
    priors = np.full(len(prompts), np.nan) if priors is None else priors
    return Collected(prompts, [chunk], priors, generated=len(rewards),
                     zero_var=float(np.mean(zero_variance(rewards, idx, len(prompts)))),
                     t_prior=t_prior, t_generate=time.perf_counter() - t0)


PriorFn = Callable[[], np.ndarray]
"""() -> priors (B,) in [-1, 1] or NaN: the prior source's answer for the step's prompts, computed on demand."""


def collect_osla(prompts: list[Prompt], priors: np.ndarray | PriorFn, osla: OslaConfig, gen: RolloutSource,
                 seed_of: Callable[[int], int], *, t_prior: float = 0.0) -> Collected:
    """V0.5's cold start and OSLA rounds; round r is generated with seed `seed_of(r)`.

    priors: (B,) V per prompt, or a zero-argument function computing them. The cold start gives every
    prompt k_init rollouts whatever the prior says, so a function is run on a worker thread while round 0
    generates, and the planner waits for it only before round 1 (paper §4.1.3: the prior is needed by
    Eq. 12 only). Then `t_prior` is the seconds the function itself ran (overlapped with generation,
    not added to the step); with an array, `t_prior` is whatever the caller measured. Either way the
    priors are identical, so a run's results do not depend on the overlap.
    """
    chunks: list[Chunk] = []

    def dispatch(extra: np.ndarray, rnd: int) -> Dispatched:
        sel = np.flatnonzero(extra > 0)  # prompts that get rollouts this round
        sub = [prompts[i] for i in sel]
        batch, rewards = gen(sub, extra[sel].tolist(), seed_of(rnd))
        rows = sel[np.asarray(batch.prompt_index, dtype=np.int64)]  # [n] index into `prompts`
        chunks.append(Chunk(batch, rows, rewards))
        return Dispatched(rows, rewards)

    bound = max(1, math.ceil((osla.cap - osla.k_init) / osla.step) + 1) + 1  # cold start + extra rounds
    if callable(priors):
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="v05-prior") as pool:
            job = pool.submit(_timed, priors)
            res = run_osla(lambda: job.result()[0], osla, dispatch, n_prompts=len(prompts), max_rounds=bound)
            t_prior = job.result()[1]
    else:
        res = run_osla(priors, osla, dispatch, max_rounds=bound)
    col = Collected(prompts, chunks, res.priors, generated=int(res.counts.sum()), osla_rounds=len(res.rounds) - 1,
                    t_prior=t_prior, t_alloc=res.t_plan, t_generate=sum(r.seconds for r in res.rounds))
    return _with_zero_var(col)


def _timed(fn: PriorFn) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _with_zero_var(col: Collected) -> Collected:
    return replace(col, zero_var=float(np.mean(zero_variance(col.rewards, col.group, len(col.prompts)))))


def collect_dapo(draw: Callable[[int], list[Prompt]], n_prompts: int, group_size: int, tries: int, gen: RolloutSource,
                 seed_of: Callable[[int], int]) -> Collected:
    """DAPO dynamic sampling: keep groups with non-zero reward variance until `n_prompts` are kept.

    draw(m) returns the next m prompts of the run's order; try t is generated with seed `seed_of(t)`.
    """
    t0 = time.perf_counter()
    prompts: list[Prompt] = []
    chunks: list[Chunk] = []
    generated = zero_var = n_groups = attempt = 0
    for attempt in range(1, tries + 1):
        cand = draw(n_prompts)
        batch, rewards = gen(cand, group_size, seed_of(attempt - 1))
        idx = np.asarray(batch.prompt_index, dtype=np.int64)
        generated += len(rewards)
        flat = zero_variance(rewards, idx, len(cand))  # [B]
        keep = np.flatnonzero(~flat)
        n_groups += len(cand)
        zero_var += int(flat.sum())
        keep = keep[: n_prompts - len(prompts)]
        if len(keep):
            remap = np.full(len(cand), -1, dtype=np.int64)
            remap[keep] = np.arange(len(keep)) + len(prompts)
            rows = np.flatnonzero(remap[idx] >= 0)
            chunks.append(Chunk(batch.select(rows), remap[idx[rows]], rewards[rows]))
            prompts.extend(cand[i] for i in keep)
        if len(prompts) >= n_prompts:
            break
    return Collected(prompts, chunks, np.full(len(prompts), np.nan), generated=generated, dapo_tries=attempt,
                     zero_var=zero_var / max(n_groups, 1), t_generate=time.perf_counter() - t0)


__all__ = [
    "PriorFn",
    "RecordFn",
    "RewardFn",
    "RolloutSource",
    "collect_dapo",
    "collect_fixed",
    "collect_osla",
    "default_reward_fn",
    "query_priors",
]
