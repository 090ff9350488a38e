"""Eq. 10's per-prompt 1/k weighting under verl's token-mean loss: a positive scale of each row's advantage.

Eq. 10 averages the PPO-clip terms of a prompt's k_i rollouts with weight 1/k_i, then averages over prompts;
with per-token ratios (as in verl and `v05_rl.losses`, "prompt-mean") a mini-batch b of rows R_b has

    L_b^Eq10 = (1 / U_b) Σ_{i ∈ R_b} (1 / k_g(i)) (1 / len_i) Σ_t ℓ_it,      U_b = Σ_{i ∈ R_b} 1 / k_g(i)

(ℓ_it the clipped surrogate of token t of rollout i, k_g the rollouts of prompt g in the whole batch, U_b
the number of prompts in b when their groups are whole). verl 0.9.1 instead computes, with
`loss_agg_mode=token-mean` (`core_algos.agg_loss`, engine workers `forward_backward_batch`):

    L_b^verl = Σ_{i ∈ R_b} Σ_t ℓ_it / T_b,      T_b = Σ_{i ∈ R_b} len_i  (all-reduced over data-parallel ranks),

each rank scaling its share by dp_size and the gradient all-reduce averaging, so that the step sees the
token-mean of the global mini-batch. A prompt extended to k = 16 then weighs ≈ 4× one stopped at k = 4.
The PPO-clip surrogate (with verl's dual clip and rollout-correction weights) is positively homogeneous in
the advantage: ℓ_it(w·A_i) = w·ℓ_it(A_i) for w > 0. So giving row i the advantage w_i·A_i with

    w_i = T_b / (U_b · k_g(i) · len_i)

makes verl's token-mean *equal* L_b^Eq10 for every mini-batch. The weights live here and are applied by
`RayV05Trainer` (`v05.loss_agg=prompt-mean`, the default) to `advantages` just for the actor update; the
estimator's advantages (and verl's advantage metrics) stay unweighted.

What is exact and what is not:
- Exact per mini-batch when the trainer knows verl's layout: rows are cut into dp_size contiguous chunks
  (one per rank, verl's DataProto dispatch) and each chunk into consecutive mini-batches
  (`tensordict_utils.make_iterator` with `actor.shuffle=false`, verl's default); the same mini-batches
  repeat in every PPO epoch. Micro-batching (`use_dynamic_bsz`) does not matter: the normaliser is the
  mini-batch's token count.
- A prompt whose rollouts fall into several mini-batches contributes a partial group to each; every
  rollout still weighs 1/k_g with k_g counted over the whole batch, so the sum over mini-batches of
  (U_b / G)·L_b is the full batch's Eq. 10 loss. One mini-batch per step (ppo_mini_batch_size =
  train_batch_size) is Eq. 10 on the whole batch.
- With `actor.shuffle=true` the mini-batches are random per rank: the relative weights inside any
  mini-batch stay exact (1 / (k·len)), but T_b / U_b is taken from the whole batch, so each step's
  overall scale is approximate (it is the ratio of tokens per prompt in the mini-batch to the batch's).
- Only the policy-gradient term is reweighted: verl aggregates a KL loss and the entropy bonus with
  token-mean (paper.yaml uses neither). Other `policy_loss.loss_mode`s than "vanilla" are refused by
  `check_v05_config`, as their token selection need not be homogeneous in A.
- Padding rows (`response_mask` all zero) get weight 0 and count in neither T_b nor U_b nor k.
"""

from __future__ import annotations

import numpy as np
import torch

LOSS_AGGS = ("prompt-mean", "token-mean")


def verl_minibatch_of_rows(n_rows: int, dp_size: int, mini_rows: int) -> np.ndarray:
    """Mini-batch index of each row under verl 0.9.1's update layout (no shuffle). Shape: (N,) int64.

    Rows [r·C, (r+1)·C) go to data-parallel rank r (C = N / dp_size); rank r's j-th mini-batch holds its
    rows [j·m, (j+1)·m) with m = mini_rows / dp_size; the global mini-batch j is the union over ranks.
    """
    if min(n_rows, dp_size, mini_rows) < 1 or n_rows % dp_size or mini_rows % dp_size or n_rows % mini_rows:
        raise ValueError(
            f"verl update layout: {n_rows} rows must split into mini-batches of {mini_rows} rows over {dp_size} "
            "data-parallel ranks (pad the batch with `osla.pad_for_update` to `osla.update_layout`'s size)"
        )
    chunk, per_rank = n_rows // dp_size, mini_rows // dp_size
    return (np.arange(n_rows) % chunk) // per_rank  # [N]


def prompt_mean_weights(group: np.ndarray, lengths: torch.Tensor, minibatch: np.ndarray) -> torch.Tensor:
    """w_i = T_b / (U_b · k_g(i) · len_i): the advantage scale that turns token-mean into Eq. 10's prompt-mean.

    group (N,) int64 prompt index of each row (any value for padding rows); lengths (N,) response tokens of
    each row (0 = padding); minibatch (N,) int64 mini-batch of each row. -> (N,) float64, 0 on padding.
    """
    length = lengths.to(torch.float64)  # [N]
    real = length > 0  # [N]
    g = torch.as_tensor(np.asarray(group), dtype=torch.long)  # [N]
    b = torch.as_tensor(np.asarray(minibatch), dtype=torch.long)  # [N]
    n_groups = int(g.max()) + 1 if g.numel() else 0
    k = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g[real], torch.ones_like(length[real]))  # [G]
    inv_k = torch.where(real, 1.0 / k[g].clamp(min=1.0), torch.zeros_like(length))  # [N]
    n_mb = int(b.max()) + 1 if b.numel() else 0
    tokens = torch.zeros(n_mb, dtype=torch.float64).index_add_(0, b, length)  # [M] T_b
    units = torch.zeros(n_mb, dtype=torch.float64).index_add_(0, b, inv_k)  # [M] U_b
    scale = tokens / units.clamp(min=1e-12)  # [M]
    return torch.where(real, scale[b] * inv_k / length.clamp(min=1.0), torch.zeros_like(length))  # [N]


__all__ = ["LOSS_AGGS", "prompt_mean_weights", "verl_minibatch_of_rows"]
