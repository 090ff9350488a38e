"""Sequential OSLA rollouts on verl `DataProto`s: `v05_rl.osla_loop.run_osla` with a verl dispatch.

Per training batch of B prompts (paper §4.1.3, Steps 2-4):
    round 0   every prompt gets k_init rollouts (the cold start; `plan_round` on empty counts);
    round r   `v05_rl.allocation.plan_round(counts, sums, priors)` says how many more each prompt gets
              (+step while k < k_target of Eq. 12, cap floor(1/sqrt(c)), global 25 % halt rule, and the
              extra dispatch padded to a multiple of pad_multiple by giving rollouts to the prompts that
              still need most); an all-zero plan ends the loop.
Each dispatch repeats the selected prompt rows (keeping each prompt's `uid`) and goes to anything with
verl's `generate_sequences(DataProto) -> DataProto` signature; the scored rows are unioned with their
prompt rows and concatenated, so the final batch holds every real rollout, grouped by `uid`, with
unequal group sizes.

Padding, two kinds, both never trained on:
- *Dispatch fillers*: verl's `AgentLoopManager` splits a dispatch evenly over its agent-loop workers
  (`DataProto.chunk` refuses uneven splits), so a dispatch must be a multiple of `dispatch_multiple`
  (the lcm of pad_multiple and the worker count). The planner already pads extra rounds with useful
  rollouts; when it cannot (cold start with B·k_init not a multiple, or every prompt at the cap) the
  remainder is filled with copies of real prompts. Their generations are dropped: they never enter the
  training batch and are not counted in k.
- *Update padding* (`pad_for_update`): the number of rollouts N varies from step to step, while verl's
  update needs N to split into whole mini-batches on every data-parallel rank. The batch is padded with
  copies whose `response_mask` is all zero (no loss, advantage 0 in the `v05` estimator, own uid).

Nothing here imports Ray or needs a GPU; only `verl.protocol.DataProto`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from v0_data.tasks.base import Prompt
from v05_rl.allocation import OslaConfig
from v05_rl.estimators import fuse
from v05_rl.osla_loop import Dispatched, run_osla
from v05_rl.verl.estimator import scores_to_pm1
from verl import DataProto

PAD_UID_PREFIX = "__v05_pad__"


class RolloutManager(Protocol):
    """What the round logic needs from verl's `AgentLoopManager`."""

    def generate_sequences(self, prompts: DataProto) -> DataProto: ...


class RoundStats(NamedTuple):
    """One dispatch.  round: 0 = cold start; prompts: how many got rollouts; rollouts: real rollouts;
    fillers: copies added to reach `dispatch_multiple` (generated, then dropped); seconds: wall time of
    generation + scoring."""

    round: int
    prompts: int
    rollouts: int
    fillers: int
    seconds: float


class OslaRollouts(NamedTuple):
    """Everything generated for one batch of B prompts, N real rollouts in all.

    batch:      DataProto of N rows (prompt columns unioned with generation outputs, `uid` per prompt)
    prompt_row: (N,) int64, which input prompt each row belongs to
    counts:     (B,) int64, rollouts per prompt (k_i)
    sums:       (B,) int64, Σ of each prompt's ±1 rewards
    priors:     (B,) float64, the prior V used (NaN = none; resolved after the cold start when given as a callable)
    rounds:     one RoundStats per dispatch
    timing:     verl's agent-loop timing of the dispatches, summed per key
    """

    batch: DataProto
    prompt_row: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    priors: np.ndarray
    rounds: tuple[RoundStats, ...]
    timing: dict[str, float]


def sequence_rewards(rows: DataProto, reward_map: str = "pm1") -> np.ndarray:
    """±1 reward of each row from verl's token-level `rm_scores`.  Shape: (n,) int64."""
    if "rm_scores" not in rows.batch.keys():
        raise ValueError(
            "OSLA round: the generated rows carry no 'rm_scores'; the agent loop must score rollouts "
            "(rule-based reward, reward.reward_model.enable_resource_pool=false) or pass score_rows"
        )
    return scores_to_pm1(rows.batch["rm_scores"].sum(dim=-1), reward_map).to(torch.int64).cpu().numpy()


