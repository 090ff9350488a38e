"""`v05 data embed`: precomputed V0 features equal on-the-fly ones, a killed run resumes, devices are honoured.

Runs offline in seconds on the tiny random BERT backbone of tests/v0_model/test_v0_pipeline.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipelines.embed import EmbedConfig, embed, embed_command
from tests.v0_model.test_v0_pipeline import _texts, _untrained_checkpoint, tiny_bert  # noqa: F401 - fixture
from v0_data.tasks.base import Prompt
from v0_model.checkpoint import checkpoint_digest, load_predictor
from v0_model.features import FolderIdentity, ShardFolder, load_v0_features, resolve_device, v0_features_folder
from v05_rl.priors.base import SupportBuffer
from v05_rl.priors.v0 import V0PriorSource


def _parquet(tmp_path: Path, n: int = 30) -> tuple[Path, list[Prompt]]:
    from v0_data.tasks.parquet import read_verl_parquet, write_verl_parquet

    prompts = [Prompt.new("toy", "train", t, "1") for t in _texts(n).values()]
    path = write_verl_parquet(prompts, tmp_path / "train.parquet")
    return path, read_verl_parquet(path)  # the ids the verl trainer will use


class Killed(Exception):
    pass


def test_features_equal_on_the_fly_and_priors_match(tiny_bert, tmp_path):
    ckpt = _untrained_checkpoint(tiny_bert, tmp_path / "v0.pt")
    path, prompts = _parquet(tmp_path)
    out = tmp_path / "features"
    s = embed(EmbedConfig(parquet=(str(path),), out=str(out), checkpoint=str(ckpt), device="cpu", batch_size=4,
                          shard_size=8), progress=False)
    # 30 prompts in shards of 8 -> 4 shards; rows are float32 [F]: bytes per prompt >= 4 F
    assert (s.prompts, s.computed, s.shards, s.kind) == (30, 30, 4, "v0-features")
    folder = Path(s.folder)
    assert folder == v0_features_folder(out, checkpoint_digest(ckpt))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sum(e["prompts"] for e in manifest["shards"].values()) == 30
    assert manifest["identity"]["checkpoint_digest"] == checkpoint_digest(ckpt)

    stored = load_predictor(ckpt, features_dir=out)
    fly = load_predictor(ckpt, cache_dir=tmp_path / "fly", feature_cache=False)
    ids = [p.prompt_id for p in prompts]
    fly.ensure_texts({p.prompt_id: p.text for p in prompts}, progress=False)
    assert stored.model.out_features * 4 <= s.bytes_per_prompt < stored.model.out_features * 4 + 200
    torch.testing.assert_close(stored.features(ids), fly.features(ids), atol=1e-6, rtol=0)

    # the V0 prior from stored features equals the prior computed on the fly, and runs no backbone
    rates = np.random.default_rng(0).uniform(size=20)
    sources = []
    for pred in (stored, fly):
        src = V0PriorSource(pred, SupportBuffer(64), support_size=16, seed=3)
        src.observe(ids[:20], rates)
        sources.append(src)
    v_stored, v_fly = (src.priors(prompts[20:]) for src in sources)
    assert np.isfinite(v_stored).all()
    np.testing.assert_allclose(v_stored, v_fly, atol=1e-6, rtol=0)
    assert stored.computed == 0 and stored.cache.computed == 0
    assert all(stored.known(i) for i in ids)
    assert fly.computed == 30  # the on-the-fly predictor did compute them


def test_a_killed_run_resumes_where_it_stopped(tiny_bert, tmp_path):
    ckpt = _untrained_checkpoint(tiny_bert, tmp_path / "v0.pt")
    path, prompts = _parquet(tmp_path, n=26)
    cfg = EmbedConfig(parquet=(str(path),), out=str(tmp_path / "a"), checkpoint=str(ckpt), device="cpu",
                      batch_size=4, shard_size=6)
    written: list[Path] = []

    def kill_after_two(shard: Path) -> None:
        written.append(shard)
        if len(written) == 2:
            raise Killed

    with pytest.raises(Killed):
        embed(cfg, progress=False, on_shard=kill_after_two)
    folder = written[0].parent
    # a writer killed mid-shard leaves a temporary file (pid 2**22 + 1 is above Linux's pid_max default)
    (folder / "feat-0123.safetensors.tmp4194305").write_bytes(b"partial")
    # ... and, rarely, a finished shard the manifest does not list yet: forget shard 2 in the manifest
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["shards"][written[1].name]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    again = embed(cfg, progress=False)
    # 26 prompts: 12 in the two finished shards are skipped, 14 computed in ceil(14 / 6) = 3 shards
    assert (again.skipped, again.computed, again.shards) == (12, 14, 3)
    assert not list(folder.glob("*.tmp*"))
    assert embed(cfg, progress=False).computed == 0  # a third run has nothing to do

    whole = embed(EmbedConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}), progress=False)
    identity = FolderIdentity("v0-features", load_predictor(ckpt, feature_cache=False, cache_dir=tmp_path / "c")
                              .model.out_features, str(tiny_bert.resolve()), checkpoint_digest(ckpt))
    resumed = load_v0_features(ShardFolder(folder, identity))
    uninterrupted = load_v0_features(ShardFolder(Path(whole.folder), identity))
    assert sorted(resumed) == sorted(uninterrupted) == sorted(p.prompt_id for p in prompts)
    for pid in resumed:
        torch.testing.assert_close(resumed[pid], uninterrupted[pid], atol=1e-6, rtol=0)


def test_token_states_from_a_store_are_what_the_cache_reads(tiny_bert, tmp_path):
    from v0_data.store import TrajectoryStore
    from v0_model.backbone import BackboneConfig, EmbeddingCache, FrozenBackbone, resolve_backbone

    texts = _texts(12)
    store_dir = tmp_path / "store"
    with TrajectoryStore.open(store_dir) as store:
        store.add_prompts([Prompt(pid, "toy", "train" if i < 9 else "test", t, None)
                           for i, (pid, t) in enumerate(texts.items())])
    s = embed(EmbedConfig(store=str(store_dir), split="train", backbone=str(tiny_bert), device="cpu", shard_size=4),
              progress=False)
    assert (s.kind, s.prompts, s.shards) == ("token-states", 9, 3)
    spec = resolve_backbone(BackboneConfig(name=str(tiny_bert)))
    cache = EmbeddingCache(FrozenBackbone(spec), store_dir / "features")  # the default root: <store>/features
    assert Path(s.folder) == cache.dir
    train = {pid: t for i, (pid, t) in enumerate(texts.items()) if i < 9}
    cache.ensure(train, progress=False)
    assert cache.computed == 0  # every token state came from the embed run
    # float16 token states [L, 16] + pooled [16]: 2 * 16 * (L + 1) bytes per prompt, plus shard headers
    data_bytes = sum(2 * 16 * (cache[pid].hidden.shape[0] + 1) for pid in train) / 9
    assert data_bytes <= s.bytes_per_prompt < data_bytes + 200


def test_device_is_honoured(tiny_bert, tmp_path, monkeypatch):
    ckpt = _untrained_checkpoint(tiny_bert, tmp_path / "v0.pt")
    pred = load_predictor(ckpt, "cpu", cache_dir=tmp_path / "c")
    assert pred.device == torch.device("cpu") and pred.cache.backbone.device == "cpu"
    assert all(p.device.type == "cpu" for p in pred.model.parameters())
    meta = load_predictor(ckpt, device="meta", cache_dir=tmp_path / "c")  # any device torch knows is passed through
    assert meta.device == torch.device("meta") and next(meta.model.parameters()).device.type == "meta"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        load_predictor(ckpt, device="cuda", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("tpu-ish")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_cli_and_clear_errors(tiny_bert, tmp_path):
    ckpt = _untrained_checkpoint(tiny_bert, tmp_path / "v0.pt")
    path, _ = _parquet(tmp_path, n=5)
    out = tmp_path / "f"
    res = CliRunner().invoke(embed_command, ["--parquet", str(path), "--out", str(out), "--checkpoint", str(ckpt),
                                             "--device", "cpu", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "v0-features: 5 prompts (0 already stored, 5 computed on cpu" in res.output
    summary = json.loads((v0_features_folder(out, checkpoint_digest(ckpt)) / "embed_summary.json").read_text())
    assert summary["config"]["device"] == "cpu" and summary["computed"] == 5

    res = CliRunner().invoke(embed_command, ["--parquet", str(path)])
    assert res.exit_code == 2 and "give --out DIR" in res.output
    res = CliRunner().invoke(embed_command, ["--out", str(out)])
    assert res.exit_code == 2 and "--parquet FILE" in res.output
    # a features folder without this checkpoint's rows (nor its backbone's token states) is refused
    with pytest.raises(ValueError, match="v05 data embed --checkpoint"):
        load_predictor(ckpt, features_dir=tmp_path / "empty")
    # a folder whose manifest names another checkpoint is refused, never mixed
    folder = v0_features_folder(out, checkpoint_digest(ckpt))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["identity"]["dim"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="identity.dim"):
        load_predictor(ckpt, features_dir=out)
