"""Supernet training: the US-Nets recipe (Yu & Huang, ICCV 2019).

Each step runs the *sandwich rule*: the largest subnet, the smallest, and ``random_subnets``
random ones, accumulating their gradients into one optimizer step. With *in-place distillation*
the largest learns from the labels and every other subnet learns from the largest's detached soft
prediction (after a warm-up on labels, and mixed with the labels: see ``distill_warmup_epochs`` and
``label_weight``). Random subnets are drawn per unit in channel groups by default (non-uniform widths,
which the searcher later visits); ``sampling="uniform"`` draws one width multiplier as US-Nets does. With ``resolutions`` the input
resolution is elastic too (:mod:`slimserve.models.resolution`): the largest sees the full image,
the smallest the lowest resolution, and each random subnet a random one of them;
``narrowest_full_depth`` adds the narrowest subnet at full depth and full resolution.

Training is deterministic for a seed, checkpoints to safetensors every ``checkpoint_every`` steps
and resumes from the last checkpoint exactly (batch order, augmentation and subnet draws are all
derived from ``(seed, step)``).

A *static baseline* (``static_width``) trains one fixed width alone with the same schedule, for
the comparison US-Nets makes: is each width of the supernet as good as that width trained alone?
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from slimserve.models.checkpoint import SupernetInfo, load_supernet, save_supernet
from slimserve.models.datasets import Splits, channel_stats
from slimserve.models.evaluate import calibrate_and_evaluate, calibration_images
from slimserve.models.families import create_supernet
from slimserve.models.registry import Supernet
from slimserve.models.resolution import check_resolutions, draw_resolution, resize
from slimserve.models.subnet import Subnet, SubnetSpace, subnet_to_str
from slimserve.models.transforms import augment, normalize

log = logging.getLogger(__name__)

REPORT_WIDTHS = (0.125, 0.25, 0.5, 0.75, 1.0)
LAST_CHECKPOINT = "last.safetensors"  # weights + optimizer state, for resuming
FINAL_CHECKPOINT = "supernet.safetensors"  # weights only, what `slimserve search` reads
REPORT = "train_report.json"


@dataclass(frozen=True)
class TrainConfig:
    family: str = "cifar_resnet"
    family_args: dict[str, Any] = field(default_factory=lambda: {"depth": 20, "base_channels": 64})
    epochs: float = 10.0  # fractional epochs allowed, for quick runs
    batch_size: int = 128
    learning_rate: float = 0.1  # peak of a linear-warmup, cosine-decay schedule (SGD + Nesterov)
    warmup_steps: int = 200
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to batch-norm affine parameters and biases
    random_subnets: int = 2  # US-Nets' n: random subnets per step besides largest and smallest
    sampling: str = "group"  # "group": per-unit channel-group sampling; "uniform": one width multiplier
    distill: bool = True  # in-place distillation from the largest subnet
    # Pure in-place distillation from step 0 slowed every width down on short schedules. Measured
    # here, 1.5 epochs of a ResNet-8 supernet on Fashion-MNIST, full-width top-1: 81.2% pure KD
    # from step 0, 82.3% pure KD after 0.5 epoch on labels, 85.6% with that warm-up and students
    # on 0.5 x labels + 0.5 x teacher, 86.0% without distillation. Hence these defaults.
    distill_warmup_epochs: float = 0.5  # students learn from labels alone first
    label_weight: float = 0.5  # students' loss: label_weight x CE(labels) + (1 - label_weight) x KD(teacher)
    static_width: float | None = None  # train only this uniform width, alone (a baseline)
    resolutions: tuple[int, ...] = ()  # input widths subnets are trained at; () = the input's own only
    # Also train the narrowest subnet at full depth and the input's own resolution every step. With
    # elastic resolution the smallest trains at the lowest resolution, and that subnet is otherwise
    # reached only by a random draw of every unit's narrowest width at once (demo: 83.6% vs 92.9%
    # trained alone).
    narrowest_full_depth: bool = False
    augment: bool = True  # random 2-px-padded crops and horizontal flips
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto" (bf16 where the CPU/GPU has it)
    channels_last: bool = True  # NHWC convolutions: ~15% faster steps on this project's CPUs
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 200
    eval_each_epoch: bool = True  # calibrate + evaluate largest and smallest on the search split

    def __post_init__(self) -> None:
        if self.sampling not in ("group", "uniform"):
            raise ValueError(f"sampling must be 'group' or 'uniform', got {self.sampling!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.random_subnets < 0:
            raise ValueError("epochs and batch_size must be positive and random_subnets >= 0")
        if not (self.learning_rate > 0 and self.weight_decay >= 0 and 0 <= self.momentum < 1):
            raise ValueError(
                f"the learning rate must be > 0, weight decay >= 0 and momentum in [0, 1), got "
                f"{self.learning_rate}, {self.weight_decay}, {self.momentum}"
            )
        if self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise ValueError(
                f"warmup steps must be >= 0 and checkpoint_every >= 1, got {self.warmup_steps}, {self.checkpoint_every}"
            )
        if self.static_width is not None and not 0 < self.static_width <= 1:
            raise ValueError(f"static_width must be in (0, 1], got {self.static_width}")
        if self.static_width is not None and self.narrowest_full_depth:
            raise ValueError("a static baseline trains one subnet: drop --narrowest-full-depth or --static-width")


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    test_accuracy: dict[str, float]  # width multiplier -> top-1 on the test split
    seconds: float
    steps: int


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return 0.5 * config.learning_rate * (1 + math.cos(math.pi * min(1.0, progress)))


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def sandwich_step(
    supernet: Supernet,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    labels: Tensor,
    subnets: list[Subnet],
    *,
    distill: bool = True,
    bf16: bool = False,
    label_weight: float = 0.0,
    resolutions: Sequence[int | None] | None = None,
) -> list[float]:
    """One optimizer step over ``subnets`` (the first is the teacher); returns each subnet's loss.

    Gradients of all subnets accumulate before the single step, as in US-Nets. With ``distill`` the
    first subnet learns from labels and the others from its detached softmax (the teacher's
    prediction of the same image, whatever resolution the student sees it at). ``resolutions``
    gives each subnet's input resolution (None: as given).
    """
    optimizer.zero_grad(set_to_none=True)
    teacher: Tensor | None = None
    losses = []
    shrunk: dict[int | None, Tensor] = {}
    for position, (subnet, resolution) in enumerate(zip(subnets, resolutions or [None] * len(subnets), strict=True)):
        if resolution not in shrunk:
            shrunk[resolution] = resize(inputs, resolution)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = supernet(shrunk[resolution], subnet).float()
        if position == 0 or not distill:
            loss = F.cross_entropy(logits, labels)
            teacher = F.softmax(logits.detach(), dim=1)
        else:
            assert teacher is not None
            loss = soft_cross_entropy(logits, teacher)
            if label_weight:
                loss = label_weight * F.cross_entropy(logits, labels) + (1 - label_weight) * loss
        loss.backward()
        losses.append(loss.item())
    optimizer.step()
    return losses


def sandwich(
    space: SubnetSpace, config: TrainConfig, resolutions: Sequence[int], step: int
) -> tuple[list[Subnet], list[int]]:
    """The subnets trained at ``step`` (largest first: it is the teacher) and each one's input
    resolution; ``resolutions`` is largest first, as :func:`check_resolutions` returns it."""
    if config.static_width is not None:
        return [space.uniform(config.static_width)], [resolutions[0]]
    rng = random.Random(f"{config.seed}/{step}")
    drawn = [space.random(rng, per_unit=config.sampling == "group") for _ in range(config.random_subnets)]
    at = [draw_resolution(rng, resolutions) for _ in drawn]  # after the subnets: they draw as before
    subnets, at_resolution = [space.largest(), space.smallest()], [resolutions[0], resolutions[-1]]
    if config.narrowest_full_depth:
        subnets.append(space.with_depths(space.smallest(), space.max_depths()))
        at_resolution.append(resolutions[0])
    return [*subnets, *drawn], [*at_resolution, *at]


def make_optimizer(supernet: nn.Module | Supernet, config: TrainConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; no weight decay on batch-norm affine parameters and biases."""
    decay = [p for p in supernet.parameters() if p.dim() > 1]
    no_decay = [p for p in supernet.parameters() if p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        momentum=config.momentum,
        nesterov=True,
    )


