"""The head registry, the head config and `make_head`: what every in-context head shares.

V0's head performs single-pass Bayesian inference on the policy's context C_pi (paper Sec. 4.1.1).
Every head maps

    ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F]  ->  logits [M],   p_hat = sigmoid(logits)

and is differentiable w.r.t. ctx_x and query_x, so the adapter learns through it. With the difficulty
bank (bank.py) the last feature column is its d(x); the kernel head turns it into a prior mean.

Heads (registry `HEADS`; `v0_model.heads` imports both modules, so both are always registered):
- `kernel` (kernel.py, the embedded default, no pretrained weights): GP regression on the logit of the
  measured success rate. Departure from the paper (TabPFN-v2.5), see kernel.py.
- `tabpfn` (tabpfn.py, the paper's head): the real TabPFN classifier (tabpfn==9.2.0,
  `differentiable_input=True`), frozen, loaded only from a local checkpoint (`tabpfn_path` or
  $V05_TABPFN_PATH; v2.5 as in the paper, v2 accepted).
This module imports no head, so both head modules import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from v0_data.registry import Registry

HEADS: Registry = Registry("head")


@dataclass(frozen=True)
class HeadConfig:
    """Which in-context head and its settings (fields are ignored by heads that do not use them)."""

    name: str = field(default="kernel", metadata={"help": "head name; one of HEADS.names()"})
    bandwidth: float = field(default=1.0, metadata={"help": "kernel: initial RBF length scale (on standardised features)"})
    signal_var: float = field(default=0.1, metadata={"help": "kernel: initial RBF signal variance (logit units^2)"})
    linear_var: float = field(default=0.1, metadata={"help": "kernel: initial variance of the linear kernel term"})
    noise_var: float = field(default=1.0, metadata={"help": "kernel: initial observation noise variance (logit units^2)"})
    beta: float = field(default=16.0, metadata={"help": "kernel + bank: initial prior-mean slope on d(x) (logit units per unit of d)"})
    d_var: float = field(default=1.0, metadata={"help": "kernel + bank: initial prior variance of a policy's own slope on d(x)"})
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
        for name in ("bandwidth", "signal_var", "noise_var", "jitter", "beta", "d_var"):
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


def make_head(cfg: HeadConfig, in_features: int, difficulty_column: bool = False) -> nn.Module:
    """Build the head named `cfg.name` (unknown names fail with the list of valid ones).

    difficulty_column: the last feature is the difficulty bank's d(x) (bank.py); the kernel head uses it
    as a prior mean, other heads take it as one more feature.
    """
    return HEADS.get(cfg.name)(cfg, in_features, difficulty_column=difficulty_column)


__all__ = ["HEADS", "HeadConfig", "make_head"]
