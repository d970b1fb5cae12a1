"""Fine-tuning a multi-stage network after the transformation, and measuring what each stage knows.

Every stage's classifier learns at once from one forward pass (:class:`MultiStageResNet` returns
all stages' logits). The last stage learns from the labels; each earlier stage from the labels
and, with ``distill_weight``, from the last stage's detached soft prediction (in-place
distillation, as the supernet is trained). Long runs checkpoint to safetensors and resume.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from models.bn_calibration import calibrate_module_bn
from models.checkpoint import CheckpointError, SupernetInfo, load_weights, save_weights
from models.datasets import ImageDataset
from models.families import create_supernet
from models.multistage import MultiStageResNet, StagedResNet, StagePlan
from models.ops import BNStats
from models.train import (
    TrainConfig,
    learning_rate,
    make_optimizer,
    momentum_state,
    restore_momentum,
    soft_cross_entropy,
    use_bf16,
)
from models.transforms import augment, normalize

log = logging.getLogger(__name__)

MULTISTAGE_FORMAT = "slimserve-multistage/1"


@dataclass(frozen=True)
class FineTuneConfig:
    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 0.02  # peak; the weights start trained, so well below training's 0.1
    warmup_steps: int = 30
    weight_decay: float = 5e-4
    distill_weight: float = 0.5  # earlier stages: (1 - w) x labels + w x last stage's soft prediction
    augment: bool = True
    seed: int = 0
    precision: str = "auto"  # "auto" = bf16 autocast where the CPU/GPU supports it
    checkpoint_every: int = 200
    device: str = "cpu"

    def schedule(self) -> TrainConfig:
        """The supernet trainer's config carrying this run's optimizer and schedule settings."""
        return TrainConfig(
            learning_rate=self.learning_rate, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay
        )


def stage_loss(
    logits: Sequence[Tensor], labels: Tensor, distill_weight: float, teacher_probs: Tensor | None = None
) -> Tensor:
    """Mean over stages. Earlier stages mix the labels with the last stage's soft prediction; the last
    stage learns from the labels, mixed the same way with ``teacher_probs`` when a teacher is given."""
    last = logits[-1].float()
    if teacher_probs is None:
        losses = [F.cross_entropy(last, labels)]
    else:
        losses = [
            (1 - distill_weight) * F.cross_entropy(last, labels)
            + distill_weight * soft_cross_entropy(last, teacher_probs)
        ]
    own_teacher = F.softmax(last.detach(), dim=1)
    for early in logits[:-1]:
        hard = F.cross_entropy(early.float(), labels)
        losses.append((1 - distill_weight) * hard + distill_weight * soft_cross_entropy(early.float(), own_teacher))
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
    device = torch.device(config.device)
    model.to(device).train()
    schedule = config.schedule()
    optimizer = make_optimizer(model, schedule)
    start = 0
    if checkpoint is not None and checkpoint.exists():
        start = _restore(checkpoint, model, optimizer)
        log.info("resuming %s at step %d of %d", checkpoint, start, config.steps)
    bf16 = use_bf16(config.precision, device)
    generator = torch.Generator().manual_seed(config.seed)
    loss_value = float("nan")
    bar = tqdm(total=config.steps, initial=start, disable=not progress, desc=description, unit="step", leave=False)
    for step in range(start, config.steps):
        batch = torch.randint(
            len(train), (config.batch_size,), generator=torch.Generator().manual_seed(config.seed * 7_919 + step)
        )
        images = train.images[batch]
        if config.augment:
            images = augment(images, generator)
        inputs = normalize(images.to(device), mean, std)
        labels = train.labels[batch].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(schedule, step, config.steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs)
            teacher_probs = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_probs = F.softmax(teacher(inputs).float(), dim=1)
        loss = stage_loss(logits, labels, config.distill_weight, teacher_probs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        finished = step + 1
        if (
            checkpoint is not None
            and info is not None
            and (finished % config.checkpoint_every == 0 or finished == config.steps)
        ):
            save_multistage(
                checkpoint, model, info, {"train.step": torch.tensor(finished), **momentum_state(optimizer)}
            )
    bar.close()
    model.eval()
    return loss_value


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
    tensors = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    tensors.update(extra or {})
    metadata = {
        "format": MULTISTAGE_FORMAT,
        "info": json.dumps(asdict(info), sort_keys=True),
        "subnet": json.dumps(list(model.subnet)),
        "plan": json.dumps(model.plan.to_json()),
    }
    save_weights(path, tensors, metadata)


def load_multistage(path: Path) -> tuple[MultiStageResNet, SupernetInfo, dict[str, Tensor]]:
    tensors, metadata = load_weights(path)
    if metadata.get("format") != MULTISTAGE_FORMAT:
        raise CheckpointError(f"{path}: not a slimserve multi-stage checkpoint (format {metadata.get('format')!r})")
    info = SupernetInfo.from_metadata({"format": "slimserve-supernet/1", "info": metadata["info"]}, path)
    base: Any = create_supernet(info.family, **info.family_args)
    model = MultiStageResNet(
        base, tuple(json.loads(metadata["subnet"])), StagePlan.from_json(json.loads(metadata["plan"]))
    )
    own = set(model.state_dict())
    missing = own - set(tensors)
    if missing:
        raise CheckpointError(f"{path}: missing parameters {', '.join(sorted(missing)[:5])}")
    model.load_state_dict({k: tensors[k] for k in own})
    return model, info, {k: v for k, v in tensors.items() if k not in own}


def _restore(path: Path, model: MultiStageResNet, optimizer: torch.optim.Optimizer) -> int:
    saved, _, extra = load_multistage(path)
    if saved.plan != model.plan or saved.subnet != model.subnet:
        raise CheckpointError(f"{path} holds a different multi-stage network; use a new output path")
    model.load_state_dict(saved.state_dict())
    restore_momentum(optimizer, extra)
    return int(extra["train.step"])
