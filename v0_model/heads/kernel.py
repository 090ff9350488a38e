"""`kernel` in-context head: exact GP regression on logit success rates (the embedded default).

Every head maps

    ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F]  ->  logits [M],   p_hat = sigmoid(logits)

(see `registry.py`). This one fits a Gaussian process to the logit of the measured success rates of the
context, then takes the probit approximation of the posterior-predictive mean of sigmoid(f).
Bandwidth, per-feature relevances (ARD), signal/linear/noise variances (the prior strength relative
to the context) and a final affine calibration are learned across tasks. With the difficulty bank
(bank.py) the last feature column is its d(x), which this head turns into a prior mean.

Departure from the paper, which uses TabPFN-v2.5 (paper Sec. 4.1.1; our `tabpfn` head, tabpfn.py):
TabPFN weights cannot be fetched offline, and the GP posterior is exact, cheap (one 256 x 256
Cholesky) and calibrated by construction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from v0_model.heads.registry import HEADS, HeadConfig


def clipped_logit(y: torch.Tensor, eps: float) -> torch.Tensor:
    """logit(clip(y, eps, 1 - eps)). Shape preserved."""
    y = y.clamp(eps, 1.0 - eps)
    return torch.log(y) - torch.log1p(-y)


def standardise(ctx_x: torch.Tensor, query_x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre on the context mean and divide by the context's root-mean-square deviation (one scalar).

    ctx_x [N, F], query_x [M, F] -> same shapes. One scalar keeps relative feature scales, which the
    adapter learns, while making the kernel bandwidth independent of the overall feature scale.
    """
    mu = ctx_x.mean(0, keepdim=True)  # [1, F]
    scale = (ctx_x - mu).pow(2).mean().sqrt() + eps  # []
    return (ctx_x - mu) / scale, (query_x - mu) / scale


