"""S2DNAS (Yuan et al., ECCV 2020): a trained static ResNet turned into a multi-stage network.

The transformation splits every layer's output channels among ``S`` stages. Stage ``s`` computes
only its own slice of each layer, so running stage ``s + 1`` after stage ``s`` costs only stage
``s + 1``'s slices: the features earlier stages computed are *reused*, never recomputed. Every
stage ends in its own classifier, which reads the pooled features of stages ``<= s``; an input
whose prediction is confident enough leaves after an early stage (see :mod:`slimserve.models.early_exit`).

Two operations define one network of the search space (:class:`StagePlan`):

* **split**: per prunable unit, how many channels each stage owns. Channels are assigned as
  consecutive ranges in channel order (stage 1 the first ones), so rank channels by importance
  before transforming and the cheap first stage keeps the channels that matter most;
* **concat**: per residual block, whether stage ``s``'s convolutions read the feature maps of
  every stage ``<= s`` (block-lower-triangular weights, reuse) or only stage ``s``'s own
  (block-diagonal weights, cheaper, no reuse inside the block).

Weights are inherited from the static network: the multi-stage network *is* the static network
with the weights between a later stage's inputs and an earlier stage's outputs removed (and, at
blocks without concat, every cross-stage weight removed), plus one classifier per stage. Training
runs it that way (:class:`MultiStageResNet`, masked weights, one forward gives every stage's
logits); serving runs :class:`StagedResNet`, which holds each stage's slices as separate, contiguous,
batch-norm-folded convolutions and runs one stage at a time over a :class:`StageState`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimserve.models.ops import BNStats, NormMode, SlimBatchNorm2d, SlimConv2d, batch_stats_norm, fold_batch_norm
from slimserve.models.resnet import SlimResNet
from slimserve.models.subnet import Subnet


class InvalidPlanError(ValueError):
    """A stage plan that does not fit its static network; the message names the unit or block."""


@dataclass(frozen=True)
class StagePlan:
    """One multi-stage network of the S2DNAS space.

    Attributes:
        splits: Per prunable unit (in the static network's unit order), the channels each stage
            owns; they sum to the unit's width in the static subnet (0 everywhere for a dropped
            block's unit). Every stage owns at least one channel group of every running unit.
        concat: Per residual block, True when stage ``s`` reads every stage ``<= s`` there.
    """

    splits: tuple[tuple[int, ...], ...]
    concat: tuple[bool, ...]

    @property
    def stages(self) -> int:
        return len(self.splits[0])

    def ends(self, unit: int) -> tuple[int, ...]:
        """Cumulative channel counts of ``unit``: stage ``s`` owns ``[ends[s-1], ends[s])``."""
        total, ends = 0, []
        for channels in self.splits[unit]:
            total += channels
            ends.append(total)
        return tuple(ends)

    def to_json(self) -> dict[str, object]:
        return {"splits": [list(s) for s in self.splits], "concat": list(self.concat)}

    @classmethod
    def from_json(cls, data: object) -> StagePlan:
        if not isinstance(data, dict) or set(data) != {"splits", "concat"}:
            raise InvalidPlanError("a stage plan is an object with exactly 'splits' and 'concat'")
        splits, concat = data["splits"], data["concat"]
        if not isinstance(splits, list) or not all(
            isinstance(row, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in row) for row in splits
        ):
            raise InvalidPlanError("'splits' must be a list of lists of channel counts")
        if not isinstance(concat, list) or not all(isinstance(c, bool) for c in concat):
            raise InvalidPlanError("'concat' must be a list of booleans, one per block")
        return cls(tuple(tuple(row) for row in splits), tuple(concat))


def fraction_plan(
    base: SlimResNet, subnet: Subnet, fractions: Sequence[Sequence[float]], concat: Sequence[bool]
) -> StagePlan:
    """A plan from per-network-stage choices, the granularity the search works at.

    Args:
        base: The static network's supernet.
        subnet: The static network's channels (``base.space.largest()`` for a full-width model).
        fractions: Per network stage (depth group), the cumulative share of channels owned by the
            multi-stage network's stages ``1 .. S-1`` (increasing, in (0, 1)); the last stage
            owns the rest. Every unit of the network stage is split the same way, in whole groups.
        concat: Per network stage, whether its blocks concatenate earlier stages' features.
    """
    space = base.space
    subnet = space.validate(subnet)
    groups = len(space.depth_groups)
    if len(fractions) != groups or len(concat) != groups:
        raise InvalidPlanError(f"expected fractions and concat for each of the {groups} network stages")
    stage_count = len(fractions[0]) + 1
    splits = []
    for index, channels in enumerate(subnet):
        stage = _network_stage(space.units[index].name)
        cuts = fractions[stage]
        if len(cuts) != stage_count - 1 or list(cuts) != sorted(cuts) or not all(0 < c < 1 for c in cuts):
            raise InvalidPlanError(
                f"network stage {stage}: fractions must be increasing, in (0, 1), {stage_count - 1} of them"
            )
        if channels == 0:
            splits.append((0,) * stage_count)
            continue
        total_groups = channels // space.group_size
        if total_groups < stage_count:
            raise InvalidPlanError(
                f"unit {space.units[index].name!r} has {total_groups} channel groups, fewer than {stage_count} stages"
            )
        ends = [
            min(total_groups - (stage_count - 1 - s), max(s + 1, round(total_groups * c))) for s, c in enumerate(cuts)
        ]
        for s in range(1, len(ends)):
            ends[s] = max(ends[s], ends[s - 1] + 1)
        bounds = [0, *ends, total_groups]
        splits.append(tuple(space.group_size * (bounds[s + 1] - bounds[s]) for s in range(stage_count)))
    block_concat = tuple(concat[_network_stage(space.units[units.mid].name)] for units in base.block_units)
    return StagePlan(tuple(splits), block_concat)


def _network_stage(unit_name: str) -> int:
    return int(unit_name.split(".")[0].removeprefix("stage"))


@dataclass(frozen=True)
class _Conv:
    """One convolution of the static network: which units it reads and writes, and its shape."""

    name: str  # parameter prefix in MultiStageResNet ("stem", "blocks.0.conv1", ...)
    reads: int | None  # unit index of its input channels; None = the image
    writes: int
    stride: int
    padding: int
    concat: bool  # reads earlier stages' channels too (always True for the image)


def validate_plan(base: SlimResNet, subnet: Subnet, plan: StagePlan) -> Subnet:
    """Check ``plan`` against the static network ``subnet`` of ``base``; return the subnet."""
    space = base.space
    subnet = space.validate(subnet)
    if len(plan.splits) != len(subnet):
        raise InvalidPlanError(f"plan has splits for {len(plan.splits)} units, the network has {len(subnet)}")
    if len(plan.concat) != len(base.block_units):
        raise InvalidPlanError(
            f"plan has concat for {len(plan.concat)} blocks, the network has {len(base.block_units)}"
        )
    if plan.stages < 2:
        raise InvalidPlanError(f"a multi-stage network needs at least 2 stages, got {plan.stages}")
    for unit, (channels, split) in enumerate(zip(subnet, plan.splits, strict=True)):
        name = space.units[unit].name
        if len(split) != plan.stages:
            raise InvalidPlanError(f"unit {name!r}: {len(split)} stage widths, expected {plan.stages}")
        if sum(split) != channels:
            raise InvalidPlanError(f"unit {name!r}: stage widths {list(split)} sum to {sum(split)}, not its {channels}")
        if channels and any(c <= 0 or c % space.group_size for c in split):
            raise InvalidPlanError(
                f"unit {name!r}: every stage needs a positive multiple of {space.group_size} channels, got {list(split)}"
            )
    return subnet


class MultiStageResNet(nn.Module):
    """The multi-stage network for training: the static weights under stage masks, one classifier per stage.

    ``forward`` returns every stage's logits from one pass (stage ``s``'s features depend only
    on stages ``<= s``, so the full masked network computes all of them at once). Batch norm is
    per channel and every channel belongs to one stage, so one set of statistics serves every
    stage.
    """

    def __init__(self, base: SlimResNet, subnet: Subnet, plan: StagePlan) -> None:
        super().__init__()
        subnet = validate_plan(base, subnet, plan)
        if base.config.imagenet_stem:
            raise InvalidPlanError("multi-stage transformation supports the CIFAR-style ResNet family only")
        self.plan = plan
        self.subnet = subnet
        self.input_shape = base.input_shape
        self.num_classes = base.num_classes
        self.space = base.space  # the static network's units, which the plan and a bundle's rows index
        self.convs: list[_Conv] = []
        self.weights = nn.ParameterDict()
        self.norms = nn.ModuleDict()
        self._identity: list[bool] = []  # per running block: identity shortcut
        self._norm_list: list[SlimBatchNorm2d] = []  # typed views of the registered modules, by conv index

        def add(name: str, conv: SlimConv2d, bn: SlimBatchNorm2d, reads: int | None, writes: int, concat: bool) -> None:
            out_channels = subnet[writes]
            in_channels = base.config.in_channels if reads is None else subnet[reads]
            weight = conv.weight.detach()[:out_channels, :in_channels].clone()
            self.weights[name.replace(".", "_")] = nn.Parameter(weight)
            norm = SlimBatchNorm2d(out_channels, bn.eps)
            norm.weight.data.copy_(bn.weight.detach()[:out_channels])
            norm.bias.data.copy_(bn.bias.detach()[:out_channels])
            norm.key = name
            self.norms[name.replace(".", "_")] = norm
            self._norm_list.append(norm)
            self.convs.append(_Conv(name, reads, writes, conv.stride, conv.padding, concat))

        add("stem", base.stem_conv, base.stem_bn, None, base.stem_unit, True)
        self.block_convs: list[tuple[int, ...]] = []  # per running block: indices into self.convs
        for index, (block, units) in enumerate(zip(base.basic_blocks, base.block_units, strict=True)):
            if not subnet[units.mid]:
                continue
            first = len(self.convs)
            concat = plan.concat[index]
            add(f"blocks.{index}.conv1", block.conv1, block.bn1, units.reads, units.mid, concat)
            add(f"blocks.{index}.conv2", block.conv2, block.bn2, units.mid, units.writes, concat)
            identity = block.shortcut_conv is None or block.shortcut_bn is None
            if not identity:
                assert block.shortcut_conv is not None and block.shortcut_bn is not None
                add(
                    f"blocks.{index}.shortcut",
                    block.shortcut_conv,
                    block.shortcut_bn,
                    units.reads,
                    units.writes,
                    concat,
                )
            self._identity.append(identity)
            self.block_convs.append(tuple(range(first, len(self.convs))))
        ends = plan.ends(base.last_stream_unit)
        fc_weight, fc_bias = base.fc.weight.detach(), base.fc.bias.detach()
        self.heads = [nn.Linear(end, self.num_classes) for end in ends]
        for head, end in zip(self.heads, ends, strict=True):
            head.weight.data.copy_(fc_weight[:, :end])
            head.bias.data.copy_(fc_bias)
        self.classifiers = nn.ModuleList(self.heads)
        for index, conv in enumerate(self.convs):
            self.register_buffer(f"mask_{index}", self._mask(conv), persistent=False)

    def _mask(self, conv: _Conv) -> Tensor:
        """1 where stage(out) may read in: same stage, or an earlier one at a concat layer."""
        out_stage = _stage_of_channels(self.plan.splits[conv.writes])
        if conv.reads is None:
            return torch.ones(out_stage.shape[0], 1, 1, 1)
        in_stage = _stage_of_channels(self.plan.splits[conv.reads])
        allowed = (
            (out_stage[:, None] >= in_stage[None, :]) if conv.concat else (out_stage[:, None] == in_stage[None, :])
        )
        return allowed.float()[:, :, None, None]

    def conv_weight(self, index: int) -> Tensor:
        return self.weights[self.convs[index].name.replace(".", "_")] * getattr(self, f"mask_{index}")

    def _conv_bn(self, x: Tensor, index: int, norm: NormMode) -> Tensor:
        conv = self.convs[index]
        y = F.conv2d(x, self.conv_weight(index), None, conv.stride, conv.padding)
        return self._norm_list[index](y, norm)

    def forward(self, x: Tensor, norm: NormMode = batch_stats_norm) -> list[Tensor]:
        """Logits of every stage, first to last."""
        x = F.relu(self._conv_bn(x, 0, norm))
        for convs, identity in zip(self.block_convs, self._identity, strict=True):
            y = F.relu(self._conv_bn(x, convs[0], norm))
            y = self._conv_bn(y, convs[1], norm)
            x = F.relu(y + (x if identity else self._conv_bn(x, convs[2], norm)))
        pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return [head(pooled[:, : head.in_features]) for head in self.heads]

    @torch.no_grad()
    def materialize(self, bn_stats: BNStats) -> StagedResNet:
        """The served form: per stage, its own contiguous slices with batch norm folded in."""
        stages = []
        for stage in range(self.plan.stages):
            convs = []
            for conv, norm in zip(self.convs, self._norm_list, strict=True):
                out_lo, out_hi = _range(self.plan.ends(conv.writes), stage)
                if conv.reads is None:
                    in_lo, in_hi = 0, self.input_shape[0]
                else:
                    in_lo, in_hi = _range(self.plan.ends(conv.reads), stage)
                    if conv.concat:
                        in_lo = 0
                key = conv.name.replace(".", "_")
                try:
                    mean, var = bn_stats[conv.name]
                except KeyError:
                    raise KeyError(f"bn_stats has no entry for layer {conv.name!r}; calibrate first") from None
                weight, bias = fold_batch_norm(
                    self.weights[key][out_lo:out_hi, in_lo:in_hi],
                    norm.weight[out_lo:out_hi],
                    norm.bias[out_lo:out_hi],
                    mean[out_lo:out_hi].to(norm.weight),
                    var[out_lo:out_hi].to(norm.weight),
                    norm.eps,
                )
                static = nn.Conv2d(in_hi - in_lo, out_hi - out_lo, weight.shape[-1], conv.stride, conv.padding)
                static.weight = nn.Parameter(weight, requires_grad=False)
                static.bias = nn.Parameter(bias, requires_grad=False)
                convs.append(static)
            head = self.heads[stage]
            fc = nn.Linear(head.in_features, self.num_classes)
            fc.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            fc.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=False)
            stages.append(_StageModule(convs, fc))
        concat = [self.convs[c[0]].concat for c in self.block_convs]
        return StagedResNet(stages, self.block_convs, self._identity, concat, self.input_shape)


def _stage_of_channels(split: Sequence[int]) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(split)), torch.tensor(split))


def _range(ends: Sequence[int], stage: int) -> tuple[int, int]:
    return (ends[stage - 1] if stage else 0), ends[stage]


class _StageModule(nn.Module):
    def __init__(self, convs: list[nn.Conv2d], fc: nn.Linear) -> None:
        super().__init__()
        self.layers = list(convs)  # typed view; ModuleList registers them
        self.convs = nn.ModuleList(convs)
        self.fc = fc


@dataclass
class StageState:
    """What stages ``< s`` computed for a batch, kept where a later stage reads it.

    ``features[p]`` is the concatenation, over the stages run so far, of the feature map at
    position ``p`` (0 = stem output, then per block its inner map and its output); None where no
    later stage reads it. ``pooled`` is the pooled last feature map, over the stages run so far.
    """

    stages_run: int
    features: list[Tensor | None]
    pooled: Tensor

    def select(self, rows: Tensor) -> StageState:
        """The state of a subset of the batch (the requests that go on to the next stage)."""
        return StageState(
            self.stages_run,
            [None if f is None else f.index_select(0, rows) for f in self.features],
            self.pooled.index_select(0, rows),
        )


# (rows still going, by their index in the batch; the stage about to run) -> which of them may run it
ContinueCheck = Callable[[Tensor, int], Tensor]


@dataclass(frozen=True)
class Exits:
    """Per image of a batch run with exits: the answering stage's logits, confidence and index."""

    logits: Tensor
    confidence: Tensor  # top softmax probability of the answering stage
    stage: Tensor  # 0-based
    cut_short: Tensor  # answered early because going on would have missed its deadline


