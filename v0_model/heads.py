"""In-context heads: (context features, context success rates, query features) -> success log-odds.

V0's head performs single-pass Bayesian inference on the policy's context C_pi (paper Sec. 4.1.1).
Every head maps

    ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F]  ->  logits [M],   p_hat = sigmoid(logits)

and is differentiable w.r.t. ctx_x and query_x, so the adapter learns through it.

Heads (registry `HEADS`):
- `kernel` (embedded default, no pretrained weights): Gaussian-process regression on the logit of the
  measured success rate, then the probit approximation of the posterior-predictive mean of sigmoid(f).
  Bandwidth, per-feature relevances (ARD), signal/linear/noise variances (the prior strength relative
  to the context) and a final affine calibration are learned across tasks.
  Departure from the paper, which uses TabPFN-v2.5: TabPFN weights cannot be fetched offline, and the
  GP posterior is exact, cheap (one 256 x 256 Cholesky) and calibrated by construction.
- `tabpfn` (the paper's head, `v0_model/head_tabpfn.py`): the real TabPFN classifier (tabpfn==9.2.0,
  `differentiable_input=True`), frozen, loaded only from a local checkpoint (`tabpfn_path` or
  $V05_TABPFN_PATH; v2.5 as in the paper, v2 accepted). Success rates become classes by a threshold
  (or Bernoulli draws while training); the output is the log-odds of the success class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from v0_data.registry import Registry

HEADS: Registry = Registry("head")


@dataclass(frozen=True)
class HeadConfig:
    """Which in-context head and its settings (fields are ignored by heads that do not use them)."""

    name: str = field(default="kernel", metadata={"help": "head name; one of HEADS.names()"})
    bandwidth: float = field(default=1.0, metadata={"help": "kernel: initial RBF length scale (on standardised features)"})
    signal_var: float = field(default=1.0, metadata={"help": "kernel: initial RBF signal variance (logit units^2)"})
    linear_var: float = field(default=0.1, metadata={"help": "kernel: initial variance of the linear kernel term"})
    noise_var: float = field(default=1.0, metadata={"help": "kernel: initial observation noise variance (logit units^2)"})
    label_eps: float = field(default=0.05, metadata={"help": "kernel: success rates are clipped to [eps, 1-eps] before the logit"})
    jitter: float = field(default=1e-4, metadata={"help": "kernel: diagonal jitter for the Cholesky factorisation"})
    ard: bool = field(default=True, metadata={"help": "kernel: learn one relevance scale per feature (ARD)"})
    tabpfn_path: str = field(
        default="",
        metadata={"help": "tabpfn: local classifier checkpoint file or directory (empty: $V05_TABPFN_PATH); never downloaded"},
    )
    tabpfn_n_estimators: int = field(
        default=0,
        metadata={"help": "tabpfn: ensemble members averaged in logit space; 0 = tabpfn's 'auto' (8, more for wide inputs)"},
    )
    tabpfn_labels: str = field(
        default="threshold",
        metadata={"help": "tabpfn: rates -> classes: 'threshold' (rate >= tabpfn_threshold) or 'bernoulli' (draws while training)"},
    )
    tabpfn_threshold: float = field(default=0.5, metadata={"help": "tabpfn: success class iff rate >= this"})
    tabpfn_seed: int = field(default=0, metadata={"help": "tabpfn: random_state of the ensemble (feature shifts and subsets)"})
    tabpfn_ignore_limits: bool = field(
        default=False, metadata={"help": "tabpfn: allow inputs beyond the checkpoint's pretraining limits (features, CPU rows)"}
    )

    def __post_init__(self) -> None:
        for name in ("bandwidth", "signal_var", "noise_var", "jitter"):
            if getattr(self, name) <= 0:
                raise ValueError(f"head.{name}={getattr(self, name)} must be > 0")
        if self.linear_var < 0:
            raise ValueError(f"head.linear_var={self.linear_var} must be >= 0")
        if not 0.0 < self.label_eps < 0.5:
            raise ValueError(f"head.label_eps={self.label_eps} must lie in (0, 0.5)")
        if self.tabpfn_n_estimators < 0:
            raise ValueError(f"head.tabpfn_n_estimators={self.tabpfn_n_estimators} must be >= 0 (0 = auto)")
        if self.tabpfn_labels not in ("threshold", "bernoulli"):
            raise ValueError(f"head.tabpfn_labels={self.tabpfn_labels!r} must be 'threshold' or 'bernoulli'")
        if not 0.0 < self.tabpfn_threshold <= 1.0:
            raise ValueError(f"head.tabpfn_threshold={self.tabpfn_threshold} must lie in (0, 1]")


def make_head(cfg: HeadConfig, in_features: int) -> nn.Module:
    """Build the head named `cfg.name` (unknown names fail with the list of valid ones)."""
    return HEADS.get(cfg.name)(cfg, in_features)


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
    prior_mean: torch.Tensor,
    length_scale: torch.Tensor,
    signal_var: torch.Tensor,
    linear_var: torch.Tensor,
    noise_var: torch.Tensor,
    jitter: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact GP regression posterior of the latent f at the queries.

    Kernel k(a, b) = s_f * exp(-|a - b|^2 / (2 l^2 F)) + s_l * a.b / F; observations z = f + N(0, s_n).
        mu_q  = m + K_qc (K_cc + s_n I)^-1 (z - m)
        var_q = k(q, q) - K_qc (K_cc + s_n I)^-1 K_cq
    Shapes: ctx_x [N, F], z [N], query_x [M, F] -> (mu [M], var [M]).
    """
    F = ctx_x.shape[1]

    def kern(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1).unsqueeze(0)).clamp_min(0)  # [A, B]
        return signal_var * torch.exp(-d2 / (2 * length_scale**2 * F)) + linear_var * (a @ b.T) / F

    N = ctx_x.shape[0]
    K = kern(ctx_x, ctx_x) + (noise_var + jitter) * torch.eye(N, dtype=ctx_x.dtype, device=ctx_x.device)  # [N, N]
    L = torch.linalg.cholesky(K)  # [N, N]
    Kqc = kern(query_x, ctx_x)  # [M, N]
    alpha = torch.cholesky_solve((z - prior_mean).unsqueeze(1), L).squeeze(1)  # [N]
    mu = prior_mean + Kqc @ alpha  # [M]
    W = torch.linalg.solve_triangular(L, Kqc.T, upper=False)  # [N, M]
    kqq = signal_var + linear_var * query_x.pow(2).sum(1) / F  # [M]
    var = (kqq - W.pow(2).sum(0)).clamp_min(1e-9)  # [M]
    return mu, var


