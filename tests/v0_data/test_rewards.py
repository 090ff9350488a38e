"""Rewards: ±1 with a reason, math-verify in worker processes with timeouts, verl's compute_score."""

from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

from v0_data import rewards as R
from v0_data.tasks import arith

# (response, ground truth, expected reward, what it checks)
MATH_TABLE = [
    # equivalent answers: +1
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1, "decimal vs fraction"),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1, "slash vs \\frac"),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1, "\\dfrac vs decimal"),
    (r"\boxed{\tfrac{1}{3}}", r"\frac13", 1, "\\tfrac vs \\frac13"),
    (r"\boxed{1.5}", r"\frac{3}{2}", 1, "1.5 = 3/2"),
    (r"\boxed{3.0}", "3", 1, "trailing .0"),
    (r"\boxed{10\text{ cm}}", "10", 1, "unit text"),
    (r"\boxed{5 \text{ dollars}}", "5", 1, "unit words"),
    (r"\boxed{90^\circ}", "90", 1, "degrees"),
    (r"\boxed{\$5}", "5", 1, "currency sign"),
    (r"\boxed{1,000}", "1000", 1, "thousands separator"),
    (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", 1, "set order"),
    (r"\boxed{[1, 2)}", "[1,2)", 1, "half-open interval"),
    (r"\boxed{(-\infty, 2]}", r"(-\infty,2]", 1, "unbounded interval"),
    (r"\boxed{x \in [0, 1]}", "[0,1]", 1, "membership vs interval"),
    (r"\boxed{\left(\frac{1}{2}, 3\right)}", "(0.5,3)", 1, "\\left( tuple with a fraction"),
    (r"\boxed{-3}", "-3", 1, "negative integer"),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1, "negative fraction vs decimal"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1, "rationalised surd"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1, "expanded polynomial"),
    (r"\boxed{x = 3}", "3", 1, "equation x = value"),
    (r"\boxed{\boxed{5}}", "5", 1, "nested \\boxed"),
    (r"first \boxed{4}, corrected: \boxed{5}", "5", 1, "the last \\boxed counts"),
    (r"\boxed { 9 }", "9", 1, "space before the brace"),
    (r"\fbox{9}", "9", 1, "\\fbox"),
    ("The final answer is 7.", "7", 1, "no \\boxed: whole response"),
    (r"\boxed{12}", r"\boxed{12}", 1, "boxed ground truth"),
    # non-equivalent answers: -1
    (r"\boxed{3}", "-3", -1, "sign"),
    (r"\boxed{-7}", "7", -1, "sign (other way)"),
    (r"\boxed{(1,2]}", "[1,2)", -1, "interval ends swapped"),
    (r"\boxed{0.333}", r"\frac{1}{3}", -1, "rounded decimal"),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", -1, "inverted fraction"),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", -1, "missing set element"),
    (r"\boxed{2\pi}", r"\pi", -1, "factor 2"),
    (r"first \boxed{5}, corrected: \boxed{4}", "5", -1, "an earlier \\boxed does not count"),
    # unusable responses: -1 with a reason, never an exception
    (r"\boxed{}", "5", -1, "empty \\boxed"),
    ("", "5", -1, "empty response"),
    ("   \n", "5", -1, "blank response"),
    ("I have no idea.", "5", -1, "no answer at all"),
    (r"\boxed{5", "5", -1, "unclosed \\boxed (truncated)"),
]


@pytest.fixture(scope="module")
def table_scores():
    responses = [row[0] for row in MATH_TABLE]
    answers = [row[1] for row in MATH_TABLE]
    return R.score_batch("math", responses, answers)


@pytest.mark.parametrize("i", range(len(MATH_TABLE)), ids=[row[3] for row in MATH_TABLE])
def test_math_table(table_scores, i):
    response, gold, expected, what = MATH_TABLE[i]
    reward, reason = int(table_scores.rewards[i]), table_scores.reasons[i]
    assert reward == expected, f"{what}: {response!r} vs {gold!r} -> {reward} ({reason})"
    assert reason, "every reward carries a reason"


