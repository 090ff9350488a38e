"""Recipes of `v05 pretrain-v0` and `v05 predict-v0`.

`pretrain_v0` trains V0 on a trajectory store's `v0_pairs` (or a V0-release folder), writes one checkpoint
file and, beside it, a report folder `<CKPT>.report/` with the resolved config, the training history,
validation metrics of V0 and of the baselines, and a calibration plot.

`predict_v0` is the interface outside evaluations call: V0-release jsonl rows in, the query rows with a
`pred` field (probability of success) out, in input order; each query is predicted from the context
rows of its own (model, step).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click

from pipelines.common import OptionError, json_safe
from pipelines.config import read_yaml

# ====================================================================================== pretrain-v0


def load_pairs(store: str | None, release: str | None, holdout: str | None):
    """(training pairs, held-out pairs or None) from a store or a release folder.

    With `holdout` (a score file of the release), that file is kept out of training, and so is every
    prompt it holds, in any (model, step).
    """
    import numpy as np

    from v0_data.tasks.v0_release import RELEASE_FILES
    from v0_model.train import load_release_pairs, load_store_pairs

    if store is not None:
        return load_store_pairs(store), None
    if holdout is not None and holdout not in RELEASE_FILES:
        raise OptionError(f"{holdout!r} is not one of the release's score files {list(RELEASE_FILES)}", "--holdout")
    table = load_release_pairs(release, files=[f for f in RELEASE_FILES if f != holdout])
    if holdout is None:
        return table, None
    held = load_release_pairs(release, files=(holdout,))
    return table.take(~np.isin(table.prompt_id, held.prompt_id)), held


def pretrain_v0(out: str | Path, *, store: str | None = None, release: str | None = None, config: str | None = None,
                max_minutes: float | None = None, max_steps: int | None = None, seed: int | None = None,
                threads: int | None = None, cache_dir: str | None = None, cv_folds: int = 0,
                holdout: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train V0 on exactly one of `store` / `release`, save the checkpoint `out` and its report; returns
    the metrics (validation, optional `holdout` and `cv`)."""
    import torch

    from v0_model.checkpoint import save_checkpoint
    from v0_model.train import build_cache, cross_validate, evaluate, load_configs, train_v0

    if (store is None) == (release is None):
        raise ValueError("give exactly one of --store DIR or --release DIR")
    if config is not None:
        read_yaml(config)  # refuses duplicate keys and bad YAML naming the file and line (load_configs would not)
    v0_cfg, cfg = load_configs(config, max_minutes=max_minutes, max_steps=max_steps, seed=seed, threads=threads)
    torch.set_num_threads(cfg.threads)
    table, held = load_pairs(store, release, holdout)
    if len(table) == 0:
        raise ValueError(f"{store or release}: no training pairs (empty score files, or a store without scores or "
                         "rollouts); fill the store with `v05 data import` / `v05 build-data`, or point --release at "
                         "a V0-release folder with context.jsonl rows")
    if store is not None and cache_dir is None:
        cache_dir = str(Path(store) / "embeddings")
    out = Path(out)
    report_dir = out.with_name(out.name + ".report")
    report_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**v0_cfg.to_dict(), "train": asdict(cfg), "data": {"store": store, "release": release}}
    (report_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    click.echo(f"pretrain-v0: {len(table)} pairs, {len(table.texts)} prompts, "
               f"{len(set(table.keys()))} (model, step) keys; config -> {report_dir / 'config.json'}")

    cache = build_cache(v0_cfg, table.texts, cache_dir, progress=progress)
    result = train_v0(table, v0_cfg, cfg, cache=cache, progress=progress)
    metrics = dict(result.metrics)
    if held is not None:
        cache.ensure(held.texts, progress=progress)
        report, _ = evaluate(result.model, cache, table, held, cfg, with_baselines=True)
        metrics["holdout"] = {"file": holdout, "n_rows": len(held), "metrics": report}
    if cv_folds and cv_folds > 1:
        metrics["cv"] = cross_validate(table, v0_cfg, replace(cfg, max_minutes=cfg.max_minutes / cv_folds), cv_folds,
                                       cache=cache, progress=progress)
    save_checkpoint(out, result.model, backbone_id=cache.backbone.spec.backbone_id,
                    data_fingerprint=table.fingerprint(), metrics=metrics, train_config=asdict(cfg))
    write_report(report_dir, metrics, result)
    click.echo(summary_text(metrics))
    click.echo(f"checkpoint -> {out}; report -> {report_dir}")
    return metrics


def write_report(report_dir: Path, metrics: dict, result) -> None:
    """metrics.json, history.jsonl, calibration.png (V0 and baselines on validation) and report.md."""
    import numpy as np

    from v0_model import metrics as M

    (report_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
    with open(report_dir / "history.jsonl", "w") as f:
        for row in result.history:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
    ok = ~np.isnan(result.val_preds["v0"])
    curves = {name: (result.val_table.rate[ok], p[ok]) for name, p in result.val_preds.items() if name != "context_mean"}
    M.calibration_plot(curves, report_dir / "calibration.png")
    (report_dir / "report.md").write_text(report_markdown(metrics))


def summary_text(metrics: dict) -> str:
    """The lines `pretrain-v0` prints after training: steps, then one line per predictor."""
    lines = [f"pretrain-v0: {metrics['steps']} steps in {metrics['minutes']:.1f} min ({metrics['stop_reason']}), "
             f"best step {metrics['best_step']}"]
    row = "  {name:13s} gAUC {m[gauc]:.3f}  AUC {m[auc]:.3f}  Brier {m[brier]:.3f}  ECE {m[ece]:.3f}"
    lines += [row.format(name=name, m=m) for name, m in metrics["val"].items()]
    if "holdout" in metrics:
        h = metrics["holdout"]
        lines.append(f"holdout {h['file']} ({h['n_rows']} rows):")
        lines += [row.format(name=name, m=m) for name, m in h["metrics"].items()]
    return "\n".join(lines)


def report_markdown(metrics: dict) -> str:
    """report.md: run summary, the difficulty bank, validation, held-out file and cross-validation tables."""
    lines = ["# V0 pre-training report", "",
             f"steps {metrics['steps']} ({metrics['stop_reason']}), best step {metrics['best_step']}, "
             f"{metrics['minutes']:.1f} min on {metrics['threads']} thread(s); validation: "
             f"{metrics['n_val_rows']} rows, {metrics['n_val_prompts']} held-out prompts", "",
             "| predictor | gAUC | AUC | pair acc (n) | Brier | ECE |", "|---|---|---|---|---|---|"]
    bank = metrics.get("bank")
    if bank:
        lines[3:3] = [f"difficulty bank: {bank['size']} prompts, length scale {bank['length_scale']}, ridge "
                      f"{bank['ridge']}, leave-one-out MSE {bank['loo_mse']:.4f} vs target variance "
                      f"{bank['target_var']:.4f} (`bank_only` below: the bank alone)", ""]
    for name, m in metrics["val"].items():
        lines.append(f"| {name} | {m['gauc']:.3f} | {m['auc']:.3f} | {m['pair_acc']:.3f} ({m['pair_n']}) | "
                     f"{m['brier']:.3f} | {m['ece']:.3f} |")
    if "holdout" in metrics:
        h = metrics["holdout"]
        lines += ["", f"## Held-out file `{h['file']}` ({h['n_rows']} rows, predicted from the training rows)", "",
                  "| predictor | gAUC | AUC | Brier | ECE |", "|---|---|---|---|---|"]
        for name, m in h["metrics"].items():
            lines.append(f"| {name} | {m['gauc']:.3f} | {m['auc']:.3f} | {m['brier']:.3f} | {m['ece']:.3f} |")
    if "cv" in metrics:
        lines += ["", f"## {metrics['cv']['n_folds']}-fold prompt-disjoint cross-validation (mean ± std)", "",
                  "| predictor | gAUC | AUC | Brier | ECE |", "|---|---|---|---|---|"]
        for name, s in metrics["cv"]["summary"].items():
            lines.append(f"| {name} | " + " | ".join(f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}"
                                                      for m in ("gauc", "auc", "brier", "ece")) + " |")
    lines += ["", "![calibration](calibration.png)", ""]
    return "\n".join(lines)


# ====================================================================================== predict-v0


def raw_rows(path: Path) -> list[dict]:
    """The JSON objects of a jsonl file, in order, blank lines skipped (validated by `read_rows`, which
    runs first and names the file and line of any bad one)."""
    out = []
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line.decode("utf-8")))
    return out


