"""How every model config goes to and from a bundle's config.json."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="ConfigBase")


class ConfigBase:
    """Mixin for config dataclasses: `to_dict` and a strict `from_dict`.

    Unknown keys are an error, so a typo in a config never falls back silently to a
    default. `nested` names the fields that are themselves configs.
    """

    nested: ClassVar[dict[str, type[ConfigBase]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        kwargs = {k: cls.nested[k].from_dict(v) if k in cls.nested and isinstance(v, dict) else v
                  for k, v in d.items()}
        return cls(**kwargs)
