"""A tiny, untrained but real V0 checkpoint for the verl tests: 1-layer BERT backbone saved locally,
the residual query adapter at toy sizes, the kernel head (or TabPFN's, to test launch-time checks)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_ADAPTER = {"n_queries": 4, "width": 6, "n_heads": 3, "n_layers": 1, "bottleneck": 8}


def tiny_backbone(root: Path) -> Path:
    """A 1-layer BERT with a word-piece vocabulary covering `question <letters/digits>` prompts."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = root / "tiny_bert"
    pieces = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", *pieces, *[f"##{c}" for c in pieces]]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    model = BertModel(cfg)
    with torch.no_grad():  # distinct words -> distinct embeddings, so priors differ between prompts
        model.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(path))
    return path


def tiny_v0_checkpoint(root: Path, head: dict | None = None) -> Path:
    """An untrained V0 checkpoint (`v05 pretrain-v0`'s format) over `tiny_backbone`; returns its path."""
    from v0_model.backbone import resolve_backbone
    from v0_model.checkpoint import save_checkpoint
    from v0_model.model import V0Config, V0Model

    backbone = tiny_backbone(root)
    cfg = V0Config.from_dict({"backbone": {"name": str(backbone)}, "adapter": TINY_ADAPTER, "head": head or {}})
    torch.manual_seed(3)
    model = V0Model(cfg, 16)
    with torch.no_grad():  # the offset layer starts at zero; give it weight so that prompts differ
        model.adapter.offset[-1].weight.normal_()
    spec = resolve_backbone(cfg.backbone)
    return save_checkpoint(root / "v0.pt", model, backbone_id=spec.backbone_id, data_fingerprint="tiny")