def gp_posterior(
    ctx_x: torch.Tensor,
    z: torch.Tensor,
    query_x: torch.Tensor,
    *,
    ctx_mean: torch.Tensor,
    query_mean: torch.Tensor,
    length_scale: torch.Tensor,
    signal_var: torch.Tensor,
    linear_var: torch.Tensor,
    noise_var: torch.Tensor,
    jitter: float,
    ctx_d: torch.Tensor | None = None,
    query_d: torch.Tensor | None = None,
    d_var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact GP regression posterior of the latent f at the queries.

    Kernel k(a, b) = s_f * exp(-|a - b|^2 / (2 l^2 F)) + s_l * a.b / F [+ s_d * d_a d_b];
    prior mean m(x) (ctx_mean at the context, query_mean at the queries); observations z = f + N(0, s_n).
        mu_q  = m_q + K_qc (K_cc + s_n I)^-1 (z - m_c)
        var_q = k(q, q) - K_qc (K_cc + s_n I)^-1 K_cq
    The optional s_d * d_a d_b term is a Gaussian prior on a per-policy slope along the scalar d.
    Shapes: ctx_x [N, F], z [N], query_x [M, F], means scalar or [N] / [M], d [N] / [M] -> (mu [M], var [M]).
    """
    F = ctx_x.shape[1]

    def kern(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1).unsqueeze(0)).clamp_min(0)  # [A, B]
        return signal_var * torch.exp(-d2 / (2 * length_scale**2 * F)) + linear_var * (a @ b.T) / F

    N = ctx_x.shape[0]
    K = kern(ctx_x, ctx_x) + (noise_var + jitter) * torch.eye(N, dtype=ctx_x.dtype, device=ctx_x.device)  # [N, N]
    Kqc = kern(query_x, ctx_x)  # [M, N]
    kqq = signal_var + linear_var * query_x.pow(2).sum(1) / F  # [M]
    if d_var is not None:
        K = K + d_var * torch.outer(ctx_d, ctx_d)
        Kqc = Kqc + d_var * torch.outer(query_d, ctx_d)
        kqq = kqq + d_var * query_d.pow(2)
    L = torch.linalg.cholesky(K)  # [N, N]
    alpha = torch.cholesky_solve((z - ctx_mean).unsqueeze(1), L).squeeze(1)  # [N]
    mu = query_mean + Kqc @ alpha  # [M]
    W = torch.linalg.solve_triangular(L, Kqc.T, upper=False)  # [N, M]
    var = (kqq - W.pow(2).sum(0)).clamp_min(1e-9)  # [M]
    return mu, var


def probit_logit(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Log-odds of E[sigmoid(f)], f ~ N(mu, var), by the probit approximation mu / sqrt(1 + pi var / 8)."""
    return mu / torch.sqrt(1.0 + math.pi * var / 8.0)


@HEADS.register("kernel")
class KernelHead(nn.Module):
    """Closed-form Bayesian in-context head (GP on logit success rates); see the module docstring.

    With `difficulty_column`, the last feature is the bank's d(x) (a key-centred success-rate offset,
    bank.py). It enters as a prior mean m(x) = m_0 + beta * (d(x) - mean_ctx d) with a learned slope
    beta, plus a kernel term s_d * d_a d_b, so a policy's context can turn the slope up or down; the
    RBF/linear kernel on the remaining features models what the bank misses for this policy.
    """

    def __init__(self, cfg: HeadConfig, in_features: int, difficulty_column: bool = False):
        super().__init__()
        self.cfg = cfg
        self.difficulty_column = difficulty_column
        if difficulty_column:
            in_features -= 1
            self.log_beta = nn.Parameter(torch.tensor(math.log(cfg.beta)))  # logit units per unit of d
            self.log_dvar = nn.Parameter(torch.tensor(math.log(cfg.d_var)))  # prior variance of the per-policy slope
        self.in_features = in_features
        self.log_length = nn.Parameter(torch.tensor(math.log(cfg.bandwidth)))
        self.log_signal = nn.Parameter(torch.tensor(math.log(cfg.signal_var)))
        self.log_linear = nn.Parameter(torch.tensor(math.log(max(cfg.linear_var, 1e-8))))
        self.log_noise = nn.Parameter(torch.tensor(math.log(cfg.noise_var)))
        self.cal_scale = nn.Parameter(torch.tensor(1.0))
        self.cal_bias = nn.Parameter(torch.tensor(0.0))
        # ARD: log relevance per feature (0 = all features equal); the mean is removed in forward so the
        # overall scale stays with the length scale
        self.log_relevance = nn.Parameter(torch.zeros(in_features)) if cfg.ard else None

    def hyperparameters(self) -> dict[str, float]:
        out = {
            "length_scale": float(self.log_length.detach().exp()),
            "signal_var": float(self.log_signal.detach().exp()),
            "linear_var": float(self.log_linear.detach().exp()),
            "noise_var": float(self.log_noise.detach().exp()),
            "cal_scale": float(self.cal_scale.detach()),
            "cal_bias": float(self.cal_bias.detach()),
        }
        if self.difficulty_column:
            out.update(beta=float(self.log_beta.detach().exp()), d_var=float(self.log_dvar.detach().exp()))
        return out

    def forward(self, ctx_x: torch.Tensor, ctx_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F] -> logits [M] (float32)."""
        if ctx_x.shape[0] == 0:
            raise ValueError("kernel head needs at least one context row")
        dt = torch.float64
        ctx_x, query_x = ctx_x.to(dt), query_x.to(dt)
        d_kw: dict = {}
        if self.difficulty_column:
            dbar = ctx_x[:, -1].mean()
            ctx_d, query_d = ctx_x[:, -1] - dbar, query_x[:, -1] - dbar  # [N], [M]
            ctx_x, query_x = ctx_x[:, :-1], query_x[:, :-1]
            d_kw = {"ctx_d": ctx_d, "query_d": query_d, "d_var": self.log_dvar.to(dt).exp()}
        cx, qx = standardise(ctx_x, query_x)  # [N, F], [M, F]
        if self.log_relevance is not None:
            rel = torch.exp(self.log_relevance - self.log_relevance.mean()).to(dt)  # [F], geometric mean 1
            cx, qx = cx * rel, qx * rel
        eps = self.cfg.label_eps
        z = clipped_logit(ctx_y.to(dt), eps)  # [N]
        prior_mean = clipped_logit(ctx_y.to(dt).mean(), eps)  # [] empirical-Bayes prior mean
        ctx_mean = query_mean = prior_mean
        if self.difficulty_column:
            beta = self.log_beta.to(dt).exp()
            ctx_mean, query_mean = prior_mean + beta * d_kw["ctx_d"], prior_mean + beta * d_kw["query_d"]
        mu, var = gp_posterior(
            cx,
            z,
            qx,
            ctx_mean=ctx_mean,
            query_mean=query_mean,
            length_scale=self.log_length.to(dt).exp(),
            signal_var=self.log_signal.to(dt).exp(),
            linear_var=self.log_linear.to(dt).exp(),
            noise_var=self.log_noise.to(dt).exp(),
            jitter=self.cfg.jitter,
            **d_kw,
        )
        logits = self.cal_scale.to(dt) * probit_logit(mu, var) + self.cal_bias.to(dt)  # [M]
        return logits.float()


__all__ = ["KernelHead", "clipped_logit", "gp_posterior", "probit_logit", "standardise"]
