"""Unit tests of V0's pure parts: adapter, pooling, kernel head, loss, schedule, metrics (no backbone needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v0_model import metrics as M
from v0_model.adapter import AdapterConfig, ResidualQueryAdapter, pad_packed
from v0_model.backbone import last_token_pool, mean_pool
from v0_model.heads import HEADS, HeadConfig, KernelHead, gp_posterior, make_head, probit_logit
from v0_model.train import TrainConfig, cosine_lr, v0_loss


# ------------------------------------------------------------------------------------------- adapter


def test_default_adapter_has_paper_sizes():
    cfg = AdapterConfig()
    # 168 queries x width 6 = 1008 features, 3 layers of 3 heads
    assert (cfg.n_queries, cfg.width, cfg.n_layers, cfg.n_heads, cfg.out_features) == (168, 6, 3, 3, 1008)


def test_adapter_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="not divisible"):
        AdapterConfig(width=6, n_heads=4)


def test_adapter_shapes_and_zero_initialised_offset():
    torch.manual_seed(0)
    ad = ResidualQueryAdapter(input_dim=10, cfg=AdapterConfig(n_queries=5, width=6, n_heads=3, n_layers=2, bottleneck=8))
    lengths = torch.tensor([3, 1, 4])
    tokens = torch.randn(int(lengths.sum()), 10)
    pooled = torch.randn(3, 10)
    out = ad(tokens, lengths, pooled)
    # 5 queries x width 6 = 30 query features, then the 10-d layer-normalised pooled embedding appended
    assert out.shape == (3, 5 * 6 + 10) == (3, ad.out_features)
    torch.testing.assert_close(out[:, 30:], torch.nn.functional.layer_norm(pooled, (10,)))
    paper = ResidualQueryAdapter(input_dim=10, cfg=AdapterConfig(n_queries=5, append_pooled=False))
    assert paper(tokens, lengths, pooled).shape == (3, 30) and paper.out_features == 30
    # the last offset layer starts at zero, so the per-prompt offset is exactly zero for any input
    assert torch.equal(ad.query_offset(pooled), torch.zeros(3, 5, 6))
    # ...and it still receives gradient, so it can learn
    out.pow(2).sum().backward()
    assert ad.offset[-1].weight.grad.abs().sum() > 0


def test_pad_packed_places_rows():
    x = torch.arange(5.0).unsqueeze(1)  # rows 0..4
    padded, mask = pad_packed(x, torch.tensor([2, 3]))
    # prompt 0 = rows [0, 1] + padding, prompt 1 = rows [2, 3, 4]
    assert padded[:, :, 0].tolist() == [[0.0, 1.0, 0.0], [2.0, 3.0, 4.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]


def test_adapter_ignores_padding():
    """A prompt's features must not depend on the other prompts in its batch (padding is masked)."""
    torch.manual_seed(1)
    ad = ResidualQueryAdapter(input_dim=7, cfg=AdapterConfig(n_queries=4, width=6, n_heads=3, n_layers=3, bottleneck=8)).eval()
    a, b = torch.randn(2, 7), torch.randn(6, 7)
    pa, pb = torch.randn(1, 7), torch.randn(1, 7)
    alone = ad(a, torch.tensor([2]), pa)
    batched = ad(torch.cat([a, b]), torch.tensor([2, 6]), torch.cat([pa, pb]))
    torch.testing.assert_close(alone[0], batched[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- pooling


def test_mean_and_last_token_pool_by_hand():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]], [[100.0], [2.0], [4.0]]])  # [2, 3, 1]
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # masked means: (1 + 3) / 2 = 2; (100 + 2 + 4) / 3 = 35.333
    assert mean_pool(hidden, right)[:, 0].tolist() == pytest.approx([2.0, 106.0 / 3])
    # last real token: right padding -> position 1 (3.0); full row -> position 2 (4.0)
    assert last_token_pool(hidden, right)[:, 0].tolist() == [3.0, 4.0]
    left = torch.tensor([[0, 1, 1], [0, 0, 1]])
    # left padding: last real token is always the final position -> 100.0 and 4.0
    assert last_token_pool(hidden, left)[:, 0].tolist() == [100.0, 4.0]


# ---------------------------------------------------------------------------------------------- heads


def test_head_registry_lists_names():
    assert "kernel" in HEADS.names()
    with pytest.raises(KeyError, match="valid names: .*kernel"):
        make_head(HeadConfig(name="nope"), 4)


