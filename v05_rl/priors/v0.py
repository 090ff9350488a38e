"""`v0`: the prior from a frozen V0 checkpoint with the policy's support buffer as context.

For a batch of prompts (paper §4.1.3, Step 1): draw up to 256 (prompt, success rate) pairs from the
support buffer as the capability context C_π, predict p̂ for every prompt of the batch in one call
(context features are computed once per call; adapter features are memoised per prompt id, since
V0 is frozen), and return V = 2p̂ - 1. While the buffer is not usable (empty, or one class only) the
prior is absent (NaN) and V0.5 falls back to the empirical mean.

Where a prompt's text comes from (V0 embeds context rows by id, and the buffer holds only ids):
- `prompts_by_id`, a *live* mapping owned by the trainer (verl: `RayV05Trainer.prompt_index.by_id`);
  it is read at query time, never copied, so prompts the trainer adds later are seen;
- the texts of every batch passed to `priors`, remembered *before* anything else, also when the call
  returns NaN (the first step: the buffer is still empty, but the next step draws these prompts as
  context);
- `state_dict` carries the texts of the prompts held by the support buffer, so a resumed source can
  embed its context without any trainer-side index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from v0_data.tasks.base import Prompt
from v05_rl.priors.base import PriorOptions, PriorRuntime, SupportBuffer

if TYPE_CHECKING:  # torch / transformers stay unimported until a V0 source is built
    from v0_model.model import V0Predictor


class V0PriorSource:
    """V0 priors for batches of prompts from the support buffer's context."""

    name = "v0"

    def __init__(
        self,
        predictor: "V0Predictor",
        support: SupportBuffer,
        *,
        prompts_by_id: Mapping[int, Prompt] | None = None,
        texts: Mapping[int, str] | None = None,
        support_size: int = 256,
        seed: int = 0,
    ):
        self.predictor = predictor
        self.support = support
        self.prompts_by_id: Mapping[int, Prompt] = prompts_by_id if prompts_by_id is not None else {}  # live, not copied
        self.texts: dict[int, str] = {int(k): v for k, v in (texts or {}).items()}  # remembered from queries
        self.support_size = int(support_size)
        self.seed = int(seed)
        self.calls = 0
        if self.texts:
            self.predictor.ensure_texts(self.texts, progress=False)

    def observe(self, prompt_ids, success_rates, counts=None) -> None:
        """Add the current policy's measured success rates in [0, 1] to the support buffer (`counts` unused)."""
        self.support.add(prompt_ids, success_rates)

    def text_of(self, prompt_id: int) -> str | None:
        """The text of `prompt_id`: remembered from a query or a checkpoint, else the live index; None if unknown."""
        pid = int(prompt_id)
        if pid in self.texts:
            return self.texts[pid]
        prompt = self.prompts_by_id.get(pid)
        return None if prompt is None else prompt.text

    def _ensure(self, ids: Sequence[int]) -> None:
        """Embed every id without cached token states; an id with neither a known text nor stored features
        (`V0Predictor.known`, e.g. from `v05 data embed`) is an error naming the fix."""
        todo = [int(i) for i in dict.fromkeys(ids) if int(i) not in self.predictor.cache]
        texts = {pid: self.text_of(pid) for pid in todo}
        found = {pid: text for pid, text in texts.items() if text is not None}
        unknown = [pid for pid, text in texts.items() if text is None and not self.predictor.known(pid)]
        if unknown:
            raise KeyError(
                f"V0 prior: no text for prompt ids {unknown[:5]} (of {len(unknown)}); pass every prompt the "
                "support buffer may hold in PriorRuntime.prompts_by_id (or query it through priors() first)"
            )
        if found:
            self.predictor.ensure_texts(found, progress=False)

    def priors(self, prompts: Sequence[Prompt]) -> np.ndarray:
        """V = 2 p_hat - 1 per prompt, NaN for all while the support buffer is not usable. Shape (B,)."""
        for p in prompts:  # first: the next call may draw these prompts as context, whatever this one returns
            self.texts.setdefault(int(p.prompt_id), p.text)
        if len(prompts) == 0:
            return np.zeros(0)
        if not self.support.usable():
            return np.full(len(prompts), np.nan)
        rng = np.random.default_rng([self.seed, self.calls])
        self.calls += 1
        ctx = self.support.sample(self.support_size, rng)
        q_ids = [int(p.prompt_id) for p in prompts]
        self._ensure(list(ctx.prompt_ids) + q_ids)
        p_hat = self.predictor.predict(ctx.prompt_ids.tolist(), ctx.success_rates, q_ids)  # [B]
        return np.clip(2.0 * p_hat - 1.0, -1.0, 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Support buffer, query counter and the texts of the buffer's prompts (JSON-serialisable)."""
        held = dict.fromkeys(int(i) for i in self.support.arrays().prompt_ids)
        texts = {str(pid): self.text_of(pid) for pid in held}
        return {"support": self.support.state_dict(), "calls": self.calls,
                "texts": {k: v for k, v in texts.items() if v is not None}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.support.load_state_dict(state["support"])
        self.calls = int(state.get("calls", 0))
        self.texts.update({int(k): str(v) for k, v in dict(state.get("texts", {})).items()})


def build_v0_source(opts: PriorOptions, runtime: PriorRuntime) -> V0PriorSource:
    """The `v0` source: checkpoint `opts.v0_checkpoint` loaded on `runtime.device` (features precomputed by
    `v05 data embed` read from `opts.v0_features_dir` when set), texts read live from
    `runtime.prompts_by_id` (the trainer's index, not a copy)."""
    if not opts.v0_checkpoint:
        raise ValueError("prior 'v0' needs --v0-checkpoint PATH (a file written by `v05 pretrain-v0`)")
    from v0_model.checkpoint import load_predictor  # heavy (torch, transformers): only when V0 is asked for

    predictor = load_predictor(opts.v0_checkpoint, device=runtime.device, features_dir=opts.v0_features_dir)
    return V0PriorSource(predictor, SupportBuffer(opts.support_capacity), prompts_by_id=runtime.prompts_by_id,
                         support_size=opts.support_size, seed=opts.resolved_seed())


__all__ = ["V0PriorSource", "build_v0_source"]
