"""Fine-tuning a network that starts trained (a multi-stage or a gated network made from a static one).

One loop serves both: random training batches with augmentation, SGD on the supernet trainer's
schedule (warm-up then cosine), bf16 autocast where supported, optional knowledge distillation from
the static network the model came from, and checkpoints that a run resumes from. What differs
between the networks is only the loss and how a checkpoint is written, so those are arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from slimserve.models.datasets import ImageDataset
from slimserve.models.train import (
    TrainConfig,
    learning_rate,
    make_optimizer,
    momentum_state,
    restore_momentum,
    soft_cross_entropy,
    use_bf16,
)
from slimserve.models.transforms import augment, normalize

log = logging.getLogger(__name__)

STEP_KEY = "train.step"


@dataclass(frozen=True)
class FineTuneConfig:
    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 0.02  # peak; the weights start trained, so well below training's 0.1
    warmup_steps: int = 30
    weight_decay: float = 5e-4
    distill_weight: float = 0.5  # (1 - w) x labels + w x the teacher's soft prediction
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


@dataclass(frozen=True)
class Resumable:
    """Where a run checkpoints, and how: ``save(path, extra)`` writes the model's weights with the extra
    tensors (step, momentum); ``restore(path)`` loads the weights into the model (refusing a file that
    holds another network) and returns the extra tensors."""

    path: Path
    save: Callable[[Path, dict[str, Tensor]], None]
    restore: Callable[[Path], dict[str, Tensor]]


# The model's output, the labels and the teacher's soft prediction (None without a teacher) -> loss.
Objective = Callable[[Any, Tensor, Tensor | None], Tensor]


def distilled_loss(logits: Tensor, labels: Tensor, distill_weight: float, teacher_probs: Tensor | None) -> Tensor:
    """Cross-entropy on the labels, mixed with the teacher's soft prediction when there is one."""
    hard = F.cross_entropy(logits.float(), labels)
    if teacher_probs is None:
        return hard
    return (1 - distill_weight) * hard + distill_weight * soft_cross_entropy(logits.float(), teacher_probs)


def fine_tune(
    model: nn.Module,
    train: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    config: FineTuneConfig,
    objective: Objective,
    *,
    resumable: Resumable | None = None,
    progress: bool = True,
    description: str = "fine-tune",
    teacher: nn.Module | None = None,
) -> float:
    """Fine-tune ``model`` in place for ``config.steps`` steps; returns the last step's loss.

    ``teacher`` (inference-only) gives ``objective`` its soft prediction of each batch. With
    ``resumable``, weights, momentum and step are saved every ``checkpoint_every`` steps and at the
    end, and a run restarts where the file says it stopped.
    """
    device = torch.device(config.device)
    model.to(device).train()
    schedule = config.schedule()
    optimizer = make_optimizer(model, schedule)
    start = 0
    if resumable is not None and resumable.path.exists():
        extra = resumable.restore(resumable.path)
        restore_momentum(optimizer, extra)
        start = int(extra[STEP_KEY])
        log.info("resuming %s at step %d of %d", resumable.path, start, config.steps)
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
            outputs = model(inputs)
            teacher_probs = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_probs = F.softmax(teacher(inputs).float(), dim=1)
        loss = objective(outputs, labels, teacher_probs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        finished = step + 1
        if resumable is not None and (finished % config.checkpoint_every == 0 or finished == config.steps):
            resumable.save(resumable.path, {STEP_KEY: torch.tensor(finished), **momentum_state(optimizer)})
    bar.close()
    model.eval()
    return loss_value
