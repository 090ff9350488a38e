"""`tabpfn` in-context head: the paper's TabPFN classifier, frozen, with gradients to its inputs.

(This module is `v0_model.heads.tabpfn`; `from tabpfn import ...` inside it is the absolute import of
the `tabpfn` package, done only when a head is built.)

V0's head performs single-pass Bayesian inference over the policy's context C_pi (paper Sec. 4.1.1;
the enhanced V0 of Sec. 5 uses TabPFN-v2.5). This head wraps the real `tabpfn` package
(`TabPFNClassifier(differentiable_input=True)`, tabpfn==9.2.0): the context rows are the "training
set", the queries the "test set", and one forward pass returns class logits. The TabPFN weights are
frozen (`requires_grad=False`); gradients flow to the context and query features, so the adapter
learns through the head.

    ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F]
      -> classes c = [ctx_y >= threshold]            (or Bernoulli(ctx_y) while training, see below)
      -> TabPFN logits l [M, 2] (temperature-scaled, averaged over the ensemble members)
      -> logit P(success) = a * (l[:, 1] - l[:, 0]) + b

Departures from the paper, and why:
- Success rates are continuous; TabPFN is a classifier. `tabpfn_labels="threshold"` (default) uses
  the class 1[y >= tabpfn_threshold]: deterministic, so the same context always gives the same
  prediction (V0's inference contract). `"bernoulli"` draws c ~ Bernoulli(y) afresh on every
  training call (an unbiased one-rollout view of the rate, a form of label noise augmentation) and
  falls back to the threshold in eval mode. The paper does not say which conversion it uses.
- The number of classes is pinned to 2, so a context whose rows are all one class still yields a
  two-class output (TabPFN then sees only that class as evidence).
- a, b (`cal_scale`, `cal_bias`, start at 1, 0) are a trainable affine calibration of the output
  log-odds, the same as the kernel head's, so `train.calibrate` works for both heads.
- The checkpoint is read only from a local file (`head.tabpfn_path` or the `V05_TABPFN_PATH`
  environment variable); nothing is ever downloaded (tabpfn itself would download a missing file).
- Inference runs in float32 with tabpfn's differentiable "none" preprocessor only (no quantile or
  power transforms); `tabpfn_n_estimators` members are averaged in logit space. Each member sees at
  most 500 features (tabpfn's `max_features_per_estimator`), a fixed random subset per member (same
  seed on every call); with the paper's 1008 adapter features one member uses about half of them,
  so the default 0 ("auto": 8 members) is needed for (almost) every feature to reach TabPFN.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from v0_model.heads.registry import HEADS, HeadConfig

#: environment variable naming the checkpoint when `head.tabpfn_path` is empty
TABPFN_PATH_ENV = "V05_TABPFN_PATH"
#: preferred file names inside a directory given as the checkpoint path, best first
PREFERRED_CHECKPOINTS = (
    "tabpfn-v2.5-classifier-v2.5_default.ckpt",
    "tabpfn-v2-classifier-finetuned-zk73skhh.ckpt",
    "tabpfn-v2-classifier.ckpt",
)
HOW_TO_GET_WEIGHTS = (
    "The tabpfn head needs a local TabPFN classifier checkpoint; this project never downloads weights.\n"
    "Get one of:\n"
    "  - TabPFN-v2.5 (as in the paper): file 'tabpfn-v2.5-classifier-v2.5_default.ckpt' from\n"
    "    https://huggingface.co/Prior-Labs/tabpfn_2_5 (gated: accept the licence on that page first), e.g.\n"
    "    `hf download Prior-Labs/tabpfn_2_5 tabpfn-v2.5-classifier-v2.5_default.ckpt --local-dir DIR`;\n"
    "  - TabPFN-v2: file 'tabpfn-v2-classifier-finetuned-zk73skhh.ckpt' from\n"
    "    https://huggingface.co/Prior-Labs/TabPFN-v2-clf.\n"
    f"Then set `head.tabpfn_path: /path/to/file.ckpt` (YAML section `head:`) or the environment variable\n"
    f"{TABPFN_PATH_ENV}=/path/to/file.ckpt (a directory holding one of {list(PREFERRED_CHECKPOINTS)} also works).\n"
    "The python package is the `tabpfn` extra: pip install 'tabpfn==9.2.0'."
)


def _find_in(p: Path, source: str) -> Path:
    """The checkpoint file named by `p` (a file, or a directory holding one); FileNotFoundError otherwise."""
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        for name in PREFERRED_CHECKPOINTS:
            if (p / name).is_file():
                return (p / name).resolve()
        found = sorted(f for ext in ("ckpt", "safetensors") for f in p.glob(f"*classifier*.{ext}"))
        if len(found) == 1:
            return found[0].resolve()
        if len(found) > 1:
            raise FileNotFoundError(
                f"{source}={p} is a directory with several TabPFN classifier checkpoints "
                f"{[f.name for f in found]}; set {source} to the file you want."
            )
        raise FileNotFoundError(f"{source}={p} is a directory without a TabPFN classifier checkpoint.\n{HOW_TO_GET_WEIGHTS}")
    raise FileNotFoundError(f"{source}={p} does not exist.\n{HOW_TO_GET_WEIGHTS}")


def resolve_tabpfn_checkpoint(path: str | os.PathLike | None) -> Path:
    """The checkpoint file to load, from `path` (head.tabpfn_path), else from $V05_TABPFN_PATH.

    A directory is searched for a known classifier file name (`PREFERRED_CHECKPOINTS`, v2.5 first),
    then for a single `*classifier*.ckpt` / `*.safetensors` file. When `path` is set but missing (a V0
    checkpoint trained on another machine records that machine's path) a set $V05_TABPFN_PATH is
    used instead. Raises FileNotFoundError with instructions (which file, from where, which key to set).
    """
    env = os.environ.get(TABPFN_PATH_ENV, "")
    if not path and not env:
        raise FileNotFoundError(
            f"no TabPFN checkpoint configured (head.tabpfn_path and ${TABPFN_PATH_ENV} are empty).\n{HOW_TO_GET_WEIGHTS}"
        )
    if path:
        try:
            return _find_in(Path(path).expanduser(), "head.tabpfn_path")
        except FileNotFoundError:
            if not env:
                raise
    return _find_in(Path(env).expanduser(), f"${TABPFN_PATH_ENV}")


def rates_to_classes(
    rates: torch.Tensor, *, mode: str, threshold: float, training: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Success rates (N,) in [0, 1] -> class labels (N,) in {0., 1.} (float, as tabpfn wants).

    mode "threshold": 1[rate >= threshold]. mode "bernoulli": Bernoulli(rate) draws while training,
    the threshold rule otherwise (deterministic predictions at inference).
    """
    if mode == "bernoulli" and training:
        return torch.bernoulli(rates.detach().float().clamp(0.0, 1.0), generator=generator)  # [N]
    return (rates.detach() >= threshold).float()  # [N]


@HEADS.register("tabpfn")
class TabPFNHead(nn.Module):
    """Frozen TabPFN classifier over (context, queries); see the module docstring.

    The checkpoint path is checked when the head is built (clear error if missing); the tabpfn model
    itself is loaded on the first forward call, once per device, and is not part of `state_dict`
    (only the calibration a, b is: V0 checkpoints stay small and name the TabPFN file in the head
    config instead).
    """

    def __init__(self, cfg: HeadConfig, in_features: int, difficulty_column: bool = False):
        super().__init__()
        self.cfg = cfg
        self.in_features = in_features
        self.checkpoint_path = resolve_tabpfn_checkpoint(cfg.tabpfn_path)
        self.cal_scale = nn.Parameter(torch.tensor(1.0))
        self.cal_bias = nn.Parameter(torch.tensor(0.0))
        self._classifiers: dict[str, Any] = {}  # device -> fitted TabPFNClassifier (not a submodule)
        self._frozen: set[str] = set()

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "tabpfn_checkpoint": self.checkpoint_path.name,
            "n_estimators": self.cfg.tabpfn_n_estimators,
            "labels": self.cfg.tabpfn_labels,
            "threshold": self.cfg.tabpfn_threshold,
            "cal_scale": float(self.cal_scale.detach()),
            "cal_bias": float(self.cal_bias.detach()),
        }

    def n_estimators_used(self) -> int | None:
        """Ensemble members of the fitted classifier (tabpfn chooses them for 0 = auto); None before a call."""
        for clf in self._classifiers.values():
            return int(getattr(clf, "n_estimators_", clf.n_estimators))
        return None

    def _classifier(self, device: torch.device):
        key = str(device)
        if key not in self._classifiers:
            try:
                from tabpfn import TabPFNClassifier
            except ImportError as e:
                raise ImportError(f"head 'tabpfn' needs the `tabpfn` package: pip install 'tabpfn==9.2.0' ({e})") from e
            clf = TabPFNClassifier(
                model_path=str(self.checkpoint_path),  # an existing file: tabpfn loads it and downloads nothing
                device=key,
                n_estimators=self.cfg.tabpfn_n_estimators or "auto",
                inference_precision=torch.float32,
                differentiable_input=True,
                random_state=self.cfg.tabpfn_seed,
                ignore_pretraining_limits=self.cfg.tabpfn_ignore_limits,
            )
            clf.n_classes_ = 2  # success / failure, even when a context holds only one of them
            self._classifiers[key] = clf
        return self._classifiers[key]

    def forward(self, ctx_x: torch.Tensor, ctx_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F] -> logits [M] (float32)."""
        if ctx_x.shape[0] == 0:
            raise ValueError("tabpfn head needs at least one context row")
        if ctx_x.shape[1] != self.in_features or query_x.shape[1] != self.in_features:
            raise ValueError(f"tabpfn head built for {self.in_features} features, got {ctx_x.shape[1]} / {query_x.shape[1]}")
        if query_x.shape[0] == 0:
            return torch.zeros(0, device=query_x.device)
        clf = self._classifier(ctx_x.device)
        labels = rates_to_classes(
            ctx_y, mode=self.cfg.tabpfn_labels, threshold=self.cfg.tabpfn_threshold, training=self.training
        )  # [N]
        clf.fit_with_differentiable_input(ctx_x.float(), labels.to(ctx_x.device))
        key = str(ctx_x.device)
        if key not in self._frozen:  # the models exist only after the first fit
            for m in clf.models_:
                m.eval().requires_grad_(False)
            self._frozen.add(key)
        out = clf.forward(query_x.float(), use_inference_mode=True, return_logits=True)  # [M, 2]
        logit = out[:, 1] - out[:, 0]  # [M] log-odds of success under the 2-class softmax
        return (self.cal_scale * logit + self.cal_bias).float()  # [M]
