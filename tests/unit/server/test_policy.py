"""The scheduling policies with plain numbers: no model, no server, no clock."""

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimserve.server.policy import (
    AdaptivePolicy,
    Context,
    LargestThatFitsPolicy,
    Pending,
    RecentBudgets,
    StaticPolicy,
    blocking_wait,
    candidate_batches,
    largest_batch_meeting,
    parse_policy,
    rest_schedulable,
    sustainable,
)

# Four subnets; latency (s) = fixed cost + per-image cost, both growing with the subnet index.
FIXED = (0.001, 0.002, 0.004, 0.006)
PER_IMAGE = (0.0003, 0.0008, 0.0015, 0.0025)


def latency(subnet: int, batch: int) -> float:
    return FIXED[subnet] + PER_IMAGE[subnet] * batch


def queue(*budgets: float, now: float = 0.0) -> list[Pending]:
    return sorted((Pending(now + b, b) for b in budgets), key=lambda p: p.deadline)


ACCURACY = (0.89, 0.91, 0.925, 0.93)
ADAPTIVE = AdaptivePolicy(ACCURACY)
NEUTRAL = AdaptivePolicy(ACCURACY, miss_penalty=1.0)  # a miss costs its accuracy: the most expected in-time accuracy


def at(rate: float = 0.0, *budgets: float) -> Context:
    """A dispatch at time 0 with the latencies above, batches of up to 32, recent budgets as given."""
    return Context(0.0, latency, 32, rate, RecentBudgets.of(budgets) if budgets else None)


def test_an_idle_server_gives_a_loose_budget_the_most_accurate_subnet() -> None:
    decision = ADAPTIVE.decide(queue(0.100), at())
    assert (decision.subnet, decision.batch, decision.meets_head_deadline) == (3, 1, True)


def test_a_tight_budget_gets_the_largest_subnet_that_fits() -> None:
    assert ADAPTIVE.decide(queue(0.004), at()).subnet == 1  # 2.8 ms fits, 5.5 ms does not
    assert ADAPTIVE.decide(queue(0.0012), at()).subnet == 0


def test_queued_requests_are_batched_when_the_batch_still_meets_the_head_deadline() -> None:
    decision = ADAPTIVE.decide(queue(*([0.05] * 8)), at())
    assert decision.batch == 8 and decision.subnet == 3  # 6 + 8 x 2.5 = 26 ms <= 50 ms


def test_a_deep_queue_upgrades_many_requests_a_little_rather_than_one_a_lot() -> None:
    # 64 requests due in 30 ms. The full subnet on one request leaves the other 63 just schedulable
    # by the fastest one; a mid-size subnet on a batch of 8 gains more accuracy in total.
    decision = ADAPTIVE.decide(queue(*([0.030] * 64)), at())
    assert (decision.subnet, decision.batch) == (1, 8)
    rest = queue(*([0.030] * (64 - decision.batch)))
    assert rest_schedulable(latency(decision.subnet, decision.batch), rest, latency, 32)
    assert not rest_schedulable(latency(1, 16), queue(*([0.030] * 48)), latency, 32)


def test_high_arrival_rate_steers_away_from_unsustainable_subnets() -> None:
    # at 1000 req/s the largest subnet needs >= 2.5 ms per image: it cannot keep up even batched
    assert ADAPTIVE.decide(queue(0.100), at(1000.0)).subnet < 3
    assert ADAPTIVE.decide(queue(0.100), at(10.0)).subnet == 3


