"""The difficulty bank: what V0 learns about prompts across policies, as one kernel-ridge function.

A prompt that is hard for one policy tends to be hard for the others (in the V0 release, a ridge probe
fitted on all six (model, step) contexts together ranks held-out prompts far better than one fitted per
context: gAUC 0.67 vs 0.61). The in-context head alone cannot use this, since it sees one policy's
context only. The bank stores the shared part learned in pre-training:

    t_j   = mean over the rows of prompt j of (rate - mean rate of the row's (model, step))
    d(x)  = sum_j alpha_j k(x, x_j),   k(a, b) = exp(-|a - b|^2 / (2 l^2)),  x = L2-normalised pooled embedding
    alpha = (K + lam * diag(1 / n_j))^-1 t            (kernel ridge; n_j rows measured prompt j)

d(x) is a key-centred success-rate offset ("how much easier than average"); the head turns it into a
per-policy prior mean and lets the context rescale it (heads/kernel.py). Length scale l and ridge lam are
chosen from a small grid by exact leave-one-out error (closed form, one solve per grid point):

    loo_j = t_j - alpha_j / [H^-1]_jj,   H = K + lam * diag(1 / n_j)

A bank prompt is never scored with its own label: `forward` returns the leave-one-out value for ids
stored in the bank, and the kernel prediction for any other prompt. So V0 sees the same kind of
difficulty value for a training prompt, a context prompt of a later user, and a brand-new query.

Departure from the paper. The paper's V0 (Sec. 4.1.1) is backbone -> residual query adapter ->
in-context head over the policy's context C_pi and nothing else: whatever it knows about a prompt
across policies must pass through the adapter's features. We add this bank, a function of the prompt
alone fitted once on every pre-training (model, step) key, and feed d(x) to the head as one more
feature column (the kernel head uses it as a prior mean, heads/kernel.py). Why: the head sees one
policy's context at a time and cannot pool what other policies measured, yet prompt difficulty is
largely shared; on the V0 release (README, 3-fold prompt-disjoint CV) trained V0 without the bank
reached gAUC 0.644 and with it 0.695. `bank.enabled: false` (BankConfig.enabled=False) builds no bank
and gives the paper's V0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class BankConfig:
    """The cross-policy difficulty bank (see the module docstring)."""

    enabled: bool = field(default=True, metadata={"help": "use the difficulty bank (False: in-context head only, as in the paper)"})
    length_scales: tuple[float, ...] = field(
        default=(0.35, 0.5, 0.7, 1.0), metadata={"help": "RBF length scales tried (on unit-norm embeddings)"}
    )
    ridges: tuple[float, ...] = field(default=(0.3, 1.0, 3.0), metadata={"help": "ridge strengths tried"})
    max_prompts: int = field(default=4096, metadata={"help": "bank size cap (a seeded sample of prompts beyond it)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "length_scales", tuple(float(v) for v in self.length_scales))
        object.__setattr__(self, "ridges", tuple(float(v) for v in self.ridges))
        if not self.length_scales or min(self.length_scales) <= 0:
            raise ValueError(f"bank.length_scales={list(self.length_scales)} must be a non-empty list of values > 0")
        if not self.ridges or min(self.ridges) <= 0:
            raise ValueError(f"bank.ridges={list(self.ridges)} must be a non-empty list of values > 0")
        if self.max_prompts < 2:
            raise ValueError(f"bank.max_prompts={self.max_prompts} must be >= 2")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _rbf(a: torch.Tensor, b: torch.Tensor, length_scale: float) -> torch.Tensor:
    """exp(-|a - b|^2 / (2 l^2)) for unit-norm rows. a [A, d], b [B, d] -> [A, B]."""
    d2 = (2.0 - 2.0 * a @ b.T).clamp_min(0.0)
    return torch.exp(-d2 / (2.0 * length_scale**2))


def key_centred_targets(
    keys: np.ndarray, prompt_ids: np.ndarray, rates: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-prompt targets t_j and row counts n_j from rows (key, prompt, rate). -> (ids (P,), t (P,), n (P,))."""
    centred = np.asarray(rates, dtype=np.float64).copy()
    for k in np.unique(keys):
        m = keys == k
        centred[m] -= centred[m].mean()
    ids, inverse, counts = np.unique(prompt_ids, return_inverse=True, return_counts=True)
    t = np.bincount(inverse, weights=centred) / counts
    return ids.astype(np.int64), t, counts.astype(np.float64)


