"""LC-Net's pure decisions on plain numbers: choosing the operating point, comparing at equal latency."""

import math

import pytest

from slimserve.searcher.lcnet_report import difference_noise, front_accuracy_at
from slimserve.searcher.lcnet_run import choose


def point(penalty: float, threshold: float, search_accuracy: float, flops: float) -> dict:
    return {"penalty": penalty, "threshold": threshold, "search": {"accuracy": search_accuracy, "flops": flops}}


def test_the_chosen_point_saves_most_flops_within_the_allowed_drop() -> None:
    points = [point(0.1, 0.0, 0.930, 500), point(0.25, 0.0, 0.926, 400), point(0.25, 0.2, 0.921, 300)]
    assert choose(points, 0.925) is points[1]  # 0.921 is below the line, however cheap
    assert choose(points, 0.920) is points[2]
    assert choose(points, 0.95) is points[0]  # none good enough: the most accurate


def test_the_front_is_interpolated_in_log_latency_and_never_extrapolated() -> None:
    front = [(4.0, 0.90), (1.0, 0.80)]  # unordered on purpose
    assert front_accuracy_at(front, 2.0) == pytest.approx(0.85)  # halfway in log(ms)
    assert front_accuracy_at(front, 1.0) == pytest.approx(0.80)
    assert front_accuracy_at(front, 0.5) is None
    assert front_accuracy_at(front, 5.0) is None


def test_the_noise_of_a_difference_is_one_standard_error_of_two_accuracies() -> None:
    assert difference_noise(0.9, 10_000) == pytest.approx(math.sqrt(2 * 0.09 / 10_000))
