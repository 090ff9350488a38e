"""mean@k evaluation: sample k responses per prompt and average the per-prompt success rates.

As in the paper's evaluation (temperature 1.0, top-p 0.7, k = 16): a prompt's success rate is the
share of its k responses with positive reward; mean@k is the mean of these over prompts; the
per-level table groups prompts by ``meta["level"]`` (arith) or, failing that, by dataset.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from v0_data.tasks.base import Prompt
from v05_rl.rollout import RolloutBackend, SamplingConfig, get_backend

EVAL_SAMPLING = SamplingConfig(temperature=1.0, top_p=0.7, max_new_tokens=16)

RewardFn = Callable[[str, Any], Any]  # (response, answer) -> reward or (reward, reason); success = reward > 0


def _reward_value(result: Any) -> float:
    value = result[0] if isinstance(result, tuple) else result
    return float(value)


def success_rates(rewards: np.ndarray, prompt_index: np.ndarray, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt (successes, counts) from per-sample rewards. Shapes: (N,), (N,) -> (n_prompts,), (n_prompts,)."""
    wins = np.bincount(prompt_index, weights=(rewards > 0).astype(np.float64), minlength=n_prompts)
    counts = np.bincount(prompt_index, minlength=n_prompts)
    return wins, counts


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    reward_fn: RewardFn,
    k: int = 16,
    sampling: SamplingConfig = EVAL_SAMPLING,
    *,
    backend: RolloutBackend | None = None,
    seed: int = 0,
    prompts_per_call: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """mean@k of `model` on `prompts`.

    Returns a dict: ``mean_at_k`` (float), ``k``, ``n_prompts``, ``per_prompt`` ({prompt_id: success
    rate}), ``per_level`` ({level: {"n": prompts, "mean_at_k": ..., "frac_in_0_1": share of prompts with
    0 < rate < 1}}), ``frac_in_0_1`` (all prompts), ``mean_tokens`` (response length) and
    ``frac_length`` (share of responses cut at max_new_tokens).
    Deterministic in `seed` (each chunk of prompts is sampled with seed + chunk number).
    """
    if k < 1:
        raise ValueError(f"evaluate_policy: k must be >= 1, got {k}")
    if not prompts:
        raise ValueError("evaluate_policy: no prompts given")
    backend = backend or get_backend("hf", model, tokenizer)
    n = len(prompts)
    rates = np.zeros(n)
    tokens, cut, total = 0.0, 0, 0
    starts = range(0, n, prompts_per_call)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", leave=False)
    for chunk_no, start in enumerate(starts):
        chunk = prompts[start : start + prompts_per_call]
        batch = backend.generate([p.text for p in chunk], k, sampling, seed=seed + chunk_no)
        rewards = np.array([_reward_value(reward_fn(r, chunk[i].answer)) for r, i in zip(batch.responses, batch.prompt_index)])
        wins, counts = success_rates(rewards, batch.prompt_index, len(chunk))
        rates[start : start + len(chunk)] = wins / np.maximum(counts, 1)
        tokens += float(batch.n_tokens.sum())
        cut += sum(r == "length" for r in batch.finish_reason)
        total += len(batch)
    return {
        "mean_at_k": float(rates.mean()),
        "k": k,
        "n_prompts": n,
        "per_prompt": {p.prompt_id: float(r) for p, r in zip(prompts, rates)},
        "per_level": per_level_rates(prompts, rates),
        "frac_in_0_1": float(((rates > 0) & (rates < 1)).mean()),
        "mean_tokens": tokens / max(total, 1),
        "frac_length": cut / max(total, 1),
    }


def per_level_rates(prompts: Sequence[Prompt], rates: np.ndarray) -> dict[Any, dict[str, float]]:
    """{level (meta "level", else the dataset): {"n", "mean_at_k", "frac_in_0_1"}} in level order.
    Shapes: rates (n,) success rate per prompt."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p.meta.get("level", p.dataset)].append(i)
    return {
        level: {
            "n": len(idx),
            "mean_at_k": float(rates[idx].mean()),
            "frac_in_0_1": float(((rates[idx] > 0) & (rates[idx] < 1)).mean()),
        }
        for level, idx in sorted(groups.items(), key=lambda kv: str(kv[0]).zfill(8))
    }


__all__ = ["EVAL_SAMPLING", "evaluate_policy", "per_level_rates", "success_rates"]
