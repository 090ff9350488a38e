"""The embedded single-machine RL engine: config -> collect -> advantage -> update, one loop for every algorithm.

    config.py     TrainConfig (nests OslaConfig, PriorOptions, OptimConfig, SamplingConfig, EvalConfig)
    sampler.py    seeds and the prompt order
    collect.py    draw prompts, query the prior, generate and score (fixed k, OSLA, DAPO refills)
    advantage.py  advantages from the estimator registry
    update.py     PPO-clip update (Eq. 10)
    trainer.py    the loop: steps, evaluation, checkpoints, store, metrics.jsonl
    run_folder.py one writer per run folder (lock), checksummed checkpoints, the non-finite stop
    build.py      assembling a run from its config; run_training
"""

from v05_rl.engine.build import build_trainer, load_task_prompts, make_evaluate_fn, resolve_device, run_training
from v05_rl.engine.config import ALGORITHMS, TrainConfig
from v05_rl.engine.trainer import Trainer

__all__ = [
    "ALGORITHMS",
    "TrainConfig",
    "Trainer",
    "build_trainer",
    "load_task_prompts",
    "make_evaluate_fn",
    "resolve_device",
    "run_training",
]
