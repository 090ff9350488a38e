"""V0 end to end on tiny, randomly initialised local backbones: cache, training, checkpoint, CLI, prior.

Everything runs offline in seconds; only `test_minilm_from_wheel` loads the real MiniLM weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from v0_data.tasks.base import Prompt, make_prompt_id
from v0_model.backbone import BackboneConfig, EmbeddingCache, FrozenBackbone, resolve_backbone
from v0_model.checkpoint import FORMAT, load_checkpoint, load_predictor, save_checkpoint
from v0_model.model import V0Config, V0Model
from v0_model.train import PairTable, TrainConfig, load_configs, split_prompts, train_v0

WORDS = ["easy", "hard", "add", "two", "three", "numbers", "solve", "find", "the", "sum", "of", "and", "x", "y"]
TINY_ADAPTER = {"n_queries": 4, "width": 6, "n_heads": 3, "n_layers": 2, "bottleneck": 8}


def _write_tokenizer(path: Path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *list("0123456789"), *[f"##{d}" for d in "0123456789"]]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert "[UNK]" not in tok.convert_ids_to_tokens(tok("easy sum 12")["input_ids"])
    tok.save_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    _write_tokenizer(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    model = BertModel(cfg)
    with torch.no_grad():  # word identity must dominate position noise so that a tiny task is learnable
        model.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    from transformers import Qwen3Config, Qwen3Model

    path = tmp_path_factory.mktemp("tiny_qwen3")
    _write_tokenizer(path)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=8, intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    Qwen3Model(cfg).save_pretrained(str(path))
    return path


def _texts(n: int, seed: int = 0) -> dict[int, str]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        level = "easy" if i % 2 == 0 else "hard"
        filler = " ".join(rng.choice(WORDS[2:], size=int(rng.integers(2, 8))))
        text = f"{filler} {level} {i}"
        out[make_prompt_id("toy", text)] = text
    return out


def _synthetic_table(n_prompts: int = 80, keys=(("m", 1), ("m", 2), ("n", 1))) -> PairTable:
    """'easy' prompts succeed often, 'hard' ones rarely; the level shifts a little per key."""
    texts = _texts(n_prompts)
    rng = np.random.default_rng(1)
    rows = []
    for k, (model, step) in enumerate(keys):
        for pid, text in texts.items():
            p = (0.85 if "easy" in text.split() else 0.15) + 0.03 * k
            rows.append((model, step, pid, rng.binomial(10, min(p, 0.95)) / 10))
    m, s, pids, r = zip(*rows)
    return PairTable(np.array(m, dtype=object), np.array(s), np.array(pids, dtype=np.int64), np.array(r), texts)


# ------------------------------------------------------------------------------------------- backbone


def test_generic_backbone_resolution(tiny_bert, tiny_qwen3):
    bert = resolve_backbone(BackboneConfig(name=str(tiny_bert)))
    qwen = resolve_backbone(BackboneConfig(name=str(tiny_qwen3)))
    assert (bert.pooling, bert.padding_side) == ("mean", "right")
    assert (qwen.pooling, qwen.padding_side) == ("last_token", "left")
    hub = resolve_backbone(BackboneConfig(name="Qwen/Qwen3-Embedding-0.6B"))
    assert (hub.pooling, hub.padding_side) == ("last_token", "left")  # resolving never downloads
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_backbone(BackboneConfig(name=str(tiny_bert.parent)))


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_qwen3"])
def test_cache_computes_once_and_reloads_from_disk(which, request, tmp_path):
    path = request.getfixturevalue(which)
    spec = resolve_backbone(BackboneConfig(name=str(path)))
    texts = _texts(6)
    cache = EmbeddingCache(FrozenBackbone(spec), tmp_path)
    cache.ensure(texts, progress=False)
    assert cache.computed == 6
    cache.ensure(texts, progress=False)  # in memory: nothing recomputed
    assert cache.computed == 6
    pid = next(iter(texts))
    from transformers import AutoTokenizer

    # real tokens only (no padding): as many rows as the tokenizer gives ids for this text
    n_tokens = len(AutoTokenizer.from_pretrained(str(path))(texts[pid])["input_ids"])
    states = cache[pid]
    assert states.hidden.dtype == torch.float16 and states.hidden.shape == (n_tokens, 16) and states.pooled.shape == (16,)
    fresh = EmbeddingCache(FrozenBackbone(spec), tmp_path)  # a new process: loads the shard, computes nothing
    fresh.ensure(texts, progress=False)
    assert fresh.computed == 0
    assert torch.equal(fresh[pid].hidden, states.hidden)
    # same prompt embedded alone gives the same token states as in a padded batch
    alone = FrozenBackbone(spec).encode([texts[pid]])[0]
    torch.testing.assert_close(alone.pooled.float(), states.pooled.float(), atol=2e-3, rtol=2e-3)


def test_minilm_from_wheel():
    spec = resolve_backbone(BackboneConfig())
    assert spec.backbone_id == "all-MiniLM-L6-v2" and Path(spec.path).is_dir()
    states = FrozenBackbone(spec).encode(["What is 2 + 2?", "Find all real x with x^2 = 4."])
    assert states[0].hidden.shape[1] == 384 and states[0].pooled.shape == (384,)


# ------------------------------------------------------------------------------------------ training


def _tiny_cfgs(tiny_bert: Path, **train) -> tuple[V0Config, TrainConfig]:
    v0 = V0Config.from_dict({"backbone": {"name": str(tiny_bert)}, "adapter": TINY_ADAPTER})
    base = dict(context_size=32, query_pairs=8, max_steps=60, eval_every=20, patience=10, max_minutes=2.0, lr=3e-3)
    base.update(train)
    return v0, TrainConfig(**base)


def test_training_reduces_loss_and_learns_the_synthetic_task(tiny_bert, tmp_path):
    table = _synthetic_table()
    v0_cfg, cfg = _tiny_cfgs(tiny_bert)
    res = train_v0(table, v0_cfg, cfg, cache_dir=tmp_path, progress=False)
    hist = res.metrics
    assert res.history[0]["step"] == 0 and "train_loss" not in res.history[0]  # the untrained candidate
    first, last = res.history[1], res.history[-1]
    assert last["train_loss"] < first["train_loss"]
    # 'easy' vs 'hard' is one token: the trained V0 separates validation prompts nearly perfectly
    assert hist["val"]["v0"]["gauc"] > 0.9
    # validation prompts never appear in training rows
    train_t, val_t = split_prompts(table, cfg.val_fraction, cfg.seed)
    assert not set(train_t.prompt_id.tolist()) & set(val_t.prompt_id.tolist())
    assert set(hist["val"]) == {"v0", "context_mean", "knn", "ridge_probe", "bank_only"}
    assert hist["val"]["context_mean"]["gauc"] == pytest.approx(0.5)


def test_load_configs_from_yaml(tmp_path):
    y = tmp_path / "v0.yaml"
    y.write_text("adapter:\n  n_queries: 8\nhead:\n  name: kernel\ntrain:\n  max_steps: 7\n")
    v0, tr = load_configs(y, max_minutes=3.0)
    assert v0.adapter.n_queries == 8 and tr.max_steps == 7 and tr.max_minutes == 3.0
    y.write_text("train:\n  max_stepz: 7\n")
    with pytest.raises(ValueError, match="max_stepz"):
        load_configs(y)
    # inside a shared project file under `v0:`; YAML 1.1 reads 2e-4 as a string -> converted
    y.write_text("rl:\n  lr: 1.0e-4\nv0:\n  head:\n    noise_var: 2e-1\n  train:\n    lr: 2e-4\n")
    v0, tr = load_configs(y)
    assert v0.head.noise_var == 0.2 and tr.lr == 0.0002


# ---------------------------------------------------------------------------------------- checkpoint


def _untrained_checkpoint(tiny_bert: Path, path: Path) -> Path:
    v0_cfg, _ = _tiny_cfgs(tiny_bert)
    torch.manual_seed(3)
    model = V0Model(v0_cfg, 16)
    with torch.no_grad():  # give the zero-initialised offset layer some weight so the round trip is non-trivial
        model.adapter.offset[-1].weight.normal_()
    spec = resolve_backbone(v0_cfg.backbone)
    return save_checkpoint(path, model, backbone_id=spec.backbone_id, data_fingerprint="abc", metrics={"val": {"gauc": 0.5}})


def test_checkpoint_round_trip_and_errors(tiny_bert, tmp_path):
    path = _untrained_checkpoint(tiny_bert, tmp_path / "v0.pt")
    loaded = load_checkpoint(path)
    assert loaded.meta["format"] == FORMAT and loaded.meta["data_fingerprint"] == "abc"
    assert loaded.meta["metrics"]["val"]["gauc"] == 0.5
    pred_a = load_predictor(path, cache_dir=tmp_path / "c")
    pred_b = load_predictor(path, cache_dir=tmp_path / "c")
    texts = _texts(10)
    ids = list(texts)
    for p in (pred_a, pred_b):
        p.ensure_texts(texts, progress=False)
    out_a = pred_a.predict(ids[:6], [0.0, 1.0, 0.2, 0.8, 0.5, 0.5], ids[6:])
    out_b = pred_b.predict(ids[:6], [0.0, 1.0, 0.2, 0.8, 0.5, 0.5], ids[6:])
    np.testing.assert_allclose(out_a, out_b)
    assert np.all((out_a > 0) & (out_a < 1))
    # adapter features were written per checkpoint digest: a fresh predictor needs no token states at all
    pred_c = load_predictor(path, cache_dir=tmp_path / "c")
    torch.testing.assert_close(pred_c.features(ids), pred_a.features(ids))
    assert pred_c.cache.computed == 0

    with pytest.raises(ValueError, match="trained on backbone"):
        load_checkpoint(path, expect_backbone="all-MiniLM-L6-v2")
    bad = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(ValueError, match="not 'v05-v0'"):
        load_checkpoint(bad)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 999
    torch.save(payload, bad)
    with pytest.raises(ValueError, match="format version 999"):
        load_checkpoint(bad)


# ---------------------------------------------------------------------------------------------- CLI


def _release_fixture(folder: Path, n_prompts: int = 24) -> None:
    """A tiny V0-release folder: prompt_dict + context/train rows for two (model, step) keys."""
    texts = list(_texts(n_prompts).values())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt_dict.json").write_text(json.dumps({f"toy_{i}": t for i, t in enumerate(texts)}))
    rng = np.random.default_rng(0)
    with open(folder / "context.jsonl", "w") as c, open(folder / "train.jsonl", "w") as q:
        for model, step in (("m", 16), ("m", 64)):
            for i, t in enumerate(texts):
                score = float(rng.choice([0.6, 1.0]) if "easy" in t.split() else rng.choice([-1.0, -0.6]))
                row = {"id": i, "score": score, "type": "context", "model": model, "step": step, "dataset": "toy"}
                (c if i < 18 else q).write(json.dumps(row if i < 18 else {**row, "type": "train_query"}) + "\n")


def test_predict_v0_cli(tiny_bert, tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main

    ckpt = _untrained_checkpoint(tiny_bert, tmp_path / "v0.pt")
    _release_fixture(tmp_path / "rel")
    out = tmp_path / "preds.jsonl"
    args = ["predict-v0", "--checkpoint", str(ckpt), "--context", str(tmp_path / "rel/context.jsonl"),
            "--queries", str(tmp_path / "rel/train.jsonl"), "--prompts", str(tmp_path / "rel/prompt_dict.json"),
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    inputs = [json.loads(line) for line in (tmp_path / "rel/train.jsonl").read_text().splitlines()]
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outputs) == len(inputs) == 12
    for i, o in zip(inputs, outputs):  # same rows, same order, plus a probability
        assert {k: v for k, v in o.items() if k != "pred"} == i
        assert 0.0 <= o["pred"] <= 1.0
    # each query uses its own (model, step) context: the two keys have different contexts -> different preds
    by_key = {}
    for o in outputs:
        by_key.setdefault(o["step"], []).append(o["pred"])
    assert by_key[16] != by_key[64]

    # a query whose (model, step) has no context row is refused with the row named
    lonely = tmp_path / "lonely.jsonl"
    lonely.write_text(json.dumps({"id": 0, "type": "q", "model": "zzz", "step": 1, "dataset": "toy"}) + "\n")
    args[args.index("--queries") + 1] = str(lonely)
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and "no context row for model 'zzz'" in res.output


@pytest.mark.slow
def test_pretrain_v0_cli_on_release_folder(tiny_bert, tmp_path):
    from click.testing import CliRunner

    from pipelines.cli import main

    _release_fixture(tmp_path / "rel", n_prompts=40)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"backbone:\n  name: {tiny_bert}\nadapter: {json.dumps(TINY_ADAPTER)}\n"
        "train:\n  context_size: 16\n  query_pairs: 4\n  max_steps: 6\n  eval_every: 3\n  val_fraction: 0.25\n"
    )
    out = tmp_path / "v0.pt"
    res = CliRunner().invoke(main, ["pretrain-v0", "--release", str(tmp_path / "rel"), "--out", str(out), "--config",
                                    str(cfg), "--cache-dir", str(tmp_path / "cache"), "--cv-folds", "2", "--quiet"],
                           catch_exceptions=False)
    assert res.exit_code == 0, res.output
    loaded = load_checkpoint(out)
    cv = loaded.meta["metrics"]["cv"]
    assert cv["n_folds"] == 2 and len(cv["folds"]) == 2 and set(cv["summary"]) == {"v0", "context_mean", "knn", "ridge_probe", "bank_only"}
    assert loaded.meta["train_config"]["max_steps"] == 6 and len(loaded.meta["data_fingerprint"]) == 64
    report = Path(str(out) + ".report")
    for name in ("metrics.json", "config.json", "history.jsonl", "calibration.png", "report.md"):
        assert (report / name).is_file(), name
    assert "knn" in json.loads((report / "metrics.json").read_text())["val"]
    res = CliRunner().invoke(main, ["pretrain-v0", "--out", str(out)])
    assert res.exit_code != 0 and "exactly one of --store DIR or --release DIR" in res.output

    # --holdout: train.jsonl stays out of training and of the bank, and is reported on its own
    held_out = tmp_path / "held.pt"
    res = CliRunner().invoke(main, ["pretrain-v0", "--release", str(tmp_path / "rel"), "--out", str(held_out),
                                    "--config", str(cfg), "--cache-dir", str(tmp_path / "cache"), "--holdout",
                                    "train.jsonl", "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    meta = load_checkpoint(held_out).meta
    held = meta["metrics"]["holdout"]
    assert held["file"] == "train.jsonl" and held["n_rows"] == 2 * 22  # prompts 18..39 in both keys
    assert held["metrics"]["v0"]["n"] == 44 and "holdout train.jsonl (44 rows)" in res.output
    bank_ids = set(load_checkpoint(held_out).model.bank.ids.tolist())
    assert len(bank_ids) == 18  # the context prompts only
    assert "Held-out file `train.jsonl`" in (Path(str(held_out) + ".report") / "report.md").read_text()
    res = CliRunner().invoke(main, ["pretrain-v0", "--release", str(tmp_path / "rel"), "--out", str(held_out),
                                    "--holdout", "nope.jsonl"])
    assert res.exit_code != 0 and "not one of the release's score files" in res.output


# --------------------------------------------------------------------------------------------- prior


def test_v0_prior_source(tiny_bert, tmp_path, monkeypatch):
    from v05_rl.priors import PriorOptions, PriorRuntime, PriorSource, make_prior_source

    monkeypatch.setenv("V05_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = _untrained_checkpoint(tiny_bert, tmp_path / "v0.pt")
    texts = _texts(12)
    prompts = [Prompt(pid, "toy", "train", t, None) for pid, t in texts.items()]
    runtime = PriorRuntime(prompts_by_id={p.prompt_id: p for p in prompts})
    src = make_prior_source("v0", PriorOptions(v0_checkpoint=str(ckpt)), runtime)
    assert isinstance(src, PriorSource)
    # cold start: empty buffer -> no prior
    assert np.isnan(src.priors(prompts[:3])).all()
    ids = [p.prompt_id for p in prompts[:8]]
    src.observe(ids, [0.0] * 8)  # one class only -> still no prior
    assert np.isnan(src.priors(prompts[8:])).all()
    src.observe(ids, [0.0, 1.0, 0.3, 0.7, 0.5, 0.9, 0.1, 0.6])
    v = src.priors(prompts[8:])
    assert v.shape == (4,) and np.isfinite(v).all() and np.all(np.abs(v) <= 1.0)
    state = src.state_dict()
    assert len(state["support"]["prompt_ids"]) == 16


@pytest.mark.slow
def test_pretrain_v0_cli_from_store(tiny_bert, tmp_path):
    """The store path: prompts + imported scores -> v0_pairs -> training; the cache lands beside the store."""
    import pyarrow as pa
    from click.testing import CliRunner

    from pipelines.cli import main
    from v0_data.store import TrajectoryStore

    table = _synthetic_table(n_prompts=40, keys=(("m", 1), ("m", 2)))
    store_dir = tmp_path / "store"
    store = TrajectoryStore.open(store_dir)
    try:
        store.add_prompts([Prompt(int(pid), "toy", "train", t, None) for pid, t in table.texts.items()])
        store.add_scores(pa.table({
            "model": pa.array(list(table.model), pa.string()),
            "step": pa.array(table.step, pa.int64()),
            "prompt_id": pa.array(table.prompt_id, pa.int64()),
            "n": pa.array(np.full(len(table), 10), pa.int32()),
            "score": pa.array(2 * table.rate - 1, pa.float64()),
        }))
    finally:
        store.close()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"backbone:\n  name: {tiny_bert}\nadapter: {json.dumps(TINY_ADAPTER)}\n"
                   "train:\n  context_size: 16\n  query_pairs: 4\n  max_steps: 4\n  eval_every: 2\n")
    out = tmp_path / "v0.pt"
    res = CliRunner().invoke(main, ["pretrain-v0", "--store", str(store_dir), "--out", str(out), "--config", str(cfg),
                                    "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "80 pairs" in res.output  # 40 prompts x 2 keys
    assert any((store_dir / "embeddings").rglob("part-*.safetensors"))
    assert load_checkpoint(out).meta["data_fingerprint"] == table.fingerprint()