def test_the_share_a_wait_makes_miss_counts_each_budget_by_where_in_the_batch_it_arrives() -> None:
    budgets = RecentBudgets.of([0.100, 0.001, 0.005, 0.010])
    # A 4 ms batch, then 2 ms on the fastest subnet: 1 ms misses anyway (not caused), 5 ms misses
    # when it arrives in the first quarter of the batch, 10 and 100 ms never.
    assert budgets.share_missed(0.004, 0.002) == pytest.approx(0.25 / 4)
    assert budgets.share_missed(0.0, 0.002) == 0.0 and RecentBudgets.of([]).share_missed(0.004, 0.002) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 0.1), min_size=1, max_size=40),
    st.floats(1e-4, 0.05),
    st.floats(0.0, 0.01),
)
def test_the_share_missed_is_the_mean_of_each_budgets_miss_probability(
    budgets: list[float], wait: float, after: float
) -> None:
    each = [0.0 if b <= after else min(1.0, max(0.0, (wait + after - b) / wait)) for b in budgets]
    assert RecentBudgets.of(budgets).share_missed(wait, after) == pytest.approx(sum(each) / len(each), abs=1e-9)


def test_a_wide_batch_is_priced_by_the_tight_arrivals_it_would_make_miss() -> None:
    # One loose request; every recent request had 6 ms. Subnet 3 alone takes 8.5 ms: a request
    # arriving in its first half waits too long (then 1.6 ms on subnet 0 with the one that came
    # meanwhile). Expected misses = rate x 8.5 ms x 48%; each costs 0.89, against a gain of 0.04.
    loose = queue(0.100)
    assert NEUTRAL.decide(loose, at(1.0, 0.006)).subnet == 3  # 0.004 misses: the upgrade pays
    assert NEUTRAL.decide(loose, at(10.0, 0.006)).subnet == 2  # 0.04 misses: subnet 2's 0.011 pay better
    assert NEUTRAL.decide(loose, at(50.0, 0.006)).subnet == 1  # 2.8 ms + 1.6 ms: nobody waits too long
    # With no budgets seen yet, or only loose ones, nothing to price.
    assert NEUTRAL.decide(loose, at(50.0)).subnet == 3
    assert NEUTRAL.decide(loose, at(50.0, 0.100)).subnet == 3


def test_the_default_miss_penalty_gives_up_an_upgrade_sooner_than_a_neutral_one() -> None:
    assert ADAPTIVE.miss_penalty == 3.0  # the load tests kept more requests in time with it (docs/RESULTS.md)
    assert NEUTRAL.decide(queue(0.100), at(10.0, 0.006)).subnet == 2
    assert ADAPTIVE.decide(queue(0.100), at(10.0, 0.006)).subnet == 1  # subnet 2's 0.011 misses x 3 > 0.035 - 0.02
    assert ADAPTIVE.decide(queue(0.100), at(0.0, 0.006)).subnet == 3  # no arrivals expected: no price


def test_the_price_counts_the_requests_that_arrive_while_the_batch_runs() -> None:
    # 300 req/s, budgets 10 ms. Subnet 3 alone takes 8.5 ms: a request arriving just after it starts
    # waits 8.5 ms, then runs with the ~3 others that came meanwhile on subnet 0 (1 + 0.3 x 4 =
    # 2.2 ms): 10.7 ms, a miss. Subnet 2 (5.5 + 1.9 = 7.4 ms) leaves every arrival in time.
    assert ADAPTIVE.decide(queue(0.100), at(300.0, 0.010)).subnet == 2
    assert ADAPTIVE.decide(queue(0.100), at(300.0, 0.011)).subnet == 3


def test_the_price_of_collateral_misses_moves_the_choice_towards_the_fastest_subnet() -> None:
    # One loose request on an idle server. Net gains (gain - rate x extra seconds x 0.89):
    # subnet 3: 0.04 - rate x 7.2 ms x 0.89, subnet 2: 0.035 - rate x 4.2 ms x 0.89, subnet 1: 0.02 - rate x 1.5 ms x 0.89.
    def choice(collateral_rate: float) -> int:
        return NEUTRAL.decide(queue(0.100), Context(0.0, latency, 32, collateral_rate=collateral_rate)).subnet

    assert choice(0.0) == 3  # no misses seen: the most accurate that fits
    assert choice(5.0) == 2  # 0.008 < 0.0163 > 0.0133
    assert choice(12.0) == 1  # 2 and 3 no longer pay; 1 still does (0.004)
    assert choice(20.0) == 0  # no upgrade pays for its risk
    assert math.isclose(
        NEUTRAL.net_gain(3, 1, Context(0.0, latency, 32, collateral_rate=5.0)),
        0.04 - 5.0 * (latency(3, 1) - latency(0, 1)) * 0.89,
    )