def test_gp_posterior_matches_direct_formula():
    """Two context points, RBF only: compare with the textbook formulas evaluated in numpy."""
    cx = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    qx = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    z = torch.tensor([1.0, -1.0], dtype=torch.float64)
    sf, sn, ell, m = 2.0, 0.5, 1.0, 0.25
    mu, var = gp_posterior(cx, z, qx, ctx_mean=torch.tensor(m, dtype=torch.float64), query_mean=torch.tensor(m, dtype=torch.float64), length_scale=torch.tensor(ell),
                           signal_var=torch.tensor(sf), linear_var=torch.tensor(0.0), noise_var=torch.tensor(sn), jitter=0.0)
    # k(a, b) = sf * exp(-|a-b|^2 / (2 * ell^2 * F)), F = 2: |x0-x1|^2 = 2 -> exp(-0.5); |q-xi|^2 = 0.5 -> exp(-0.125)
    K = np.array([[sf + sn, sf * math.exp(-0.5)], [sf * math.exp(-0.5), sf + sn]])
    kq = np.array([sf * math.exp(-0.125)] * 2)
    mu_ref = m + kq @ np.linalg.solve(K, np.array([1.0, -1.0]) - m)
    var_ref = sf - kq @ np.linalg.solve(K, kq)
    assert float(mu[0]) == pytest.approx(mu_ref, abs=1e-9)
    assert float(var[0]) == pytest.approx(var_ref, abs=1e-9)
    # symmetric query between +1 and -1 observations: mean is pulled from m toward 0 (here below m)
    assert mu_ref < m


def test_probit_logit_limits():
    # zero variance -> the mean itself; mean 0 -> 0 whatever the variance; variance shrinks |logit|
    assert float(probit_logit(torch.tensor(2.0), torch.tensor(0.0))) == pytest.approx(2.0)
    assert float(probit_logit(torch.tensor(0.0), torch.tensor(5.0))) == 0.0
    # 2 / sqrt(1 + pi * 8 / 8) = 2 / sqrt(1 + pi) = 0.98277
    assert float(probit_logit(torch.tensor(2.0), torch.tensor(8.0))) == pytest.approx(2 / math.sqrt(1 + math.pi), rel=1e-6)


def _synthetic(n, F, rng):
    x = rng.normal(size=(n, F))
    p = 1 / (1 + np.exp(-2.5 * x[:, 0]))  # success probability depends on feature 0 only
    rate = rng.binomial(10, p) / 10.0  # measured over 10 rollouts
    return torch.tensor(x, dtype=torch.float32), torch.tensor(rate, dtype=torch.float32), p


def test_kernel_head_is_calibrated_and_ranks_on_synthetic_data():
    rng = np.random.default_rng(0)
    cx, cy, _ = _synthetic(256, 8, rng)
    qx, qy, qp = _synthetic(2000, 8, rng)
    head = KernelHead(HeadConfig(signal_var=1.0), 8)  # prior on the scale of the synthetic logits
    with torch.no_grad():
        pred = torch.sigmoid(head(cx, cy, qx)).numpy()
    base = np.full_like(pred, float(cy.mean()))
    # ranking: the head recovers the ordering of true probabilities; the constant cannot (AUC 0.5)
    assert M.auc(qp >= 0.5, pred) > 0.85
    # calibration: ECE against the measured rates is small and the Brier score beats the context mean
    assert M.ece(qy.numpy(), pred) < 0.06
    assert M.brier(qy.numpy(), pred) < M.brier(qy.numpy(), base) - 0.02


