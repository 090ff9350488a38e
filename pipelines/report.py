"""Recipe of `v05 report RUN_DIR...`: markdown, `summary.json` and PNG figures from the logged metrics of RL runs.

A run directory is one `v05 rl-train --out` folder (it holds `metrics.jsonl` and `config.json`/`config.yaml`).
An experiment directory holds run directories as `<variant>/seed<k>/`. Every figure and number comes from
`metrics.jsonl` only (records with `kind` = `train` or `eval`), never from a hard-coded value.

The measurement protocol (DESIGN.md "Measuring RL outcomes"):
- a run's final accuracy is the mean of its last two held-out evaluations (one if it has only one);
- per variant: mean over seeds ± the half-width of a t-based 95 % CI (sample sd, ddof 1; no CI from one seed);
- paired differences against each reference arm: runs are paired by seed (the same seed gave both arms
  the same prompt order, initial policy and evaluation prompts), diff = mean of (variant - reference) over
  the seeds both have, with its t-based 95 % CI;
- two axes: at equal rollouts (the final accuracy, every arm spends the same budget) and at equal
  optimizer steps (accuracy interpolated at the largest step every run evaluated at or beyond, S);
- curves: mean over seeds with a 95 % CI band.
`summary.json` = {"variants": [{"variant", "seeds", "final_acc", "final_acc_ci95", "rollouts", "steps"}],
"paired": [{"variant", "reference", "diff", "ci95", "n_pairs"}], "equal_steps": {"step", "variants":
[{"variant", "acc", "acc_ci95"}], "paired": [...]}, "rows", "reference", "references", "figures"} with
accuracies as fractions, CI = half-width, NaN written as null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipelines.common import json_safe

EVAL_KEYS = ("mean_at_k", "accuracy", "mean@k")
FINAL_EVALS = 2  # a run's final accuracy averages its last this many evaluations


# --------------------------------------------------------------------------------------------------
# statistics: t-based 95 % confidence intervals (no scipy: it is only a test dependency)
# --------------------------------------------------------------------------------------------------


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer `df` >= 1, in closed form (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        term, acc = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):  # cosθ (1 + (2/3) cos²θ + (2·4)/(3·5) cos⁴θ + ...)
            acc += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2.0 / math.pi * (theta + s * acc)
    term, acc = 1.0, 0.0
    for j in range(1, df // 2 + 1):  # 1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + ...
        acc += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return s * acc


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (bisection on the exact CDF)."""
    if df < 1:
        raise ValueError(f"t quantile: df must be >= 1, got {df}")
    lo, hi = 0.0, 20.0 if df > 1 else 100.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_mass(mid, df) < 0.95 else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the t-based 95 % CI with the ddof-1 sd) of the finite `values`; NaN where undefined.

    Shape: values (n,). With n = 1 the half-width is NaN (one seed gives no interval), with n = 0 both are.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)  # [n]
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan
    return float(v.mean()), t_quantile_975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run read back from its `metrics.jsonl` (and its seed from `config.json`)."""

    path: Path
    variant: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None

    def eval_curve(self, x: str = "rollouts_used") -> tuple[np.ndarray, np.ndarray]:
        """Held-out accuracy against `x` (rollouts_used or step). Shape: (E,), (E,)."""
        xs, ys = [], []
        for rec in self.evals:
            key = next((k for k in EVAL_KEYS if rec.get(k) is not None), None)
            if key is None or rec.get(x) is None:
                continue
            xs.append(float(rec[x]))
            ys.append(float(rec[key]))
        return np.asarray(xs), np.asarray(ys)

    def train_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """A per-step training metric against the step. Shape: (S,), (S,)."""
        pts = [(r["step"], r[key]) for r in self.train if r.get(key) is not None]
        if not pts:
            return np.zeros(0), np.zeros(0)
        s, v = zip(*pts)
        return np.asarray(s, dtype=float), np.asarray(v, dtype=float)

    @property
    def final_acc(self) -> float:
        """Mean of the last `FINAL_EVALS` held-out evaluations (NaN without any)."""
        ys = self.eval_curve()[1]
        return float(ys[-FINAL_EVALS:].mean()) if len(ys) else math.nan

    def acc_at(self, x: str, at: float) -> float:
        """Held-out accuracy at `x` = `at`, linearly interpolated between evaluations; NaN outside the curve."""
        xs, ys = self.eval_curve(x)
        if len(xs) == 0 or at > xs.max() or at < xs.min():
            return math.nan
        return float(np.interp(at, xs, ys))

    @property
    def wall_seconds(self) -> float:
        return float(sum(r.get("t_step") or 0.0 for r in self.train)) + float(
            sum(r.get("t_eval") or 0.0 for r in self.evals)
        )

    @property
    def rollouts(self) -> int:
        return int(max((r.get("rollouts_used", 0) for r in self.train), default=0))

    @property
    def steps(self) -> int:
        """Optimizer steps made (the last training record's step)."""
        return int(max((r.get("step", 0) for r in self.train), default=0))


def read_run(path: Path, variant: str | None = None) -> Run:
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise ValueError(f"{path}: no metrics.jsonl; pass a `v05 rl-train --out` folder or an experiment folder")
    run = Run(path=path, variant=variant or _variant_name(path), seed=_run_seed(path))
    with open(metrics) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                # A run killed mid-write may leave a torn last line; anything earlier is corruption.
                if fh.readline() == "":
                    break
                raise ValueError(f"{metrics}:{lineno}: not valid JSON ({exc.msg}); delete or repair the line") from None
            kind = rec.get("kind", "train")
            (run.evals if kind == "eval" else run.train).append(rec)
    return run


def _run_seed(path: Path) -> int | None:
    """The run's seed: `seed` of its config.json, else the k of a `seed<k>` folder name, else None."""
    cfg = path / "config.json"
    if cfg.exists():
        try:
            seed = json.loads(cfg.read_text()).get("seed")
        except (json.JSONDecodeError, AttributeError):
            seed = None
        if isinstance(seed, int):
            return seed
    return int(path.name[4:]) if path.name.startswith("seed") and path.name[4:].isdigit() else None


def _variant_name(path: Path) -> str:
    # <experiment>/<variant>/seed<k> -> variant; a lone run dir -> its own name
    if path.name.startswith("seed") and path.parent.name:
        return path.parent.name
    return path.name


def discover_runs(dirs: Sequence[Path]) -> list[Run]:
    runs = []
    for d in dirs:
        d = Path(d)
        if (d / "metrics.jsonl").exists():
            runs.append(read_run(d))
            continue
        found = sorted(p.parent for p in d.glob("**/metrics.jsonl"))
        if not found:
            raise ValueError(f"{d}: no run found (no metrics.jsonl below it)")
        runs.extend(read_run(p) for p in found)
    return runs


def by_variant(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.variant, []).append(r)
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]],
              n_grid: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interpolate curves onto a shared grid over their common x range; mean and 95 % CI half-width across runs.

    Shape: each curve (E_i,), (E_i,) -> grid (n_grid,), mean (n_grid,), ci95 (n_grid,) (0 for a single run).
    """
    curves = [(x, y) for x, y in curves if len(x) >= 1]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    lo = max(x.min() for x, _ in curves)
    hi = min(x.max() for x, _ in curves)
    if hi <= lo:
        x, y = curves[0]
        return x, y, np.zeros_like(y)
    grid = np.linspace(lo, hi, n_grid)  # (n_grid,)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # [R, n_grid]
    if len(curves) < 2:
        return grid, ys.mean(0), np.zeros(n_grid)
    half = t_quantile_975(len(curves) - 1) * ys.std(0, ddof=1) / math.sqrt(len(curves))  # [n_grid]
    return grid, ys.mean(0), half


def rollouts_to_reach(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """First x at which the curve reaches `target` (linear interpolation), NaN if never."""
    for i in range(len(y)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            f = (target - y[i - 1]) / max(y[i] - y[i - 1], 1e-12)
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return math.nan


def common_step(groups: dict[str, list[Run]]) -> int | None:
    """S: the largest step every run with evaluations has evaluated at or beyond (None without evaluations)."""
    last = [r.eval_curve("step")[0].max() for runs in groups.values() for r in runs if len(r.eval_curve("step")[0])]
    return int(min(last)) if last else None


def paired_rows(groups: dict[str, list[Run]], references: Sequence[str],
                value: Callable[[Run], float]) -> list[dict[str, Any]]:
    """Paired difference of every variant against each reference, over the seeds both ran.

    One row {"variant", "reference", "diff", "ci95", "n_pairs"} per (reference, other variant); runs without
    a seed are not paired. `value` gives a run's figure (e.g. its final accuracy).
    """
    rows = []
    for ref in references:
        ref_by_seed = {r.seed: value(r) for r in groups.get(ref, []) if r.seed is not None}
        for variant, runs in groups.items():
            if variant == ref:
                continue
            diffs = [value(r) - ref_by_seed[r.seed] for r in runs if r.seed in ref_by_seed]
            diffs = [d for d in diffs if math.isfinite(d)]
            diff, ci = mean_ci95(diffs)
            rows.append({"variant": variant, "reference": ref, "diff": diff, "ci95": ci, "n_pairs": len(diffs)})
    return rows


def variant_rows(groups: dict[str, list[Run]], step: int | None) -> list[dict[str, Any]]:
    """The per-variant table: the protocol's fields plus the accuracy at step S, initial accuracy and time."""
    rows = []
    for name, runs in groups.items():
        final, final_ci = mean_ci95([r.final_acc for r in runs])
        at_s, at_s_ci = mean_ci95([r.acc_at("step", step) for r in runs]) if step is not None else (math.nan, math.nan)
        first = [r.eval_curve()[1][0] for r in runs if len(r.eval_curve()[1])]
        rows.append({
            "variant": name,
            "seeds": len(runs),
            "final_acc": final,
            "final_acc_ci95": final_ci,
            "rollouts": float(np.mean([r.rollouts for r in runs])),
            "steps": float(np.mean([r.steps for r in runs])),
            "acc_at_common_step": at_s,
            "acc_at_common_step_ci95": at_s_ci,
            "initial_acc": float(np.mean(first)) if first else math.nan,
            "wall_s": float(np.mean([r.wall_seconds for r in runs])),
        })
    return rows


