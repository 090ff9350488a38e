"""OSLA rounds on verl DataProtos, driven by a fake rollout manager (no Ray, no GPU, no vLLM).

The fake has verl's `generate_sequences(DataProto) -> DataProto` signature and returns what verl's
agent loop returns for single-turn rule-scored rollouts: prompts/responses/masks/ids and `rm_scores`
with the ±1 reward on the last response token, the input columns passed through, and a timing dict.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

import torch  # noqa: E402

from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage  # noqa: E402

from v05_rl.allocation import OslaConfig, plan_round  # noqa: E402
from v05_rl.verl.osla import (  # noqa: E402
    PAD_UID_PREFIX,
    generate_osla,
    is_padding,
    osla_metrics,
    pad_for_update,
    prompts_from_rows,
    update_layout,
)

LP, LR = 4, 6  # prompt and response widths of the synthetic rollouts
NAN = float("nan")


def batch_dict(names):
    """What verl's RL dataloader yields for prompts `names` (collate_fn of RLHFDataset)."""
    n = len(names)
    obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731
    chats = [[{"role": "user", "content": f"question {q}"}] for q in names]
    return {
        "dummy_tensor": torch.zeros(n, 1, dtype=torch.uint8),
        "data_source": obj(["toy"] * n),
        "prompt": obj(chats),
        "raw_prompt": obj(chats),
        "reward_model": obj([{"style": "rule", "ground_truth": q} for q in names]),
        "extra_info": obj([{"prompt_id": 1000 + i, "index": i, "name": q} for i, q in enumerate(names)]),
        "index": obj(list(range(n))),
    }


def split(names):
    """(prompt rows with uid, gen batch) exactly as RayPPOTrainer.fit builds them."""
    batch = DataProto.from_single_dict(batch_dict(names))
    batch.non_tensor_batch["uid"] = np.array([f"uid-{q}" for q in names], dtype=object)
    gen = RayPPOTrainer._get_gen_batch(None, batch)  # verl's own split (does not use self)
    return batch, gen


class FakeRolloutManager:
    """Scripted rewards: `script[name](j)` is the reward of the j-th rollout ever made for prompt `name`."""

    def __init__(self, script):
        self.script = script
        self.made = Counter()
        self.dispatches: list[list[str]] = []

    def generate_sequences(self, prompts: DataProto) -> DataProto:
        names = [e["name"] for e in prompts.non_tensor_batch["extra_info"]]
        self.dispatches.append(names)
        n = len(names)
        rewards, lengths = [], []
        for q in names:
            j = self.made[q]
            self.made[q] += 1
            rewards.append(self.script[q](j))
            lengths.append(1 + j % LR)
        resp_mask = torch.zeros(n, LR, dtype=torch.int64)
        rm = torch.zeros(n, LR)
        for i, (r, ln) in enumerate(zip(rewards, lengths)):
            resp_mask[i, :ln] = 1
            rm[i, ln - 1] = r
        attn = torch.cat([torch.ones(n, LP, dtype=torch.int64), resp_mask], dim=1)
        ids = torch.randint(5, 100, (n, LP + LR))
        out = DataProto.from_dict(
            tensors={
                "prompts": ids[:, :LP],
                "responses": ids[:, LP:],
                "response_mask": resp_mask,
                "input_ids": ids,
                "attention_mask": attn,
                "position_ids": torch.cumsum(attn, dim=1) - 1,
                "rm_scores": rm,
            },
            non_tensors={"__num_turns__": np.full(n, 2, dtype=np.int32), **prompts.non_tensor_batch},
            meta_info={"timing": {"agent_loop/generate_sequences/max": 0.25}, "reward_extra_keys": []},
        )
        return out


ALWAYS_UP = lambda j: 1  # noqa: E731
ALWAYS_DOWN = lambda j: -1  # noqa: E731
ALTERNATE = lambda j: 1 if j % 2 == 0 else -1  # noqa: E731