def prompt_ids(rows, prompt_dict: dict[str, str], prompts_path: str) -> list[int]:
    """The store's prompt id of every release row (dataset + text); a key missing from the dict fails."""
    from v0_data.tasks.base import make_prompt_id

    out = []
    for r in rows:
        text = prompt_dict.get(r.key)
        if text is None:
            raise ValueError(f"{r.file}: line {r.line}: prompt key {r.key!r} (dataset + '_' + id) is not in "
                             f"{prompts_path}; add its text to the prompt dict")
        out.append(make_prompt_id(r.dataset, text))
    return out


def context_groups(ctx_rows, ctx_ids: list[int], q_rows, context_path: str) -> dict[tuple[str, int], list]:
    """(model, step) -> [(prompt id, success rate in [0, 1])] of the context rows; every query needs its key."""
    groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r, pid in zip(ctx_rows, ctx_ids):
        groups.setdefault((r.model, r.step), []).append((pid, (r.score + 1.0) / 2.0))
    for r in q_rows:
        if (r.model, r.step) not in groups:
            raise ValueError(f"{r.file}: line {r.line}: no context row for model {r.model!r} step {r.step} in "
                             f"{context_path}; every query needs context rows of its own (model, step)")
    return groups


def predict_by_key(predictor, groups: dict, q_rows, q_ids: list[int], *, max_context: int | None, seed: int):
    """Predictions for the query rows, one `predictor.predict` call per (model, step). Shape: (Q,)."""
    import numpy as np

    preds = np.full(len(q_rows), np.nan)  # (Q,)
    rng = np.random.default_rng(seed)
    by_key: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(q_rows):
        by_key.setdefault((r.model, r.step), []).append(i)
    for key, rows in by_key.items():
        ctx = groups[key]
        if max_context is not None and len(ctx) > max_context:
            ctx = [ctx[j] for j in rng.permutation(len(ctx))[:max_context]]
        ids, rates = zip(*ctx)
        preds[rows] = predictor.predict(list(ids), list(rates), [q_ids[i] for i in rows])
    return preds, len(by_key)


