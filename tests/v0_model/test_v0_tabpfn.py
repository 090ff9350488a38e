"""The `tabpfn` head, offline: a tiny randomly initialised TabPFN-v2.5 architecture of the installed
tabpfn version is saved as a checkpoint file and loaded through the head's own path (no weights are
downloaded). Its zero-initialised output projections are perturbed first: with them at zero every
attention/MLP block adds nothing, the queries never see the context, and gradients w.r.t. the
context features are exactly zero.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from v0_model.adapter import AdapterConfig
from v0_model.bank import BankConfig
from v0_model.heads.tabpfn import TABPFN_PATH_ENV, TabPFNHead, rates_to_classes, resolve_tabpfn_checkpoint
from v0_model.heads import HEADS, HeadConfig, make_head
from v0_model.model import V0Config, V0Model

F = 12  # features: 4 feature groups of 3 in the tiny model


def _need_tabpfn():
    return pytest.importorskip("tabpfn", reason="the `tabpfn` extra (pip install 'tabpfn==9.2.0') is not installed")


def _save_tiny(arch, cfg, path, architecture_name: str | None):
    """Build `arch` with `cfg`, perturb its zero matrices, save {state_dict, config[, architecture_name]}."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = arch.get_architecture(cfg)
    perturbed = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() > 1 and bool((p == 0).all()):  # the zero-initialised output projections
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
                perturbed += 1
    # 2 layers x (feature attention out, item attention out, MLP out) = 6 zero matrices
    assert perturbed == 6
    payload = {"state_dict": model.state_dict(), "config": asdict(cfg)}
    if architecture_name is not None:  # v2 checkpoints carry none
        payload["architecture_name"] = architecture_name
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny TabPFN-v2.5 classifier checkpoint in the format tabpfn's loader reads (torch.save dict)."""
    _need_tabpfn()
    from tabpfn.architectures import tabpfn_v2_5 as arch

    cfg = arch.TabPFNV2p5Config(
        max_num_classes=10, emsize=24, nlayers=2, nhead=2, num_thinking_rows=4, encoder_mlp_hidden_dim=16
    )
    path = tmp_path_factory.mktemp("tabpfn") / "tabpfn-v2.5-classifier-tiny.ckpt"
    return _save_tiny(arch, cfg, path, "tabpfn_v2_5")


@pytest.fixture(scope="module")
def tiny_v2_ckpt(tmp_path_factory):
    """The same for the TabPFN-v2 architecture (the version the paper's head accepts as a fallback)."""
    _need_tabpfn()
    from tabpfn.architectures import tabpfn_v2 as arch

    cfg = arch.TabPFNV2Config(max_num_classes=10, emsize=24, nlayers=2, nhead=2)
    path = tmp_path_factory.mktemp("tabpfn") / "tabpfn-v2-classifier-tiny.ckpt"
    return _save_tiny(arch, cfg, path, None)


def _task(seed: int, n: int = 24, m: int = 5):
    g = torch.Generator().manual_seed(seed)
    cx = torch.randn(n, F, generator=g)
    cy = torch.rand(n, generator=g)
    qx = torch.randn(m, F, generator=g)
    return cx, cy, qx


def _head(path, **kw) -> TabPFNHead:
    return make_head(HeadConfig(name="tabpfn", tabpfn_path=str(path), tabpfn_n_estimators=1, **kw), F)


# ---------------------------------------------------------------------------------- pure parts


def test_registered():
    assert "tabpfn" in HEADS.names() and "kernel" in HEADS.names()


def test_rates_to_classes_threshold_and_bernoulli():
    rates = torch.tensor([0.0, 0.49, 0.5, 1.0])
    # threshold 0.5: 0 < .5, .49 < .5, .5 >= .5, 1 >= .5
    assert rates_to_classes(rates, mode="threshold", threshold=0.5, training=True).tolist() == [0.0, 0.0, 1.0, 1.0]
    # Bernoulli draws of rates 0 and 1 are certain; in eval mode the threshold rule is used
    assert rates_to_classes(torch.tensor([0.0, 1.0]), mode="bernoulli", threshold=0.5, training=True).tolist() == [0.0, 1.0]
    assert rates_to_classes(rates, mode="bernoulli", threshold=0.5, training=False).tolist() == [0.0, 0.0, 1.0, 1.0]
    # Bernoulli(0.3) over 20000 draws: mean 0.3 within 5 standard errors (sqrt(.21/20000) = 0.0032)
    draws = rates_to_classes(torch.full((20000,), 0.3), mode="bernoulli", threshold=0.5, training=True)
    assert abs(draws.mean().item() - 0.3) < 0.016


def test_config_validation():
    with pytest.raises(ValueError, match="tabpfn_labels"):
        HeadConfig(tabpfn_labels="soft")
    with pytest.raises(ValueError, match="tabpfn_n_estimators"):
        HeadConfig(tabpfn_n_estimators=-1)


