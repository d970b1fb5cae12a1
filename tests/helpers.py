"""Test helpers: a tiny but real bundle, built in seconds with the project's own writer."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import torch

from slimserve.models.bn_calibration import calibrate_bn, calibrate_module_bn
from slimserve.models.bundle import stage_widths, write_bundle
from slimserve.models.datasets import FASHION_MNIST_CLASSES
from slimserve.models.families import create_supernet
from slimserve.models.flops import count_flops, count_params
from slimserve.models.gating import GatedResNet
from slimserve.models.multistage import MultiStageResNet, fraction_plan
from slimserve.models.multistage_train import calibrate_stage_bn
from slimserve.models.resolution import materialize
from slimserve.models.schema import (
    GATED_BN_KEY,
    MULTISTAGE_BN_KEY,
    TABLE_SCHEMA_VERSION,
    DeviceProfile,
    GatingSpec,
    LatencyStat,
    MultiStageSpec,
    SubnetRow,
    SubnetTable,
    bn_key_for,
)

TINY_ARGS = {"depth": 8, "base_channels": 16, "in_channels": 1, "image_size": 28, "num_classes": 10}


def table_dict(rows: int = 3) -> dict[str, Any]:
    """A valid subnets.json payload with ``rows`` rows, for schema tests to mutate."""
    units = ["stage0", "stage0.block0.mid", "stage1", "stage1.block0.mid", "stage2", "stage2.block0.mid"]
    return {
        "schema_version": 3,
        "unit_names": units,
        "group_size": 8,
        "primary_device": "cpu-2t",
        "devices": {"cpu-2t": {"device": "cpu", "threads": 2, "processor": "test", "torch": "x"}},
        "subnets": [
            {
                "id": f"s{i}",
                "channels": [8 * (i + 1)] * 2 + [16 * (i + 1)] * 2 + [32 * (i + 1)] * 2,
                "depths": [1, 1, 1],
                "origin": "searched",
                "flops": 1000 * (i + 1),
                "params": 100 * (i + 1),
                "accuracy": 0.8 + 0.02 * i,
                "accuracy_split": "fashion-mnist/test",
                "search_accuracy": 0.8 + 0.02 * i,
                "latency": {
                    "cpu-2t": {
                        "1": {"p50_ms": 1.0 + i, "p95_ms": 1.5 + i, "threads": 1},
                        "8": {"p50_ms": 3.0 + i, "p95_ms": 4.0 + i, "threads": 2},
                    }
                },
                "bn_key": f"bn.s{i}",
            }
            for i in range(rows)
        ],
    }


def made_up_table(unit_names: tuple[str, ...], rows: list[SubnetRow]) -> SubnetTable:
    """A table profiled on a made-up 2-thread CPU (the column every helper row fills)."""
    return SubnetTable(
        schema_version=TABLE_SCHEMA_VERSION,
        unit_names=unit_names,
        group_size=8,
        primary_device="cpu-2t",
        devices={"cpu-2t": DeviceProfile(device="cpu", threads=2, processor="test", torch=torch.__version__)},
        subnets=tuple(rows),
    )


def made_up_manifest(name: str, family_args: dict[str, Any], seed: int) -> dict[str, Any]:
    """Manifest fields of a tiny 28x28 grayscale Fashion-MNIST-shaped test bundle."""
    return {
        "name": name,
        "family": "cifar_resnet",
        "family_args": family_args,
        "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353]},
        "class_names": list(FASHION_MNIST_CLASSES),
        "dataset": {"name": "fashion-mnist", "version": "test", "splits": {"test": "none"}},
        "provenance": {"command": "tests/helpers.py", "seed": seed},
    }


def make_tiny_bundle(
    directory: Path,
    widths: tuple[float, ...] = (0.25, 0.5, 1.0),
    seed: int = 0,
    resolutions: tuple[int | None, ...] | None = None,
) -> Path:
    """An untrained tiny supernet with uniform-width rows and made-up latencies: valid, fast, not accurate.
    ``resolutions``: each row's input resolution (None: the input's own)."""
    torch.manual_seed(seed)
    net = create_supernet("cifar_resnet", **TINY_ARGS).eval()
    calibration = torch.randn(64, 1, 28, 28)
    rows, stats = [], {}
    for index, (width, resolution) in enumerate(zip(widths, resolutions or [None] * len(widths), strict=True)):
        subnet = net.space.uniform(width)
        subnet_id = f"s{index}"
        stats[subnet_id] = calibrate_bn(net, subnet, calibration, resolution=resolution)
        static = materialize(net, subnet, stats[subnet_id], resolution)
        rows.append(
            SubnetRow(
                id=subnet_id,
                channels=subnet,
                depths=net.space.depths(subnet),
                origin=f"uniform-{width:g}",
                flops=count_flops(static, net.input_shape),
                params=count_params(static),
                accuracy=0.5 + 0.1 * index,
                accuracy_split="fashion-mnist/test",
                search_accuracy=0.5 + 0.1 * index,
                latency={
                    "cpu-2t": {
                        b: LatencyStat(
                            p50_ms=(1 + index) * (1 + b / 4),
                            p95_ms=(1.3 + index) * (1 + b / 4),
                            threads=1 if b <= 4 else 2,  # as a PASSIVE-OpenMP CPU profile finds
                        )
                        for b in (1, 2, 4, 8, 16, 32)
                    }
                },
                bn_key=bn_key_for(subnet_id),
                resolution=resolution,
            )
        )
    table = made_up_table(net.space.unit_names, rows)
    write_bundle(
        directory,
        net,
        table,
        stats,
        made_up_manifest("tiny-test", TINY_ARGS, seed),
        weights_dtype="float32",
    )
    return directory


TINY_MULTISTAGE_ARGS = {"depth": 8, "base_channels": 24, "in_channels": 1, "image_size": 28, "num_classes": 10}


def make_tiny_multistage_bundle(
    directory: Path,
    thresholds: tuple[float | None, ...] = (0.5, None),
    stage_ms: tuple[float, ...] = (1.0, 2.0, 4.0),
    seed: int = 0,
) -> Path:
    """An untrained 3-stage (S2DNAS) bundle: rows e1-e3 exit by stage 1-3; made-up latencies (``stage_ms``
    per stage at batch 1, doubling per batch-size step)."""
    torch.manual_seed(seed)
    base = create_supernet("cifar_resnet", **TINY_MULTISTAGE_ARGS).eval()
    subnet = base.space.largest()
    plan = fraction_plan(base, subnet, [(0.3, 0.6)] * 3, [True, False, True])
    model = MultiStageResNet(base, subnet, plan)
    stats = calibrate_stage_bn(model, torch.randn(64, 1, 28, 28))
    batches = (1, 2, 4, 8, 16, 32)
    rows = []
    for k in range(3):
        total = sum(stage_ms[: k + 1])
        rows.append(
            SubnetRow(
                id=f"e{k + 1}",
                channels=stage_widths(plan, k),
                depths=base.space.depths(stage_widths(plan, k)),
                origin=f"s2dnas-exit-by-stage-{k + 1}",
                flops=1000 * (k + 1),
                params=100 * (k + 1),
                accuracy=0.6 + 0.1 * k,
                accuracy_split="fashion-mnist/test",
                search_accuracy=0.6 + 0.1 * k,
                latency={
                    "cpu-2t": {
                        b: LatencyStat(p50_ms=total * (1 + b / 4), p95_ms=1.3 * total * (1 + b / 4), threads=1)
                        for b in batches
                    }
                },
                bn_key=MULTISTAGE_BN_KEY,
            )
        )
    table = made_up_table(base.space.unit_names, rows)
    spec = MultiStageSpec(
        subnet=subnet,
        splits=plan.splits,
        concat=plan.concat,
        thresholds=thresholds,
        stage_latency={"cpu-2t": {b: tuple(ms * (1 + b / 4) for ms in stage_ms) for b in batches}},
    )
    write_bundle(
        directory,
        model,
        table,
        {row.id: stats for row in rows},
        {**made_up_manifest("tiny-multistage-test", TINY_MULTISTAGE_ARGS, seed), "multistage": spec.model_dump()},
        weights_dtype="float32",
    )
    return directory


def make_tiny_gated_bundle(directory: Path, thresholds: tuple[float, ...] = (0.6, 0.0), seed: int = 0) -> Path:
    """An untrained gated (LC-Net) bundle with random gates that do skip: one row per threshold
    (fastest first), made-up latencies."""
    torch.manual_seed(seed)
    base = create_supernet("cifar_resnet", **TINY_ARGS).eval()
    model = GatedResNet(base, base.space.largest())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in (*model.layer_gate_list, *model.channel_gate_list):
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * 2)
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=generator) * 0.5 + 0.5)
    stats = calibrate_module_bn(model, torch.randn(64, 1, 28, 28))
    rows = [
        SubnetRow(
            id=f"t{index}",
            channels=model.subnet,
            depths=base.space.depths(model.subnet),
            origin=f"lcnet-threshold-{threshold:g}",
            flops=1000 * (index + 1),
            params=1000,
            accuracy=0.6 + 0.1 * index,
            accuracy_split="fashion-mnist/test",
            search_accuracy=0.6 + 0.1 * index,
            latency={
                "cpu-2t": {
                    b: LatencyStat(p50_ms=(1 + index) * (1 + b / 4), p95_ms=2.0 * (1 + index) * (1 + b / 4))
                    for b in (1, 2, 4, 8, 16, 32)
                }
            },
            bn_key=GATED_BN_KEY,
            gate_threshold=threshold,
        )
        for index, threshold in enumerate(thresholds)
    ]
    write_bundle(
        directory,
        model,
        made_up_table(base.space.unit_names, rows),
        {row.id: stats for row in rows},
        {
            **made_up_manifest("tiny-gated-test", TINY_ARGS, seed),
            "gating": GatingSpec(subnet=model.subnet, penalty=0.1).model_dump(),
        },
        weights_dtype="float32",
    )
    return directory


def bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes declaring a ``width`` x ``height`` canvas (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
