"""How every model config goes to and from a bundle's config.json, checked on the way in.

A config file is user input: a typo, a wrong type (`"num_heads": "four"`, `true` read as
1), or an absurd size (`"context": 1000000000`, a million layers) must be refused when the
file is read, naming the key, before anything is allocated. `from_dict` checks every
value against its field's type; each config's `check()` then checks the bounds and the
relations between fields (heads divide the width, ...).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

from ..errors import WeightsError

T = TypeVar("T", bound="ConfigBase")


class ConfigError(WeightsError):
    """A config value that cannot be used; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def check_value(key: str, value: Any, tp: Any) -> Any:
    """`value` as the field type `tp` wants it, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return check_value(key, value, option)
            except ConfigError:
                pass
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def check_range(key: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: {value} is out of range [{lo}, {hi}]")


def check_divides(key: str, value: int, by_key: str, by: int) -> None:
    if by <= 0 or value % by:
        raise ConfigError(f"{key}: {value} is not a multiple of {by_key} ({by})")


class ConfigBase:
    """Mixin for config dataclasses: `to_dict` and a strict, checked `from_dict`.

    Unknown keys are an error, so a typo in a config never falls back silently to a
    default. `nested` names the fields that are themselves configs.
    """

    nested: ClassVar[dict[str, type[ConfigBase]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: Any, where: str = "") -> T:
        """`where`: the key path of this config in its file, for messages (e.g. "lm.")."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where.rstrip('.') or cls.__name__}: expected a JSON object, "
                              f"got {type(d).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: "
                              f"{', '.join(where + k for k in sorted(unknown))}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in d.items():
            if k in cls.nested:
                kwargs[k] = cls.nested[k].from_dict(v, f"{where}{k}.")
            else:
                kwargs[k] = check_value(where + k, v, hints[k])
        try:
            cfg = cls(**kwargs)  # some configs check themselves here, not knowing `where`
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from None
        cfg.check(where)
        return cfg

    def check(self, where: str = "") -> None:
        """Bounds and relations of the values (each config adds its own)."""
