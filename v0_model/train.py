"""Pre-training V0 on (policy, prompt, success rate) pairs.

Recipe (issue 5 / DESIGN.md, following the V0 reference's hyper-parameters): each task is one
(model, step) key; up to 256 of its rows form the context C_pi and disjoint rows form positive/negative
query pairs (positive: measured success rate >= 0.5, negative: < 0.5). The loss is

    L = 0.25 * mean_pairs -log sigmoid(s_pos - s_neg)            (pairwise Bradley-Terry)
      + 0.75 * mean_queries BCE(sigmoid(s), p)                     (soft cross-entropy, p = (score + 1) / 2)

with s the head's log-odds. AdamW (lr 2e-4), cosine schedule with 5 % linear warm-up, gradient clipping
at 1.0. Validation prompts are held out completely (never in any context, never a training query);
validation predicts them from a fixed, seeded context of training rows of the same key (up to
`eval_context_size`, default 512 = the paper's support-buffer capacity; more context helps the in-context
head, see the report); training stops early when validation gAUC has not improved for `patience`
evaluations, or at `max_minutes`. The best weights are kept, the untrained adapter (step 0) being a
candidate too; then (`calibrate`) the head's output affine is refit on the validation prompts by Platt
scaling (two parameters; ranking metrics are unchanged, validation ECE becomes optimistic, so report
calibration from cross-validation folds, which are never used for it).

Before the first step the difficulty bank (bank.py) is fitted on the training rows only; every training
prompt then carries its leave-one-out d(x), so no task sees its own labels through the bank. After
training the bank is refit on all rows given (validation prompts included) for the exported model.

Departures: the reference trains with large batches of tasks on GPUs; here one step is `tasks_per_step`
tasks (default 1) so that a run fits minutes on one CPU thread. Its hard-label (score >= 0) pair split
is kept; the soft CE uses the measured rate.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from v0_model import metrics as M
from v0_model.backbone import EmbeddingCache, FrozenBackbone, resolve_backbone
from v0_model.bank import key_centred_targets
from v0_model.model import V0Config, V0Model, build_section


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """The V0 training recipe (defaults from the paper / V0 reference; see the module docstring)."""

    context_size: int = field(default=256, metadata={"help": "context rows per task (paper: 256)"})
    eval_context_size: int = field(
        default=512, metadata={"help": "context rows per key at validation (a seeded sample of the training rows)"}
    )
    query_pairs: int = field(default=16, metadata={"help": "positive/negative query pairs per task"})
    tasks_per_step: int = field(default=1, metadata={"help": "tasks (keys) per optimiser step"})
    max_steps: int = field(default=2000, metadata={"help": "optimiser steps (the cosine schedule spans them)"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    head_lr_mult: float = field(default=10.0, metadata={"help": "lr multiplier of the head's few scalar parameters"})
    warmup_frac: float = field(default=0.05, metadata={"help": "fraction of steps of linear warm-up"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 = off)"})
    bt_weight: float = field(default=0.25, metadata={"help": "weight of the pairwise BT loss (CE gets 1 - this)"})
    val_fraction: float = field(default=0.15, metadata={"help": "fraction of prompts held out for validation"})
    eval_every: int = field(default=100, metadata={"help": "steps between validation passes"})
    patience: int = field(default=4, metadata={"help": "evaluations without gAUC gain before stopping"})
    max_minutes: float = field(default=15.0, metadata={"help": "wall-clock limit of the training loop"})
    calibrate: bool = field(
        default=True,
        metadata={"help": "after training, refit the head's output scale and bias on the validation prompts (Platt)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of splits, task sampling and initialisation"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    knn_k: int = field(default=16, metadata={"help": "k of the kNN baseline"})
    ridge_alpha: float = field(default=10.0, metadata={"help": "L2 strength of the pooled ridge-probe baseline"})

    def __post_init__(self) -> None:
        positive = ("context_size", "eval_context_size", "query_pairs", "tasks_per_step", "max_steps", "eval_every", "patience", "threads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.max_minutes <= 0 or self.head_lr_mult <= 0:
            raise ValueError("train.lr, train.head_lr_mult and train.max_minutes must be > 0")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"train.warmup_frac={self.warmup_frac} must lie in [0, 1)")
        if not 0.0 <= self.bt_weight <= 1.0:
            raise ValueError(f"train.bt_weight={self.bt_weight} must lie in [0, 1]")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"train.val_fraction={self.val_fraction} must lie in (0, 1)")


def load_configs(path: str | Path | None, **train_overrides: Any) -> tuple[V0Config, TrainConfig]:
    """(V0Config, TrainConfig) from a YAML file; None -> defaults.

    The file holds sections backbone / adapter / head / train, either at the top level or under a `v0:`
    key (so one project config file can carry V0 next to its other sections).
    """
    data: dict = {}
    if path is not None:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with sections backbone, adapter, head, train")
        data = dict(data["v0"] or {}) if "v0" in data else data  # a shared config file keeps V0 under `v0:`
    train = dict(data.pop("train", {}) or {})
    train.update({k: v for k, v in train_overrides.items() if v is not None})
    try:
        return V0Config.from_dict(data), build_section(TrainConfig, train, "train")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------------------------- data


class PairTable(NamedTuple):
    """V0 training pairs: one row per (model, step, prompt). Shapes: (R,) per array."""

    model: np.ndarray  # object (str)
    step: np.ndarray  # int64
    prompt_id: np.ndarray  # int64
    rate: np.ndarray  # float64 success rate in [0, 1]
    texts: Mapping[int, str]  # prompt_id -> text

    def __len__(self) -> int:
        return len(self.rate)

    def keys(self) -> np.ndarray:
        """(model, step) as one string per row: `model@step`."""
        return np.array([f"{m}@{s}" for m, s in zip(self.model, self.step)])

    def take(self, mask_or_idx: np.ndarray) -> "PairTable":
        return PairTable(
            self.model[mask_or_idx], self.step[mask_or_idx], self.prompt_id[mask_or_idx], self.rate[mask_or_idx], self.texts
        )

    def fingerprint(self) -> str:
        """sha256 over the sorted (model, step, prompt_id, rate) rows."""
        order = np.lexsort((self.prompt_id, self.step, self.keys()))
        h = hashlib.sha256()
        for i in order:
            h.update(f"{self.model[i]}|{self.step[i]}|{self.prompt_id[i]}|{self.rate[i]:.6f}\n".encode())
        return h.hexdigest()


def pairs_from_arrow(table, texts: Mapping[int, str] | None = None) -> PairTable:
    """PairTable from an Arrow/pandas table with model, step, prompt_id and success_rate (or score)."""
    df = table.to_pandas() if hasattr(table, "to_pandas") else table
    for col in ("model", "step", "prompt_id"):
        if col not in df.columns:
            raise ValueError(f"pairs table has no column {col!r}; expected the store's v0_pairs view")
    if "success_rate" in df.columns:
        rate = df["success_rate"].to_numpy(np.float64)
    elif "score" in df.columns:
        rate = (df["score"].to_numpy(np.float64) + 1.0) / 2.0
    else:
        raise ValueError("pairs table has neither success_rate nor score; expected the store's v0_pairs view")
    if texts is None:
        if "text" not in df.columns:
            raise ValueError("pairs table has no text column and no prompt texts were given")
        texts = dict(zip(df["prompt_id"].astype(np.int64).tolist(), df["text"].tolist()))
    return PairTable(
        df["model"].astype(str).to_numpy(object),
        df["step"].to_numpy(np.int64),
        df["prompt_id"].to_numpy(np.int64),
        rate,
        dict(texts),
    )


def load_release_pairs(folder: str | Path, files: Sequence[str] = ("context.jsonl", "train.jsonl")) -> PairTable:
    """Pairs of a V0-release folder (only the named files; a held-out test file is never read)."""
    from v0_data.tasks.v0_release import load_release

    data = load_release(folder, files=files)
    return pairs_from_arrow(data.scores, {p.prompt_id: p.text for p in data.prompts})


def load_store_pairs(store_dir: str | Path) -> PairTable:
    """Pairs of a trajectory store's `v0_pairs` view."""
    from v0_data.store import TrajectoryStore

    store = TrajectoryStore.open(store_dir, create=False, read_only=True)
    try:
        table = store.pairs()
    finally:
        store.close()
    if table.num_rows == 0:
        raise ValueError(f"store {store_dir} has no v0_pairs rows; build it with `v05 build-data` or `v05 data import`")
    return pairs_from_arrow(table)


