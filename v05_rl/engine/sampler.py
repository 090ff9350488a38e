"""Seeds and the prompt order of a run: everything a resumed run needs to draw the same numbers."""

from __future__ import annotations

from typing import Mapping

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, round, ...), stable across machines."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class PromptSampler:
    """Epoch-wise shuffled prompt order; its whole state is (epoch, position), so resume is exact."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no training prompts: the task source returned an empty split")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> np.ndarray:
        return np.random.default_rng(derive_seed(self.seed, 0x5A3, self.epoch)).permutation(self.n)

    def take(self, m: int) -> np.ndarray:
        """The next `m` prompt indices (crossing into a freshly shuffled epoch when one runs out). Shape (m,)."""
        out = []
        while len(out) < m:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            take = min(m - len(out), self.n - self.pos)
            out.extend(self._order[self.pos : self.pos + take].tolist())
            self.pos += take
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()


__all__ = ["PromptSampler", "derive_seed"]
