"""The embedded RL engine's loop: one training loop, algorithms as configuration.

Per step: collect (draw a prompt batch; for v05 ask the prior source for V; generate rollouts: OSLA rounds
for `v05`, refills for `dapo`) -> advantages (estimator registry) -> PPO-clip update -> log, evaluate,
checkpoint. The algorithms differ only in the settings of `ALGORITHM_TABLE` and in their collector:

| algorithm   | rollouts per prompt             | advantage                 | loss aggregation     | KL (k3) | clip       |
|-------------|---------------------------------|---------------------------|----------------------|---------|------------|
| `grpo`      | G (default 16)                  | group mean / std          | seq-mean-token-mean  | 0.001   | 0.2 / 0.2  |
| `dapo`      | G, zero-variance groups refilled| group mean / std          | token-mean           | 0       | 0.2 / 0.28 |
| `v05`       | k_init = 4 + OSLA rounds        | fused baseline (Eq. 6–9)  | prompt-mean (Eq. 10) | 0       | 0.2 / 0.2  |
| `v05-fixed` | k ∈ {1, 2, 4, 8}                | fused baseline (Eq. 6–9)  | prompt-mean (Eq. 10) | 0       | 0.2 / 0.2  |

Compute is matched as in the paper (§4.1.4): the prompt batch is `rollouts_per_step // k`, with k the
group size (G, k, or k_init), so prompt batch × rollouts per prompt is constant. Every generated rollout
is counted in `rollouts_used` — OSLA's extra rounds and padding, DAPO's dropped groups — and a run can
stop at `rollout_budget` instead of `steps` (or after `max_minutes` of training time; that stop is the
one thing a resumed run does not reproduce exactly). The oracle prior's measuring rollouts are *not* budgeted
(it is an upper-bound experiment) and are logged separately as `oracle_rollouts`.

Where this departs from the paper, and why:
- Per-token PPO ratios, prompt-mean aggregation and the k3 KL: see `v05_rl.losses`.
- DAPO: dynamic sampling draws a fresh prompt batch per try (`collect.collect_dapo`). The overlong-response
  reward shaping of DAPO is not used (responses here are short).
- The learning-rate schedule is linear warm-up then constant (the paper: 10 warm-up steps, no decay).
- `v05` with `prior: none` is legal but not V0.5: the planner treats a missing prior as maximal doubt and
  samples every prompt up to the cap (k = 16), i.e. GRPO-16 on a 4× larger prompt batch (unless
  `osla.no_prior: k_init`). `v05-fixed` with `prior: none` uses μ* = v̄_k and σ* = sqrt(1 − v̄_k²).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from v0_data.tasks.base import Prompt
from v05_rl.engine.advantage import compute_advantages, estimator_options, prior_quality
from v05_rl.engine.collect import (
    RewardFn,
    RolloutSource,
    collect_dapo,
    collect_fixed,
    collect_osla,
    default_reward_fn,
    query_priors,
)
from v05_rl.engine.config import TrainConfig
from v05_rl.engine.loggers import make_logger
from v05_rl.engine.run_folder import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    check_finite,
    checksum_path,
    file_sha256,
    newest_intact_checkpoint,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_atomic,
)
from v05_rl.engine.sampler import PromptSampler, derive_seed
from v05_rl.engine.update import UpdateSettings, ppo_update
from v05_rl.priors import PriorRuntime, PriorSource, make_prior_source
from v05_rl.rollout import SamplingConfig
from v05_rl.types import AdvantageStats, Collected, StepStats, UpdateStats

# settings a resumed run may change; everything else must equal the checkpoint's config
RESUME_MAY_CHANGE = ("steps", "rollout_budget", "max_minutes", "evaluation.every", "save_every", "keep_checkpoints",
                     "logger", "device")


class Trainer:
    """The loop. Components are injected so tests (and verl's smoke tests) can pass a fake backend.

    backend: any object with `generate(prompts, n_per_prompt, sampling, *, seed) -> RolloutBatch`.
    evaluate_fn: `(model, prompts) -> dict` of evaluation metrics, or None to skip evaluation.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: torch.nn.Module,
        backend: Any,
        train_prompts: Sequence[Prompt],
        out_dir: str | Path,
        ref_model: torch.nn.Module | None = None,
        eval_prompts: Sequence[Prompt] = (),
        reward_fn: RewardFn = default_reward_fn,
        prior_source: PriorSource | None = None,
        sampling: SamplingConfig | None = None,
        evaluate_fn: Callable[[torch.nn.Module, Sequence[Prompt]], Mapping[str, float]] | None = None,
        store: Any = None,
        store_model: str | None = None,
        policy_path: str | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.model = model
        self.train_prompts = list(train_prompts)
        self.eval_prompts = list(eval_prompts)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rollouts = RolloutSource(backend, reward_fn, sampling if sampling is not None else cfg.sampling, self._record)
        self.evaluate_fn = evaluate_fn
        self.progress = progress
        self.device = next(model.parameters()).device
        self.kl_coef = cfg.resolved_kl_coef
        if self.kl_coef > 0 and ref_model is None:
            raise ValueError(f"algorithm {cfg.algorithm!r} uses KL {self.kl_coef} to a reference policy: pass ref_model")
        self.ref_model = ref_model if self.kl_coef > 0 else None
        if self.ref_model is not None:
            self.ref_model.eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.prior_source = prior_source if prior_source is not None else self._make_prior()
        self.estimator = cfg.resolved_estimator
        self.estimator_options = estimator_options(self.estimator, cfg)
        self.update_settings = update_settings(cfg)
        self.optimizer, self.scheduler = make_optimizer(model, cfg)
        self.sampler = PromptSampler(len(self.train_prompts), cfg.seed)
        self.step = 0
        self.rollouts_used = 0
        self.oracle_rollouts = 0
        self.train_seconds = 0.0  # wall-clock time of training steps so far (evaluation excluded)
        self.store = store
        self.store_model = store_model or cfg.store_model or cfg.policy
        self.policy_path = policy_path or cfg.policy
        self.run_id: str | None = None
        self.owns_store = False  # True when build_trainer opened the store (run_training closes it)
        self._extra_logger = None
        self._pending: list[dict[str, list]] = []
        self.history: list[dict[str, Any]] = []

    def _make_prior(self) -> PriorSource:
        """The configured prior source; it may measure the policy (oracle) and embed any training prompt (V0)."""
        runtime = PriorRuntime(
            success_rate_fn=self.measure_success_rate,
            prompts_by_id={p.prompt_id: p for p in self.train_prompts},
            device=str(self.device),
        )
        return make_prior_source(self.cfg.prior, self.cfg.resolved_prior_options(), runtime)

    # ------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def measure_success_rate(self, prompts: Sequence[Prompt], n: int, seed: int) -> np.ndarray:
        """The current policy's success rate on each prompt from `n` fresh rollouts (oracle prior). Shape (B,)."""
        batch, rewards = self.rollouts(prompts, n, seed, record=False)
        idx = np.asarray(batch.prompt_index, dtype=np.int64)
        counts = np.bincount(idx, minlength=len(prompts))  # [B]
        sums = np.bincount(idx, weights=rewards, minlength=len(prompts))  # [B]
        self.oracle_rollouts += int(counts.sum())
        return (sums / np.maximum(counts, 1) + 1.0) / 2.0

    def collect(self, step: int) -> Collected:
        """This step's rollouts, spent the way the algorithm spends them (see `collect.py`)."""
        cfg = self.cfg
        B = cfg.batch_prompts
        seed_of = lambda rnd: derive_seed(cfg.seed, step, rnd)  # noqa: E731 - one seed per generation call
        if cfg.algorithm == "dapo":
            draw = lambda m: [self.train_prompts[i] for i in self.sampler.take(m)]  # noqa: E731
            return collect_dapo(draw, B, cfg.group_size, cfg.dapo_max_tries, self.rollouts, seed_of)
        prompts = [self.train_prompts[i] for i in self.sampler.take(B)]
        if not cfg.uses_prior:
            return collect_fixed(prompts, cfg.group_k, self.rollouts, seed_of(0))
        if cfg.algorithm == "v05" and not getattr(self.prior_source, "uses_policy", False):
            # the planner needs the prior only after the cold start: compute it while round 0 generates
            # (not for a source that itself generates with the policy, like the oracle)
            late = lambda: query_priors(self.prior_source, prompts, cfg.prior)[0]  # noqa: E731
            return collect_osla(prompts, late, cfg.osla, self.rollouts, seed_of)
        priors, t_prior = query_priors(self.prior_source, prompts, cfg.prior)
        if cfg.algorithm == "v05-fixed":
            return collect_fixed(prompts, cfg.k, self.rollouts, seed_of(0), priors=priors, t_prior=t_prior)
        return collect_osla(prompts, priors, cfg.osla, self.rollouts, seed_of, t_prior=t_prior)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepStats:
        """Collect -> advantages -> feed the support buffer -> update -> log one jsonl line."""
        t0 = time.perf_counter()
        self._pending = []
        oracle_before = self.oracle_rollouts
        self.model.eval()
        col = self.collect(self.step)
        self.rollouts_used += col.generated
        rewards, group = col.rewards, col.group
        adv_stats, upd = AdvantageStats(), UpdateStats()
        t_alloc, t_update = col.t_alloc, 0.0
        if col.prompts:
            ta = time.perf_counter()
            adv, adv_stats = compute_advantages(self.estimator, self.estimator_options, rewards, group, col.priors)
            t_alloc += time.perf_counter() - ta
            # feed the support buffer after the priors of this step were drawn (no leakage)
            self.prior_source.observe([p.prompt_id for p in col.prompts], col.success_rates(), counts=col.counts)
            tu = time.perf_counter()
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.step, 0xB47C))
            upd = ppo_update(self.model, self.optimizer, col.chunks, adv, self.update_settings,
                             ref_model=self.ref_model, generator=gen)
            check_finite(self.step + 1, upd, self.model, float(self.optimizer.param_groups[0]["lr"]))
            self.scheduler.step()
            t_update = time.perf_counter() - tu
        else:
            self.scheduler.step()
        self._flush_store()
        self.step += 1
        stats = self._step_stats(col, adv_stats, upd, oracle_before, t_alloc, t_update, time.perf_counter() - t0)
        self.train_seconds += stats.t_step
        self._log(stats.as_dict())
        return stats

    def _prior_error(self, priors: np.ndarray) -> float:
        """oracle-noise: mean |V - truth| of this step's priors, else NaN."""
        truth = getattr(self.prior_source, "last_truth", None)
        if truth is None or not self.cfg.uses_prior or len(truth) != len(priors):
            return float("nan")
        return float(np.nanmean(np.abs(priors - truth)))

    def _step_stats(self, col: Collected, adv: AdvantageStats, upd: UpdateStats, oracle_before: int,
                    t_alloc: float, t_update: float, t_step: float) -> StepStats:
        rewards, counts = col.rewards, col.counts
        n = len(col.prompts)
        quality = prior_quality(rewards, col.group, col.priors)
        return StepStats(
            step=self.step,
            rollouts=col.generated,
            rollouts_used=self.rollouts_used,
            oracle_rollouts=self.oracle_rollouts - oracle_before,
            prompts=n,
            reward=float(rewards.mean()) if len(rewards) else float("nan"),
            accuracy=float((rewards > 0).mean()) if len(rewards) else float("nan"),
            k_mean=float(counts.mean()) if n else float("nan"),
            k_max=int(counts.max()) if n else 0,
            k_hist={str(int(k)): int(c) for k, c in zip(*np.unique(counts, return_counts=True))},
            osla_rounds=col.osla_rounds,
            prior_reject=adv.prior_reject,
            prior_missing=adv.prior_missing,
            w_mean=adv.w_mean,
            prior_abs_err=self._prior_error(col.priors),
            prior_auc=quality.auc,
            prior_brier=quality.brier,
            prior_brier_mean=quality.brier_mean,
            zero_var_groups=col.zero_var,
            dapo_tries=col.dapo_tries,
            pg_loss=upd.pg_loss,
            kl=upd.kl,
            entropy=upd.entropy,
            clip_frac=upd.clip_frac,
            grad_norm=upd.grad_norm,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            response_len=upd.response_len,
            t_generate=col.t_generate,
            t_prior=col.t_prior,
            t_alloc=t_alloc,
            t_update=t_update,
            t_step=t_step,
        )

    # ------------------------------------------------------------------ the loop
    def done(self) -> bool:
        """Stop at `steps`, at `rollout_budget` generated rollouts, or after `max_minutes` of training steps."""
        cfg = self.cfg
        if self.step >= cfg.steps:
            return True
        if cfg.rollout_budget is not None and self.rollouts_used >= cfg.rollout_budget:
            return True
        return cfg.max_minutes is not None and self.train_seconds >= 60.0 * cfg.max_minutes

    def train(self, on_step: Callable[[StepStats], None] | None = None) -> list[dict[str, Any]]:
        """Run until `steps` or `rollout_budget`; evaluates, checkpoints and logs along the way.

        `on_step` is called with each step's statistics (e.g. an outer progress bar)."""
        cfg = self.cfg
        self._pending = []
        self._start_store_run()
        self._extra_logger = make_logger(cfg.logger, self.out, cfg.resolved())
        if self.step == 0:
            self.evaluate()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.algorithm}", unit="step", dynamic_ncols=True)
        try:
            while not self.done():
                s = self.train_step()
                if on_step is not None:
                    on_step(s)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(acc=f"{s.accuracy:.3f}", k=f"{s.k_mean:.1f}", used=s.rollouts_used, t=f"{s.t_step:.2f}s")
                self._after_step()
        finally:
            if bar is not None:
                bar.close()
            if self._extra_logger is not None:
                self._extra_logger.close()
        if self.store is not None and self.run_id is not None and hasattr(self.store, "finish_run"):
            self.store.finish_run(self.run_id)
        return self.history

    def _after_step(self) -> None:
        """Evaluate every `evaluation.every` steps, checkpoint every `save_every`, both at the end."""
        cfg = self.cfg
        last = self.done()
        if cfg.evaluation.every and self.step % cfg.evaluation.every == 0 and not last:
            self.evaluate()
        if (cfg.save_every and self.step % cfg.save_every == 0) or last:
            if last:
                self.evaluate()
            self.save_checkpoint()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.cfg),
            "step": self.step,
            "rollouts_used": self.rollouts_used,
            "oracle_rollouts": self.oracle_rollouts,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "prior": self.prior_source.state_dict(),
            "run_id": self.run_id,
            "rng": rng_state(),
        }

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step_NNNNNNN.pt`, its SHA-256 sidecar, then point `latest` at it (each file
        through a temporary file and a rename, so a crash leaves the previous checkpoint intact); keep
        the newest `keep_checkpoints`."""
        ckpt_dir = self.out / "checkpoints"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{self.step:07d}.pt"
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        write_atomic(checksum_path(path), f"{file_sha256(tmp)}  {path.name}\n")
        tmp.replace(path)
        write_atomic(ckpt_dir / "latest", path.name)
        kept = sorted(p for p in ckpt_dir.glob("step_*.pt") if CHECKPOINT_NAME.match(p.name))
        for old in kept[: max(0, len(kept) - max(1, self.cfg.keep_checkpoints))]:
            old.unlink()
            checksum_path(old).unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        """Restore the newest intact checkpoint (or the given one); returns False when there is none.

        Nothing in the run folder changes until the checkpoint is verified (checksum, weights-only load)
        and its config matches this run's: only then are the log lines after it dropped. A damaged
        checkpoint is skipped with a `CheckpointWarning` for the previous intact one (`newest_intact_checkpoint`).
        """
        if path is None:
            found = newest_intact_checkpoint(self.out / "checkpoints")
            if found is None:
                return False
            path, state = found
        else:
            path = Path(path)
            state = read_checkpoint(path)
        differ = config_differences(state["config"], asdict(self.cfg))
        if differ:
            raise ValueError(
                f"checkpoint {path} was written with a different config ({', '.join(differ)}); "
                "resume with the same settings or start a new --out"
            )
        self._restore(state)
        self._truncate_metrics()
        return True

    def _restore(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.prior_source.load_state_dict(state["prior"])
        self.step = int(state["step"])
        self.rollouts_used = int(state["rollouts_used"])
        self.oracle_rollouts = int(state["oracle_rollouts"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.run_id = state.get("run_id")
        set_rng_state(state["rng"])

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint so the resumed log reads as one run."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= self.step:
                keep.append(line)
        write_atomic(path, "".join(x + "\n" for x in keep))
        self.history = [json.loads(x) for x in keep]

    def save_policy(self, path: str | Path, tokenizer: Any = None) -> Path:
        """Write the current policy with `save_pretrained` (loadable by `AutoModelForCausalLM`)."""
        path = Path(path)
        self.model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    # ------------------------------------------------------------------ store
    def _record(self, prompts: Sequence[Prompt], batch: Any, rewards: np.ndarray) -> None:
        """Queue one generation call's rollouts for the store (written once per step by `_flush_store`)."""
        if self.store is None or self.run_id is None:
            return
        idx = np.asarray(batch.prompt_index, dtype=np.int64)
        n_tokens = np.asarray(getattr(batch, "n_tokens", np.zeros(len(idx))), dtype=np.int64).reshape(-1)
        reasons = getattr(batch, "finish_reason", None)
        self._pending.append({
            "step": [int(self.step)] * len(idx),
            "prompt_id": [int(prompts[i].prompt_id) for i in idx],
            "response": [str(r) for r in batch.responses],
            "reward": [int(r) for r in rewards],
            "n_tokens": n_tokens.tolist(),
            "finish_reason": [""] * len(idx) if reasons is None else [str(x) for x in list(reasons)],
        })

    def _flush_store(self) -> None:
        if self.store is None or self.run_id is None or not self._pending:
            self._pending = []
            return
        merged: dict[str, list] = {}
        for t in self._pending:
            for key, col in t.items():
                merged.setdefault(key, []).extend(col)
        # no sample_idx: the store numbers each (step, prompt)'s rollouts in input order, i.e. over all
        # OSLA rounds / DAPO tries of the step
        self.store.append_rollouts(self.run_id, merged)
        self._pending = []

    def _start_store_run(self) -> None:
        """Register (or, resuming, re-open) the run in the store; rows of re-run steps replace old ones."""
        if self.store is None:
            return
        self.store.add_prompts(self.train_prompts)
        self.run_id = self.store.start_run(self.store_model, self.policy_path, self.cfg.algorithm, self.cfg.resolved(),
                                           run_id=self.run_id or self.cfg.store_run_id)

    # ------------------------------------------------------------------ logging
    def _log(self, record: Mapping[str, Any]) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.history.append(dict(record))
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._extra_logger is not None:
            self._extra_logger.log(record)

    def evaluate(self) -> dict[str, Any] | None:
        if self.evaluate_fn is None or not self.eval_prompts:
            return None
        t0 = time.perf_counter()
        res = dict(self.evaluate_fn(self.model, self.eval_prompts))
        rec = {"kind": "eval", "step": self.step, "rollouts_used": self.rollouts_used, **res,
               "t_eval": time.perf_counter() - t0}
        self._log(rec)
        return rec


def update_settings(cfg: TrainConfig) -> UpdateSettings:
    """The loss settings of a run: `cfg.optim` with the algorithm's defaults resolved."""
    return UpdateSettings(
        loss_agg=cfg.resolved_loss_agg, clip_low=cfg.optim.clip_low, clip_high=cfg.resolved_clip_high,
        kl_coef=cfg.resolved_kl_coef, entropy_coef=cfg.optim.entropy_coef, grad_clip=cfg.optim.grad_clip,
        ppo_epochs=cfg.optim.ppo_epochs, n_minibatches=cfg.optim.n_minibatches,
        micro_batch_size=cfg.optim.micro_batch_size, temperature=cfg.sampling.temperature,
    )


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and the linear warm-up, then constant, schedule."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
    )
    warm = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
    return optimizer, scheduler


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of settings that differ between two `asdict(TrainConfig)`s, except `RESUME_MAY_CHANGE`."""
    out = []
    for key, value in now.items():
        name = f"{prefix}{key}"
        if name in RESUME_MAY_CHANGE:
            continue
        old = saved.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out += config_differences(old, value, f"{name}.")
        elif _norm(old) != _norm(value):
            out.append(name)
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


__all__ = ["RESUME_MAY_CHANGE", "Trainer", "config_differences", "make_optimizer", "update_settings"]