def prompt_folds(prompt_ids: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index in [0, n_folds) per distinct prompt, returned per row. prompt_ids (R,) -> (R,)."""
    uniq = np.unique(prompt_ids)
    perm = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = dict(zip(uniq[perm].tolist(), (np.arange(len(uniq)) % n_folds).tolist()))
    return np.array([fold_of[int(p)] for p in prompt_ids])


def split_prompts(table: PairTable, val_fraction: float, seed: int) -> tuple[PairTable, PairTable]:
    """Prompt-disjoint (train, validation) split: a validation prompt appears in no training row."""
    uniq = np.unique(table.prompt_id)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_fraction * len(uniq))))
    val = set(rng.choice(uniq, size=n_val, replace=False).tolist())
    is_val = np.array([int(p) in val for p in table.prompt_id])
    return table.take(~is_val), table.take(is_val)


# ----------------------------------------------------------------------------------------------- loss


def v0_loss(logits: torch.Tensor, targets: torch.Tensor, n_pairs: int, bt_weight: float) -> tuple[torch.Tensor, dict]:
    """Pairwise Bradley-Terry + soft cross-entropy.

    logits [2P] laid out as (pos_1..pos_P, neg_1..neg_P), targets [2P] measured rates in [0, 1].
    L = w * mean(-log sigmoid(s_pos - s_neg)) + (1 - w) * mean(BCE(s, p)).
    """
    pos, neg = logits[:n_pairs], logits[n_pairs : 2 * n_pairs]  # [P], [P]
    bt = -F.logsigmoid(pos - neg).mean()
    ce = F.binary_cross_entropy_with_logits(logits, targets)
    loss = bt_weight * bt + (1.0 - bt_weight) * ce
    stats = {"loss": loss.item(), "bt": bt.item(), "ce": ce.item(), "pair_acc": (pos > neg).float().mean().item()}
    return loss, stats


def fit_platt(probs: np.ndarray, rates: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(a, b) minimising mean BCE(sigmoid(a * logit(probs) + b), rates) (soft targets). Shapes (n,), (n,)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    s = torch.as_tensor(np.log(p) - np.log1p(-p))  # [n]
    y = torch.as_tensor(np.asarray(rates, dtype=np.float64))  # [n]
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ab[0] * s + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = (float(v) for v in ab.detach())
    return a, b


def cosine_lr(step: int, total: int, warmup_frac: float) -> float:
    """Multiplier of the base lr: linear warm-up over the first warmup_frac * total steps, then cosine to 0."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------ sampling


class Task(NamedTuple):
    """One V0 task: context rows and query rows (indices into a PairTable); queries = P pos then P neg."""

    key: str
    context: np.ndarray  # (N,)
    queries: np.ndarray  # (2P,)


class TaskSampler:
    """Draws tasks per (model, step) key from a training PairTable."""

    def __init__(self, table: PairTable, context_size: int, query_pairs: int, seed: int):
        self.table = table
        self.context_size = context_size
        self.query_pairs = query_pairs
        self.rng = np.random.default_rng(seed)
        keys = table.keys()
        self.by_key: dict[str, np.ndarray] = {}
        for k in np.unique(keys):
            idx = np.flatnonzero(keys == k)
            pos = table.rate[idx] >= 0.5
            if pos.sum() >= 1 and (~pos).sum() >= 1 and len(idx) >= 4:
                self.by_key[k] = idx
        if not self.by_key:
            raise ValueError(
                "no (model, step) key has both successes (rate >= 0.5) and failures (< 0.5) in at least 4 "
                "training rows; V0 cannot learn from this data (add more prompts or policies)"
            )
        self.names = sorted(self.by_key)
        sizes = np.array([len(self.by_key[k]) for k in self.names], dtype=np.float64)
        self.weights = sizes / sizes.sum()

    def sample(self) -> Task:
        key = self.names[self.rng.choice(len(self.names), p=self.weights)]
        idx = self.rng.permutation(self.by_key[key])
        n_query_pool = max(2, min(len(idx) // 2, len(idx) - self.context_size))
        pool, rest = idx[:n_query_pool], idx[n_query_pool:]
        for want_pos in (True, False):  # make sure the query pool holds both classes
            if not ((self.table.rate[pool] >= 0.5) == want_pos).any():
                j = np.flatnonzero((self.table.rate[rest] >= 0.5) == want_pos)[0]
                pool, rest = np.append(pool, rest[j]), np.delete(rest, j)
        ctx = rest[: self.context_size]
        pos, neg = pool[self.table.rate[pool] >= 0.5], pool[self.table.rate[pool] < 0.5]
        P = self.query_pairs
        pos_q = pos[self.rng.permutation(np.resize(np.arange(len(pos)), max(P, len(pos))))[:P]]
        neg_q = neg[self.rng.permutation(np.resize(np.arange(len(neg)), max(P, len(neg))))[:P]]
        return Task(key, ctx, np.concatenate([pos_q, neg_q]))


# ------------------------------------------------------------------------------------------ evaluation


def fixed_contexts(table: PairTable, context_size: int, seed: int) -> dict[str, np.ndarray]:
    """A seeded context (row indices) of up to `context_size` rows per key."""
    rng = np.random.default_rng(seed)
    keys = table.keys()
    return {k: rng.permutation(np.flatnonzero(keys == k))[:context_size] for k in np.unique(keys)}


@torch.no_grad()
def predict_table(
    model: V0Model, cache: EmbeddingCache, ctx_table: PairTable, query_table: PairTable, context_size: int, seed: int
) -> np.ndarray:
    """V0 predictions for every query row from a seeded context of its key's rows in ctx_table. -> (M,)."""
    model.eval()
    contexts = fixed_contexts(ctx_table, context_size, seed)
    qkeys = query_table.keys()
    ids = np.unique(np.concatenate([ctx_table.prompt_id, query_table.prompt_id]))
    feats = model.features(cache, ids.tolist())  # [U, F]
    row = {int(p): i for i, p in enumerate(ids)}
    preds = np.full(len(query_table), np.nan)
    for k in np.unique(qkeys):
        if k not in contexts:
            continue
        ci = contexts[k]
        qm = np.flatnonzero(qkeys == k)
        cx = feats[[row[int(p)] for p in ctx_table.prompt_id[ci]]]
        qx = feats[[row[int(p)] for p in query_table.prompt_id[qm]]]
        cy = torch.as_tensor(ctx_table.rate[ci], dtype=torch.float32)
        preds[qm] = torch.sigmoid(model.logits(cx, cy, qx)).double().numpy()
    return preds


def baseline_predictions(
    cache: EmbeddingCache, ctx_table: PairTable, query_table: PairTable, context_size: int, seed: int, cfg: TrainConfig
) -> dict[str, np.ndarray]:
    """context-mean, kNN (same seeded contexts as V0) and the pooled ridge probe (all context rows)."""
    contexts = fixed_contexts(ctx_table, context_size, seed)
    qkeys = query_table.keys()
    out = {name: np.full(len(query_table), np.nan) for name in ("context_mean", "knn")}
    q_emb = cache.pooled_matrix(query_table.prompt_id.tolist())
    for k in np.unique(qkeys):
        if k not in contexts:
            continue
        ci, qm = contexts[k], np.flatnonzero(qkeys == k)
        out["context_mean"][qm] = ctx_table.rate[ci].mean()
        c_emb = cache.pooled_matrix(ctx_table.prompt_id[ci].tolist())
        out["knn"][qm] = M.knn_predict(c_emb, ctx_table.rate[ci], q_emb[qm], cfg.knn_k)
    key_names = sorted(set(ctx_table.keys()) | set(qkeys))
    kidx = {k: i for i, k in enumerate(key_names)}
    out["ridge_probe"] = M.ridge_probe(
        cache.pooled_matrix(ctx_table.prompt_id.tolist()),
        np.array([kidx[k] for k in ctx_table.keys()]),
        ctx_table.rate,
        q_emb,
        np.array([kidx[k] for k in qkeys]),
        len(key_names),
        cfg.ridge_alpha,
    )
    return out


def evaluate(
    model: V0Model, cache: EmbeddingCache, ctx_table: PairTable, query_table: PairTable, cfg: TrainConfig,
    with_baselines: bool = True,
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Metrics of V0 (and baselines) on query_table. -> ({name: metrics}, {name: preds (M,)}).

    Rows whose key has no context row get NaN predictions and are left out of the metrics.
    """
    preds = {"v0": predict_table(model, cache, ctx_table, query_table, cfg.eval_context_size, cfg.seed + 1)}
    if with_baselines:
        preds.update(baseline_predictions(cache, ctx_table, query_table, cfg.eval_context_size, cfg.seed + 1, cfg))
        if model.bank is not None and len(model.bank):  # ablation: the bank alone (ranks by d(x) within a key)
            with torch.no_grad():
                pooled = torch.as_tensor(cache.pooled_matrix(query_table.prompt_id.tolist()))
                d = model.bank(query_table.prompt_id.tolist(), pooled).double().numpy()
            preds["bank_only"] = np.clip(preds["context_mean"] + d, 0.0, 1.0)
    ok = ~np.isnan(preds["v0"])
    q = query_table.take(ok)
    report = {
        name: M.summarize(q.model, q.step, q.prompt_id, q.rate, p[ok]) for name, p in preds.items()
    }
    return report, preds


# ---------------------------------------------------------------------------------------------- train


class TrainResult(NamedTuple):
    model: V0Model
    cache: EmbeddingCache
    metrics: dict  # {"val": {name: metrics}, "best_step", "steps", "minutes", ...}
    history: list[dict]
    val_preds: dict[str, np.ndarray]  # name -> (M,) aligned with val_table (NaN: key without context)
    val_table: PairTable


def build_cache(v0_cfg: V0Config, texts: Mapping[int, str], cache_dir: str | Path | None, progress: bool = True) -> EmbeddingCache:
    """Resolve the backbone and make sure every prompt's token states are cached."""
    cache = EmbeddingCache(FrozenBackbone(resolve_backbone(v0_cfg.backbone)), cache_dir)
    cache.ensure(texts, progress=progress)
    return cache


def fit_bank(model: V0Model, cache: EmbeddingCache, table: PairTable, v0_cfg: V0Config, seed: int) -> dict | None:
    """Fit the model's difficulty bank on `table`'s rows (no-op without a bank). -> the bank's info."""
    if model.bank is None:
        return None
    ids, t, n = key_centred_targets(table.keys(), table.prompt_id, table.rate)
    pooled = torch.as_tensor(cache.pooled_matrix(ids.tolist()))
    return model.bank.fit(ids, pooled, t, n, v0_cfg.bank, seed)


def train_v0(
    table: PairTable,
    v0_cfg: V0Config = V0Config(),
    cfg: TrainConfig = TrainConfig(),
    *,
    cache: EmbeddingCache | None = None,
    cache_dir: str | Path | None = None,
    val_table: PairTable | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train V0 on `table` (split prompt-disjointly unless `val_table` is given); keep the best-gAUC weights.

    Steps: embed every prompt (cached), fit the difficulty bank on the training rows, run the loop
    (`_train_loop`), restore the best weights, Platt-calibrate the head on the validation prompts,
    evaluate with baselines, and refit the bank on all rows when the split was made here.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    split_here = val_table is None
    if split_here:
        train_table, val_table = split_prompts(table, cfg.val_fraction, cfg.seed)
    else:
        train_table = table
        overlap = set(train_table.prompt_id.tolist()) & set(val_table.prompt_id.tolist())
        if overlap:
            raise ValueError(f"{len(overlap)} validation prompts also occur in the training rows; split by prompt")
    texts = {int(p): table.texts[int(p)] for p in np.unique(np.concatenate([train_table.prompt_id, val_table.prompt_id]))}
    if cache is None:
        cache = build_cache(v0_cfg, texts, cache_dir, progress)
    else:
        cache.ensure(texts, progress=progress)
    input_dim = int(cache[int(train_table.prompt_id[0])].pooled.shape[0])
    model = V0Model(v0_cfg, input_dim)
    bank_info = fit_bank(model, cache, train_table, v0_cfg, cfg.seed)
    loop = _train_loop(model, cache, train_table, val_table, cfg, progress)
    model.load_state_dict(loop.best_state)
    calibration = None
    if cfg.calibrate and hasattr(model.head, "cal_scale"):
        calibration = calibrate_head(model, cache, train_table, val_table, cfg)
    report, preds = evaluate(model, cache, train_table, val_table, cfg, with_baselines=True)
    if split_here:  # the exported bank also knows the validation prompts carved out here
        bank_info = fit_bank(model, cache, table, v0_cfg, cfg.seed)
    info = {
        "val": report,
        "best_step": loop.best_step,
        "steps": loop.steps,
        "stop_reason": loop.stop_reason,
        "calibration": calibration,
        "minutes": (time.time() - loop.t0) / 60,
        "cpu_minutes": (time.process_time() - loop.cpu0) / 60,
        "threads": cfg.threads,
        "n_train_rows": len(train_table),
        "n_val_rows": len(val_table),
        "n_val_prompts": int(len(np.unique(val_table.prompt_id))),
        "head": model.head.hyperparameters() if hasattr(model.head, "hyperparameters") else {},
        "bank": bank_info,
    }
    return TrainResult(model, cache, info, loop.history, preds, val_table)


class _LoopResult(NamedTuple):
    """What `_train_loop` hands back: the best weights, the history, why and when it stopped."""

    best_step: int
    best_state: dict[str, torch.Tensor]
    history: list[dict]
    steps: int
    stop_reason: str  # "max_steps", "early_stop" or "max_minutes"
    t0: float  # time.time() when the loop started
    cpu0: float  # time.process_time() when the loop started


def _optimizer(model: V0Model, cfg: TrainConfig):
    """AdamW (the head's few scalars at `head_lr_mult` x lr, no weight decay) and the cosine schedule."""
    opt = torch.optim.AdamW(
        [
            {"params": list(model.adapter.parameters()), "lr": cfg.lr},
            {"params": list(model.head.parameters()), "lr": cfg.lr * cfg.head_lr_mult, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg.max_steps, cfg.warmup_frac))
    return opt, sched


def _train_loop(
    model: V0Model, cache: EmbeddingCache, train_table: PairTable, val_table: PairTable, cfg: TrainConfig, progress: bool
) -> _LoopResult:
    """Optimise until `max_steps`, early stopping (`patience` evaluations without a validation gAUC
    gain) or `max_minutes`; validate every `eval_every` steps. Step 0 (untrained) is a candidate too:
    with the bank, the untrained adapter may already be the best model."""
    from tqdm.auto import tqdm

    sampler = TaskSampler(train_table, cfg.context_size, cfg.query_pairs, cfg.seed)
    opt, sched = _optimizer(model, cfg)
    report0, _ = evaluate(model, cache, train_table, val_table, cfg, with_baselines=False)
    best = {"gauc": report0["v0"]["gauc"], "step": 0, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    history: list[dict] = [{"step": 0, "minutes": 0.0, "cpu_minutes": 0.0, **{f"val_{k}": v for k, v in report0["v0"].items()}}]
    bad_evals = 0
    t0, cpu0 = time.time(), time.process_time()
    bar = tqdm(total=cfg.max_steps, desc="pretrain-v0", disable=not progress, unit="step")
    running: dict[str, float] = {}
    step = 0
    stop_reason = "max_steps"
    for step in range(1, cfg.max_steps + 1):
        _train_step(model, cache, train_table, [sampler.sample() for _ in range(cfg.tasks_per_step)], cfg, opt, running)
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{running['loss']:.3f}", best_gauc=f"{best['gauc']:.3f}")
        minutes = (time.time() - t0) / 60
        out_of_time = minutes >= cfg.max_minutes
        if step % cfg.eval_every == 0 or out_of_time or step == cfg.max_steps:
            report, _ = evaluate(model, cache, train_table, val_table, cfg, with_baselines=False)
            g = report["v0"]["gauc"]
            history.append({"step": step, "minutes": minutes, "cpu_minutes": (time.process_time() - cpu0) / 60, **{f"train_{k}": v for k, v in running.items()},
                            **{f"val_{k}": v for k, v in report["v0"].items()}})
            if g > best["gauc"] or np.isnan(best["gauc"]):
                best = {"gauc": g, "step": step, "state": {k: v.clone() for k, v in model.state_dict().items()}}
                bad_evals = 0
            else:
                bad_evals += 1
            if bad_evals >= cfg.patience:
                stop_reason = "early_stop"
                break
        if out_of_time:
            stop_reason = "max_minutes"
            break
    bar.close()
    return _LoopResult(best["step"], best["state"], history, step, stop_reason, t0, cpu0)


def _train_step(
    model: V0Model, cache: EmbeddingCache, train_table: PairTable, tasks: list[Task], cfg: TrainConfig, opt,
    running: dict[str, float],
) -> None:
    """One optimiser step on the mean loss of `tasks`; `running` keeps exponential averages of the loss stats."""
    model.train()
    rows = np.concatenate([np.concatenate([t.context, t.queries]) for t in tasks])
    feats = model.features(cache, train_table.prompt_id[rows].tolist())  # [sum(N + 2P), F]
    loss_total, off = 0.0, 0
    for t in tasks:
        n_ctx = len(t.context)
        cx, qx = feats[off : off + n_ctx], feats[off + n_ctx : off + n_ctx + len(t.queries)]
        off += n_ctx + len(t.queries)
        cy = torch.as_tensor(train_table.rate[t.context], dtype=torch.float32)
        qy = torch.as_tensor(train_table.rate[t.queries], dtype=torch.float32)
        loss, stats = v0_loss(model.logits(cx, cy, qx), qy, cfg.query_pairs, cfg.bt_weight)
        loss_total = loss_total + loss / len(tasks)
        for k, v in stats.items():
            running[k] = 0.95 * running.get(k, v) + 0.05 * v
    opt.zero_grad(set_to_none=True)
    loss_total.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()


def calibrate_head(
    model: V0Model, cache: EmbeddingCache, train_table: PairTable, val_table: PairTable, cfg: TrainConfig
) -> dict[str, float]:
    """Platt-refit the head's output affine on the validation prompts; returns {"a", "b"}.

    logits' = a * logits + b is folded into the head's `cal_scale` / `cal_bias` (ranking unchanged).
    """
    probs = predict_table(model, cache, train_table, val_table, cfg.eval_context_size, cfg.seed + 1)
    ok = ~np.isnan(probs)
    a, b = fit_platt(probs[ok], val_table.rate[ok])
    with torch.no_grad():
        model.head.cal_bias.mul_(a).add_(b)
        model.head.cal_scale.mul_(a)
    return {"a": a, "b": b}


def cross_validate(
    table: PairTable,
    v0_cfg: V0Config,
    cfg: TrainConfig,
    n_folds: int,
    *,
    cache: EmbeddingCache | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Prompt-disjoint k-fold CV: each fold's prompts are the validation set of one run (early stopping on
    an inner split of the remaining prompts). Returns per-fold metrics and mean/std per predictor."""
    if cache is None:
        cache = build_cache(v0_cfg, table.texts, cache_dir, progress)
    folds = prompt_folds(table.prompt_id, n_folds, cfg.seed)
    per_fold = []
    for f in range(n_folds):
        outer_train, outer_val = table.take(folds != f), table.take(folds == f)
        res = train_v0(outer_train, v0_cfg, replace(cfg, seed=cfg.seed + f), cache=cache, progress=progress)
        report, _ = evaluate(res.model, cache, outer_train, outer_val, cfg, with_baselines=True)
        per_fold.append({"fold": f, "best_step": res.metrics["best_step"], "minutes": res.metrics["minutes"], **report})
    summary: dict[str, dict] = {}
    for name in per_fold[0]:
        if not isinstance(per_fold[0][name], dict):
            continue
        vals = {m: [pf[name][m] for pf in per_fold] for m in ("gauc", "auc", "brier", "ece", "pair_acc")}
        summary[name] = {m: {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v))} for m, v in vals.items()}
    return {"folds": per_fold, "summary": summary, "n_folds": n_folds}


__all__ = [
    "TrainConfig",
    "PairTable",
    "Task",
    "TaskSampler",
    "TrainResult",
    "load_configs",
    "pairs_from_arrow",
    "load_release_pairs",
    "load_store_pairs",
    "split_prompts",
    "prompt_folds",
    "v0_loss",
    "cosine_lr",
    "predict_table",
    "baseline_predictions",
    "evaluate",
    "train_v0",
    "calibrate_head",
    "cross_validate",
]