def resolve_references(groups: dict[str, list[Run]], reference: str | Sequence[str] | None) -> list[str]:
    """The reference arms present: those named, else the first variant whose name starts with `grpo`."""
    if reference is None:
        first = next((n for n in groups if n.startswith("grpo")), None)
        return [first] if first else []
    names = [reference] if isinstance(reference, str) else list(reference)
    return [n for n in names if n in groups]


def summary_table(groups: dict[str, list[Run]],
                  reference: str | Sequence[str] | None) -> tuple[list[dict[str, Any]], str | None]:
    """Per-variant rows (with `rollouts_to_ref_final` against the first reference) and that reference."""
    refs = resolve_references(groups, reference)
    rows = variant_rows(groups, common_step(groups))
    ref = refs[0] if refs else None
    finals = {row["variant"]: row["final_acc"] for row in rows}
    if ref is not None and not math.isnan(finals[ref]):
        for row in rows:
            reach = [rollouts_to_reach(*r.eval_curve(), finals[ref]) for r in groups[row["variant"]]]
            reach = [v for v in reach if not math.isnan(v)]
            # Only meaningful when every seed reached the target.
            every = len(reach) == len(groups[row["variant"]])
            row["rollouts_to_ref_final"] = float(np.mean(reach)) if every else math.nan
    return rows, ref


