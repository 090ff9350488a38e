"""V0 = frozen backbone (cached) + residual query adapter + in-context head.

    p_hat(C_pi, x) = sigmoid(head(adapter(C_pi.prompts), C_pi.success_rates, adapter(x)))

`V0Model` holds the trainable parts (adapter, head); the backbone is represented by an
`EmbeddingCache`, so the model only ever sees cached token states. `V0Predictor` adds the cache and
predicts whole (model, step) groups at once: adapter features are computed once per distinct prompt.

Departure from the paper: the difficulty bank. The paper's V0 (Sec. 4.1.1, Eq. 3: V = V0(x, C_pi)) is
backbone + residual query adapter + in-context head, and the head sees only the policy's context. We
add a cross-policy difficulty bank (bank.py): a kernel-ridge function d(x) of the pooled embedding,
fitted at pre-training on the key-centred success rates of every training prompt and saved in the
checkpoint; its value is appended to the adapter features as the last column, which the kernel head
turns into a prior mean. Why: prompt difficulty is largely shared across policies, which one policy's
context cannot show; on the V0 release it lifted V0's cross-validated gAUC from 0.644 to 0.695
(README). With `bank.enabled: false` (`V0Config.bank`) no bank is built and the model is the paper's V0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from v0_model.adapter import AdapterConfig, ResidualQueryAdapter
from v0_model.backbone import BackboneConfig, EmbeddingCache
from v0_model.bank import BankConfig, DifficultyBank
from v0_model.features import ShardFolder, load_v0_features
from v0_model.heads import HeadConfig, make_head


def build_section(cls, values: Mapping | None, section: str):
    """`cls(**values)` with unknown keys refused by name and numeric strings (YAML 1.1 reads 2e-4 as a
    string) converted for float fields."""
    values = dict(values or {})
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; valid: {sorted(names)}")
    for k, v in values.items():
        if isinstance(v, str) and isinstance(names[k].default, float):
            try:
                values[k] = float(v)
            except ValueError:
                raise ValueError(f"{section}.{k}={v!r} is not a number") from None
    return cls(**values)


@dataclass(frozen=True)
class V0Config:
    """Architecture of V0 (the training recipe lives in `train.TrainConfig`)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig, metadata={"help": "frozen text encoder"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"help": "residual query adapter sizes"})
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"help": "in-context head"})
    bank: BankConfig = field(default_factory=BankConfig, metadata={"help": "cross-policy difficulty bank"})

    @classmethod
    def from_dict(cls, d: Mapping) -> "V0Config":
        unknown = set(d) - {"backbone", "adapter", "head", "bank"}
        if unknown:
            raise ValueError(f"unknown V0 config sections {sorted(unknown)}; valid: backbone, adapter, head, bank")
        return cls(
            backbone=build_section(BackboneConfig, d.get("backbone"), "backbone"),
            adapter=build_section(AdapterConfig, d.get("adapter"), "adapter"),
            head=build_section(HeadConfig, d.get("head"), "head"),
            bank=build_section(BankConfig, d.get("bank"), "bank"),
        )

    def to_dict(self) -> dict:
        return asdict(self)


