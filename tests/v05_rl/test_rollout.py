"""hf rollouts: per-prompt n, left padding / positions that agree with training, EOS masking, top-p."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v05_rl.policies import PolicySpec, build_policy
from v05_rl.rollout import (
    RolloutBackend,
    SamplingConfig,
    concat_batches,
    expand_n_per_prompt,
    get_backend,
    positions_from_mask,
    sample_tokens,
    sequence_logprobs,
    sequence_logprobs_and_entropy,
)

SPEC = PolicySpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
PROMPTS = ["1+2=", "47+18-5=", "3*4=", "999+1="]  # different lengths -> real left padding


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return build_policy(SPEC, seed=0)


def test_expand_n_per_prompt():
    assert expand_n_per_prompt(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert expand_n_per_prompt(3, [1, 0, 3]).tolist() == [0, 2, 2, 2]
    with pytest.raises(ValueError, match="one count per prompt"):
        expand_n_per_prompt(3, [1, 2])


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_backend_protocol_and_unknown_names(policy):
    model, tok = policy
    assert isinstance(get_backend("hf", model, tok), RolloutBackend)
    with pytest.raises(KeyError, match="hf"):
        get_backend("sglang", model, tok)


def test_vllm_backend_explains_how_to_install(policy):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:  # pragma: no cover - only on GPU machines with vLLM
        pytest.skip("vLLM is installed here")
    with pytest.raises(ImportError, match=r"pip install 'v05\[vllm\]'"):
        get_backend("vllm", "some/model", policy[1])


def test_per_prompt_n_is_honoured(policy):
    model, tok = policy
    counts = [3, 0, 1, 5]
    batch = get_backend("hf", model, tok).generate(PROMPTS, counts, SamplingConfig(max_new_tokens=5), seed=0)
    assert len(batch) == 9  # 3 + 0 + 1 + 5
    assert np.bincount(batch.prompt_index, minlength=4).tolist() == counts
    # every row starts with its own prompt after the left padding
    for row, i in enumerate(batch.prompt_index):
        ids = batch.input_ids[row, : batch.prompt_width][batch.attention_mask[row, : batch.prompt_width].bool()]
        assert tok.decode(ids.tolist()) == PROMPTS[i]


def test_logprobs_match_training_forward(policy):
    model, tok = policy
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=6)
    batch = get_backend("hf", model, tok).generate(PROMPTS, [2, 3, 1, 2], sampling, seed=1)
    recomputed = sequence_logprobs(model, batch, temperature=0.7)
    assert recomputed.shape == batch.old_logprobs.shape == batch.response_mask.shape
    assert recomputed.requires_grad
    assert torch.allclose(recomputed, batch.old_logprobs, atol=1e-4)
    # a wrong temperature gives different values, so the check above can fail
    assert not torch.allclose(sequence_logprobs(model, batch, temperature=1.0), batch.old_logprobs, atol=1e-3)


def test_eos_masking():
    # a model whose only plausible token is EOS: every response is exactly one EOS token
    model, tok = build_policy(SPEC, seed=0)
    eos = tok.eos_token_id

    class EosHead(torch.nn.Module):
        def forward(self, h):  # [B, L, H] -> [B, L, V], EOS far ahead
            out = torch.zeros(*h.shape[:-1], len(tok))
            out[..., eos] = 50.0
            return out

    model.lm_head = EosHead()
    batch = get_backend("hf", model, tok).generate(PROMPTS, 2, SamplingConfig(max_new_tokens=5), seed=0)
    assert batch.finish_reason == ["eos"] * 8
    assert batch.n_tokens.tolist() == [1] * 8
    assert batch.response_width == 1  # generation stops once every row has ended
    assert batch.response_mask.sum().item() == 8
    assert batch.responses == [""] * 8


def test_mask_after_eos_and_lengths(policy):
    model, tok = policy
    batch = get_backend("hf", model, tok).generate(PROMPTS, 8, SamplingConfig(max_new_tokens=8), seed=3)
    resp = batch.response_ids
    for row in range(len(batch)):
        n = int(batch.n_tokens[row])
        assert batch.response_mask[row, :n].eq(1).all() and batch.response_mask[row, n:].eq(0).all()
        assert batch.old_logprobs[row, n:].eq(0).all()
        if batch.finish_reason[row] == "eos":
            assert resp[row, n - 1].item() == tok.eos_token_id
            assert tok.eos_token_id not in resp[row, : n - 1].tolist()
            assert resp[row, n:].eq(tok.pad_token_id).all()
        else:
            assert n == 8
        # attention covers the real prompt and the response up to EOS, nothing after
        P = batch.prompt_width
        assert batch.attention_mask[row, P:].tolist() == batch.response_mask[row].long().tolist()


def test_seeded_generation_is_reproducible(policy):
    model, tok = policy
    be = get_backend("hf", model, tok)
    a = be.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=6), seed=11)
    b = be.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=6), seed=11)
    c = be.generate(PROMPTS, 4, SamplingConfig(max_new_tokens=6), seed=12)
    assert a.responses == b.responses and torch.equal(a.old_logprobs, b.old_logprobs)
    assert a.responses != c.responses


def test_chunked_generation_matches_logprobs(policy):
    model, tok = policy
    be = get_backend("hf", model, tok, max_batch_size=5)  # 12 rows in 3 chunks with different widths
    batch = be.generate(PROMPTS, 3, SamplingConfig(max_new_tokens=6), seed=2)
    assert len(batch) == 12
    assert torch.allclose(sequence_logprobs(model, batch), batch.old_logprobs, atol=1e-4)


def test_concat_and_select_keep_positions(policy):
    model, tok = policy
    be = get_backend("hf", model, tok)
    a = be.generate(PROMPTS[:1], 2, SamplingConfig(max_new_tokens=3), seed=0)  # narrow prompt
    b = be.generate(PROMPTS[1:2], 2, SamplingConfig(max_new_tokens=7), seed=0)  # wide prompt
    both = concat_batches([a, b], tok.pad_token_id, prompt_offsets=[0, 1])
    assert both.prompt_index.tolist() == [0, 0, 1, 1]
    assert both.responses == a.responses + b.responses
    assert torch.allclose(sequence_logprobs(model, both), both.old_logprobs, atol=1e-4)
    sub = both.select([3, 0])
    assert sub.responses == [both.responses[3], both.responses[0]]
    assert torch.allclose(sequence_logprobs(model, sub), sub.old_logprobs, atol=1e-4)


def test_entropy_is_nonnegative_and_masked(policy):
    model, tok = policy
    batch = get_backend("hf", model, tok).generate(PROMPTS, 2, SamplingConfig(max_new_tokens=4), seed=0)
    stats = sequence_logprobs_and_entropy(model, batch)
    assert (stats.entropy >= -1e-6).all()
    assert stats.entropy[batch.response_mask == 0].abs().max().item() == 0 if (batch.response_mask == 0).any() else True
    # a random-init model over V = 98 tokens is close to uniform: entropy near ln(98) = 4.58
    assert 3.5 < stats.entropy[batch.response_mask == 1].mean().item() < 4.6


def test_sample_tokens_top_p():
    # probabilities 0.5, 0.3, 0.2: top-p 0.6 keeps the first two (0.5 < 0.6 <= 0.8), never token 2
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    tokens, logp = sample_tokens(logits, 1.0, 0.6, g)
    assert set(tokens.tolist()) == {0, 1}
    share0 = (tokens == 0).float().mean().item()
    assert abs(share0 - 0.5 / 0.8) < 0.05  # renormalised: 0.5 / 0.8 = 0.625
    # reported log-probs are the untruncated ones: log 0.5 or log 0.3
    assert torch.allclose(logp[tokens == 0], torch.tensor(0.5).log())
    assert torch.allclose(logp[tokens == 1], torch.tensor(0.3).log())
    greedy, _ = sample_tokens(logits[:3], 0.0, 1.0, g)
    assert greedy.tolist() == [0, 0, 0]


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


class _ScriptedBackend:
    """Answers prompt p correctly (reversed digits) on the first `right[p.text]` of its k samples."""

    def __init__(self, prompts, right):
        self.by_text, self.right = {p.text: p for p in prompts}, right

    def generate(self, texts, n_per_prompt, sampling, *, seed=None):
        from v05_rl.rollout import _batch_from_rows

        replies = [
            self.by_text[t].answer[::-1] if j < self.right[t] else "x" for t in texts for j in range(n_per_prompt)
        ]
        rows = [(i, [5], [7], [0.0], "eos") for i in range(len(texts)) for _ in range(n_per_prompt)]
        return _batch_from_rows(rows, 0, _Decoder(replies))


class _Decoder:
    def __init__(self, texts):
        self.texts = texts

    def batch_decode(self, ids, skip_special_tokens=True):
        return list(self.texts)


def test_evaluate_policy_mean_at_k_and_levels():
    from v0_data.tasks.arith import score_arith
    from v0_data.tasks.base import Prompt
    from v05_rl.evaluate import evaluate_policy

    prompts = [
        Prompt.new("arith", "test", "1+2=", "3", level=0),
        Prompt.new("arith", "test", "4+4=", "8", level=0),
        Prompt.new("arith", "test", "47+18=", "65", level=3),
    ]
    right = {"1+2=": 4, "4+4=": 1, "47+18=": 0}  # success rates 4/4, 1/4, 0/4
    res = evaluate_policy(None, None, prompts, score_arith, k=4, backend=_ScriptedBackend(prompts, right), prompts_per_call=2)
    assert res["mean_at_k"] == pytest.approx((1.0 + 0.25 + 0.0) / 3)  # = 0.41667
    assert res["per_prompt"][prompts[1].prompt_id] == pytest.approx(0.25)
    assert res["per_level"][0]["mean_at_k"] == pytest.approx(0.625)  # (1 + 0.25) / 2
    assert res["per_level"][0]["frac_in_0_1"] == pytest.approx(0.5)  # only 4+4= is strictly between
    assert res["per_level"][3]["mean_at_k"] == 0.0
    assert res["frac_in_0_1"] == pytest.approx(1 / 3)