def test_batch_types_and_reasons(table_scores):
    n = len(MATH_TABLE)
    assert table_scores.rewards.dtype == np.int8 and table_scores.rewards.shape == (n,)
    assert set(np.unique(table_scores.rewards)) <= {-1, 1}
    assert len(table_scores.reasons) == n
    by_what = {row[3]: table_scores.reasons[i] for i, row in enumerate(MATH_TABLE)}
    assert by_what["empty response"] == "empty response"
    assert by_what["empty \\boxed"] == "empty \\boxed{}"
    assert "no parseable answer" in by_what["no answer at all"]
    assert by_what["sign"].startswith("wrong")


def test_inline_mode_agrees_with_pool(table_scores):
    """use_pool=False (in-process, main thread, signal timeouts) gives the same rewards."""
    old = R.math_reward_config()
    R.configure_math_reward(R.MathRewardConfig(use_pool=False))
    try:
        picks = [0, 2, 11, 21, 27, 29, 38]
        inline = R.score_batch("math", [MATH_TABLE[i][0] for i in picks], [MATH_TABLE[i][1] for i in picks])
    finally:
        R.configure_math_reward(old)
    assert inline.rewards.tolist() == [int(table_scores.rewards[i]) for i in picks]


def test_scoring_from_a_thread_works():
    """The reason for the worker processes: math-verify's signal.alarm fails off the main thread."""
    out = {}

    def work():
        out["batch"] = R.score_batch("math", [r"\boxed{\frac{1}{2}}", r"\boxed{2}"], ["0.5", "3"])

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert out["batch"].rewards.tolist() == [1, -1]


def test_missing_ground_truth_and_list_answers():
    batch = R.score_batch("math", [r"\boxed{4}"] * 4, [None, "", ["4"], float("nan")])
    assert batch.rewards.tolist() == [-1, -1, 1, -1]
    assert batch.reasons[0] == "no ground truth" and batch.reasons[3] == "no ground truth"


def test_last_boxed_extraction():
    assert R.last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert R.last_boxed(r"\boxed{\boxed{\boxed{7}}}") == "7"
    assert R.last_boxed(r"\boxed{x \boxed{2}}") == r"x \boxed{2}"  # only a box that is the whole content unwraps
    assert R.last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"  # escaped braces do not close the box
    assert R.last_boxed(r"\boxed{3} then \boxed{4") == "3"  # an unclosed box is ignored
    assert R.last_boxed("no box here") is None
    assert R.last_boxed(r"\boxed{}") == ""


@pytest.mark.slow
def test_signal_timeout_inside_worker_gives_minus_one():
    """A comparison that sympy cannot finish in time: math-verify's alarm fires inside the worker."""
    old = R.math_reward_config()
    R.configure_math_reward(R.MathRewardConfig(timeout_s=1))
    try:
        start = time.monotonic()
        batch = R.score_batch("math", [r"\boxed{2^{2^{2^{20}}}}"], ["3"])
        elapsed = time.monotonic() - start
    finally:
        R.configure_math_reward(old)
    assert batch.rewards.tolist() == [-1]
    assert "timeout" in batch.reasons[0], batch.reasons[0]
    # bound: worker start (< ~20 s on a loaded 2-core box) + at most 6 alarms of 1 s + 5 s slack
    assert elapsed < 40


