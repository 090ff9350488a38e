"""The embedded trainer: every algorithm updates a tiny policy, OSLA gives prompts different k, resume is
exact, every rollout is counted (and stored).

Rollouts come from `FakeBackend`, which samples a success for each rollout with a per-prompt probability
(seeded), so rewards — and therefore OSLA's decisions — are known in advance; the policy's forward and
backward passes are real (a freshly initialised one-layer Qwen3).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from v0_data.tasks.base import Prompt
from v05_rl.priors import BufferedPriorSource
from v05_rl.rollout import RolloutBatch, expand_n_per_prompt, sequence_logprobs
from v05_rl.engine import Trainer
from v05_rl.engine.config import ALGORITHMS, TrainConfig, with_overrides
from v05_rl.losses import k3_kl, ppo_clip_loss, row_weights

torch.set_num_threads(1)

VOCAB = 98  # the character tokenizer of v05_rl.policies: pad 0, eos 1, unk 2, 95 printable characters


def tiny_model(seed: int = 0):
    from v05_rl.policies import PolicySpec, build_policy

    model, _ = build_policy(PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=seed)
    return model


class FakeBackend:
    """`generate` with controlled rewards: response "1" (success) with probability p[text], else "0".

    Token ids are arbitrary but deterministic in (seed, call); response lengths vary from 1 to R, so the
    masks and the loss aggregation are exercised. Records every call's per-prompt counts.
    """

    P, R = 4, 3

    def __init__(self, p_success: dict[str, float]):
        self.p = p_success
        self.calls: list[tuple[list[str], list[int]]] = []

    def generate(self, prompts, n_per_prompt, sampling, *, seed=None):
        idx = expand_n_per_prompt(len(prompts), n_per_prompt)  # (N,)
        self.calls.append((list(prompts), np.bincount(idx, minlength=len(prompts)).tolist()))
        rng = np.random.default_rng(seed)
        n = len(idx)
        succ = rng.random(n) < np.array([self.p[prompts[i]] for i in idx])
        prompt_ids = torch.tensor([[3 + (sum(map(ord, prompts[i])) * (s + 1)) % 90 for s in range(self.P)] for i in idx])
        resp = torch.as_tensor(rng.integers(3, VOCAB, size=(n, self.R)))
        lengths = torch.as_tensor(rng.integers(1, self.R + 1, size=n))
        rmask = (torch.arange(self.R)[None, :] < lengths[:, None]).float()  # [N, R]
        am = torch.cat([torch.ones(n, self.P, dtype=torch.long), rmask.long()], dim=1)
        return RolloutBatch(
            prompt_index=idx,
            input_ids=torch.cat([prompt_ids, resp], dim=1),
            attention_mask=am,
            position_ids=(am.cumsum(-1) - 1).clamp(min=0),
            response_mask=rmask,
            old_logprobs=torch.zeros(n, self.R),
            responses=["1" if s else "0" for s in succ],
            n_tokens=lengths.numpy().astype(np.int64),
            finish_reason=["eos"] * n,
        )


def fake_reward(prompts, responses):
    return np.array([1.0 if r == "1" else -1.0 for r in responses])


class FixedPrior(BufferedPriorSource):
    """Priors from a text -> V table (NaN when absent)."""

    name = "fixed"

    def __init__(self, table):
        super().__init__()
        self.table = table

    def priors(self, prompts):
        return np.array([self.table.get(p.text, np.nan) for p in prompts], dtype=np.float64)


def make_prompts(n: int) -> list[Prompt]:
    return [Prompt.new("fake", "train", f"q{i}", "1") for i in range(n)]


def base_cfg(**kw) -> TrainConfig:
    defaults = dict(
        policy="fresh", rollouts_per_step=32, group_size=4, k=4, steps=2, max_new_tokens=3, lr=1e-2,
        warmup_steps=0, eval_every=0, eval_prompts=0, save_every=0, pad_multiple=1,
    )
    defaults.update(kw)
    return with_overrides(TrainConfig(policy="fresh"), defaults)


def make_trainer(cfg, tmp_path, p_success, *, prior_source=None, name="run", store=None):
    prompts = make_prompts(len(p_success))
    backend = FakeBackend({p.text: ps for p, ps in zip(prompts, p_success)})
    model = tiny_model()
    ref = tiny_model() if cfg.resolved_kl_coef > 0 else None
    trainer = Trainer(
        cfg, model=model, backend=backend, train_prompts=prompts, out_dir=tmp_path / name, ref_model=ref,
        reward_fn=fake_reward, prior_source=prior_source, progress=False, store=store,
    )
    return trainer, backend


def finite_metrics(rec: dict) -> None:
    for key in ("reward", "accuracy", "pg_loss", "entropy", "grad_norm", "clip_frac", "kl", "k_mean", "t_step"):
        assert rec[key] is not None and math.isfinite(rec[key]), (key, rec[key])


# ------------------------------------------------------------------------------------------ pure pieces


def test_row_weights_by_hand():
    # rows 0, 1 belong to group 0 (k = 2), row 2 to group 1 (k = 1); response lengths 2, 4, 1
    group = torch.tensor([0, 0, 1])
    counts = torch.tensor([2.0, 1.0], dtype=torch.float64)
    lengths = torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64)
    assert row_weights(group, counts, lengths, "token-mean").tolist() == [1.0, 1.0, 1.0]
    # seq-mean-token-mean: 1/len
    assert row_weights(group, counts, lengths, "seq-mean-token-mean").tolist() == [0.5, 0.25, 1.0]
    # prompt-mean (Eq. 10): 1/(k·len) = 1/4, 1/8, 1/1
    assert row_weights(group, counts, lengths, "prompt-mean").tolist() == [0.25, 0.125, 1.0]
    with pytest.raises(ValueError, match="loss_agg"):
        row_weights(group, counts, lengths, "sum")


def test_ppo_clip_loss_by_hand():
    # ratio e^{ln 1.5} = 1.5, A = +1: min(1.5, clip 1.2) = 1.2 -> loss -1.2, clipped
    # ratio 0.5, A = +1: min(0.5, 0.8) = 0.5 -> loss -0.5, not clipped
    # ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped
    # ratio 1.5, A = -1 with clip_high 0.28: min(-1.5, -1.28) = -1.5 -> loss 1.5, not clipped
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.5]]))
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, clipped = ppo_clip_loss(logp, old, adv, 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5], [0.8, 1.5]]))
    assert clipped.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    loss_hi, _ = ppo_clip_loss(logp, old, adv, 0.2, 0.28)
    assert torch.allclose(loss_hi[0, 0], torch.tensor(-1.28))  # clip-higher lets the ratio grow to 1.28


def test_k3_kl_by_hand():
    # d = ref - logp = ln 2: e^d - d - 1 = 2 - 0.693147 - 1 = 0.306853; equal policies give 0
    logp = torch.tensor([[0.0, -1.0]])
    ref = torch.tensor([[math.log(2.0), -1.0]])
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([[2.0 - math.log(2.0) - 1.0, 0.0]]))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="algorithm 'ppo' unknown"):
        TrainConfig(algorithm="ppo")
    with pytest.raises(ValueError, match="prior"):
        TrainConfig(algorithm="grpo", prior="oracle-noise")
    with pytest.raises(ValueError, match="v0_checkpoint"):
        TrainConfig(algorithm="v05", prior="v0")
    with pytest.raises(ValueError, match="loss_agg"):
        with_overrides(TrainConfig(), {"loss_agg": "sum"})
    # compute matching: prompt batch = rollouts_per_step // k
    assert TrainConfig(algorithm="grpo", rollouts_per_step=256).batch_prompts == 16
    assert TrainConfig(algorithm="v05-fixed", k=2, rollouts_per_step=256).batch_prompts == 128
    assert TrainConfig(algorithm="v05", rollouts_per_step=256).batch_prompts == 64
    assert TrainConfig(algorithm="dapo").resolved_clip_high == 0.28
    assert TrainConfig(algorithm="grpo").resolved_kl_coef == 0.001
    assert TrainConfig(algorithm="v05").resolved_kl_coef == 0.0


# ------------------------------------------------------------------------------------------ the loop


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_updates_the_policy(tmp_path, algorithm):
    p_success = [0.2, 0.5, 0.8, 0.5, 0.3, 0.7, 0.4, 0.6]
    prior = FixedPrior({f"q{i}": 0.0 for i in range(8)}) if algorithm.startswith("v05") else None
    cfg = base_cfg(algorithm=algorithm, halt_fraction=0.0)
    trainer, backend = make_trainer(cfg, tmp_path, p_success, prior_source=prior)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    after = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "parameters did not change"
    train_recs = [r for r in trainer.history if r["kind"] == "train"]
    assert len(train_recs) == 2
    for rec in train_recs:
        finite_metrics(rec)
    # every generated rollout is counted
    generated = sum(sum(c) for _, c in backend.calls)
    assert trainer.rollouts_used == generated == train_recs[-1]["rollouts_used"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["kind"] == "train"


def test_osla_gives_different_prompts_different_k(tmp_path):
    # 8 prompts, prior V = +1 for all. Prompts q0..q3 always succeed (v̄ = +1): (v̄ - V)² = 0 <= 1/4, the
    # prior is kept, Δ̂² = 0, no more rollouts: k = 4. Prompts q4..q7 always fail (v̄ = -1):
    # (−1 − 1)² − 1/4 = 3.75 = Δ̂² > 0 and the target 1/sqrt(0.0039) − 1/3.75 = 16.01 − 0.27 = 15.7 > k, so
    # they get +2 per round (4 of 8 = 50 % need more >= 25 %: no halt) until the cap floor(16.01) = 16.
    # Without padding (pad_multiple 1): rounds of 4 × 2 = 8 extra, six rounds (4 -> 16). Total 4·4 + 4·16 = 80.
    p_success = [1.0] * 4 + [0.0] * 4
    prior = FixedPrior({f"q{i}": 1.0 for i in range(8)})
    cfg = base_cfg(algorithm="v05", rollouts_per_step=32, steps=1, pad_multiple=1)
    trainer, backend = make_trainer(cfg, tmp_path, p_success, prior_source=prior)
    stats = trainer.train_step()
    k_by_text: dict[str, int] = {}
    for texts, counts in backend.calls:
        for t, c in zip(texts, counts):
            k_by_text[t] = k_by_text.get(t, 0) + c
    assert [k_by_text[f"q{i}"] for i in range(8)] == [4] * 4 + [16] * 4
    assert stats.rollouts == trainer.rollouts_used == 80
    assert stats.k_max == 16 and stats.k_mean == 10.0  # (4·4 + 4·16) / 8
    assert stats.osla_rounds == 6
    # extra rounds go only to the prompts that need them, with per-prompt n
    assert all(set(texts) == {f"q{i}" for i in range(4, 8)} for texts, _ in backend.calls[1:])
    assert stats.prior_reject == 0.5  # Δ̂² > 0 for q4..q7
    # w = Δ̂²/(Δ̂² + 1/k) at k = 16: 3.9375/(3.9375 + 0.0625) = 0.984375 for q4..q7, 0 for q0..q3
    assert stats.w_mean == pytest.approx((4 * 0.984375) / 8)


@pytest.mark.parametrize("no_prior, k_each", [("cap", 16), ("k_init", 4)])
def test_prompts_without_a_prior_follow_osla_no_prior(tmp_path, no_prior, k_each):
    # prior source "none": every prompt lacks a prior; 'cap' samples all 8 to 16, 'k_init' stops at 4
    cfg = base_cfg(algorithm="v05", rollouts_per_step=32, steps=1, pad_multiple=1, osla_no_prior=no_prior)
    trainer, _ = make_trainer(cfg, tmp_path, [0.5] * 8)
    stats = trainer.train_step()
    assert stats.rollouts == 8 * k_each and stats.k_max == k_each


def test_osla_padding_is_generated_and_counted(tmp_path):
    # Same world with the paper's padding to a multiple of 32: round 1 needs 4 × 2 = 8, padded to 32, so
    # the four failing prompts get 8 each (4 -> 12); round 2: 4 × 2 = 8 -> padding would exceed the cap
    # 16 (only 4 × 4 = 16 places left), the planner gives what fits: 4 each (12 -> 16) or stops at 16.
    p_success = [1.0] * 4 + [0.0] * 4
    prior = FixedPrior({f"q{i}": 1.0 for i in range(8)})
    cfg = base_cfg(algorithm="v05", rollouts_per_step=32, steps=1, pad_multiple=32)
    trainer, backend = make_trainer(cfg, tmp_path, p_success, prior_source=prior)
    stats = trainer.train_step()
    generated = sum(sum(c) for _, c in backend.calls)
    assert stats.rollouts == trainer.rollouts_used == generated
    assert stats.k_max <= 16
    first_extra = sum(backend.calls[1][1])
    assert first_extra % 32 == 0, "the first extra dispatch is padded to a multiple of 32"


def test_dapo_counts_dropped_groups_and_refills(tmp_path):
    # 16 prompts: half always succeed (zero variance, dropped), half succeed with p = 0.5. Each try draws
    # a fresh prompt batch of 32 // 4 = 8 prompts × G = 4 = 32 rollouts; all are counted, kept or not.
    p_success = [1.0, 0.5] * 8
    cfg = base_cfg(algorithm="dapo", rollouts_per_step=32, group_size=4, steps=1, dapo_max_tries=3)
    trainer, backend = make_trainer(cfg, tmp_path, p_success)
    stats = trainer.train_step()
    assert stats.rollouts == trainer.rollouts_used == 32 * len(backend.calls)
    assert 2 <= len(backend.calls) <= 3  # one try cannot fill 8 groups when half are always solved
    assert stats.zero_var_groups > 0.4
    assert stats.prompts <= 8


def test_rollout_budget_stops_the_run(tmp_path):
    p_success = [0.5] * 8
    cfg = base_cfg(algorithm="grpo", rollouts_per_step=32, group_size=4, steps=100, rollout_budget=70)
    trainer, _ = make_trainer(cfg, tmp_path, p_success)
    trainer.train()
    # 32 per step: after 2 steps 64 < 70, after 3 steps 96 >= 70 -> stop
    assert trainer.step == 3 and trainer.rollouts_used == 96


def test_max_minutes_stops_the_run(tmp_path):
    cfg = base_cfg(algorithm="grpo", steps=100, max_minutes=1e-9)
    trainer, _ = make_trainer(cfg, tmp_path, [0.5] * 8)
    trainer.train()
    assert trainer.step == 1  # the first step already took longer than 6e-8 s


def _strip_times(history):
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in history]


@pytest.mark.parametrize("algorithm", ["v05", "grpo"])
def test_resume_equals_uninterrupted(tmp_path, algorithm):
    p_success = [0.2, 0.5, 0.8, 0.5, 0.3, 0.7, 0.4, 0.6, 0.9, 0.1, 0.5, 0.5]
    kw = dict(algorithm=algorithm, steps=4, save_every=2, ppo_epochs=2, n_minibatches=2, halt_fraction=0.0)
    if algorithm == "v05":
        kw.update(prior="oracle-noise", oracle_rollouts=4, prior_noise_std=0.3, prior_flip_fraction=0.2)
    cfg = base_cfg(**kw)
    full, _ = make_trainer(cfg, tmp_path, p_success, name="full")
    full.train()

    first, _ = make_trainer(with_overrides(cfg, {"steps": 2}), tmp_path, p_success, name="split")
    first.train()
    second, _ = make_trainer(cfg, tmp_path, p_success, name="split")
    second.model.load_state_dict(tiny_model(seed=1).state_dict())  # must be overwritten by the checkpoint
    assert second.load_checkpoint()
    assert second.step == 2
    second.train()

    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert second.rollouts_used == full.rollouts_used
    assert second.prior_source.state_dict() == full.prior_source.state_dict()
    assert _strip_times(second.history) == _strip_times(full.history)


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = base_cfg(algorithm="grpo", steps=1, save_every=1)
    t, _ = make_trainer(cfg, tmp_path, [0.5] * 8)
    t.train()
    other, _ = make_trainer(with_overrides(cfg, {"lr": 0.5}), tmp_path, [0.5] * 8)
    with pytest.raises(ValueError, match="lr"):
        other.load_checkpoint()


def test_every_rollout_goes_to_the_store(tmp_path):
    pytest.importorskip("duckdb")
    from v0_data.store import TrajectoryStore

    p_success = [1.0, 0.5] * 8
    store = TrajectoryStore.open(tmp_path / "store")
    cfg = base_cfg(algorithm="dapo", steps=2, store_model="fake-model")
    trainer, backend = make_trainer(cfg, tmp_path, p_success, store=store)
    trainer.train()
    rows = store.query("SELECT step, count(*) AS n, count(DISTINCT (prompt_id, sample_idx)) AS u FROM rollouts GROUP BY step ORDER BY step")
    counts = rows.column("n").to_pylist()
    assert sum(counts) == trainer.rollouts_used
    assert rows.column("step").to_pylist() == [0, 1]
    assert rows.column("u").to_pylist() == counts  # (prompt, sample_idx) unique within a step
    models = store.query("SELECT DISTINCT model FROM rollouts").column("model").to_pylist()
    assert models == ["fake-model"]
    store.close()


def test_real_hf_backend_and_logprobs_agree(tmp_path):
    """One GRPO step with the real `hf` sampler on a fresh policy: the trainer's forward pass reproduces
    the sampler's log-probabilities (same positions and masks)."""
    from v05_rl.policies import PolicySpec, build_policy
    from v05_rl.rollout import SamplingConfig, get_backend

    model, tok = build_policy(PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=0)
    backend = get_backend("hf", model, tok)
    prompts = [Prompt.new("arith", "train", f"{a}+{b}=", str(a + b)) for a, b in [(1, 2), (3, 4), (12, 5), (7, 7)]]
    batch = backend.generate([p.text for p in prompts], [3, 1, 2, 2], SamplingConfig(max_new_tokens=4), seed=0)
    lp = sequence_logprobs(model, batch, 1.0).detach()
    assert torch.allclose(lp, batch.old_logprobs, atol=1e-4)
    ref, _ = build_policy(PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), seed=0)
    cfg = base_cfg(algorithm="grpo", rollouts_per_step=16, group_size=4, steps=1, max_new_tokens=4)
    trainer = Trainer(cfg, model=model, backend=backend, train_prompts=prompts, out_dir=tmp_path / "hf",
                      ref_model=ref, progress=False)
    stats = trainer.train_step()
    assert stats.rollouts == 16 and math.isfinite(stats.entropy)


