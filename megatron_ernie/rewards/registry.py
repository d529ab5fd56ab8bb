"""Reward source types by name: `type:` in a recipe's `rewards.sources` picks a factory here."""
from __future__ import annotations

from typing import Callable

from megatron_ernie.rewards.types import RewardSource

_FACTORIES: dict[str, Callable[..., RewardSource]] = {}


def register_source(type_name: str):
    """Class or function decorator: `@register_source("math")` makes `type: math` buildable."""
    def deco(factory):
        if type_name in _FACTORIES and _FACTORIES[type_name] is not factory:
            raise ValueError(f"reward source type {type_name!r} registered twice")
        _FACTORIES[type_name] = factory
        return factory
    return deco


def source_types() -> list[str]:
    _import_builtin()
    return sorted(_FACTORIES)


def build_source(name: str, type_name: str, **options) -> RewardSource:
    """Build one configured source; `name` is what results and metrics are filed under."""
    _import_builtin()
    if type_name not in _FACTORIES:
        raise KeyError(f"rewards.sources.{name}.type={type_name!r}: unknown; known: {', '.join(sorted(_FACTORIES))}")
    try:
        src = _FACTORIES[type_name](**options)
    except TypeError as e:
        raise TypeError(f"rewards.sources.{name}: {e}") from None
    src.name = name
    return src


def _import_builtin() -> None:
    # Importing the modules runs their @register_source decorators.
    import importlib

    importlib.import_module("megatron_ernie.rewards.builtin")
