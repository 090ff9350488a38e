"""Assembling an embedded run from its config: policy, reference, backend, tasks, prior, evaluation, store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from v0_data.rewards import score_one
from v0_data.tasks import get_source
from v0_data.tasks.base import Prompt
from v05_rl.engine.config import TrainConfig
from v05_rl.engine.sampler import derive_seed
from v05_rl.engine.run_folder import RunFolderError, RunLock, write_atomic
from v05_rl.engine.trainer import Trainer
from v05_rl.evaluate import evaluate_policy
from v05_rl.policies import load_policy
from v05_rl.rollout import SamplingConfig, get_backend
from v05_rl.types import StepStats


def load_task_prompts(source: str, path: str | None, split: str) -> list[Prompt]:
    """Prompts of `split` from task source `source` (v0_data.tasks registry)."""
    prompts = get_source(source)().load(path, split=split)
    if not prompts:
        raise ValueError(f"task source {source!r} (path {path!r}) has no prompts in split {split!r}")
    return prompts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_evaluate_fn(cfg: TrainConfig, tokenizer: Any, backend: Any = None) -> Callable[[torch.nn.Module, Sequence[Prompt]], dict]:
    """mean@k on held-out prompts with `v05_rl.evaluate.evaluate_policy` (paper: T = 1.0, top-p 0.7, k = 16).

    Seeded with the run seed, so every evaluation of a run sees the same sampling noise stream.
    """
    ev = cfg.evaluation
    sampling = SamplingConfig(temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=cfg.sampling.max_new_tokens)

    def evaluate_fn(model: torch.nn.Module, prompts: Sequence[Prompt]) -> dict[str, Any]:
        datasets = {p.dataset for p in prompts}
        dataset = max(datasets, key=lambda d: sum(p.dataset == d for p in prompts))

        def reward(response: str, answer: Any) -> int:
            return score_one(dataset, response, answer).reward

        res = evaluate_policy(model, tokenizer, prompts, reward, ev.k, sampling, backend=backend,
                              seed=derive_seed(cfg.seed, 0xE7A1))
        res.pop("per_prompt", None)
        res["per_level"] = {str(k): v for k, v in res.get("per_level", {}).items()}
        return res

    return evaluate_fn


def build_trainer(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    backend_name: str = "hf",
    store: Any = None,
    progress: bool = True,
) -> tuple[Trainer, Any]:
    """Assemble a trainer from the config. Returns (trainer, tokenizer)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_policy(cfg.policy, device)
    ref_model = None
    if cfg.resolved_kl_coef > 0:
        ref_model, _ = load_policy(cfg.policy, device)
    backend = get_backend(backend_name, model, tokenizer)
    train_prompts = load_task_prompts(cfg.tasks, cfg.tasks_path, cfg.train_split)
    if cfg.train_prompts is not None:
        if len(train_prompts) < cfg.train_prompts:
            raise ValueError(f"train_prompts={cfg.train_prompts} but split {cfg.train_split!r} of {cfg.tasks!r} "
                             f"holds {len(train_prompts)}; lower train_prompts or raise the task source's size")
        train_prompts = train_prompts[: cfg.train_prompts]
    eval_prompts: list[Prompt] = []
    evaluate_fn = None
    if cfg.evaluation.prompts > 0:
        eval_prompts = load_task_prompts(cfg.tasks, cfg.tasks_path, cfg.eval_split)[: cfg.evaluation.prompts]
        evaluate_fn = make_evaluate_fn(cfg, tokenizer, backend)

    owns_store = False
    if store is None and cfg.store:
        from v0_data.store import TrajectoryStore

        store = TrajectoryStore.open(cfg.store)
        owns_store = True
    trainer = Trainer(cfg, model=model, backend=backend, train_prompts=train_prompts, out_dir=out_dir,
                      ref_model=ref_model, eval_prompts=eval_prompts, evaluate_fn=evaluate_fn, store=store,
                      progress=progress)
    trainer.owns_store = owns_store
    return trainer, tokenizer


def run_training(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, backend_name: str = "hf",
                 progress: bool = True, on_step: Callable[[StepStats], None] | None = None,
                 files: Mapping[str, str] | None = None) -> Trainer:
    """Build, optionally resume, train, and write `config.json`, `files` ({name: text}, e.g. the recipe's
    `config.yaml`) and the final policy under `out_dir`.

    Run-folder guarantees: the folder is locked for the whole run (`RunLock`: a second process is refused);
    nothing in it is written before the checks pass (no `--resume` over another run's files, a resumed
    checkpoint verified and its config matched), so a refused start leaves the folder as it was.
    """
    out = Path(out_dir)
    with RunLock(out):
        if not resume and (out / "checkpoints" / "latest").exists():
            raise RunFolderError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        trainer, tokenizer = build_trainer(cfg, out, backend_name=backend_name, progress=progress)
        try:
            resumed = trainer.load_checkpoint() if resume else False
            for name, text in {"config.json": json.dumps(cfg.resolved(), indent=2, default=str), **(files or {})}.items():
                write_atomic(out / name, text)
            if not resumed and (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()  # a fresh start: no log lines of an earlier attempt
            trainer.train(on_step=on_step)
            trainer.save_policy(out / "policy", tokenizer)
        finally:
            if trainer.owns_store:
                trainer.store.close()
    return trainer


__all__ = ["build_trainer", "load_task_prompts", "make_evaluate_fn", "resolve_device", "run_training"]
