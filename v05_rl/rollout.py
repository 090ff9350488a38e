"""Rollout generation: `generate(prompts, n_per_prompt, sampling) -> RolloutBatch`.

Backends (registry `BACKENDS`, chosen with `get_backend(name, model, tokenizer)`):
- ``hf``: a hand-written sampling loop over any `transformers` causal LM with its KV cache; batched,
  CPU or GPU. It records the log-probability of every sampled token as it goes, so the trainer needs no
  extra forward pass for the "old" policy.
- ``vllm``: vLLM's offline `LLM` engine (GPU; install with ``pip install 'v05[vllm]'``).

Conventions shared with the trainer (the pitfall named in DESIGN.md: generation and training must see
the same positions):
- A batch row is ``[left-padded prompt | right-padded response]`` of width ``P + R``. `position_ids` are
  ``cumsum(attention_mask) - 1`` (clamped at 0), exactly the positions the sampler used, so a plain
  forward pass with (`input_ids`, `attention_mask`, `position_ids`) reproduces the sampling log-probs
  (`sequence_logprobs`).
- `response_mask` and `old_logprobs` are ``[N, R]`` (response columns only): 1 on every generated token
  including the EOS token, 0 on padding after it.
- `old_logprobs` are log-probs of the sampled token under ``softmax(logits / temperature)``, **before**
  top-p truncation (as verl and vLLM report them); the trainer recomputes the same quantity with
  ``sequence_logprobs(model, batch, temperature)``. ``temperature == 0`` means greedy decoding; its
  log-probs are then taken at temperature 1.
- Different prompts may get different numbers of samples (`n_per_prompt` a sequence): this is how OSLA
  rounds (Eq. 12) dispatch extra rollouts. Groups come from `prompt_index`, never from block sizes.

Departure from the paper: the paper generates with sglang/vLLM; the embedded engine uses its own loop
because `model.generate` neither returns per-token log-probs cheaply nor is fast for tiny models.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from v0_data.registry import Registry

FINISH_REASONS = ("eos", "length")


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled. Defaults follow the paper's training setup (temperature 1, top-p 1)."""

    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy decoding"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]; the paper evaluates with 0.7"})
    max_new_tokens: int = field(default=16, metadata={"help": "maximum response length in tokens (the EOS token counts)"})

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class RolloutBatch:
    """N sampled sequences. Rows of one prompt share `prompt_index`; P = prompt width, R = response width."""

    prompt_index: np.ndarray  # (N,) int64 index into the `prompts` given to `generate`
    input_ids: torch.Tensor  # [N, P+R] left-padded prompt + right-padded response (pad = tokenizer pad id)
    attention_mask: torch.Tensor  # [N, P+R] 1 on real prompt tokens and generated tokens up to EOS
    position_ids: torch.Tensor  # [N, P+R] cumsum(attention_mask) - 1, clamped at 0
    response_mask: torch.Tensor  # [N, R] float, 1 on generated tokens incl. EOS, 0 after
    old_logprobs: torch.Tensor  # [N, R] float32 log p(token) under softmax(logits / T); 0 where masked
    responses: list[str]  # (N,) decoded responses without special tokens
    n_tokens: np.ndarray  # (N,) int64 generated tokens incl. EOS (= response_mask.sum(-1))
    finish_reason: list[str]  # (N,) "eos" | "length"

    def __post_init__(self) -> None:
        n = len(self.prompt_index)
        if self.input_ids.shape[0] != n or self.old_logprobs.shape[0] != n or len(self.responses) != n:
            raise ValueError(
                f"RolloutBatch fields disagree on N: prompt_index {n}, input_ids {tuple(self.input_ids.shape)}, "
                f"old_logprobs {tuple(self.old_logprobs.shape)}, responses {len(self.responses)}"
            )
        if self.response_mask.shape != self.old_logprobs.shape:
            raise ValueError("RolloutBatch.response_mask and old_logprobs must both be [N, R]")

    def __len__(self) -> int:
        return len(self.prompt_index)

    @property
    def response_width(self) -> int:
        """R: number of response columns."""
        return int(self.old_logprobs.shape[1])

    @property
    def prompt_width(self) -> int:
        """P: number of (left-padded) prompt columns."""
        return int(self.input_ids.shape[1]) - self.response_width

    @property
    def response_ids(self) -> torch.Tensor:
        """[N, R] generated token ids (pad after EOS)."""
        return self.input_ids[:, self.prompt_width :]

    def select(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> "RolloutBatch":
        """The rows `index` (in that order), same widths."""
        idx = np.asarray(index, dtype=np.int64)
        t = torch.as_tensor(idx, device=self.input_ids.device)
        return RolloutBatch(
            prompt_index=self.prompt_index[idx],
            input_ids=self.input_ids[t],
            attention_mask=self.attention_mask[t],
            position_ids=self.position_ids[t],
            response_mask=self.response_mask[t],
            old_logprobs=self.old_logprobs[t],
            responses=[self.responses[i] for i in idx],
            n_tokens=self.n_tokens[idx],
            finish_reason=[self.finish_reason[i] for i in idx],
        )

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """A copy with every tensor on `device`."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in kw.items():
            if isinstance(value, torch.Tensor):
                kw[name] = value.to(device)
        return RolloutBatch(**kw)


def concat_batches(batches: Sequence[RolloutBatch], pad_token_id: int, prompt_offsets: Sequence[int] | None = None) -> RolloutBatch:
    """Stack batches (e.g. the OSLA rounds of one step) into one, re-padding to common P and R.

    Extra prompt columns are added on the left (mask 0), extra response columns on the right, so the
    positions of real tokens do not change. `prompt_offsets[j]` is added to batch j's `prompt_index`
    (default: no offset, i.e. all batches index the same prompt list).
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    P = max(b.prompt_width for b in batches)
    R = max(b.response_width for b in batches)

    def pad(t: torch.Tensor, left: int, right: int, value: float) -> torch.Tensor:
        return F.pad(t, (left, right), value=value) if left or right else t

    parts: dict[str, list[Any]] = {k: [] for k in ("input_ids", "attention_mask", "position_ids", "response_mask", "old_logprobs")}
    for b in batches:
        dp, dr = P - b.prompt_width, R - b.response_width
        parts["input_ids"].append(pad(b.input_ids, dp, dr, pad_token_id))
        parts["attention_mask"].append(pad(b.attention_mask, dp, dr, 0))
        parts["position_ids"].append(pad(b.position_ids, dp, dr, 0))
        parts["response_mask"].append(pad(b.response_mask, 0, dr, 0.0))
        parts["old_logprobs"].append(pad(b.old_logprobs, 0, dr, 0.0))
    offsets = list(prompt_offsets) if prompt_offsets is not None else [0] * len(batches)
    return RolloutBatch(
        prompt_index=np.concatenate([b.prompt_index + o for b, o in zip(batches, offsets)]),
        responses=[r for b in batches for r in b.responses],
        n_tokens=np.concatenate([b.n_tokens for b in batches]),
        finish_reason=[r for b in batches for r in b.finish_reason],
        **{k: torch.cat(v, dim=0) for k, v in parts.items()},
    )


@runtime_checkable
class RolloutBackend(Protocol):
    """Anything that samples responses for prompts."""

    def generate(
        self,
        prompts: Sequence[str],
        n_per_prompt: int | Sequence[int],
        sampling: SamplingConfig,
        *,
        seed: int | None = None,
    ) -> RolloutBatch: ...


BACKENDS: Registry = Registry("rollout backend")


def get_backend(name: str, model: Any, tokenizer: Any, **kwargs: Any) -> RolloutBackend:
    """The backend `name` ("hf" or "vllm") wrapped around `model` / `tokenizer`.

    For ``vllm``, `model` may be a path or Hub id (vLLM loads its own copy) or a loaded HF model whose
    `name_or_path` is used.
    """
    return BACKENDS.get(name)(model, tokenizer, **kwargs)


# ----------------------------------------------------------------------------------------------
# Pure helpers


def expand_n_per_prompt(n_prompts: int, n_per_prompt: int | Sequence[int]) -> np.ndarray:
    """(N,) prompt index of every sequence: prompt i repeated n_i times, prompts in order.

    >>> expand_n_per_prompt(3, [2, 0, 1]).tolist()
    [0, 0, 2]
    """
    if isinstance(n_per_prompt, (int, np.integer)):
        counts = np.full(n_prompts, int(n_per_prompt), dtype=np.int64)
    else:
        counts = np.asarray(list(n_per_prompt), dtype=np.int64)
        if counts.shape != (n_prompts,):
            raise ValueError(f"n_per_prompt has {counts.size} entries but there are {n_prompts} prompts; give one count per prompt")
    if (counts < 0).any():
        raise ValueError(f"n_per_prompt must be >= 0, got {counts[counts < 0][:5].tolist()}")
    return np.repeat(np.arange(n_prompts, dtype=np.int64), counts)


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids and attention mask of a list of prompts. Shapes: -> (U, P), (U, P) long."""
    P = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), P), pad_id, dtype=torch.long)  # [U, P]
    mask = torch.zeros((len(token_lists), P), dtype=torch.long)  # [U, P]
    for row, toks in enumerate(token_lists):
        ids[row, P - len(toks) :] = torch.tensor(list(toks))
        mask[row, P - len(toks) :] = 1
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: cumsum(mask) - 1, clamped at 0. Shape: [B, L] -> [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens [B], log p(token) under softmax(logits / T) [B]).

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (at least one).
    The returned log-prob is the untruncated one (see module docstring). T = 0: argmax, log-prob at T=1.
    """
    logits = logits.float()  # [B, V]
    if temperature <= 0.0:
        logp = F.log_softmax(logits, dim=-1)  # [B, V]
        tokens = logp.argmax(dim=-1)  # [B]
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = F.log_softmax(logits / temperature, dim=-1)  # [B, V]
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before this token already reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)  # [B, 1] positions in sorted order
        tokens = order.gather(-1, choice).squeeze(-1)
    else:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [B]
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class TokenStats(NamedTuple):
    logprobs: torch.Tensor  # [N, R] log p(token) under softmax(logits / T), 0 where response_mask is 0
    entropy: torch.Tensor  # [N, R] entropy of softmax(logits / T), 0 where response_mask is 0