def rows_per_prompt(result):
    return Counter(result.batch.non_tensor_batch["uid"].tolist())


def assert_follows_planner(fake, res, names, priors, cfg):
    """Each dispatch (fillers excluded) is exactly plan_round's answer for the counts/sums before it,
    and the loop ends exactly when plan_round returns all zeros."""
    counts = np.zeros(len(names), dtype=np.int64)
    sums = np.zeros(len(names), dtype=np.int64)
    rewards = res.batch.batch["rm_scores"].sum(-1).to(torch.int64).numpy()  # rows are in round order
    start = 0
    for d, stats in zip(fake.dispatches, res.rounds):
        real = Counter(d[: stats.rollouts])
        extra = np.array([real[q] for q in names])
        np.testing.assert_array_equal(extra, plan_round(counts, sums, priors, cfg))
        rows = slice(start, start + stats.rollouts)
        counts += extra
        sums += np.bincount(res.prompt_row[rows], weights=rewards[rows], minlength=len(names)).astype(np.int64)
        start += stats.rollouts
    np.testing.assert_array_equal(counts, res.counts)
    np.testing.assert_array_equal(sums, res.sums)
    assert plan_round(res.counts, res.sums, priors, cfg).sum() == 0


def test_rounds_until_cap_with_padding_and_fillers():
    # p0: V = 0.8, all +1 -> v̄ = 1, (1 - 0.8)² = 0.04 <= 1/4: prior kept, Δ̂² = 0 -> done at 4.
    # p1: V = 0.8, all -1 -> (−1 − 0.8)² − 1/k ≈ 3.24 − 1/k > 0, k_target = 16.01 − 1/Δ̂² ≈ 15.7: grows to 16.
    # p2: V = −0.8, all +1: mirror of p1, grows to 16.
    # p3: no prior -> Δ̂² = ∞, k_target = 1/sqrt(c) = 16.01: grows to 16.
    # p4: V = 0, alternating -> v̄ = 0, Δ̂² = 0: done at 4.
    # 3 of 5 prompts (60 % >= 25 %) keep needing more until capped at floor(1/sqrt(0.0039)) = 16.
    names = ["p0", "p1", "p2", "p3", "p4"]
    priors = np.array([0.8, 0.8, -0.8, NAN, 0.0])
    fake = FakeRolloutManager(
        {"p0": ALWAYS_UP, "p1": ALWAYS_DOWN, "p2": ALWAYS_UP, "p3": ALTERNATE, "p4": ALTERNATE}
    )
    cfg = OslaConfig(pad_multiple=8)
    batch, gen = split(names)
    res = generate_osla(batch, gen, priors, fake, cfg, dispatch_multiple=8)

    assert_follows_planner(fake, res, names, priors, cfg)
    # the three prompts that keep needing more end at the cap; the planner's padding (to a multiple of 8)
    # may also give p0 / p4 rollouts, in steps of 2
    assert res.counts[1:4].tolist() == [16, 16, 16]
    assert all(k >= 4 and k % 2 == 0 for k in res.counts[[0, 4]])
    # every dispatch is a multiple of 8; the cold start is 5·4 = 20 real + 4 fillers
    assert all(len(d) % 8 == 0 for d in fake.dispatches)
    assert len(fake.dispatches[0]) == 24 and res.rounds[0].rollouts == 20 and res.rounds[0].fillers == 4
    # extra rounds are padded by the planner with real rollouts, no fillers needed
    assert all(r.fillers == 0 and r.rollouts % 8 == 0 for r in res.rounds[1:])
    # fillers never reach the batch: rows per uid equal the counts
    assert len(res.batch) == res.counts.sum()
    assert rows_per_prompt(res) == {f"uid-{q}": k for q, k in zip(names, res.counts.tolist())}
    # rows keep their prompt's columns (uid and ground truth agree row by row)
    for uid, rm in zip(res.batch.non_tensor_batch["uid"], res.batch.non_tensor_batch["reward_model"]):
        assert uid == f"uid-{rm['ground_truth']}"
    assert res.prompt_row.tolist() == [int(u[-1]) for u in res.batch.non_tensor_batch["uid"]]
    # sums agree with the scripted rewards: p0 all +1 -> +k0, p1 −16, p2 +16, p3 alternating over 16 -> 0;
    # the 4 cold-start fillers are copies of p0 (their generations advance the fake's ordinals for p0,
    # all +1): counting them would break both checks
    assert res.sums[:4].tolist() == [res.counts[0], -16, 16, 0]
    rewards = res.batch.batch["rm_scores"].sum(-1)
    per_uid = defaultdict(float)
    for u, r in zip(res.batch.non_tensor_batch["uid"], rewards.tolist()):
        per_uid[u] += r
    assert [per_uid[f"uid-{q}"] for q in names] == res.sums.tolist()
    # the timing of each dispatch is summed
    assert res.timing["agent_loop/generate_sequences/max"] == pytest.approx(0.25 * len(fake.dispatches))

    m = osla_metrics(res, cfg)
    assert m["v05/k_mean"] == pytest.approx(res.counts.sum() / 5)
    assert m["v05/k_max"] == 16 and m["v05/k_min"] == res.counts.min()
    assert m["v05/extra_rollouts"] == res.counts.sum() - 20
    # rejection among the 4 prompts with a prior: p1 and p2 rejected (Δ̂² > 0), p0 and p4 kept
    assert m["v05/rejection_rate"] == pytest.approx(0.5)
    assert m["v05/rounds"] == len(res.rounds)
    assert f"timing_s/v05_round_{len(res.rounds) - 1}" in m


