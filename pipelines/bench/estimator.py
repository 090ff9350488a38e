"""`v05 bench estimator`: Monte Carlo benchmark of the V0.5 baseline estimators and OSLA allocation.

For every prompt a true success probability p is drawn (difficulty), the prior is
    V = clip(2p - 1 + N(0, σ²), -1, 1)          (a fraction of priors flipped V → -V in the
                                                 "hallucinating" regime)
and up to 16 Bernoulli(p) rollouts with rewards ±1 are drawn once and shared by every estimator (common
random numbers, so differences between rows are not sampling noise of the rewards). Each estimator gives
a baseline μ̂ per prompt; we report
    MSE      mean over prompts of (μ̂ - μ)², μ = 2p - 1
    |bias|   Σ_b n_b |mean_b(μ̂ - μ)| / N over 20 equal-width bins b of the true mean μ (conditional bias;
             the plain average error would cancel between easy and hard prompts)
    rollouts mean rollouts per prompt, and both as ratios to GRPO with 16 rollouts.
OSLA rows run the real planner `v05_rl.allocation.plan_round`, batch by batch (512 prompts), round by
round, exactly as a trainer would; "empirical-bayes" pools each batch of 512 for its τ² as a trainer would.
The oracle is the exact Bayes posterior mean E[μ | V, rollouts] at k = 4, computed by numeric integration
over a grid of p, knowing σ, the flip fraction and the difficulty distribution; no estimator can beat it
on average at k = 4.

Difficulty distributions: Beta(0.8, 0.8), and the real score distribution of the V0 release
(`../shared/data/v0_release/context.jsonl`, each score the mean of 10 rollouts of a real policy): a
prompt takes the score of a random row and draws p from the Jeffreys posterior Beta(s + ½, 10 - s + ½) of
its s successes of 10 (resampling with jitter; the oracle integrates over the same mixture).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from pipelines.common import write_json

GRID_P = 2000  # cells of the p grid for the oracle
GRID_V = 1601  # interior prior values tabulated for the oracle (interpolated linearly between)
N_BIAS_BINS = 20
SCORE_ROLLOUTS = 10  # each score of the V0 release is the mean of 10 rollouts


def default_scores_path() -> Path:
    """../shared/data/v0_release/context.jsonl beside the repository (this file is pipelines/bench/estimator.py)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "v0_release" / "context.jsonl"


@dataclass(frozen=True)
class BenchConfig:
    """Settings of the estimator benchmark."""

    prompts: int = field(default=100_000, metadata={"help": "prompts per (distribution, regime)"})
    seed: int = field(default=0, metadata={"help": "seed of the Monte Carlo"})
    sigmas: tuple[float, ...] = field(
        default=(0.0, 0.1, 0.2, 0.4, 0.8), metadata={"help": "standard deviations of the prior error"}
    )
    flip_fraction: float = field(default=0.2, metadata={"help": "hallucinating regime: fraction of priors V → -V"})
    flip_sigma: float = field(default=0.1, metadata={"help": "hallucinating regime: prior error of the others"})
    beta_a: float = field(default=0.8, metadata={"help": "Beta difficulty: first shape"})
    beta_b: float = field(default=0.8, metadata={"help": "Beta difficulty: second shape"})
    batch: int = field(default=512, metadata={"help": "prompts per OSLA / empirical-Bayes batch"})
    k_fixed: int = field(default=4, metadata={"help": "rollouts of the fixed-k rows (and the oracle)"})
    k_full: int = field(default=16, metadata={"help": "rollouts of the reference GRPO row"})
    scores_path: str | None = field(default=None, metadata={"help": "V0 release context.jsonl; None = default"})

    def __post_init__(self) -> None:
        if self.prompts < self.batch:
            raise ValueError(f"BenchConfig.prompts: expected at least one batch ({self.batch}), got {self.prompts}")
        if any(not (0 <= s <= 2) for s in self.sigmas):
            raise ValueError(f"BenchConfig.sigmas: expected values in [0, 2], got {self.sigmas}")
        if not 0 <= self.flip_fraction <= 1:
            raise ValueError(f"BenchConfig.flip_fraction: expected [0, 1], got {self.flip_fraction}")
        if not (1 <= self.k_fixed <= self.k_full):
            raise ValueError("BenchConfig: expected 1 <= k_fixed <= k_full")