def sequence_logprobs_and_entropy(model: Any, batch: RolloutBatch, temperature: float = 1.0) -> TokenStats:
    """Per-token log-probs and entropies of the batch's responses under `model` (with grad).

    One forward pass over [N, P+R] with the batch's attention mask and position ids; only the logits
    that predict response tokens are materialised (`logits_to_keep = R + 1`).
    """
    T = temperature if temperature > 0 else 1.0
    R = batch.response_width
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "use_cache": False}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = R + 1
    logits = model(**kwargs).logits[:, -(R + 1) : -1].float() / T  # [N, R, V] predictions of response tokens
    logp_all = F.log_softmax(logits, dim=-1)  # [N, R, V]
    targets = batch.input_ids[:, -R:]  # [N, R]
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)  # [N, R]
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N, R]
    mask = batch.response_mask.to(logp.dtype)
    return TokenStats(logp * mask, entropy * mask)


def sequence_logprobs(model: Any, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """[N, R] log-probs of the sampled response tokens under `model` at `temperature`, with grad.

    Equals `batch.old_logprobs` (to float tolerance) when `model` is the sampling policy.
    """
    return sequence_logprobs_and_entropy(model, batch, temperature).logprobs


# ----------------------------------------------------------------------------------------------
# hf backend


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _accepts(model: Any, name: str) -> bool:
    return name in _forward_params(type(model))


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation_config names none; set tokenizer.eos_token")
    return sorted(ids)


@BACKENDS.register("hf")
class HFBackend:
    """Batched sampling with a KV cache for any `transformers` causal LM (CPU or GPU).

    Prompts are tokenised once (cached); each distinct prompt of a chunk is prefilled once and its
    KV cache copied to its n samples. Finished rows keep decoding (cheap for short responses) but
    their tokens are masked out.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 1024, add_special_tokens: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.add_special_tokens = add_special_tokens
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self._cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
        self._token_cache: dict[str, list[int]] = {}

    def _tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if missing:
            enc = self.tokenizer(list(missing), add_special_tokens=self.add_special_tokens)["input_ids"]
            for p, ids in zip(missing, enc):
                if not ids:
                    raise ValueError(f"prompt {p!r} tokenises to nothing; give non-empty prompts")
                self._token_cache[p] = list(ids)
            if len(self._token_cache) > 200_000:
                self._token_cache.clear()
        return [self._token_cache[p] for p in prompts]

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        n_per_prompt: int | Sequence[int],
        sampling: SamplingConfig = SamplingConfig(),
        *,
        seed: int | None = None,
    ) -> RolloutBatch:
        prompt_index = expand_n_per_prompt(len(prompts), n_per_prompt)  # (N,)
        device = next(self.model.parameters()).device
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        was_training = self.model.training
        self.model.eval()
        try:
            token_lists = self._tokenize(prompts)
            chunks = [
                self._generate_chunk(token_lists, prompt_index[i : i + self.max_batch_size], sampling, generator, device)
                for i in range(0, len(prompt_index), self.max_batch_size)
            ]
        finally:
            self.model.train(was_training)
        if not chunks:
            return _empty_batch(self.pad_id, device)
        return concat_batches(chunks, self.pad_id)

    def _generate_chunk(
        self,
        token_lists: list[list[int]],
        prompt_index: np.ndarray,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> RolloutBatch:
        unique, inverse = np.unique(prompt_index, return_inverse=True)  # prefill each distinct prompt once
        ids, mask = (t.to(device) for t in left_pad([token_lists[i] for i in unique], self.pad_id))  # [U, P]
        P = ids.shape[1]
        pos = positions_from_mask(mask)  # [U, P]

        from transformers import DynamicCache  # local: keep `import v05_rl.rollout` light

        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self._cache_kw: cache}, logits_to_keep=1)
        expand = torch.as_tensor(inverse, device=device)  # (N,) row of each sequence's prompt
        cache.reorder_cache(expand)  # copy each prompt's KV cache to its samples
        logits = out.logits[:, -1][expand]  # [N, V]
        mask = mask[expand]  # [N, P]
        next_pos = mask.sum(-1)  # [N] position of the first response token
        N = len(prompt_index)
        eos = torch.tensor(self.eos_ids, device=device)
        finished = torch.zeros(N, dtype=torch.bool, device=device)
        tokens_out, logps_out, alive_out = [], [], []
        for step in range(sampling.max_new_tokens):
            tok, lp = sample_tokens(logits, sampling.temperature, sampling.top_p, generator)  # [N], [N]
            alive = ~finished
            tokens_out.append(torch.where(alive, tok, torch.full_like(tok, self.pad_id)))
            logps_out.append(torch.where(alive, lp, torch.zeros_like(lp)))
            alive_out.append(alive)
            finished = finished | torch.isin(tok, eos)
            if bool(finished.all()) or step == sampling.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((N, 1), dtype=mask.dtype, device=device)], dim=1)  # [N, P+t+1]
            out = self.model(
                input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], use_cache=True, **{self._cache_kw: cache}
            )
            logits = out.logits[:, -1]  # [N, V]
            next_pos = next_pos + 1
        response = torch.stack(tokens_out, dim=1)  # [N, R]
        response_mask = torch.stack(alive_out, dim=1).float()  # [N, R]
        old_logprobs = torch.stack(logps_out, dim=1).float()  # [N, R]
        full_mask = torch.cat([mask[:, :P], response_mask.long()], dim=1)  # [N, P+R]
        input_ids = torch.cat([ids[expand], response], dim=1)  # [N, P+R]
        n_tokens = response_mask.sum(-1).long().cpu().numpy()
        ended = finished.cpu().numpy()
        texts = self.tokenizer.batch_decode(response.cpu().tolist(), skip_special_tokens=True)
        return RolloutBatch(
            prompt_index=np.asarray(prompt_index, dtype=np.int64),
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions_from_mask(full_mask),
            response_mask=response_mask,
            old_logprobs=old_logprobs,
            responses=texts,
            n_tokens=n_tokens.astype(np.int64),
            finish_reason=["eos" if e else "length" for e in ended],
        )


def _empty_batch(pad_id: int, device: torch.device) -> RolloutBatch:
    z = torch.zeros((0, 1), dtype=torch.long, device=device)
    return RolloutBatch(
        prompt_index=np.zeros(0, dtype=np.int64),
        input_ids=z,
        attention_mask=z.clone(),
        position_ids=z.clone(),
        response_mask=torch.zeros((0, 0), device=device),
        old_logprobs=torch.zeros((0, 0), device=device),
        responses=[],
        n_tokens=np.zeros(0, dtype=np.int64),
        finish_reason=[],
    )


# ----------------------------------------------------------------------------------------------
# vllm backend


@BACKENDS.register("vllm")
class VLLMBackend:
    """vLLM offline engine (GPU only). `model` is a path / Hub id, or a loaded model (its name_or_path).

    The batch is built with the tokenizer's pad id so the trainer can score it with
    `sequence_logprobs` on its own HF copy of the policy; after each policy update call
    `load_weights(model)` to push the new weights into the engine.
    """

    def __init__(self, model: Any, tokenizer: Any, **llm_kwargs: Any):
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "the 'vllm' rollout backend needs vLLM, which is not installed; run `pip install 'v05[vllm]'` "
                "on a machine with a CUDA GPU, or use --backend hf"
            ) from exc
        from vllm import LLM

        path = model if isinstance(model, str) else getattr(model, "name_or_path", None)
        if not path:
            raise ValueError("the vllm backend needs a model path or Hub id (or a model with name_or_path)")
        self.tokenizer = tokenizer
        self.eos_ids = _eos_ids(model if not isinstance(model, str) else None, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.llm = LLM(model=path, **llm_kwargs)

    def load_weights(self, model: Any) -> None:
        """Copy the trainer's current weights into the engine (single-process vLLM)."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights(model.state_dict().items())

    def generate(self, prompts, n_per_prompt, sampling=SamplingConfig(), *, seed=None) -> RolloutBatch:
        from vllm import SamplingParams

        prompt_index = expand_n_per_prompt(len(prompts), n_per_prompt)
        counts = np.bincount(prompt_index, minlength=len(prompts))
        todo = [i for i in range(len(prompts)) if counts[i] > 0]
        params = [
            SamplingParams(
                n=int(counts[i]),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,
                seed=None if seed is None else int(seed) + i,
            )
            for i in todo
        ]
        outputs = self.llm.generate([prompts[i] for i in todo], params, use_tqdm=False)
        rows: list[tuple[int, list[int], list[int], list[float], str]] = []
        for i, out in zip(todo, outputs):
            p_ids = list(out.prompt_token_ids)
            for c in out.outputs:
                lps = [float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs or [])] if c.logprobs else [0.0] * len(c.token_ids)
                rows.append((i, p_ids, list(c.token_ids), lps, "eos" if c.finish_reason == "stop" else "length"))
        return _batch_from_rows(rows, self.pad_id, self.tokenizer)


