"""Reward source types by name: `type:` in a recipe's `rewards.sources` picks a factory here.

The sources register themselves with `types.register_source` (re-exported here) when their
module is imported; `builtin.py` imports every built-in one. Dependencies point one way:
registry -> builtin -> each source module -> types.
"""
from __future__ import annotations

from megatron_ernie.rewards.types import FACTORIES, RewardSource, register_source

__all__ = ["build_source", "register_source", "source_types"]


def source_types() -> list[str]:
    _import_builtin()
    return sorted(FACTORIES)


def build_source(name: str, type_name: str, **options) -> RewardSource:
    """Build one configured source; `name` is what results and metrics are filed under."""
    _import_builtin()
    if type_name not in FACTORIES:
        raise KeyError(f"rewards.sources.{name}.type={type_name!r}: unknown; known: {', '.join(sorted(FACTORIES))}")
    try:
        src = FACTORIES[type_name](**options)
    except TypeError as e:
        raise TypeError(f"rewards.sources.{name}: {e}") from None
    src.name = name
    return src


def _import_builtin() -> None:
    # Importing the modules runs their @register_source decorators; lazily, so that importing the
    # router does not import every source (and their heavy dependencies) before one is built.
    from megatron_ernie.rewards import builtin  # noqa: F401
