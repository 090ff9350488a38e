"""Eq. 10's per-prompt 1/k weighting under verl's token-mean (`v05_rl.verl.loss_weights`): hand-computed
values, then verl 0.9.1's own `compute_policy_loss_vanilla` / `agg_loss` over simulated data-parallel
ranks and mini-batches against the prompt-mean of `v05_rl.losses`, then the trainer's update path."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install 'v05[verl]')")
pytestmark = pytest.mark.verl

import torch  # noqa: E402

from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer  # noqa: E402

from tests.v05_rl.verl.test_osla import ALTERNATE, ALWAYS_DOWN, ALWAYS_UP, FakeRolloutManager, batch_dict  # noqa: E402
from tests.v05_rl.verl.test_trainer import FakePrior, bare_trainer  # noqa: E402
from v05_rl.losses import ppo_clip_loss, row_weights  # noqa: E402
from v05_rl.verl.loss_weights import prompt_mean_weights, verl_minibatch_of_rows  # noqa: E402
from v05_rl.verl.osla import is_padding  # noqa: E402


class ActorCfg:
    """The fields of verl's ActorConfig that `compute_policy_loss_vanilla` reads."""

    def __init__(self, dp_size: int, batch_num_tokens: int, clip=(0.2, 0.28)):
        self.clip_ratio, self.clip_ratio_low, self.clip_ratio_high = 0.2, clip[0], clip[1]
        self.global_batch_info = {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens,
                                  "global_batch_size": None, "loss_scale_factor": None}

    def get(self, key, default=None):
        return {"clip_ratio_c": 3.0}.get(key, default)


def mask_of(lengths, width):
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).to(torch.float32)  # [N, L]


def test_hand_computed_weights_and_loss():
    # prompt A: k = 2 rows of 1 and 3 tokens; prompt B: k = 4 rows of 2, 2, 1, 1 tokens; one mini-batch.
    # T = 10 tokens, U = 2·(1/2) + 4·(1/4) = 2 prompts; w_i = T / (U·k·len) = 5 / (k·len):
    #   A: 5/(2·1) = 2.5, 5/(2·3) = 5/6;  B: 5/(4·2) = 0.625, 0.625, 5/(4·1) = 1.25, 1.25
    group = np.array([0, 0, 1, 1, 1, 1])
    lengths = torch.tensor([1, 3, 2, 2, 1, 1])
    w = prompt_mean_weights(group, lengths, np.zeros(6, dtype=np.int64))
    torch.testing.assert_close(w, torch.tensor([2.5, 5 / 6, 0.625, 0.625, 1.25, 1.25], dtype=torch.float64))
    assert float((w * lengths).sum()) == pytest.approx(10.0)  # Σ w·len = T: the scale is unchanged on average

    # at ratio 1 every token loss is −A (dual clip included), so Eq. 10 is −(1/U) Σ_i A_i / k_i:
    #   A: (1 − 1)/2 = 0;  B: (0.5 + 0.5 − 0.5 + 1.5)/4 = 0.5  ->  −(0 + 0.5)/2 = −0.25
    # verl's token-mean without weights: −(1·1 − 1·3 + 0.5·2 + 0.5·2 − 0.5·1 + 1.5·1)/10 = −0.1
    adv = torch.tensor([1.0, -1.0, 0.5, 0.5, -0.5, 1.5])
    mask = mask_of(lengths, 3)
    logp = torch.zeros(6, 3)
    cfg = ActorCfg(dp_size=1, batch_num_tokens=10)

    def verl_loss(a):
        loss, _ = compute_policy_loss_vanilla(logp, logp, a[:, None] * mask, mask, "token-mean", cfg)
        return float(loss)

    assert verl_loss(adv) == pytest.approx(-0.1)
    assert verl_loss(adv * w.float()) == pytest.approx(-0.25)


def test_padding_rows_get_zero_and_do_not_count():
    # the same batch with two padding rows (length 0) anywhere: the real rows' weights are unchanged
    group = np.array([0, 0, 7, 1, 1, 1, 1, 7])
    lengths = torch.tensor([1, 3, 0, 2, 2, 1, 1, 0])
    w = prompt_mean_weights(group, lengths, np.zeros(8, dtype=np.int64))
    assert w[2] == 0 and w[7] == 0
    torch.testing.assert_close(w[[0, 1, 3, 4, 5, 6]], torch.tensor([2.5, 5 / 6, 0.625, 0.625, 1.25, 1.25], dtype=torch.float64))


def test_verl_minibatch_layout():
    # 8 rows over dp = 2 ranks (rows 0-3 -> rank 0, 4-7 -> rank 1), mini-batches of 4 rows = 2 per rank:
    # rank 0 rows 0,1 and rank 1 rows 4,5 form mini-batch 0; rows 2,3,6,7 mini-batch 1
    assert verl_minibatch_of_rows(8, 2, 4).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert verl_minibatch_of_rows(6, 1, 6).tolist() == [0] * 6
    with pytest.raises(ValueError, match="pad the batch"):
        verl_minibatch_of_rows(7, 2, 4)