def _fillers(selected: np.ndarray, n_fill: int, n_prompts: int) -> np.ndarray:
    """Prompt rows to copy as dispatch fillers: cycle through the selected ones (or all prompts)."""
    pool = selected if selected.size else np.arange(n_prompts)
    return np.resize(pool, n_fill).astype(np.int64)


def _checked_inputs(prompt_batch: DataProto, gen_batch: DataProto, priors: Any, dispatch_multiple: int) -> Any:
    """`generate_osla`'s inputs refused with a message naming the fix; priors as float64 (B,) or the callable."""
    n_prompts = len(prompt_batch)
    if len(gen_batch) != n_prompts:
        raise ValueError(f"gen_batch has {len(gen_batch)} rows but prompt_batch has {n_prompts}; pass the same prompts")
    if "uid" not in prompt_batch.non_tensor_batch:
        raise ValueError("prompt_batch has no 'uid' column; give every prompt a uid before generating")
    if not callable(priors):
        priors = np.asarray(priors, dtype=np.float64)
        if priors.shape != (n_prompts,):
            raise ValueError(f"priors: expected shape ({n_prompts},), one per prompt, got {priors.shape}")
    if dispatch_multiple < 1:
        raise ValueError(f"dispatch_multiple must be >= 1, got {dispatch_multiple}")
    return priors


