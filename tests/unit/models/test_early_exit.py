"""The exit rule and its calibration, on plain numbers."""

import numpy as np
import pytest

from slimserve.models.early_exit import NEVER, calibrate_thresholds, evaluate_exits, exit_stage

# Three stages, five inputs. Stage 1 is confident on inputs 0-2 (right on 0 and 1), stage 2 on 3.
CONFIDENCE = np.array(
    [
        [0.99, 0.95, 0.90, 0.40, 0.30],
        [0.99, 0.97, 0.95, 0.92, 0.50],
        [0.99, 0.99, 0.99, 0.99, 0.99],
    ]
)
CORRECT = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ],
    dtype=bool,
)
COSTS = [1.0, 3.0, 6.0]


def test_an_input_leaves_at_the_first_stage_confident_enough() -> None:
    assert exit_stage(CONFIDENCE, [0.93, 0.9]).tolist() == [0, 0, 1, 1, 2]
    assert exit_stage(CONFIDENCE, [NEVER, NEVER]).tolist() == [2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="need 2 thresholds"):
        exit_stage(CONFIDENCE, [0.5])


def test_outcome_counts_accuracy_cost_and_shares() -> None:
    outcome = evaluate_exits(CONFIDENCE, CORRECT, COSTS, [0.93, 0.9])
    assert outcome.accuracy == 1.0
    assert outcome.mean_cost == pytest.approx((1 + 1 + 3 + 3 + 6) / 5)
    assert outcome.exit_share == (0.4, 0.4, 0.2)
    eager = evaluate_exits(CONFIDENCE, CORRECT, COSTS, [0.89, 0.9])  # input 2 now leaves at stage 1, wrong
    assert eager.accuracy == pytest.approx(4 / 5)
    assert eager.exit_share == (0.6, 0.2, 0.2)


def test_calibration_finds_the_cheapest_thresholds_that_keep_the_target() -> None:
    full = calibrate_thresholds(CONFIDENCE, CORRECT, COSTS, target_accuracy=1.0)
    assert full.accuracy == 1.0
    # Inputs 0 and 1 may leave at stage 1, 2 and 3 at stage 2; input 4 must run to the end.
    assert full.mean_cost == pytest.approx((1 + 1 + 3 + 3 + 6) / 5)
    cheaper = calibrate_thresholds(CONFIDENCE, CORRECT, COSTS, target_accuracy=0.6)
    assert cheaper.accuracy >= 0.6 and cheaper.mean_cost < full.mean_cost


def test_an_unreachable_target_runs_everything_to_the_end() -> None:
    wrong_at_end = CORRECT.copy()
    wrong_at_end[2, 4] = False
    outcome = calibrate_thresholds(CONFIDENCE, wrong_at_end, COSTS, target_accuracy=1.0)
    assert outcome.thresholds == (NEVER, NEVER) and outcome.mean_cost == 6.0


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="cumulative costs"):
        calibrate_thresholds(CONFIDENCE, CORRECT, [1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="both be"):
        calibrate_thresholds(CONFIDENCE, CORRECT[:2], COSTS, 0.5)
