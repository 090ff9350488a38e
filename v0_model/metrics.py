"""Metrics and baselines for V0 predictions.

Labels: a row's measured success rate `rate` in [0, 1] (= (score + 1) / 2 for the release's mean rewards).
Ranking metrics use the binary label `rate >= 0.5` (mean reward >= 0, as the V0 reference does);
Brier and ECE compare the predicted probability with the measured rate itself.

- `auc`: Mann-Whitney AUC with ties counted one half (NaN when one class is missing).
- `gauc`: AUC per (model, step) group, averaged with weights = group size over groups with both classes.
- `pair_accuracy`: rows with the same prompt and model at two steps whose measured rates differ: the
  fraction whose order the predictions get right (ties in prediction count one half).
- `brier`, `ece` (equal-width bins), `calibration_plot` (PNG reliability diagram).

Baselines (same inputs as V0: the context rows of each (model, step) and the query prompts):
- `context_mean`: the mean context rate of the query's (model, step); gAUC 0.5 by construction.
- `knn`: mean rate of the k most cosine-similar context prompts of the same (model, step).
- `ridge_probe`: one ridge regression on pooled embeddings + a (model, step) one-hot over all context
  rows pooled across keys (prompt difficulty is largely shared across policies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (average ranks for ties). labels (n,) in {0,1}, scores (n,) -> float or NaN."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average rank over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = 0.5 * (s + e - 1) + 1.0
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """Size-weighted mean of per-group AUCs over groups with both classes. -> (gAUC, groups used)."""
    groups = np.asarray(groups)
    total, weight, used = 0.0, 0, 0
    for g in np.unique(groups):
        m = groups == g
        a = auc(labels[m], scores[m])
        if not np.isnan(a):
            total += a * int(m.sum())
            weight += int(m.sum())
            used += 1
    return (total / weight if weight else float("nan")), used


def pair_accuracy(
    models: Sequence[str], steps: np.ndarray, prompt_ids: np.ndarray, rates: np.ndarray, preds: np.ndarray
) -> tuple[float, int]:
    """Order accuracy over (same prompt, same model, two steps, different measured rates). -> (acc, n_pairs)."""
    by: dict[tuple[str, int], list[int]] = {}
    for i, (m, p) in enumerate(zip(models, prompt_ids)):
        by.setdefault((str(m), int(p)), []).append(i)
    correct, n = 0.0, 0
    for idx in by.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if steps[i] == steps[j] or rates[i] == rates[j]:
                    continue
                n += 1
                d_true, d_pred = rates[i] - rates[j], preds[i] - preds[j]
                correct += 0.5 if d_pred == 0 else float(np.sign(d_true) == np.sign(d_pred))
    return (correct / n if n else float("nan")), n


def brier(rates: np.ndarray, preds: np.ndarray) -> float:
    """mean (pred - measured rate)^2."""
    return float(np.mean((np.asarray(preds) - np.asarray(rates)) ** 2))


def ece(rates: np.ndarray, preds: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: sum_b (n_b / n) |mean pred_b - mean rate_b| over equal-width bins."""
    preds = np.asarray(preds, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    bins = np.clip((preds * n_bins).astype(int), 0, n_bins - 1)
    err = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            err += m.mean() * abs(preds[m].mean() - rates[m].mean())
    return float(err)


def summarize(
    models: Sequence[str], steps: np.ndarray, prompt_ids: np.ndarray, rates: np.ndarray, preds: np.ndarray
) -> dict[str, float]:
    """All metrics of one set of predictions (rows aligned)."""
    rates = np.asarray(rates, dtype=np.float64)
    preds = np.asarray(preds, dtype=np.float64)
    labels = rates >= 0.5
    groups = np.array([f"{m}\x1f{s}" for m, s in zip(models, steps)])
    g, used = gauc(groups, labels, preds)
    pa, n_pairs = pair_accuracy(models, np.asarray(steps), np.asarray(prompt_ids), rates, preds)
    return {
        "n": int(len(rates)),
        "auc": auc(labels, preds),
        "gauc": g,
        "gauc_groups": used,
        "pair_acc": pa,
        "pair_n": n_pairs,
        "brier": brier(rates, preds),
        "ece": ece(rates, preds),
    }


def calibration_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, n_bins: int = 10) -> Path:
    """Reliability diagram: mean measured rate per bin of predicted probability, one line per predictor.

    curves: name -> (rates (n,), preds (n,)). Writes a PNG and returns its path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect")
    for name, (rates, preds) in curves.items():
        preds = np.asarray(preds, dtype=np.float64)
        bins = np.clip((preds * n_bins).astype(int), 0, n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            m = bins == b
            if m.sum() >= 3:
                xs.append(preds[m].mean())
                ys.append(np.asarray(rates)[m].mean())
        ax.plot(xs, ys, marker="o", label=f"{name} (ECE {ece(rates, preds):.3f})")
    ax.set_xlabel("predicted success probability")
    ax.set_ylabel("measured success rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- baselines


def context_mean(ctx_rates_by_key: dict, query_keys: Sequence) -> np.ndarray:
    """Each query gets its key's mean context rate. -> (M,)."""
    return np.array([float(np.mean(ctx_rates_by_key[k])) for k in query_keys])


def knn_predict(ctx_emb: np.ndarray, ctx_rates: np.ndarray, query_emb: np.ndarray, k: int = 16) -> np.ndarray:
    """Mean rate of the k most cosine-similar context rows. ctx_emb [N, d], ctx_rates [N], query_emb [M, d] -> [M]."""
    a = ctx_emb / (np.linalg.norm(ctx_emb, axis=1, keepdims=True) + 1e-12)
    b = query_emb / (np.linalg.norm(query_emb, axis=1, keepdims=True) + 1e-12)
    sim = b @ a.T  # [M, N]
    k = min(k, len(ctx_rates))
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [M, k]
    return ctx_rates[top].mean(1)


def ridge_fit_predict(x: np.ndarray, y: np.ndarray, xq: np.ndarray, alpha: float = 10.0) -> np.ndarray:
    """Ridge regression with an unpenalised intercept: solve (X^T X + a I) w = X^T (y - mean). -> (M,)."""
    mx, my = x.mean(0), y.mean()
    xc = x - mx
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - my))
    return np.clip((xq - mx) @ w + my, 0.0, 1.0)


def ridge_probe(
    ctx_emb: np.ndarray, ctx_key: np.ndarray, ctx_rates: np.ndarray, query_emb: np.ndarray, query_key: np.ndarray,
    n_keys: int, alpha: float = 10.0,
) -> np.ndarray:
    """Pooled ridge probe on [normalised embedding, one-hot(key)] over all keys' context rows. -> (M,)."""

    def design(emb: np.ndarray, key: np.ndarray) -> np.ndarray:
        e = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
        return np.concatenate([e, np.eye(n_keys)[key] * 1.0], axis=1)

    return ridge_fit_predict(design(ctx_emb, ctx_key), ctx_rates, design(query_emb, query_key), alpha)