def probit_logit(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Log-odds of E[sigmoid(f)], f ~ N(mu, var), by the probit approximation mu / sqrt(1 + pi var / 8)."""
    return mu / torch.sqrt(1.0 + math.pi * var / 8.0)


@HEADS.register("kernel")
class KernelHead(nn.Module):
    """Closed-form Bayesian in-context head (GP on logit success rates); see the module docstring."""

    def __init__(self, cfg: HeadConfig, in_features: int):
        super().__init__()
        self.cfg = cfg
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
        return {
            "length_scale": float(self.log_length.detach().exp()),
            "signal_var": float(self.log_signal.detach().exp()),
            "linear_var": float(self.log_linear.detach().exp()),
            "noise_var": float(self.log_noise.detach().exp()),
            "cal_scale": float(self.cal_scale.detach()),
            "cal_bias": float(self.cal_bias.detach()),
        }

    def forward(self, ctx_x: torch.Tensor, ctx_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F] -> logits [M] (float32)."""
        if ctx_x.shape[0] == 0:
            raise ValueError("kernel head needs at least one context row")
        dt = torch.float64
        cx, qx = standardise(ctx_x.to(dt), query_x.to(dt))  # [N, F], [M, F]
        if self.log_relevance is not None:
            rel = torch.exp(self.log_relevance - self.log_relevance.mean()).to(dt)  # [F], geometric mean 1
            cx, qx = cx * rel, qx * rel
        eps = self.cfg.label_eps
        z = clipped_logit(ctx_y.to(dt), eps)  # [N]
        prior_mean = clipped_logit(ctx_y.to(dt).mean(), eps)  # [] empirical-Bayes prior mean
        mu, var = gp_posterior(
            cx,
            z,
            qx,
            prior_mean=prior_mean,
            length_scale=self.log_length.to(dt).exp(),
            signal_var=self.log_signal.to(dt).exp(),
            linear_var=self.log_linear.to(dt).exp(),
            noise_var=self.log_noise.to(dt).exp(),
            jitter=self.cfg.jitter,
        )
        logits = self.cal_scale.to(dt) * probit_logit(mu, var) + self.cal_bias.to(dt)  # [M]
        return logits.float()


# registers "tabpfn" (the module imports `tabpfn` itself only when such a head is built)
from v0_model import head_tabpfn as _head_tabpfn  # noqa: E402,F401