@pytest.mark.slow
def test_hard_deadline_kills_a_stuck_worker_and_the_pool_recovers():
    pool = R.TimeoutPool(workers=1)
    try:
        warm = pool.run(time.sleep, [(0,)], task_deadline_s=5.0)  # start-up is not counted in deadlines
        assert warm == [R.Outcome(True, None, "")]
        start = time.monotonic()
        outs = pool.run(time.sleep, [(60,), (0,)], task_deadline_s=1.0)
        elapsed = time.monotonic() - start
        assert outs[0] == R.Outcome(False, None, "timeout")
        assert outs[1].ok  # ran on the replacement worker
        assert elapsed < 30  # not 60: the stuck worker was killed after ~1 s (plus a worker restart)
        assert pool.run(abs, [(-3,)], task_deadline_s=5.0) == [R.Outcome(True, 3, "")]
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_worker_crash_is_retried_once_then_reported():
    pool = R.TimeoutPool(workers=1)
    try:
        outs = pool.run(os._exit, [(3,)], task_deadline_s=30.0)
        assert outs[0].ok is False and "crashed twice" in outs[0].error
        err = pool.run(int, [("x",)], task_deadline_s=30.0)[0]  # an exception in the task is reported
        assert err.ok is False and err.error.startswith("ValueError")
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_workers_that_cannot_start_are_given_up_and_the_pool_rebuilt():
    """A worker stuck before its first task (here: a 60 s initializer) never starts the deadline clock;
    after startup_timeout_s without progress the call gives up instead of waiting forever."""
    pool = R.TimeoutPool(workers=1, startup_timeout_s=2.0, initializer=functools.partial(time.sleep, 60))
    try:
        start = time.monotonic()
        outs = pool.run(abs, [(-1,), (-2,)], task_deadline_s=5.0)
        elapsed = time.monotonic() - start
        assert [o.ok for o in outs] == [False, False]
        assert all(o.error == "no worker could start (start-up timeout)" for o in outs), outs
        assert elapsed < 30  # ~2 s of waiting plus stopping the stuck worker, not 60 s
        pool.initializer = None  # the next call builds a fresh pool
        pool.startup_timeout_s = 120.0  # a spawned worker can take seconds to start on a loaded machine
        assert pool.run(abs, [(-3,)], task_deadline_s=30.0) == [R.Outcome(True, 3, "")]
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_forked_child_starts_its_own_workers():
    """The pool's threads do not survive fork: a child must not wait on the parent's pool."""
    pool = R.TimeoutPool(workers=1)
    try:
        assert pool.run(abs, [(-1,)], task_deadline_s=30.0) == [R.Outcome(True, 1, "")]
        pid = os.fork()
        if pid == 0:  # child: score through the inherited pool object, report by exit code
            code = 2
            try:
                code = 0 if pool.run(abs, [(-2,)], task_deadline_s=30.0) == [R.Outcome(True, 2, "")] else 1
                pool.shutdown()
            finally:
                os._exit(code)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on its parent's pool")
        assert os.waitstatus_to_exitcode(status) == 0
        assert pool.run(abs, [(-4,)], task_deadline_s=30.0) == [R.Outcome(True, 4, "")]  # parent's pool unharmed
    finally:
        pool.shutdown()


def _score_in_daemon(queue) -> None:
    batch = R.score_batch("math", [r"\boxed{\frac{1}{2}}", r"\boxed{2}"], ["0.5", "3"])
    queue.put((batch.rewards.tolist(), batch.reasons))


