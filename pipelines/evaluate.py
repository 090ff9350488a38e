"""Recipe of `v05 evaluate`: mean@k of a policy on a task source, per data set (paper §4.1.4: temperature
1.0, top-p 0.7, k = 16), scored by each data set's verifiable reward (`v0_data.rewards.score_one`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipelines.common import write_json


def evaluate(policy: str, *, tasks: str = "arith", tasks_path: str | None = None, split: str = "test",
             n_prompts: int | None = None, k: int = 16, temperature: float = 1.0, top_p: float = 0.7,
             max_new_tokens: int = 16, seed: int = 0, device: str = "cpu", out: Path | None = None) -> dict[str, Any]:
    """Evaluate `policy` on the first `n_prompts` prompts of `split`; print and return {dataset: result}.

    With `out`, the results are also written there as JSON (policy, tasks, k, results).
    """
    from v05_rl.engine import load_task_prompts, resolve_device
    from v05_rl.policies import load_policy
    from v05_rl.rollout import SamplingConfig

    prompts = load_task_prompts(tasks, tasks_path, split)
    if n_prompts:
        prompts = prompts[:n_prompts]
    model, tokenizer = load_policy(policy, resolve_device(device))
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    by_ds: dict[str, list] = {}
    for p in prompts:
        by_ds.setdefault(p.dataset, []).append(p)
    results = {ds: evaluate_dataset(model, tokenizer, ds, group, k, sampling, seed) for ds, group in by_ds.items()}
    if len(results) > 1:
        avg = sum(r["mean_at_k"] for r in results.values()) / len(results)
        click.echo(f"average over {len(results)} data sets: {avg:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {"policy": policy, "tasks": tasks, "k": k, "results": results}, indent=2)
    return results


def evaluate_dataset(model, tokenizer, dataset: str, prompts: list, k: int, sampling, seed: int) -> dict[str, Any]:
    """mean@k on the prompts of one data set (per-prompt rows dropped); prints the figure and its levels."""
    from v0_data.rewards import score_one
    from v05_rl.evaluate import evaluate_policy

    def reward(response, answer):
        return score_one(dataset, response, answer).reward

    res = evaluate_policy(model, tokenizer, prompts, reward, k, sampling, seed=seed, progress=True)
    res.pop("per_prompt", None)
    click.echo(f"{dataset}: mean@{k} = {res['mean_at_k']:.4f} over {res['n_prompts']} prompts "
               f"(share of prompts with 0 < rate < 1: {res['frac_in_0_1']:.3f})")
    for level, row in res.get("per_level", {}).items():
        click.echo(f"  {str(level):>12}  n={row['n']:<5d} mean@{k}={row['mean_at_k']:.4f}")
    return res


__all__ = ["evaluate", "evaluate_dataset"]