def test_when_nothing_can_make_it_the_fastest_subnet_drains_the_lost_requests_together() -> None:
    decision = ADAPTIVE.decide(queue(0.0005, 0.0006, 0.0007, 0.050), at())
    assert decision.subnet == 0 and not decision.meets_head_deadline
    assert decision.batch == 3  # the three already lost, not the one that can still be served well


def test_under_overload_savable_requests_ride_along_with_the_lost_ones() -> None:
    # Three lost, then 60 due at 12 ms: draining the three alone (1.9 ms) leaves 60 that two
    # batches cannot serve by 12 ms, so the batch is filled to the limit, as a static policy drains.
    backlog = queue(0.0005, 0.0006, 0.0007, *([0.012] * 60))
    decision = ADAPTIVE.decide(backlog, at())
    assert decision.subnet == 0 and not decision.meets_head_deadline
    assert decision.batch == 32
    assert not rest_schedulable(latency(0, 3), backlog[3:], latency, 32)  # the premise
    # Even when the first savable one is due so soon that a full batch makes it late: a backlog is
    # cleared by throughput, and small batches never catch up.
    backlog = queue(0.0005, 0.0006, 0.0007, *([0.003] * 60))
    assert ADAPTIVE.decide(backlog, at()).batch == 32
    assert ADAPTIVE.decide(queue(0.0005, 0.0006, 0.0007, 0.050), at()).batch == 3  # no backlog: the lost alone


def test_static_policy_batches_as_much_as_meets_the_head_deadline() -> None:
    policy = StaticPolicy(2)
    decision = policy.decide(queue(*([0.010] * 10)), at())
    assert decision.subnet == 2 and decision.batch == 4  # 4 + 4 x 1.5 = 10 ms
    late = policy.decide(queue(*([0.001] * 10)), at())
    assert late.batch == 10 and not late.meets_head_deadline


def test_largest_that_fits_looks_at_the_budget_not_at_the_queue() -> None:
    policy = LargestThatFitsPolicy(4)
    # the head has waited 40 of its 50 ms: the queue-blind policy still picks by the full 50 ms budget
    waited = [Pending(0.010, 0.050)]
    assert policy.decide(waited, at()).subnet == 3
    assert ADAPTIVE.decide(waited, at()).subnet == 3  # 8.5 ms fits in 10 ms too
    squeezed = [Pending(0.003, 0.050)]
    assert policy.decide(squeezed, at()).subnet == 3
    assert ADAPTIVE.decide(squeezed, at()).subnet == 1


def test_parse_policy() -> None:
    assert parse_policy("adaptive", ["a", "b"], [0.8, 0.9]).name == "adaptive"
    assert parse_policy("static:b", ["a", "b"], [0.8, 0.9]) == StaticPolicy(1, name="static:b")
    for bad in ("static:z", "fastest", ""):
        try:
            parse_policy(bad, ["a", "b"], [0.8, 0.9])
        except ValueError as error:
            assert "static" in str(error) or "subnet" in str(error)
        else:
            raise AssertionError(bad)


def test_helpers() -> None:
    assert candidate_batches(1) == [1]
    assert candidate_batches(12) == [1, 2, 4, 8, 12]
    assert largest_batch_meeting(3, 0.0, 0.0085, latency, 32) == 1
    assert largest_batch_meeting(3, 0.0, 0.0084, latency, 32) == 0


# --- properties ------------------------------------------------------------------------------

