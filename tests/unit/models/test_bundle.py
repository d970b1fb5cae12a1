import json
from pathlib import Path

import pytest
import torch

from slimserve.models.bundle import load_bundle
from slimserve.models.ops import FrozenStatsNorm
from slimserve.models.resolution import resize
from slimserve.models.schema import (
    MANIFEST_FILE,
    TABLE_FILE,
    WEIGHTS_FILE,
    BundleError,
    SubnetRow,
    SubnetTable,
    read_table,
    rewrite_table,
)
from tests.helpers import make_tiny_bundle, table_dict


def test_a_valid_table_validates() -> None:
    table = SubnetTable.model_validate(table_dict())
    assert [r.id for r in table.subnets] == ["s0", "s1", "s2"]
    assert table.row("s1").latency["cpu-2t"][8].p50_ms == 4.0
    with pytest.raises(KeyError, match="s9"):
        table.row("s9")


def mutate(change) -> dict:
    payload = table_dict()
    change(payload)
    return payload


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.update(schema_version=5), "schema_version"),
        (lambda t: t["subnets"][0].update(resolution=14), "resolution is part of schema 4, not 3"),
        (lambda t: t.update(schema_version=4) or t["subnets"][0].update(resolution=2), "resolution"),
        (lambda t: t["subnets"][0].pop("depths"), "depths are required from schema 2 on"),
        (lambda t: t.update(schema_version=2), "latency threads are part of schema 3, not 2"),
        (lambda t: t["subnets"][0]["latency"]["cpu-2t"]["1"].update(threads=0), "threads"),
        (lambda t: t.update(schema_version=1), "depths are not part of schema 1"),
        (lambda t: t["subnets"][1]["latency"]["cpu-2t"].update({"1": {"p50_ms": 0.5, "p95_ms": 1.0}}), "not slower"),
        (lambda t: t["subnets"][2].update(search_accuracy=0.5), "not more accurate"),
        (lambda t: t["subnets"][1].update(id="s0"), "duplicate subnet ids"),
        (lambda t: t["subnets"][0]["latency"]["cpu-2t"].pop("1"), "batch size 1"),
        (lambda t: t["subnets"][0].update(channels=[8, 8]), "2 channel counts"),
        (lambda t: t["subnets"][0].update(accuracy=1.5), "accuracy"),
        (lambda t: t["subnets"][0].update(surprise=True), "surprise"),
        (lambda t: t.update(primary_device="gpu"), "primary_device"),
        (lambda t: t.update(subnets=[]), "subnets"),
    ],
)
def test_bad_tables_name_the_field(tmp_path: Path, change, message: str) -> None:
    path = tmp_path / TABLE_FILE
    path.write_text(json.dumps(mutate(change)))
    with pytest.raises(BundleError, match=message) as error:
        read_table(path)
    assert str(path) in str(error.value)


def test_bundle_round_trip_serves_the_stored_statistics(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    bundle = load_bundle(tmp_path)
    assert [r.id for r in bundle.table.subnets] == ["s0", "s1", "s2"]
    assert not bundle.supernet.training
    row = bundle.table.subnets[1]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        dynamic = bundle.supernet(x, row.channels, FrozenStatsNorm(bundle.bn_stats[row.id]))
        static = bundle.supernet.materialize(row.channels, bundle.bn_stats[row.id])(x)
    assert torch.allclose(dynamic, static, atol=1e-4)


def test_a_row_with_a_resolution_is_served_on_the_shrunk_image(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path, resolutions=(14, None, 28))
    bundle = load_bundle(tmp_path)
    low, native = bundle.table.subnets[0], bundle.table.subnets[1]
    assert low.resolution == 14 and native.resolution is None and bundle.table.schema_version == 4
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        dynamic = bundle.supernet(resize(x, 14), low.channels, FrozenStatsNorm(bundle.bn_stats[low.id]))
        assert torch.allclose(bundle.materialize(low)(x), dynamic, atol=1e-4)
        assert torch.allclose(
            bundle.materialize(native)(x), bundle.supernet.materialize(native.channels, bundle.bn_stats[native.id])(x)
        )


def test_a_resolution_above_the_input_width_is_refused(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path, resolutions=(14, None, 28))
    table = read_table(tmp_path / TABLE_FILE)
    rows = (table.subnets[0].model_copy(update={"resolution": 32}), *table.subnets[1:])
    rewrite_table(tmp_path, table.model_copy(update={"subnets": rows}))
    with pytest.raises(BundleError, match=r"subnets\[0\]\.resolution: 32 exceeds the input width 28"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, TABLE_FILE])
