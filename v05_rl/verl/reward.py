"""`compute_score` for verl's `reward.custom_reward_function`: the paper's rule-based ±1 correctness reward
for the training set and all six evaluation benchmarks, each under its own `data_source`.

Why: verl reports validation metrics per `data_source` (`val-core/<data_source>/...`), and its default
scorer (verl 0.9.1 `utils/reward_score.default_compute_score`) also chooses the rule by `data_source`:
the ±1 `math_dapo` rule only for "math_dapo", "math", "math_dapo_reasoning" and names starting with
"aime"; "HuggingFaceH4/MATH-500" gets a 0/1 rule; "amc23", "minerva_math", "olympiadbench" are not
implemented. The paper scores training and evaluation with one rule-based correctness check and no
format reward (§4.1.4). So the configs point verl here (`pkg://v05_rl.verl.reward`), every name of
`MATH_SOURCES` is scored by verl's `math_dapo` rule (±1, as V0.5's estimator needs), and any other
`data_source` goes to verl's default scorer unchanged.
"""

from __future__ import annotations

from typing import Any

# data_source names of the training set and of the six benchmarks of the paper (§4.1.4), as written by
# `v05 data export-verl --data-source NAME` (see docs/cluster.md, "Validation")
MATH_SOURCES = ("math_dapo", "aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None, **kwargs: Any):
    """±1 correctness (verl's math_dapo rule) for `MATH_SOURCES`; verl's default scorer otherwise.
    Returns what those return: a dict with `score` (±1), `acc` and `pred` for math."""
    if data_source in MATH_SOURCES:
        from verl.utils.reward_score import math_dapo

        return math_dapo.compute_score(solution_str, ground_truth)
    from verl.utils.reward_score import default_compute_score

    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)


__all__ = ["MATH_SOURCES", "compute_score"]
