"""Stage 3 of an embedded RL step: the PPO-clip policy update over every rollout of the step (Eq. 10).

With one PPO epoch and one mini-batch (the default) the update is exactly on-policy, so the "old"
log-probabilities are the detached current ones (ratio ≡ 1, clip fraction 0); otherwise they are
recomputed once per step by a forward pass, as verl does, rather than taken from the sampler. The loss of
a mini-batch is Σ_tokens weight · loss / Σ weight with the weights of `v05_rl.losses.row_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from v05_rl.losses import k3_kl, ppo_clip_loss, row_weights
from v05_rl.rollout import sequence_logprobs_and_entropy
from v05_rl.types import Chunk, UpdateStats


@dataclass(frozen=True)
class UpdateSettings:
    """The resolved loss settings of one run (from `TrainConfig`: optim + algorithm defaults)."""

    loss_agg: str
    clip_low: float
    clip_high: float
    kl_coef: float
    entropy_coef: float
    grad_clip: float
    ppo_epochs: int
    n_minibatches: int
    micro_batch_size: int
    temperature: float

    @property
    def on_policy(self) -> bool:
        return self.ppo_epochs == 1 and self.n_minibatches == 1


class RowIndex:
    """Global row ids over the chunks of a step; yields micro-batches one chunk at a time."""

    def __init__(self, chunks: Sequence[Chunk], micro_batch_size: int):
        self.chunks = chunks
        self.offsets = np.cumsum([0] + [len(c) for c in chunks])  # chunk j holds rows offsets[j]:offsets[j+1]
        self.micro = micro_batch_size

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def micro_batches(self, rows: np.ndarray) -> Iterator[tuple[Any, np.ndarray]]:
        """(sub-batch, global row ids) in micro-batches, one chunk at a time."""
        chunk_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for ci in np.unique(chunk_of):
            g = rows[chunk_of == ci]
            for s in range(0, len(g), self.micro):
                gg = g[s : s + self.micro]
                yield self.chunks[ci].batch.select(gg - self.offsets[ci]), gg


@torch.no_grad()
def frozen_logprobs(rows: RowIndex, nets: Sequence[torch.nn.Module | None], temperature: float) -> list[dict[int, torch.Tensor]]:
    """Per-row token log-probs (R,) of each net in `nets` (None -> empty dict), computed once per step."""
    out: list[dict[int, torch.Tensor]] = [{} for _ in nets]
    if all(net is None for net in nets):
        return out
    for sub, glob in rows.micro_batches(np.arange(len(rows))):
        for store, net in zip(out, nets):
            if net is None:
                continue
            lp = sequence_logprobs_and_entropy(net, sub, temperature).logprobs  # [n, R]
            store.update({int(g): lp[j] for j, g in enumerate(glob)})
    return out


def ppo_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, chunks: Sequence[Chunk], adv: np.ndarray,
               s: UpdateSettings, *, ref_model: torch.nn.Module | None, generator: torch.Generator) -> UpdateStats:
    """PPO-clip update over all rows of all chunks; returns token-averaged metrics.

    adv: (N,) advantages in chunk order. `generator` shuffles rows into mini-batches (n_minibatches > 1).
    """
    rows = RowIndex(chunks, s.micro_batch_size)
    n_rows = len(rows)
    all_group = torch.as_tensor(np.concatenate([c.group for c in chunks]))  # [N]
    group_counts = torch.bincount(all_group).to(torch.float64)  # [G]
    lengths = torch.cat([c.batch.response_mask.sum(-1).cpu() for c in chunks]).to(torch.float64)  # [N]
    row_scale = row_weights(all_group, group_counts, lengths, s.loss_agg)  # [N]
    adv_t = torch.as_tensor(adv, dtype=torch.float32)  # [N]

    model.eval()
    old_lp, ref_lp = frozen_logprobs(rows, (None if s.on_policy else model, ref_model), s.temperature)
    model.train()
    sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_frac": 0.0, "tokens": 0.0}
    grad_norms = []
    for _epoch in range(s.ppo_epochs):
        order = torch.randperm(n_rows, generator=generator).numpy() if s.n_minibatches > 1 else np.arange(n_rows)
        for mb in np.array_split(order, s.n_minibatches):
            if len(mb) == 0:
                continue
            mb = np.sort(mb)
            mb_t = torch.as_tensor(mb)
            denom = max(float((row_scale[mb_t] * lengths[mb_t]).sum()), 1e-12)  # Σ token weights
            optimizer.zero_grad(set_to_none=True)
            for sub, glob in rows.micro_batches(mb):
                _backward_micro(model, sub, glob, adv_t, row_scale, denom, s, old_lp, ref_lp if ref_model is not None else None, sums)
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)))
            optimizer.step()
    model.eval()
    tok = max(sums["tokens"], 1.0)
    return UpdateStats(
        pg_loss=sums["pg_loss"] / tok,
        kl=sums["kl"] / tok,
        entropy=sums["entropy"] / tok,
        clip_frac=sums["clip_frac"] / tok,
        grad_norm=float(np.mean(grad_norms)) if grad_norms else float("nan"),
        response_len=float(lengths.mean()) if n_rows else float("nan"),
    )


def batch_gradient(model: torch.nn.Module, chunks: Sequence[Chunk], adv: np.ndarray, s: UpdateSettings) -> torch.Tensor:
    """The gradient of the step's on-policy loss (ratio ≡ 1, no KL) at the current weights, flattened.

    What one optimizer step of `ppo_update` would follow (before clipping), without changing the model:
    used to measure how well a k-rollout batch gradient aligns with a reference (`v05 bench gradient`).
    Shapes: adv (N,) -> (P,) with P the number of trainable parameters.
    """
    rows = RowIndex(chunks, s.micro_batch_size)
    all_group = torch.as_tensor(np.concatenate([c.group for c in chunks]))  # [N]
    lengths = torch.cat([c.batch.response_mask.sum(-1).cpu() for c in chunks]).to(torch.float64)  # [N]
    row_scale = row_weights(all_group, torch.bincount(all_group).to(torch.float64), lengths, s.loss_agg)  # [N]
    denom = max(float((row_scale * lengths).sum()), 1e-12)
    adv_t = torch.as_tensor(adv, dtype=torch.float32)  # [N]
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    sums = {"pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_frac": 0.0, "tokens": 0.0}
    on_policy = UpdateSettings(**{**s.__dict__, "ppo_epochs": 1, "n_minibatches": 1, "kl_coef": 0.0, "entropy_coef": 0.0})
    for sub, glob in rows.micro_batches(np.arange(len(rows))):
        _backward_micro(model, sub, glob, adv_t, row_scale, denom, on_policy, {}, None, sums)
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])  # [P]
    model.zero_grad(set_to_none=True)
    return grad.detach().clone()


def _backward_micro(model, sub, glob: np.ndarray, adv_t: torch.Tensor, row_scale: torch.Tensor, denom: float,
                    s: UpdateSettings, old_lp: dict, ref_lp: dict | None, sums: dict[str, float]) -> None:
    """Forward one micro-batch, add its share of the mini-batch loss to the gradients, accumulate metrics."""
    glob_t = torch.as_tensor(glob)
    ts = sequence_logprobs_and_entropy(model, sub, s.temperature)
    logp, ent = ts.logprobs, ts.entropy  # [n, R]
    mask = sub.response_mask.to(logp.dtype)  # [n, R]
    old = logp.detach() if s.on_policy else torch.stack([old_lp[int(g)] for g in glob])
    pg, clipped = ppo_clip_loss(logp, old, adv_t[glob_t].to(logp.device), s.clip_low, s.clip_high)
    loss_tok = pg  # [n, R]
    kl = None
    if ref_lp is not None:
        kl = k3_kl(logp, torch.stack([ref_lp[int(g)] for g in glob]))  # [n, R]
        loss_tok = loss_tok + s.kl_coef * kl
    if s.entropy_coef:
        loss_tok = loss_tok - s.entropy_coef * ent
    wt = mask * row_scale[glob_t].to(device=mask.device, dtype=mask.dtype)[:, None]  # [n, R]
    ((loss_tok * wt).sum() / denom).backward()
    sums["tokens"] += float(mask.sum())
    sums["pg_loss"] += float((pg.detach() * mask).sum())
    sums["entropy"] += float((ent.detach() * mask).sum())
    sums["clip_frac"] += float((clipped * mask).sum())
    if kl is not None:
        sums["kl"] += float((kl.detach() * mask).sum())


__all__ = ["RowIndex", "UpdateSettings", "batch_gradient", "frozen_logprobs", "ppo_update"]
