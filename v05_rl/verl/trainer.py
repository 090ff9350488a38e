"""`RayV05Trainer`: verl's PPO trainer with V0.5's prior, sequential OSLA rollouts and fused baseline.

Pattern: the DAPO recipe's `RayDAPOTrainer.fit()` override (verl-recipe `dapo/dapo_ray_trainer.py`):
keep verl's workers, checkpointing, validation and update, and replace what happens between reading a
batch and computing advantages. Per batch of B prompts (paper §4.1.3):
    1. the frozen V0 prior V for all B prompts, one `PriorSource.priors` call (support buffer context),
       run in a thread while round 0 generates (the cold start gives every prompt k_init rollouts
       whatever the prior says; the planner needs V only from round 1 on);
    2. k_init rollouts per prompt, then OSLA rounds (`v05_rl.verl.osla.generate_osla`, which calls
       `v05_rl.osla_loop.run_osla`) until the planner halts; the rollout replicas sleep only after
       the last round;
    3. `batch["reward_baselines"]` = V of each row's prompt; pad the batch for an even update split;
       old log-probs (and reference log-probs if a KL loss is on), advantages through verl's own
       `compute_advantage` with `adv_estimator=v05` (`v05_rl.verl.estimator`), then the actor update
       with each row's advantage scaled so that verl's token-mean is Eq. 10's per-prompt 1/k mean
       (`v05_rl.verl.loss_weights`; `v05.loss_agg=token-mean` turns this off);
    4. the prompts' measured success rates go into the prior's support buffer (`observe`), before the
       step's checkpoint is written, so `global_step_N/v05_prior.json` includes step N.
Logged under `v05/`: mean/min/max k, extra rollouts, rejection rate (Δ̂² > 0), mean ŵ, rounds,
per-round prompts/rollouts, loss-weight range, `timing_s/v05_round_<r>`, `timing_s/v05_prior` (the
prior's own time, in its thread) and `timing_s/v05_prior_wait` (how long round 1 waited for it).

Departures from verl's `RayPPOTrainer.fit` and why:
- The update keeps the configured number of mini-batches (train_batch_size / ppo_mini_batch_size) and
  lets each mini-batch grow with the OSLA extra rollouts (`osla.update_layout`): the batch size in
  rollouts changes every step, and verl needs whole mini-batches on every data-parallel rank.
- Not supported, refused at construction with a message: a critic (GAE), KL *in the reward* (it would
  need log-probs before the rounds end), `loss_agg_mode` other than token-mean (masked padding rows
  must not change the loss normalization), REMAX, the v1 trainer (`trainer.use_v1` must be false).
- Left out of this loop (present in verl's): profiling hooks, rollout skipping (`SkipManager`), forced
  saves before an elastic instance expires, critic warm-up, REMAX baselines, multi-modal inputs.
- The prior state (support buffer, and the prompts it refers to) is saved next to verl's checkpoint as
  `v05_prior.json` and restored on resume.
- The prior runs in the task-runner process (the Ray actor that drives training; `v05_rl.verl.entry`
  declares its resources: `v05.prior_threads` CPUs, and a GPU when `v05.prior_device` is cuda).
verl pinned: 0.9.1 (its legacy `RayPPOTrainer`, selected by `trainer.use_v1=false`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pprint import pprint
from typing import Any, Mapping

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from tqdm import tqdm

from v0_data.tasks.base import Prompt
from v05_rl.allocation import OslaConfig
from v05_rl.priors import PriorOptions, PriorRuntime, PriorSource, check_priors, make_prior_source
from v05_rl.verl.estimator import ESTIMATOR_NAME, EstimatorOptions, uid_groups
from v05_rl.verl.loss_weights import LOSS_AGGS, prompt_mean_weights, verl_minibatch_of_rows
from v05_rl.verl.osla import (
    PromptIndex,
    generate_osla,
    is_padding,
    osla_metrics,
    pad_for_update,
    prompts_from_rows,
    update_layout,
)
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.metric_utils import compute_data_metrics, compute_throughout_metrics, compute_timing_metrics
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage, compute_response_mask
from verl.trainer.ppo.reward import extract_reward
from verl.utils.debug import marked_timer
from verl.utils.metric import reduce_metrics

PRIOR_FILE = "v05_prior.json"
VERL_PRIORS = ("v0", "none")


@dataclass(frozen=True)
class V05Settings:
    """The `v05:` section of a verl run's config, split into the project's own config objects."""

    osla: OslaConfig = field(default_factory=OslaConfig, metadata={"help": "OSLA planner (k_init, step, c, ...)"})
    estimator: EstimatorOptions = field(default_factory=EstimatorOptions, metadata={"help": "fusion/advantage"})
    prior: str = field(
        default="none", metadata={"help": "prior source: v0 (the frozen V0 model; paper.yaml) or none (no prior)"}
    )
    prior_options: PriorOptions = field(default_factory=PriorOptions, metadata={"help": "support buffer, checkpoint"})
    prior_device: str = field(
        default="cpu", metadata={"help": "torch device of the V0 model in the task runner: cpu, cuda or cuda:N"}
    )
    prior_threads: int = field(
        default=8, metadata={"help": "CPUs the task runner asks Ray for; torch threads of the prior there"}
    )
    prior_num_gpus: float | None = field(
        default=None, metadata={"help": "GPUs the task runner asks Ray for; null = 1 when prior_device is cuda, else 0"}
    )
    loss_agg: str = field(
        default="prompt-mean",
        metadata={"help": "prompt-mean: Eq. 10's 1/k per prompt under verl's token-mean (loss_weights.py); "
                          "token-mean: verl's own (a k = 16 prompt weighs ~4x a k = 4 one)"},
    )
    max_rounds: int | None = field(default=None, metadata={"help": "optional bound on dispatches per batch"})

    def __post_init__(self) -> None:
        if self.prior not in VERL_PRIORS:
            raise ValueError(
                f"v05.prior: {self.prior!r} is not available on verl (valid: {', '.join(VERL_PRIORS)}); "
                "'oracle-noise' needs extra rollouts outside the budget and exists only in the embedded trainer"
            )
        if self.prior == "v0" and not self.prior_options.v0_checkpoint:
            raise ValueError(
                "v05.v0_checkpoint: prior 'v0' needs the V0 checkpoint written by `v05 pretrain-v0`; "
                "pass v05.v0_checkpoint=/path/to/checkpoint, or v05.prior=none to run without a prior"
            )
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"v05.max_rounds: expected null or an int >= 1, got {self.max_rounds!r}")
        device = str(self.prior_device)
        if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"v05.prior_device: expected cpu, cuda or cuda:N, got {device!r}")
        if not (isinstance(self.prior_threads, int) and self.prior_threads >= 1):
            raise ValueError(f"v05.prior_threads: expected an int >= 1 (CPUs of the task runner), got {self.prior_threads!r}")
        if self.prior_num_gpus is not None and not 0 <= float(self.prior_num_gpus):
            raise ValueError(f"v05.prior_num_gpus: expected null or a number >= 0, got {self.prior_num_gpus!r}")
        if device.startswith("cuda") and self.prior_num_gpus is not None and float(self.prior_num_gpus) <= 0:
            raise ValueError("v05.prior_num_gpus=0 with v05.prior_device=cuda: Ray would give the task runner no GPU; "
                             "set prior_num_gpus to null (1 GPU) or prior_device=cpu")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"v05.loss_agg: expected one of {', '.join(LOSS_AGGS)}, got {self.loss_agg!r}")

    def task_runner_resources(self) -> dict[str, float]:
        """Ray resources of the task runner that hosts the prior: CPUs = prior_threads, GPUs as configured."""
        gpus = self.prior_num_gpus
        if gpus is None:
            gpus = 1 if str(self.prior_device).startswith("cuda") else 0
        return {"num_cpus": int(self.prior_threads), "num_gpus": float(gpus)}

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | None) -> "V05Settings":
        """Build from the flat `v05:` mapping; unknown keys are an error that lists the valid ones."""
        raw = dict(OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else (section or {}))
        osla_keys = {f.name for f in fields(OslaConfig)}
        est_keys = {f.name for f in fields(EstimatorOptions)}
        prior_map = {"v0_checkpoint": "v0_checkpoint", "v0_features_dir": "v0_features_dir",
                     "support_capacity": "support_capacity",
                     "support_size": "support_size", "prior_seed": "seed"}
        own = {"prior", "prior_device", "prior_threads", "prior_num_gpus", "loss_agg", "max_rounds"}
        valid = osla_keys | est_keys | set(prior_map) | own
        unknown = sorted(set(raw) - valid)
        if unknown:
            raise ValueError(f"v05: unknown key(s) {unknown}; valid keys: {', '.join(sorted(valid))}")
        return cls(
            osla=OslaConfig(**{k: raw[k] for k in osla_keys if raw.get(k) is not None}),
            estimator=EstimatorOptions(**{k: raw[k] for k in est_keys if raw.get(k) is not None}),
            prior=raw.get("prior", "none"),
            prior_options=PriorOptions(**{dst: raw[src] for src, dst in prior_map.items() if raw.get(src) is not None}),
            max_rounds=raw.get("max_rounds"),
            **{k: raw[k] for k in ("prior_device", "prior_threads", "prior_num_gpus", "loss_agg") if raw.get(k) is not None},
        )


def check_v05_config(config: Any) -> V05Settings:
    """Refuse verl settings the V0.5 trainer does not support; return the parsed `v05:` section."""
    settings = V05Settings.from_section(config.get("v05"))
    algo = config.algorithm
    actor = config.actor_rollout_ref.actor
    rollout = config.actor_rollout_ref.rollout
    problems = []
    if algo.adv_estimator != ESTIMATOR_NAME:
        problems.append(f"algorithm.adv_estimator={algo.adv_estimator!r}: set it to {ESTIMATOR_NAME!r}")
    if int(rollout.n) != settings.osla.k_init:
        problems.append(f"actor_rollout_ref.rollout.n={rollout.n} differs from v05.k_init={settings.osla.k_init}: make them equal")
    if algo.get("use_kl_in_reward", False):
        problems.append("algorithm.use_kl_in_reward=true: not supported (use actor.use_kl_loss for a KL term)")
    if actor.get("loss_agg_mode", "token-mean") != "token-mean":
        problems.append(f"actor_rollout_ref.actor.loss_agg_mode={actor.loss_agg_mode!r}: V0.5 on verl needs token-mean")
    if config.trainer.get("use_v1", False):
        problems.append("trainer.use_v1=true: RayV05Trainer extends verl's RayPPOTrainer; set trainer.use_v1=false")
    if config.critic.get("enable", False):
        problems.append("critic.enable=true: V0.5 uses no critic")
    loss_mode = actor.get("policy_loss", {}).get("loss_mode", "vanilla")
    if settings.loss_agg == "prompt-mean" and loss_mode != "vanilla":
        problems.append(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode!r}: v05.loss_agg=prompt-mean scales advantages, "
            "exact only for the vanilla PPO-clip loss; use loss_mode=vanilla or v05.loss_agg=token-mean"
        )
    if problems:
        raise ValueError("V0.5 verl config: " + "; ".join(problems))
    return settings


def check_v05_files(settings: V05Settings) -> None:
    """Fail at launch, not at the first prior query on the task-runner node: with `v05.prior=v0` the V0
    checkpoint must load (`load_checkpoint` builds its head, so a TabPFN head resolves its checkpoint file
    here), its backbone must resolve to the one it was trained on, and a TabPFN head needs `tabpfn`.

    The task runner may run on another node: these files must exist at the same paths there (and
    $V05_TABPFN_PATH, if used, must be set in the Ray runtime environment)."""
    if settings.prior != "v0":
        return
    import importlib.util

    from v0_model.backbone import resolve_backbone
    from v0_model.checkpoint import load_checkpoint

    path = settings.prior_options.v0_checkpoint
    loaded = load_checkpoint(path)  # FileNotFoundError / ValueError naming the file and the fix
    spec = resolve_backbone(loaded.config.backbone)
    if spec.backbone_id != loaded.meta["backbone_id"]:
        raise ValueError(
            f"v05.v0_checkpoint={path}: trained on backbone {loaded.meta['backbone_id']!r}, which now resolves to "
            f"{spec.backbone_id!r}; make the original backbone available at the same path on every node"
        )
    if loaded.config.head.name == "tabpfn" and importlib.util.find_spec("tabpfn") is None:
        raise RuntimeError(
            f"v05.v0_checkpoint={path} has a TabPFN head but the `tabpfn` package is not installed; "
            "pip install 'v05[verl]' (it includes tabpfn==9.2.0) on every node"
        )


class RayV05Trainer(RayPPOTrainer):
    """verl PPO trainer whose batches are generated by V0.5's prior + OSLA rounds (see module docstring)."""

    def __init__(self, *args: Any, prior_source: PriorSource | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._setup_v05(prior_source)

    def _setup_v05(self, prior_source: PriorSource | None) -> None:
        """V0.5 state; split from __init__ so tests can build a trainer without Ray workers."""
        self.v05 = check_v05_config(self.config)
        self.prompt_index = PromptIndex()
        self.prior_source = prior_source if prior_source is not None else self._make_prior()

    def _make_prior(self) -> PriorSource:
        """The configured prior source, knowing every prompt of `prompt_index` (V0 embeds context by id)."""
        runtime = PriorRuntime(prompts_by_id=self.prompt_index.by_id, device=self.v05.prior_device)
        return make_prior_source(self.v05.prior, self.v05.prior_options, runtime)

    # ----------------------------------------------------------------------------------------------
    # one batch: prior, OSLA rollouts, padding
    # ----------------------------------------------------------------------------------------------

    def _dispatch_multiple(self) -> int:
        """Dispatch sizes must split evenly over the agent-loop workers and honour pad_multiple."""
        workers = int(self.config.actor_rollout_ref.rollout.get("agent", {}).get("num_workers", 1) or 1)
        return int(np.lcm(self.v05.osla.pad_multiple, workers))

    def _score_rows(self, rows: DataProto) -> DataProto:
        """Score generated rows with the colocated reward model when the agent loop did not."""
        return rows.union(self._compute_reward_colocate(rows))

    def _v05_rollouts(self, batch_dict: dict, metrics: dict, timing_raw: dict) -> tuple[DataProto, Any, list]:
        """Prior + OSLA generation for one dataloader batch; returns (training batch, OslaRollouts, prompts).

        The training batch holds every real rollout with `reward_baselines` = its prompt's prior,
        `response_mask`, and masked padding rows up to the update layout.
        """
        batch = DataProto.from_single_dict(batch_dict)
        batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
        prompts = prompts_from_rows(batch.non_tensor_batch)
        self.prompt_index.add(prompts)
        gen_batch = self._get_gen_batch(batch)
        gen_batch.meta_info["global_steps"] = self.global_steps

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="v05-prior") as pool, \
                marked_timer("gen", timing_raw, color="red"):
            pending = pool.submit(self._query_prior, prompts)  # runs while round 0 generates
            result = generate_osla(
                batch,
                gen_batch,
                lambda: self._wait_prior(pending, timing_raw),
                self.async_rollout_manager,
                self.v05.osla,
                dispatch_multiple=self._dispatch_multiple(),
                reward_map=self.v05.estimator.reward_map,
                score_rows=self._score_rows if self.use_rm else None,
                max_rounds=self.v05.max_rounds,
            )
            self.checkpoint_manager.sleep_replicas()
        priors = result.priors  # [B]
        timing_raw.update(result.timing)
        metrics.update(osla_metrics(result, self.v05.osla))

        out = result.batch
        out.batch["reward_baselines"] = torch.as_tensor(priors[result.prompt_row], dtype=torch.float32)  # [N]
        if "response_mask" not in out.batch.keys():
            out.batch["response_mask"] = compute_response_mask(out)
        n_total, mini = update_layout(
            len(out), self._n_mini_batches(), self._get_dp_size(self.actor_rollout_wg, "actor"), self.v05.osla.k_init
        )
        out = pad_for_update(out, n_total)
        out.meta_info["v05_ppo_mini_batch_size"] = mini
        metrics["v05/update_padding"] = float(n_total - int(result.counts.sum()))
        return out, result, prompts

    def _query_prior(self, prompts: list) -> tuple[np.ndarray, float]:
        """(priors (B,), seconds): one `PriorSource.priors` call, checked; runs in the prior thread."""
        t0 = time.perf_counter()
        priors = check_priors(self.prior_source.priors(prompts), len(prompts), self.v05.prior)  # [B]
        return priors, time.perf_counter() - t0

    @staticmethod
    def _wait_prior(pending: Any, timing_raw: dict) -> np.ndarray:
        """The prior, once round 0 is generated; logs its own time and how long the planner waited."""
        t0 = time.perf_counter()
        priors, seconds = pending.result()
        timing_raw["v05_prior"] = seconds
        timing_raw["v05_prior_wait"] = time.perf_counter() - t0
        return priors

    def _n_mini_batches(self) -> int:
        actor = self.config.actor_rollout_ref.actor
        return max(1, int(self.config.data.train_batch_size) // int(actor.ppo_mini_batch_size))

    def _update_actor(self, batch: DataProto) -> DataProto:
        """verl's update with ppo_mini_batch_size set for this batch's size (`osla.update_layout`)."""
        mini = batch.meta_info.pop("v05_ppo_mini_batch_size", None)
        actor = self.config.actor_rollout_ref.actor
        if mini is None:
            return super()._update_actor(batch)
        configured = actor.ppo_mini_batch_size
        with open_dict(actor):
            actor.ppo_mini_batch_size = int(mini)
        try:
            return super()._update_actor(batch)
        finally:
            with open_dict(actor):
                actor.ppo_mini_batch_size = configured

    def _observe(self, result: Any, prompts: list) -> None:
        """Feed the support buffer with this batch's measured success rates (paper §4.1.3, Step 1)."""
        rates = (result.sums / result.counts + 1.0) / 2.0  # [B] success rate in [0, 1]
        self.prior_source.observe(np.array([p.prompt_id for p in prompts], dtype=np.int64), rates, counts=result.counts)

    # ----------------------------------------------------------------------------------------------
    # checkpoints: the prior's support buffer travels with verl's checkpoint
    # ----------------------------------------------------------------------------------------------

    def _prior_path(self) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}", PRIOR_FILE)

    def _save_checkpoint(self):
        out = super()._save_checkpoint()
        self._save_prior_state()
        return out

    def _save_prior_state(self) -> None:
        """Write the prior's state and the prompts its support buffer refers to (atomic write)."""
        state = self.prior_source.state_dict()
        held = state.get("support", {}).get("prompt_ids", []) if isinstance(state, dict) else []
        prompts = [self.prompt_index.by_id[int(i)] for i in dict.fromkeys(held) if int(i) in self.prompt_index.by_id]
        payload = {
            "state": state,
            "prompts": [
                {"prompt_id": p.prompt_id, "dataset": p.dataset, "split": p.split, "text": p.text, "answer": p.answer}
                for p in prompts
            ],
        }
        path = self._prior_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)

    def _load_checkpoint(self):
        out = super()._load_checkpoint()
        if self.global_steps > 0:
            self._load_prior_state()
        return out

    def _load_prior_state(self) -> None:
        """Restore the support buffer; the prompts it refers to are known again (in the live prompt index)
        before the first query."""
        path = self._prior_path()
        if not os.path.exists(path):
            print(f"[v05] no {PRIOR_FILE} next to the checkpoint of step {self.global_steps}; the prior starts cold")
            return
        with open(path) as f:
            payload = json.load(f)
        self.prompt_index.add([Prompt(**p) for p in payload.get("prompts", [])])
        self.prior_source.load_state_dict(payload["state"])

    # ----------------------------------------------------------------------------------------------
    # training loop
    # ----------------------------------------------------------------------------------------------

    def _with_old_log_prob(self, batch: DataProto, metrics: dict) -> DataProto:
        """verl's old-policy log-probs joined to the batch, and the rollout entropy they come with logged."""
        old_log_prob, mfu = self._compute_old_log_prob(batch)
        actor_cfg = self.config.actor_rollout_ref.actor
        entropy = agg_loss(
            loss_mat=old_log_prob.batch["entropys"],
            loss_mask=batch.batch["response_mask"],
            loss_agg_mode=actor_cfg.loss_agg_mode,
            loss_scale_factor=actor_cfg.loss_scale_factor,
        )
        metrics.update({"actor/entropy": entropy.detach().item(), "perf/mfu/actor_infer": mfu})
        old_log_prob.batch.pop("entropys")
        return batch.union(old_log_prob)

    def _train_on(self, batch: DataProto, metrics: dict, timing_raw: dict) -> DataProto:
        """Balance, log-probs, advantages (estimator `v05`) and the actor update for a padded batch."""
        if self.config.trainer.balance_batch:
            self._balance_batch(batch, metrics=metrics)
        batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()
        batch.meta_info["images_seqlens"] = []

        reward_tensor, reward_extra = extract_reward(batch)
        rollout_corr = self.config.algorithm.get("rollout_correction", None)
        bypass = bool(rollout_corr and rollout_corr.get("bypass_mode", False))
        if bypass:
            from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

            apply_bypass_mode(
                batch=batch,
                rollout_corr_config=rollout_corr,
                policy_loss_config=self.config.actor_rollout_ref.actor.policy_loss,
            )
        else:
            with marked_timer("old_log_prob", timing_raw, color="blue"):
                batch = self._with_old_log_prob(batch, metrics)
        if self.use_reference_policy:
            with marked_timer("ref", timing_raw, color="olive"):
                batch = batch.union(self._compute_ref_log_prob(batch))

        with marked_timer("adv", timing_raw, color="brown"):
            batch.batch["token_level_scores"] = reward_tensor
            batch.batch["token_level_rewards"] = reward_tensor
            if reward_extra:
                batch.non_tensor_batch.update({k: np.array(v) for k, v in reward_extra.items()})
            if rollout_corr is not None and "rollout_log_probs" in batch.batch and not bypass:
                from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

                batch, is_metrics = compute_rollout_correction_and_add_to_batch(batch, rollout_corr)
                metrics.update(is_metrics)
            batch = compute_advantage(
                batch,
                adv_estimator=ESTIMATOR_NAME,
                num_repeat=self.v05.osla.k_init,
                config=self.config,  # the estimator reads its options from config["v05"]
            )

        with marked_timer("update_actor", timing_raw, color="red"):
            advantages = batch.batch["advantages"]  # [N, L] the estimator's, kept for verl's metrics
            if self.v05.loss_agg == "prompt-mean":
                weights = self._eq10_weights(batch)  # [N]
                batch.batch["advantages"] = advantages * weights.to(advantages.dtype).unsqueeze(-1)  # [N, L]
                real = weights > 0
                metrics["v05/loss_weight_min"] = float(weights[real].min()) if bool(real.any()) else 0.0
                metrics["v05/loss_weight_max"] = float(weights[real].max()) if bool(real.any()) else 0.0
            actor_output = self._update_actor(batch)
            batch.batch["advantages"] = advantages
        metrics.update(reduce_metrics(actor_output.meta_info["metrics"]))
        return batch

    def _eq10_weights(self, batch: DataProto) -> torch.Tensor:
        """Per-row advantage scale making verl's token-mean Eq. 10's prompt-mean (`loss_weights`). Shape (N,).

        Needs the final row order (after `_balance_batch`) and the update layout of `_update_actor`: rows
        per mini-batch = ppo_mini_batch_size (this batch's, in prompt units) × rollout.n."""
        n = len(batch)
        mask = batch.batch["response_mask"]  # [N, L]
        lengths = mask.sum(dim=-1)  # [N]
        gid = np.zeros(n, dtype=np.int64)
        real = (lengths > 0).cpu().numpy()
        gid[real] = uid_groups(batch.non_tensor_batch["uid"], real)[0]
        actor = self.config.actor_rollout_ref.actor
        mini = batch.meta_info.get("v05_ppo_mini_batch_size", actor.ppo_mini_batch_size)
        mini_rows = int(mini) * int(self.config.actor_rollout_ref.rollout.n)
        if actor.get("shuffle", False) or mini_rows >= n:
            minibatch = np.zeros(n, dtype=np.int64)  # one normaliser for the batch (see loss_weights)
        else:
            minibatch = verl_minibatch_of_rows(n, self._get_dp_size(self.actor_rollout_wg, "actor"), mini_rows)
        return prompt_mean_weights(gid, lengths.cpu(), minibatch).to(mask.device)

    def _batch_metrics(self, batch: DataProto, timing_raw: dict) -> dict[str, Any]:
        """verl's data, timing and throughput metrics, computed on the real rows only (no update padding)."""
        real = batch.select_idxs(~is_padding(batch))
        real.meta_info = {**batch.meta_info, "global_token_num": torch.sum(real.batch["attention_mask"], dim=-1).tolist()}
        out = dict(compute_data_metrics(batch=real, use_critic=False))
        out.update(compute_timing_metrics(batch=real, timing_raw=timing_raw))
        out.update(compute_throughout_metrics(batch=real, timing_raw=timing_raw, n_gpus=self.resource_pool_manager.get_n_gpus()))
        return out

    def fit(self):
        """verl's training loop with the V0.5 batch generation (module docstring, steps 1-4).

        Kept in one piece: it follows `RayPPOTrainer.fit` of verl 0.9.1 step for step (resume, validation,
        the per-step order of generation, update, checkpoint and logging), which is how it is checked."""
        from verl.utils.tracking import Tracking

        if self._dump_executor._shutdown:
            self._init_dump_executor()
        logger = Tracking(
            project_name=self.config.trainer.project_name,
            experiment_name=self.config.trainer.experiment_name,
            default_backend=self.config.trainer.logger,
            config=OmegaConf.to_container(self.config, resolve=True),
        )
        self.global_steps = 0
        self._load_checkpoint()
        self.checkpoint_manager.update_weights(self.global_steps)
        start_epoch = self.global_steps // len(self.train_dataloader)

        if self.config.trainer.get("val_before_train", True):
            val_metrics = self._validate()
            pprint(f"Initial validation metrics: {val_metrics}")
            logger.log(data=val_metrics, step=self.global_steps)
            if self.config.trainer.get("val_only", False):
                self._shutdown_dump_executor()
                return

        progress = tqdm(total=self.total_training_steps, initial=self.global_steps, desc="V0.5 training")
        self.global_steps += 1
        last_val = None
        for epoch in range(start_epoch, self.config.trainer.total_epochs):
            for batch_dict in self.train_dataloader:
                if hasattr(self.actor_rollout_wg, "async_calls_finalize_fn_exec"):  # async checkpoint saves
                    self.actor_rollout_wg.async_calls_finalize_fn_exec(blocking=False)
                metrics: dict[str, Any] = {}
                timing_raw: dict[str, float] = {}
                is_last_step = self.global_steps >= self.total_training_steps
                with marked_timer("step", timing_raw):
                    batch, result, prompts = self._v05_rollouts(batch_dict, metrics, timing_raw)
                    batch = self._train_on(batch, metrics, timing_raw)
                    self._observe(result, prompts)  # before saving: global_step_N/v05_prior.json includes step N
                    save_freq = self.config.trainer.save_freq
                    if save_freq > 0 and (is_last_step or self.global_steps % save_freq == 0):
                        with marked_timer("save_checkpoint", timing_raw, color="green"):
                            self._save_checkpoint()
                    with marked_timer("update_weights", timing_raw, color="red"):
                        self.checkpoint_manager.update_weights(self.global_steps)

                test_freq = self.config.trainer.test_freq
                if test_freq > 0 and (is_last_step or self.global_steps % test_freq == 0):
                    with marked_timer("testing", timing_raw, color="green"):
                        val_metrics = self._validate()
                    last_val = val_metrics if is_last_step else last_val
                    metrics.update(val_metrics)

                metrics.update({"training/global_step": self.global_steps, "training/epoch": epoch})
                metrics.update(self._batch_metrics(batch, timing_raw))
                logger.log(data=metrics, step=self.global_steps)
                progress.update(1)
                self.global_steps += 1
                if is_last_step:
                    if hasattr(self.actor_rollout_wg, "async_calls_finalize_fn_exec"):
                        self.actor_rollout_wg.async_calls_finalize_fn_exec(blocking=True)
                    self._shutdown_dump_executor()
                    pprint(f"Final validation metrics: {last_val}")
                    progress.close()
                    return
        self._shutdown_dump_executor()


__all__ = ["PRIOR_FILE", "RayV05Trainer", "V05Settings", "check_v05_config", "check_v05_files"]
