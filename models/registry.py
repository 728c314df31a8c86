"""Name → builder registry for every architecture the project knows.

A builder is a small function taking a config dataclass; the registry turns a plain-dict config (as
stored in a checkpoint manifest) back into that dataclass, so a checkpoint can rebuild its model
without pickled objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn


class UnknownModelError(KeyError):
    """Raised for an architecture name nobody registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    builder: Callable[[Any], nn.Module]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, config_cls: type) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator: register ``builder(config) -> nn.Module`` under ``name``; duplicates are refused."""

    def decorate(builder: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        if not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"config for {name!r} must be a dataclass")
        _REGISTRY[name] = ModelSpec(name, config_cls, builder)
        return builder

    return decorate


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown architecture {name!r}; known: {', '.join(available_models())}"
        ) from None


def config_from_dict(name: str, values: dict[str, Any] | None = None) -> Any:
    """Build the config dataclass of ``name`` from plain values, refusing unknown fields."""
    spec = get_model_spec(name)
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config fields for {name!r}: {unknown}; known: {sorted(known)}")
    # JSON turns tuples into lists; restore them where the default is a tuple.
    for field in dataclasses.fields(spec.config_cls):
        if field.name in values and isinstance(values[field.name], list):
            values[field.name] = tuple(values[field.name])
    return spec.config_cls(**values)


def build_model(name: str, config: Any = None) -> nn.Module:
    """Build architecture ``name`` from a config dataclass, a plain dict, or defaults."""
    spec = get_model_spec(name)
    if config is None or isinstance(config, dict):
        config = config_from_dict(name, config)
    elif not isinstance(config, spec.config_cls):
        raise TypeError(f"{name!r} expects {spec.config_cls.__name__}, got {type(config).__name__}")
    return spec.builder(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
