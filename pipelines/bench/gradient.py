"""`v05 bench gradient`: does a prior improve the k-rollout policy gradient? The mechanism, measured directly.

For one policy and one batch of training prompts:
1. Reference gradients. R (default 48) rollouts per prompt on the batch prompts, and R on a held-out
   set of prompts (the task's eval split); advantages with an unbiased leave-one-out baseline,
       A_i = (r_i − mean of the other R − 1 rewards) / σ̂,   σ̂ = 2·sqrt(p̃(1 − p̃)),  p̃ = (s + ½)/(R + 1)
   (`--ref-norm std`, the default: the per-prompt 1/σ weighting that every arm's standardised advantage
   aims at, Eq. 10; `--ref-norm none` gives the plain gradient of expected reward), and the gradient of
   the on-policy loss (ratio ≡ 1, the first optimizer step of `ppo_update`).
2. Arms. n repeats; each repeat draws max(k) fresh rollouts per batch prompt (disjoint, independent
   draws), and the arms at k all use the first k rollouts of each prompt of that SAME draw (paired):
   `grpo` (group mean / std) and V0.5 (Eq. 6–10, σ* floor 0.1) with prior `none`, `oracle`, `oracle-noiseσ`,
   `history` and `v0`, fused by `paper` (Eq. 6–9) and `empirical-bayes`.
3. Per arm and repeat: cos(g_arm, g_ref_batch) and cos(g_arm, g_ref_heldout); mean and t-based 95 % CI
   half-width (ddof 1) over repeats, and the paired difference against `grpo` at the same k with its CI.

The priors:
- oracle: p̂ from a separate pool of `oracle_rollouts` (M) rollouts per prompt, smoothed
  p̃ = (s + ½)/(M + 1), so V = 2p̃ − 1 is never ±1 (|V| <= 1 − 1/(M + 1); the ±1 hazard of issue 12).
- oracle-noiseσ: V_oracle + N(0, σ²), redrawn every repeat (so the CI covers the noise draw), then kept
  inside the oracle's bound ±(1 − 1/(M + 1)).
- history: the `history` prior source (`v05_rl.priors.HistoryPrior`; `--history-prior`, `--history-center`)
  fed with an earlier, separate draw of `history_rollouts` rollouts per prompt, redrawn every repeat: the
  multi-epoch regime where each prompt was seen once before. Same policy (a real run sees it under an
  older policy: an optimistic history).
- mean: the `mean` prior source fed with the history draw: one V for every prompt, the batch's base rate
  (the control for whether knowing the prompt pays).
- v0: the `v0` source (`--v0-checkpoint`; skipped with a note without one) with a support buffer of
  `v0_context_prompts` other training prompts × `v0_context_rollouts` rollouts each, computed once.

Choices, and why:
- One loss aggregation for all arms, `prompt-mean` (Eq. 10). With k rollouts for every prompt it equals
  `seq-mean-token-mean` exactly (each row weighs 1/(k·len) vs 1/len, normalised by G vs G·k), and a
  cosine ignores scale: the arms differ in their advantages only.
- The gradient is linear in the advantages, so the arms of a repeat share one forward pass and take one
  backward pass each (`arm_gradients`; equal to `v05_rl.engine.update.batch_gradient` per arm, tested);
  rows whose advantage is 0 in every arm are skipped. Memory: arms × parameters floats (tiny policies).
- The CI is over rollout draws for a fixed prompt batch and fixed reference draws: it says whether an arm
  aligns better *with this reference on these prompts*; the split-half cosine of each reference (two
  halves of its R rollouts) is reported, as the ceiling that reference noise puts on every cosine
  (a note flags a reference below 0.1).
- grpo and v05 without a prior always point the same way at a fixed k (for ±1 rewards the group std is
  sqrt(1 − v̄²) up to Bessel's factor): the `v05-none` rows repeat grpo and cost nothing.

Power (measured on tiny-m, arith, the warm-start policy: 10 % success, 84 % / 70 % degenerate groups at
k = 2 / 4): one repeat's cosine varies with sd ≈ 0.08–0.10 and a paired difference with sd ≈ 0.04–0.09,
hardly less with 256 prompts than with 128 (the noise of a batch gradient sits in few directions), so
repeats, not prompts, buy precision: the CI half-width is ≈ 2·sd/√n. 128 prompts × 24 repeats gave
paired-difference CIs of 0.020–0.055 (256 × 24: 0.018–0.046); the default 48 repeats halve the variance
(≈ 0.014–0.04: 0.02 is resolved for the steadier arms only). `--quick` is a smoke test (CIs ±0.1–0.2).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import click
import numpy as np

from v05_rl.priors.base import HISTORY_CENTERS

# ----------------------------------------------------------------------------------------------
# configuration


def _h(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


REF_NORMS = ("std", "none")
#: Below this split-half cosine a reference gradient is flagged as mostly noise in the notes.
RELIABLE_SPLIT_HALF = 0.1


@dataclass(frozen=True)
class GradientBenchConfig:
    """Every setting of `v05 bench gradient` (defaults resolve cosine differences of about 0.02)."""

    policy: str = _h("tiny family name (tiny-s/m/l), a save_pretrained folder, or a run folder (policy/ or checkpoints/)",
                     default="tiny-m")
    tasks: str = _h("task source (v0_data.tasks registry)", default="arith")
    tasks_path: str | None = _h("spec or path handed to the task source (arith: 'n_prompts=5000')",
                                default="n_prompts=5000")
    train_split: str = _h("split of the batch prompts", default="train")
    eval_split: str = _h("split of the held-out prompts", default="test")
    batch_prompts: int = _h("prompts in the batch the arms train on", default=128)
    heldout_prompts: int = _h("held-out prompts of the held-out reference gradient", default=128)
    ref_rollouts: int = _h("R: rollouts per prompt of each reference gradient", default=48)
    ks: tuple[int, ...] = _h("rollouts per prompt of the arms", default=(2, 4))
    repeats: int = _h("independent k-rollout draws (paired across arms)", default=48)
    oracle_rollouts: int = _h("M: rollouts per prompt of the oracle's separate pool", default=32)
    noise_stds: tuple[float, ...] = _h("σ of the noisy-oracle arms (reward scale)", default=(0.2, 0.4))
    history_rollouts: int = _h("rollouts per prompt of the earlier draw behind the history prior", default=4)
    history_prior: tuple[float, float] | None = _h(
        "Beta(a0, b0) of the history prior; None = the `history` source's default (PriorOptions)", default=None)
    history_center: str | None = _h(
        "centre of the history prior's Beta: flat or base-rate; None = the source's default", default=None)
    methods: tuple[str, ...] = _h("fusion methods of the prior arms", default=("paper", "empirical-bayes"))
    v0_checkpoint: str | None = _h("V0 checkpoint for the v0 arms (skipped when unset)", default=None)
    v0_context_prompts: int = _h("v0: other training prompts in the support buffer", default=256)
    v0_context_rollouts: int = _h("v0: rollouts per support prompt", default=4)
    ref_norm: str = _h("reference advantages: 'std' (leave-one-out / σ̂ per prompt) or 'none' (leave-one-out)",
                       default="std")
    temperature: float = _h("sampling temperature (the training setting)", default=1.0)
    top_p: float = _h("sampling top-p (the training setting)", default=1.0)
    max_new_tokens: int = _h("maximum response tokens (tiny.yaml: 8)", default=8)
    micro_batch_size: int = _h("rows per forward pass (memory only)", default=512)
    seed: int = _h("seed of prompt choice and every draw", default=0)

    def __post_init__(self) -> None:
        from v05_rl.estimators import fusion_methods

        for name in ("batch_prompts", "heldout_prompts", "oracle_rollouts", "history_rollouts", "micro_batch_size",
                     "max_new_tokens", "v0_context_prompts", "v0_context_rollouts"):
            if getattr(self, name) < 1:
                raise ValueError(f"GradientBenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.ref_rollouts < 4:
            raise ValueError(f"GradientBenchConfig.ref_rollouts must be >= 4 (two halves of >= 2), got {self.ref_rollouts}")
        if self.repeats < 2:
            raise ValueError(f"GradientBenchConfig.repeats must be >= 2 for a confidence interval, got {self.repeats}")
        if not self.ks or any(k < 2 for k in self.ks):
            raise ValueError(f"GradientBenchConfig.ks must be rollouts per prompt >= 2 (grpo needs a group), got {self.ks}")
        if any(not s >= 0 for s in self.noise_stds):
            raise ValueError(f"GradientBenchConfig.noise_stds must be >= 0, got {self.noise_stds}")
        unknown = [m for m in self.methods if m not in fusion_methods()]
        if unknown:
            raise ValueError(f"GradientBenchConfig.methods: {unknown} unknown; use some of {', '.join(fusion_methods())}")
        if self.ref_norm not in REF_NORMS:
            raise ValueError(f"GradientBenchConfig.ref_norm {self.ref_norm!r} unknown; use one of {', '.join(REF_NORMS)}")
        if self.history_prior is not None and not (len(self.history_prior) == 2 and min(self.history_prior) > 0):
            raise ValueError(f"GradientBenchConfig.history_prior must be two numbers a0,b0 > 0, got {self.history_prior}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError("GradientBenchConfig: temperature must be > 0 and top_p in (0, 1] (sampled rollouts)")


#: `--quick`: a smoke-sized run (under 3 minutes on one core with tiny-m).
QUICK = {"batch_prompts": 32, "heldout_prompts": 32, "ref_rollouts": 32, "repeats": 6, "oracle_rollouts": 16,
         "v0_context_prompts": 128}


# ----------------------------------------------------------------------------------------------
# statistics (pure)


def t_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95 % CI half-width t_{0.975, n−1}·sd/√n with sd of ddof 1). NaN half-width for n < 2."""
    from scipy.stats import t as student_t

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x.mean()), float("nan")
    half = float(student_t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return float(x.mean()), half


def cosines(grads: Any, ref: Any) -> np.ndarray:
    """cos(g_m, ref) for each row m. Shapes: grads (M, P), ref (P,) -> (M,); 0-norm rows give NaN."""
    import torch

    g = grads.double()  # [M, P]
    r = ref.double()  # [P]
    den = g.norm(dim=1) * r.norm()  # [M]
    cos = (g @ r) / den  # [M]
    return torch.where(den > 0, cos, torch.full_like(cos, float("nan"))).cpu().numpy()


def smoothed_success(successes: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """p̃ = (s + ½) / (n + 1): strictly inside (0, 1). Shapes: (G,) -> (G,)."""
    return (np.asarray(successes, dtype=np.float64) + 0.5) / (np.asarray(n, dtype=np.float64) + 1.0)


def reference_advantages(rewards: np.ndarray, group: np.ndarray, norm: str) -> np.ndarray:
    """Leave-one-out advantages r_i − mean(r_{j≠i}), divided by σ̂ = 2·sqrt(p̃(1 − p̃)) for norm 'std'.

    Shapes: rewards (N,) ±1, group (N,) in [0, G) -> (N,). Every group needs >= 2 rows."""
    G = int(group.max()) + 1
    k = np.bincount(group, minlength=G).astype(np.float64)  # [G]
    total = np.bincount(group, weights=rewards, minlength=G)  # [G]
    adv = rewards - (total[group] - rewards) / (k[group] - 1.0)  # [N]
    if norm == "none":
        return adv
    p = smoothed_success((total + k) / 2.0, k)  # [G]
    return adv / (2.0 * np.sqrt(p * (1.0 - p)))[group]


def rank_in_group(group: np.ndarray) -> np.ndarray:
    """0-based position of each row among the rows of its group, in row order. Shape: (N,) -> (N,)."""
    order = np.argsort(group, kind="stable")  # [N]
    sorted_g = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_g)) + 1]  # first sorted position of each group
    first = np.repeat(starts, np.diff(np.r_[starts, len(group)]))  # [N] start of each sorted row's group
    rank = np.empty(len(group), dtype=np.int64)
    rank[order] = np.arange(len(group)) - first
    return rank


