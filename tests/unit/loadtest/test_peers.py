"""Peer policies (litserve:<id>, ray:<id>[@batch x timeout]), policy variants and core pinning, from plain strings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from slimserve.loadtest.cli import _cpus
from slimserve.loadtest.compare import PolicyError, check_policies, file_stem
from slimserve.loadtest.peers import TUNED, PeerPolicy, request_timeout_s
from slimserve.loadtest.publish import statics
from slimserve.loadtest.runner import ServerProcess, variant
from tests.helpers import table_dict

pytestmark = pytest.mark.unit


def test_peer_policies_parse_with_tuned_or_explicit_batching() -> None:
    assert PeerPolicy.parse("adaptive") is None and PeerPolicy.parse("static:s0") is None
    assert PeerPolicy.parse("litserve:s0") == PeerPolicy("litserve", "s0", *TUNED["litserve"])
    assert PeerPolicy.parse("ray:s6@16x2.5") == PeerPolicy("ray", "s6", 16, 2.5)
    for bad in ("ray:", "ray:s0@8", "litserve:s0@0x1", "ray:s0@x2", "litserve:s0@8x-1"):
        with pytest.raises(ValueError, match=r"e\.g\. (ray|litserve):s0@8x2"):
            PeerPolicy.parse(bad)


def test_litserve_gets_json_bodies_and_the_loosest_budget_as_its_timeout() -> None:
    lit, ray = PeerPolicy("litserve", "s0", 8, 2.0), PeerPolicy("ray", "s0", 8, 2.0)
    assert (lit.body, ray.body) == ("json", "raw")
    command = lit.command("models/demo", 8123, request_timeout_s((5.0, 12.0, 94.0)))
    assert command[command.index("peer") + 1] == "litserve"
    assert command[command.index("--request-timeout-s") + 1] == "0.094"
    assert command[command.index("--batch-timeout-ms") + 1] == "2"
    server = ServerProcess(Path("models/demo"), "ray:s6@4x1", port=8124)
    argv, ready = server.command()
    assert ready == "/health" and argv[argv.index("--max-batch") + 1] == "4" and server.body == "raw"
    argv, ready = ServerProcess(Path("models/demo"), "static:s0", port=8125).command()
    assert ready == "/readyz" and argv[argv.index("--policy") + 1] == "static:s0"


def test_policy_lists_are_checked_before_any_server_starts(tmp_path: Path) -> None:
    (tmp_path / "subnets.json").write_text(json.dumps(table_dict(rows=2)))  # rows s0 and s1
    check_policies(("adaptive", "litserve:s1", "ray:s0@4x1"), tmp_path)
    with pytest.raises(PolicyError, match=r"no subnet .s9.*ids: s0, s1"):
        check_policies(("adaptive", "ray:s9"), tmp_path)
    with pytest.raises(PolicyError, match=r"e\.g\. ray:s0@8x2"):
        check_policies(("adaptive", "ray:s0@8"), tmp_path)
    with pytest.raises(PolicyError, match="at least one slimserve policy"):
        check_policies(("litserve:s0",), tmp_path)


def test_core_sets_parse_or_are_refused_by_name() -> None:
    assert _cpus("0") == (0,) and _cpus("1,0") == (0, 1) and _cpus("0-3") == (0, 1, 2, 3)
    for bad in ("", "a", "-1", "1-x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected cores like 0"):
            _cpus(bad)


def test_records_written_by_the_asyncio_generator_read_back_unchanged(tmp_path: Path) -> None:
    from slimserve.loadtest.report import Record, read_records, summarize, write_records

    records = [
        Record(0.01, 0.0102, 3.5, 200, 5.0, 7, 7, "s0", 0.0625, 0.915, 0.4, 1),
        Record(0.02, 0.0201, float("inf"), 0, 12.0, 3, None, None, None, None, None, None),  # no HTTP answer
        Record(0.03, 0.0305, 1.2, 503, 50.0, 1, None, None, None, None, None, None),
    ]
    write_records(tmp_path / "run.csv", records)
    assert read_records(tmp_path / "run.csv") == records
    unparsed = Record(
        0.04, 0.04, 2.0, 200, 5.0, 1, None, None, None, None, None, None
    )  # a 200 whose body did not parse
    assert summarize([unparsed], 1.0)["mean_width"] is None


def test_a_policy_variant_serves_the_policy_with_extra_serve_flags(tmp_path: Path) -> None:
    assert variant("adaptive") == ("adaptive", [])
    assert variant("adaptive+no-pause-batches+safety-margin-ms=5") == (
        "adaptive",
        ["--no-pause-batches", "--safety-margin-ms", "5"],
    )
    argv, _ = ServerProcess(Path("models/demo"), "static:s2+no-pause-batches", port=8126).command()
    assert argv[argv.index("--policy") + 1] == "static:s2" and argv[-1] == "--no-pause-batches"
    assert file_stem("adaptive+safety-margin-ms=5") == "adaptive_safety-margin-ms-5"
    (tmp_path / "subnets.json").write_text(json.dumps(table_dict(rows=2)))
    with pytest.raises(PolicyError, match=r"'--pause' is not a serve flag"):
        check_policies(("adaptive", "adaptive+--pause"), tmp_path)
    assert statics(["static:s0", "static:s0+no-pause-batches", "adaptive"]) == ["static:s0"]
