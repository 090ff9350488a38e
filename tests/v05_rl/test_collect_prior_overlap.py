"""`collect_osla` with the prior as a function: computed on a worker thread while round 0 generates."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from v0_data.tasks.base import Prompt
from v05_rl.allocation import OslaConfig
from v05_rl.engine.collect import collect_osla

P = np.linspace(0.05, 0.95, 16)  # true success probability per prompt
PRIORS = np.where(np.arange(16) % 2 == 0, 0.8, -0.8)  # half of them contradicted by P


class FakeGen:
    """Draws ±1 rewards from P; records, per round, whether the prior had started while it generated."""

    def __init__(self, prior_started: threading.Event | None = None, gen_started: threading.Event | None = None):
        self.prior_started, self.gen_started = prior_started, gen_started
        self.overlapped: list[bool] = []
        self.requests: list[list[int]] = []

    def __call__(self, prompts, n, seed, *, record=True):
        if self.prior_started is not None and not self.overlapped:  # round 0: wait (bounded) for the prior thread
            self.gen_started.set()
            self.overlapped.append(self.prior_started.wait(timeout=3.0))
        idx = np.repeat(np.arange(len(prompts)), n)  # [N]
        rng = np.random.default_rng(seed)
        pid = np.array([p.prompt_id for p in prompts])[idx]
        rewards = np.where(rng.random(idx.size) < P[pid], 1.0, -1.0)
        self.requests.append(list(n))
        return SimpleNamespace(prompt_index=idx), rewards


def _prompts():
    return [Prompt(i, "toy", "train", f"q{i}", None) for i in range(16)]


def test_prior_function_runs_during_round_zero_and_changes_nothing():
    cfg = OslaConfig(pad_multiple=1, halt_fraction=0.0)
    started, gen_started = threading.Event(), threading.Event()
    main = threading.get_ident()
    ran_on: list[int] = []
    saw_generation: list[bool] = []

    def prior_fn() -> np.ndarray:
        ran_on.append(threading.get_ident())
        saw_generation.append(gen_started.wait(timeout=3.0))
        started.set()
        return PRIORS.copy()

    gen = FakeGen(started, gen_started)
    col = collect_osla(_prompts(), prior_fn, cfg, gen, lambda r: 100 + r)
    # each side waited (at most 3 s) for the other: both succeed only when the prior runs during round 0 on
    # another thread; computed before round 0 it never sees generation, after it generation never sees it
    assert gen.overlapped == [True] and saw_generation == [True] and ran_on[0] != main
    assert col.t_prior >= 0.0 and np.array_equal(col.priors, PRIORS)

    ref_gen = FakeGen()
    ref = collect_osla(_prompts(), PRIORS, cfg, ref_gen, lambda r: 100 + r)
    # same rounds, same rollouts, same rewards as with the priors passed as an array
    assert gen.requests == ref_gen.requests and gen.requests[0] == [4] * 16 and len(gen.requests) > 1
    assert np.array_equal(col.rewards, ref.rewards) and np.array_equal(col.counts, ref.counts)


def test_an_error_in_the_prior_reaches_the_caller():
    def broken() -> np.ndarray:
        raise KeyError("V0 prior: no text for prompt ids [7]")

    with pytest.raises(KeyError, match="no text"):
        collect_osla(_prompts(), broken, OslaConfig(pad_multiple=1), FakeGen(), lambda r: r)