def noisy_oracle(p_tilde: np.ndarray, noise_std: float, bound: float, rng: np.random.Generator) -> np.ndarray:
    """clip(2p̃ − 1 + σ·ε, −bound, bound), ε ~ N(0, 1) (`v05_rl.priors.noisy_prior`, no flips). (G,) -> (G,)."""
    from v05_rl.priors import noisy_prior

    return np.clip(noisy_prior(p_tilde, noise_std, 0.0, rng), -bound, bound)


# ----------------------------------------------------------------------------------------------
# arms


class Arm(NamedTuple):
    """One estimator at one k: `prior` names its prior, `method` its fusion (grpo: `none`, `group-mean-std`)."""

    name: str
    k: int
    prior: str
    method: str


def build_arms(cfg: GradientBenchConfig, with_v0: bool) -> list[Arm]:
    """grpo and v05-none, then every prior × method, for each k (in this order)."""
    priors = (["oracle"] + [f"oracle-noise{s:g}" for s in cfg.noise_stds] + ["history", "mean"]
              + (["v0"] if with_v0 else []))
    arms: list[Arm] = []
    for k in cfg.ks:
        arms.append(Arm(f"grpo-k{k}", k, "none", "group-mean-std"))
        arms.append(Arm(f"v05-none-k{k}", k, "none", "paper"))
        arms += [Arm(f"v05-{p}-{m}-k{k}", k, p, m) for p in priors for m in cfg.methods]
    return arms