def test_kernel_head_gradients_reach_context_query_and_parameters():
    rng = np.random.default_rng(1)
    cx, cy, _ = _synthetic(32, 5, rng)
    qx, _, _ = _synthetic(6, 5, rng)
    cx.requires_grad_(True)
    qx.requires_grad_(True)
    head = KernelHead(HeadConfig(), 5)
    head(cx, cy, qx).sum().backward()
    for g in (cx.grad, qx.grad, head.log_length.grad, head.log_noise.grad, head.cal_scale.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_kernel_head_single_class_context_returns_prior_mean():
    # all context rates 0.2: z - m = 0, so the posterior mean is m = logit(0.2) and p_hat ~ 0.2 (shrunk by variance)
    head = KernelHead(HeadConfig(), 3)
    cx, qx = torch.randn(10, 3), torch.randn(4, 3)
    with torch.no_grad():
        p = torch.sigmoid(head(cx, torch.full((10,), 0.2), qx))
    assert torch.all(p < 0.5) and torch.all(p > 0.2 - 1e-6)


# ----------------------------------------------------------------------------------- loss / schedule


def test_v0_loss_by_hand():
    logits = torch.tensor([2.0, 0.0])  # one pair: positive 2, negative 0
    targets = torch.tensor([1.0, 0.0])
    loss, stats = v0_loss(logits, targets, n_pairs=1, bt_weight=0.25)
    bt = math.log1p(math.exp(-2.0))  # -log sigmoid(2 - 0) = 0.126928
    ce = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2  # (BCE(2, 1) + BCE(0, 0)) / 2 = 0.410038
    assert float(loss) == pytest.approx(0.25 * bt + 0.75 * ce, rel=1e-6)  # 0.339260
    assert stats["pair_acc"] == 1.0


def test_cosine_lr_warmup_and_decay():
    # total 100, warm-up 5 % = 5 steps: step 0 -> 1/5; step 5 starts the cosine at 1; the end -> 0
    assert cosine_lr(0, 100, 0.05) == pytest.approx(0.2)
    assert cosine_lr(4, 100, 0.05) == pytest.approx(1.0)
    assert cosine_lr(5, 100, 0.05) == pytest.approx(1.0)
    # halfway through the cosine part: (52.5 - 5) / 95 = 0.5 -> 0.5 * (1 + cos(pi / 2)) = 0.5
    assert cosine_lr(52, 100, 0.05) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert cosine_lr(100, 100, 0.05) == pytest.approx(0.0)


def test_train_config_validation():
    with pytest.raises(ValueError, match="bt_weight"):
        TrainConfig(bt_weight=1.5)


# ---------------------------------------------------------------------------------------------- metrics


def test_auc_with_ties_by_hand():
    # positive scores {0.9, 0.4}, negative {0.1, 0.4}: pairs 0.9>0.1, 0.9>0.4, 0.4>0.1, 0.4=0.4 (half) -> 3.5 / 4
    assert M.auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.4])) == pytest.approx(0.875)
    assert math.isnan(M.auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_gauc_weights_groups_by_size_and_skips_single_class():
    groups = np.array(["a", "a", "a", "a", "b", "b", "c"])
    labels = np.array([1, 0, 1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.1, 0.4, 0.4, 0.2, 0.8, 0.5])
    # a: 0.875 (4 rows), b: 0.0 (2 rows), c: one class -> skipped; (0.875 * 4 + 0 * 2) / 6 = 0.58333
    g, used = M.gauc(groups, labels, scores)
    assert used == 2 and g == pytest.approx(3.5 / 6)


def test_pair_accuracy_by_hand():
    models = ["m", "m", "m", "n"]
    steps = np.array([1, 2, 3, 1])
    pids = np.array([7, 7, 7, 7])
    rates = np.array([0.1, 0.5, 0.5, 0.9])
    preds = np.array([0.2, 0.6, 0.1, 0.5])
    # model m pairs with different rates: (1,2): true up, pred up -> right; (1,3): true up, pred down -> wrong;
    # (2,3) equal rates -> skipped; model n has one row -> no pair. 1 / 2
    acc, n = M.pair_accuracy(models, steps, pids, rates, preds)
    assert (acc, n) == (0.5, 2)


def test_brier_and_ece_by_hand():
    rates = np.array([0.0, 1.0, 0.5, 0.5])
    preds = np.array([0.05, 0.95, 0.45, 0.65])
    # Brier: (0.0025 + 0.0025 + 0.0025 + 0.0225) / 4 = 0.0075
    assert M.brier(rates, preds) == pytest.approx(0.0075)
    # 10 bins: {0.05}->|0.05-0|, {0.95}->|0.95-1|, {0.45}->|0.45-0.5|, {0.65}->|0.65-0.5|; each weight 1/4
    # ECE = (0.05 + 0.05 + 0.05 + 0.15) / 4 = 0.075
    assert M.ece(rates, preds) == pytest.approx(0.075)


def test_knn_and_ridge_baselines_by_hand():
    ctx = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    rates = np.array([1.0, 0.5, 0.0])
    # query along x: its 2 nearest (cosine) are rows 0 and 1 -> (1.0 + 0.5) / 2
    assert M.knn_predict(ctx, rates, np.array([[1.0, 0.0]]), k=2)[0] == pytest.approx(0.75)
    # ridge with tiny alpha on an exactly linear target y = 0.5 * x0 + 0.25 recovers it
    x = np.array([[0.0], [1.0], [0.5], [0.2]])
    y = 0.5 * x[:, 0] + 0.25
    assert M.ridge_fit_predict(x, y, np.array([[0.8]]), alpha=1e-9)[0] == pytest.approx(0.65)


def test_calibration_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random(200)
    path = M.calibration_plot({"v0": (p, p)}, tmp_path / "cal.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