# --------------------------------------------------------------------------------------------------
# difficulty distributions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difficulty:
    """A distribution of p as a mixture of Beta(a_j, b_j) with weights w_j.  Shapes: (J,) each."""

    name: str
    a: np.ndarray
    b: np.ndarray
    w: np.ndarray

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        j = rng.choice(self.w.size, size=n, p=self.w)
        return rng.beta(self.a[j], self.b[j])

    def cell_mass(self, edges: np.ndarray) -> np.ndarray:
        """Probability of each cell [edges[i], edges[i+1]) of p.  Shape: (len(edges) - 1,)."""
        from scipy.special import betainc

        cdf = sum(w * betainc(a, b, edges) for a, b, w in zip(self.a, self.b, self.w))
        return np.diff(cdf)


def beta_difficulty(a: float, b: float) -> Difficulty:
    return Difficulty(f"beta({a:g},{b:g})", np.array([a]), np.array([b]), np.array([1.0]))


def real_difficulty(path: Path) -> Difficulty | None:
    """Jeffreys-posterior mixture of the real scores in `path`; None when the file is absent."""
    if not path.is_file():
        return None
    scores = []
    with path.open() as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                score = float(json.loads(line)["score"])
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a numeric 'score' ({exc})") from None
            if not -1 <= score <= 1:
                raise ValueError(f"{path}:{line_no}: score {score} outside [-1, 1]")
            scores.append(score)
    if not scores:
        raise ValueError(f"{path}: no rows")
    succ = np.rint((np.asarray(scores) + 1) / 2 * SCORE_ROLLOUTS)
    values, counts = np.unique(succ, return_counts=True)
    return Difficulty(
        "real-scores", values + 0.5, SCORE_ROLLOUTS - values + 0.5, counts / counts.sum()
    )


# --------------------------------------------------------------------------------------------------
# priors and the oracle
# --------------------------------------------------------------------------------------------------


def sample_priors(mu: np.ndarray, sigma: float, flip: float, rng: np.random.Generator) -> np.ndarray:
    """V = clip(μ + N(0, σ²), -1, 1), then a fraction `flip` of them negated.  Shape: (N,)."""
    v = np.clip(mu + sigma * rng.standard_normal(mu.shape), -1.0, 1.0)
    if flip > 0:
        v = np.where(rng.random(mu.shape) < flip, -v, v)
    return v


def oracle_posterior_mean(
    v: np.ndarray, x: np.ndarray, k: int, dist: Difficulty, sigma: float, flip: float
) -> np.ndarray:
    """Exact Bayes E[2p - 1 | V, x successes of k] under the benchmark's generative model.

    p ~ dist; V = clip(2p - 1 + N(0, σ²), -1, 1), negated with probability `flip`. Integrates over a
    grid of GRID_P cells of p (cell probabilities exact, so Beta shapes < 1 are fine), tabulates interior
    V on GRID_V points (linear interpolation) and V = ±1 (the clipped mass) exactly.
    Shapes: v (N,), x (N,) int → (N,).
    """
    from scipy.special import ndtr

    if sigma == 0 and flip == 0:
        return v.copy()
    if sigma == 0:
        raise ValueError("the oracle needs sigma > 0 when priors are flipped")
    edges = np.linspace(0.0, 1.0, GRID_P + 1)
    mass = dist.cell_mass(edges)  # [M]
    pc = 0.5 * (edges[1:] + edges[:-1])  # [M]
    mc = 2 * pc - 1
    grid = np.linspace(-1.0, 1.0, GRID_V + 2)[1:-1]  # interior, symmetric  [NV]
    like = np.exp(-0.5 * ((grid[:, None] - mc[None, :]) / sigma) ** 2)  # [NV, M]
    hi = ndtr((mc - 1.0) / sigma)[None, :]  # P(V clipped to +1 | p)   [1, M]
    lo = ndtr((-1.0 - mc) / sigma)[None, :]  # P(V clipped to -1 | p)
    # the Gaussian density carries 1/(σ sqrt(2π)); the clipped rows are probabilities: keep one scale
    like = like / (sigma * math.sqrt(2 * math.pi))
    rows = np.concatenate([lo, like, hi], axis=0)  # V = -1, interior..., +1   [NV + 2, M]
    if flip > 0:
        rows = (1 - flip) * rows + flip * rows[::-1]  # the grid is symmetric: row j of -V is row -j-1
    xs = np.arange(k + 1)
    binom = pc[None, :] ** xs[:, None] * (1 - pc[None, :]) ** (k - xs[:, None])  # [k+1, M]
    weights = binom * mass[None, :]  # [k+1, M]
    den = rows @ weights.T  # [NV + 2, k+1]
    num = rows @ (weights * mc[None, :]).T
    table = num / np.maximum(den, 1e-300)  # [NV + 2, k+1]
    out = np.empty_like(v, dtype=np.float64)
    at_lo, at_hi = v <= -1.0, v >= 1.0
    inner = ~(at_lo | at_hi)
    out[at_lo] = table[0, x[at_lo]]
    out[at_hi] = table[-1, x[at_hi]]
    for xv in xs:
        sel = inner & (x == xv)
        out[sel] = np.interp(v[sel], grid, table[1:-1, xv])
    return out