def arm_advantages(arm: Arm, rewards: np.ndarray, group: np.ndarray, priors: dict[str, np.ndarray]) -> np.ndarray:
    """The arm's advantages. Shapes: rewards, group (N,); priors name -> (G,) -> (N,)."""
    from v05_rl.estimators import grpo_advantages, v05_advantages

    G = int(group.max()) + 1
    if arm.method == "group-mean-std":
        return np.asarray(grpo_advantages(rewards, group, prior=np.full(G, np.nan)), dtype=np.float64)
    prior = np.full(G, np.nan) if arm.prior == "none" else priors[arm.prior]
    return np.asarray(v05_advantages(rewards, group, prior=prior, method=arm.method), dtype=np.float64)


def distinct_directions(adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows to compute, index of each row among them): a row that is a positive multiple of an earlier one
    (cosine > 1 − 1e-9) has the same gradient direction, hence the same cosines. grpo and v05-none at a
    fixed k are such a pair: for ±1 rewards the group std is sqrt(1 − v̄²) up to Bessel's factor (and
    grpo's eps of 1e-6). Zero rows go together. Shapes: (M, N) -> (U,), (M,)."""
    norms = np.linalg.norm(adv, axis=1)  # [M]
    unit = adv / np.where(norms > 0, norms, 1.0)[:, None]  # [M, N]
    keep: list[int] = []
    back = np.empty(len(adv), dtype=np.int64)
    for m in range(len(adv)):
        same = [j for j, u in enumerate(keep) if unit[m] @ unit[u] > 1.0 - 1e-9 or not (norms[m] or norms[u])]
        if not same:
            keep.append(m)
        back[m] = same[0] if same else len(keep) - 1
    return np.asarray(keep, dtype=np.int64), back


