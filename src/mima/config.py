"""Frozen-dataclass configurations loaded from dicts, JSON, YAML and CLI overrides.

Subclasses are `@dataclass(frozen=True)`, give every field `metadata={"help": ...}` and check relations between
fields in `__post_init__`, raising [`~mima.errors.ConfigError`]:

```python
@dataclass(frozen=True)
class ImmunizeConfig(Config):
    steps: int = field(default=100, metadata={"help": "Optimisation steps."})
    targets: tuple[str, ...] = field(default=("attn",), metadata={"help": "Module name patterns."})

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")
```

Runs record their whole config ([`Config.to_dict`]). A field added later with a default other than the behaviour
from before it existed names that behaviour as `metadata["absent"]`, so that older records still read as what they
were made with ([`Config.from_record`], [`Config.differences`]).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import os
import types
import typing
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

C = TypeVar("C", bound="Config")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class of all mima configurations."""

    def __post_init__(self) -> None:
        """Check that every float field is finite; subclasses extend it (calling `super().__post_init__()` first)
        with their own checks of values and relations, raising [`~mima.errors.ConfigError`]."""
        for name, tp in _type_hints(type(self)).items():
            value = getattr(self, name, None)
            if isinstance(value, float) and not math.isfinite(value) and float in (tp, *typing.get_args(tp)):
                raise ConfigError(f"{name} must be a finite number, got {value} in {type(self).__name__}")

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, strict: bool = True) -> C:
        """Build a config from a mapping, turning lists into tuples.

        Args:
            data (`Mapping[str, Any]`):
                Field values; missing optional fields take their defaults.
            strict (`bool`, defaults to `True`):
                Raise on unknown keys. With `False` (reading an artifact written by a newer mima), unknown keys are
                dropped with a warning.

        Raises:
            [`~mima.errors.ConfigError`]: On unknown keys (strict) or ill-typed values.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}: {data!r}")
        fields = _init_fields(cls)
        hints = _type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                if strict:
                    raise ConfigError(_unknown_key_message(cls, key))
                warnings.warn(f"ignoring {_unknown_key_message(cls, key)}", UserWarning, stacklevel=2)
                continue
            kwargs[key] = _coerce(hints[key], value, _Where(cls, key))
        return cls(**kwargs)

    @classmethod
    def from_record(cls: type[C], data: Mapping[str, Any]) -> C:
        """Rebuild the config a run was made with from its record ([`~Config.to_dict`] written by any mima version):
        a field the record predates takes its "absent" value (see [`~Config.differences`]), unknown keys are dropped
        with a warning."""
        return cls.from_dict({**_absent_values(cls), **data}, strict=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the init fields: tuples become lists."""
        return {name: _to_jsonable(getattr(self, name)) for name in _init_fields(type(self))}

    def differences(self, recorded: Mapping[str, Any], fields: Collection[str] | None = None) -> dict[str, tuple]:
        """Fields (all, or only `fields`) whose value differs from a record of [`~Config.to_dict`]:
        `{name: (recorded, this)}`, JSON-safe values.

        A field the record lacks (it was written before the field existed) counts as the value that reproduces the
        behaviour from before the field was added: its metadata's `"absent"` value if it has one (for a field whose
        default has changed since), else its default. Keys this class does not know are ignored.
        """
        differences, absent = {}, _absent_values(type(self))
        for name, f in _init_fields(type(self)).items():
            if fields is not None and name not in fields:
                continue
            value = _to_jsonable(getattr(self, name))
            if name in recorded:
                old = recorded[name]
            elif name in absent:
                old = _to_jsonable(absent[name])
            else:
                old = _to_jsonable(f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
            if json.dumps(old, sort_keys=True) != json.dumps(value, sort_keys=True):
                differences[name] = (old, value)
        return differences

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write [`~Config.to_dict`] to `path` as JSON (sorted keys, indent 2, trailing newline), atomically.

        Args:
            path (`str` or `os.PathLike`):
                Destination file.
        """
        from .utils.io import atomic_write_text  # imports torch: keep `mima.config` light for the CLI parser

        atomic_write_text(path, json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n")

    @classmethod
    def load_json(cls: type[C], path: str | os.PathLike[str]) -> C:
        """Read a config written by [`~Config.save_json`], dropping unknown keys with a warning.

        Args:
            path (`str` or `os.PathLike`):
                JSON file to read.

        Raises:
            [`~mima.errors.ConfigError`]: If the file is missing, is not valid JSON or holds invalid values.
        """
        text = read_text(path, "config file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON in {path}: {e}") from None
        return cls.from_record(data)

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike[str], *, section: str | None = None) -> C:
        """Read a config from a YAML file, rejecting unknown keys. An empty file yields the defaults.

        Args:
            path (`str` or `os.PathLike`):
                YAML file whose top level is a mapping.
            section (`str`, *optional*):
                Top-level key holding this config; other top-level keys are ignored. By default the whole file is
                the config.

        Raises:
            [`~mima.errors.ConfigError`]: If the file is missing, is not valid YAML, is not a mapping, lacks
                `section`, or holds invalid values.
        """
        text = read_text(path, "config file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {path}: {_yaml_error_line(e)}") from None
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise ConfigError(f"top level of {path} must be a mapping, got {type(data).__name__}")
        if section is not None:
            if section not in data:
                keys = ", ".join(map(str, data)) or "(none)"
                raise ConfigError(f"section '{section}' not found in {path}; top-level keys: {keys}")
            data = {} if data[section] is None else data[section]
            if not isinstance(data, Mapping):
                raise ConfigError(f"section '{section}' of {path} must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data, strict=True)

    def with_overrides(self: C, **overrides: Any) -> C:
        """Return a validated copy with `overrides` applied; precedence is CLI > YAML > defaults.

        An override whose value is `None` counts as "not given" and is ignored, whereas falsy values such as `0`,
        `False` and `""` are applied.

        Args:
            **overrides (`Any`):
                Field values, typically parsed CLI options.

        Raises:
            [`~mima.errors.ConfigError`]: On unknown keys, ill-typed values or failed validation.
        """
        cls = type(self)
        fields = _init_fields(cls)
        hints = _type_hints(cls)
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in fields:
                raise ConfigError(_unknown_key_message(cls, key))
            changes[key] = _coerce(hints[key], value, _Where(cls, key))
        return dataclasses.replace(self, **changes)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _absent_values(cls: type) -> dict[str, Any]:
    """{field: value a record without the field was made with}, for fields whose default changed since."""
    return {name: f.metadata["absent"] for name, f in _init_fields(cls).items() if "absent" in f.metadata}


def _unknown_key_message(cls: type, key: object) -> str:
    valid = list(_init_fields(cls))
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid) or '(none)'}"
    return f"unknown key '{key}' in {cls.__name__}; {hint}"


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The content of a user's UTF-8 text file (settings, concepts, captions); `what` names it in the
    [`~mima.errors.ConfigError`] raised if it is missing, unreadable or not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _yaml_error_line(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


class _Where(typing.NamedTuple):
    cls: type
    key: str

    def invalid(self, tp: Any, value: Any) -> ConfigError:
        name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        return ConfigError(f"invalid value {value!r} for '{self.key}' in {self.cls.__name__}; expected {name}")


def _coerce(tp: Any, value: Any, where: _Where) -> Any:
    """Check `value` against annotation `tp` and convert its JSON/YAML spelling to the field's type.

    Annotations it does not understand (`Any`, callables, custom classes) let the value through unchanged.
    """
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _coerce_union(tp, value, where)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise where.invalid(f"one of {', '.join(map(repr, typing.get_args(tp)))}", value)
        return value
    if origin is tuple:
        return _coerce_sequence(tp, value, where)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise where.invalid(tp, value)
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(key_tp, k, where): _coerce(value_tp, v, where) for k, v in value.items()}
    return _coerce_plain(tp, value, where) if isinstance(tp, type) else value


def _coerce_union(tp: Any, value: Any, where: _Where) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [option for option in args if option is not type(None)]
    if len(options) == 1:  # `float | None`: the one type's own message says what is expected
        return _coerce(options[0], value, where)
    for option in options:
        try:
            return _coerce(option, value, where)
        except ConfigError:
            continue
    raise where.invalid(tp, value)


def _coerce_sequence(tp: Any, value: Any, where: _Where) -> tuple[Any, ...]:
    """A variable-length tuple, `tuple[X, ...]`, from a list or tuple."""
    if not isinstance(value, (list, tuple)):
        raise where.invalid(tp, value)
    item_tp = typing.get_args(tp)[0]
    return tuple(_coerce(item_tp, item, where) for item in value)


def _coerce_plain(tp: type, value: Any, where: _Where) -> Any:
    if tp is float:
        return _coerce_float(value, where)
    if tp in _SCALARS:
        # bool is a subclass of int, but True is not a valid step count.
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise where.invalid(tp, value)
    return value


def _coerce_float(value: Any, where: _Where) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # PyYAML reads exponent notation without a dot, e.g. 1e-4, as a string.
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not math.isfinite(number):
        raise where.invalid("a finite number", value)
    return number


_SCALARS = (bool, int, str)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(_to_jsonable(k)): _to_jsonable(v) for k, v in value.items()}
    return value