def loo_fit(k: torch.Tensor, t: torch.Tensor, n: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel ridge weights and exact leave-one-out predictions. k [P, P], t [P], n [P] -> (alpha [P], loo [P])."""
    h_inv = torch.linalg.inv(k + torch.diag(ridge / n))  # [P, P]
    alpha = h_inv @ t
    return alpha, t - alpha / torch.diagonal(h_inv)


class DifficultyBank(nn.Module):
    """d(x): key-centred difficulty offset from a kernel-ridge fit over the bank's prompts.

    Buffers: `ids` [P] int64, `centres` [P, d] (unit-norm pooled embeddings), `alpha` [P], `loo` [P],
    `length_scale` []. An empty bank (P = 0) returns zeros.
    """

    def __init__(self, input_dim: int, size: int = 0):
        super().__init__()
        self.register_buffer("ids", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("centres", torch.zeros(size, input_dim))
        self.register_buffer("alpha", torch.zeros(size))
        self.register_buffer("loo", torch.zeros(size))
        self.register_buffer("length_scale", torch.tensor(1.0))
        self.info: dict = {}
        self._row: dict[int, int] | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())

    @torch.no_grad()
    def fit(self, ids: np.ndarray, pooled: torch.Tensor, t: np.ndarray, n: np.ndarray, cfg: BankConfig, seed: int = 0) -> dict:
        """Fit on per-prompt targets (`key_centred_targets`), choosing (l, lam) by leave-one-out MSE.

        ids (P,), pooled [P, d], t (P,), n (P,) -> info {length_scale, ridge, loo_mse, var, size}.
        """
        if len(ids) > cfg.max_prompts:
            keep = np.sort(np.random.default_rng(seed).choice(len(ids), cfg.max_prompts, replace=False))
            ids, pooled, t, n = ids[keep], pooled[keep], t[keep], n[keep]
        x = _unit(pooled.double())
        tt, nn_ = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(n, dtype=torch.float64)
        best = None
        for ls in cfg.length_scales:
            k = _rbf(x, x, ls)
            for ridge in cfg.ridges:
                alpha, loo = loo_fit(k, tt, nn_, ridge)
                mse = float((nn_ * (tt - loo) ** 2).sum() / nn_.sum())
                if best is None or mse < best[0]:
                    best = (mse, ls, ridge, alpha, loo)
        mse, ls, ridge, alpha, loo = best
        self.ids = torch.as_tensor(ids, dtype=torch.int64)
        self.centres = x.float()
        self.alpha, self.loo = alpha.float(), loo.float()
        self.length_scale = torch.tensor(float(ls))
        self._row = None
        self.info = {"size": len(ids), "length_scale": ls, "ridge": ridge, "loo_mse": mse,
                     "target_var": float((nn_ * tt**2).sum() / nn_.sum())}
        return self.info

    def forward(self, ids: Sequence[int], pooled: torch.Tensor) -> torch.Tensor:
        """d for prompts: leave-one-out value for bank members, kernel prediction otherwise. -> [B]."""
        out = pooled.new_zeros(pooled.shape[0], dtype=torch.float32)
        if len(self) == 0:
            return out
        if self._row is None:
            self._row = {int(p): i for i, p in enumerate(self.ids.tolist())}
        rows = [self._row.get(int(p), -1) for p in ids]
        member = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        if member.any():
            out[member] = self.loo[[r for r in rows if r >= 0]]
        if not member.all():  # the kernel sum only for prompts the bank has not measured
            new = ~member
            out[new] = _rbf(_unit(pooled[new].float()), self.centres, float(self.length_scale)) @ self.alpha
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401 - torch hook
        self._row = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
