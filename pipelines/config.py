"""YAML configuration: dataclass defaults < YAML file < command-line options.

A config file is a mapping of *sections*; each section fills one frozen config dataclass:

    rl:            # v05_rl.trainer.TrainConfig  (v05 rl-train, and the GRPO settings of build-data)
      policy: tiny-m
      lr: 1.0e-4
    build_data:    # pipelines.cli_rl.BuildDataConfig  (v05 build-data)
      steps: 40

Every default lives once, in the dataclass; a YAML key overrides it; a click option given on the command
line overrides both. Unknown sections or keys fail with the file, the section, the key and the valid
names. Values are checked against the field's type (YAML 1.1 reads ``1e-4`` as a string: numeric
strings are accepted for float fields). verl's Hydra configs (`paper.yaml`, ...) are recognised by
their top-level keys and left to `v05_rl.verl`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"

# section name -> "module:dataclass"
SECTIONS: dict[str, str] = {
    "rl": "v05_rl.trainer:TrainConfig",
    "build_data": "pipelines.cli_rl:BuildDataConfig",
}

# top-level keys that mark a verl / Hydra config (handled by v05_rl.verl, not by this loader)
VERL_KEYS = frozenset({"defaults", "actor_rollout_ref", "data", "algorithm", "trainer", "critic", "reward_model",
                       "custom_reward_function", "hydra", "ray_init", "ray_kwargs", "v05"})


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names where and how to fix it."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; give a YAML file such as {DEFAULT_CONFIG}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return dict(data)


def is_verl_config(data: Mapping[str, Any]) -> bool:
    """True for verl / Hydra configs (no section of ours, some verl top-level key)."""
    return not (set(data) & set(SECTIONS)) and bool(set(data) & VERL_KEYS)


def section_class(section: str) -> type:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(SECTIONS)}")
    module, attr = SECTIONS[section].split(":")
    return getattr(importlib.import_module(module), attr)


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, type_str: str, where: str, key: str) -> Any:
    """Check `value` against a field type written as a string (the modules use postponed annotations)."""
    t = type_str.replace(" ", "")
    optional = "None" in t.split("|")
    base = "|".join(p for p in t.split("|") if p != "None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: key {key!r} may not be null; give a {base}")
    bad = ConfigError(f"{where}: key {key!r} expects {type_str}, got {value!r}")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise bad
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if base == "float":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if base == "str":
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    if base.startswith("tuple["):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = base[len("tuple[") : -1].split(",")
        item_type = inner[0]
        if len(inner) > 1 and inner[1] != "...":
            if len(value) != len(inner):
                raise ConfigError(f"{where}: key {key!r} expects {len(inner)} values ({type_str}), got {value!r}")
        return tuple(_coerce(v, item_type, where, key) for v in value)
    return value


def build(cls: type, values: Mapping[str, Any], *, where: str) -> Any:
    """`cls(**defaults | values)` with unknown keys and wrong types refused, naming `where`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key {key!r}{_suggest(str(key), list(fields))}; valid keys: {', '.join(fields)}"
            )
        kwargs[key] = _coerce(value, str(fields[key].type), where, key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(
    cls: type,
    section: str,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    override_source: str = "command line",
) -> Any:
    """Build `cls` from its defaults, section `section` of the YAML at `path`, then `overrides`.

    Overrides with value None are ignored (a click option that was not given).
    """
    values: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        data = read_yaml(path)
        if is_verl_config(data):
            raise ConfigError(f"{path} is a verl/Hydra config; use it with --engine verl")
        check_sections(data, path)
        section_values = data.get(section) or {}
        if not isinstance(section_values, Mapping):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of keys, got {type(section_values).__name__}")
        values.update(section_values)
        where = f"{path} [{section}]"
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in given:
            if key not in fields:
                raise ConfigError(
                    f"{override_source}: unknown key {key!r}{_suggest(key, sorted(fields))}; valid keys: {', '.join(sorted(fields))}"
                )
        values.update(given)
        where = f"{where} + {override_source}"
    return build(cls, values, where=where)


def check_sections(data: Mapping[str, Any], path: str | Path) -> None:
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{path}: unknown section {unknown[0]!r}{_suggest(str(unknown[0]), list(SECTIONS))}; valid sections: {', '.join(SECTIONS)}"
        )


def validate_file(path: str | Path) -> dict[str, Any]:
    """Build every section of a config file; returns {section: config}. verl configs return {}."""
    data = read_yaml(path)
    if is_verl_config(data):
        return {}
    check_sections(data, path)
    return {name: load_config(section_class(name), name, path) for name in data}


def parse_set(items: Sequence[str], *, option: str = "--set") -> dict[str, Any]:
    """``["lr=1e-4", "betas=[0.9, 0.95]"]`` -> {"lr": "1e-4" as a YAML value, ...} (types checked later)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def to_yaml(config: Any, section: str) -> str:
    """A YAML text of `config` under `section` (what a run writes next to its outputs)."""
    data = dataclasses.asdict(config)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    return yaml.safe_dump({section: data}, sort_keys=False)


__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "SECTIONS",
    "ConfigError",
    "read_yaml",
    "is_verl_config",
    "section_class",
    "build",
    "load_config",
    "validate_file",
    "parse_set",
    "to_yaml",
]
