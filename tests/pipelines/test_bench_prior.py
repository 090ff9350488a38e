"""`v05 bench prior`: the rows it reports, the Qwen3-Embedding-0.6B shape, the engine share on a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.bench.prior import (QWEN3_EMBEDDING_0_6B, QWEN3_EMBEDDING_0_6B_PARAMS, PriorBenchConfig, bench_prior,
                                   engine_share, synthetic_texts)


def test_qwen3_embedding_shape_has_the_real_parameter_count():
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):  # shapes only: no memory, no weights
        model = Qwen3Model(Qwen3Config(**QWEN3_EMBEDDING_0_6B))
    # 151,669 x 1,024 embeddings + 28 layers x 15.73 M + final norm = 595,776,512 (Qwen3-Embedding-0.6B)
    assert sum(p.numel() for p in model.parameters()) == QWEN3_EMBEDDING_0_6B_PARAMS
    assert model.config.hidden_size == 1024 and model.config.num_hidden_layers == 28


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown backbones"):
        PriorBenchConfig(backbones=("bert",), cold_prompts=(1,))
    with pytest.raises(ValueError, match="one cold_prompts value per backbone"):
        PriorBenchConfig(backbones=("minilm",), cold_prompts=(1, 2))


def test_minilm_rows_cold_vs_precomputed(tmp_path):
    cfg = PriorBenchConfig(prompts=64, context=16, threads=(1,), tokens=24, backbones=("minilm",), cold_prompts=(4,),
                           adapter_prompts=8, repeats=1, tabpfn=False, engine_steps=0)
    lines: list[str] = []
    out = bench_prior(cfg, tmp_path, echo=lines.append)
    (row,) = out["latency"]
    # 4 of 64 prompts timed cold: the per-step figure is extrapolated, and says so
    assert row["cold_extrapolated"] and "extrapolated from 4 prompts" in lines[0]
    assert row["cold_s_per_step"] == pytest.approx(
        64 * (row["cold_backbone_s_per_prompt"] + row["cold_adapter_s_per_prompt"]) + row["precomputed_s_per_step"],
        abs=0.01)
    assert 0 < row["precomputed_s_per_step"] < row["cold_s_per_step"]
    # MiniLM: 168 x 6 query features + 384 pooled = 1,392 float32 features (no bank) = 5,568 bytes
    assert (row["features"], row["feature_bytes_per_prompt"]) == (1392, 5568)
    assert row["tokens_mean"] <= 24
    assert json.loads((tmp_path / "prior_bench.json").read_text())["latency"][0] == row
    assert torch.get_num_threads() >= 1


def test_synthetic_texts_are_seeded():
    assert synthetic_texts(3, 10, 0) == synthetic_texts(3, 10, 0) != synthetic_texts(3, 10, 1)


@pytest.mark.slow
def test_engine_share_on_the_fly_and_precomputed(tmp_path):
    from v0_model.checkpoint import save_checkpoint
    from v0_model.backbone import BackboneConfig, resolve_backbone
    from v0_model.model import V0Config, V0Model

    spec = resolve_backbone(BackboneConfig())
    model = V0Model(V0Config.from_dict({"adapter": {"n_queries": 4}}), 384)
    ckpt = save_checkpoint(tmp_path / "v0.pt", model, backbone_id=spec.backbone_id)
    cfg = PriorBenchConfig(checkpoint=str(ckpt), engine_steps=3, engine_prompts=300, threads=(1,))
    rows = engine_share(cfg, 1, tmp_path)
    assert [r["mode"] for r in rows] == ["on the fly", "precomputed"]
    for r in rows:
        assert r["steps"] == 2 and 0 < r["share"] < 1 and r["t_prior_s_per_step"] > 0
    assert rows[1]["embed_seconds_once"] > 0