def train(
    config: TrainConfig,
    splits: Splits,
    out_dir: Path,
    *,
    resume: bool = True,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a supernet (or a static baseline) and write ``out_dir/supernet.safetensors`` and a report."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    mean, std = channel_stats(splits.train.images)
    family_args = dict(config.family_args)
    family_args.setdefault("in_channels", splits.train.images.shape[1])
    family_args.setdefault("image_size", splits.train.images.shape[-1])
    family_args.setdefault("num_classes", len(splits.train.class_names))
    info = SupernetInfo(
        family=config.family,
        family_args=family_args,
        mean=mean,
        std=std,
        class_names=splits.train.class_names,
        dataset=splits.train.name.split("/")[0],
        dataset_version=splits.train.version,
        provenance={**(provenance or {}), "train_config": asdict(config), "torch": torch.__version__},
    )
    supernet = create_supernet(config.family, **family_args).to(device)
    space = supernet.space
    resolutions = check_resolutions(config.resolutions, supernet.input_shape[-1])
    if config.static_width is not None and len(resolutions) > 1:
        raise ValueError("a static baseline trains at one resolution: drop --resolutions or --static-width")

    optimizer = make_optimizer(supernet, config)
    steps_per_epoch = len(splits.train) // config.batch_size
    total_steps = max(1, int(config.epochs * steps_per_epoch))
    start_step = 0
    last_path = out_dir / LAST_CHECKPOINT
    if resume and last_path.exists():
        start_step = _restore(last_path, supernet, optimizer, config)
        log.info("resuming from %s at step %d of %d", last_path, start_step, total_steps)
    supernet.train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    supernet.to(memory_format=memory_format)
    bf16 = use_bf16(config.precision, device)
    calibration = calibration_images(splits.train, mean, std, seed=config.seed).to(device)

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    window_images, window_start = 0, time.perf_counter()
    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        order = torch.randperm(
            len(splits.train), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        )
        batch = order[index * config.batch_size : (index + 1) * config.batch_size]
        images = splits.train.images[batch]
        if config.augment:
            images = augment(images, torch.Generator().manual_seed(config.seed * 1_000_003 + step))
        inputs = normalize(images.to(device), mean, std).contiguous(memory_format=memory_format)
        labels = splits.train.labels[batch].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, total_steps)

        distill = config.distill and step >= config.distill_warmup_epochs * steps_per_epoch
        subnets, subnet_resolutions = sandwich(space, config, resolutions, step)
        losses = sandwich_step(
            supernet,
            optimizer,
            inputs,
            labels,
            subnets,
            distill=distill,
            bf16=bf16,
            label_weight=config.label_weight,
            resolutions=subnet_resolutions,
        )
        window_images += len(batch)
        bar.update(1)
        if step % 10 == 0:
            rate = window_images / (time.perf_counter() - window_start)
            bar.set_postfix(epoch=epoch, loss_max=f"{losses[0]:.3f}", loss_min=f"{losses[-1]:.3f}", img_s=f"{rate:.0f}")
            window_images, window_start = 0, time.perf_counter()
        if on_step is not None:
            on_step(step, losses[0])
        finished = step + 1
        if finished % config.checkpoint_every == 0 or finished == total_steps:
            _save_resumable(last_path, supernet, optimizer, info, finished)
        if config.eval_each_epoch and finished % steps_per_epoch == 0 and finished != total_steps:
            _log_epoch(supernet, config, splits, calibration, mean, std, epoch, bar, resolutions[-1])
    bar.close()

    supernet.eval()
    widths = (config.static_width,) if config.static_width is not None else REPORT_WIDTHS
    results = calibrate_and_evaluate(supernet, [space.uniform(w) for w in widths], calibration, splits.test, mean, std)
    test_accuracy = {f"{w:g}": round(acc, 5) for w, (acc, _) in zip(widths, results, strict=True)}
    if len(resolutions) > 1:  # the other end of the trained space: the smallest at the lowest resolution
        ((lowest, _),) = calibrate_and_evaluate(
            supernet, [space.smallest()], calibration, splits.test, mean, std, [resolutions[-1]]
        )
        test_accuracy[f"smallest@{resolutions[-1]}"] = round(lowest, 5)
    final_path = out_dir / FINAL_CHECKPOINT
    save_supernet(final_path, supernet, info)
    seconds = time.perf_counter() - started
    report = {
        "test_split": splits.test.name,
        "test_images": len(splits.test),
        "test_top1": test_accuracy,
        "subnets": {f"{w:g}": subnet_to_str(space.uniform(w)) for w in widths},
        "steps": total_steps,
        "seconds_this_run": round(seconds, 1),
        "config": asdict(config),
        "dataset_version": splits.train.version,
    }
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info("test top-1 by width: %s", test_accuracy)
    return TrainResult(final_path, test_accuracy, seconds, total_steps)


