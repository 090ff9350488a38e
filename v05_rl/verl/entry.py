"""Entry point of `v05 rl-train --engine verl`: compose a run config on verl's defaults and launch it.

`build_config(path, overrides)` composes a YAML of `pipelines/configs/` with Hydra. Each such file says

    hydra: {searchpath: [pkg://verl.trainer.config]}
    defaults: [ppo_trainer, _self_]

so verl's own `ppo_trainer` defaults come first and the file's values override them; command-line
overrides use Hydra's syntax (`data.train_batch_size=64`, `+new.key=1`).

`launch(path, overrides)` validates the config with verl's `validate_config` (and, for V0.5, that the
V0 / TabPFN checkpoints load: a missing file fails here, not on the task-runner node at the first prior
query) and starts the run through verl's `run_ppo` (Ray init, one remote task runner):
- `algorithm.adv_estimator=v05`: `V05TaskRunner`, which imports `v05_rl.verl.estimator` (registering
  the estimator in the task-runner process, where verl computes advantages) and trains `RayV05Trainer`.
  The task runner hosts the prior, so its Ray resources follow `v05` (`task_runner_resources`):
  `num_cpus = v05.prior_threads` (torch uses that many threads there) and `num_gpus = 1` when
  `v05.prior_device` is cuda (or `v05.prior_num_gpus`). verl's worker placement reserves whole GPUs
  (nnodes × n_gpus_per_node bundles of GPU 1), so a GPU prior needs one Ray GPU beyond those;
- otherwise with `trainer.use_v1=false`: the same task runner with verl's stock `RayPPOTrainer` (GRPO);
- `trainer.use_v1=true`: verl's own `TaskRunnerV1` (the DAPO baseline uses its group filtering).
The project must be installed on every Ray node (`pip install 'v05[verl]'`): the workers import it.

This module imports verl, Hydra and Ray only inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def build_config(config_path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Compose `config_path` (a Hydra YAML with verl's `ppo_trainer` in its defaults) with `overrides`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import verl.trainer.config  # noqa: F401  - makes pkg://verl.trainer.config resolvable

    path = Path(config_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"verl config {config_path}: no such file; use one of pipelines/configs/paper.yaml, grpo.yaml, dapo.yaml"
        )
    if path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"verl config {config_path}: expected a .yaml file (Hydra), got {path.suffix!r}")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(path.parent), version_base=None, job_name="v05_verl"):
        return compose(config_name=path.stem, overrides=list(overrides))


def validate(config: Any, *, check_files: bool = True) -> None:
    """verl's own checks, plus V0.5's when `algorithm.adv_estimator=v05`.

    check_files: also load the V0 checkpoint (and resolve its backbone / TabPFN checkpoint), so that a
    missing file fails before Ray starts (`check_v05_files`)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    if config.algorithm.adv_estimator == "v05":
        from v05_rl.verl.trainer import check_v05_config, check_v05_files

        settings = check_v05_config(config)
        if check_files:
            check_v05_files(settings)


def check_run_folder(config: Any) -> None:
    """A fresh run (`trainer.resume_mode=disable`) refuses a non-empty `trainer.default_local_dir`: verl
    would write its checkpoints among an earlier run's, and a later `--resume` would pick the newest of
    either. `resume_mode=auto` (`v05 rl-train --resume`) continues from the newest `global_step_N` there."""
    trainer = config.trainer
    if trainer.get("resume_mode", "auto") != "disable" or trainer.get("default_local_dir") is None:
        return
    folder = Path(str(trainer.default_local_dir)).expanduser()
    if folder.is_dir() and any(folder.iterdir()):
        held = sorted(p.name for p in folder.iterdir())
        raise FileExistsError(
            f"run folder {folder} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): pass --resume "
            "to continue that run from its newest checkpoint, or choose a new --out"
        )


def task_runner_resources(config: Any) -> dict[str, float]:
    """Ray resources of the task runner: V0.5's prior runs there (`V05Settings.task_runner_resources`);
    verl's default (1 CPU) for the stock trainer."""
    if config.algorithm.adv_estimator == "v05":
        from v05_rl.verl.trainer import V05Settings

        return V05Settings.from_section(config.get("v05")).task_runner_resources()
    return {"num_cpus": 1, "num_gpus": 0.0}


