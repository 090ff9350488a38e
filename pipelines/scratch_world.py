"""Scratch experiments that choose the embedded arith world by measurement (not a test, not the trainer).

    python -m pipelines.scratch_world warm --policy tiny-m --steps 600
    python -m pipelines.scratch_world grpo --policy tiny-m --minutes 10 --lr 1e-4

`warm` builds (or reuses) a warm-started family member and prints per-level mean@16 on the held-out
split plus the spread of per-prompt success rates. `grpo` runs a plain GRPO loop (group mean/std
advantages, PPO-clip, token-mean loss, no KL) with the project's rollout code and prints held-out
accuracy over time. Numbers from here go into the project report; the real trainer is v05_rl.trainer.
"""

from __future__ import annotations

import json
import time

import click
import numpy as np
import torch


def _threads() -> None:
    import os

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _eval(model, tok, test, sampling, k=16, seed=1234):
    from v0_data.tasks.arith import score_arith
    from v05_rl.evaluate import evaluate_policy

    return evaluate_policy(model, tok, test, score_arith, k=k, sampling=sampling, seed=seed)


def _print_eval(tag, res):
    lv = " ".join(f"{k}:{v['mean_at_k']:.2f}/{v['frac_in_0_1']:.2f}" for k, v in res["per_level"].items())
    print(f"[{tag}] mean@{res['k']}={res['mean_at_k']:.3f} in(0,1)={res['frac_in_0_1']:.2f} len={res['mean_tokens']:.2f} cut={res['frac_length']:.3f} | {lv}", flush=True)


@click.group()
def main() -> None:
    """Scratch experiments for the arith world."""


@main.command()
@click.option("--policy", default="tiny-m", help="family member")
@click.option("--steps", type=int, default=None, help="warm-start steps (default: the recipe's)")
@click.option("--lr", type=float, default=None, help="warm-start lr (default: the recipe's)")
@click.option("--arith-spec", default=None, help="warm-start arith spec (default: the recipe's)")
@click.option("--test-spec", default="n_prompts=800,seed=7", help="held-out arith spec (test split)")
def warm(policy, steps, lr, arith_spec, test_spec):
    """Warm-start (cached) and evaluate per level."""
    _threads()
    from v0_data.tasks.arith import ArithSource
    from v05_rl.policies import ensure_policy, load_policy
    from v05_rl.rollout import SamplingConfig

    over = {k: v for k, v in {"steps": steps, "lr": lr, "arith_spec": arith_spec}.items() if v is not None}
    t0 = time.perf_counter()
    path = ensure_policy(policy, overrides=over or None)
    print("policy", path, "build+load s", round(time.perf_counter() - t0, 1), json.loads((path / "v05_policy.json").read_text())["warm_start"])
    model, tok = load_policy(str(path))
    test = ArithSource().load(test_spec, split="test")
    for name, s in {"T1": SamplingConfig(1.0, 1.0, 12), "T1p0.7": SamplingConfig(1.0, 0.7, 12)}.items():
        t0 = time.perf_counter()
        res = _eval(model, tok, test, s)
        _print_eval(f"{policy} {name} {time.perf_counter() - t0:.1f}s", res)


@main.command()
@click.option("--policy", default="tiny-m", help="family member or path")
@click.option("--minutes", type=float, default=10.0, help="wall-clock budget")
@click.option("--lr", type=float, default=1e-4, help="Adam learning rate")
@click.option("--prompts", "n_prompts", type=int, default=32, help="prompts per step")
@click.option("--group", type=int, default=8, help="rollouts per prompt")
@click.option("--epochs", type=int, default=1, help="PPO epochs per batch")
@click.option("--clip", type=float, default=0.2, help="PPO clip epsilon")
@click.option("--eval-every", type=float, default=60.0, help="seconds between evaluations")
@click.option("--test-spec", default="n_prompts=800,seed=7", help="held-out arith spec")
@click.option("--train-spec", default="n_prompts=20000,seed=3", help="RL training prompts (train split)")
@click.option("--seed", type=int, default=0, help="seed")
def grpo(policy, minutes, lr, n_prompts, group, epochs, clip, eval_every, test_spec, train_spec, seed):
    """Plain GRPO on arith; prints held-out mean@16 (T=1, top-p 0.7) over time."""
    _threads()
    from v0_data.tasks.arith import ArithSource, score_arith
    from v05_rl.policies import load_policy
    from v05_rl.rollout import SamplingConfig, get_backend, sequence_logprobs_and_entropy

    model, tok = load_policy(policy)
    test = ArithSource().load(test_spec, split="test")
    train = ArithSource().load(train_spec, split="train")
    backend = get_backend("hf", model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sampling = SamplingConfig(1.0, 1.0, 8)
    eval_s = SamplingConfig(1.0, 0.7, 12)
    rng = np.random.default_rng(seed)
    res = _eval(model, tok, test, eval_s)
    _print_eval("step 0 t=0", res)
    start = time.perf_counter()
    last_eval, step, t_gen, t_upd = start, 0, 0.0, 0.0
    rewards_hist = []
    while time.perf_counter() - start < minutes * 60:
        step += 1
        idx = rng.choice(len(train), n_prompts, replace=False)
        batch_prompts = [train[i] for i in idx]
        t0 = time.perf_counter()
        b = backend.generate([p.text for p in batch_prompts], group, sampling, seed=seed * 100003 + step)
        t_gen += time.perf_counter() - t0
        r = np.array([score_arith(x, batch_prompts[i].answer)[0] for x, i in zip(b.responses, b.prompt_index)], dtype=np.float64)
        rewards_hist.append(r.mean())
        mean = np.bincount(b.prompt_index, r, n_prompts) / np.bincount(b.prompt_index, minlength=n_prompts)
        sq = np.bincount(b.prompt_index, r * r, n_prompts) / np.bincount(b.prompt_index, minlength=n_prompts)
        std = np.sqrt(np.maximum(sq - mean**2, 0.0))
        adv = (r - mean[b.prompt_index]) / (std[b.prompt_index] + 1e-6)
        t0 = time.perf_counter()
        a = torch.tensor(adv, dtype=torch.float32)[:, None]  # [N, 1]
        mask = b.response_mask
        model.train()
        for _ in range(epochs):
            stats = sequence_logprobs_and_entropy(model, b, 1.0)
            ratio = torch.exp(stats.logprobs - b.old_logprobs)  # [N, R]
            surr = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
            loss = -(surr * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        t_upd += time.perf_counter() - t0
        if time.perf_counter() - last_eval > eval_every:
            res = _eval(model, tok, test, eval_s)
            ent = float((stats.entropy.detach() * mask).sum() / mask.sum())
            _print_eval(f"step {step} t={time.perf_counter() - start:.0f} gen={t_gen:.0f} upd={t_upd:.0f} R={np.mean(rewards_hist[-20:]):.3f} H={ent:.3f}", res)
            last_eval = time.perf_counter()
    res = _eval(model, tok, test, eval_s)
    _print_eval(f"final step {step} t={time.perf_counter() - start:.0f}", res)


if __name__ == "__main__":
    main()
