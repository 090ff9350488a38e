"""Policies: a family of tiny Qwen3 models for the embedded `arith` world, and one loader for all.

`load_policy(name_or_path_or_hub_id)` returns ``(model, tokenizer)``:
- a family name (``tiny-s``, ``tiny-m``, ``tiny-l``; see `POLICIES`) builds a `Qwen3ForCausalLM` from
  scratch with a character-level tokenizer, warm-starts it by short supervised training on `arith`
  (seeded) so that it begins RL with a partial success rate, saves it with `save_pretrained` under the
  user cache (``$V05_CACHE/policies/<name>-<hash>`` or ``~/.cache/v05/policies/<name>-<hash>``) and
  reuses it afterwards; the hash covers everything that determines the weights;
- a local directory is loaded with `AutoModelForCausalLM` / `AutoTokenizer` (any causal LM);
- anything else is taken as a Hugging Face Hub id (e.g. ``Qwen/Qwen3-0.6B``): loaded from the local HF
  cache, downloaded only because the user named it.

Saved tiny policies are ordinary Qwen3 checkpoints: ``AutoModelForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load them without `trust_remote_code`.

Departures from the paper: the paper's policies are pretrained Qwen3 LLMs; ours are trained from
scratch for a minute or two, so that stage one (many policies x steps) runs on a laptop. The warm start
is chosen by measurement (see the project report) so that RL visibly works:
- level-balanced examples (uniform rung of the `arith` ladder, then a uniform problem), so the small
  one-digit rungs are learned as well as the large multi-digit ones;
- small batches (32) and many steps (2,400 for tiny-m): at equal compute this learned digit alignment
  far better than 600 steps of 128;
- label smoothing 0.5 on the answer tokens: the policy ends under-confident, with a wide sampling
  distribution at temperature 1 / top-p 0.7, like an LLM after brief SFT. Per-prompt success rates then
  spread over (0, 1) and RL gains come quickly from sharpening, as reported for RL on LLMs. Without it,
  plain GRPO on the same policy gained ~2 points in 8 minutes; with it, >20 points within minutes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from v0_data.registry import Registry

FORMAT_VERSION = 2  # bump when the tokenizer or the warm-start recipe changes meaning
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARSET = string.printable[:95]  # printable ASCII: digits, letters, punctuation, space


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_char_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: one token per printable ASCII char + pad/eos/unk.

    Ids: <pad>=0, <eos>=1, <unk>=2, then the 95 printable characters (vocab 98). Decoding joins the
    characters without spaces. Saved with `save_pretrained` it is a plain tokenizer.json that
    `AutoTokenizer.from_pretrained` loads.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    tok.padding_side = "left"
    return tok


# ----------------------------------------------------------------------------------------------
# Family


@dataclass(frozen=True)
class PolicySpec:
    """Shape of one tiny Qwen3 policy."""

    hidden_size: int = field(metadata={"help": "model width"})
    num_layers: int = field(metadata={"help": "decoder layers"})
    num_heads: int = field(metadata={"help": "attention heads (head_dim = hidden_size / num_heads)"})
    intermediate_size: int = field(metadata={"help": "MLP width"})
    num_kv_heads: int | None = field(default=None, metadata={"help": "key/value heads (default: num_heads)"})

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"PolicySpec.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"PolicySpec.num_heads {self.num_heads} is not divisible by num_kv_heads {kv}")


@dataclass(frozen=True)
class WarmStartConfig:
    """Supervised warm start on `arith`: next-token loss on the answer (and EOS) only."""

    steps: int = field(default=2400, metadata={"help": "optimizer steps (0 = no warm start)"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (linear warm-up 5 %, cosine decay to 10 %)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    label_smoothing: float = field(
        default=0.5,
        metadata={"help": "cross-entropy label smoothing: leaves the policy under-confident (a wide sampling distribution) for RL to sharpen"},
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and task generation"})
    arith_spec: str = field(default="n_prompts=20000", metadata={"help": "arith source spec of the training prompts (train split)"})

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"WarmStartConfig needs steps >= 0, batch_size >= 1, lr > 0; got {self}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"WarmStartConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class PolicyRecipe:
    """Everything that determines a family member's weights (its hash names the cache directory)."""

    name: str
    spec: PolicySpec
    warm_start: WarmStartConfig = WarmStartConfig()

    def digest(self) -> str:
        payload = {"format": FORMAT_VERSION, "charset": CHARSET, **asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


POLICIES: Registry = Registry("policy")


def _register(recipe: PolicyRecipe) -> None:
    POLICIES.register(recipe.name)(recipe)


_register(PolicyRecipe("tiny-s", PolicySpec(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)))
_register(PolicyRecipe("tiny-m", PolicySpec(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)))
_register(PolicyRecipe("tiny-l", PolicySpec(hidden_size=192, num_layers=6, num_heads=6, intermediate_size=576)))

FAMILY: tuple[str, ...] = ("tiny-s", "tiny-m", "tiny-l")


def qwen3_config(spec: PolicySpec, tokenizer: Any):
    """The `Qwen3Config` of `spec` for `tokenizer` (tied embeddings, RoPE, RMSNorm as in Qwen3)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=True,
        attn_implementation="sdpa",
    )


def build_policy(spec: PolicySpec, seed: int = 0, tokenizer: Any = None):
    """A freshly initialised (model, tokenizer) pair for `spec` (no training)."""
    from transformers import Qwen3ForCausalLM

    tokenizer = tokenizer or build_char_tokenizer()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(spec, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def n_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------------------
# Warm start


def encode_sft_batch(tokenizer: Any, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + target + <eos>` rows and labels that score only target + EOS.

    Returns (input_ids [B, L], attention_mask [B, L], labels [B, L] with -100 outside the target).
    """
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    rows = [(p, t + [tokenizer.eos_token_id]) for p, t in zip(p_ids, t_ids)]
    L = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)
    return ids, mask, labels


