"""Typed, validated configuration.

Every stage describes its configuration as nested ``@dataclass`` classes. YAML files in
``configs/<stage>/<preset>.yaml`` and ``--set key.sub=value`` overrides are checked against
those classes: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the dotted key, so a typo never silently falls back to a default.

The presets ship inside the package as ``medvl.configs`` (the repository's ``configs/``
folder), so they are found the same way from a checkout, an editable install or a wheel.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medvl.errors import ConfigError

T = TypeVar("T")

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _installed_presets() -> Path:
    """The folder of the installed presets (the repository's configs/, packaged as ``medvl.configs``): a folder
    on disk, because pip installs wheels unpacked and an editable install maps the package to the checkout's."""
    try:
        return Path(str(resources.files("medvl.configs")))
    except ModuleNotFoundError:
        raise ImportError(
            "medvl's presets (the package medvl.configs, from the repository's configs/) are not installed: "
            "install medvl with `pip install .` or `pip install -e .` instead of importing it from a checkout"
        ) from None


CONFIG_ROOT = _installed_presets()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': {value!r} matches none of {[_type_name(a) for a in args]}")
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"config key '{key}': {value!r} is not one of {[m.value for m in tp]}"
            ) from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    return value


# Integer keys (by their last part, in any section) that count or size something, so that zero or less means
# nothing: a batch, a vocabulary, an image side, a layer width, a number of steps. Other integers must not be
# negative (``seed`` may be); a 0 there has a documented meaning ("0: all", "0: none").
AT_LEAST_ONE = frozenset(
    {
        "batch_size",
        "val_batch_size",
        "feature_batch_size",
        "encode_batch_size",
        "vocab_size",
        "image_size",
        "embed_dim",
        "hidden_size",
        "intermediate_size",
        "max_tokens",
        "max_words",
        "chunk_size",
        "n_embd",
        "latent_channels",
        "cross_attention_dim",
        "num_train_timesteps",
        "steps",
        "bank_per_word",
        "abnormal_repeat",
        "discriminator_channels",
    }
)
MAY_BE_NEGATIVE = frozenset({"seed"})


def _check_count(key: str, value: int) -> None:
    name = key.rsplit(".", 1)[-1]
    if name in AT_LEAST_ONE and value < 1:
        raise ConfigError(f"config key '{key}' must be at least 1, got {value}")
    if value < 0 and name not in MAY_BE_NEGATIVE:
        raise ConfigError(f"config key '{key}' must not be negative, got {value}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys under '{prefix or '.'}': "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    for name, value in kwargs.items():
        if hints[name] is int:
            _check_count(prefix + name, value)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"config '{prefix or cls.__name__}': {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (enums as their values), fit for YAML and JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads "3e-4" as a string; users mean a number.
        try:
            value = float(value) if _NUMBER.fullmatch(value.strip()) else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = json.loads(json.dumps(data or {}))  # deep copy of plain data
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def preset_names(stage: str) -> list[str]:
    """The presets shipped for ``stage`` (``["base", "demo", "tiny"]`` for the built-in stages)."""
    folder = CONFIG_ROOT / stage
    return sorted(q.stem for q in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_file(*parts: str) -> Path:
    """A shipped preset file: ``preset_file("adamatch", "tiny.yaml")``, ``preset_file("demo_quick.yaml")``."""
    path = CONFIG_ROOT.joinpath(*parts)
    if not path.is_file():
        raise ConfigError(f"no preset file {'/'.join(parts)} in {CONFIG_ROOT}")
    return path


def preset_overrides(name: str, stage: str) -> list[str]:
    """``--set`` overrides for ``stage`` from the shipped table ``configs/<name>.yaml`` (e.g. ``demo_quick``).

    The table maps a stage to ``{dotted.key: value}``; the result lists ``"dotted.key=value"`` in file
    order, and is empty when the table has no entry for ``stage``.
    """
    path = preset_file(f"{name}.yaml")
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset file {path} is not valid YAML: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"preset file {path} must hold a mapping of stage -> overrides")
    return [f"{key}={value}" for key, value in (table.get(stage) or {}).items()]


def resolve_config_path(stage: str, name_or_path: str | Path) -> Path:
    """A path to a YAML file, or a preset name (``tiny``, ``demo``, ``base``) for ``stage``."""
    p = Path(name_or_path)
    candidate = CONFIG_ROOT / stage / f"{name_or_path}.yaml"
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist" if not p.exists() else f"{p} is not a file")
        return p
    # A preset name wins over a folder of the same name in the working directory ("medvl demo --out demo").
    if candidate.is_file():
        return candidate
    if p.exists():
        raise ConfigError(f"config {p} is a folder, not a YAML file or a preset name")
    known = ", ".join(preset_names(stage)) or "none"
    raise ConfigError(f"no config '{name_or_path}' for stage '{stage}' (presets: {known})")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML at ``path`` (or start from defaults), apply dotted overrides, validate into ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg: Any) -> str:
    """Short stable hash of a resolved config, recorded in every metrics file."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