class StagedResNet(nn.Module):
    """A multi-stage network as served: ``run_stage`` runs the next stage over a batch, reusing ``state``.

    Example:
        >>> logits, state = staged.run_stage(images)          # stage 1
        >>> logits, state = staged.run_stage(images, state)   # stage 2: only its own slices run
    """

    def __init__(
        self,
        stages: list[_StageModule],
        block_convs: list[tuple[int, ...]],
        identity: list[bool],
        concat: list[bool],
        input_shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.stage_list = list(stages)  # typed view; ModuleList registers them
        self.stages = nn.ModuleList(stages)
        self.block_convs = [tuple(c) for c in block_convs]
        self.identity = list(identity)
        self.concat = list(concat)
        self.input_shape = input_shape
        # positions: 0 = stem out, 1 + 2b = block b's inner map, 2 + 2b = block b's output.
        # A later stage reads earlier stages' maps only as the input of a concat block.
        keep = [False] * (1 + 2 * len(block_convs))
        for block, concat_here in enumerate(self.concat):
            if concat_here:
                keep[2 * block] = True  # the block's input
                keep[1 + 2 * block] = True  # its inner map
        self.keep = keep
        self.eval()
        self.out_sizes = self._conv_output_sizes()

    @torch.no_grad()
    def _conv_output_sizes(self) -> list[tuple[int, int]]:
        """Spatial size of each convolution's output (the same at every stage), from one dry run."""
        sizes: dict[int, tuple[int, int]] = {}

        def recorder(index: int) -> Callable[[nn.Module, object, Tensor], None]:
            def hook(_module: nn.Module, _inputs: object, out: Tensor) -> None:
                sizes[index] = (out.shape[-2], out.shape[-1])

            return hook

        convs = self.stage_list[0].layers
        hooks = [conv.register_forward_hook(recorder(index)) for index, conv in enumerate(convs)]
        try:
            self.run_stage(torch.zeros(1, *self.input_shape, dtype=self.stage_list[0].fc.weight.dtype))
        finally:
            for hook in hooks:
                hook.remove()
        return [sizes[index] for index in range(len(convs))]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def train(self, mode: bool = True) -> StagedResNet:
        if mode:
            raise RuntimeError("a materialized multi-stage network is inference-only: its batch norm is folded away")
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        """Every stage in turn; the last stage's logits (the multi-stage network at full cost)."""
        logits, state = self.run_stage(x)
        while state.stages_run < self.num_stages:
            logits, state = self.run_stage(x, state)
        return logits

    def run_with_exits(
        self,
        images: Tensor,
        thresholds: Sequence[float],
        last: int | None = None,
        may_continue: ContinueCheck | None = None,
    ) -> Exits:
        """Answer each image at the first stage whose top softmax probability reaches its threshold.

        The batch shrinks as images leave; the rest go on with their reused features. ``last``
        (default: the last stage) answers whatever is left. Before each later stage,
        ``may_continue(rows, stage)`` may stop some rows (their deadline would pass): they are
        answered at once with the stage they reached (anytime), and ``cut_short`` says so.
        """
        if len(thresholds) != self.num_stages - 1:
            raise ValueError(f"{self.num_stages} stages need {self.num_stages - 1} thresholds, got {len(thresholds)}")
        last = self.num_stages - 1 if last is None else last
        if not 0 <= last < self.num_stages:
            raise ValueError(f"last stage must be in 0..{self.num_stages - 1}, got {last}")
        count = images.shape[0]
        answer = torch.empty(count, self.stage_list[-1].fc.out_features, dtype=images.dtype, device=images.device)
        confidence = torch.empty(count, dtype=images.dtype, device=images.device)
        answered_by = torch.full((count,), last, dtype=torch.int64, device=images.device)
        cut_short = torch.zeros(count, dtype=torch.bool, device=images.device)
        rows = torch.arange(count, device=images.device)
        state: StageState | None = None
        for stage in range(last + 1):
            logits, state = self.run_stage(images, state)
            top = torch.softmax(logits, 1).amax(1)
            leaving = top >= thresholds[stage] if stage < last else torch.ones_like(top, dtype=torch.bool)
            if stage < last and may_continue is not None:
                stopped = ~leaving & ~may_continue(rows, stage + 1)
                cut_short[rows[stopped]] = True
                leaving |= stopped
            answer[rows[leaving]] = logits[leaving]
            confidence[rows[leaving]] = top[leaving]
            answered_by[rows[leaving]] = stage
            going_on = (~leaving).nonzero().squeeze(1)
            if going_on.numel() == 0:
                break
            rows, images, state = rows[going_on], images[going_on], state.select(going_on)
        return Exits(answer, confidence, answered_by, cut_short)

    def run_stage(self, images: Tensor, state: StageState | None = None) -> tuple[Tensor, StageState]:
        """Run the next stage on ``images`` (the same rows ``state`` was computed for)."""
        stage = 0 if state is None else state.stages_run
        if stage >= self.num_stages:
            raise ValueError(f"all {self.num_stages} stages have run already")
        if state is not None and state.pooled.shape[0] != images.shape[0]:
            raise ValueError(f"state is for {state.pooled.shape[0]} images, got {images.shape[0]}")
        module = self.stage_list[stage]
        convs = module.layers
        previous = None if state is None else state.features
        features: list[Tensor | None] = []

        def joined(position: int, new: Tensor) -> Tensor:
            if previous is None or previous[position] is None:
                return new
            earlier = previous[position]
            assert earlier is not None
            return torch.cat((earlier, new), 1)

        own = F.relu(convs[0](images))
        full = joined(0, own) if self.keep[0] else own
        features.append(full if self.keep[0] else None)
        for block, (indices, identity, concat) in enumerate(
            zip(self.block_convs, self.identity, self.concat, strict=True)
        ):
            source = full if concat else own
            mid_own = F.relu(convs[indices[0]](source))
            mid = joined(1 + 2 * block, mid_own) if concat else mid_own
            features.append(mid if self.keep[1 + 2 * block] else None)
            shortcut = own if identity else convs[indices[2]](source)
            own = F.relu(convs[indices[1]](mid) + shortcut)
            output = 2 + 2 * block
            full = joined(output, own) if self.keep[output] else own
            features.append(full if self.keep[output] else None)
        pooled_own = torch.flatten(F.adaptive_avg_pool2d(own, 1), 1)
        pooled = pooled_own if state is None else torch.cat((state.pooled, pooled_own), 1)
        return module.fc(pooled), StageState(stage + 1, features, pooled)

    def stage_flops(self, stage: int) -> int:
        """FLOPs of running stage ``stage`` after the earlier ones, for one image (multiply-add = 2).

        Counted from the slices that stage holds: what it reuses costs nothing.
        """
        module = self.stage_list[stage]
        total = 2 * module.fc.in_features * module.fc.out_features
        for conv, (height, width) in zip(module.layers, self.out_sizes, strict=True):
            total += (
                2 * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * height * width
            )
        return total


class ExitCapped(nn.Module):
    """One row of a multi-stage table as a plain module: stages up to ``last`` with exits, logits out.

    What the runtime warms up and profiles; serving with deadlines calls
    :meth:`StagedResNet.run_with_exits` on ``staged`` directly.
    """

    def __init__(self, staged: StagedResNet, thresholds: Sequence[float], last: int) -> None:
        super().__init__()
        self.staged = staged
        self.thresholds = tuple(thresholds)
        self.last = last

    def forward(self, x: Tensor) -> Tensor:
        return self.staged.run_with_exits(x, self.thresholds, self.last).logits
