"""Resolving a :class:`~automl_compress.config.run.Config` from YAML, and writing it back.

:func:`load_config` starts from the dataclass defaults, applies the YAML file's overrides, then
``--set section.key=value`` ones. Every value is checked against its field's type by a coercer
looked up in :data:`COERCERS` (by the field type, or by its generic origin: ``X | None``,
``tuple[...]``, ``dict[...]``); nested sections are built recursively and unknown keys are errors
that name the closest valid key. :func:`dump_config` gives the resolved config as YAML text.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from automl_compress.config.run import Config
from automl_compress.errors import ConfigError

# YAML 1.1 (PyYAML) reads these words as booleans; a string field gets the switch word back
_YAML_TRUE = ("true", "on", "yes")
_YAML_FALSE = ("false", "off", "no")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve a config: defaults, then the YAML file, then ``key.sub=value`` overrides.

    Args:
        path: a YAML file of overrides (None: the defaults).
        overrides: ``section.key=value`` items, each value read as YAML.

    Returns:
        The resolved, validated config.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or invalid values.
    """
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, found {loaded!r}")
        tree = loaded or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key.sub=value, found {item!r}")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return _build(Config, tree)


def config_to_dict(cfg: Any) -> Any:
    """Plain-YAML form of a config (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Building the dataclasses from the override tree


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def _build(cls: type, data: Any, where: str = "") -> Any:
    """One config dataclass from its mapping of overrides (``where``: its dotted key)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, found {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one YAML value to the field type ``tp`` (``where`` names the key).

    A nested section (a dataclass) is built by :func:`_build`; any other type is looked up in
    :data:`COERCERS` by its generic origin (``X | None``, ``tuple[...]``, ``dict[...]``) or
    itself; a type without a coercer (``Any``) takes the value as it is.
    """
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    coercer = COERCERS.get(typing.get_origin(tp) or tp)
    return value if coercer is None else coercer(value, tp, where)


# ---------------------------------------------------------------------------------------------
# Coercers: (value, field type, dotted key) -> the checked value


def _optional(value: Any, tp: Any, where: str) -> Any:
    """``X | None``: None stays None when the union allows it, else the value as ``X``."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    return _coerce(value, inner[0], where)


def _tuple(value: Any, tp: Any, where: str) -> tuple:
    """``tuple[X, ...]``: a YAML list (or one scalar) as a tuple of ``X``."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(_coerce(v, typing.get_args(tp)[0], where) for v in value)


def _mapping(value: Any, tp: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, found {value!r}")
    return dict(value)


def _bool(value: Any, tp: Any, where: str) -> bool:
    """A boolean; the switch words YAML reads as booleans are accepted as strings too."""
    if isinstance(value, str) and value.strip().lower() in _YAML_TRUE + _YAML_FALSE:
        return value.strip().lower() in _YAML_TRUE
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false (or on/off, yes/no), found {value!r}")
    return value


def _int(value: Any, tp: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, found {value!r}")
    return value


def _float(value: Any, tp: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, found {value!r}")
    return float(value)


def _str(value: Any, tp: Any, where: str) -> str:
    """A string.

    YAML reads ``on/off/yes/no/true/false`` as booleans, so a boolean comes back as ``'on'`` or
    ``'off'`` and the field's own validation maps those words onto its choices (e.g.
    ``eval.bn_reestimate: off``).
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where} must be a string, found {value!r}")
    return str(value)


COERCERS: dict[Any, Callable[[Any, Any, str], Any]] = {
    typing.Union: _optional,
    types.UnionType: _optional,
    tuple: _tuple,
    dict: _mapping,
    bool: _bool,
    int: _int,
    float: _float,
    str: _str,
}
