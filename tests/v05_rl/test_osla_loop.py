"""`run_osla`: the one OSLA round loop, with a dispatch that draws known rewards."""

from __future__ import annotations

import numpy as np
import pytest

from v05_rl.allocation import OslaConfig
from v05_rl.osla_loop import Dispatched, run_osla


def _dispatch(p_success: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    calls = []

    def dispatch(extra: np.ndarray, rnd: int) -> Dispatched:
        rows = np.repeat(np.arange(len(extra)), extra)  # [n]
        calls.append(extra.copy())
        return Dispatched(rows, np.where(rng.random(rows.size) < p_success[rows], 1.0, -1.0))

    return dispatch, calls


def test_cold_start_then_rounds_until_the_planner_stops():
    # priors say "always right" (V = 0.9) for prompts 0-3 and are contradicted by p = 0.1
    p = np.array([0.1, 0.1, 0.1, 0.1, 0.95, 0.95, 0.95, 0.95])
    priors = np.full(8, 0.9)
    dispatch, calls = _dispatch(p, 0)
    cfg = OslaConfig(pad_multiple=1, halt_fraction=0.0)
    res = run_osla(priors, cfg, dispatch)
    assert calls[0].tolist() == [4] * 8  # cold start: k_init everywhere
    assert res.counts.sum() == sum(c.sum() for c in calls) and len(res.rounds) == len(calls)
    assert res.counts[:4].min() > 4  # contradicted priors get more rollouts
    assert res.counts.max() <= cfg.cap
    assert np.array_equal(res.priors, priors)


def test_priors_from_a_callable_are_resolved_after_the_cold_start_and_change_nothing():
    p = np.linspace(0.05, 0.95, 16)
    priors = np.where(np.arange(16) % 2 == 0, 0.8, -0.8)
    asked = []

    def late():
        asked.append(True)
        return priors

    d1, c1 = _dispatch(p, 3)
    d2, c2 = _dispatch(p, 3)
    a = run_osla(priors, OslaConfig(pad_multiple=8), d1)
    b = run_osla(lambda: (late(), priors)[1], OslaConfig(pad_multiple=8), d2, n_prompts=16)
    assert asked == [True]
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.sums, b.sums)
    assert [x.tolist() for x in c1] == [x.tolist() for x in c2]
    with pytest.raises(ValueError, match="n_prompts"):
        run_osla(late, OslaConfig(), d1)
    with pytest.raises(ValueError, match="shape"):
        run_osla(lambda: np.zeros(3), OslaConfig(), _dispatch(p, 0)[0], n_prompts=16)


def test_a_dispatch_that_returns_the_wrong_number_of_rollouts_is_refused():
    def bad(extra, rnd):
        return Dispatched(np.zeros(1, dtype=np.int64), np.ones(1))

    with pytest.raises(RuntimeError, match="asked for 8"):
        run_osla(np.zeros(2), OslaConfig(), bad)
