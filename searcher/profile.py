"""``slimserve profile``: measure latency on *this* device.

Two uses:

* ``profile_bundle``: re-measure every subnet of a bundle here (say, on the GPU box it will serve
  from) and add that device's column to the table, so the server predicts from local figures.
* ``latency_study``: for a supernet family with no data at all (e.g. the ImageNet ResNet-18 at
  224x224), measure uniform widths and random subnets and report how well the latency predictor
  does. Accuracy needs data, so nothing is ranked.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimserve.models.bn_calibration import calibrate_bn
from slimserve.models.bundle import Bundle
from slimserve.models.registry import Supernet
from slimserve.models.schema import TABLE_SCHEMA_VERSION, BundleError, SubnetTable
from slimserve.models.subnet import subnet_to_str
from slimserve.searcher.latency import (
    LatencyPredictor,
    ProfileSettings,
    device_profile,
    measure,
    relative_errors,
    subnet_flops_by_resolution,
)


def profile_bundle(
    bundle: Bundle, settings: ProfileSettings, progress: bool = True, column: str | None = None
) -> SubnetTable:
    """The bundle's table with this device's measured latency column added (or replaced), named
    ``column`` or after the device (``cpu-2t``, ``cuda0``)."""
    if bundle.staged is not None:
        raise BundleError(
            f"{bundle.path}: a multi-stage bundle's rows are timed with their exits on real images; "
            "re-run `slimserve s2dnas --bundle` on the new device instead"
        )
    if bundle.gated is not None:
        raise BundleError(
            f"{bundle.path}: a gated bundle's rows are timed on real images (what runs depends on the input); "
            "re-run `slimserve lcnet --bundle` on the new device instead (trained gates are reused from --out)"
        )
    supernet = bundle.supernet.to(settings.device)
    modules = [bundle.materialize(row).to(settings.device) for row in bundle.table.subnets]
    measured = measure(modules, supernet.input_shape, settings, progress)
    name, profile = device_profile(settings)
    name = column or name
    # The new column may name threads (schema 3); older rows gain the depths schema 3 requires.
    rows = tuple(
        row.model_copy(
            update={
                "latency": {**row.latency, name: latency},
                "depths": row.depths or supernet.space.depths(row.channels),
            }
        )
        for row, latency in zip(bundle.table.subnets, measured, strict=True)
    )
    return bundle.table.model_copy(
        update={
            "schema_version": TABLE_SCHEMA_VERSION,
            "subnets": rows,
            "devices": {**bundle.table.devices, name: profile},
        }
    )


def latency_study(
    supernet: Supernet, settings: ProfileSettings, random_subnets: int = 24, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Uniform widths and random subnets measured; predictor fitted on 2/3 of the random ones, tested on the rest."""
    supernet.to(settings.device).eval()
    space = supernet.space
    rng = random.Random(seed)
    widths = (0.25, 0.5, 0.75, 1.0)
    randoms = [space.random(rng) for _ in range(random_subnets)]
    subnets = [space.uniform(w) for w in widths] + randoms
    probe = torch.randn(4, *supernet.input_shape, device=settings.device)
    modules = [supernet.materialize(s, calibrate_bn(supernet, s, probe)) for s in subnets]
    measured = measure(modules, supernet.input_shape, settings, progress)
    features = [subnet_flops_by_resolution(supernet, s, supernet.input_shape) for s in subnets]
    fit = len(widths) + (2 * random_subnets) // 3
    predictor = LatencyPredictor.fit(features[:fit], measured[:fit])
    errors = relative_errors(predictor, features[fit:], measured[fit:])
    name, profile = device_profile(settings)
    return {
        "device_profile": {name: profile.model_dump()},
        "input_shape": list(supernet.input_shape),
        "uniform": [
            {
                "width": w,
                "channels": subnet_to_str(s),
                "gflops": round(sum(f.values()) / 1e9, 4),
                "latency_ms": {str(b): {"p50": round(v.p50_ms, 3), "p95": round(v.p95_ms, 3)} for b, v in m.items()},
            }
            for w, s, m, f in zip(widths, subnets, measured, features, strict=False)
        ],
        "predictor": {
            "fitted_on": fit,
            "held_out": len(subnets) - fit,
            "relative_error": {
                str(b): {"p50": round(float(np.percentile(e, 50)), 4), "p90": round(float(np.percentile(e, 90)), 4)}
                for b, e in errors.items()
            },
        },
    }


def latency_markdown(study: dict[str, Any], family: str, command: str) -> str:
    profile = next(iter(study["device_profile"].values()))
    batches = list(study["uniform"][0]["latency_ms"])
    lines = [
        f"# Latency study: {family}, input {'x'.join(map(str, study['input_shape']))}",
        "",
        f"Made by `{command}` on {profile['processor']} ({profile['device']}, {profile['threads']} threads, torch {profile['torch']}).",
        "No dataset: random weights, so no accuracy and no ranking; latency does not depend on weight values.",
        "",
        "| width | GFLOPs | " + " | ".join(f"p50 b{b} (ms)" for b in batches) + " |",
        "|---:|---:|" + "---:|" * len(batches),
    ]
    for row in study["uniform"]:
        lines.append(
            f"| {row['width']} | {row['gflops']:.3f} | "
            + " | ".join(f"{row['latency_ms'][b]['p50']:.2f}" for b in batches)
            + " |"
        )
    predictor = study["predictor"]
    lines += [
        "",
        f"Latency predictor: fitted on {predictor['fitted_on']} subnets, tested on {predictor['held_out']} held-out random subnets.",
        "",
        "| batch | p50 relative error | p90 relative error |",
        "|---:|---:|---:|",
    ]
    for batch, errors in predictor["relative_error"].items():
        lines.append(f"| {batch} | {100 * errors['p50']:.1f}% | {100 * errors['p90']:.1f}% |")
    return "\n".join(lines) + "\n"


def write_latency_study(study: dict[str, Any], report_dir: Path, family: str, command: str) -> Path:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"latency-{family}.json").write_text(json.dumps(study, indent=2) + "\n")
    page = report_dir / f"latency-{family}.md"
    page.write_text(latency_markdown(study, family, command))
    return page