def test_a_file_changed_after_signing_stops_loading(tmp_path: Path, name: str) -> None:
    make_tiny_bundle(tmp_path)
    with (tmp_path / name).open("ab") as handle:
        handle.write(b" ")
    with pytest.raises(BundleError, match=f"{name}: SHA-256"):
        load_bundle(tmp_path)


def test_malformed_manifest_and_missing_files_are_named(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["input"]["mean"] = [0.1, 0.2]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest\.json: invalid Manifest: input"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")


def test_rewriting_the_table_re_signs_the_manifest(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    bundle = load_bundle(tmp_path)
    renamed = bundle.table.model_copy(update={"primary_device": "cpu-2t"})
    rewrite_table(tmp_path, renamed)
    assert load_bundle(tmp_path).table == renamed


def test_rewriting_refuses_a_table_that_breaks_the_ranking_and_keeps_the_old_one(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    before = (tmp_path / "subnets.json").read_bytes()
    table = load_bundle(tmp_path).table
    device = table.primary_device
    # A new measurement in which the second subnet is no slower than the first at batch 1.
    first, second = table.subnets[0], table.subnets[1]
    tied = second.model_copy(update={"latency": {**second.latency, device: first.latency[device]}})
    broken = table.model_copy(update={"subnets": (first, tied, *table.subnets[2:])})
    with pytest.raises(BundleError, match=r"refusing to write an invalid table.*not slower"):
        rewrite_table(tmp_path, broken)
    assert (tmp_path / "subnets.json").read_bytes() == before
    load_bundle(tmp_path)  # still verifies


def test_depths_that_disagree_with_the_channels_stop_loading(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    table = load_bundle(tmp_path).table
    wrong = table.subnets[0].model_copy(update={"depths": (2, 1, 1)})
    rewrite_table(tmp_path, table.model_copy(update={"subnets": (wrong, *table.subnets[1:])}))
    with pytest.raises(BundleError, match=r"subnets\[0\]\.depths: \[2, 1, 1\] but its channels run \[1, 1, 1\]"):
        load_bundle(tmp_path)


def _without_threads(row: SubnetRow) -> SubnetRow:
    latency = {
        device: {b: s.model_copy(update={"threads": None}) for b, s in by_batch.items()}
        for device, by_batch in row.latency.items()
    }
    return row.model_copy(update={"latency": latency})


def test_a_schema_1_table_still_loads_and_runs_every_block(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    table = load_bundle(tmp_path).table
    rows = tuple(_without_threads(r).model_copy(update={"depths": None}) for r in table.subnets)
    rewrite_table(tmp_path, table.model_copy(update={"schema_version": 1, "subnets": rows}))
    bundle = load_bundle(tmp_path)
    assert bundle.table.schema_version == 1
    assert all(bundle.supernet.space.depths(r.channels) == (1, 1, 1) for r in bundle.table.subnets)


def test_a_schema_2_table_still_loads_without_threads(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path)
    table = load_bundle(tmp_path).table
    rows = tuple(_without_threads(r) for r in table.subnets)
    rewrite_table(tmp_path, table.model_copy(update={"schema_version": 2, "subnets": rows}))
    bundle = load_bundle(tmp_path)
    assert bundle.table.schema_version == 2
    assert bundle.table.subnets[0].latency["cpu-2t"][1].threads is None
