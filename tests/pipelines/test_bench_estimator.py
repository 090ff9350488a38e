"""Tiny runs of `v05 bench estimator` and a check of its oracle against independent quadrature."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import integrate, stats

from pipelines.bench.estimator import (
    ROWS,
    BenchConfig,
    beta_difficulty,
    oracle_posterior_mean,
    real_difficulty,
    run_benchmark,
    speed_benchmark,
)
from pipelines.cli.benchmarks import estimator


def _quad_posterior_mean(v: float, x: int, k: int, a: float, b: float, sigma: float, flip: float) -> float:
    """E[2p − 1 | V = v, x of k] by adaptive quadrature (independent of the grid code)."""

    def lik_v(mu: float, val: float) -> float:
        if val >= 1:
            return stats.norm.sf((1 - mu) / sigma)
        if val <= -1:
            return stats.norm.cdf((-1 - mu) / sigma)
        return stats.norm.pdf((val - mu) / sigma) / sigma

    def dens(p: float) -> float:
        mu = 2 * p - 1
        lv = (1 - flip) * lik_v(mu, v) + flip * lik_v(mu, -v)
        return stats.beta.pdf(p, a, b) * lv * p**x * (1 - p) ** (k - x)

    den = integrate.quad(dens, 0, 1, limit=200, points=[0.5])[0]
    num = integrate.quad(lambda p: (2 * p - 1) * dens(p), 0, 1, limit=200, points=[0.5])[0]
    return num / den


@pytest.mark.parametrize("v, x", [(0.37, 1), (-0.8, 4), (1.0, 3), (-1.0, 0), (0.0, 2)])
def test_oracle_matches_quadrature(v, x):
    dist = beta_difficulty(0.8, 0.8)
    got = oracle_posterior_mean(np.array([v]), np.array([x]), 4, dist, 0.3, 0.1)[0]
    assert got == pytest.approx(_quad_posterior_mean(v, x, 4, 0.8, 0.8, 0.3, 0.1), abs=2e-3)


def test_oracle_with_exact_prior_is_the_prior():
    v = np.array([0.3, -1.0])
    np.testing.assert_array_equal(oracle_posterior_mean(v, np.array([0, 4]), 4, beta_difficulty(1, 1), 0.0, 0.0), v)


def _write_scores(path, scores):
    path.write_text("\n".join(json.dumps({"id": i, "score": s}) for i, s in enumerate(scores)) + "\n")


def test_real_difficulty_mixture(tmp_path):
    f = tmp_path / "context.jsonl"
    _write_scores(f, [-1.0, -1.0, 0.2, 1.0])
    dist = real_difficulty(f)
    # scores are means of 10 rollouts: −1 → 0 successes, 0.2 → 6, 1 → 10; Jeffreys Beta(s + ½, 10 − s + ½)
    np.testing.assert_allclose(dist.a, [0.5, 6.5, 10.5])
    np.testing.assert_allclose(dist.b, [10.5, 4.5, 0.5])
    np.testing.assert_allclose(dist.w, [0.5, 0.25, 0.25])
    assert dist.cell_mass(np.linspace(0, 1, 11)).sum() == pytest.approx(1.0)
    assert real_difficulty(tmp_path / "missing.jsonl") is None
    _write_scores(f, [1.5])
    with pytest.raises(ValueError, match="outside"):
        real_difficulty(f)


def test_tiny_benchmark_run(tmp_path):
    f = tmp_path / "context.jsonl"
    _write_scores(f, list(np.linspace(-1, 1, 11)) * 3)
    cfg = BenchConfig(prompts=1024, sigmas=(0.0, 0.3), scores_path=str(f))
    report = run_benchmark(cfg, progress=False)
    assert set(report["results"]) == {"beta(0.8,0.8)", "real-scores"}
    for regimes in report["results"].values():
        assert set(regimes) == {"sigma=0", "sigma=0.3", "flip=0.2,sigma=0.1"}
        for label, rows in regimes.items():
            assert set(rows) == {name for name, _ in ROWS}
            assert rows["grpo-16"]["rollouts"] == 16 and rows["grpo-4"]["rollouts"] == 4
            assert rows["prior-only"]["rollouts"] == 0 and rows["grpo-16"]["mse_ratio"] == 1.0
            for name in ("v05-osla", "v05-osla-h0", "eb-osla-h0", "bernoulli-osla-h0"):
                assert 4 <= rows[name]["rollouts"] <= 16
            # GRPO-4 is the mean of the first 4 of the same 16 rollouts: about 4× the MSE of GRPO-16
            assert 2.5 < rows["grpo-4"]["mse_ratio"] < 6
            assert rows["oracle-k4"]["mse"] < rows["grpo-4"]["mse"]
        assert regimes["sigma=0"]["prior-only"]["mse"] == 0 and regimes["sigma=0"]["oracle-k4"]["mse"] == 0
        # the oracle is the best k = 4 estimator (up to Monte Carlo noise of 1024 prompts)
        r = regimes["sigma=0.3"]
        assert r["oracle-k4"]["mse"] <= 1.1 * min(r[n]["mse"] for n in ("v05-k4", "eb-k4", "bernoulli-k4"))
    json.dumps(report)  # JSON-ready


@pytest.mark.slow
def test_cli_writes_json_and_png(tmp_path):
    result = CliRunner().invoke(
        estimator, ["--prompts", "512", "--out", str(tmp_path), "--scores", str(tmp_path / "absent.jsonl")]
    )
    assert result.exit_code == 0, result.output
    assert "real score distribution skipped" in result.output
    assert "oracle-k4" in result.output
    data = json.loads((tmp_path / "estimator_bench.json").read_text())
    assert data["config"]["prompts"] == 512 and list(data["results"]) == ["beta(0.8,0.8)"]
    assert (tmp_path / "estimator_bench.png").stat().st_size > 1000


def test_speed_benchmark_runs():
    out = speed_benchmark(prompts=64, k=16, repeats=3)
    assert all(math.isfinite(v) and v > 0 for key, v in out.items() if key.endswith("(us)"))
