"""The built-in supernet families, registered by importing them, and building a supernet by name.

Importing this module imports every built-in family module (each registers itself with
:func:`slimserve.models.registry.register_family`); a new family module is added to the import list below.
"""

from __future__ import annotations

from typing import Any

import slimserve.models.resnet  # noqa: F401  (registers cifar_resnet and imagenet_resnet18)
from slimserve.models.registry import FamilyFactory, Supernet, registered


def family_factory(name: str) -> FamilyFactory:
    return registered()[name]


def list_families() -> list[str]:
    return sorted(registered())


def create_supernet(family: str, **family_args: Any) -> Supernet:
    """Build a freshly initialized supernet of a registered family."""
    families = registered()
    try:
        factory = families[family]
    except KeyError:
        raise ValueError(f"unknown supernet family {family!r}; known: {', '.join(sorted(families))}") from None
    try:
        return factory(**family_args)
    except TypeError as error:
        raise ValueError(f"bad arguments for family {family!r}: {error}") from error
