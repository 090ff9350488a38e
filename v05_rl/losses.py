"""Policy-loss pieces of Eq. 10: PPO-clip per token, the k3 KL estimate, and loss aggregation weights.

Pure torch functions, no config and no I/O. Where this departs from the paper, and why:
- Eq. 10 writes a sequence-level ratio ρ_i; like verl we use per-token ratios and clip per token (a
  product of token ratios over a long response is numerically useless).
- "prompt-mean" keeps Eq. 10's weighting: the token-mean of each response, averaged over the k_i
  responses of its prompt, averaged over prompts (a prompt with 16 rollouts weighs as much as one with 4).
- KL to the reference policy uses the k3 estimator (verl's `low_var_kl`, clamped to [-10, 10]).
"""

from __future__ import annotations

import torch

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "prompt-mean")


def row_weights(group: torch.Tensor, group_counts: torch.Tensor, lengths: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-token weight scale of each row so that Σ_t weight·loss_t / Σ weight is the chosen aggregation.

    - token-mean: every response token weighs 1.
    - seq-mean-token-mean: each response weighs 1 in total, spread evenly over its tokens (1/len).
    - prompt-mean (Eq. 10): each response weighs 1/k_g, spread over its tokens: (1/k_g)·(1/len).
    Shapes: group (N,), group_counts (G,), lengths (N,) -> (N,), to be multiplied by the response mask.
    """
    ones = torch.ones_like(lengths, dtype=torch.float64)
    if loss_agg == "token-mean":
        return ones
    per_seq = ones / lengths.clamp(min=1).to(torch.float64)  # [N]
    if loss_agg == "seq-mean-token-mean":
        return per_seq
    if loss_agg == "prompt-mean":
        return per_seq / group_counts[group].to(torch.float64)  # [N]
    raise ValueError(f"loss_agg {loss_agg!r} unknown; use one of {', '.join(LOSS_AGGS)}")


def ppo_clip_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A) (Eq. 10, token-level ratio).

    Shapes: logp, old_logp (N, R), adv (N,) -> loss (N, R), clipped indicator (N, R).
    """
    ratio = torch.exp(logp - old_logp)  # [N, R]
    a = adv[:, None]  # [N, 1]
    unclipped = -a * ratio  # [N, R]
    clipped = -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [N, R]
    loss = torch.maximum(unclipped, clipped)  # [N, R]
    return loss, (clipped > unclipped).to(logp.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π‖π_ref) per token, exp(ref − logp) − (ref − logp) − 1, clamped to [−10, 10]
    (verl's `low_var_kl`). Shapes: (N, R) -> (N, R)."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)  # [N, R]
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


__all__ = ["LOSS_AGGS", "k3_kl", "ppo_clip_loss", "row_weights"]
