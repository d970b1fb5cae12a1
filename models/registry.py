"""Registry of supernet families, so a bundle names its family and tests cover every one.

A family is a function ``(**kwargs) -> Supernet``; its keyword arguments are what a manifest
records and what ``slimserve train --family-arg`` sets, so they must be plain JSON values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from models.ops import BNStats, NormMode
from models.subnet import Subnet, SubnetSpace


@dataclass(frozen=True)
class ChannelAxis:
    """One axis of one parameter that is indexed by a unit's channels.

    ``produces`` is True where the parameter computes those channels (a conv's output axis, a batch
    norm's affine parameters) and False where it reads them (the next conv's input axis). Channel
    ranking looks at producers; a channel permutation must apply to both, or the function changes.
    """

    parameter: str
    axis: int
    produces: bool


class Supernet(Protocol):
    """What the trainer, the searcher and the server need from a dynamic-width network."""

    space: SubnetSpace
    input_shape: tuple[int, int, int]  # (channels, height, width) of one image
    num_classes: int

    def __call__(self, x: Tensor, subnet: Subnet, norm: NormMode = ...) -> Tensor: ...

    def materialize(self, subnet: Subnet, bn_stats: BNStats) -> nn.Module: ...

    def channel_axes(self, unit_index: int) -> list[ChannelAxis]: ...


FamilyFactory = Callable[..., Any]
_FAMILIES: dict[str, FamilyFactory] = {}


def family_factory(name: str) -> FamilyFactory:
    _import_builtin_families()
    return _FAMILIES[name]


def register_family(name: str) -> Callable[[FamilyFactory], FamilyFactory]:
    """Decorator: make ``create_supernet(name, **kwargs)`` call the decorated factory."""

    def decorator(factory: FamilyFactory) -> FamilyFactory:
        if name in _FAMILIES:
            raise ValueError(f"supernet family {name!r} is registered twice")
        _FAMILIES[name] = factory
        return factory

    return decorator


def list_families() -> list[str]:
    _import_builtin_families()
    return sorted(_FAMILIES)


def create_supernet(family: str, **family_args: Any) -> Any:
    """Build a freshly initialized supernet of a registered family."""
    _import_builtin_families()
    try:
        factory = _FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown supernet family {family!r}; known: {', '.join(sorted(_FAMILIES))}") from None
    try:
        return factory(**family_args)
    except TypeError as error:
        raise ValueError(f"bad arguments for family {family!r}: {error}") from error


def _import_builtin_families() -> None:
    # Imported here, not at module top, because the family modules import this one to register.
    import models.resnet  # noqa: F401