def test_grpo_learns_a_toy_preference(tmp_path):
    """End to end with the real sampler: reward +1 when the response starts with "7". A fresh policy
    almost never does (1 of 98 characters, ~1 %); 30 GRPO steps must raise it well above that."""
    from v05_rl.policies import PolicySpec, build_policy
    from v05_rl.rollout import get_backend

    spec = PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model, tok = build_policy(spec, seed=0)
    ref, _ = build_policy(spec, seed=0)
    prompts = [Prompt.new("toy", "train", f"{i}=", "7") for i in range(40)]

    def reward(ps, rs):
        return np.array([1.0 if r[:1] == "7" else -1.0 for r in rs])

    cfg = base_cfg(algorithm="grpo", rollouts_per_step=128, group_size=8, steps=30, lr=3e-3)
    trainer = Trainer(cfg, model=model, backend=get_backend("hf", model, tok), train_prompts=prompts,
                      out_dir=tmp_path / "toy", ref_model=ref, reward_fn=reward, progress=False)
    trainer.train()
    acc = [r["accuracy"] for r in trainer.history]
    assert np.mean(acc[:3]) < 0.05
    assert np.mean(acc[-3:]) > 0.2


def test_resume_equals_uninterrupted_with_the_hf_sampler(tmp_path):
    """Bit-for-bit resume with the real sampler, a real policy and arith rewards (v05 + oracle prior)."""
    from v05_rl.policies import PolicySpec, build_policy
    from v05_rl.rollout import get_backend
    from v05_rl.engine import load_task_prompts

    spec = PolicySpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    prompts = load_task_prompts("arith", "n_prompts=60", "train")
    cfg = base_cfg(algorithm="v05", prior="oracle-noise", oracle_rollouts=4, prior_noise_std=0.3, steps=4,
                   save_every=2, rollouts_per_step=32, max_new_tokens=4, halt_fraction=0.0, pad_multiple=8)

    def trainer(steps, name):
        model, tok = build_policy(spec, seed=0)
        return Trainer(with_overrides(cfg, {"steps": steps}), model=model, backend=get_backend("hf", model, tok),
                       train_prompts=prompts, out_dir=tmp_path / name, progress=False)

    full = trainer(4, "full")
    full.train()
    trainer(2, "split").train()
    second = trainer(4, "split")
    assert second.load_checkpoint()
    second.train()
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert _strip_times(second.history) == _strip_times(full.history)
