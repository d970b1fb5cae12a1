"""The policy's decision-time benchmark (slimserve bench decide) on the demo table."""

from slimserve.server.benchmarks import decision_time
from slimserve.server.settings import DEMO_BUNDLE


def test_the_decision_benchmark_times_both_ways_and_a_lone_request_is_never_split() -> None:
    result = decision_time(DEMO_BUNDLE, column="cuda0", lengths=(1, 8))
    lone, eight = result["per_queue_length"]["1"], result["per_queue_length"]["8"]
    assert lone["decisions_changed_share"] == 0.0  # one request: nothing to split
    assert 0.0 < eight["decisions_changed_share"] < 1.0  # some split, not all
    assert all(entry["split_us"] > 0 and entry["no_split_us"] > 0 for entry in (lone, eight))