def sft_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions. Shapes: [B, L] each -> scalar."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()  # [B, L-1, V]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=label_smoothing
    )


def warm_start(model: Any, tokenizer: Any, cfg: WarmStartConfig, *, progress: bool = True, log: list | None = None) -> dict[str, float]:
    """Supervised training on arith train prompts with answers in the world's format (in place).

    Examples are level-balanced (uniform level, then uniform problem) so that easy rungs with few
    distinct problems are learned as well as the large hard ones.

    Returns {"loss": last smoothed loss, "seconds": wall time}.
    """
    from v0_data.tasks.arith import ArithSource, format_answer

    prompts = ArithSource().load(cfg.arith_spec, split="train")
    by_level: dict[Any, list] = {}
    for p in prompts:
        by_level.setdefault(p.meta.get("level"), []).append(p)
    levels = sorted(by_level, key=str)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    warm = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        frac = (step - warm) / max(1, cfg.steps - warm)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    t0, ema = time.perf_counter(), float("nan")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="warm start", leave=False)
    for step in range(cfg.steps):
        # level-balanced: a uniform level, then a uniform problem of that level
        batch = [rng.choice(by_level[rng.choice(levels)]) for _ in range(cfg.batch_size)]
        fmt = batch[0].meta.get("answer_format", "reversed")
        ids, mask, labels = encode_sft_batch(tokenizer, [p.text for p in batch], [format_answer(int(p.answer), fmt) for p in batch])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = sft_loss(model, ids, mask, labels, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        if log is not None:
            log.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return {"loss": ema, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# Cache and loading


def cache_root() -> Path:
    """`$V05_CACHE/policies` or `~/.cache/v05/policies`."""
    base = os.environ.get("V05_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "v05") / "policies"


def policy_dir(recipe: PolicyRecipe) -> Path:
    return cache_root() / f"{recipe.name}-{recipe.digest()}"


def ensure_policy(name: str, *, progress: bool = True, overrides: dict[str, Any] | None = None) -> Path:
    """Path of the cached, warm-started family member `name`; builds and saves it on first use.

    `overrides` replaces fields of its `WarmStartConfig` (e.g. ``{"steps": 100}``) and so names a
    different cache entry. The directory is written to a temporary sibling and renamed, so an
    interrupted build never leaves a half-written policy behind.
    """
    recipe: PolicyRecipe = POLICIES.get(name)
    if overrides:
        recipe = replace(recipe, warm_start=replace(recipe.warm_start, **overrides))
    path = policy_dir(recipe)
    if (path / "v05_policy.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_policy(recipe.spec, seed=recipe.warm_start.seed)
    stats = warm_start(model, tokenizer, recipe.warm_start, progress=progress) if recipe.warm_start.steps else {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"format": FORMAT_VERSION, "recipe": asdict(recipe), "n_parameters": n_parameters(model), "warm_start": stats}
        (tmp / "v05_policy.json").write_text(json.dumps(info, indent=2))
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_policy(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", *, progress: bool = True):
    """(model, tokenizer) for a family name, a local checkpoint directory or a Hub id (see module doc).

    The model is returned in eval mode on `device`; the tokenizer gets a pad token (EOS if it has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(name_or_path)
    if key in POLICIES:
        path: str = str(ensure_policy(key, progress=progress))
        local = True
    else:
        p = Path(key).expanduser()
        local = p.exists()
        if local and not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} exists but holds no config.json; give a directory written by save_pretrained")
        path = str(p) if local else key
        if not local and ("/" not in key or key.startswith((".", "/", "~"))):
            raise FileNotFoundError(f"policy {key!r} is neither a family member ({', '.join(POLICIES.names())}), a directory nor a Hub id 'org/name'")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


__all__ = [
    "CHARSET",
    "FAMILY",
    "POLICIES",
    "PolicyRecipe",
    "PolicySpec",
    "WarmStartConfig",
    "build_char_tokenizer",
    "build_policy",
    "cache_root",
    "encode_sft_batch",
    "ensure_policy",
    "load_policy",
    "n_parameters",
    "policy_dir",
    "qwen3_config",
    "sft_loss",
    "warm_start",
]