budgets = st.floats(min_value=0.0001, max_value=0.2)
queues = st.lists(budgets, min_size=1, max_size=40)
rates = st.floats(min_value=0.0, max_value=2000.0)


@settings(max_examples=300, deadline=None)
@given(queues, rates)
def test_never_picks_a_predicted_miss_when_a_predicted_meet_exists(budget_list: list[float], rate: float) -> None:
    pending = queue(*budget_list)
    decision = ADAPTIVE.decide(pending, at(rate))
    any_meets = latency(0, 1) <= pending[0].deadline
    assert decision.meets_head_deadline == any_meets
    if any_meets:
        assert latency(decision.subnet, decision.batch) <= pending[0].deadline
    assert 1 <= decision.batch <= min(32, len(pending))


@settings(max_examples=300, deadline=None)
@given(budgets, budgets, rates)
def test_a_looser_budget_never_gets_a_smaller_subnet(first: float, second: float, rate: float) -> None:
    tight, loose = sorted((first, second))
    assert ADAPTIVE.decide(queue(tight), at(rate)).subnet <= ADAPTIVE.decide(queue(loose), at(rate)).subnet


def smooth_overrun(subnet: int, batch: int, available: float) -> float:
    """A batch overruns more often the less time it has beyond its prediction (within 4 ms)."""
    return min(1.0, max(0.0, (latency(subnet, batch) + 0.002 - available) / 0.004))


def exhaustive(policy: AdaptivePolicy, pending: list[Pending], context: Context) -> tuple[float, int, int] | None:
    """Every configuration the guards let through, none skipped: the (net gain, subnet, batch)
    ``decide`` must choose (None: it falls back to the fastest subnet)."""
    head, options = pending[0].deadline, []
    for subnet in range(len(policy.accuracies)):
        if not sustainable(subnet, context.arrival_rate, context.predict, context.max_batch, policy.utilization):
            continue
        fits = largest_batch_meeting(subnet, context.now, head, context.predict, min(len(pending), context.max_batch))
        for batch in candidate_batches(fits) if fits else []:
            duration = context.predict(subnet, batch)
            if not rest_schedulable(context.now + duration, pending[batch:], context.predict, context.max_batch):
                continue
            gain = 0.0 if subnet == 0 else policy.net_gain(subnet, batch, context, head - context.now)
            if subnet == 0 or gain > 0:
                options.append((gain, subnet, batch))
    return max(options, default=None)


@settings(max_examples=400, deadline=None)
@given(
    queues,
    rates,
    st.lists(budgets, max_size=12),
    st.floats(min_value=0.0, max_value=50.0),
    st.booleans(),
    st.sampled_from([ADAPTIVE, NEUTRAL, AdaptivePolicy(ACCURACY, miss_penalty=0.0)]),
    st.sampled_from([None, (1, 4, 6, 8), (3, 3, 1, 2)]),
)
def test_skipping_candidates_that_cannot_win_never_changes_the_choice(
    budget_list: list[float],
    rate: float,
    recent: list[float],
    collateral: float,
    overruns: bool,
    policy: AdaptivePolicy,
    pause_steps: tuple[int, ...] | None,
) -> None:
    pending = queue(*budget_list)
    context = Context(
        0.0, latency, 32, rate, RecentBudgets.of(recent) if recent else None, collateral,
        smooth_overrun if overruns else None, pause_steps=pause_steps,
    )  # fmt: skip
    decision, expected = policy.decide(pending, context), exhaustive(policy, pending, context)
    if expected is not None:
        assert (decision.subnet, decision.batch) == expected[1:]
    else:
        assert decision.subnet == 0


