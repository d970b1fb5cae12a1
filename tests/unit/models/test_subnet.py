import random

import pytest

from slimserve.models.subnet import DepthGroup, InvalidSubnetError, SubnetSpace, Unit, subnet_from_str, subnet_to_str

SPACE = SubnetSpace((Unit("stem", 64, 16), Unit("mid", 32, 8), Unit("wide", 128, 32)), group_size=8)
# a stream and the inner units of its three blocks; blocks 1 and 2 may be dropped
DEEP = SubnetSpace(
    (Unit("stage0", 32, 8), Unit("b0", 32, 8), Unit("b1", 32, 8), Unit("b2", 32, 16)),
    group_size=8,
    depth_groups=(DepthGroup("stage0", (1, 2, 3), min_blocks=1),),
)


@pytest.mark.parametrize(
    ("subnet", "message"),
    [
        ((64, 32), "3 units"),
        ((64, 32, 128, 8), "3 units"),
        ((60, 32, 128), "unit 'stem'"),
        ((64, 40, 128), "unit 'mid'"),
        ((64, 32, 0), "unit 'wide'"),
        ((64, 32, -8), "unit 'wide'"),
        ((64, 32.0, 128), "not an int"),
        ((True, 32, 128), "not an int"),
        ("64-32-128", "tuple"),
    ],
)
def test_invalid_subnets_name_the_problem(subnet: object, message: str) -> None:
    with pytest.raises(InvalidSubnetError, match=message):
        SPACE.validate(subnet)


def test_any_group_multiple_within_bounds_is_valid_even_below_trained_minimum() -> None:
    assert SPACE.validate([8, 8, 8]) == (8, 8, 8)
    assert SPACE.validate((64, 32, 128)) == SPACE.largest()


def test_uniform_widths_round_to_groups_and_clamp_to_trained_range() -> None:
    assert SPACE.uniform(1.0) == SPACE.largest()
    assert SPACE.uniform(0.25) == SPACE.smallest() == (16, 8, 32)
    assert SPACE.uniform(0.5) == (32, 16, 64)
    assert SPACE.uniform(0.05) == SPACE.smallest()
    with pytest.raises(InvalidSubnetError):
        SPACE.uniform(1.5)


def test_random_subnets_stay_in_trained_range_on_group_boundaries() -> None:
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        subnet = SPACE.random(rng)
        SPACE.validate(subnet)
        for channels, unit in zip(subnet, SPACE.units, strict=True):
            assert unit.min_channels <= channels <= unit.max_channels
        seen.add(subnet)
    assert len(seen) > 50  # per-unit sampling explores non-uniform subnets
    uniform_draws = {SPACE.random(rng, per_unit=False) for _ in range(100)}
    assert all(SPACE.width_of(s) == pytest.approx(s[0] / 64, abs=0.2) for s in uniform_draws)


def test_space_rejects_units_off_the_group_grid() -> None:
    with pytest.raises(ValueError, match="multiple of the group size"):
        SubnetSpace((Unit("bad", 60, 8),), group_size=8)
    with pytest.raises(ValueError, match="min_channels exceeds"):
        SubnetSpace((Unit("bad", 16, 32),), group_size=8)


def test_string_form_round_trips() -> None:
    assert subnet_from_str(subnet_to_str((64, 8, 128))) == (64, 8, 128)
    with pytest.raises(InvalidSubnetError, match="cannot parse"):
        subnet_from_str("64-x")


@pytest.mark.parametrize(
    ("subnet", "message"),
    [
        ((32, 0, 32, 32), "unit 'b0'.*channels"),  # the first block always runs
        ((32, 32, 0, 32), "dropped blocks must come last"),
        ((0, 32, 32, 32), "unit 'stage0'"),  # a stream is never dropped
    ],
)
def test_depth_rules_name_the_problem(subnet: tuple[int, ...], message: str) -> None:
    with pytest.raises(InvalidSubnetError, match=message):
        DEEP.validate(subnet)


def test_a_zero_inner_unit_drops_its_block_and_depths_count_the_leading_blocks() -> None:
    assert DEEP.depths((32, 32, 32, 32)) == (3,)
    assert DEEP.depths((32, 8, 16, 0)) == (2,)
    assert DEEP.depths((32, 8, 0, 0)) == (1,)
    assert DEEP.max_depths() == (3,)
    assert DEEP.droppable == frozenset({2, 3})


def test_smallest_is_narrowest_and_shallowest_and_with_depths_restores_trained_widths() -> None:
    assert DEEP.smallest() == (8, 8, 0, 0)
    assert DEEP.largest() == (32, 32, 32, 32)
    assert DEEP.with_depths(DEEP.smallest(), [3]) == (8, 8, 8, 16)  # b2 comes back at its minimum, 16
    assert DEEP.with_depths(DEEP.largest(), [2]) == (32, 32, 32, 0)
    with pytest.raises(InvalidSubnetError, match=r"depth 0; expected 1\.\.3"):
        DEEP.with_depths(DEEP.largest(), [0])
    with pytest.raises(InvalidSubnetError, match="expected 1 depths"):
        DEEP.with_depths(DEEP.largest(), [1, 2])


def test_random_subnets_sample_every_depth_and_uniform_ones_keep_full_depth() -> None:
    rng = random.Random(0)
    depths = {DEEP.depths(DEEP.random(rng)) for _ in range(200)}
    assert depths == {(1,), (2,), (3,)}
    assert {DEEP.depths(DEEP.random(rng, per_unit=False)) for _ in range(50)} == {(3,)}
    assert DEEP.uniform(0.5) == (16, 16, 16, 16)


def test_depth_groups_must_be_consistent() -> None:
    units = (Unit("a", 8, 8), Unit("b", 8, 8))
    with pytest.raises(ValueError, match="min_blocks"):
        SubnetSpace(units, depth_groups=(DepthGroup("s", (0, 1), min_blocks=0),))
    with pytest.raises(ValueError, match="distinct and in range"):
        SubnetSpace(units, depth_groups=(DepthGroup("s", (0, 5)),))