def generate_osla(
    prompt_batch: DataProto,
    gen_batch: DataProto,
    priors: np.ndarray | Callable[[], np.ndarray],
    manager: RolloutManager,
    cfg: OslaConfig,
    *,
    dispatch_multiple: int = 1,
    reward_map: str = "pm1",
    score_rows: Callable[[DataProto], DataProto] | None = None,
    max_rounds: int | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> OslaRollouts:
    """Run the cold start and the OSLA rounds for one batch; see the module docstring.

    prompt_batch: B rows that stay on the driver (at least `uid`; verl keeps the reward columns here);
    gen_batch: the same B prompts as sent to generation (verl's `_get_gen_batch`); priors: (B,) V per prompt,
    or a zero-argument callable returning them, called after the cold-start dispatch (round 0 does not look
    at the prior, so it can be computed meanwhile, e.g. `future.result` of a thread).
    score_rows: optional hook adding `rm_scores` to generated rows when the agent loop does not score them.
    max_rounds: optional bound on the number of dispatches (the cap already bounds it by
    1 + ceil((k_max - k_init) / step)).
    """
    n_prompts = len(prompt_batch)
    priors = _checked_inputs(prompt_batch, gen_batch, priors, dispatch_multiple)

    parts: list[DataProto] = []
    rows_of: list[np.ndarray] = []
    fillers: list[int] = []
    timing: dict[str, float] = {}

    def dispatch(extra: np.ndarray, rnd: int) -> Dispatched:
        selected = np.repeat(np.arange(n_prompts), extra)  # [n] grouped by prompt
        n_fill = -selected.size % dispatch_multiple
        dispatch_idx = np.concatenate([selected, _fillers(selected, n_fill, n_prompts)])
        out = manager.generate_sequences(gen_batch.select_idxs(dispatch_idx))
        if len(out) != dispatch_idx.size:
            raise RuntimeError(f"generate_sequences returned {len(out)} rows for a dispatch of {dispatch_idx.size}")
        for key, value in (out.meta_info.pop("timing", None) or {}).items():
            timing[key] = timing.get(key, 0.0) + float(value)
        rows = prompt_batch.select_idxs(selected).union(out.select_idxs(np.arange(selected.size)))
        if score_rows is not None and "rm_scores" not in rows.batch.keys():
            rows = score_rows(rows)
        parts.append(rows)
        rows_of.append(selected)
        fillers.append(int(n_fill))
        return Dispatched(selected, sequence_rewards(rows, reward_map))

    res = run_osla(priors, cfg, dispatch, n_prompts=n_prompts, max_rounds=max_rounds, clock=clock)
    rounds = [RoundStats(r.index, r.prompts, r.rollouts, f, r.seconds) for r, f in zip(res.rounds, fillers)]
    batch = parts[0] if len(parts) == 1 else DataProto.concat(_align_columns(parts))
    sums = res.sums.astype(np.int64)  # ±1 rewards: the sums are whole numbers
    return OslaRollouts(batch, np.concatenate(rows_of), res.counts, sums, res.priors, tuple(rounds), timing)


def _align_columns(parts: list[DataProto]) -> list[DataProto]:
    """Give every round the same non-tensor columns (a column missing in one round, e.g. an optional
    agent-loop field, is filled with None there) so that `DataProto.concat` accepts them."""
    keys = set().union(*(p.non_tensor_batch.keys() for p in parts))
    for p in parts:
        for key in keys - p.non_tensor_batch.keys():
            filler = np.empty(len(p), dtype=object)
            filler[:] = None
            p.non_tensor_batch[key] = filler
    return parts


def osla_metrics(result: OslaRollouts, cfg: OslaConfig) -> dict[str, float]:
    """Scalars to log for one batch (prefix `v05/`): k, extra rollouts, prior rejection, ŵ, rounds.

    rejection_rate: among prompts with a prior, the fraction whose hypothesis test (Eq. 7) rejects it,
    Δ̂² > 0 at the final k. w_mean: mean ŵ (Eq. 8) over all prompts (1 where no prior).
    """
    k = result.counts.astype(np.float64)  # [B]
    mean = result.sums / k  # [B]
    fz = fuse(mean, k, result.priors, method=cfg.method)
    has = ~np.isnan(result.priors)
    out = {
        "v05/k_mean": float(k.mean()),
        "v05/k_max": float(k.max()),
        "v05/k_min": float(k.min()),
        "v05/rollouts": float(k.sum()),
        "v05/extra_rollouts": float(k.sum() - cfg.k_init * k.size),
        "v05/prompts_extended": float((k > cfg.k_init).mean()),
        "v05/rounds": float(len(result.rounds)),
        "v05/fillers": float(sum(r.fillers for r in result.rounds)),
        "v05/prior_coverage": float(has.mean()),
        "v05/w_mean": float(np.mean(fz.w)),
        "v05/mu_mean": float(np.mean(fz.mu)),
        "v05/success_rate": float(((mean + 1) / 2).mean()),
    }
    if has.any():
        out["v05/rejection_rate"] = float((fz.delta2[has] > 0).mean())
        out["v05/prior_abs_err"] = float(np.abs(mean[has] - result.priors[has]).mean())
    for r in result.rounds:
        out[f"v05/round_{r.round}/prompts"] = float(r.prompts)
        out[f"v05/round_{r.round}/rollouts"] = float(r.rollouts)
        out[f"timing_s/v05_round_{r.round}"] = float(r.seconds)
    return out


def update_layout(n_rows: int, n_mini_batches: int, dp_size: int, rollout_n: int) -> tuple[int, int]:
    """Size the update for a batch of `n_rows` real rollouts: (rows after padding, ppo_mini_batch_size).

    The number of mini-batches (optimizer steps per epoch) stays the configured one; each mini-batch
    holds `mini` rows, a multiple of q = lcm(dp_size, rollout_n) (verl multiplies ppo_mini_batch_size by
    rollout.n and splits the mini-batch over the data-parallel ranks):
        mini = ceil(n_rows / (n_mini_batches · q)) · q,   padded rows = n_mini_batches · mini,
        ppo_mini_batch_size = mini / rollout_n  (in verl's prompt units).
    Padding is therefore below n_mini_batches · q rows.
    """
    if min(n_rows, n_mini_batches, dp_size, rollout_n) < 1:
        raise ValueError(
            f"update_layout: expected positive sizes, got n_rows={n_rows}, n_mini_batches={n_mini_batches}, "
            f"dp_size={dp_size}, rollout_n={rollout_n}"
        )
    q = math.lcm(dp_size, rollout_n)
    mini = math.ceil(n_rows / (n_mini_batches * q)) * q
    return n_mini_batches * mini, mini // rollout_n


def pad_for_update(batch: DataProto, n_total: int) -> DataProto:
    """Append `n_total - len(batch)` masked copies of leading rows (response_mask = 0, own uid, no reward).

    The copies keep real token ids, so log-prob passes over them are well defined, but they carry no
    loss and get advantage 0 from the `v05` estimator. Shape: N rows → n_total rows.
    """
    n = len(batch)
    n_pad = n_total - n
    if n_pad < 0:
        raise ValueError(f"pad_for_update: batch has {n} rows, more than the target {n_total}")
    if n_pad == 0:
        return batch
    if "response_mask" not in batch.batch.keys():
        raise ValueError("pad_for_update: the batch needs a 'response_mask' (compute_response_mask) first")
    pad = batch.select_idxs(np.resize(np.arange(n), n_pad))
    pad.batch["response_mask"] = torch.zeros_like(pad.batch["response_mask"])
    for key in ("rm_scores", "token_level_scores", "token_level_rewards"):
        if key in pad.batch.keys():
            pad.batch[key] = torch.zeros_like(pad.batch[key])
    if "reward_baselines" in pad.batch.keys():
        pad.batch["reward_baselines"] = torch.full_like(pad.batch["reward_baselines"], float("nan"))
    pad.non_tensor_batch["uid"] = np.array([f"{PAD_UID_PREFIX}{i}" for i in range(n_pad)], dtype=object)
    return DataProto.concat([batch, pad])


def is_padding(batch: DataProto) -> np.ndarray:
    """(N,) bool: rows added by `pad_for_update`."""
    uids = batch.non_tensor_batch["uid"]
    return np.fromiter((str(u).startswith(PAD_UID_PREFIX) for u in uids), dtype=bool, count=len(uids))


# --------------------------------------------------------------------------------------------------
# prompts of a verl batch, for the prior source
# --------------------------------------------------------------------------------------------------


def prompts_from_rows(non_tensor_batch: Mapping[str, np.ndarray]) -> list[Prompt]:
    """`Prompt`s of a verl RL batch (columns of verl's RL parquet: data_source, prompt, reward_model,
    extra_info), with the same id rule as the `parquet` task source: `extra_info.prompt_id` when the file
    carries one (written by `v05 data export-verl`), else `make_prompt_id(data_source, text)`."""
    from v0_data.tasks.parquet import row_to_prompt

    n = len(next(iter(non_tensor_batch.values())))
    keys = ("data_source", "prompt", "reward_model", "extra_info", "ability")
    if "prompt" not in non_tensor_batch and "raw_prompt" not in non_tensor_batch:
        raise ValueError("verl batch has neither 'prompt' nor 'raw_prompt'; the RL parquet needs a 'prompt' column")
    out = []
    for i in range(n):
        row: dict[str, Any] = {k: non_tensor_batch[k][i] for k in keys if k in non_tensor_batch}
        if "prompt" not in row:
            row["prompt"] = non_tensor_batch["raw_prompt"][i]
        out.append(row_to_prompt(row, "verl batch", i))
    return out


@dataclass(frozen=True)
class PromptIndex:
    """prompt_id → Prompt for every prompt seen so far (the V0 source embeds its context by id)."""

    by_id: dict[int, Prompt] = field(default_factory=dict)

    def add(self, prompts: Sequence[Prompt]) -> None:
        for p in prompts:
            self.by_id.setdefault(p.prompt_id, p)


__all__ = [
    "OslaRollouts",
    "PAD_UID_PREFIX",
    "PromptIndex",
    "RolloutManager",
    "RoundStats",
    "generate_osla",
    "is_padding",
    "osla_metrics",
    "pad_for_update",
    "prompts_from_rows",
    "sequence_rewards",
    "update_layout",
]
