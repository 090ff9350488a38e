"""`v05 pretrain-v0` and `v05 predict-v0`: options of the recipes in `pipelines.pretrain_v0`."""

from __future__ import annotations

import click

from pipelines.cli.options import COUNT, POSITIVE, RECIPE_ERRORS, fail


@click.command("pretrain-v0")
@click.option("--store", "store", type=click.Path(file_okay=False), default=None,
              help="trajectory store directory whose v0_pairs view holds the training pairs")
@click.option("--release", "release", type=click.Path(exists=True), default=None,
              help="train directly from a V0-release folder (context.jsonl + train.jsonl + prompt_dict.json)")
@click.option("--out", "out", type=click.Path(dir_okay=False), required=True, help="checkpoint file to write")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML with sections backbone / adapter / head / bank / train (top level or under `v0:`) overriding the defaults")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None, help="wall-clock limit of the training loop (minutes)")
@click.option("--max-steps", type=POSITIVE, default=None, help="optimiser steps (overrides the config)")
@click.option("--seed", type=COUNT, default=None, help="seed of the split, sampling and initialisation")
@click.option("--threads", type=POSITIVE, default=None, help="torch CPU threads (default from config: 1)")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="embedding cache directory (default: <store>/embeddings, else $V05_CACHE_DIR or ~/.cache/v05)")
@click.option("--cv-folds", type=COUNT, default=0, show_default=True,
              help="also run prompt-disjoint k-fold cross-validation and report mean/std per predictor (0 = off)")
@click.option("--holdout", "holdout", default=None, metavar="FILE",
              help="with --release: a score file of the folder (e.g. train.jsonl) kept out of training and of the "
                   "bank, then predicted from the training rows of its own (model, step) and reported as `holdout` "
                   "(the protocol of an outside evaluation)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def pretrain_v0(store, release, out, config, max_minutes, max_steps, seed, threads, cache_dir, cv_folds, holdout,
                quiet) -> None:
    """Train the V0 value model and export one checkpoint file."""
    from pipelines.pretrain_v0 import pretrain_v0 as recipe

    if (store is None) == (release is None):
        raise click.UsageError("give exactly one of --store DIR or --release DIR")
    if holdout is not None and release is None:
        raise click.UsageError("--holdout needs --release (a store has no held-out file)")
    try:
        recipe(out, store=store, release=release, config=config, max_minutes=max_minutes, max_steps=max_steps,
               seed=seed, threads=threads, cache_dir=cache_dir, cv_folds=cv_folds, holdout=holdout, progress=not quiet)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None


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
@click.option("--max-context", type=POSITIVE, default=None,
              help="context rows used per (model, step), a seeded sample when more (default: all)")
@click.option("--seed", type=COUNT, default=0, show_default=True, help="seed of the context sample")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="embedding cache directory (default: $V05_CACHE_DIR or ~/.cache/v05)")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="torch CPU threads")
@click.option("--feature-cache/--no-feature-cache", default=True, show_default=True,
              help="keep adapter features on disk per checkpoint, so repeated calls only run the head")
@click.option("--quiet", is_flag=True, help="no progress bars or timing line")
def predict_v0(checkpoint, context, queries, prompts, out, max_context, seed, cache_dir, threads, feature_cache,
               quiet) -> None:
    """Predict success probabilities of query prompts from each policy's context rows."""
    from pipelines.pretrain_v0 import predict_v0 as recipe

    try:
        recipe(checkpoint, context, queries, prompts, out, max_context=max_context, seed=seed, cache_dir=cache_dir,
               threads=threads, feature_cache=feature_cache, quiet=quiet)
    except RECIPE_ERRORS as exc:
        raise fail(exc) from None