@pytest.mark.parametrize("seed", range(5))
def test_verl_token_mean_with_weights_is_eq10_per_minibatch(seed):
    """verl's loss, rank by rank and mini-batch by mini-batch as its FSDP engine computes it, equals the
    prompt-mean PPO-clip loss of `v05_rl.losses` (Eq. 10, per-token ratios) on each mini-batch."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dp, n_mini, width = 2, 2, 7
    k = rng.choice([2, 4, 6, 16], size=5)  # rollouts per prompt: unequal groups
    group = np.concatenate([np.full(kk, i) for i, kk in enumerate(k)])
    n_real = group.size
    n = -(-n_real // (dp * n_mini)) * dp * n_mini  # pad to whole mini-batches on every rank
    group = np.concatenate([rng.permutation(group), np.full(n - n_real, 99)])  # rows of a prompt spread out
    lengths = torch.cat([torch.randint(1, width + 1, (n_real,), generator=g), torch.zeros(n - n_real, dtype=torch.long)])
    mask = mask_of(lengths, width)  # [N, L]
    adv = torch.randn(n, generator=g)  # [N]
    old = torch.randn(n, width, generator=g) * 0.1
    new = old + torch.randn(n, width, generator=g) * 0.3  # ratios on both sides of the clip range

    mb = verl_minibatch_of_rows(n, dp, n // n_mini)
    w = prompt_mean_weights(group, lengths, mb).float()
    chunk = n // dp
    real_group = torch.as_tensor(np.where(lengths.numpy() > 0, group, 0))
    counts = torch.bincount(real_group[lengths > 0]).to(torch.float64)  # k over the whole batch
    for b in range(n_mini):
        rows = torch.as_tensor(np.flatnonzero(mb == b))
        cfg = ActorCfg(dp_size=dp, batch_num_tokens=int(mask[rows].sum()))  # all-reduced over ranks
        rank_losses = []
        for r in range(dp):
            mine = rows[(rows >= r * chunk) & (rows < (r + 1) * chunk)]
            a = (adv[mine] * w[mine])[:, None] * mask[mine]
            loss, _ = compute_policy_loss_vanilla(old[mine], new[mine], a, mask[mine], "token-mean", cfg)
            rank_losses.append(loss)
        verl_value = torch.stack(rank_losses).mean()  # data-parallel gradient averaging

        # Eq. 10 on the mini-batch: per-token PPO-clip, each response's token-mean weighted 1/k_g
        tok, _ = ppo_clip_loss(new[rows], old[rows], adv[rows], 0.2, 0.28)  # [n_b, L]
        # verl's dual clip (−3A for A < 0) never binds at these ratios; check rather than assume
        assert bool((torch.exp(new - old)[rows] < 3.0).all())
        rw = row_weights(real_group[rows], counts, lengths[rows], "prompt-mean")  # [n_b]
        real = lengths[rows] > 0
        rw = torch.where(real, rw, torch.zeros_like(rw))
        tw = rw[:, None] * mask[rows]  # [n_b, L] per-token weights: Σ over a response's tokens = 1/k
        eq10 = (tw * tok.double()).sum() / tw.sum()
        assert float(verl_value) == pytest.approx(float(eq10), rel=1e-5, abs=1e-6)


def test_trainer_scales_advantages_for_the_update_only(monkeypatch):
    """`_train_on` hands verl's update the weighted advantages and keeps the estimator's for metrics."""
    from verl import DataProto

    names = ["p0", "p1", "p2", "p3", "p4"]
    by_text = {"question p0": 0.8, "question p1": 0.8, "question p2": -0.8, "question p3": float("nan"),
               "question p4": 0.0}
    fake = FakeRolloutManager({"p0": ALWAYS_UP, "p1": ALWAYS_DOWN, "p2": ALWAYS_UP, "p3": ALTERNATE, "p4": ALTERNATE})
    trainer = bare_trainer(fake, FakePrior(by_text), ["trainer.balance_batch=false"])
    trainer.use_reference_policy = False
    batch, result, _ = trainer._v05_rollouts(batch_dict(names), {}, {})

    def old_log_prob(b):
        n, length = b.batch["responses"].shape
        return DataProto.from_dict(tensors={"old_log_probs": torch.zeros(n, length), "entropys": torch.ones(n, length)}), 0.0

    seen = []
    trainer._compute_old_log_prob = old_log_prob
    monkeypatch.setattr(RayPPOTrainer, "_update_actor", lambda self, b: seen.append(b.batch["advantages"].clone())
                        or DataProto.from_single_dict(data={}, meta_info={"metrics": {}}))
    metrics: dict = {}
    w = trainer._eq10_weights(batch)  # [N] (no balancing: the rows keep their order in _train_on)
    out = trainer._train_on(batch, metrics, {})
    unweighted = out.batch["advantages"]
    assert len(seen) == 1 and not torch.equal(seen[0], unweighted)
    torch.testing.assert_close(seen[0], unweighted * w.float()[:, None])
    pad = torch.as_tensor(is_padding(out))
    assert w[pad].abs().sum() == 0 and bool((w[~pad] > 0).all())
    # one mini-batch (train_batch_size = ppo_mini_batch_size): w·len·k is the same constant T/U on every real
    # row, so a row of a prompt with 16 rollouts weighs 6/16 of an equally long row of a prompt with 6
    assert result.counts.tolist() == [6, 16, 16, 16, 6]  # the planner's padding gave p0, p4 two extra each
    lengths = out.batch["response_mask"].sum(-1).double()
    k_row = torch.as_tensor(result.counts[result.prompt_row], dtype=torch.float64)
    const = (w[~pad] * lengths[~pad])[: len(k_row)] * k_row
    torch.testing.assert_close(const, torch.full_like(const, float(const[0])))
    assert metrics["v05/loss_weight_max"] > metrics["v05/loss_weight_min"] > 0

    # token-mean turns the weighting off
    trainer2 = bare_trainer(FakeRolloutManager(fake.script), FakePrior(by_text),
                            ["trainer.balance_batch=false", "v05.loss_agg=token-mean"])
    trainer2.use_reference_policy = False
    trainer2._compute_old_log_prob = old_log_prob
    b2, _, _ = trainer2._v05_rollouts(batch_dict(names), {}, {})
    seen.clear()
    out2 = trainer2._train_on(b2, {}, {})
    torch.testing.assert_close(seen[0], out2.batch["advantages"])
