"""Fine-tuning a multi-stage network after the transformation, and measuring what each stage knows.

Every stage's classifier learns at once from one forward pass (:class:`MultiStageResNet` returns
all stages' logits). The last stage learns from the labels; each earlier stage from the labels
and, with ``distill_weight``, from the last stage's detached soft prediction (in-place
distillation, as the supernet is trained). Long runs checkpoint to safetensors and resume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimserve.models.bn_calibration import calibrate_module_bn
from slimserve.models.checkpoint import CheckpointError, SupernetInfo, load_derived, load_own_state, save_derived
from slimserve.models.datasets import ImageDataset
from slimserve.models.fine_tune import FineTuneConfig, Resumable, distilled_loss
from slimserve.models.fine_tune import fine_tune as fine_tune_loop
from slimserve.models.multistage import MultiStageResNet, StagedResNet, StagePlan
from slimserve.models.ops import BNStats
from slimserve.models.transforms import normalize

log = logging.getLogger(__name__)

MULTISTAGE_FORMAT = "slimserve-multistage/1"


def stage_loss(
    logits: Sequence[Tensor], labels: Tensor, distill_weight: float, teacher_probs: Tensor | None = None
) -> Tensor:
    """Mean over stages. Earlier stages mix the labels with the last stage's soft prediction; the last
    stage learns from the labels, mixed the same way with ``teacher_probs`` when a teacher is given."""
    last = logits[-1].float()
    losses = [distilled_loss(last, labels, distill_weight, teacher_probs)]
    own_teacher = F.softmax(last.detach(), dim=1)
    for early in logits[:-1]:
        losses.append(distilled_loss(early, labels, distill_weight, own_teacher))
    return torch.stack(losses).mean()


def fine_tune(
    model: MultiStageResNet,
    train: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    config: FineTuneConfig,
    *,
    checkpoint: Path | None = None,
    info: SupernetInfo | None = None,
    progress: bool = True,
    description: str = "fine-tune",
    teacher: nn.Module | None = None,
) -> float:
    """Fine-tune every stage in place; returns the last step's loss.

    ``teacher`` (the static network the model came from, inference-only) adds knowledge distillation
    to the last stage. With ``checkpoint`` (and ``info``) the weights, momentum and step are saved every
    ``checkpoint_every`` steps and a run restarts where the file says it stopped.
    """
    resumable = None
    if checkpoint is not None and info is not None:
        resumable = Resumable(
            checkpoint,
            lambda path, extra: save_multistage(path, model, info, extra),
            lambda path: _restore(path, model),
        )
    return fine_tune_loop(
        model,
        train,
        mean,
        std,
        config,
        lambda logits, labels, teacher_probs: stage_loss(logits, labels, config.distill_weight, teacher_probs),
        resumable=resumable,
        progress=progress,
        description=description,
        teacher=teacher,
    )


def calibrate_stage_bn(model: MultiStageResNet, images: Tensor) -> BNStats:
    """Batch-norm statistics of the multi-stage network (one set serves every stage)."""
    return calibrate_module_bn(model, images)


@torch.no_grad()
def stage_predictions(
    staged: StagedResNet, dataset: ImageDataset, mean: Sequence[float], std: Sequence[float], batch_size: int = 128
) -> tuple[Tensor, Tensor]:
    """Per stage and image: the top softmax probability and whether the top-1 class is right.

    Returns two ``[stages, images]`` tensors (float confidence, bool correct), every stage run
    on every image (reusing features), for calibrating and evaluating exits.
    """
    device = next(staged.parameters()).device
    confidence, correct = [], []
    for start in range(0, len(dataset), batch_size):
        images = normalize(dataset.images[start : start + batch_size].to(device), mean, std)
        labels = dataset.labels[start : start + batch_size].to(device)
        state = None
        conf_rows, right_rows = [], []
        for _ in range(staged.num_stages):
            logits, state = staged.run_stage(images, state)
            top, predicted = F.softmax(logits.float(), dim=1).max(1)
            conf_rows.append(top.cpu())
            right_rows.append((predicted == labels).cpu())
        confidence.append(torch.stack(conf_rows))
        correct.append(torch.stack(right_rows))
    return torch.cat(confidence, 1), torch.cat(correct, 1)


# --- checkpoints ---------------------------------------------------------------------------------


def save_multistage(
    path: Path, model: MultiStageResNet, info: SupernetInfo, extra: dict[str, Tensor] | None = None
) -> None:
    """Weights of a multi-stage network, with what rebuilds it: the base family, static subnet and plan."""
    fields = {"subnet": list(model.subnet), "plan": model.plan.to_json()}
    save_derived(path, model, info, MULTISTAGE_FORMAT, fields, extra)


def load_multistage(path: Path) -> tuple[MultiStageResNet, SupernetInfo, dict[str, Tensor]]:
    base, info, fields, tensors = load_derived(path, MULTISTAGE_FORMAT, "multi-stage")
    model = MultiStageResNet(base, tuple(fields["subnet"]), StagePlan.from_json(fields["plan"]))
    return model, info, load_own_state(path, model, tensors)


def _restore(path: Path, model: MultiStageResNet) -> dict[str, Tensor]:
    saved, _, extra = load_multistage(path)
    if saved.plan != model.plan or saved.subnet != model.subnet:
        raise CheckpointError(f"{path} holds a different multi-stage network; use a new output path")
    model.load_state_dict(saved.state_dict())
    return extra