def test_a_row_that_fills_the_time_to_the_edge_pays_for_its_chance_to_overrun() -> None:
    # One request with 9 ms: every subnet fits by its prediction. The machine overruns a batch by
    # more than 1 ms 10% of the time (and by more than 4 ms 1%); subnet 3 (8.5 ms) has 0.5 ms to
    # spare, subnet 2 (5.5 ms) 3.5 ms, subnet 1 (2.8 ms) 6.2 ms.
    def overrun(subnet: int, batch: int, available: float) -> float:
        spare = available - latency(subnet, batch)
        return 0.5 if spare < 0.001 else 0.10 if spare < 0.004 else 0.01 if spare < 0.005 else 0.0

    risky = Context(0.0, latency, 32, overrun=overrun)
    assert ADAPTIVE.decide(queue(0.009), at()).subnet == 3  # without the risk: the most accurate that fits
    assert ADAPTIVE.decide(queue(0.009), risky).subnet == 1  # 3 and 2 lose more in misses than they gain
    assert math.isclose(ADAPTIVE.net_gain(3, 1, risky, 0.009), 0.93 * 0.5 - 0.89)
    assert math.isclose(ADAPTIVE.net_gain(2, 1, risky, 0.009), 0.925 * 0.9 - 0.89)
    assert ADAPTIVE.decide(queue(0.100), risky).subnet == 3  # with room to spare, the risk is gone


def test_the_price_of_blocking_is_made_of_mean_batch_times_not_tail_margined_ones() -> None:
    # A noisy spell: deadlines are checked against 1.7x the mean batch time. Requests arrive at
    # 20/s, each with 8 ms left. Subnet 2 runs 5.5 ms on average: one arriving meanwhile waits at
    # most 5.5 ms, then 1.6 ms on the fastest row with the next one - in time. Priced on the margined
    # 9.35 ms (+ 2.72 ms after), 44% of the 0.19 arrivals would miss: 3 x 0.081 x 0.89 = 0.217,
    # more than the 0.035 subnet 2 gains, and the policy keeps subnet 1 (whose batch blocks nobody).
    def tail_margined(subnet: int, batch: int) -> float:
        return 1.7 * latency(subnet, batch)

    recent = RecentBudgets.of([0.008] * 10)
    margined_only = Context(0.0, tail_margined, 32, 20.0, recent)
    with_mean = Context(0.0, tail_margined, 32, 20.0, recent, expect=latency)
    assert ADAPTIVE.net_gain(2, 1, margined_only, 0.030) == pytest.approx(0.925 - 0.89 - 3 * 0.0814 * 0.89, abs=1e-3)
    assert ADAPTIVE.net_gain(2, 1, with_mean, 0.030) == pytest.approx(0.925 - 0.89)
    assert ADAPTIVE.decide(queue(0.030), margined_only).subnet == 1
    assert ADAPTIVE.decide(queue(0.030), with_mean).subnet == 2
    # subnet 3 (8.5 ms mean) does block them: a quarter of 0.17 arrivals, 3 x 0.042 x 0.89 = 0.11 > its 0.04 gain
    assert ADAPTIVE.net_gain(3, 1, with_mean, 0.030) < 0


def test_where_the_server_pauses_a_batch_an_arrival_waits_for_one_step_of_it() -> None:
    # The case above where subnet 1 wins (10 req/s, every recent request with 6 ms): run in 8 steps
    # of 1.06 ms, subnet 3 makes nobody miss (1.06 + 1.6 ms < 6 ms), so the loose request gets it.
    paused = dataclasses.replace(at(10.0, 0.006), pause_steps=(1, 4, 6, 8))
    assert ADAPTIVE.decide(queue(0.100), at(10.0, 0.006)).subnet == 1
    assert ADAPTIVE.decide(queue(0.100), paused).subnet == 3
    assert blocking_wait(3, 1, paused, 0.100) == pytest.approx(latency(3, 1) / 8)
    assert blocking_wait(3, 1, at(10.0, 0.006), 0.100) == latency(3, 1)
    # The server pauses only while the paused batch still meets its deadline: with 9 ms to it,
    # subnet 3 (8.5 ms) leaves 0.5 ms, less than the fastest subnet needs (1.3 ms), so it runs whole.
    assert blocking_wait(3, 1, paused, 0.009) == latency(3, 1)
    assert blocking_wait(2, 1, paused, 0.009) == pytest.approx(latency(2, 1) / 6)