def test_global_halt_rule_stops_after_cold_start():
    # 8 prompts with priors that their rollouts confirm, one contradicted prompt (q7, V = 0.9, all −1):
    # 1 of 8 = 12.5 % < 25 % need more -> the whole batch halts after k_init = 4 (paper §4.1.3).
    names = [f"q{i}" for i in range(8)]
    priors = np.array([0.8] * 7 + [0.9])
    script = {q: ALWAYS_UP for q in names[:7]} | {"q7": ALWAYS_DOWN}
    fake = FakeRolloutManager(script)
    batch, gen = split(names)
    res = generate_osla(batch, gen, priors, fake, OslaConfig(), dispatch_multiple=32)
    assert len(fake.dispatches) == 1 and len(fake.dispatches[0]) == 32  # 8·4 = 32, no filler needed
    assert res.counts.tolist() == [4] * 8
    assert len(res.batch) == 32

    assert_follows_planner(fake, res, names, priors, OslaConfig())

    # with halt_fraction = 0 the contradicted prompt alone continues (per-prompt decisions) up to the cap;
    # the planner pads each extra dispatch to 32 with rollouts for the other prompts
    fake = FakeRolloutManager(script)
    cfg = OslaConfig(halt_fraction=0.0)
    res = generate_osla(batch, gen, priors, fake, cfg, dispatch_multiple=32)
    assert_follows_planner(fake, res, names, priors, cfg)
    assert res.counts[7] == 16
    assert all(len(d) % 32 == 0 for d in fake.dispatches)
    assert len(res.batch) == res.counts.sum()


def test_bad_arguments():
    batch, gen = split(["a", "b"])
    fake = FakeRolloutManager({"a": ALWAYS_UP, "b": ALWAYS_UP})
    with pytest.raises(ValueError, match="priors"):
        generate_osla(batch, gen, np.zeros(3), fake, OslaConfig())
    with pytest.raises(ValueError, match="uid"):
        b2 = DataProto.from_single_dict(batch_dict(["a", "b"]))
        generate_osla(b2, gen, np.zeros(2), fake, OslaConfig())
    bad = FakeRolloutManager({"a": lambda j: 0, "b": ALWAYS_UP})  # a 0/1 scorer under reward_map=pm1
    with pytest.raises(ValueError, match="reward_map"):
        generate_osla(batch, gen, np.zeros(2), bad, OslaConfig())


