"""YAML configs: every shipped file is valid, the legacy flat keys build the same configs as the nested form,
precedence defaults < YAML < command line (field by field inside nested sections), clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelines.build_data import BuildDataConfig
from pipelines.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    SECTIONS,
    ConfigError,
    dotted_keys,
    flatten,
    is_verl_config,
    load_config,
    parse_set,
    plain,
    read_yaml,
    to_yaml,
    validate_file,
)
from v05_rl.engine.config import ALGORITHMS, LEGACY_KEYS, TrainConfig

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))
OURS = [p for p in SHIPPED if not is_verl_config(read_yaml(p))]  # the others are verl / Hydra configs
EXPERIMENTS = sorted((CONFIG_DIR / "experiments").glob("*.yaml"))
CLASSES = {"rl": TrainConfig, "build_data": BuildDataConfig}
NEW_TO_OLD = {new: old for old, new in LEGACY_KEYS.items()}

# pipelines/configs/tiny.yaml as it was before the config was nested (flat keys; its comments left out).
TINY_LEGACY = """\
rl:
  policy: tiny-m
  tasks: arith
  tasks_path: "n_prompts=5000"
  rollouts_per_step: 256
  steps: 200
  lr: 1.0e-4
  warmup_steps: 5
  max_new_tokens: 8
  eval_every: 20
  eval_prompts: 256
  eval_k: 4
  save_every: 20
build_data:
  policies: [tiny-s, tiny-m, tiny-l]
  steps: 30