def protocol_summary(groups: dict[str, list[Run]], references: Sequence[str]) -> dict[str, Any]:
    """The `variants`, `paired` and `equal_steps` entries of summary.json (accuracies as fractions)."""
    step = common_step(groups)
    rows = variant_rows(groups, step)
    keys = ("variant", "seeds", "final_acc", "final_acc_ci95", "rollouts", "steps")
    at_step = (lambda r: r.acc_at("step", step)) if step is not None else (lambda r: math.nan)
    return {
        "variants": [{k: row[k] for k in keys} for row in rows],
        "paired": paired_rows(groups, references, lambda r: r.final_acc),
        "equal_steps": {
            "step": step,
            "variants": [{"variant": row["variant"], "acc": row["acc_at_common_step"],
                          "acc_ci95": row["acc_at_common_step_ci95"]} for row in rows],
            "paired": paired_rows(groups, references, at_step),
        },
    }


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _pct(mean: float, ci: float) -> str:
    """An accuracy (fraction) as "66.2 ± 0.5" percentage points; "–" parts where NaN."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + ("" if ci is None or math.isnan(ci) else f" ± {100 * ci:.1f}")


def curves_figure(groups: dict[str, list[Run]], path: Path, title: str, ylabel: str, xlabel: str,
                  get: Callable[[Run], tuple[np.ndarray, np.ndarray]]) -> bool:
    """One PNG of per-variant mean curves over seeds with a 95 % CI band; False (nothing written) without points."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for i, (variant, runs) in enumerate(groups.items()):
        grid, mean, half = mean_band([get(r) for r in runs])
        if len(grid) == 0:
            continue
        drawn = True
        color, style = line_style(i, len(groups))
        ax.plot(grid, mean, color=color, linestyle=style, label=f"{variant} (n={len(runs)})")
        ax.fill_between(grid, mean - half, mean + half, color=color, alpha=0.15)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def line_style(i: int, n: int) -> tuple[Any, str]:
    """Colour and line style of the i-th of n curves: tab10 up to 10 curves, tab20 up to 20, then the
    tab20 colours again dashed, so no two of up to 40 variants look alike."""
    import matplotlib

    if n <= 10:
        return matplotlib.colormaps["tab10"](i), "-"
    return matplotlib.colormaps["tab20"](i % 20), ("-", "--")[(i // 20) % 2]


def paired_figure(paired: Sequence[dict[str, Any]], path: Path) -> bool:
    """Forest plot of the paired differences (equal rollouts), one panel per reference arm; False without rows."""
    import matplotlib.pyplot as plt

    rows = [r for r in paired if r["n_pairs"] >= 2 and math.isfinite(r["diff"])]
    refs = list(dict.fromkeys(r["reference"] for r in rows))
    if not refs:
        return False
    height = max(2.0, 0.28 * max(sum(r["reference"] == ref for r in rows) for ref in refs) + 1.0)
    ncols = min(3, len(refs))
    nrows = -(-len(refs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, height * nrows), squeeze=False, sharex=True)
    for ax in axes.flat[len(refs):]:
        ax.set_visible(False)
    for ax, ref in zip(axes.flat, refs):
        mine = [r for r in rows if r["reference"] == ref]
        y = np.arange(len(mine))[::-1]
        diff = np.array([r["diff"] for r in mine]) * 100.0
        ci = np.array([r["ci95"] if r["ci95"] is not None and math.isfinite(r["ci95"]) else 0.0 for r in mine]) * 100.0
        colors = ["tab:green" if d - c > 0 else "tab:red" if d + c < 0 else "tab:gray" for d, c in zip(diff, ci)]
        ax.hlines(y, diff - ci, diff + ci, colors=colors, linewidth=1.5)
        ax.scatter(diff, y, c=colors, zorder=3, s=18)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [r["variant"] for r in mine], fontsize=8)
        ax.set_title(f"− {ref}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.supxlabel("paired difference in final accuracy, points (95 % CI; green/red: CI excludes 0)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def k_histograms(groups: dict[str, list[Run]]) -> dict[str, dict[int, int]]:
    """variant -> {k: prompts}, pooled over steps and seeds from the per-step `k_hist` counts."""
    hists = {}
    for variant, runs in groups.items():
        total: dict[int, int] = {}
        for r in runs:
            for rec in r.train:
                for k, c in (rec.get("k_hist") or {}).items():
                    total[int(k)] = total.get(int(k), 0) + int(c)
        if total:
            hists[variant] = total
    return hists


def k_distribution_figure(hists: dict[str, dict[int, int]], path: Path) -> None:
    """Bars of the share of prompts per rollout count k, one colour per variant."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / len(hists)
    for i, (variant, total) in enumerate(hists.items()):
        ks = np.array(sorted(total))
        counts = np.array([total[k] for k in ks], dtype=float)
        ax.bar(ks + i * width, counts / counts.sum(), width=width, label=variant)
    ax.set_xlabel("rollouts per prompt k")
    ax.set_ylabel("share of prompts")
    ax.set_title("Distribution of k per prompt")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# file name, title, y label, x label, the series of a run
CURVES: tuple[tuple[str, str, str, str, Callable[[Run], tuple[np.ndarray, np.ndarray]]], ...] = (
    ("accuracy_vs_rollouts.png", "Held-out accuracy vs rollouts consumed", "mean@k accuracy", "rollouts generated",
     lambda r: r.eval_curve("rollouts_used")),
    ("accuracy_vs_steps.png", "Held-out accuracy vs training steps", "mean@k accuracy", "step",
     lambda r: r.eval_curve("step")),
    ("grad_norm.png", "Policy-gradient norm (before clipping)", "grad norm", "step",
     lambda r: r.train_series("grad_norm")),
    ("entropy.png", "Policy entropy", "entropy (nats/token)", "step", lambda r: r.train_series("entropy")),
    ("prior_rejection.png", "Share of prompts whose prior the test rejected (Δ̂² > 0)", "rejection rate", "step",
     lambda r: r.train_series("prior_reject")),
    ("k_mean.png", "Mean rollouts per prompt", "k", "step", lambda r: r.train_series("k_mean")),
    ("prior_auc.png", "Online prior quality: AUC of V against the step's k-rollout means", "AUC", "step",
     lambda r: r.train_series("prior_auc")),
    ("prior_brier.png", "Online prior quality: Brier score of p̂ against the step's rollouts", "Brier", "step",
     lambda r: r.train_series("prior_brier")),
)


def plot_all(groups: dict[str, list[Run]], out: Path) -> list[str]:
    """Every figure of the report into `out`; returns the names of the files written."""
    import matplotlib

    matplotlib.use("Agg")
    written = [name for name, title, ylabel, xlabel, get in CURVES
               if curves_figure(groups, out / name, title, ylabel, xlabel, get)]
    hists = k_histograms(groups)
    if hists:
        k_distribution_figure(hists, out / "k_distribution.png")
        written.append("k_distribution.png")
    return written


def markdown_tables(rows: list[dict[str, Any]], summary: dict[str, Any], ref: str | None) -> list[str]:
    """The report's tables: per variant at equal rollouts and at step S, then the paired differences."""
    step = summary["equal_steps"]["step"]
    s_col = f"acc @ step {step}" if step is not None else "acc @ common step"
    cols = ["variant", "seeds", "final acc (%)", "rollouts", "steps", s_col, "initial acc (%)", "wall_s"]
    if ref:
        cols.append("rollouts_to_ref_final")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [row["variant"], str(row["seeds"]), _pct(row["final_acc"], row["final_acc_ci95"]),
                 _fmt(row["rollouts"], 0), _fmt(row["steps"], 1),
                 _pct(row["acc_at_common_step"], row["acc_at_common_step_ci95"]), _pct(row["initial_acc"], math.nan),
                 _fmt(row["wall_s"], 1)]
        if ref:
            cells.append(_fmt(row.get("rollouts_to_ref_final", math.nan)))
        lines.append("| " + " | ".join(cells) + " |")
    if summary["paired"]:
        lines += ["", f"Paired differences (variant − reference, percentage points, same seeds): at equal rollouts "
                  f"(final accuracy) and at equal steps (step {step}).", "",
                  "| variant | reference | diff, equal rollouts | diff, equal steps | pairs |", "|---|---|---|---|---|"]
        at_steps = {(d["variant"], d["reference"]): d for d in summary["equal_steps"]["paired"]}
        for d in summary["paired"]:
            e = at_steps[(d["variant"], d["reference"])]
            lines.append(f"| {d['variant']} | {d['reference']} | {_signed(d['diff'], d['ci95'])} | "
                         f"{_signed(e['diff'], e['ci95'])} | {d['n_pairs']} |")
    return lines


def _signed(mean: float, ci: float) -> str:
    """A paired difference (fraction) as "+1.2 ± 0.6" points."""
    if mean is None or math.isnan(mean):
        return "–"
    return f"{100 * mean:+.1f}" + ("" if ci is None or math.isnan(ci) else f" ± {100 * ci:.1f}")


def write_report(run_dirs: Sequence[Path], out: Path, *, title: str = "V0.5 report",
                 reference: str | Sequence[str] | None = None, extra_images: Sequence[Path] = ()) -> Path:
    """Read runs, draw the figures, write `out/report.md` and `out/summary.json`; returns the markdown path.

    `reference`: the arm(s) the paired differences are taken against (default: the first variant named grpo*).
    """
    runs = discover_runs(run_dirs)
    groups = by_variant(runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_all(groups, out)
    refs = resolve_references(groups, reference)
    rows, ref = summary_table(groups, refs or None)
    summary = protocol_summary(groups, refs)
    if paired_figure(summary["paired"], out / "paired_differences.png"):
        figures.insert(0, "paired_differences.png")
    for img in extra_images:
        img = Path(img)
        if img.exists():
            target = out / img.name
            if img.resolve() != target.resolve():
                target.write_bytes(img.read_bytes())
            figures.append(img.name)

    lines = [f"# {title}", "", f"Runs: {len(runs)} in {len(groups)} variants, read from "
             + ", ".join(f"`{d}`" for d in run_dirs) + ".", ""]
    lines += markdown_tables(rows, summary, ref)
    lines += ["", f"`final acc`: per seed the mean of the last {FINAL_EVALS} held-out mean@k evaluations, then the "
              "mean over seeds ± the half-width of a t-based 95 % CI (ddof 1; none from one seed); `rollouts`: rollouts "
              "generated, all counted (equal-rollouts axis); `steps`: optimizer steps made; `acc @ step S`: accuracy "
              "interpolated at the largest step every run reached (equal-steps axis); `wall_s`: training + evaluation "
              "seconds. Curves: mean over seeds with a 95 % CI band."]
    if ref:
        lines.append(f"`rollouts_to_ref_final`: rollouts a variant needed to first reach `{ref}`'s final accuracy "
                     "(– when some seed never reached it).")
    lines.append("")
    for fig_name in figures:
        lines += [f"![{fig_name}]({fig_name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    payload = {**summary, "rows": rows, "reference": ref, "references": refs, "figures": figures}
    (out / "summary.json").write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False))
    return md
