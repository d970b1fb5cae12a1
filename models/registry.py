"""Registry of supernet families, so a bundle names its family and tests cover every one.

A family is a function ``(**kwargs) -> Supernet``; its keyword arguments are what a manifest
records and what ``slimserve train --family-arg`` sets, so they must be plain JSON values.
This module imports no family: a family module registers itself on import (``@register_family``),
and :mod:`slimserve.models.families` imports the built-in ones and builds supernets by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self

from torch import Tensor, nn

from slimserve.models.ops import BNStats, NormMode
from slimserve.models.subnet import Subnet, SubnetSpace


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

    # What every caller uses of it being an ``nn.Module``:
    def to(self, *args: Any, **kwargs: Any) -> Self: ...

    def eval(self) -> Self: ...

    def train(self, mode: bool = True) -> Self: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...


Step = Callable[[Tensor], Tensor]


def segments_of(module: nn.Module) -> tuple[Step, ...]:
    """A materialized subnet's forward as steps that compose to it, for the server to pause between.

    A family whose ``materialize`` returns a module with a ``segments()`` method (a list of steps,
    see ``StaticResNet``) can be paused after each; any other module is one step, run whole.
    """
    method = getattr(module, "segments", None)
    return tuple(method()) if callable(method) else (module,)


FamilyFactory = Callable[..., Supernet]
_FAMILIES: dict[str, FamilyFactory] = {}


def register_family(name: str) -> Callable[[FamilyFactory], FamilyFactory]:
    """Decorator: make ``create_supernet(name, **kwargs)`` call the decorated factory."""

    def decorator(factory: FamilyFactory) -> FamilyFactory:
        if name in _FAMILIES:
            raise ValueError(f"supernet family {name!r} is registered twice")
        _FAMILIES[name] = factory
        return factory

    return decorator


def registered() -> dict[str, FamilyFactory]:
    """The families registered so far (importing :mod:`slimserve.models.families` registers the built-in ones)."""
    return dict(_FAMILIES)
