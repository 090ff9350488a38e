"""`v05 data embed`: precompute, once per dataset, what the frozen V0 needs for each prompt.

The V0 prior must not run the backbone inside an RL step: at the paper's scale (Qwen3-Embedding-0.6B,
2,048 new prompts per step until DAPO-17k is seen) that is over an hour per step on CPU. This recipe runs
it once, batched, on a GPU when there is one (`--device auto`), into a folder beside the store
(`<store>/features/` by default, `--out DIR` otherwise; layout and resume rules: `v0_model.features`):

- with `--checkpoint V0.pt`: each prompt's feature row of that checkpoint (adapter output, pooled
  embedding, difficulty-bank column) as float32, keyed by prompt id under the checkpoint's digest — the V0
  prior then only runs its head (`PriorOptions.v0_features_dir`, `load_predictor(features_dir=...)`);
- without: the backbone's output as the adapter consumes it (token states + pooled embedding, float16),
  for a V0 that is not trained yet; `v05 pretrain-v0 --cache-dir DIR` and `load_predictor` read them.

Inputs: verl RL parquet files (`--parquet`, repeatable; prompt ids as `read_verl_parquet` gives them, the
ids the verl trainer uses) and/or the prompts of a trajectory store (`--store`, optionally one split or
dataset). A killed run continues where it stopped when rerun with the same options.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import click

from pipelines.cli.options import RECIPE_ERRORS, fail
from pipelines.common import write_json


@dataclass(frozen=True)
class EmbedConfig:
    """Inputs, output and batching of `v05 data embed`."""

    parquet: tuple[str, ...] = field(default=(), metadata={"help": "verl RL parquet files / folders / globs"})
    store: str | None = field(default=None, metadata={"help": "trajectory store whose prompts are embedded"})
    split: str | None = field(default=None, metadata={"help": "only prompts of this split (store and parquet)"})
    dataset: str | None = field(default=None, metadata={"help": "only store prompts of this dataset"})
    out: str | None = field(default=None, metadata={"help": "output root; default <store>/features"})
    checkpoint: str | None = field(default=None, metadata={"help": "V0 checkpoint: store its feature rows"})
    backbone: str = field(default="all-MiniLM-L6-v2",
                          metadata={"help": "backbone without --checkpoint (with one: the checkpoint's)"})
    max_length: int = field(default=256, metadata={"help": "token limit per prompt without --checkpoint"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (cuda when present)"})
    batch_size: int = field(default=32, metadata={"help": "prompts per backbone forward pass"})
    shard_size: int = field(default=2048, metadata={"help": "prompts per shard (the unit of resume)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "parquet", tuple(str(p) for p in self.parquet))
        if not self.parquet and self.store is None:
            raise ValueError("embed: give --parquet FILE (repeatable) and/or --store DIR as the prompts to embed")
        if self.out is None and self.store is None:
            raise ValueError("embed: with --parquet only, give --out DIR (the default is <store>/features)")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(f"embed: batch_size={self.batch_size} and shard_size={self.shard_size} must be >= 1")
        if self.dataset is not None and self.store is None:
            raise ValueError("embed: --dataset filters store prompts; give --store DIR (parquet files are taken whole)")

    @property
    def out_root(self) -> Path:
        return Path(self.out) if self.out is not None else Path(self.store) / "features"


@dataclass(frozen=True)
class EmbedSummary:
    """What a run did; written to `<folder>/embed_summary.json` and printed by the command."""

    folder: str
    kind: str
    device: str
    prompts: int
    skipped: int
    computed: int
    shards: int
    seconds: float
    bytes_per_prompt: float


def load_texts(cfg: EmbedConfig) -> dict[int, str]:
    """prompt id -> text of every input prompt (parquet files first, then the store; ids deduplicated)."""
    from v0_data.tasks.parquet import read_verl_parquet

    texts: dict[int, str] = {}
    for path in cfg.parquet:
        for p in read_verl_parquet(path, split=None):
            if cfg.split is None or p.split == cfg.split:
                texts.setdefault(int(p.prompt_id), p.text)
    if cfg.store is not None:
        from v0_data.store import TrajectoryStore

        store = TrajectoryStore.open(cfg.store, read_only=True)
        try:
            where, params = [], []
            for column, value in (("split", cfg.split), ("dataset", cfg.dataset)):
                if value is not None:
                    params.append(value)
                    where.append(f"{column} = ${len(params)}")
            sql = "SELECT prompt_id, text FROM prompts" + (" WHERE " + " AND ".join(where) if where else "")
            table = store.query(sql, params=params or None)
        finally:
            store.close()
        for pid, text in zip(table.column("prompt_id").to_pylist(), table.column("text").to_pylist()):
            texts.setdefault(int(pid), text)
    if not texts:
        raise ValueError(f"embed: no prompts in the inputs (parquet {list(cfg.parquet)}, store {cfg.store}, "
                         f"split {cfg.split}, dataset {cfg.dataset}); check the filters")
    return texts


def embed(cfg: EmbedConfig, *, progress: bool = True, on_shard: Callable[[Path], None] | None = None) -> EmbedSummary:
    """Fill the feature (or token-state) folder for every input prompt; see the module docstring."""
    from v0_model.backbone import BackboneConfig, EmbeddingCache, FrozenBackbone, resolve_backbone
    from v0_model.checkpoint import checkpoint_digest, load_checkpoint
    from v0_model.features import (FolderIdentity, ShardFolder, precompute, resolve_device, token_state_shard_fn,
                                   v0_feature_shard_fn, v0_features_folder)

    device = resolve_device(cfg.device)
    texts = load_texts(cfg)
    root = cfg.out_root
    if cfg.checkpoint is not None:
        loaded = load_checkpoint(cfg.checkpoint)
        spec = resolve_backbone(loaded.config.backbone)
        if spec.backbone_id != loaded.meta["backbone_id"]:
            raise ValueError(f"{cfg.checkpoint}: trained on backbone {loaded.meta['backbone_id']!r}, which now "
                             f"resolves to {spec.backbone_id!r}; make the original backbone available at its path")
        model = loaded.model.to(device).eval()
        cache = EmbeddingCache(FrozenBackbone(spec, device=str(device)), root)
        digest = checkpoint_digest(cfg.checkpoint)
        identity = FolderIdentity("v0-features", model.out_features, spec.backbone_id, digest)
        folder = ShardFolder(v0_features_folder(root, digest), identity)
        compute = v0_feature_shard_fn(cache, model, cfg.batch_size)
    else:
        spec = resolve_backbone(BackboneConfig(name=cfg.backbone, max_length=cfg.max_length))
        backbone = FrozenBackbone(spec, device=str(device))
        cache = EmbeddingCache(backbone, root)
        folder = ShardFolder(cache.dir, FolderIdentity("token-states", backbone.hidden_size, spec.backbone_id))
        compute = token_state_shard_fn(cache, cfg.batch_size)
    done = precompute(texts, folder, compute, shard_size=cfg.shard_size, progress=progress, on_shard=on_shard)
    summary = EmbedSummary(str(folder.path), folder.identity.kind, str(device), done.requested, done.skipped,
                           done.computed, done.shards, round(done.seconds, 3), round(folder.bytes_per_prompt(), 1))
    record = {**asdict(summary), "config": asdict(cfg), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(folder.path / "embed_summary.json", record, indent=1)
    return summary


@click.command("embed")
@click.option("--parquet", multiple=True, help="verl RL parquet file, folder or glob (repeatable).")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="Trajectory store: embed its prompts.")
@click.option("--split", default=None, help="Only prompts of this split.")
@click.option("--dataset", default=None, help="Only store prompts of this dataset.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output root (default: <store>/features).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="V0 checkpoint: store its per-prompt feature rows (else the backbone's token states).")
@click.option("--backbone", default=EmbedConfig.backbone, show_default=True,
              help="Backbone without --checkpoint: registered name, local folder or Hub id.")
@click.option("--max-length", type=int, default=EmbedConfig.max_length, show_default=True,
              help="Token limit per prompt without --checkpoint (with one: the checkpoint's).")
@click.option("--device", default=EmbedConfig.device, show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-size", type=int, default=EmbedConfig.batch_size, show_default=True, help="Prompts per forward pass.")
@click.option("--shard-size", type=int, default=EmbedConfig.shard_size, show_default=True,
              help="Prompts per shard file (the unit a killed run redoes).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def embed_command(parquet, store, split, dataset, out, checkpoint, backbone, max_length, device, batch_size,
                  shard_size, threads, progress) -> None:
    """Precompute V0's per-prompt inputs for a dataset once (resumable; GPU when present)."""
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        cfg = EmbedConfig(parquet=parquet, store=store, split=split, dataset=dataset, out=out, checkpoint=checkpoint,
                          backbone=backbone, max_length=max_length, device=device, batch_size=batch_size,
                          shard_size=shard_size)
        s = embed(cfg, progress=progress)
    except RECIPE_ERRORS as err:
        raise fail(err) from None
    click.echo(f"{s.kind}: {s.prompts} prompts ({s.skipped} already stored, {s.computed} computed on {s.device} "
               f"in {s.seconds:.1f} s, {s.shards} new shards), {s.bytes_per_prompt:.0f} bytes per prompt -> {s.folder}")


__all__ = ["EmbedConfig", "EmbedSummary", "embed", "embed_command", "load_texts"]
