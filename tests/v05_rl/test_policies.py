"""Tiny Qwen3 policies: char tokenizer, family sizes, save/load by path, cache, a short warm start."""

from __future__ import annotations

import json

import pytest
import torch

from v05_rl.policies import (
    FAMILY,
    POLICIES,
    PolicySpec,
    WarmStartConfig,
    build_char_tokenizer,
    build_policy,
    encode_sft_batch,
    ensure_policy,
    load_policy,
    n_parameters,
    sft_loss,
    warm_start,
)

SPEC = PolicySpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    ids = tok("47+18=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6  # one token per character
    assert tok.decode(ids) == "47+18="
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert len(tok) == 98  # <pad>, <eos>, <unk> + 95 printable ASCII characters
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)  # no trust_remote_code
    assert loaded("47+18=", add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == "47+18="
    assert loaded("é", add_special_tokens=False)["input_ids"] == [loaded.unk_token_id]


def test_family_sizes():
    assert set(FAMILY) <= set(POLICIES.names())
    sizes = {name: n_parameters(build_policy(POLICIES.get(name).spec)[0]) for name in FAMILY}
    assert 0.05e6 < sizes["tiny-s"] < 0.2e6
    assert 0.7e6 < sizes["tiny-m"] < 1.5e6
    assert 2.0e6 < sizes["tiny-l"] < 4.0e6


def test_saved_policy_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = build_policy(SPEC, seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen3ForCausalLM"
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tok2("12+3=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)
    # the project loader takes the same path
    m3, t3 = load_policy(str(tmp_path))
    assert not m3.training and t3.pad_token_id == tok.pad_token_id


def test_loader_refuses_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tiny-s"):
        load_policy("no-such-policy")


def test_sft_labels_cover_answer_and_eos_only():
    tok = build_char_tokenizer()
    ids, mask, labels = encode_sft_batch(tok, ["1+2=", "47+18="], ["3", "56"])
    # row 0: "1+2=" (4) + "3" + <eos> = 6 tokens, padded to 8 ("47+18=" + "56" + <eos>)
    assert ids.shape == (2, 9)
    assert mask[0].tolist() == [1] * 6 + [0] * 3
    assert labels[0].tolist() == [-100] * 4 + [tok.convert_tokens_to_ids("3"), tok.eos_token_id] + [-100] * 3
    assert (labels[1] != -100).sum().item() == 3  # "5", "6", <eos>


def test_short_warm_start_lowers_the_loss():
    model, tok = build_policy(SPEC, seed=0)
    ids, mask, labels = encode_sft_batch(tok, ["1+2=", "4+4="], ["3", "8"])
    with torch.no_grad():
        before = sft_loss(model, ids, mask, labels).item()
    log: list[float] = []
    cfg = WarmStartConfig(steps=40, batch_size=32, lr=3e-3, arith_spec="n_prompts=300,levels=0-1")
    warm_start(model, tok, cfg, progress=False, log=log)
    assert len(log) == 40
    assert sum(log[-5:]) / 5 < sum(log[:5]) / 5 - 0.5  # the model learns the answer format
    with torch.no_grad():
        assert sft_loss(model, ids, mask, labels).item() < before


def test_ensure_policy_caches_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("V05_CACHE", str(tmp_path))
    over = {"steps": 2, "batch_size": 8, "arith_spec": "n_prompts=50"}
    path = ensure_policy("tiny-s", progress=False, overrides=over)
    assert path.parent == tmp_path / "policies" and path.name.startswith("tiny-s-")
    info = json.loads((path / "v05_policy.json").read_text())
    assert info["recipe"]["warm_start"]["steps"] == 2
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_policy("tiny-s", progress=False, overrides=over) == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    other = ensure_policy("tiny-s", progress=False, overrides={**over, "seed": 1})
    assert other != path  # a different recipe is a different cache entry