# --------------------------------------------------------------------------------------------------
# estimators on a simulated batch
# --------------------------------------------------------------------------------------------------


def _fused_by_batch(mean: np.ndarray, k: np.ndarray, v: np.ndarray, method: str, batch: int) -> np.ndarray:
    """μ* of `fused_baseline`, called once per batch of `batch` prompts (as a trainer would)."""
    from v05_rl.estimators import fused_baseline

    out = np.empty_like(mean)
    for start in range(0, mean.size, batch):
        sl = slice(start, start + batch)
        out[sl] = fused_baseline(mean[sl], k[sl], v[sl], method=method)[0]
    return out


def simulate_osla(cum: np.ndarray, v: np.ndarray, cfg, batch: int) -> np.ndarray:
    """Rollout counts per prompt after running `plan_round` to completion on each batch.

    cum: cumulative reward sums, cum[:, j] = Σ of the first j+1 rewards   (N, k_cap); v: priors (N,).
    """
    from v05_rl.allocation import plan_round

    n = v.size
    counts = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    for start in range(0, n, batch):
        sl = slice(start, min(start + batch, n))
        k = counts[sl]
        while True:
            sums = np.where(k > 0, cum[rows[sl], np.maximum(k - 1, 0)], 0)
            extra = plan_round(k, sums, v[sl], cfg)
            if not extra.any():
                break
            k = k + extra
        counts[sl] = k
    return counts


def _metrics(est: np.ndarray, mu: np.ndarray, rollouts: float, bins: np.ndarray) -> dict[str, float]:
    err = est - mu
    s_b = np.bincount(bins, weights=err, minlength=N_BIAS_BINS)  # n_b · mean_b(err)
    abs_bias = float(np.sum(np.abs(s_b)) / mu.size)  # Σ_b n_b |mean_b(err)| / N
    return {"mse": float(np.mean(err**2)), "abs_bias": abs_bias, "rollouts": float(rollouts)}


ROWS = (
    ("grpo-4", "GRPO mean, k=4"),
    ("grpo-16", "GRPO mean, k=16"),
    ("prior-only", "prior V alone"),
    ("v05-k4", "V0.5 paper, fixed k=4"),
    ("v05-osla", "V0.5 paper + OSLA (halt 0.25, pad 32)"),
    ("v05-osla-h0", "V0.5 paper + OSLA, halt 0"),
    ("bernoulli-k4", "bernoulli noise, fixed k=4"),
    ("bernoulli-osla-h0", "bernoulli + OSLA, halt 0"),
    ("eb-k4", "empirical-Bayes, fixed k=4"),
    ("eb-osla-h0", "empirical-Bayes + OSLA, halt 0"),
    ("oracle-k4", "oracle Bayes posterior mean, k=4"),
)


