"""Subnets: which channels of a weight-shared supernet run.

A subnet is an ordered tuple of channel counts, one per *prunable unit* of its supernet (this is a
contract shared with the searcher, the bundle format and the server). Units whose channels must
agree - every layer that writes into the same residual stream, for instance - share one entry, so
any tuple that passes :meth:`SubnetSpace.validate` runs. Counts move in channel groups (default 8)
so widths stay friendly to vectorized kernels and the search space stays small.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

Subnet = tuple[int, ...]


class InvalidSubnetError(ValueError):
    """A channel tuple that the supernet cannot run; the message names the offending unit."""


@dataclass(frozen=True)
class Unit:
    """One prunable unit: a set of layers whose output channels are cut together.

    Attributes:
        name: Stable, human-readable name (``"stage1"``, ``"stage1.block0.mid"``).
        max_channels: Channels at full width; a multiple of the space's group size.
        min_channels: Narrowest width the supernet is *trained* for. Narrower (down to one group)
            is valid and runs, but is outside what training sampled.
    """

    name: str
    max_channels: int
    min_channels: int


@dataclass(frozen=True)
class DepthGroup:
    """One stage whose residual blocks a subnet may drop from the end.

    Attributes:
        name: The stage (``"stage1"``).
        units: Index of each block's inner unit, in block order; 0 channels there drops the block.
        min_blocks: Leading blocks that always run (the first changes the stream's shape, or the
            stage would be empty).
    """

    name: str
    units: tuple[int, ...]
    min_blocks: int = 1


@dataclass(frozen=True)
class SubnetSpace:
    """All subnets of one supernet, with the validation and sampling everyone shares.

    Example:
        >>> space = SubnetSpace((Unit("stem", 64, 16), Unit("mid", 32, 8)), group_size=8)
        >>> space.uniform(0.5)
        (32, 16)
        >>> space.validate((24, 8))
        (24, 8)
    """

    units: tuple[Unit, ...]
    group_size: int = 8  # 8 fp32 lanes fill a 256-bit vector register; also the search's step
    depth_groups: tuple[DepthGroup, ...] = ()  # stages with elastic depth; () = fixed depth

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for group in self.depth_groups:
            if not 1 <= group.min_blocks <= len(group.units):
                raise ValueError(f"depth group {group.name!r}: min_blocks must be in 1..{len(group.units)}")
            if seen & set(group.units) or not all(0 <= u < len(self.units) for u in group.units):
                raise ValueError(f"depth group {group.name!r}: unit indices must be distinct and in range")
            seen |= set(group.units)
        for unit in self.units:
            for field_name in ("max_channels", "min_channels"):
                value = getattr(unit, field_name)
                if value % self.group_size or value <= 0:
                    raise ValueError(
                        f"unit {unit.name!r}: {field_name}={value} is not a positive multiple of "
                        f"the group size {self.group_size}"
                    )
            if unit.min_channels > unit.max_channels:
                raise ValueError(f"unit {unit.name!r}: min_channels exceeds max_channels")

    @property
    def unit_names(self) -> tuple[str, ...]:
        return tuple(unit.name for unit in self.units)

    def largest(self) -> Subnet:
        return tuple(unit.max_channels for unit in self.units)

    def smallest(self) -> Subnet:
        """The narrowest and shallowest *trained* subnet: minimum depth, every unit at its ``min_channels``."""
        return self.with_depths(
            tuple(unit.min_channels for unit in self.units), [group.min_blocks for group in self.depth_groups]
        )

    @cached_property  # validate() runs on every supernet forward
    def droppable(self) -> frozenset[int]:
        """Units that may be 0 (their block dropped)."""
        return frozenset(u for group in self.depth_groups for u in group.units[group.min_blocks :])

    def depths(self, subnet: Subnet) -> tuple[int, ...]:
        """Blocks run in each depth group (stage), in the order of ``depth_groups``."""
        subnet = self.validate(subnet)
        return tuple(sum(1 for u in group.units if subnet[u]) for group in self.depth_groups)

    def max_depths(self) -> tuple[int, ...]:
        return tuple(len(group.units) for group in self.depth_groups)

    def with_depths(self, subnet: Subnet, depths: Sequence[int]) -> Subnet:
        """``subnet`` running the first ``depths[g]`` blocks of each stage.

        Blocks that were dropped and come back take their unit's trained minimum width.
        """
        if len(depths) != len(self.depth_groups):
            raise InvalidSubnetError(f"expected {len(self.depth_groups)} depths (one per stage), got {len(depths)}")
        channels = list(subnet)
        for group, depth in zip(self.depth_groups, depths, strict=True):
            if not group.min_blocks <= depth <= len(group.units):
                raise InvalidSubnetError(
                    f"{group.name}: depth {depth}; expected {group.min_blocks}..{len(group.units)} blocks"
                )
            for position, unit in enumerate(group.units):
                if position >= depth:
                    channels[unit] = 0
                elif channels[unit] == 0:
                    channels[unit] = self.units[unit].min_channels
        return self.validate(tuple(channels))

    def validate(self, subnet: object) -> Subnet:
        """Return ``subnet`` as a tuple of ints, or raise :class:`InvalidSubnetError` saying why."""
        if not isinstance(subnet, (tuple, list)):
            raise InvalidSubnetError(
                f"a subnet is a tuple of {len(self.units)} channel counts, got {type(subnet).__name__}"
            )
        if len(subnet) != len(self.units):
            raise InvalidSubnetError(
                f"subnet has {len(subnet)} channel counts, this supernet has {len(self.units)} "
                f"units ({', '.join(self.unit_names)})"
            )
        droppable = self.droppable
        for index, (unit, channels) in enumerate(zip(self.units, subnet, strict=True)):
            if isinstance(channels, bool) or not isinstance(channels, int):
                raise InvalidSubnetError(f"unit {unit.name!r}: channel count {channels!r} is not an int")
            if channels == 0 and index in droppable:
                continue
            if channels % self.group_size or not self.group_size <= channels <= unit.max_channels:
                zero = " (or 0 to drop its block)" if index in droppable else ""
                raise InvalidSubnetError(
                    f"unit {unit.name!r}: {channels} channels; expected a multiple of "
                    f"{self.group_size} between {self.group_size} and {unit.max_channels}{zero}"
                )
        for group in self.depth_groups:
            running = [subnet[u] != 0 for u in group.units]
            if running != sorted(running, reverse=True):
                raise InvalidSubnetError(
                    f"{group.name}: a subnet runs the leading blocks of a stage; "
                    f"dropped blocks must come last, got {[subnet[u] for u in group.units]}"
                )
        return tuple(subnet)

    def uniform(self, width: float) -> Subnet:
        """US-Nets style uniform width multiplier, rounded to whole groups, clamped to the trained range."""
        if not 0.0 < width <= 1.0:
            raise InvalidSubnetError(f"width multiplier must be in (0, 1], got {width}")
        channels = []
        for unit in self.units:
            groups = max(1, round(unit.max_channels * width / self.group_size))
            channels.append(min(unit.max_channels, max(unit.min_channels, groups * self.group_size)))
        return tuple(channels)

    def random(self, rng: random.Random, *, per_unit: bool = True) -> Subnet:
        """Sample a trained subnet.

        Args:
            rng: Source of randomness, so callers decide reproducibility.
            per_unit: True draws each unit's group count and each stage's depth independently
                (channel-group sampling, so the supernet learns non-uniform subnets the searcher
                will visit); False draws one uniform width multiplier at full depth, as in US-Nets.
        """
        if not per_unit:
            low = max(unit.min_channels / unit.max_channels for unit in self.units)
            return self.uniform(rng.uniform(low, 1.0))
        widths = tuple(
            self.group_size * rng.randint(unit.min_channels // self.group_size, unit.max_channels // self.group_size)
            for unit in self.units
        )
        return self.with_depths(widths, [rng.randint(g.min_blocks, len(g.units)) for g in self.depth_groups])

    def groups(self, subnet: Subnet) -> tuple[int, ...]:
        return tuple(channels // self.group_size for channels in self.validate(subnet))

    def width_of(self, subnet: Subnet) -> float:
        """Mean fraction of channels kept (a dropped block's unit keeps none), a one-number summary for plots and logs."""
        subnet = self.validate(subnet)
        return math.fsum(c / u.max_channels for c, u in zip(subnet, self.units, strict=True)) / len(self.units)


def subnet_to_str(subnet: Subnet) -> str:
    """Compact, stable spelling used in ids, logs and file keys: ``"64-32-..."``."""
    return "-".join(str(channels) for channels in subnet)


def subnet_from_str(text: str) -> Subnet:
    try:
        return tuple(int(part) for part in text.split("-"))
    except ValueError as error:
        raise InvalidSubnetError(f"cannot parse subnet {text!r}: expected counts joined by '-'") from error
