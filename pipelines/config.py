"""YAML configuration: dataclass defaults < YAML file < command-line options.

A config file is a mapping of *sections*; each section fills one frozen config dataclass:

    rl:              # v05_rl.engine.config.TrainConfig (v05 rl-train, and the GRPO settings of build-data)
      policy: tiny-m
      optim: {lr: 1.0e-4}
      osla:
        k_init: 4
    build_data:      # pipelines.build_data.BuildDataConfig (v05 build-data)
      steps: 40

Every default lives once, in the dataclass; a YAML key overrides it; a click option given on the command
line overrides both. A field whose default is a dataclass instance is a *nested section*: YAML gives it a
mapping, merged field by field onto that default (`osla: {k_init: 8}` keeps every other OSLA default);
`--set` reaches it with a dotted key (`--set osla.no_prior=k_init`, `--set optim.lr=1e-4`).

Unknown sections or keys fail with the file, the section, the dotted key, a close match and the valid
names. Values are checked against the field's type (YAML 1.1 reads ``1e-4`` as a string: numeric strings
are accepted for float fields). The flat keys of earlier versions (`lr`, `k_init`, `eval_every`, ...)
are still read through `v05_rl.engine.config.LEGACY_KEYS`, with one deprecation message on stderr per
key naming its new dotted path. verl's Hydra configs (`paper.yaml`, ...) are recognised by their
top-level keys and left to `v05_rl.verl`.

This module knows the section *names* only; the caller names the dataclass (`load_config(TrainConfig,
"rl", ...)`), so the loader imports no recipe and no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"

# Section names of our config files: "rl" fills v05_rl.engine.config.TrainConfig, "build_data" fills
# pipelines.build_data.BuildDataConfig.
SECTIONS: tuple[str, ...] = ("rl", "build_data")

# top-level keys that mark a verl / Hydra config (handled by v05_rl.verl, not by this loader)
VERL_KEYS = frozenset({"defaults", "actor_rollout_ref", "data", "algorithm", "trainer", "critic", "reward_model",
                       "custom_reward_function", "hydra", "ray_init", "ray_kwargs", "v05"})


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names where and how to fix it."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with the same key twice (PyYAML keeps the last one silently).

    The error is a `yaml.constructor.ConstructorError` whose marks give the line of both occurrences;
    `load_yaml` turns it into a `ConfigError` naming the file.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let SafeLoader report it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first set at line {first.line + 1}); keep one of the two",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str | Path) -> Any:
    """Parse YAML `text` with `UniqueKeyLoader`; a syntax error or a duplicate key is a `ConfigError`
    naming `where` and the line."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise ConfigError(f"{where}:{line} {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None


# ====================================================================================== files


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file -> {})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; give a YAML file such as {DEFAULT_CONFIG}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    data = load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return dict(data)


def is_verl_config(data: Mapping[str, Any]) -> bool:
    """True for verl / Hydra configs (no section of ours, some verl top-level key)."""
    return not (set(data) & set(SECTIONS)) and bool(set(data) & VERL_KEYS)