def test_update_layout_hand_values():
    # 56 rows, 2 mini-batches, dp 4, rollout.n 4: q = lcm(4, 4) = 4, mini = ceil(56 / 8)·4 = 28 -> 56, 28/4 = 7
    assert update_layout(56, 2, 4, 4) == (56, 7)
    # 57 rows: ceil(57 / 8) = 8 -> mini 32, total 64, ppo_mini_batch_size 8
    assert update_layout(57, 2, 4, 4) == (64, 8)
    # dp 8, n 4: q = 8; 100 rows in 4 mini-batches: ceil(100 / 32) = 4 -> mini 32, total 128
    assert update_layout(100, 4, 8, 4) == (128, 8)
    with pytest.raises(ValueError):
        update_layout(0, 1, 1, 1)


def test_padding_rows_are_masked_and_get_zero_advantage():
    names = ["p0", "p1", "p2"]
    priors = np.array([0.8, 0.8, NAN])
    fake = FakeRolloutManager({"p0": ALWAYS_UP, "p1": ALWAYS_DOWN, "p2": ALTERNATE})
    batch, gen = split(names)
    res = generate_osla(batch, gen, priors, fake, OslaConfig(pad_multiple=2), dispatch_multiple=2)
    out = res.batch
    n_real = len(out)
    out.batch["reward_baselines"] = torch.as_tensor(priors[res.prompt_row], dtype=torch.float32)
    out.batch["token_level_rewards"] = out.batch["rm_scores"]
    padded = pad_for_update(out, n_real + 5)
    assert len(padded) == n_real + 5
    pad = is_padding(padded)
    assert pad.sum() == 5 and not pad[:n_real].any()
    assert padded.batch["response_mask"][pad].sum() == 0
    assert all(u.startswith(PAD_UID_PREFIX) for u in padded.non_tensor_batch["uid"][pad])
    adv = compute_advantage(padded, adv_estimator="v05").batch["advantages"]
    assert adv[torch.as_tensor(pad)].abs().sum() == 0
    # the real rows are unchanged by the padding
    ref = compute_advantage(out, adv_estimator="v05").batch["advantages"]
    torch.testing.assert_close(adv[:n_real], ref)


def test_prompts_from_rows_use_the_parquet_id_rule():
    rows = batch_dict(["a", "b"])
    prompts = prompts_from_rows(rows)
    assert [p.prompt_id for p in prompts] == [1000, 1001]
    assert [p.text for p in prompts] == ["question a", "question b"]
    assert [p.answer for p in prompts] == ["a", "b"]
    # without extra_info.prompt_id the id is make_prompt_id(data_source, text)
    from v0_data.tasks.base import make_prompt_id

    rows["extra_info"] = np.array([{}, {}], dtype=object)
    assert prompts_from_rows(rows)[0].prompt_id == make_prompt_id("toy", "question a")


def test_rounds_with_different_optional_columns_concatenate():
    # an agent-loop field present in one dispatch only must not break the concatenation
    class Flaky(FakeRolloutManager):
        def generate_sequences(self, prompts):
            out = super().generate_sequences(prompts)
            if len(self.dispatches) == 1:
                out.non_tensor_batch["only_first_round"] = np.arange(len(out))
            return out

    fake = Flaky({"a": ALWAYS_DOWN, "b": ALWAYS_UP})
    batch, gen = split(["a", "b"])
    res = generate_osla(batch, gen, np.array([0.9, NAN]), fake, OslaConfig(pad_multiple=2), dispatch_multiple=2)
    assert len(fake.dispatches) > 1
    col = res.batch.non_tensor_batch["only_first_round"]
    assert col[:8].tolist() == list(range(8)) and all(v is None for v in col[8:])
