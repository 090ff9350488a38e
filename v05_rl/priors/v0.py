"""`v0`: the prior from a frozen V0 checkpoint with the policy's support buffer as context.

For a batch of prompts (paper §4.1.3, Step 1): draw up to 256 (prompt, success rate) pairs from the
support buffer as the capability context C_π, predict p̂ for every prompt of the batch in one call
(context features are computed once per call; adapter features are memoised per prompt id, since
V0 is frozen), and return V = 2p̂ - 1. While the buffer is not usable (empty, or one class only) the
prior is absent (NaN) and V0.5 falls back to the empirical mean.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from v0_data.tasks.base import Prompt
from v0_model.model import V0Predictor
from v05_rl.priors.base import SupportBuffer


class V0PriorSource:
    """V0 priors for batches of prompts from the support buffer's context."""

    name = "v0"

    def __init__(
        self,
        predictor: V0Predictor,
        support: SupportBuffer,
        *,
        texts: Mapping[int, str] | None = None,
        support_size: int = 256,
        seed: int = 0,
    ):
        self.predictor = predictor
        self.support = support
        self.texts: dict[int, str] = dict(texts or {})
        self.support_size = int(support_size)
        self.seed = int(seed)
        self.calls = 0
        if self.texts:
            self.predictor.ensure_texts(self.texts, progress=False)

    def observe(self, prompt_ids, success_rates) -> None:
        """Add the current policy's measured success rates in [0, 1] to the support buffer."""
        self.support.add(prompt_ids, success_rates)

    def _ensure(self, ids: Sequence[int]) -> None:
        missing = {int(i): self.texts[int(i)] for i in ids if int(i) not in self.predictor.cache and int(i) in self.texts}
        unknown = [int(i) for i in ids if int(i) not in self.predictor.cache and int(i) not in self.texts]
        if unknown:
            raise KeyError(
                f"V0 prior: no text for prompt ids {unknown[:5]} (of {len(unknown)}); pass every prompt the "
                "support buffer may hold in PriorRuntime.prompts_by_id"
            )
        if missing:
            self.predictor.ensure_texts(missing, progress=False)

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """V = 2 p_hat - 1 per prompt, NaN for all while the support buffer is not usable. Shape (B,)."""
        if len(prompts) == 0:
            return np.zeros(0)
        if not self.support.usable():
            return np.full(len(prompts), np.nan)
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        ctx = self.support.sample(self.support_size, rng)
        for p in prompts:
            self.texts.setdefault(int(p.prompt_id), p.text)
        q_ids = [int(p.prompt_id) for p in prompts]
        self._ensure(list(ctx.prompt_ids) + q_ids)
        p_hat = self.predictor.predict(ctx.prompt_ids.tolist(), ctx.success_rates, q_ids)  # [B]
        return np.clip(2.0 * p_hat - 1.0, -1.0, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"support": self.support.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.support.load_state_dict(state["support"])
        self.calls = int(state.get("calls", 0))


__all__ = ["V0PriorSource"]
