"""Online prior quality: the step's priors scored against the step's own rollouts (hand-computed)."""

from __future__ import annotations

import math

import numpy as np

from v05_rl.engine.advantage import prior_quality


def test_prior_quality_by_hand():
    # prompt 0: V = 0.5 (p 0.75), rollouts +1 +1 +1 -1 -> rate 0.75
    # prompt 1: V = -0.5 (p 0.25), rollouts -1 -1 -1 +1 -> rate 0.25
    # prompt 2: no prior (left out)
    rewards = np.array([1, 1, 1, -1, -1, -1, -1, 1, 1, -1], dtype=float)
    group = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    q = prior_quality(rewards, group, np.array([0.5, -0.5, np.nan]))
    # AUC over 8 rollouts: successes have scores {.5,.5,.5,-.5}, failures {.5,-.5,-.5,-.5};
    # pairs (success > failure): 3 successes at .5 beat 3 failures at -.5 -> 9, tie with the one at .5 -> 1.5;
    # the success at -.5 ties 3 failures -> 1.5 and loses to 1; total (9 + 1.5 + 1.5) / 16 = 0.75
    assert math.isclose(q.auc, 0.75)
    assert math.isclose(q.brier, 0.0)  # (0.75 - 0.75)^2 and (0.25 - 0.25)^2
    assert math.isclose(q.brier_mean, 0.0625)  # mean rate 0.5: (0.25^2 + 0.25^2) / 2


def test_prior_quality_without_priors_is_nan():
    q = prior_quality(np.array([1.0, -1.0]), np.array([0, 0]), np.array([np.nan]))
    assert math.isnan(q.auc) and math.isnan(q.brier) and math.isnan(q.brier_mean)


def test_a_reversed_prior_scores_below_one_half_and_worse_than_the_mean():
    rewards = np.array([1, 1, -1, -1], dtype=float)
    group = np.array([0, 0, 1, 1])
    q = prior_quality(rewards, group, np.array([-0.9, 0.9]))
    assert q.auc == 0.0 and q.brier > q.brier_mean