def test_missing_checkpoint_says_how_to_get_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(TABPFN_PATH_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        make_head(HeadConfig(name="tabpfn"), F)
    msg = str(e.value)
    for needle in ("tabpfn-v2.5-classifier-v2.5_default.ckpt", "huggingface.co/Prior-Labs/tabpfn_2_5", "head.tabpfn_path", TABPFN_PATH_ENV):
        assert needle in msg
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        make_head(HeadConfig(name="tabpfn", tabpfn_path=str(missing)), F)
    assert str(missing) in str(e.value) and "never downloads" in str(e.value)
    with pytest.raises(FileNotFoundError, match="without a TabPFN classifier checkpoint"):
        resolve_tabpfn_checkpoint(tmp_path)  # an empty directory
    assert not missing.exists()  # nothing was fetched


def test_checkpoint_from_env_and_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(TABPFN_PATH_ENV, raising=False)
    f = tmp_path / "tabpfn-v2.5-classifier-v2.5_default.ckpt"
    f.write_bytes(b"x")
    (tmp_path / "tabpfn-v2-classifier.ckpt").write_bytes(b"x")
    assert resolve_tabpfn_checkpoint(tmp_path) == f.resolve()  # v2.5 default preferred over v2
    # two unknown classifier files in a directory are ambiguous
    amb = tmp_path / "amb"
    amb.mkdir()
    (amb / "a-classifier.ckpt").write_bytes(b"x")
    (amb / "b-classifier.ckpt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="several"):
        resolve_tabpfn_checkpoint(amb)
    monkeypatch.setenv(TABPFN_PATH_ENV, str(f))
    assert resolve_tabpfn_checkpoint("") == f.resolve()
    # a recorded path from another machine falls back to the environment variable
    assert resolve_tabpfn_checkpoint(tmp_path / "gone" / "x.ckpt") == f.resolve()


# ---------------------------------------------------------------------------- with the tiny model


@pytest.mark.parametrize("which", ["v2.5", "v2"])
def test_probabilities_and_gradients(which, request):
    ckpt = request.getfixturevalue("tiny_ckpt" if which == "v2.5" else "tiny_v2_ckpt")
    torch.manual_seed(0)
    head = _head(ckpt)
    cx, cy, qx = _task(1)
    cx.requires_grad_(True)
    qx.requires_grad_(True)
    logits = head(cx, cy, qx)
    assert logits.shape == (5,) and logits.dtype == torch.float32
    p = torch.sigmoid(logits)
    assert torch.isfinite(p).all() and ((p > 0) & (p < 1)).all()
    logits.sum().backward()
    assert cx.grad.abs().sum() > 0 and qx.grad.abs().sum() > 0
    assert torch.isfinite(cx.grad).all() and torch.isfinite(qx.grad).all()
    assert head.cal_scale.grad is not None and head.cal_bias.grad.item() == pytest.approx(5.0)  # d sum / d b = M
    # TabPFN itself is frozen and not part of the head's parameters / state
    for m in head._classifiers["cpu"].models_:
        assert all(not q.requires_grad and q.grad is None for q in m.parameters())
    assert set(head.state_dict()) == {"cal_scale", "cal_bias"}


def test_deterministic_and_uses_the_context(tiny_ckpt):
    head = _head(tiny_ckpt).eval()
    cx, cy, qx = _task(2)
    with torch.no_grad():
        a = head(cx, cy, qx)
        b = head(cx, cy, qx)
        flipped = head(cx, 1.0 - cy, qx)  # every context class swapped
        one = head(cx, cy, qx[:1])  # a single query
    torch.testing.assert_close(a, b)
    assert (a - flipped).abs().max() > 1e-4
    assert one.shape == (1,) and torch.isfinite(one).all()


def test_single_class_context_still_two_classes(tiny_ckpt):
    head = _head(tiny_ckpt).eval()
    cx, _, qx = _task(3)
    with torch.no_grad():
        p = torch.sigmoid(head(cx, torch.ones(cx.shape[0]), qx))
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()


def test_v0_model_forward_backward(tiny_ckpt):
    torch.manual_seed(0)
    d = 10
    # 2 queries x width 6 = 12 features (append_pooled off), matching the tiny TabPFN's F
    cfg = V0Config(
        adapter=AdapterConfig(n_queries=2, width=6, n_heads=3, n_layers=1, bottleneck=8, append_pooled=False),
        head=HeadConfig(name="tabpfn", tabpfn_path=str(tiny_ckpt), tabpfn_n_estimators=2, tabpfn_labels="bernoulli"),
        bank=BankConfig(enabled=False),
    )
    model = V0Model(cfg, input_dim=d)
    assert model.adapter.out_features == F
    lengths = torch.tensor([3, 5, 2, 4, 1, 2, 3, 4, 2, 3])
    tokens = torch.randn(int(lengths.sum()), d)
    pooled = torch.randn(len(lengths), d)
    feats = model.adapter(tokens, lengths, pooled)  # [10, F]
    ctx_y = torch.tensor([0.0, 1.0, 0.25, 0.75, 1.0, 0.0, 0.5])
    logits = model.logits(feats[:7], ctx_y, feats[7:])  # [3]
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([1.0, 0.0, 1.0]))
    loss.backward()
    grads = [p.grad for p in model.adapter.parameters() if p.requires_grad]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert model.adapter.static_queries.grad.abs().sum() > 0


def test_v0_checkpoint_round_trip(tiny_ckpt, tmp_path):
    """A V0 checkpoint with the tabpfn head stores only a, b and the TabPFN file's path, and reloads."""
    from v0_model.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = V0Config(
        adapter=AdapterConfig(n_queries=2, width=6, n_heads=3, n_layers=1, bottleneck=8, append_pooled=False),
        head=HeadConfig(name="tabpfn", tabpfn_path=str(tiny_ckpt), tabpfn_n_estimators=1),
        bank=BankConfig(enabled=False),
    )
    model = V0Model(cfg, input_dim=4).eval()
    with torch.no_grad():
        model.head.cal_bias.fill_(0.3)
    cx, cy, qx = _task(4)
    with torch.no_grad():
        before = model.logits(cx, cy, qx)
    out = save_checkpoint(tmp_path / "v0.pt", model, backbone_id="test")
    loaded = load_checkpoint(out)
    assert loaded.meta["head"]["fitted"]["tabpfn_checkpoint"] == tiny_ckpt.name
    assert loaded.model.cfg.head.tabpfn_path == str(tiny_ckpt)
    with torch.no_grad():
        after = loaded.model.logits(cx, cy, qx)
    torch.testing.assert_close(after, before)