def arm_gradients(model: Any, batch: Any, group: np.ndarray, adv: np.ndarray, temperature: float,
                  micro_batch_size: int) -> Any:
    """Flattened gradients of the on-policy `prompt-mean` loss, one per advantage row, sharing forward passes.

    The loss of row m is −Σ_i A_mi · w_i · Σ_t logp_it / Σ_i w_i·len_i with w of `v05_rl.losses.row_weights`:
    the loss of `v05_rl.engine.update.batch_gradient` at ratio 1 (no KL, no entropy). Rows (rollouts)
    whose advantage is 0 in every arm are skipped. Shapes: group (N,), adv (M, N) -> (M, P) float32.
    """
    import torch

    from v05_rl.losses import row_weights
    from v05_rl.rollout import sequence_logprobs_and_entropy

    params = [p for p in model.parameters() if p.requires_grad]
    group_t = torch.as_tensor(group)
    lengths = batch.response_mask.sum(-1).cpu().to(torch.float64)  # [N]
    w = row_weights(group_t, torch.bincount(group_t).to(torch.float64), lengths, "prompt-mean")  # [N]
    coef = torch.as_tensor(adv, dtype=torch.float64) * (w / (w * lengths).sum())  # [M, N]
    out = torch.zeros(coef.shape[0], sum(p.numel() for p in params))  # [M, P]
    rows = np.flatnonzero((coef != 0).any(dim=0).numpy())  # rows that matter to some arm
    for start in range(0, len(rows), micro_batch_size):
        mb = rows[start : start + micro_batch_size]
        sub = batch.select(mb)
        seq_logp = sequence_logprobs_and_entropy(model, sub, temperature).logprobs.sum(-1)  # [n]
        c = coef[:, torch.as_tensor(mb)].to(device=seq_logp.device, dtype=seq_logp.dtype)  # [M, n]
        for m in range(c.shape[0]):
            if not bool((c[m] != 0).any()):
                continue
            grads = torch.autograd.grad(-(c[m] * seq_logp).sum(), params, retain_graph=True, allow_unused=True)
            out[m] += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                                 for g, p in zip(grads, params)])
    return out


# ----------------------------------------------------------------------------------------------
# the world: policy, prompts, generation


def load_bench_policy(spec: str, device: Any) -> tuple[Any, Any]:
    """(model, tokenizer) for a family name / save_pretrained folder / Hub id, or a run folder.

    A run folder is read as its `policy/` (the final save_pretrained policy) or, before the run
    finished, as the model weights of `checkpoints/latest` on top of the run's base policy."""
    import torch

    from v05_rl.policies import load_policy

    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "policy" / "config.json").exists():
            return load_policy(path / "policy", device, progress=False)
        latest = path / "checkpoints" / "latest"
        if not latest.exists():
            raise FileNotFoundError(f"--policy {spec}: a folder without config.json, policy/ or checkpoints/latest; "
                                    "give a family name, a save_pretrained folder or a run folder")
        state = torch.load(path / "checkpoints" / latest.read_text().strip(), map_location="cpu", weights_only=False)
        model, tok = load_policy(state["config"]["policy"], device, progress=False)
        model.load_state_dict(state["model"])
        return model, tok
    return load_policy(spec, device, progress=False)


class World(NamedTuple):
    """What every measurement of a run shares."""

    model: Any
    gen: Any  # v05_rl.engine.collect.RolloutSource: (prompts, n, seed) -> (batch, rewards)
    batch: list  # [G] Prompt
    heldout: list  # [H] Prompt
    context: list  # V0's support prompts (other training prompts)


