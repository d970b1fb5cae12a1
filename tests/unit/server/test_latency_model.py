import pytest

from slimserve.server.latency_model import ArrivalRate, LatencyModel, LatencyModelConfig, interpolate_batches

PROFILE = [{1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5}, {1: 3.0, 2: 5.0, 4: 9.0, 8: 17.0}]


def test_interpolation_between_and_beyond_profiled_batch_sizes() -> None:
    values = interpolate_batches({1: 1.0, 2: 1.5, 4: 2.5, 8: 4.5}, 12)
    assert values[:4] == [1.0, 1.5, 2.0, 2.5]
    assert values[7] == 4.5 and values[11] == pytest.approx(6.5)  # slope of the 4..8 segment
    assert interpolate_batches({1: 2.0}, 3) == [2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="batch size 1"):
        interpolate_batches({2: 1.0}, 4)


def test_fresh_model_predicts_the_profile_plus_its_tail_margin() -> None:
    model = LatencyModel(PROFILE, 8, initial_deviation=0.1, config=LatencyModelConfig(tail_k=2.0))
    assert model.expected(1, 4) == pytest.approx(0.009)
    assert model.predict(1, 4) == pytest.approx(0.009 * 1.2)


def test_a_uniformly_slower_machine_moves_every_subnet_including_unused_ones() -> None:
    model = LatencyModel(PROFILE, 8, initial_deviation=0.0)
    for _ in range(200):
        model.observe(0, 1, 0.002)  # subnet 0 runs 2x slower than profiled
    assert model.expected(0, 1) == pytest.approx(0.002, rel=0.02)
    assert model.expected(1, 1) == pytest.approx(0.006, rel=0.25)  # never observed, mostly corrected
    assert model.deviation < 0.05  # consistent surprises stop counting as noise


def test_load_at_observation_time_is_factored_out() -> None:
    model = LatencyModel(PROFILE, 8, initial_deviation=0.0)
    for _ in range(200):
        model.observe(0, 1, 0.002, load_factor=2.0)  # 2x slower *because* of a 2x load
    assert model.expected(0, 1) == pytest.approx(0.001, rel=0.02)  # the machine itself is as profiled
    assert model.expected(0, 1, load_factor=2.0) == pytest.approx(0.002, rel=0.02)


def test_noisy_measurements_widen_the_tail_margin_and_absurd_ones_are_bounded() -> None:
    model = LatencyModel(PROFILE, 8, initial_deviation=0.0)
    for index in range(400):
        model.observe(1, 2, 0.005 * (1.3 if index % 2 else 0.7))
    assert 0.2 < model.deviation < 0.4
    assert model.predict(1, 2) > model.expected(1, 2) * 1.4
    for _ in range(1000):
        model.observe(0, 1, 100.0)
    assert model.drift <= LatencyModelConfig().bounds[1]
    model.observe(0, 1, float("nan"))
    model.observe(0, 1, -1.0)
    assert model.observations == 1400


def test_arrival_rate_tracks_a_steady_stream_and_decays_when_it_stops() -> None:
    rate = ArrivalRate(tau=1.0)
    for index in range(1, 2001):
        rate.record(index * 0.005)  # 200 per second for 10 s
    assert rate.rate(10.0) == pytest.approx(200, rel=0.05)
    assert rate.rate(13.0) < 200 * 0.06


def test_overrun_probability_is_the_share_of_recent_batches_late_by_more_than_the_time_to_spare() -> None:
    model = LatencyModel(PROFILE, 8, initial_deviation=0.1, config=LatencyModelConfig(excess_prior=4))
    expected = model.expected(1, 4)  # 9 ms
    # Before any batch ran, the tail margin decides: 0 within predict (10.8 ms), 1 beyond it.
    assert model.overrun_probability(1, 4, 0.0110) == 0.0 and model.overrun_probability(1, 4, 0.0105) == 1.0
    for late_by in (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.001, 0.002, 0.005):
        model.observe(1, 4, model.expected(1, 4) + late_by)
    expected = model.expected(1, 4)
    assert model.overrun_probability(1, 4, expected + 0.0015) == pytest.approx(0.2, abs=0.01)  # 2 ms, 5 ms
    assert model.overrun_probability(1, 4, expected + 0.003) == pytest.approx(0.1, abs=0.01)
    assert model.overrun_probability(1, 4, expected + 0.010) == 0.0
    assert model.overrun_probability(1, 4, 0.0) == 1.0


# Three rows of neighbouring cost (1.0, 1.4, 2.0 ms at batch 1) and one far away (40 ms).
NEIGHBOURS = [{1: 1.0, 2: 1.5}, {1: 1.4, 2: 2.1}, {1: 2.0, 2: 3.0}, {1: 40.0, 2: 60.0}]


def _teach(model: LatencyModel, truth: dict[int, float], rounds: int) -> None:
    """Run each row of ``truth`` in turn at batch 1, taking ``truth[row]`` times its profiled time."""
    for _ in range(rounds):
        for row, factor in truth.items():
            model.observe(row, 1, model.base[row][0] * factor)


def test_a_row_no_longer_run_drifts_toward_its_neighbours_instead_of_keeping_a_stale_correction() -> None:
    model = LatencyModel(NEIGHBOURS, 2, initial_deviation=0.0)
    _teach(model, {0: 1.5, 1: 3.0, 2: 1.5, 3: 1.5}, 300)  # row 1 once ran twice as slow as the rest
    assert model.corrections()[1] == pytest.approx(2 * model.corrections()[0], rel=0.1)
    _teach(model, {0: 1.5, 2: 1.5, 3: 1.5}, 400)  # it stops being picked; the machine is as before
    corrections = model.corrections()
    assert corrections[0] == pytest.approx(1.5, rel=0.05) and corrections[2] == pytest.approx(1.5, rel=0.05)
    assert corrections[1] == pytest.approx(1.5, rel=0.1)  # was 3.0; without the pull it stays there

    frozen = LatencyModel(NEIGHBOURS, 2, initial_deviation=0.0, config=LatencyModelConfig(affinity_width=1e-9))
    _teach(frozen, {0: 1.5, 1: 3.0, 2: 1.5, 3: 1.5}, 300)
    _teach(frozen, {0: 1.5, 2: 1.5, 3: 1.5}, 400)
    assert frozen.corrections()[1] > 2.5  # the stale value the pull exists to forget


def test_rows_run_regularly_keep_their_own_corrections_and_distant_rows_hardly_pull() -> None:
    model = LatencyModel(NEIGHBOURS, 2, initial_deviation=0.0)
    _teach(model, {0: 1.0, 1: 2.0, 2: 1.0}, 600)  # each row runs every third batch: none is stale
    corrections = model.corrections()
    assert corrections[0] == pytest.approx(1.0, rel=0.05) and corrections[2] == pytest.approx(1.0, rel=0.05)
    assert corrections[1] == pytest.approx(2.0, rel=0.05)
    # Row 3 never ran; its cost is 20-40x theirs, so their residuals barely reach it (affinity < 0.001).
    assert model.residual[3] == pytest.approx(1.0, abs=0.01)
