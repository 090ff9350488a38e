"""Recipe of `v05 report RUN_DIR...`: markdown + PNG figures from the logged metrics of RL runs.

A run directory is one `v05 rl-train --out` folder (it holds `metrics.jsonl` and `config.yaml`/`config.json`).
An experiment directory holds run directories as `<variant>/seed<k>/`. Runs of the same variant are
pooled: curves show the mean over seeds with a band of ±1 standard deviation. Every figure and number
comes from `metrics.jsonl` only (records with `kind` = `train` or `eval`), never from a hard-coded value.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

EVAL_KEYS = ("mean_at_k", "accuracy", "mean@k")


@dataclass
class Run:
    """One training run read back from its `metrics.jsonl`."""

    path: Path
    variant: str
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def eval_curve(self, x: str = "rollouts_used") -> tuple[np.ndarray, np.ndarray]:
        """Held-out accuracy against `x` (rollouts_used or step). Shape: (E,), (E,)."""
        xs, ys = [], []
        for rec in self.evals:
            key = next((k for k in EVAL_KEYS if k in rec), None)
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
    def wall_seconds(self) -> float:
        return float(sum(r.get("t_step", 0.0) for r in self.train)) + float(
            sum(r.get("t_eval", 0.0) for r in self.evals)
        )

    @property
    def rollouts(self) -> int:
        return int(max((r.get("rollouts_used", 0) for r in self.train), default=0))


def read_run(path: Path, variant: str | None = None) -> Run:
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise ValueError(f"{path}: no metrics.jsonl; pass a `v05 rl-train --out` folder or an experiment folder")
    run = Run(path=path, variant=variant or _variant_name(path))
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


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], n_grid: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interpolate curves onto a shared grid over their common x range; mean and std across runs.

    Shape: each curve (E_i,), (E_i,) -> grid (n_grid,), mean (n_grid,), std (n_grid,).
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
    return grid, ys.mean(0), ys.std(0)


def rollouts_to_reach(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """First x at which the curve reaches `target` (linear interpolation), NaN if never."""
    for i in range(len(y)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            f = (target - y[i - 1]) / max(y[i] - y[i - 1], 1e-12)
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return math.nan


def summary_table(groups: dict[str, list[Run]], reference: str | None) -> tuple[list[dict[str, Any]], str | None]:
    rows = []
    finals = {}
    for name, runs in groups.items():
        last = [r.eval_curve()[1][-1] for r in runs if len(r.eval_curve()[1])]
        first = [r.eval_curve()[1][0] for r in runs if len(r.eval_curve()[1])]
        finals[name] = float(np.mean(last)) if last else math.nan
        rows.append({
            "variant": name,
            "seeds": len(runs),
            "initial_acc": float(np.mean(first)) if first else math.nan,
            "final_acc": finals[name],
            "final_acc_sd": float(np.std(last)) if last else math.nan,
            "rollouts": float(np.mean([r.rollouts for r in runs])),
            "wall_s": float(np.mean([r.wall_seconds for r in runs])),
        })
    if reference is None:
        reference = next((n for n in groups if n.startswith("grpo")), None)
    if reference in groups and not math.isnan(finals[reference]):
        target = finals[reference]
        for row in rows:
            reach = [rollouts_to_reach(*r.eval_curve(), target) for r in groups[row["variant"]]]
            reach = [v for v in reach if not math.isnan(v)]
            # Only meaningful when every seed reached the target.
            row["rollouts_to_ref_final"] = float(np.mean(reach)) if len(reach) == len(groups[row["variant"]]) else math.nan
    return rows, reference if reference in groups else None


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def curves_figure(groups: dict[str, list[Run]], path: Path, title: str, ylabel: str, xlabel: str,
                  get: Callable[[Run], tuple[np.ndarray, np.ndarray]]) -> bool:
    """One PNG of per-variant mean curves with a ±1 std band; False (nothing written) when no curve has points."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for variant, runs in groups.items():
        grid, mean, std = mean_band([get(r) for r in runs])
        if len(grid) == 0:
            continue
        drawn = True
        line, = ax.plot(grid, mean, label=f"{variant} (n={len(runs)})")
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.2)
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


def write_report(run_dirs: Sequence[Path], out: Path, *, title: str = "V0.5 report", reference: str | None = None,
                 extra_images: Sequence[Path] = ()) -> Path:
    """Read runs, draw the figures, write `out/report.md` and `out/summary.json`; returns the markdown path."""
    runs = discover_runs(run_dirs)
    groups = by_variant(runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_all(groups, out)
    rows, ref = summary_table(groups, reference)
    for img in extra_images:
        img = Path(img)
        if img.exists():
            target = out / img.name
            if img.resolve() != target.resolve():
                target.write_bytes(img.read_bytes())
            figures.append(img.name)

    cols = ["variant", "seeds", "initial_acc", "final_acc", "final_acc_sd", "rollouts", "wall_s"]
    if ref:
        cols.append("rollouts_to_ref_final")
    lines = [f"# {title}", "", f"Runs: {len(runs)} in {len(groups)} variants, read from "
             + ", ".join(f"`{d}`" for d in run_dirs) + ".", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, math.nan)) for c in cols) + " |")
    lines.append("")
    lines.append("`final_acc`: mean over seeds of the last held-out mean@k accuracy (`final_acc_sd`: its standard "
                 "deviation); `rollouts`: rollouts generated, all counted; `wall_s`: training + evaluation seconds.")
    if ref:
        lines.append(f"`rollouts_to_ref_final`: rollouts a variant needed to first reach `{ref}`'s final accuracy "
                     "(– when some seed never reached it).")
    lines.append("")
    for fig_name in figures:
        lines += [f"![{fig_name}]({fig_name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps({"rows": rows, "reference": ref, "figures": figures}, indent=2))
    return md