def _batch_from_rows(rows, pad_id: int, tokenizer: Any) -> RolloutBatch:
    """Assemble a RolloutBatch from (prompt index, prompt ids, response ids, logprobs, finish reason) rows."""
    if not rows:
        return _empty_batch(pad_id, torch.device("cpu"))
    P = max(len(r[1]) for r in rows)
    R = max(1, max(len(r[2]) for r in rows))
    N = len(rows)
    ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((N, P + R), dtype=torch.long)
    rmask = torch.zeros((N, R))
    lps = torch.zeros((N, R))
    for j, (_, p, r, lp, _) in enumerate(rows):
        ids[j, P - len(p) : P] = torch.tensor(p)
        mask[j, P - len(p) : P] = 1
        if r:
            ids[j, P : P + len(r)] = torch.tensor(r)
            mask[j, P : P + len(r)] = 1
            rmask[j, : len(r)] = 1
            lps[j, : len(r)] = torch.tensor(lp)
    return RolloutBatch(
        prompt_index=np.array([r[0] for r in rows], dtype=np.int64),
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        response_mask=rmask,
        old_logprobs=lps,
        responses=tokenizer.batch_decode([r[2] for r in rows], skip_special_tokens=True),
        n_tokens=np.array([len(r[2]) for r in rows], dtype=np.int64),
        finish_reason=[r[4] for r in rows],
    )


__all__ = [
    "BACKENDS",
    "FINISH_REASONS",
    "HFBackend",
    "RolloutBackend",
    "RolloutBatch",
    "SamplingConfig",
    "TokenStats",
    "VLLMBackend",
    "concat_batches",
    "expand_n_per_prompt",
    "get_backend",
    "positions_from_mask",
    "sample_tokens",
    "sequence_logprobs",
    "sequence_logprobs_and_entropy",
]