def test_daemonic_process_scores_inline():
    """Daemonic processes may not start workers; the math reward scores inline there instead of failing."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_score_in_daemon, args=(queue,), daemon=True)
    proc.start()
    rewards, reasons = queue.get(timeout=120)
    proc.join(30)
    assert rewards == [1, -1], reasons


def test_math_reward_config_validation():
    with pytest.raises(ValueError, match="whole"):
        R.MathRewardConfig(timeout_s=0.5)
    with pytest.raises(ValueError, match="workers"):
        R.MathRewardConfig(workers=-1)
    # deadline: 16 items x 6 calls x 5 s + 5 s slack = 485 s
    assert R.MathRewardConfig().task_deadline_s(16) == 16 * 6 * 5 + 5.0


def test_compute_score_is_verl_compatible():
    params = list(inspect.signature(R.compute_score).parameters)
    assert params[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    assert inspect.signature(R.compute_score).parameters["extra_info"].default is None
    assert R.compute_score("math_dapo", r"The answer is \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert R.compute_score("lighteval/MATH", r"\boxed{3}", "4", {"index": 0}) == -1.0
    assert R.compute_score(
        data_source="aime24", solution_str="", ground_truth="4", extra_info=None, some_verl_kwarg=1
    ) == -1.0
    d = R.compute_score("math", r"\boxed{4}", "4", return_dict=True)
    assert d == {"score": 1.0, "acc": 1.0}
    assert isinstance(R.compute_score("math", r"\boxed{4}", "4"), float)


def test_compute_score_batch_matches_compute_score():
    sources = ["math_dapo", "aime24", "math", "math_dapo"]
    sols = [r"\boxed{\frac{1}{2}}", r"\boxed{7}", "", r"\boxed{3}"]
    gts = ["0.5", "7", "1", "4"]
    one_by_one = [R.compute_score(d, s, g) for d, s, g in zip(sources, sols, gts)]
    assert one_by_one == [1.0, 1.0, -1.0, -1.0]
    assert R.compute_score_batch(sources, sols, gts, [None] * 4) == one_by_one
    assert [d["score"] for d in R.compute_score_batch(sources, sols, gts, return_dict=True)] == one_by_one
    with pytest.raises(ValueError, match="one of each"):
        R.compute_score_batch(sources, sols, gts[:2])


def test_verl_can_load_this_file_under_another_module_name(monkeypatch):
    """verl's get_custom_reward_fn imports custom_reward_function.path as `custom_module` (registered in
    sys.modules, then exec_module); the worker pool must still find its task by name."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("custom_module", R.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "custom_module", mod)
    spec.loader.exec_module(mod)
    try:
        assert mod.compute_score("math", r"\boxed{\frac{1}{2}}", "0.5") == 1.0  # goes through a worker
    finally:
        mod.shutdown_pool()


def test_data_source_resolution():
    assert R.resolve_data_source("math") == "math"
    assert R.resolve_data_source("arith") == "arith"
    for name in ("math_dapo", "lighteval/MATH", "HuggingFaceH4/MATH-500", "aime25", "org/AIME_2026", "DAPO-Math-17k"):
        assert R.resolve_data_source(name) == "math", name
    with pytest.raises(KeyError, match="valid|registered rewards: arith, math"):
        R.resolve_data_source("code_contests")
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        R.score_batch("math", ["a", "b"], ["1"])


def test_arith_is_dispatched_to_score_arith():
    responses = ["12", "21", "", "abc"]
    answers = ["21", "21", "21", "21"]
    expected = [arith.score_arith(r, a) for r, a in zip(responses, answers)]
    batch = R.score_batch("arith", responses, answers)
    assert batch.rewards.tolist() == [1 if e[0] > 0 else -1 for e in expected]
    assert batch.reasons == [e[1] for e in expected]
    assert set(batch.rewards.tolist()) == {-1, 1}  # the inputs contain a right and a wrong answer


INTEGER_PAIRS = [
    (r"\boxed{42}", "42"),
    (r"\boxed{-42}", "42"),
    (r"\boxed{042}", "42"),
    (r"\boxed{0}", "-0"),
    (r"\boxed{$7$}", "7"),
    (r"\boxed{12}", r"\boxed{13}"),
    (r"\boxed{123456789012345678901}", "123456789012345678902"),  # beyond float precision
    (r"\boxed{123456789012345678901}", "123456789012345678901"),
]


@pytest.mark.parametrize("response, gold", INTEGER_PAIRS)
def test_integer_fast_path_agrees_with_math_verify(response, gold):
    fast = R.verify_math(response, gold, 5, fast_path=True)
    slow = R.verify_math(response, gold, 5, fast_path=False)
    assert fast[0] == slow[0], (fast, slow)


def test_last_boxed_property():
    """For brace-free contents a, b: the last box of "..{a}..{b}.." is b, and nesting unwraps to b."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    text = st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)), max_size=20)

    @hypothesis.given(a=text, b=text.filter(lambda s: s.strip() != ""), noise=text)
    @hypothesis.settings(max_examples=200, deadline=None)
    def check(a, b, noise):
        assert R.last_boxed(f"{noise}\\boxed{{{a}}}{noise}\\boxed{{{b}}}{noise}") == b.strip()
        assert R.last_boxed(f"{noise}\\boxed{{\\boxed{{{b}}}}}") == b.strip()

    check()
