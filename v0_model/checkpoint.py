"""One-file V0 checkpoints: `torch.save` of a plain dict (tensors + JSON-able values only).

Contents: `format` ("v05-v0"), `format_version`, `config` (the full V0Config as a dict), `train_config`,
`backbone_id` (what the adapter was trained on), `input_dim`, `head` (name + the head's fitted
hyper-parameters), `state_dict` (adapter + head weights, and the difficulty bank's prompt ids, unit
embeddings and weights), `data_fingerprint` (sha256 of the training
rows), `metrics` and `created_at`. Loading uses `weights_only=True`, so a checkpoint cannot run code.
A file of another format or version, or a backbone other than the expected one, fails with a message
that says what was found and what to do.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from v0_model.backbone import EmbeddingCache, FrozenBackbone, resolve_backbone
from v0_model.features import V0_FEATURES_DIR, FolderIdentity, ShardFolder, resolve_device, v0_features_folder
from v0_model.model import V0Config, V0Model, V0Predictor

FORMAT = "v05-v0"
FORMAT_VERSION = 2  # 2: difficulty bank (bank.py); version-1 files load with the bank disabled
READABLE_VERSIONS = (1, 2)


class LoadedV0(NamedTuple):
    model: V0Model
    config: V0Config
    meta: dict  # everything else in the file except the weights


def _jsonable(x: Any) -> Any:
    """Round-trip through JSON so the file holds only plain types (safe for weights_only loading)."""
    return json.loads(json.dumps(x, default=float))


def save_checkpoint(
    path: str | os.PathLike,
    model: V0Model,
    *,
    backbone_id: str,
    data_fingerprint: str = "",
    metrics: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the checkpoint atomically (temporary file, then rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head_info = {"name": model.cfg.head.name}
    if hasattr(model.head, "hyperparameters"):
        head_info["fitted"] = model.head.hyperparameters()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _jsonable(model.cfg.to_dict()),
        "train_config": _jsonable(dict(train_config or {})),
        "backbone_id": backbone_id,
        "input_dim": int(model.input_dim),
        "head": _jsonable(head_info),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "data_fingerprint": data_fingerprint,
        "metrics": _jsonable(dict(metrics or {})),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, *, expect_backbone: str | None = None) -> LoadedV0:
    """Read a checkpoint written by `save_checkpoint`; refuse other formats, versions and backbones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"V0 checkpoint {path} not found; create one with `v05 pretrain-v0 --out {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} is not a V0 checkpoint readable by this version ({type(err).__name__}: {err}); "
            "re-export it with `v05 pretrain-v0`"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: format {found!r} is not {FORMAT!r}; this file was not written by `v05 pretrain-v0`")
    if payload.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: checkpoint format version {payload.get('format_version')} is not supported "
            f"(this code reads versions {list(READABLE_VERSIONS)}); re-train with `v05 pretrain-v0` or use the matching v05 release"
        )
    config = dict(payload["config"])
    if payload["format_version"] == 1:  # written before the difficulty bank existed
        config["bank"] = {"enabled": False}
    cfg = V0Config.from_dict(config)
    if expect_backbone is not None and payload["backbone_id"] != expect_backbone:
        raise ValueError(
            f"{path}: the adapter was trained on backbone {payload['backbone_id']!r}, but {expect_backbone!r} was "
            "requested; token states of different backbones are not interchangeable — use the checkpoint's "
            "backbone or re-train V0 on the other one"
        )
    bank_ids = payload["state_dict"].get("bank.ids")
    model = V0Model(cfg, int(payload["input_dim"]), bank_size=0 if bank_ids is None else int(bank_ids.numel()))
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the configured architecture (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); the file is damaged or from another version"
        )
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return LoadedV0(model.eval(), cfg, meta)


def checkpoint_digest(path: str | os.PathLike) -> str:
    """sha256 of the checkpoint file (names its adapter-feature cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_predictor(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    cache_dir: str | os.PathLike | None = None,
    feature_cache: bool = True,
    features_dir: str | os.PathLike | None = None,
) -> V0Predictor:
    """Checkpoint -> `V0Predictor` with the checkpoint's backbone and an embedding cache.

    The backbone is resolved from the saved config; its resolved id must equal the one recorded at
    training time (a different model directory or name is refused). `device` ('cpu', 'cuda', 'cuda:N',
    'auto') is where the backbone, adapter and head run. With `feature_cache`, feature rows are also kept
    on disk under `<root>/v0-features/<checkpoint digest>/`, where root is `features_dir` when given,
    else the cache folder. `features_dir` is a folder written by `v05 data embed` (with or without
    `--checkpoint`): rows stored there are read, never recomputed, and token states stored there are used
    when `cache_dir` is not given; a folder holding neither for this checkpoint is refused.
    """
    loaded = load_checkpoint(path)
    spec = resolve_backbone(loaded.config.backbone)
    if spec.backbone_id != loaded.meta["backbone_id"]:
        raise ValueError(
            f"{path}: trained on backbone {loaded.meta['backbone_id']!r} but its config now resolves to "
            f"{spec.backbone_id!r}; make the original backbone available at the same path"
        )
    dev = resolve_device(str(device))
    if features_dir is not None and cache_dir is None:
        cache_dir = features_dir
    cache = EmbeddingCache(FrozenBackbone(spec, device=str(dev)), cache_dir)
    digest = checkpoint_digest(path)
    identity = FolderIdentity("v0-features", loaded.model.out_features, spec.backbone_id, digest)
    folder = ShardFolder(v0_features_folder(features_dir if features_dir is not None else cache.dir.parent, digest),
                         identity)
    if features_dir is not None:
        _check_features_dir(Path(features_dir), folder, cache, path)
    return V0Predictor(loaded.model, cache, folder if feature_cache or features_dir is not None else None, dev)


def _check_features_dir(root: Path, folder: ShardFolder, cache: EmbeddingCache, checkpoint: str | os.PathLike) -> None:
    """Refuse a `features_dir` that holds nothing usable for this checkpoint, naming what it does hold."""
    folder.read_manifest()  # a folder of another identity fails here with the field named
    if folder.shards() or any(cache.dir.glob("part-*.safetensors")):
        return
    others = sorted(p.name for p in (root / V0_FEATURES_DIR).glob("*")) if (root / V0_FEATURES_DIR).is_dir() else []
    states = sorted(p.name for p in root.glob("*") if p.is_dir() and p.name != V0_FEATURES_DIR)
    raise ValueError(
        f"features_dir {root} holds no features of checkpoint {checkpoint} (expected {folder.path}) and no token "
        f"states of its backbone (expected {cache.dir}); it has feature folders {others or 'none'} (other "
        f"checkpoints) and token-state folders {states or 'none'}. Fix: run `v05 data embed --checkpoint "
        f"{checkpoint} --out {root} ...`, or drop the option to compute features on the fly"
    )