def build_world(cfg: GradientBenchConfig, device: Any, reward_fn: Any = None) -> World:
    """Load the policy and draw the prompts (batch and V0 context from the train split, held-out from the eval split).

    reward_fn: `(prompts, responses) -> ±1 rewards (N,)`; default: the engine's `default_reward_fn` (tests pass a fake)."""
    from v05_rl.engine import load_task_prompts
    from v05_rl.engine.collect import RolloutSource, default_reward_fn
    from v05_rl.rollout import SamplingConfig, get_backend

    model, tok = load_bench_policy(cfg.policy, device)
    model.eval()  # the tiny policies have no dropout; eval keeps any other model deterministic
    train = load_task_prompts(cfg.tasks, cfg.tasks_path, cfg.train_split)
    test = load_task_prompts(cfg.tasks, cfg.tasks_path, cfg.eval_split)
    if len(train) < cfg.batch_prompts or len(test) < cfg.heldout_prompts:
        raise ValueError(f"task source {cfg.tasks!r} ({cfg.tasks_path}) has {len(train)} {cfg.train_split} and "
                         f"{len(test)} {cfg.eval_split} prompts; lower --batch-prompts / --heldout-prompts")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train))
    batch = [train[i] for i in order[: cfg.batch_prompts]]
    context = [train[i] for i in order[cfg.batch_prompts : cfg.batch_prompts + cfg.v0_context_prompts]]
    heldout = [test[i] for i in rng.permutation(len(test))[: cfg.heldout_prompts]]
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    gen = RolloutSource(get_backend("hf", model, tok), reward_fn or default_reward_fn, sampling)
    return World(model, gen, batch, heldout, context)


def success_counts(batch: Any, rewards: np.ndarray, n_prompts: int) -> np.ndarray:
    """Successes per prompt of a generation call. Shapes: rewards (N,) -> (G,)."""
    idx = np.asarray(batch.prompt_index, dtype=np.int64)
    return np.bincount(idx, weights=(rewards > 0).astype(np.float64), minlength=n_prompts)


# ----------------------------------------------------------------------------------------------
# measurement


class Reference(NamedTuple):
    grad: Any  # (P,) the reference gradient from all R rollouts
    split_half_cos: float  # cos of the gradients of two disjoint halves of the R rollouts
    success: float  # mean success rate of its rollouts
    degenerate: float  # share of prompts whose R rollouts all agree


def reference_gradient(world: World, prompts: list, cfg: GradientBenchConfig, seed: int) -> Reference:
    """The reference gradient of `prompts` from R fresh rollouts each, and its split-half reliability."""
    batch, rewards = world.gen(prompts, cfg.ref_rollouts, seed, record=False)
    group = np.asarray(batch.prompt_index, dtype=np.int64)
    half = rank_in_group(group) < cfg.ref_rollouts // 2
    adv = np.zeros((3, len(rewards)))  # full, first half, second half
    adv[0] = reference_advantages(rewards, group, cfg.ref_norm)
    for row, rows in ((1, half), (2, ~half)):
        sub = np.flatnonzero(rows)
        adv[row, sub] = reference_advantages(rewards[sub], group[sub], cfg.ref_norm)
    grads = arm_gradients(world.model, batch, group, adv, cfg.temperature, cfg.micro_batch_size)  # [3, P]
    succ = success_counts(batch, rewards, len(prompts))
    return Reference(grads[0], float(cosines(grads[1:2], grads[2])[0]), float((rewards > 0).mean()),
                     float(np.mean((succ == 0) | (succ == cfg.ref_rollouts))))


