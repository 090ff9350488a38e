"""The arith task source: exact answers, answer formats, disjoint splits, scoring that never raises."""

from __future__ import annotations

import pytest

from v0_data.tasks import get_source, source_names
from v0_data.tasks.arith import (
    LEVELS,
    ArithConfig,
    evaluate_expression,
    format_answer,
    generate,
    score_arith,
    split_of,
)


def test_registered_as_arith():
    assert "arith" in source_names()
    prompts = get_source("arith")().load("n_prompts=50,seed=3", split="train")
    assert len(prompts) == 50
    assert all(p.dataset == "arith" and p.split == "train" for p in prompts)


@pytest.mark.parametrize(
    "text, value",
    [
        ("47+18=", 65),  # 47 + 18 = 65
        ("47-18=", 29),  # 47 - 18 = 29
        ("3+5-2=", 6),  # 3 + 5 - 2 = 6
        ("47*8=", 376),  # 47 * 8 = 376
        ("2+3*4=", 14),  # 3*4 = 12 first, then 2 + 12 = 14
        ("10-2*3+1=", 5),  # 10 - 6 + 1 = 5
    ],
)
def test_evaluate_expression(text, value):
    assert evaluate_expression(text) == value


def test_answers_are_exact_and_meta_has_difficulty():
    for p in generate(ArithConfig(n_prompts=300, seed=1), "train"):
        assert int(p.answer) == evaluate_expression(p.text)
        assert int(p.answer) >= 0  # subtraction results are kept non-negative
        assert p.text.endswith("=")
        level = LEVELS[p.meta["level"]]
        assert p.text.count("+") + p.text.count("-") + p.text.count("*") == level.n_operands - 1
        assert p.meta["answer_digits"] == len(p.answer)
        assert p.meta["answer_format"] == "reversed"


def test_format_answer():
    assert format_answer(65) == "56"  # digits least significant first
    assert format_answer(65, "plain") == "65"
    assert format_answer(-120) == "-021"  # sign first, then 0,2,1
    assert format_answer(7) == "7"


def test_splits_never_share_a_prompt_and_follow_the_hash():
    cfg = ArithConfig(n_prompts=1500, seed=0)
    train = {p.text for p in generate(cfg, "train")}
    test = {p.text for p in generate(cfg, "test")}
    assert not train & test
    # the split is a property of the text, not of the seed or the size
    other_seed = generate(ArithConfig(n_prompts=400, seed=99), "test")
    assert all(split_of(p.text, 0.2) == "test" for p in other_seed)
    assert not {p.text for p in other_seed} & train


def test_seeded_and_distinct():
    a = generate(ArithConfig(n_prompts=200, seed=5), "train")
    b = generate(ArithConfig(n_prompts=200, seed=5), "train")
    c = generate(ArithConfig(n_prompts=200, seed=6), "train")
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in a] != [p.text for p in c]
    assert len({p.prompt_id for p in a}) == len(a)


def test_small_levels_run_out_gracefully():
    # level 0 (1-digit + 1-digit) has 10 * 10 = 100 problems; about 20 % of them are test problems
    test = generate(ArithConfig(n_prompts=500, levels=(0,)), "test")
    assert 8 <= len(test) <= 35
    assert len({p.text for p in test}) == len(test)


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("56", "65", (1, "correct")),  # reversed "56" reads 65
        ("65", "65", (-1, "wrong answer")),  # reversed "65" reads 56
        ("answer: 12 then 56", "65", (1, "correct")),  # the last integer counts
        ("", "65", (-1, "no integer in response")),
        ("abc", "65", (-1, "no integer in response")),
        ("56", "not a number", (-1, "bad ground truth")),
        ("-021", "-120", (1, "correct")),
        ("0", "0", (1, "correct")),
        ("056", "650", (1, "correct")),  # "056" reversed is "650"
    ],
)
def test_score_arith(response, answer, expected):
    assert score_arith(response, answer) == expected


def test_score_plain_and_never_raises():
    assert score_arith("65", "65", answer_format="plain") == (1, "correct")
    for junk in (None, "∞", "--", "1" * 500):
        reward, reason = score_arith(junk, "65")  # type: ignore[arg-type]
        assert reward == -1 and isinstance(reason, str)


def test_bad_config_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="levels"):
        ArithConfig(levels=(99,))
    with pytest.raises(ValueError, match="unknown keys"):
        ArithConfig.from_spec({"n_prompt": 3})
    assert ArithConfig.from_spec("levels=0-2 5,seed=2").levels == (0, 1, 2, 5)