def run_regime(
    dist: Difficulty, sigma: float, flip: float, cfg: BenchConfig, rng: np.random.Generator
) -> dict[str, dict[str, float]]:
    """All rows for one (difficulty, prior error) regime."""
    from v05_rl.allocation import OslaConfig

    n, kf, kF = cfg.prompts, cfg.k_fixed, cfg.k_full
    p = dist.sample(n, rng)  # [N]
    mu = 2 * p - 1
    v = sample_priors(mu, sigma, flip, rng)  # [N]
    rewards = np.where(rng.random((n, kF)) < p[:, None], 1.0, -1.0)  # [N, 16]
    cum = np.cumsum(rewards, axis=1)  # [N, 16]
    bins = np.minimum(((mu + 1) / 2 * N_BIAS_BINS).astype(np.int64), N_BIAS_BINS - 1)
    mean_k = cum[:, kf - 1] / kf
    k_vec = np.full(n, float(kf))
    out: dict[str, dict[str, float]] = {}
    out["grpo-4"] = _metrics(mean_k, mu, kf, bins)
    out["grpo-16"] = _metrics(cum[:, kF - 1] / kF, mu, kF, bins)
    out["prior-only"] = _metrics(v, mu, 0, bins)
    for tag, method in (("v05", "paper"), ("bernoulli", "bernoulli"), ("eb", "empirical-bayes")):
        out[f"{tag}-k4"] = _metrics(_fused_by_batch(mean_k, k_vec, v, method, cfg.batch), mu, kf, bins)
    osla_rows = [
        ("v05-osla", OslaConfig(k_init=kf, k_max=kF)),
        ("v05-osla-h0", OslaConfig(k_init=kf, k_max=kF, halt_fraction=0.0)),
        ("bernoulli-osla-h0", OslaConfig(k_init=kf, k_max=kF, halt_fraction=0.0, method="bernoulli")),
        ("eb-osla-h0", OslaConfig(k_init=kf, k_max=kF, halt_fraction=0.0, method="empirical-bayes")),
    ]
    for name, ocfg in osla_rows:
        counts = simulate_osla(cum, v, ocfg, cfg.batch)
        mean_c = cum[np.arange(n), counts - 1] / counts
        est = _fused_by_batch(mean_c, counts.astype(np.float64), v, ocfg.method, cfg.batch)
        out[name] = _metrics(est, mu, counts.mean(), bins)
    x = ((cum[:, kf - 1] + kf) / 2).astype(np.int64)
    out["oracle-k4"] = _metrics(oracle_posterior_mean(v, x, kf, dist, sigma, flip), mu, kf, bins)
    ref = out["grpo-16"]
    for row in out.values():
        row["mse_ratio"] = row["mse"] / ref["mse"]
        row["rollout_ratio"] = row["rollouts"] / ref["rollouts"]
    return out


