"""Build nested config dataclasses from YAML mappings, with key=value overrides.

Unknown keys are rejected with the nearest valid key, so a typo never silently falls back to a
default. A field whose values are dataclasses keyed by name (a dict of sites, say) declares the
value type in its metadata: `field(metadata={"value_type": SiteConfig})`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3 and 1e30 as floats.

    PyYAML follows YAML 1.1, where a float needs a dot, so it reads `lr_lora=1e-4` as the string
    '1e-4'. YAML 1.2 and Python read it as a number, and so does this loader.
    """


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _load_yaml_text(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    """Resolve the type hints of a config dataclass once."""
    return typing.get_type_hints(cls)


def _nested_type(cls, field: dataclasses.Field):
    """Return the dataclass type of a field (also inside Optional[...]), or None for plain values."""
    hint = _type_hints(cls).get(field.name)
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _convert_scalar(kind, value):
    """Return `value` as `kind`, or raise ValueError. YAML ints pass as floats; bools never pass as numbers."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError


def _convert_sequence(value) -> tuple:
    """Convert a list of strings, or one comma-separated string ('in_proj,out_proj'), to a tuple of strings."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError


def check_value(cls, field: dataclasses.Field, value, where: str):
    """Check a plain config value against the field's type hint and return it converted.

    Handles bool, int, float, str, tuple (of strings) and Optional of those; other hints pass
    unchanged. A mismatch raises UserError naming the key, the value and the expected type.
    """
    hint = _type_hints(cls).get(field.name)
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in args:
        return None
    kinds = [typing.get_origin(a) or a for a in args if a is not type(None)]
    for kind in kinds:
        if kind in _SCALARS or kind in (tuple, list):
            try:
                return _convert_sequence(value) if kind in (tuple, list) else _convert_scalar(kind, value)
            except ValueError:
                continue
        else:
            return value
    expected = " or ".join("a list of names" if k in (tuple, list) else _SCALARS[k] for k in kinds)
    if type(None) in args:
        expected += " or null"
    raise UserError(f"{where}={value!r} is invalid: expected {expected}, got {type(value).__name__}. "
                    f"Fix it in the config file or override it, e.g. {where}={_example(kinds[0], field)}")


def _example(kind, field: dataclasses.Field) -> str:
    default = field.default if field.default is not dataclasses.MISSING else None
    if kind in (tuple, list):
        return ",".join(default) if isinstance(default, (tuple, list)) and default else "a,b"
    if default is not None and not isinstance(default, (tuple, list, dict)):
        return str(default).lower() if isinstance(default, bool) else str(default)
    return {bool: "true", int: "1", float: "1.0", str: "name"}[kind]


def unknown_key_error(key: str, valid: list[str], path: str) -> UserError:
    """Build the error for an unknown config key, suggesting the nearest valid one."""
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UserError(f"unknown config key {where!r}.{hint} Valid keys here: {', '.join(sorted(valid))}")


def build(cls, raw, path: str = ""):
    """Instantiate dataclass `cls` from a mapping, recursing into nested dataclasses."""
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise UserError(f"config section {path or 'root'!r} must be a mapping, got {type(raw).__name__}: {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise unknown_key_error(str(key), list(fields), path)
        field, where = fields[key], f"{path}.{key}" if path else key
        nested = _nested_type(cls, field)
        value_type = field.metadata.get("value_type")
        if nested is not None:
            values[key] = None if value is None else build(nested, value, where)
        elif value_type is not None:
            values[key] = {name: build(value_type, item, f"{where}.{name}") for name, item in (value or {}).items()}
        else:
            values[key] = check_value(cls, field, value, where)
    try:
        return cls(**values)
    except TypeError as error:
        raise UserError(f"invalid config section {path or 'root'!r}: {error}") from error


def to_dict(instance) -> dict:
    """Convert a config dataclass back into plain dicts and lists (for YAML and JSON)."""
    return dataclasses.asdict(instance)


def parse_override(text: str) -> tuple[list[str], object]:
    """Split 'a.b.c=value' into (['a', 'b', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is invalid: expected key=value, e.g. max_steps=100 or train.lr_lora=1e-4")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), _load_yaml_text(value) if value.strip() else ""
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        raise UserError(f"override {text!r} has an invalid YAML value: {message}") from error


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted key of `overrides` in a copy of the nested mapping `raw`."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise UserError(f"override {text!r}: {key!r} is a value, not a section")
        node[keys[-1]] = value
    return result


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a mapping."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config path {path} is a directory; pass a YAML file, e.g. configs/default.yaml")
    if not path.is_file():
        raise UserError(f"config file not found: {path}. Pass --config with an existing YAML file (see configs/).")
    try:
        raw = _load_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {error}") from error
    if raw is not None and not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level, got {type(raw).__name__}")
    return raw or {}