def check_sections(data: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a top-level key that is not one of `SECTIONS`."""
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{path}: unknown section {unknown[0]!r}{_suggest(str(unknown[0]), list(SECTIONS))}; "
            f"valid sections: {', '.join(SECTIONS)}"
        )


# ====================================================================================== fields and types


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def section_default(f: dataclasses.Field) -> Any | None:
    """The dataclass instance a field defaults to (a nested section), else None."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    return default if dataclasses.is_dataclass(default) and not isinstance(default, type) else None


def nested_sections(cls: type) -> dict[str, Any]:
    """Field name -> default instance, for every nested section of `cls`."""
    out = {}
    for f in dataclasses.fields(cls):
        default = section_default(f)
        if default is not None:
            out[f.name] = default
    return out


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of `cls` in dotted form (`steps`, `osla.k_init`, ...), in field order."""
    sections = nested_sections(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in sections:
            out += dotted_keys(type(sections[f.name]), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def legacy_keys(cls: type) -> Mapping[str, str]:
    """Old flat key -> dotted path, for the classes that had flat keys (only the RL `TrainConfig`)."""
    from v05_rl.engine.config import LEGACY_KEYS, TrainConfig

    return LEGACY_KEYS if cls is TrainConfig else {}


def _type_text(hint: Any) -> str:
    """`int`, `float | None`, `tuple[float, float]`: a type hint as it is written in the source."""
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in typing.get_args(hint))
    if hint is Ellipsis:
        return "..."
    origin = typing.get_origin(hint)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_text(a) for a in typing.get_args(hint))}]"
    return str(hint)


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    """Check `value` against the resolved type hint `hint` of a field; convert where YAML is loose."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        if len(inner) == 1:
            try:
                return _coerce(value, inner[0], where, key)
            except ConfigError:
                raise ConfigError(f"{where}: key {key!r} expects {_type_text(hint)}, got {value!r}") from None
        return value
    if value is None:
        raise ConfigError(f"{where}: key {key!r} may not be null; give a {_type_text(hint)}")
    bad = ConfigError(f"{where}: key {key!r} expects {_type_text(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            return float(value)
        except ValueError:
            raise bad from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    if typing.get_origin(hint) is tuple:
        return _coerce_tuple(value, hint, where, key)
    return value


def _coerce_tuple(value: Any, hint: Any, where: str, key: str) -> tuple:
    """A list, tuple or comma-separated string checked against `tuple[X, ...]` or `tuple[X, Y]`."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: key {key!r} expects {_type_text(hint)}, got {value!r}")
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    else:
        if len(value) != len(args):
            raise ConfigError(f"{where}: key {key!r} expects {len(args)} values ({_type_text(hint)}), got {value!r}")
        item_types = list(args)
    return tuple(_coerce(v, t, where, key) for v, t in zip(value, item_types))


# ====================================================================================== flat <-> nested


def flatten(cls: type, values: Mapping[str, Any], *, where: str,
            deprecated: list[tuple[str, str, str]] | None = None) -> dict[str, Any]:
    """Keys of `values` (nested mappings, dotted keys or legacy flat keys) -> {dotted key: raw value}.

    Unknown keys fail naming `where` and the dotted key, with a close match and the valid keys. A legacy
    key is renamed to its dotted path and recorded in `deprecated` as (where, old, new). Values are not checked
    here (`build` does that).
    """
    legacy = legacy_keys(cls)
    out: dict[str, Any] = {}
    source: dict[str, str] = {}  # dotted key -> the key written by the user (to report a duplicate)
    for key, value in values.items():
        key = str(key)
        path = key
        if key in legacy:
            path = legacy[key]
            if deprecated is not None:
                deprecated.append((where, key, path))
        for dotted, item in _expand(cls, path, value, where=where, legacy=legacy).items():
            if dotted in out:
                raise ConfigError(f"{where}: {source[dotted]!r} and {key!r} both set {dotted!r}; keep one "
                                  f"(the nested form {dotted!r})")
            out[dotted] = item
            source[dotted] = key
    return out


def _expand(cls: type, path: str, value: Any, *, where: str, legacy: Mapping[str, str], root: type | None = None,
            prefix: str = "") -> dict[str, Any]:
    """One key of `cls` (maybe dotted) and its value -> {dotted key: value}, descending into sections.

    `root` and `prefix` locate `cls` inside the top-level class (for error messages with the full key).
    """
    root = root or cls
    head, _, rest = path.partition(".")
    fields = {f.name for f in dataclasses.fields(cls)}
    sections = nested_sections(cls)
    if head not in fields or (rest and head not in sections):
        raise _unknown_key(root, prefix + path, where=where, legacy=legacy)
    if head not in sections:
        return {prefix + path: value}
    section_cls = type(sections[head])
    inner = dict(where=where, legacy=legacy, root=root, prefix=f"{prefix}{head}.")
    if rest:
        return _expand(section_cls, rest, value, **inner)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_expand(section_cls, str(key), item, **inner))
        return out
    if isinstance(value, section_cls):
        return {f"{prefix}{head}.{f.name}": getattr(value, f.name) for f in dataclasses.fields(section_cls)}
    raise ConfigError(f"{where}: key {prefix + head!r} is a section ({section_cls.__name__}); give a mapping such as "
                      f"{{{dotted_keys(section_cls)[0]}: ...}} or a dotted key "
                      f"{dotted_keys(section_cls, prefix + head + '.')[0]!r}, got {value!r}")


def _unknown_key(cls: type, path: str, *, where: str, legacy: Mapping[str, str]) -> ConfigError:
    """The error for a key `cls` does not have: a close dotted key (or the new name of an old key)."""
    valid = dotted_keys(cls)
    close = difflib.get_close_matches(path, valid + list(legacy), n=1)
    hint = ""
    if close:
        new = legacy.get(close[0], close[0])
        hint = f" (did you mean {new!r}?)"
    head, _, _ = path.partition(".")
    sections = nested_sections(cls)
    if "." in path and head in sections:
        names = [f.name for f in dataclasses.fields(type(sections[head]))]
        return ConfigError(f"{where}: unknown key {path!r}{hint}; valid keys of {head}: {', '.join(names)}")
    names = [f.name for f in dataclasses.fields(cls)]
    return ConfigError(f"{where}: unknown key {path!r}{hint}; valid keys: {', '.join(names)}")


def build(cls: type, values: Mapping[str, Any], *, where: str) -> Any:
    """`cls` from its defaults and `values` (nested, dotted or legacy keys), types checked, naming `where`."""
    return _build_flat(cls, flatten(cls, values, where=where), where=where)


def _build_flat(cls: type, flat: Mapping[str, Any], *, where: str, prefix: str = "", default: Any = None) -> Any:
    """Construct `cls` (or `replace` its `default` instance) from {dotted key: raw value}."""
    hints = typing.get_type_hints(cls)
    sections = nested_sections(cls) if default is None else {
        name: getattr(default, name) for name in nested_sections(cls)}
    kwargs: dict[str, Any] = {}
    for name, section_default_value in sections.items():
        inner = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")}
        if inner:
            kwargs[name] = _build_flat(type(section_default_value), inner, where=where, prefix=f"{prefix}{name}.",
                                       default=section_default_value)
    for key, value in flat.items():
        if "." not in key:
            kwargs[key] = _coerce(value, hints[key], where, prefix + key)
    try:
        return cls(**kwargs) if default is None else dataclasses.replace(default, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ====================================================================================== loading


def load_config(
    cls: type,
    section: str,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    override_source: str = "command line",
) -> Any:
    """Build `cls` from its defaults, section `section` of the YAML at `path`, then `overrides`.

    `overrides` is one mapping or a sequence of them (later ones win: `--set` pairs, then the named
    options). Overrides with value None are ignored (a click option that was not given). Keys may be
    nested mappings, dotted (`osla.k_init`) or legacy flat keys (one deprecation line on stderr each).
    """
    deprecated: list[tuple[str, str, str]] = []
    flat: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = f"{path} [{section}]"
        flat.update(flatten(cls, section_values(path, section), where=where, deprecated=deprecated))
    layers = [overrides] if isinstance(overrides, Mapping) else list(overrides or [])
    given = False
    for layer in layers:
        values = {k: v for k, v in layer.items() if v is not None}
        flat.update(flatten(cls, values, where=override_source, deprecated=deprecated))
        given = given or bool(values)
    if given:
        where = f"{where} + {override_source}"
    warn_deprecated(deprecated)
    return _build_flat(cls, flat, where=where)


def section_values(path: str | Path, section: str) -> Mapping[str, Any]:
    """The mapping under `section` of a config file of ours ({} when the section is absent)."""
    data = read_yaml(path)
    if is_verl_config(data):
        raise ConfigError(f"{path} is a verl/Hydra config; use it with --engine verl")
    check_sections(data, path)
    values = data.get(section) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: section {section!r} must be a mapping of keys, got {type(values).__name__}")
    return values


def warn_deprecated(deprecated: Sequence[tuple[str, str, str]]) -> None:
    """One line on stderr per (source, legacy flat key), naming the nested key to write instead."""
    for where, old, new in dict.fromkeys(deprecated):
        print(f"{where}: key {old!r} is deprecated; write {new!r} (nested form)", file=sys.stderr)


def validate_file(path: str | Path, classes: Mapping[str, type]) -> dict[str, Any]:
    """Build every section of a config file with `classes` (section -> dataclass); verl configs return {}."""
    data = read_yaml(path)
    if is_verl_config(data):
        return {}
    check_sections(data, path)
    return {name: load_config(classes[name], name, path) for name in data}


def parse_set(items: Sequence[str], *, option: str = "--set") -> dict[str, Any]:
    """``["optim.lr=1e-4", "optim.betas=[0.9, 0.95]"]`` -> {"optim.lr": "1e-4" as a YAML value, ...}.

    Dashes in keys become underscores; types are checked later, by `load_config`.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE, e.g. {option} optim.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            out[key] = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None  # noqa: S506
        except yaml.constructor.ConstructorError as exc:
            raise ConfigError(f"{option} {item!r}: {exc.problem}") from None
        except yaml.YAMLError:
            out[key] = raw
    return out


def plain(value: Any) -> Any:
    """A dataclass / tuple tree as dicts and lists (what YAML and JSON can write)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def to_yaml(config: Any, section: str) -> str:
    """A YAML text of `config` under `section`, nested sections as mappings (written next to a run)."""
    return yaml.safe_dump({section: plain(config)}, sort_keys=False)


__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "SECTIONS",
    "ConfigError",
    "UniqueKeyLoader",
    "build",
    "check_sections",
    "dotted_keys",
    "flatten",
    "is_verl_config",
    "legacy_keys",
    "load_config",
    "load_yaml",
    "nested_sections",
    "parse_set",
    "plain",
    "read_yaml",
    "section_values",
    "to_yaml",
    "validate_file",
    "warn_deprecated",
]
