"""Precomputed per-prompt V0 inputs on disk: shard folders with a manifest, written once per dataset.

V0 is frozen at RL time, so everything it computes about a prompt alone is a pure function of
(checkpoint, prompt text). Two kinds of folder hold that, each under a root folder (`v05 data embed`
writes `<store>/features/` by default):

    <root>/v0-features/<digest16>/   kind "v0-features": the checkpoint's feature row of every prompt
                                     (`V0Model.features`: adapter output, pooled embedding when the adapter
                                     appends it, difficulty-bank column), float32 [F]; `<digest16>` = first
                                     16 hex digits of the checkpoint file's sha256 (`checkpoint_digest`).
    <root>/<backbone cache key>/     kind "token-states": the backbone's output in the form the adapter
                                     consumes (real-token states float16 [L_i, d] + pooled float16 [d]),
                                     the layout `EmbeddingCache` reads, for when no checkpoint exists yet.

A folder holds `manifest.json` (format, kind, identity: dim, backbone, checkpoint digest; one entry per
shard) and shards `<prefix>-<sha1 of the ids>.safetensors`. Every shard is self-describing (its `ids`
tensor) and written atomically (temporary file, then rename); the manifest is rewritten atomically after
each shard under a file lock. A killed run leaves at most one temporary file and, rarely, a finished
shard the manifest does not list yet: `done_ids` reads the shards themselves, so a rerun skips every
prompt of a finished shard and redoes only the shard that was in flight. Shard names depend only on
their ids, so redoing a shard replaces it instead of duplicating it.

Bytes per prompt: "v0-features" stores 4·F bytes (F = 168·6 + d + 1 with the defaults: 2,033 features
for a 1,024-wide backbone, 8.1 kB); "token-states" stores 2·d·(L_i + 1) bytes (Qwen3-Embedding-0.6B,
d = 1,024, L = 256: 526 kB; MiniLM, d = 384, L = 40: 31 kB).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # these modules import this one
    from v0_model.backbone import EmbeddingCache
    from v0_model.model import V0Model

FORMAT = "v05-prompt-features"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KINDS = {"v0-features": "feat", "token-states": "part"}  # kind -> shard file prefix
V0_FEATURES_DIR = "v0-features"  # sub-folder of a root holding one folder per checkpoint digest
DIGEST_CHARS = 16


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is checked by torch (clear error if unknown)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device ({err}); use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device here; use cpu or auto")
    return dev


def v0_features_folder(root: str | os.PathLike, digest: str) -> Path:
    """Where the features of the checkpoint with sha256 `digest` live under `root`."""
    return Path(root) / V0_FEATURES_DIR / digest[:DIGEST_CHARS]


@dataclass(frozen=True)
class FolderIdentity:
    """What a shard folder holds; a folder written for another identity is refused, never mixed."""

    kind: str = field(metadata={"help": "'v0-features' or 'token-states'"})
    dim: int = field(metadata={"help": "feature width F (v0-features) or backbone width d (token-states)"})
    backbone_id: str = field(metadata={"help": "the backbone the states / features come from"})
    checkpoint_digest: str = field(default="", metadata={"help": "sha256 of the V0 checkpoint (v0-features only)"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"FolderIdentity.kind={self.kind!r}; use one of {sorted(KINDS)}")
        if self.dim < 1:
            raise ValueError(f"FolderIdentity.dim={self.dim} must be >= 1")
        if self.kind == "v0-features" and not self.checkpoint_digest:
            raise ValueError("FolderIdentity: kind 'v0-features' needs the checkpoint digest")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "backbone_id": self.backbone_id,
                "checkpoint_digest": self.checkpoint_digest}


class ShardFolder:
    """One folder of shards + manifest (see the module docstring). Thread- and process-safe writes."""

    def __init__(self, path: str | os.PathLike, identity: FolderIdentity):
        self.path = Path(path)
        self.identity = identity
        self.prefix = KINDS[identity.kind]

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the folder has none; a foreign or mismatching one is refused."""
        if not self.manifest_path.is_file():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.manifest_path}: unreadable manifest ({err}); delete the folder to rebuild it") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.manifest_path}: field 'format' is {manifest.get('format')!r}, not {FORMAT!r}; "
                             "this folder was not written by `v05 data embed`: choose another --out")
        want = self.identity.as_dict()
        for key, value in want.items():
            if manifest.get("identity", {}).get(key) != value:
                raise ValueError(
                    f"{self.manifest_path}: field 'identity.{key}' is {manifest.get('identity', {}).get(key)!r} but "
                    f"{value!r} is being written/read; these features belong to another checkpoint or backbone — "
                    "use another --out folder, or delete this one to rebuild it"
                )
        return manifest

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.manifest_path.with_name(f"{MANIFEST}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, self.manifest_path)

    # ------------------------------------------------------------------ shards
    def shards(self) -> list[Path]:
        """Finished shard files (temporary files of a killed writer are not shards)."""
        return sorted(self.path.glob(f"{self.prefix}-*.safetensors")) if self.path.is_dir() else []

    def done_ids(self) -> set[int]:
        """Prompt ids of every finished shard (reads only each shard's small `ids` tensor)."""
        from safetensors import safe_open

        done: set[int] = set()
        for shard in self.shards():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    done.update(int(i) for i in f.get_tensor("ids").tolist())
            except Exception as err:  # noqa: BLE001 - safetensors raises several kinds
                raise ValueError(f"{shard}: corrupt shard ({err}); delete this file and rerun to recompute it") from None
        return done

    def write_shard(self, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write one shard atomically, then list it in the manifest. `tensors` must hold `ids` [N] int64."""
        from safetensors.torch import save_file

        ids = tensors["ids"]
        digest = hashlib.sha1(np.sort(ids.numpy().astype(np.int64)).tobytes()).hexdigest()[:16]
        path = self.path / f"{self.prefix}-{digest}.safetensors"
        with self._locked():
            manifest = self.read_manifest() or {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                "identity": self.identity.as_dict(), "shards": {}}
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, path)
            manifest["shards"][path.name] = {"prompts": int(ids.numel()), "bytes": path.stat().st_size,
                                             "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self._write_manifest(manifest)
        return path

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files left by writers that are no longer running (a killed run)."""
        removed = []
        for tmp in self.path.glob("*.tmp*") if self.path.is_dir() else []:
            pid = tmp.name.rsplit(".tmp", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        return removed

    def bytes_per_prompt(self) -> float:
        """Mean shard bytes per prompt over the finished shards (NaN when empty)."""
        n = len(self.done_ids())
        return sum(s.stat().st_size for s in self.shards()) / n if n else float("nan")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_v0_features(folder: ShardFolder) -> dict[int, torch.Tensor]:
    """Every feature row of a 'v0-features' folder: prompt id -> float32 [F] (CPU)."""
    from safetensors.torch import load_file

    out: dict[int, torch.Tensor] = {}
    for shard in folder.shards():
        try:
            t = load_file(str(shard))
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{shard}: corrupt feature shard ({err}); delete it and rerun `v05 data embed`") from None
        if t["features"].shape[1] != folder.identity.dim:
            raise ValueError(f"{shard}: features are {t['features'].shape[1]} wide, the checkpoint gives "
                             f"{folder.identity.dim}; delete the folder {folder.path} and rerun `v05 data embed`")
        for pid, row in zip(t["ids"].tolist(), t["features"]):
            out[int(pid)] = row
    return out


class EmbedProgress(NamedTuple):
    """What one `precompute` call did: prompts asked for, already on disk, computed now, shards written."""

    requested: int
    skipped: int
    computed: int
    shards: int
    seconds: float


ShardFn = Callable[[list[int], list[str]], dict[str, torch.Tensor]]
"""(prompt ids, their texts) -> the tensors of one shard (`ids` first; see `ShardFolder.write_shard`)."""


def precompute(texts: Mapping[int, str], folder: ShardFolder, compute: ShardFn, *, shard_size: int = 2048,
               progress: bool = False, on_shard: Callable[[Path], None] | None = None) -> EmbedProgress:
    """Compute and store every prompt of `texts` not yet in `folder`, `shard_size` prompts per shard.

    Prompts are ordered by text length (then id) before they are cut into shards, so the backbone's batches
    inside a shard hold prompts of similar length (less padding). Resumable: see the module docstring.
    `on_shard(path)` is called after each shard is durable (progress reporting; tests use it to simulate
    a kill).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    t0 = time.perf_counter()
    folder.read_manifest()  # refuses a folder of another checkpoint / backbone before any work
    folder.remove_stale_temporaries()
    done = folder.done_ids()
    todo = sorted((int(pid) for pid in texts if int(pid) not in done), key=lambda pid: (len(texts[pid]), pid))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"embed -> {folder.path.name}", unit="prompt", disable=not progress)
    shards = 0
    for start in range(0, len(todo), shard_size):
        ids = todo[start : start + shard_size]
        tensors = compute(ids, [texts[pid] for pid in ids])
        path = folder.write_shard(tensors)
        shards += 1
        bar.update(len(ids))
        if on_shard is not None:
            on_shard(path)
    bar.close()
    return EmbedProgress(len(texts), len(texts) - len(todo), len(todo), shards, time.perf_counter() - t0)


def token_state_tensors(ids: Sequence[int], hidden: Sequence[torch.Tensor], pooled: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One 'token-states' shard in `EmbeddingCache`'s layout: ids [N], lengths [N], tokens [T, d], pooled [N, d]."""
    return {
        "ids": torch.tensor(list(ids), dtype=torch.int64),
        "lengths": torch.tensor([h.shape[0] for h in hidden], dtype=torch.int64),
        "tokens": torch.cat(list(hidden)).half(),
        "pooled": torch.stack(list(pooled)).half(),
    }


def token_state_shard_fn(cache: "EmbeddingCache", batch_size: int) -> ShardFn:
    """ShardFn of kind 'token-states': the backbone's output of each prompt, nothing more."""

    def compute(ids: list[int], texts: list[str]) -> dict[str, torch.Tensor]:
        states = cache.backbone.encode(texts, batch_size=batch_size)
        return token_state_tensors(ids, [s.hidden for s in states], [s.pooled for s in states])

    return compute


def v0_feature_shard_fn(cache: "EmbeddingCache", model: "V0Model", batch_size: int) -> ShardFn:
    """ShardFn of kind 'v0-features': backbone -> `model.features` -> float32 rows; the shard's token states
    are dropped from memory as soon as its features exist."""

    @torch.no_grad()
    def compute(ids: list[int], texts: list[str]) -> dict[str, torch.Tensor]:
        cache.put(ids, cache.backbone.encode(texts, batch_size=batch_size))
        try:
            feats = model.features(cache, ids).float().cpu()  # [N, F]
        finally:
            cache.discard(ids)
        return {"ids": torch.tensor(ids, dtype=torch.int64), "features": feats}

    return compute


__all__ = [
    "FORMAT",
    "KINDS",
    "MANIFEST",
    "V0_FEATURES_DIR",
    "EmbedProgress",
    "FolderIdentity",
    "ShardFn",
    "ShardFolder",
    "load_v0_features",
    "precompute",
    "resolve_device",
    "token_state_shard_fn",
    "token_state_tensors",
    "v0_feature_shard_fn",
    "v0_features_folder",
]
