"""Training LC-Net gates jointly with the network they gate, and measuring what the gates skip.

The loss is the network's (labels, plus the ungated network's soft prediction when a teacher is
given) plus ``penalty`` x the FLOPs-weighted share of branch work the gates keep
(:meth:`GatedResNet.sparsity`). A larger penalty closes more gates; sweeping it traces the
accuracy-FLOPs curve. Long runs checkpoint to safetensors and resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from slimserve.models.checkpoint import CheckpointError, SupernetInfo, load_derived, load_own_state, save_derived
from slimserve.models.datasets import ImageDataset
from slimserve.models.fine_tune import FineTuneConfig, Resumable, distilled_loss, fine_tune
from slimserve.models.gating import GatedResNet, GatedStatic, Gates
from slimserve.models.transforms import normalize

GATED_FORMAT = "slimserve-gated/1"


def train_gates(
    model: GatedResNet,
    train: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    config: FineTuneConfig,
    penalty: float,
    *,
    checkpoint: Path | None = None,
    info: SupernetInfo | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
    description: str = "train gates",
) -> float:
    """Train gates and network in place; returns the last step's loss (resumes from ``checkpoint``)."""

    def objective(outputs: tuple[Tensor, Gates], labels: Tensor, teacher_probs: Tensor | None) -> Tensor:
        logits, gates = outputs
        return distilled_loss(logits, labels, config.distill_weight, teacher_probs) + penalty * model.sparsity(gates)

    resumable = None
    if checkpoint is not None and info is not None:
        resumable = Resumable(
            checkpoint,
            lambda path, extra: save_gated(path, model, info, penalty, extra),
            lambda path: _restore(path, model, penalty),
        )
    return fine_tune(
        model,
        train,
        mean,
        std,
        config,
        objective,
        resumable=resumable,
        progress=progress,
        description=description,
        teacher=teacher,
    )


@dataclass(frozen=True)
class GateOutcome:
    """An operating point measured on a split: accuracy and what the gates ran, per image on average."""

    threshold: float
    accuracy: float
    flops: float  # mean FLOPs per image at batch 1 (fixed parts + the branch work its gates kept)
    blocks_run: float  # mean residual branches run per image
    groups_run: float  # mean share of the running blocks' channel groups computed, over all blocks

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate_gates(
    static: GatedStatic,
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    fixed_flops: float,
    batch_size: int = 256,
) -> GateOutcome:
    """Accuracy and mean per-image cost of ``static`` at its threshold.

    ``fixed_flops`` is what every image pays whatever its gates (stem, shortcuts, classifier,
    the gates themselves). Batched evaluation gives each image the answer it gets alone: groups
    computed for other images reach it scaled by its own gate, 0.
    """
    device = next(static.parameters()).device
    right, flops, blocks, groups, seen = 0, 0.0, 0.0, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        images = normalize(dataset.images[start : start + batch_size].to(device), mean, std)
        logits, gates = static.run(images)
        right += int((logits.argmax(1).cpu() == dataset.labels[start : start + batch_size]).sum())
        flops += float(static.branch_flops_run(gates).sum())
        blocks += float(sum((layer > 0).float().sum() for layer in gates.layer))
        groups += float(sum((channel > 0).float().mean(1).sum() for channel in gates.channel)) / len(gates.channel)
        seen += images.shape[0]
    return GateOutcome(static.threshold, right / seen, fixed_flops + flops / seen, blocks / seen, groups / seen)


def gate_flops(model: GatedResNet) -> float:
    """FLOPs of the gates of one image: per running block, the input's average pool and two small linears."""
    _, height, width = model.base.input_shape
    total, size = 0.0, (height, width)
    for (block, _), layer, channel in zip(model.running, model.layer_gate_list, model.channel_gate_list, strict=True):
        total += layer.in_features * size[0] * size[1]  # the pool reads the block's input
        total += 2.0 * layer.in_features * (layer.out_features + channel.out_features)
        stride = block.conv1.stride
        size = ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    return total


# --- checkpoints ---------------------------------------------------------------------------------


def save_gated(
    path: Path, model: GatedResNet, info: SupernetInfo, penalty: float, extra: dict[str, Tensor] | None = None
) -> None:
    """Weights of a gated network (the base network's and the gates'), with what rebuilds it."""
    save_derived(path, model, info, GATED_FORMAT, {"subnet": list(model.subnet), "penalty": penalty}, extra)


def load_gated(path: Path) -> tuple[GatedResNet, SupernetInfo, float, dict[str, Tensor]]:
    """``(model, info, penalty, extra tensors)`` from a :func:`save_gated` file."""
    base, info, fields, tensors = load_derived(path, GATED_FORMAT, "gated")
    model = GatedResNet(base, tuple(fields["subnet"]))
    return model, info, float(fields["penalty"]), load_own_state(path, model, tensors)


def _restore(path: Path, model: GatedResNet, penalty: float) -> dict[str, Tensor]:
    saved, _, saved_penalty, extra = load_gated(path)
    if saved.subnet != model.subnet or saved_penalty != penalty:
        raise CheckpointError(
            f"{path} holds another gated network (penalty {saved_penalty}, not {penalty}); use a new output path"
        )
    model.load_state_dict(saved.state_dict())
    return extra
