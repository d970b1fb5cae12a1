"""Which channel groups matter: trainable noise ranking (Yang et al.), a weight-norm baseline, and
the channel permutation that puts the important groups first.

A slimmable network keeps a *prefix* of each unit's channels, so the order of channels decides
which ones a narrow subnet keeps. Ranking scores each channel group of each unit; permuting moves
the best groups to the front, applying the same permutation to every tensor axis indexed by that
unit (producers and consumers alike) so the full-width network computes exactly the same function.

Trainable noise ranking: every group ``g`` of unit ``u`` gets a learnable scale ``alpha[u][g]``
multiplying Gaussian noise added to the weights that produce the group (noise std proportional to
the layer's weight std). Training the scales with ``task loss - reward * mean(log alpha)`` pushes
each scale as high as the loss tolerates: groups that tolerate large noise matter least.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from slimserve.models.registry import Supernet

RANKINGS = ("identity", "weight-norm", "noise")


def _unit_groups(supernet: Supernet, unit_index: int) -> int:
    unit = supernet.space.units[unit_index]
    return unit.max_channels // supernet.space.group_size


def _producer_weights(supernet: Supernet, unit_index: int) -> list[str]:
    """Names of the conv / linear weights whose output channels are this unit's (not BN affine)."""
    params = dict(_named_parameters(supernet))
    return [a.parameter for a in supernet.channel_axes(unit_index) if a.produces and params[a.parameter].dim() > 1]


def _named_parameters(supernet: Supernet) -> Iterator[tuple[str, nn.Parameter]]:
    assert isinstance(supernet, nn.Module)
    return supernet.named_parameters()


def weight_norm_importance(supernet: Supernet) -> list[Tensor]:
    """Per unit, per group: L1 norm of the producing weights, each layer normalized by its mean (baseline)."""
    params = dict(_named_parameters(supernet))
    group = supernet.space.group_size
    scores = []
    for unit_index in range(len(supernet.space.units)):
        total = torch.zeros(_unit_groups(supernet, unit_index))
        for name in _producer_weights(supernet, unit_index):
            per_channel = params[name].detach().abs().flatten(1).sum(1).cpu()
            total += (per_channel / per_channel.mean()).reshape(-1, group).sum(1)
        scores.append(total)
    return scores


@dataclass(frozen=True)
class NoiseRankingConfig:
    steps: int = 60
    batch_size: int = 64
    learning_rate: float = 0.05  # Adam on log(alpha)
    reward: float = 0.05  # weight of the -mean(log alpha) term: how hard noise is pushed up
    initial_alpha: float = 0.1


def noise_importance(
    supernet: Supernet,
    images: Tensor,
    labels: Tensor,
    config: NoiseRankingConfig,
    seed: int = 0,
    progress: bool = False,
) -> list[Tensor]:
    """Per unit, per group: ``-log(alpha)`` after training the noise scales (higher = more important).

    The supernet's weights are not changed; only the noise scales are trained, at full width, with
    batch statistics (as in training).
    """
    assert isinstance(supernet, nn.Module)
    generator = torch.Generator().manual_seed(seed)
    params = {name: p.detach() for name, p in supernet.named_parameters()}
    device = next(iter(params.values())).device
    units = range(len(supernet.space.units))
    log_alpha = [
        torch.full(
            (_unit_groups(supernet, u),),
            float(torch.log(torch.tensor(config.initial_alpha))),
            device=device,
            requires_grad=True,
        )
        for u in units
    ]
    producers = {u: _producer_weights(supernet, u) for u in units}
    weight_std = {name: params[name].std() for names in producers.values() for name in names}
    optimizer = torch.optim.Adam(log_alpha, lr=config.learning_rate)
    group = supernet.space.group_size
    largest = supernet.space.largest()
    was_training = supernet.training
    supernet.train()
    rng = random.Random(seed)
    try:
        for _ in tqdm(range(config.steps), disable=not progress, desc="noise ranking", unit="step", leave=False):
            batch = torch.tensor(rng.sample(range(images.shape[0]), min(config.batch_size, images.shape[0])))
            noisy = dict(params)
            for u in units:
                per_channel = log_alpha[u].exp().repeat_interleave(group)
                for name in producers[u]:
                    weight = noisy[name]
                    noise = torch.randn(weight.shape, generator=generator).to(device)
                    scale = per_channel.reshape(-1, *([1] * (weight.dim() - 1))) * weight_std[name]
                    noisy[name] = weight + scale * noise
            logits = functional_call(supernet, noisy, (images[batch], largest))
            reward = torch.cat(log_alpha).mean()
            loss = F.cross_entropy(logits, labels[batch]) - config.reward * reward
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        supernet.train(was_training)
    return [-a.detach().cpu() for a in log_alpha]


def permutation_from_importance(importance: Tensor, group_size: int) -> Tensor:
    """Channel order that lists groups by decreasing importance (channels inside a group keep their order).

    Ties keep the current order, so an all-equal ranking is the identity.
    """
    order = sorted(range(importance.shape[0]), key=lambda g: (-float(importance[g]), g))
    return torch.cat([torch.arange(g * group_size, (g + 1) * group_size) for g in order])


@torch.no_grad()
def permute_unit(supernet: Supernet, unit_index: int, order: Tensor) -> None:
    """Reorder one unit's channels in place across every producer and consumer tensor."""
    params = dict(_named_parameters(supernet))
    for axis in supernet.channel_axes(unit_index):
        param = params[axis.parameter]
        param.copy_(param.index_select(axis.axis, order.to(param.device)))


def apply_ranking(supernet: Supernet, importance: list[Tensor]) -> None:
    for unit_index, scores in enumerate(importance):
        permute_unit(supernet, unit_index, permutation_from_importance(scores, supernet.space.group_size))


def identity_importance(supernet: Supernet) -> list[Tensor]:
    """The training order itself: earlier groups were in more subnets during training."""
    return [torch.arange(_unit_groups(supernet, u), 0, -1).float() for u in range(len(supernet.space.units))]