def write_predictions(out: Path, raw: list[dict], preds) -> None:
    """The query rows with `pred` added, in input order, written atomically (temporary file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for obj, p in zip(raw, preds):
            f.write(json.dumps(json_safe({**obj, "pred": float(p)}), ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, out)


def predict_v0(checkpoint: str, context: str, queries: str, prompts: str, out: str | Path, *,
               max_context: int | None = None, seed: int = 0, cache_dir: str | None = None, threads: int = 1,
               feature_cache: bool = True, quiet: bool = False):
    """Predict the success probability of every query row from its (model, step)'s context rows; write
    them to `out` and return them. Shape: (Q,)."""
    import torch

    from v0_data.tasks.v0_release import read_prompt_dict, read_rows
    from v0_model.checkpoint import load_predictor

    torch.set_num_threads(threads)
    prompt_dict = read_prompt_dict(prompts)
    ctx_rows = read_rows(context, require_score=True, default_type="context")
    q_rows = read_rows(queries, require_score=False, default_type="query")
    for path, rows, what in ((context, ctx_rows, "context rows with scores"), (queries, q_rows, "query rows")):
        if not rows:
            raise ValueError(f"{path}: no rows (the file is empty); give it the {what}, one JSON object per line "
                             '(e.g. {"id": 1, "score": 0.2, "type": "context", "model": "m", "step": 16, '
                             '"dataset": "dapomath"})')
    raw = raw_rows(Path(queries))
    if len(raw) != len(q_rows):  # pragma: no cover - both skip blank lines the same way
        raise ValueError(f"{queries}: could not align rows")
    ctx_ids = prompt_ids(ctx_rows, prompt_dict, prompts)
    q_ids = prompt_ids(q_rows, prompt_dict, prompts)
    groups = context_groups(ctx_rows, ctx_ids, q_rows, context)
    predictor = load_predictor(checkpoint, cache_dir=cache_dir, feature_cache=feature_cache)
    texts = dict(zip(ctx_ids + q_ids, [prompt_dict[r.key] for r in list(ctx_rows) + list(q_rows)]))
    predictor.ensure_texts(texts, progress=not quiet)

    t0 = time.perf_counter()
    preds, n_keys = predict_by_key(predictor, groups, q_rows, q_ids, max_context=max_context, seed=seed)
    elapsed = time.perf_counter() - t0
    out = Path(out)
    write_predictions(out, raw, preds)
    if not quiet:
        click.echo(f"predict-v0: {len(q_rows)} queries in {n_keys} (model, step) groups, "
                   f"{elapsed:.3f} s ({len(q_rows) / max(elapsed, 1e-9):.0f} queries/s, embeddings cached) -> {out}")
    return preds


__all__ = ["json_safe", "load_pairs", "predict_v0", "pretrain_v0", "report_markdown", "summary_text", "write_report"]
