import numpy as np
import pytest
import torch

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.families import create_supernet
from slimserve.models.schema import LatencyStat
from slimserve.searcher.latency import (
    LAYERS,
    LatencyPredictor,
    ProfileSettings,
    best_by_batch,
    flops_by_resolution,
    measure,
    relative_errors,
    subnet_flops_by_resolution,
)


def test_measure_reports_p50_and_p95_for_every_module_and_batch_size() -> None:
    net = create_supernet("cifar_resnet", depth=8, base_channels=16, in_channels=1, image_size=28)
    subnets = [net.space.smallest(), net.space.largest()]
    modules = [net.materialize(s, calibrate_bn(net, s, torch.randn(4, 1, 28, 28))) for s in subnets]
    results = measure(modules, net.input_shape, ProfileSettings(batch_sizes=(1, 4), repeats=6, warmup=1, burst=2))
    assert len(results) == 2
    for by_batch in results:
        assert set(by_batch) == {1, 4}
        for stat in by_batch.values():
            assert 0 < stat.p50_ms <= stat.p95_ms
            assert stat.threads in (1, 2)


def test_features_agree_between_supernet_and_materialized_subnet() -> None:
    net = create_supernet("cifar_resnet", depth=14, base_channels=16, in_channels=1, image_size=28)
    subnet = net.space.uniform(0.5)
    static = net.materialize(subnet, calibrate_bn(net, subnet, torch.randn(4, 1, 28, 28)))
    dynamic = subnet_flops_by_resolution(net, subnet, net.input_shape)
    materialized = flops_by_resolution(static, lambda: static(torch.zeros(1, 1, 28, 28)))
    assert dynamic == pytest.approx(materialized)
    assert set(dynamic) == {LAYERS, 28 * 28, 14 * 14, 7 * 7, 1}
    assert dynamic[LAYERS] == 1 + 2 * 6 + 2 + 1  # stem, two convs per block, two projections, fc


def test_dropping_a_block_removes_its_layers_and_flops_from_the_features() -> None:
    net = create_supernet("cifar_resnet", depth=14, base_channels=16, in_channels=1, image_size=28)
    full = subnet_flops_by_resolution(net, net.space.largest(), net.input_shape)
    shallow = net.space.with_depths(net.space.largest(), [1, 2, 2])  # drop stage 0's second block
    dropped = subnet_flops_by_resolution(net, shallow, net.input_shape)
    assert full[LAYERS] - dropped[LAYERS] == 2
    assert full[28 * 28] - dropped[28 * 28] == pytest.approx(2 * (2 * 16 * 16 * 9 * 28 * 28))
    assert full[7 * 7] == dropped[7 * 7]


def test_predictor_recovers_a_linear_cost_model() -> None:
    rng = np.random.default_rng(0)
    features = [
        {LAYERS: float(n), 100: float(a), 25: float(b)}
        for n, (a, b) in zip(rng.integers(5, 30, 12), rng.uniform(1e8, 1e9, (12, 2)), strict=True)
    ]
    truth = {1: (0.3, 0.02, 2.0, 5.0), 8: (1.0, 0.05, 12.0, 30.0)}

    def latency(f, batch):
        c = truth[batch]
        return c[0] + c[1] * f[LAYERS] + c[2] * f[100] / 1e9 + c[3] * f[25] / 1e9

    measured = [{b: LatencyStat(p50_ms=latency(f, b), p95_ms=latency(f, b) * 1.1) for b in truth} for f in features]
    predictor = LatencyPredictor.fit(features[:8], measured[:8])
    errors = relative_errors(predictor, features[8:], measured[8:])
    assert all(e.max() < 1e-9 for e in errors.values())
    assert predictor.coefficients[8] == pytest.approx(truth[8])
    with pytest.raises(ValueError, match="at least 4"):
        LatencyPredictor.fit(features[:2], measured[:2])


def test_the_thread_count_with_the_lower_tail_is_kept_per_batch_size_ties_going_to_fewer_threads() -> None:
    settings = ProfileSettings(threads=2, batch_sizes=(1, 8, 32))
    samples = {
        (1, 1): [0.25, 0.25, 0.3, 0.3],  # one thread: a steady 0.3 ms tail
        (1, 2): [0.2, 0.2, 0.2, 9.0],  # two: faster median, but a sleeping thread wakes late
        (8, 1): [2.0, 2.0, 2.0, 2.0],  # a tie: fewer threads
        (8, 2): [2.0, 2.0, 2.0, 2.0],
        (32, 1): [8.0, 9.0, 8.5, 9.0],
        (32, 2): [5.0, 5.5, 6.0, 6.0],  # two threads win at batch 32
    }
    result = best_by_batch(samples, settings)
    assert {b: (s.threads, s.p50_ms) for b, s in result.items()} == {1: (1, 0.275), 8: (1, 2.0), 32: (2, 5.75)}
    assert result[32].p95_ms == pytest.approx(float(np.percentile([5.0, 5.5, 6.0, 6.0], 95)))


def test_thread_choices() -> None:
    assert ProfileSettings(threads=2).thread_choices == (1, 2)
    assert ProfileSettings(threads=1).thread_choices == (1,)
    assert ProfileSettings(threads=4, pick_threads=False).thread_choices == (4,)
    assert ProfileSettings(device="cuda", threads=4).thread_choices == (4,)