def _log_epoch(
    supernet: Supernet,
    config: TrainConfig,
    splits: Splits,
    calibration: Tensor,
    mean: Any,
    std: Any,
    epoch: int,
    bar: tqdm,
    lowest_resolution: int,
) -> None:
    supernet.eval()
    space = supernet.space
    native = supernet.input_shape[-1]
    if config.static_width is not None:
        names, probes, at = ["static"], [space.uniform(config.static_width)], [native]
    else:
        names, probes, at = ["largest", "smallest"], [space.largest(), space.smallest()], [native, lowest_resolution]
        if lowest_resolution != native:
            names[1] = f"smallest@{lowest_resolution}"
    results = calibrate_and_evaluate(supernet, probes, calibration, splits.search, mean, std, at)
    summary = ", ".join(f"{n} {acc:.2%}" for n, (acc, _) in zip(names, results, strict=True))
    bar.write(f"epoch {epoch + 1}: search-split top-1 {summary}")
    log.info("epoch %d: search-split top-1 %s", epoch + 1, summary)
    supernet.train()


def _save_resumable(
    path: Path, supernet: Supernet, optimizer: torch.optim.Optimizer, info: SupernetInfo, step: int
) -> None:
    save_supernet(
        path, supernet, info, {"train.step": torch.tensor(step, dtype=torch.int64), **momentum_state(optimizer)}
    )


