"""In-context heads: (context features, context success rates, query features) -> success log-odds.

`registry.py` holds `HEADS`, `HeadConfig` and `make_head`; `kernel.py` (the embedded default) and
`tabpfn.py` (the paper's head) each register one head. Importing this package registers both (the
`tabpfn` module imports the `tabpfn` package only when such a head is built).
"""

from __future__ import annotations

from v0_model.heads.kernel import KernelHead, clipped_logit, gp_posterior, probit_logit, standardise
from v0_model.heads.registry import HEADS, HeadConfig, make_head
from v0_model.heads.tabpfn import TABPFN_PATH_ENV, TabPFNHead, rates_to_classes, resolve_tabpfn_checkpoint

__all__ = [
    "HEADS",
    "HeadConfig",
    "KernelHead",
    "TABPFN_PATH_ENV",
    "TabPFNHead",
    "clipped_logit",
    "gp_posterior",
    "make_head",
    "probit_logit",
    "rates_to_classes",
    "resolve_tabpfn_checkpoint",
    "standardise",
]
