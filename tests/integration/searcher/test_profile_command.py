"""`slimserve profile --bundle B --write`: a device column is added, or replaced on a re-run."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.cli import main
from slimserve.models.bundle import load_bundle
from slimserve.models.schema import LatencyStat
from slimserve.searcher import profile
from tests.helpers import make_tiny_bundle


def _fake_measure(step: float):
    def measure(modules, input_shape, settings, progress=False, description=""):
        # Deterministic and strictly increasing with the row, as the table's ranking requires.
        return [
            {b: LatencyStat(p50_ms=step * (i + 1) * b, p95_ms=step * (i + 1) * b * 1.1) for b in settings.batch_sizes}
            for i in range(len(modules))
        ]

    return measure


def test_profile_write_adds_then_replaces_this_devices_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tiny_bundle(tmp_path)
    before = load_bundle(tmp_path).table
    arguments = ["profile", "--bundle", str(tmp_path), "--write", "--batch-sizes", "1,2", "--threads", "1"]
    monkeypatch.setattr(profile, "measure", _fake_measure(1.0))
    assert main(arguments) == 0
    added = load_bundle(tmp_path).table  # hashes re-signed, ranking still valid
    name = "cpu-1t"
    assert name not in before.devices and set(added.devices) == {*before.devices, name}
    assert added.subnets[1].latency[name][2].p50_ms == pytest.approx(4.0)
    monkeypatch.setattr(profile, "measure", _fake_measure(2.0))
    assert main(arguments) == 0  # the same device again: its column is replaced, not duplicated
    replaced = load_bundle(tmp_path).table
    assert set(replaced.devices) == set(added.devices)
    assert replaced.subnets[1].latency[name][2].p50_ms == pytest.approx(8.0)


def test_profile_write_names_a_column_beside_the_devices_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tiny_bundle(tmp_path)
    before = load_bundle(tmp_path).table
    monkeypatch.setattr(profile, "measure", _fake_measure(3.0))
    arguments = ["profile", "--bundle", str(tmp_path), "--write", "--batch-sizes", "1,2", "--threads", "1"]
    assert main([*arguments, "--column", "cpu-1t-spin"]) == 0
    table = load_bundle(tmp_path).table
    assert set(table.devices) == {*before.devices, "cpu-1t-spin"} and table.primary_device == before.primary_device
    assert table.subnets[1].latency["cpu-1t-spin"][2].p50_ms == pytest.approx(12.0)
    with pytest.raises(SystemExit):  # argparse names the rule
        main([*arguments, "--column", "cpu 1t"])


def test_a_multi_stage_bundle_is_refused_with_the_command_that_profiles_it(tmp_path: Path) -> None:
    from tests.helpers import make_tiny_multistage_bundle

    make_tiny_multistage_bundle(tmp_path)
    with pytest.raises(SystemExit, match=r"slimserve profile: .*re-run `slimserve s2dnas --bundle`"):
        main(["profile", "--bundle", str(tmp_path), "--batch-sizes", "1,2", "--threads", "1"])