"""


def legacy_form(values: dict) -> dict:
    """A nested mapping rewritten with the old flat keys wherever one exists (the inverse of LEGACY_KEYS)."""
    flat = flatten(TrainConfig, values, where="test")
    return {NEW_TO_OLD.get(key, key): value for key, value in flat.items()}


def test_the_embedded_default_exists():
    assert DEFAULT_CONFIG.is_file()
    assert set(read_yaml(DEFAULT_CONFIG)) <= set(SECTIONS)
    assert set(CLASSES) == set(SECTIONS)
    assert DEFAULT_CONFIG in OURS and {p.name for p in SHIPPED} - {p.name for p in OURS} == {
        "paper.yaml", "grpo.yaml", "dapo.yaml"}  # validated by the verl tests against verl's defaults
    assert validate_file(CONFIG_DIR / "paper.yaml", CLASSES) == {}


@pytest.mark.parametrize("path", OURS, ids=[p.name for p in OURS])
def test_every_shipped_yaml_is_valid(path: Path):
    data = read_yaml(path)
    built = validate_file(path, CLASSES)
    assert set(built) == set(data)
    for section, cfg in built.items():
        # every key written in the file is taken over (none silently ignored), nested ones included
        for key, value in flatten(CLASSES[section], data[section] or {}, where=path.name).items():
            got = plain(cfg)
            for part in key.split("."):
                got = got[part]
            assert got == value or isinstance(value, str), (section, key, got, value)


@pytest.mark.parametrize("path", OURS, ids=[p.name for p in OURS])
def test_legacy_flat_form_builds_the_same_config(path: Path, tmp_path, capsys):
    data = read_yaml(path)
    legacy = tmp_path / "legacy.yaml"
    legacy.write_text(yaml.safe_dump({**data, "rl": legacy_form(data["rl"])}))
    nested = load_config(TrainConfig, "rl", path)
    assert nested != TrainConfig()  # the file changes something, so the comparison below can fail
    capsys.readouterr()
    assert load_config(TrainConfig, "rl", legacy) == nested
    err = capsys.readouterr().err
    moved = [k for k in legacy_form(data["rl"]) if k in LEGACY_KEYS]
    assert moved, "the shipped file uses nested sections"
    for key in moved:  # one deprecation line per old key, naming its new key
        assert err.count(f"key {key!r} is deprecated; write {LEGACY_KEYS[key]!r}") == 1


def test_the_old_tiny_yaml_still_loads_to_the_new_one(tmp_path, capsys):
    old = tmp_path / "tiny-old.yaml"
    old.write_text(TINY_LEGACY)
    assert load_config(TrainConfig, "rl", old) == load_config(TrainConfig, "rl", DEFAULT_CONFIG)
    assert load_config(BuildDataConfig, "build_data", old) == load_config(BuildDataConfig, "build_data", DEFAULT_CONFIG)
    new = load_config(TrainConfig, "rl", DEFAULT_CONFIG)
    assert (new.optim.lr, new.optim.warmup_steps, new.sampling.max_new_tokens) == (1e-4, 5, 8)
    assert (new.evaluation.every, new.evaluation.prompts, new.evaluation.k) == (20, 256, 4)
    assert "write 'optim.lr'" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_variants_legacy_and_nested_give_the_same_runs(path: Path, tmp_path):
    from pipelines.experiment import load_experiment, plan_runs

    source, data = load_experiment(str(path))
    legacy = {**data, "common": legacy_form(data.get("common") or {}),
              "variants": {v: legacy_form(s or {}) for v, s in data["variants"].items()}}
    legacy_path = tmp_path / path.name
    legacy_path.write_text(yaml.safe_dump(legacy, sort_keys=False))
    kw = dict(seeds=[0], only=[], overrides={}, v0_checkpoint=str(tmp_path / "v0.pt"))
    nested_specs = plan_runs(data, tmp_path, source=source, **kw)
    legacy_specs = plan_runs(legacy, tmp_path, source=legacy_path, **kw)
    for a, b in zip(nested_specs, legacy_specs, strict=True):
        assert a.settings == b.settings
        # the run's own command line builds a valid config (what `v05 rl-train` will load)
        cmd = a.command(1, resume=False)
        sets = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--set"]
        cfg = load_config(TrainConfig, "rl", a.config, parse_set(sets))
        assert cfg.algorithm == a.settings.get("algorithm", load_config(TrainConfig, "rl", a.config).algorithm)


def test_precedence_defaults_yaml_cli_inside_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rl:\n  steps: 7\n  optim: {lr: 1e-4, betas: [0.9, 0.95]}\n  osla: {k_init: 8}\n")
    cfg = load_config(TrainConfig, "rl", path, {"steps": 9, "seed": None, "osla.c": 0.01})
    assert cfg.optim.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string; the float field converts it
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.steps == 9  # command line beats YAML
    assert (cfg.osla.k_init, cfg.osla.c) == (8, 0.01)  # YAML and command line merged field by field
    default = TrainConfig()
    assert cfg.osla.halt_fraction == default.osla.halt_fraction  # untouched nested default
    assert cfg.optim.warmup_steps == default.optim.warmup_steps
    assert cfg.sampling == default.sampling  # a section the file does not mention keeps its own default
    assert cfg.seed == default.seed  # option not given: the dataclass default stays
    assert cfg.group_size == 16  # untouched default (paper: G = 16)


def test_named_options_beat_set_pairs_and_map_to_nested_fields():
    from pipelines.cli.rl import option_fields

    fields = option_fields({"lr": 1e-3, "v0_checkpoint": "v0.pt", "prior_noise_std": 0.3, "steps": 3})
    assert fields == {"optim.lr": 1e-3, "prior_options.v0_checkpoint": "v0.pt", "prior_options.noise_std": 0.3,
                      "steps": 3}
    cfg = load_config(TrainConfig, "rl", None, [parse_set(["lr=5e-4", "optim.warmup_steps=2"]), {"optim.lr": 1e-3}])
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-3, 2)


def test_unknown_keys_name_file_section_and_dotted_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rl:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml \[rl\]: unknown key 'learning_rate'"):
        load_config(TrainConfig, "rl", path)
    path.write_text("rl:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(TrainConfig, "rl", path)
    path.write_text("rl:\n  osla:\n    k_inti: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml \[rl\]: unknown key 'osla\.k_inti' \(did you mean 'osla\.k_init'\?\); "
                                          r"valid keys of osla: k_init, "):
        load_config(TrainConfig, "rl", path)
    with pytest.raises(ConfigError, match=r"--set: unknown key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        load_config(TrainConfig, "rl", None, {"optim.lrr": 1}, override_source="--set")
    with pytest.raises(ConfigError, match=r"unknown key 'eval_evry' \(did you mean 'evaluation\.every'\?\)"):
        load_config(TrainConfig, "rl", None, {"eval_evry": 1})  # a misspelt old key points at the new one
    path.write_text("rll:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'rll'"):
        validate_file(path, CLASSES)


def test_sections_need_mappings_and_one_spelling(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rl:\n  osla: 4\n")
    with pytest.raises(ConfigError, match=r"key 'osla' is a section \(OslaConfig\); give a mapping"):
        load_config(TrainConfig, "rl", path)
    path.write_text("rl:\n  lr: 1.0e-4\n  optim: {lr: 2.0e-4}\n")
    with pytest.raises(ConfigError, match=r"'lr' and 'optim' both set 'optim\.lr'; keep one"):
        load_config(TrainConfig, "rl", path)


def test_wrong_types_and_invalid_values_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rl:\n  steps: many\n")
    with pytest.raises(ConfigError, match="key 'steps' expects int, got 'many'"):
        load_config(TrainConfig, "rl", path)
    path.write_text("rl:\n  optim: {lr: fast}\n")
    with pytest.raises(ConfigError, match="key 'optim.lr' expects float, got 'fast'"):
        load_config(TrainConfig, "rl", path)
    path.write_text("rl:\n  optim: {clip_high: high}\n")
    with pytest.raises(ConfigError, match=r"key 'optim.clip_high' expects float \| None, got 'high'"):
        load_config(TrainConfig, "rl", path)
    path.write_text("rl:\n  algorithm: ppo\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml \[rl\]: TrainConfig.algorithm 'ppo' unknown"):
        load_config(TrainConfig, "rl", path)
    path.write_text("rl:\n  osla: {k_init: 0}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml \[rl\]: OslaConfig\.k_init"):  # the section's own check
        load_config(TrainConfig, "rl", path)
    with pytest.raises(ConfigError, match="--set: unknown key 'lrr'"):
        load_config(TrainConfig, "rl", None, {"lrr": 1}, override_source="--set")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        read_yaml(path)


def test_parse_set_and_nested_round_trip(tmp_path):
    assert parse_set(["optim.lr=1e-3", "eval-every=5", "optim.betas=[0.9, 0.9]", "store="]) == {
        "optim.lr": "1e-3", "eval_every": 5, "optim.betas": [0.9, 0.9], "store": None}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["lr"])
    cfg = load_config(TrainConfig, "rl", DEFAULT_CONFIG, {"algorithm": "v05", "prior": "oracle-noise",
                                                          "osla.no_prior": "k_init"})
    text = to_yaml(cfg, "rl")
    written = yaml.safe_load(text)["rl"]
    assert written["osla"]["no_prior"] == "k_init" and written["optim"]["lr"] == 1e-4  # nested form
    assert not set(written) & set(LEGACY_KEYS)  # no flat key of the old form
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(TrainConfig, "rl", path) == cfg
    assert set(dotted_keys(TrainConfig)) >= set(LEGACY_KEYS.values())  # every old key has a home
    assert not set(LEGACY_KEYS) & set(dotted_keys(TrainConfig))  # and no old key shadows a current one


def test_cli_choices_match_the_registries():
    from pipelines.cli import rl
    from v05_rl.engine.config import LOGGERS
    from v05_rl.policies import FAMILY
    from v05_rl.priors import PRIOR_SOURCES
    from v05_rl.rollout import BACKENDS

    params = {p.name: p for p in rl.rl_train.params}
    assert params["algorithm"].type.choices == ALGORITHMS
    assert list(params["prior"].type.choices) == PRIOR_SOURCES.names()
    assert params["logger"].type.choices == LOGGERS
    assert list(params["backend"].type.choices) == BACKENDS.names()
    assert BuildDataConfig().policies == FAMILY


def test_top_level_help_does_not_import_torch():
    code = ("import sys; from click.testing import CliRunner; from pipelines.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rl_train_cli_reports_config_errors(tmp_path):
    from pipelines.cli.rl import rl_train

    res = CliRunner().invoke(rl_train, ["--out", str(tmp_path / "o"), "--set", "nonsense=1"])
    assert res.exit_code != 0 and "unknown key 'nonsense'" in res.output
    res = CliRunner().invoke(rl_train, ["--out", str(tmp_path / "o"), "--algorithm", "grpo", "--prior", "oracle-noise"])
    assert res.exit_code != 0 and "has no effect with algorithm 'grpo'" in res.output
    res = CliRunner().invoke(rl_train, ["--out", str(tmp_path / "o"), "--set", "osla.k_init=0"])
    assert res.exit_code != 0 and "OslaConfig.k_init" in res.output
    assert not (tmp_path / "o").exists()  # nothing written for a config that does not build


def test_verl_engine_without_verl_says_how_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("verl") is not None:
        pytest.skip("verl is installed")
    from pipelines.cli.rl import rl_train

    res = CliRunner().invoke(rl_train, ["--engine", "verl", "--out", str(tmp_path / "o"), "--config",
                                        str(CONFIG_DIR / "paper.yaml")])
    assert res.exit_code != 0 and "pip install 'v05[verl]'" in res.output


def test_verl_engine_refuses_local_options(tmp_path):
    from pipelines.cli.rl import rl_train

    res = CliRunner().invoke(rl_train, ["--engine", "verl", "--out", str(tmp_path / "o"), "--rollout-budget", "5",
                                        "--config", str(CONFIG_DIR / "paper.yaml")])
    assert res.exit_code != 0 and "--rollout-budget belong to the local engine" in res.output
    res = CliRunner().invoke(rl_train, ["--engine", "verl", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--engine verl needs --config" in res.output