class V0Model(nn.Module):
    """Adapter + difficulty bank + head over cached backbone states.

    Features of a prompt: the adapter's output, then (with the bank enabled) the bank's difficulty
    value d(x) as the last column, which the head treats as a prior-mean input (heads/kernel.py).
    """

    def __init__(self, cfg: V0Config, input_dim: int, bank_size: int = 0):
        super().__init__()
        self.cfg = cfg
        self.input_dim = input_dim
        self.adapter = ResidualQueryAdapter(input_dim, cfg.adapter)
        self.bank = DifficultyBank(input_dim, bank_size) if cfg.bank.enabled else None
        n_bank = 1 if self.bank is not None else 0
        self.head = make_head(cfg.head, self.adapter.out_features + n_bank, difficulty_column=self.bank is not None)

    def features(self, cache: EmbeddingCache, ids: Sequence[int], chunk: int = 64) -> torch.Tensor:
        """Adapter features of prompts. ids (B,) -> [B, F].

        Prompts are processed in chunks of similar length (sorted), which cuts the padded attention
        work roughly by the ratio max/mean length; the output keeps the input order.
        """
        if len(ids) == 0:
            return torch.zeros(0, self.out_features)
        device = self.adapter.static_queries.device  # token states live on the CPU; the model may not
        lengths = np.array([cache[i].hidden.shape[0] for i in ids])
        order = np.argsort(lengths, kind="stable")
        outs = []
        for s in range(0, len(ids), chunk):
            chunk_ids = [ids[i] for i in order[s : s + chunk]]
            packed = cache.pack(chunk_ids)
            tokens, pooled = packed.tokens.to(device), packed.pooled.to(device)  # [T, d], [b, d]
            feats = self.adapter(tokens, packed.lengths.to(device), pooled)  # [b, F]
            if self.bank is not None:
                d = self.bank(chunk_ids, pooled)  # [b]
                feats = torch.cat([feats, d.unsqueeze(1)], dim=1)  # [b, F + 1]
            outs.append(feats)
        feats = torch.cat(outs)  # [B, F] sorted by length
        inverse = torch.as_tensor(np.argsort(order, kind="stable"), device=feats.device)
        return feats[inverse]  # [B, F]

    @property
    def out_features(self) -> int:
        """Width F of a prompt's feature row: adapter output (+ 1 bank column)."""
        return self.adapter.out_features + (self.bank is not None)

    def logits(self, ctx_x: torch.Tensor, ctx_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """ctx_x [N, F], ctx_y [N] in [0, 1], query_x [M, F] -> log-odds [M]."""
        return self.head(ctx_x, ctx_y, query_x)


class V0Predictor:
    """Inference wrapper: a trained `V0Model` plus the embedding cache of its backbone.

    Feature rows are memoised per prompt id on the CPU (V0 is frozen at inference). With `feature_folder`
    (a 'v0-features' `ShardFolder` of this checkpoint, features.py) rows are read from disk first — as
    written by `v05 data embed --checkpoint` — and rows computed here are added to it, so a prompt's
    features are computed at most once per checkpoint, ever; a prompt with a stored row needs neither its
    text nor the backbone. `device` is where the adapter and the head run (the model is moved there).
    """

    def __init__(self, model: V0Model, cache: EmbeddingCache, feature_folder: ShardFolder | None = None,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.cache = cache
        self.feature_folder = feature_folder
        self._feat: dict[int, torch.Tensor] = {}
        self._disk_loaded = False
        self.computed = 0  # feature rows computed by this process (0 when every row came from disk)

    @property
    def feature_dir(self) -> Path | None:
        return None if self.feature_folder is None else self.feature_folder.path

    def has_features(self, pid: int) -> bool:
        """True when the feature row of `pid` is in memory or in the feature folder (no text needed)."""
        self._load_features()
        return int(pid) in self._feat

    def known(self, pid: int) -> bool:
        """True when V0 can score `pid` without its text: stored features or cached token states."""
        return self.has_features(pid) or int(pid) in self.cache

    def ensure_texts(self, texts: Mapping[int, str], progress: bool = True) -> None:
        """Embed (or load from the disk cache) every prompt in `texts` that has no features yet."""
        self._load_features()
        todo = {pid: t for pid, t in texts.items() if int(pid) not in self._feat}
        if todo:
            self.cache.ensure(todo, progress=progress)

    def _load_features(self) -> None:
        if self._disk_loaded:
            return
        if self.feature_folder is not None:
            self._feat.update(load_v0_features(self.feature_folder))
        self._disk_loaded = True

    @torch.no_grad()
    def features(self, ids: Sequence[int]) -> torch.Tensor:
        """Feature rows, memoised per prompt id (the model is frozen here). ids (B,) -> [B, F] float32 CPU."""
        self._load_features()
        missing = list(dict.fromkeys(int(i) for i in ids if int(i) not in self._feat))
        if missing:
            feats = self.model.features(self.cache, missing).float().cpu()  # [U, F]
            for pid, f in zip(missing, feats):
                self._feat[pid] = f
            self.computed += len(missing)
            if self.feature_folder is not None:
                self.feature_folder.write_shard({"ids": torch.tensor(missing, dtype=torch.int64), "features": feats})
        if not len(ids):
            return torch.zeros(0, self.model.out_features)
        return torch.stack([self._feat[int(i)] for i in ids])  # [B, F]

    @torch.no_grad()
    def predict(self, ctx_ids: Sequence[int], ctx_rates: Sequence[float], query_ids: Sequence[int]) -> np.ndarray:
        """Success probabilities of the queries given one policy's context. Shapes: (N,), (N,), (M,) -> (M,)."""
        if len(query_ids) == 0:
            return np.zeros(0)
        if len(ctx_ids) == 0:
            raise ValueError("V0 needs at least one context row for a prediction")
        cx = self.features(ctx_ids).to(self.device)  # [N, F]
        qx = self.features(query_ids).to(self.device)  # [M, F]
        cy = torch.as_tensor(np.asarray(ctx_rates, dtype=np.float32), device=self.device)  # [N]
        return torch.sigmoid(self.model.logits(cx, cy, qx)).double().cpu().numpy()  # [M]