def launch(config_path: str | Path, overrides: Sequence[str] = (), *, dry_run: bool = False) -> Any:
    """Compose, validate and run a verl training job; returns the resolved config.

    dry_run: compose and validate only (no Ray, no GPU) - prints the resolved config as YAML.
    """
    from omegaconf import OmegaConf

    import v05_rl.verl.estimator  # noqa: F401  - registers `v05` in the launcher process too

    config = build_config(config_path, overrides)
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate(config)
    check_run_folder(config)
    if dry_run:
        print(OmegaConf.to_yaml(config, resolve=True))
        return config

    import ray

    from verl.trainer.main_ppo import run_ppo

    if config.trainer.get("use_v1", False):
        from verl.trainer.main_ppo import TaskRunnerV1

        run_ppo(config, task_runner_class=TaskRunnerV1)
    else:
        run_ppo(config, task_runner_class=ray.remote(**task_runner_resources(config))(_task_runner_class()))
    return config


def _task_runner_class() -> type:
    """`V05TaskRunner`, defined lazily so that importing this module does not import verl.

    Kept in one piece: `run` follows verl's own `TaskRunner.run` (verl/trainer/main_ppo.py) step by step,
    and reading the two side by side is how one checks it against a new verl release."""
    from verl.trainer.main_ppo_v0 import BaseTaskRunner

    class V05TaskRunner(BaseTaskRunner):
        """verl's legacy task runner, training `RayV05Trainer` (or `RayPPOTrainer` for baselines)."""

        def run(self, config: Any) -> None:
            import os
            import socket
            from pprint import pprint

            from omegaconf import OmegaConf

            import v05_rl.verl.estimator  # noqa: F401  - register `v05` in this Ray process
            from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler
            from verl.utils.config import omega_conf_to_dataclass
            from verl.utils.dataset.rl_dataset import collate_fn
            from verl.workers.config import HFModelConfig

            print(f"V05TaskRunner on {socket.gethostname()}, pid {os.getpid()}")
            if config.algorithm.adv_estimator == "v05":  # the prior's threads = the CPUs Ray gave this actor
                import torch

                torch.set_num_threads(int(task_runner_resources(config)["num_cpus"]))
            pprint(OmegaConf.to_container(config, resolve=True))
            OmegaConf.resolve(config)
            actor_rollout_cls, _ = self.add_actor_rollout_worker(config)
            self.add_critic_worker(config)
            self.add_reward_model_resource_pool(config)
            self.add_teacher_model_resource_pool(config)
            self.add_ref_policy_worker(config, actor_rollout_cls)
            validate(config, check_files=False)  # the launcher checked the files; the trainer loads them

            model_config: HFModelConfig = omega_conf_to_dataclass(config.actor_rollout_ref.model)
            tokenizer, processor = model_config.tokenizer, model_config.processor
            pool = self.init_resource_pool_mgr(config)
            train = create_rl_dataset(
                config.data.train_files, config.data, tokenizer, processor, is_train=True,
                max_samples=config.data.get("train_max_samples", -1),
            )
            val = create_rl_dataset(
                config.data.val_files, config.data, tokenizer, processor, is_train=False,
                max_samples=config.data.get("val_max_samples", -1),
            )
            if config.algorithm.adv_estimator == "v05":
                from v05_rl.verl.trainer import RayV05Trainer as trainer_cls
            else:
                from verl.trainer.ppo.ray_trainer import RayPPOTrainer as trainer_cls
            from verl.single_controller.ray import RayWorkerGroup

            trainer = trainer_cls(
                config=config,
                tokenizer=tokenizer,
                processor=processor,
                role_worker_mapping=self.role_worker_mapping,
                resource_pool_manager=pool,
                ray_worker_group_cls=RayWorkerGroup,
                train_dataset=train,
                val_dataset=val,
                collate_fn=collate_fn,
                train_sampler=create_rl_sampler(config.data, train),
            )
            trainer.init_workers()
            trainer.fit()

    return V05TaskRunner


__all__ = ["build_config", "check_run_folder", "launch", "task_runner_resources", "validate"]