def fixed_priors(world: World, cfg: GradientBenchConfig, notes: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(oracle p̃ (G,), V0 priors (G,) or None): the priors that stay fixed over repeats."""
    from v05_rl.engine.sampler import derive_seed

    G = len(world.batch)
    batch, rewards = world.gen(world.batch, cfg.oracle_rollouts, derive_seed(cfg.seed, 0x0AC1E), record=False)
    p_tilde = smoothed_success(success_counts(batch, rewards, G), cfg.oracle_rollouts)
    if not cfg.v0_checkpoint:
        notes.append("v0 arms skipped: no --v0-checkpoint")
        return p_tilde, None
    from v05_rl.priors import PriorOptions, PriorRuntime, make_prior_source

    everyone = world.batch + world.context
    src = make_prior_source("v0", PriorOptions(v0_checkpoint=cfg.v0_checkpoint, seed=cfg.seed),
                            PriorRuntime(prompts_by_id={p.prompt_id: p for p in everyone}))
    cb, cr = world.gen(world.context, cfg.v0_context_rollouts, derive_seed(cfg.seed, 0xC07E), record=False)
    rates = success_counts(cb, cr, len(world.context)) / cfg.v0_context_rollouts
    src.observe([p.prompt_id for p in world.context], rates)
    v0 = np.asarray(src.priors(world.batch), dtype=np.float64)
    if np.isnan(v0).all():
        notes.append("v0 gave no prior (support buffer with one class only): its arms equal v05-none")
    return p_tilde, v0


def repeat_priors(world: World, cfg: GradientBenchConfig, p_tilde: np.ndarray, v0: np.ndarray | None,
                  rep: int) -> dict[str, np.ndarray]:
    """Every prior of one repeat, name -> (G,): oracle, noisy oracles (fresh noise), history and mean (fresh draw), v0."""
    from v05_rl.engine.sampler import derive_seed
    from v05_rl.priors import PriorOptions, make_prior_source

    bound = 1.0 - 1.0 / (cfg.oracle_rollouts + 1)
    out = {"oracle": 2.0 * p_tilde - 1.0}
    rng = np.random.default_rng(derive_seed(cfg.seed, 0x015E, rep))
    for s in cfg.noise_stds:
        out[f"oracle-noise{s:g}"] = noisy_oracle(p_tilde, s, bound, rng)
    hb, hr = world.gen(world.batch, cfg.history_rollouts, derive_seed(cfg.seed, 0x4157, rep), record=False)
    beta = {} if cfg.history_prior is None else {"history_a0": cfg.history_prior[0], "history_b0": cfg.history_prior[1]}
    if cfg.history_center is not None:
        beta["history_center"] = cfg.history_center
    history = make_prior_source("history", PriorOptions(**beta))
    ids = [p.prompt_id for p in world.batch]
    rates = success_counts(hb, hr, len(ids)) / cfg.history_rollouts  # [G]
    history.observe(ids, rates, counts=np.full(len(ids), cfg.history_rollouts))
    out["history"] = history.priors(world.batch)
    mean = make_prior_source("mean")  # one V for every prompt: the base rate of the same draw
    mean.observe(ids, rates)
    out["mean"] = mean.priors(world.batch)
    if v0 is not None:
        out["v0"] = v0
    return out


def measure_repeat(world: World, cfg: GradientBenchConfig, arms: list[Arm], priors: dict[str, np.ndarray],
                   refs: tuple[Any, Any], rep: int) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """(cos with the batch reference (A,), cos with the held-out reference (A,), {k: share of degenerate groups})."""
    from v05_rl.engine.sampler import derive_seed
    from v05_rl.types import zero_variance

    batch, rewards = world.gen(world.batch, max(cfg.ks), derive_seed(cfg.seed, 0xD4A3, rep), record=False)
    group = np.asarray(batch.prompt_index, dtype=np.int64)
    rank = rank_in_group(group)
    cos_b, cos_h = np.full(len(arms), np.nan), np.full(len(arms), np.nan)
    degenerate: dict[int, float] = {}
    for k in cfg.ks:
        rows = np.flatnonzero(rank < k)
        sub, g, r = batch.select(rows), group[rows], rewards[rows]
        which = [i for i, a in enumerate(arms) if a.k == k]
        adv = np.stack([arm_advantages(arms[i], r, g, priors) for i in which])  # [A_k, N_k]
        keep, back = distinct_directions(adv)
        grads = arm_gradients(world.model, sub, g, adv[keep], cfg.temperature, cfg.micro_batch_size)  # [U, P]
        cos_b[which], cos_h[which] = cosines(grads, refs[0])[back], cosines(grads, refs[1])[back]
        degenerate[k] = float(np.mean(zero_variance(r, g, len(world.batch))))
    return cos_b, cos_h, degenerate


# ----------------------------------------------------------------------------------------------
# the recipe


def summarise(arms: list[Arm], cos_b: np.ndarray, cos_h: np.ndarray) -> list[dict[str, Any]]:
    """One `gradient.json` row per arm from the per-repeat cosines (repeats × arms), with paired diffs vs grpo."""
    rows = []
    grpo_col = {a.k: i for i, a in enumerate(arms) if a.method == "group-mean-std"}
    for i, a in enumerate(arms):
        (mb, hb), (mh, hh) = t_ci95(cos_b[:, i]), t_ci95(cos_h[:, i])
        row = {"name": a.name, "k": a.k, "prior": a.prior, "method": a.method, "cos_batch": mb, "cos_batch_ci95": hb,
               "cos_heldout": mh, "cos_heldout_ci95": hh, "n_repeats": int(np.isfinite(cos_b[:, i]).sum())}
        j = grpo_col[a.k]
        if j != i:
            (db, dbh), (dh, dhh) = t_ci95(cos_b[:, i] - cos_b[:, j]), t_ci95(cos_h[:, i] - cos_h[:, j])
            row.update({"diff_vs_grpo_batch": db, "diff_vs_grpo_batch_ci95": dbh,
                        "diff_vs_grpo_heldout": dh, "diff_vs_grpo_heldout_ci95": dhh})
        row.update({"cos_batch_repeats": cos_b[:, i].tolist(), "cos_heldout_repeats": cos_h[:, i].tolist()})
        rows.append(row)
    return rows


def run_gradient_bench(cfg: GradientBenchConfig, out_dir: str | Path, *, device: str = "cpu", progress: bool = True,
                       reward_fn: Any = None) -> dict[str, Any]:
    """Measure every arm (module docstring); write gradient.json, gradient.png and gradient.md under `out_dir`.

    reward_fn: see `build_world` (None = the task's verifier)."""
    from v05_rl.engine import resolve_device
    from v05_rl.engine.sampler import derive_seed

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg, resolve_device(device), reward_fn)
    notes: list[str] = []
    ref_b = reference_gradient(world, world.batch, cfg, derive_seed(cfg.seed, 0x4EF, 0))
    ref_h = reference_gradient(world, world.heldout, cfg, derive_seed(cfg.seed, 0x4EF, 1))
    for name, ref in (("batch", ref_b), ("held-out", ref_h)):
        if not ref.split_half_cos >= RELIABLE_SPLIT_HALF:
            notes.append(f"the {name} reference is mostly noise (split-half cosine {ref.split_half_cos:.3f} < "
                         f"{RELIABLE_SPLIT_HALF}): its cosines say little; raise --ref-rollouts or the prompts")
    p_tilde, v0 = fixed_priors(world, cfg, notes)
    arms = build_arms(cfg, v0 is not None)
    t_setup = time.perf_counter() - t0
    cos_b, cos_h = np.full((cfg.repeats, len(arms)), np.nan), np.full((cfg.repeats, len(arms)), np.nan)
    degenerate: dict[int, list[float]] = {k: [] for k in cfg.ks}
    for rep in _progress(range(cfg.repeats), progress):
        priors = repeat_priors(world, cfg, p_tilde, v0, rep)
        cos_b[rep], cos_h[rep], deg = measure_repeat(world, cfg, arms, priors, (ref_b.grad, ref_h.grad), rep)
        for k, share in deg.items():
            degenerate[k].append(share)
    result = {
        "arms": summarise(arms, cos_b, cos_h),
        "reference": {name: {"split_half_cos": r.split_half_cos, "success_rate": r.success,
                             "degenerate_prompts": r.degenerate} for name, r in (("batch", ref_b), ("heldout", ref_h))},
        "degenerate_groups": {str(k): float(np.mean(v)) for k, v in degenerate.items()},
        "oracle_success_rate": float(p_tilde.mean()),
        "config": asdict(cfg),
        "notes": notes,
        "seconds": {"setup": t_setup, "total": time.perf_counter() - t0},
    }
    write_outputs(result, out)
    return result


def _progress(it: Any, on: bool) -> Any:
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc="bench gradient", unit="repeat", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# outputs


def _clean(x: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _pm(mean: float | None, half: float | None, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + (f" ± {half:.3f}" if half is not None and math.isfinite(half) else "")


def markdown_table(result: dict[str, Any]) -> str:
    """The arms as a markdown table: cosines and paired differences vs grpo at the same k, each ± 95 % CI."""
    lines = ["| arm | k | prior | method | cos batch | Δ vs grpo | cos held-out | Δ vs grpo | repeats |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in result["arms"]:
        lines.append(
            f"| {a['name']} | {a['k']} | {a['prior']} | {a['method']} | {_pm(a['cos_batch'], a['cos_batch_ci95'])} | "
            f"{_pm(a.get('diff_vs_grpo_batch'), a.get('diff_vs_grpo_batch_ci95'), True)} | "
            f"{_pm(a['cos_heldout'], a['cos_heldout_ci95'])} | "
            f"{_pm(a.get('diff_vs_grpo_heldout'), a.get('diff_vs_grpo_heldout_ci95'), True)} | {a['n_repeats']} |")
    ref = result["reference"]
    lines.append("")
    lines.append(f"Reference split-half cosine: batch {ref['batch']['split_half_cos']:.3f}, held-out "
                 f"{ref['heldout']['split_half_cos']:.3f}; degenerate groups "
                 + ", ".join(f"k={k}: {v:.0%}" for k, v in result["degenerate_groups"].items()) + ".")
    lines += [f"Note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _column(arms: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if a.get(key) is None else a[key] for a in arms], dtype=float)


def plot(result: dict[str, Any], path: Path) -> None:
    """Top: cosine per arm; bottom: paired difference vs grpo at the same k; batch and held-out; 95 % CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    y = np.arange(len(arms))[::-1]
    colors = ["black" if a["method"] == "group-mean-std" else "tab:gray" if a["prior"] == "none"
              else "tab:blue" if a["method"] == "paper" else "tab:orange" for a in arms]
    fig, axes = plt.subplots(2, 2, figsize=(12, 0.45 * len(arms) + 2.0), sharey=True)
    panels = (("cos_batch", "cos(g_arm, g_ref): batch prompts"), ("cos_heldout", "cos(g_arm, g_ref): held-out prompts"),
              ("diff_vs_grpo_batch", "paired difference vs grpo (same k): batch"),
              ("diff_vs_grpo_heldout", "paired difference vs grpo (same k): held-out"))
    for ax, (key, title) in zip(axes.flat, panels):
        for yi, m, h, c in zip(y, _column(arms, key), _column(arms, key + "_ci95"), colors):
            ax.errorbar([m], [yi], xerr=[[h], [h]] if np.isfinite(h) else None, fmt="o", color=c, ms=3.5, capsize=2)
        if key.startswith("diff"):
            ax.axvline(0.0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_yticks(y, [a["name"] for a in arms], fontsize=8)
    fig.suptitle("k-rollout policy gradient vs a many-rollout reference (95 % CI over paired repeats; "
                 "black grpo, grey v05 without prior, blue paper fusion, orange empirical-bayes)", fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """gradient.json (strict JSON, NaN as null), gradient.png, gradient.md."""
    clean = _clean(result)
    (out / "gradient.json").write_text(json.dumps(clean, indent=2))
    (out / "gradient.md").write_text(markdown_table(clean) + "\n")
    plot(clean, out / "gradient.png")


# ----------------------------------------------------------------------------------------------
# command line


def _numbers(text: str, kind: type, option: str) -> tuple[Any, ...]:
    """'2,4' -> (2, 4); a bad item is a click error that names the option."""
    try:
        return tuple(kind(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of {kind.__name__}s", param_hint=option) from None


_D = GradientBenchConfig()


def _help(name: str) -> str:
    return GradientBenchConfig.__dataclass_fields__[name].metadata["help"]


@click.command("gradient")
@click.option("--policy", default=_D.policy, show_default=True, help=_help("policy"))
@click.option("--tasks", default=_D.tasks, show_default=True, help=_help("tasks"))
@click.option("--tasks-path", default=_D.tasks_path, show_default=True, help=_help("tasks_path"))
@click.option("--batch-prompts", type=int, default=_D.batch_prompts, show_default=True, help=_help("batch_prompts"))
@click.option("--heldout-prompts", type=int, default=_D.heldout_prompts, show_default=True, help=_help("heldout_prompts"))
@click.option("--ref-rollouts", type=int, default=_D.ref_rollouts, show_default=True, help=_help("ref_rollouts"))
@click.option("--ks", default=",".join(map(str, _D.ks)), show_default=True, help="comma-separated " + _help("ks"))
@click.option("--repeats", type=int, default=_D.repeats, show_default=True, help=_help("repeats"))
@click.option("--oracle-rollouts", type=int, default=_D.oracle_rollouts, show_default=True, help=_help("oracle_rollouts"))
@click.option("--noise", default=",".join(f"{s:g}" for s in _D.noise_stds), show_default=True,
              help="comma-separated " + _help("noise_stds") + " ('' for none)")
@click.option("--history-rollouts", type=int, default=_D.history_rollouts, show_default=True,
              help=_help("history_rollouts"))
@click.option("--history-prior", default="", show_default=True,
              help="a0,b0 of the history prior's Beta ('' = the source's default, Beta(1, 1))")
@click.option("--history-center", type=click.Choice(HISTORY_CENTERS), default=None,
              help="centre of the history prior's Beta (default: the source's, base-rate)")
@click.option("--methods", default=",".join(_D.methods), show_default=True, help="comma-separated " + _help("methods"))
@click.option("--v0-checkpoint", type=click.Path(dir_okay=False), default=None, help=_help("v0_checkpoint"))
@click.option("--ref-norm", type=click.Choice(REF_NORMS), default=_D.ref_norm, show_default=True, help=_help("ref_norm"))
@click.option("--max-new-tokens", type=int, default=_D.max_new_tokens, show_default=True, help=_help("max_new_tokens"))
@click.option("--temperature", type=float, default=_D.temperature, show_default=True, help=_help("temperature"))
@click.option("--top-p", type=float, default=_D.top_p, show_default=True, help=_help("top_p"))
@click.option("--seed", type=int, default=_D.seed, show_default=True, help=_help("seed"))
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads (0 = torch's default)")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda or auto")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench_gradient"),
              show_default=True, help="folder for gradient.json, gradient.png and gradient.md")
@click.option("--quick", is_flag=True, help="smoke size: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
@click.option("--quiet", is_flag=True, help="no progress bar")
def gradient(ks: str, noise: str, history_prior: str, methods: str, threads: int, device: str, out_dir: Path,
             quick: bool, quiet: bool, **options: Any) -> None:
    """Cosine of k-rollout policy gradients (grpo; V0.5 with no / oracle / noisy / history / V0 prior) with a
    reference gradient from many rollouts, on the batch and on held-out prompts, paired over repeats, 95 % CIs."""
    from pipelines.common import set_threads

    beta = _numbers(history_prior, float, "--history-prior")
    lists = {"ks": _numbers(ks, int, "--ks"), "noise_stds": _numbers(noise, float, "--noise"),
             "history_prior": beta or None, "methods": tuple(m.strip() for m in methods.split(",") if m.strip())}
    try:
        cfg = GradientBenchConfig(**lists, **options)
        if quick:
            cfg = replace(cfg, **QUICK)
        set_threads(threads)
        result = run_gradient_bench(cfg, out_dir, device=device, progress=not quiet)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(markdown_table(_clean(result)))
    click.echo(f"\nwrote {out_dir / 'gradient.json'}, gradient.png, gradient.md ({result['seconds']['total']:.0f} s)")


__all__ = [
    "QUICK",
    "REF_NORMS",
    "Arm",
    "GradientBenchConfig",
    "arm_advantages",
    "arm_gradients",
    "build_arms",
    "cosines",
    "distinct_directions",
    "gradient",
    "load_bench_policy",
    "markdown_table",
    "rank_in_group",
    "reference_advantages",
    "run_gradient_bench",
    "smoothed_success",
    "t_ci95",
]