def momentum_state(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """SGD momentum buffers as named tensors, for a resumable checkpoint."""
    extra = {}
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        if buffer is not None:
            extra[f"optimizer.momentum.{index}"] = buffer.detach().cpu()
    return extra


def restore_momentum(optimizer: torch.optim.Optimizer, extra: dict[str, Tensor]) -> None:
    """Put back the buffers :func:`momentum_state` saved (same parameters, same order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        buffer = extra.get(f"optimizer.momentum.{index}")
        if buffer is not None:
            optimizer.state[param]["momentum_buffer"] = buffer.to(param.device)


def _restore(path: Path, supernet: Supernet, optimizer: torch.optim.Optimizer, config: TrainConfig) -> int:
    saved, info, extra = load_supernet(path)
    saved_config = info.provenance.get("train_config", {})
    wanted = json.loads(json.dumps(asdict(config)))  # as the checkpoint stores it (tuples as lists)
    for key in ("family", "batch_size", "seed", "static_width", "sampling", "resolutions", "narrowest_full_depth"):
        if saved_config.get(key, wanted[key]) != wanted[key]:
            raise ValueError(
                f"{path} was trained with {key}={saved_config[key]!r}, not {wanted[key]!r}; use a new output directory"
            )
    supernet.load_state_dict(saved.state_dict())
    restore_momentum(optimizer, extra)
    return int(extra["train.step"])
