"""`v05 pretrain-v0` and `v05 predict-v0`.

pretrain-v0 trains V0 on a trajectory store's `v0_pairs` (or a V0-release folder), writes one checkpoint
file and, beside it, a report folder `<CKPT>.report/` with the resolved config, the training history,
validation metrics of V0 and of the baselines, and a calibration plot.

predict-v0 is the interface outside evaluations call: V0-release jsonl rows in, the query rows with a
`pred` field (probability of success) out, in input order; each query is predicted from the context
rows of its own (model, step).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import click


@click.command("pretrain-v0")
@click.option("--store", "store", type=click.Path(file_okay=False), default=None,
              help="trajectory store directory whose v0_pairs view holds the training pairs")
@click.option("--release", "release", type=click.Path(exists=True), default=None,
              help="train directly from a V0-release folder (context.jsonl + train.jsonl + prompt_dict.json)")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="checkpoint file to write")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML with sections backbone / adapter / head / bank / train (top level or under `v0:`) overriding the defaults")
@click.option("--max-minutes", type=float, default=None, help="wall-clock limit of the training loop (minutes)")
@click.option("--max-steps", type=int, default=None, help="optimiser steps (overrides the config)")
@click.option("--seed", type=int, default=None, help="seed of the split, sampling and initialisation")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default from config: 1)")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="embedding cache directory (default: <store>/embeddings, else $V05_CACHE_DIR or ~/.cache/v05)")
@click.option("--cv-folds", type=int, default=0, show_default=True,
              help="also run prompt-disjoint k-fold cross-validation and report mean/std per predictor (0 = off)")
@click.option("--holdout", "holdout", default=None, metavar="FILE",
              help="with --release: a score file of the folder (e.g. train.jsonl) kept out of training and of the "
                   "bank, then predicted from the training rows of its own (model, step) and reported as `holdout` "
                   "(the protocol of an outside evaluation)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def pretrain_v0(store, release, out, config, max_minutes, max_steps, seed, threads, cache_dir, cv_folds, holdout,
                quiet) -> None:
    """Train the V0 value model and export one checkpoint file."""
    import numpy as np
    import torch

    from v0_model import metrics as M
    from v0_model.checkpoint import save_checkpoint
    from v0_data.tasks.v0_release import RELEASE_FILES
    from v0_model.train import (
        build_cache, cross_validate, evaluate, load_configs, load_release_pairs, load_store_pairs, train_v0,
    )

    if (store is None) == (release is None):
        raise click.UsageError("give exactly one of --store DIR or --release DIR")
    if holdout is not None and release is None:
        raise click.UsageError("--holdout needs --release (a store has no held-out file)")
    v0_cfg, cfg = load_configs(config, max_minutes=max_minutes, max_steps=max_steps, seed=seed, threads=threads)
    torch.set_num_threads(cfg.threads)
    if store is not None:
        table = load_store_pairs(store)
        if cache_dir is None:
            cache_dir = str(Path(store) / "embeddings")
    else:
        if holdout is not None and holdout not in RELEASE_FILES:
            raise click.BadParameter(f"{holdout!r} is not one of the release's score files {list(RELEASE_FILES)}",
                                     param_hint="--holdout")
        table = load_release_pairs(release, files=[f for f in RELEASE_FILES if f != holdout])
    held = load_release_pairs(release, files=(holdout,)) if holdout is not None else None
    if held is not None:  # a prompt of the held-out file must not be learned from, in any (model, step)
        table = table.take(~np.isin(table.prompt_id, held.prompt_id))
    out = Path(out)
    report_dir = out.with_name(out.name + ".report")
    report_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**v0_cfg.to_dict(), "train": asdict(cfg), "data": {"store": store, "release": release}}
    (report_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    click.echo(f"pretrain-v0: {len(table)} pairs, {len(table.texts)} prompts, "
               f"{len(set(table.keys()))} (model, step) keys; config -> {report_dir / 'config.json'}")

    cache = build_cache(v0_cfg, table.texts, cache_dir, progress=not quiet)
    result = train_v0(table, v0_cfg, cfg, cache=cache, progress=not quiet)
    metrics = dict(result.metrics)
    if held is not None:
        cache.ensure(held.texts, progress=not quiet)
        report, _ = evaluate(result.model, cache, table, held, cfg, with_baselines=True)
        metrics["holdout"] = {"file": holdout, "n_rows": len(held), "metrics": report}
    if cv_folds and cv_folds > 1:
        cv = cross_validate(table, v0_cfg, replace(cfg, max_minutes=cfg.max_minutes / cv_folds), cv_folds,
                            cache=cache, progress=not quiet)
        metrics["cv"] = cv
    save_checkpoint(out, result.model, backbone_id=cache.backbone.spec.backbone_id,
                    data_fingerprint=table.fingerprint(), metrics=metrics, train_config=asdict(cfg))
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    with open(report_dir / "history.jsonl", "w") as f:
        for row in result.history:
            f.write(json.dumps(row, default=float) + "\n")
    ok = ~np.isnan(result.val_preds["v0"])
    curves = {name: (result.val_table.rate[ok], p[ok]) for name, p in result.val_preds.items() if name != "context_mean"}
    M.calibration_plot(curves, report_dir / "calibration.png")
    _write_markdown(report_dir / "report.md", metrics)
    val = metrics["val"]
    click.echo(f"pretrain-v0: {metrics['steps']} steps in {metrics['minutes']:.1f} min ({metrics['stop_reason']}), "
               f"best step {metrics['best_step']}")
    for name, m in val.items():
        click.echo(f"  {name:13s} gAUC {m['gauc']:.3f}  AUC {m['auc']:.3f}  Brier {m['brier']:.3f}  ECE {m['ece']:.3f}")
    if held is not None:
        click.echo(f"holdout {holdout} ({len(held)} rows):")
        for name, m in metrics["holdout"]["metrics"].items():
            click.echo(f"  {name:13s} gAUC {m['gauc']:.3f}  AUC {m['auc']:.3f}  Brier {m['brier']:.3f}  ECE {m['ece']:.3f}")
    click.echo(f"checkpoint -> {out}; report -> {report_dir}")


def _write_markdown(path: Path, metrics: dict) -> None:
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
    path.write_text("\n".join(lines))


def _raw_rows(path: Path) -> list[dict]:
    """The JSON objects of a jsonl file, in order, blank lines skipped (validated separately)."""
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out


@click.command("predict-v0")
@click.option("--checkpoint", "checkpoint", type=click.Path(exists=True, dir_okay=False), required=True,
              help="V0 checkpoint written by `v05 pretrain-v0`")
@click.option("--context", "context", type=click.Path(exists=True, dir_okay=False), required=True,
              help="context rows (V0-release jsonl with scores), grouped by (model, step)")
@click.option("--queries", "queries", type=click.Path(exists=True, dir_okay=False), required=True,
              help="query rows (V0-release jsonl; score optional)")
@click.option("--prompts", "prompts", type=click.Path(exists=True, dir_okay=False), required=True,
              help='prompt dict JSON {"<dataset>_<id>": text}')
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True,
              help="output jsonl: the query rows with `pred` added, in input order")
@click.option("--max-context", type=int, default=None,
              help="context rows used per (model, step), a seeded sample when more (default: all)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the context sample")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="embedding cache directory (default: $V05_CACHE_DIR or ~/.cache/v05)")
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads")
@click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
              help="keep adapter features on disk per checkpoint, so repeated calls only run the head")
@click.option("--quiet", is_flag=True, help="no progress bars or timing line")
def predict_v0(checkpoint, context, queries, prompts, out, max_context, seed, cache_dir, threads, feature_cache,
               quiet) -> None:
    """Predict success probabilities of query prompts from each policy's context rows."""
    import numpy as np
    import torch

    from v0_data.tasks.base import make_prompt_id
    from v0_data.tasks.v0_release import read_prompt_dict, read_rows
    from v0_model.checkpoint import load_predictor

    torch.set_num_threads(threads)
    prompt_dict = read_prompt_dict(prompts)
    ctx_rows = read_rows(context, require_score=True, default_type="context")
    q_rows = read_rows(queries, require_score=False, default_type="query")
    raw = _raw_rows(Path(queries))
    if len(raw) != len(q_rows):  # pragma: no cover - both skip blank lines the same way
        raise click.ClickException(f"{queries}: could not align rows")

    def pid(r) -> int:
        text = prompt_dict.get(r.key)
        if text is None:
            raise click.ClickException(
                f"{r.file}: line {r.line}: prompt key {r.key!r} (dataset + '_' + id) is not in {prompts}; "
                "add its text to the prompt dict"
            )
        return make_prompt_id(r.dataset, text)

    groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in ctx_rows:
        groups.setdefault((r.model, r.step), []).append((pid(r), (r.score + 1.0) / 2.0))
    q_ids = [pid(r) for r in q_rows]
    for r in q_rows:
        if (r.model, r.step) not in groups:
            raise click.ClickException(
                f"{r.file}: line {r.line}: no context row for model {r.model!r} step {r.step} in {context}; "
                "every query needs context rows of its own (model, step)"
            )
    predictor = load_predictor(checkpoint, cache_dir=cache_dir, feature_cache=feature_cache)
    texts = {}
    for r in list(ctx_rows) + list(q_rows):
        texts[make_prompt_id(r.dataset, prompt_dict[r.key])] = prompt_dict[r.key]
    predictor.ensure_texts(texts, progress=not quiet)

    t0 = time.perf_counter()
    preds = np.full(len(q_rows), np.nan)
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
    elapsed = time.perf_counter() - t0

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for obj, p in zip(raw, preds):
            f.write(json.dumps({**obj, "pred": float(p)}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    if not quiet:
        click.echo(f"predict-v0: {len(q_rows)} queries in {len(by_key)} (model, step) groups, "
                   f"{elapsed:.3f} s ({len(q_rows) / max(elapsed, 1e-9):.0f} queries/s, embeddings cached) -> {out}")