# --- splitting a batch: the tight head alone, the looser requests on a wider row next ----------------

SPLITTING = AdaptivePolicy(ACCURACY, split_batches=True)
FLAT = (0.0008, 0.0012, 0.0016, 0.0022)  # a GPU's batch times: by row, whatever the batch size


def flat(subnet: int, batch: int) -> float:
    return FLAT[subnet]


def test_a_tight_head_runs_alone_when_the_requests_behind_it_can_afford_a_wider_row_next() -> None:
    # Due in 1 ms, only subnet 0 fits the head; the two behind it have 15 ms. One batch would serve
    # all three on subnet 0; the head alone and then the other two on subnet 3 costs one more batch
    # on subnet 0 (0.8 ms) and gains them 4 points each.
    pending = queue(0.001, 0.015, 0.015)
    split = SPLITTING.decide(pending, Context(0.0, flat, 32))
    assert (split.subnet, split.batch, split.meets_head_deadline) == (0, 1, True)
    whole = ADAPTIVE.decide(pending, Context(0.0, flat, 32))
    assert (whole.subnet, whole.batch) == (0, 3)
    # the next decision, once the head is served, gives the rest the most accurate row
    assert SPLITTING.decide(pending[1:], Context(flat(0, 1), flat, 32)).subnet == 3


def test_requests_as_tight_as_the_head_stay_in_its_batch() -> None:
    # All three due in 1 ms, or all three in 2.5 ms: none could run on a wider row after the head
    # (0.8 ms on subnet 0, then at least 1.2 ms), so nothing is split.
    decision = SPLITTING.decide(queue(0.001, 0.001, 0.001), Context(0.0, flat, 32))
    assert (decision.subnet, decision.batch) == (0, 3)
    decision = SPLITTING.decide(queue(0.0025, 0.0025, 0.0025), Context(0.0, flat, 32))
    assert (decision.subnet, decision.batch) == (3, 3)
    decision = SPLITTING.decide(queue(0.0015, 0.0015, 0.0015), Context(0.0, flat, 32))
    assert (decision.subnet, decision.batch) == (1, 3)


def test_a_split_is_not_worth_the_misses_a_second_batch_causes_others() -> None:
    # As above, with misses caused measured at 18 per second of extra busy time: the next batch's
    # upgrade still pays for its own time (+0.03 on subnet 2), not for the 0.8 ms of a second batch
    # (0.04 = 3 x 0.89 x 18 x 0.0008). At 5 per second the split pays again.
    pending = queue(0.001, 0.015, 0.015)
    costly = Context(0.0, flat, 32, collateral_rate=18.0)
    assert SPLITTING.follow_up(pending[1:], 2, flat(0, 1), costly, range(4)) == (
        pytest.approx(2 * (0.925 - 0.89) - 3 * 0.89 * 18 * 0.0008),
        2,
    )
    assert (SPLITTING.decide(pending, costly).subnet, SPLITTING.decide(pending, costly).batch) == (0, 3)
    cheaper = Context(0.0, flat, 32, collateral_rate=5.0)
    assert (SPLITTING.decide(pending, cheaper).subnet, SPLITTING.decide(pending, cheaper).batch) == (0, 1)


@settings(max_examples=300, deadline=None)
@given(queues, rates)
def test_a_split_never_leaves_the_rest_of_the_queue_unschedulable(budget_list: list[float], rate: float) -> None:
    pending = queue(*budget_list)
    whole = ADAPTIVE.decide(pending, at(rate))
    split = SPLITTING.decide(pending, at(rate))
    assert split.meets_head_deadline == whole.meets_head_deadline
    if rest_schedulable(latency(whole.subnet, whole.batch), pending[whole.batch :], latency, 32):
        assert rest_schedulable(latency(split.subnet, split.batch), pending[split.batch :], latency, 32)