def run_benchmark(cfg: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Every regime for every available difficulty distribution. Returns a JSON-ready dict."""
    from tqdm import tqdm

    dists = [beta_difficulty(cfg.beta_a, cfg.beta_b)]
    notes = []
    path = Path(cfg.scores_path) if cfg.scores_path else default_scores_path()
    real = real_difficulty(path)
    if real is None:
        notes.append(f"real score distribution skipped: {path} not found (needs ../shared beside the repo)")
    else:
        dists.append(real)
    regimes = [(f"sigma={s:g}", s, 0.0) for s in cfg.sigmas]
    regimes.append((f"flip={cfg.flip_fraction:g},sigma={cfg.flip_sigma:g}", cfg.flip_sigma, cfg.flip_fraction))
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    jobs = [(d, r) for d in dists for r in regimes]
    for i, (dist, (label, sigma, flip)) in enumerate(tqdm(jobs, desc="regimes", disable=not progress)):
        rng = np.random.default_rng([cfg.seed, i])
        results.setdefault(dist.name, {})[label] = run_regime(dist, sigma, flip, cfg, rng)
    return {
        "config": asdict(cfg),
        "rows": dict(ROWS),
        "results": results,
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for dist, regimes in report["results"].items():
        for label, rows in regimes.items():
            lines.append(f"\n[{dist}  {label}]")
            lines.append(f"{'row':<20}{'MSE':>10}{'|bias|':>9}{'rollouts':>10}{'MSE/G16':>9}{'roll/G16':>9}")
            for name, _ in ROWS:
                r = rows[name]
                lines.append(
                    f"{name:<20}{r['mse']:>10.5f}{r['abs_bias']:>9.4f}{r['rollouts']:>10.2f}"
                    f"{r['mse_ratio']:>9.3f}{r['rollout_ratio']:>9.3f}"
                )
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """MSE ratio to GRPO-16 per regime, one panel per difficulty distribution (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = list(report["results"])
    fig, axes = plt.subplots(1, len(dists), figsize=(7 * len(dists), 4.8), squeeze=False)
    shown = ["grpo-4", "prior-only", "v05-k4", "v05-osla", "v05-osla-h0", "eb-k4", "eb-osla-h0", "oracle-k4"]
    for ax, dist in zip(axes[0], dists):
        regimes = list(report["results"][dist])
        xs = np.arange(len(regimes))
        for name in shown:
            ys = [report["results"][dist][r][name]["mse_ratio"] for r in regimes]
            ys = [y if y > 0 else np.nan for y in ys]  # an MSE of exactly 0 (σ = 0) has no place on a log axis
            rl = np.mean([report["results"][dist][r][name]["rollouts"] for r in regimes])
            ax.plot(xs, ys, marker="o", label=f"{name} (~{rl:.1f} rollouts)")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(xs, [r.replace(",", "\n") for r in regimes], fontsize=8)
        ax.set_ylabel("baseline MSE / GRPO-16 MSE")
        ax.set_title(f"difficulty: {dist} (MSE 0 not drawn)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------------------


def speed_benchmark(prompts: int = 512, k: int = 16, repeats: int = 300, seed: int = 0) -> dict[str, float]:
    """Median µs per call on one batch: V0.5 advantages (group stats + fusion + standardization) plus one
    `plan_round`, in numpy and torch (CPU), and GRPO advantages as the in-run reference."""
    import torch

    from v05_rl.allocation import OslaConfig, plan_round
    from v05_rl.estimators import grpo_advantages, v05_advantages

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    p = rng.beta(0.8, 0.8, prompts)
    v = np.clip(2 * p - 1 + 0.2 * rng.standard_normal(prompts), -1, 1)
    r = np.where(rng.random((prompts, k)) < p[:, None], 1.0, -1.0).reshape(-1)
    g = np.repeat(np.arange(prompts), k)
    counts = np.full(prompts, 4)
    sums = np.where(rng.random((prompts, 4)) < p[:, None], 1, -1).sum(1)
    cfg = OslaConfig()
    rt, gt, vt = torch.as_tensor(r, dtype=torch.float32), torch.as_tensor(g), torch.as_tensor(v, dtype=torch.float32)

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts) * 1e6)

    out = {
        "v05+plan numpy (us)": timed(lambda: (v05_advantages(r, g, prior=v), plan_round(counts, sums, v, cfg))),
        "v05+plan torch (us)": timed(lambda: (v05_advantages(rt, gt, prior=vt), plan_round(counts, sums, v, cfg))),
        "eb v05+plan numpy (us)": timed(
            lambda: (
                v05_advantages(r, g, prior=v, method="empirical-bayes"),
                plan_round(counts, sums, v, OslaConfig(method="empirical-bayes")),
            )
        ),
        "grpo numpy (us)": timed(lambda: grpo_advantages(r, g)),
        "grpo torch (us)": timed(lambda: grpo_advantages(rt, gt)),
    }
    out["prompts"], out["rollouts_per_prompt"], out["repeats"] = prompts, k, repeats
    return out


# --------------------------------------------------------------------------------------------------
# recipe
# --------------------------------------------------------------------------------------------------


def bench_estimator(cfg: BenchConfig, out_dir: Path | None = None, *, speed: bool = False) -> dict[str, Any]:
    """Run the benchmark, print its table; with `out_dir`, write estimator_bench.json and .png there."""
    report = run_benchmark(cfg)
    click.echo(format_table(report))
    click.echo(f"\n{cfg.prompts} prompts per regime, {report['seconds']:.1f} s")
    if speed:
        report["speed"] = speed_benchmark()
        click.echo("speed, 512 prompts x 16 rollouts, median per call: " + json.dumps(report["speed"]))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "estimator_bench.json", report, indent=2)
        plot(report, out_dir / "estimator_bench.png")
        click.echo(f"wrote {out_dir / 'estimator_bench.json'} and {out_dir / 'estimator_bench.png'}")
    return report
