"""The optimisation recipe of a run: the schedule after the linear scaling rule, the learning
rate at each iteration, the optimizer and its parameter groups, and the weights' moving average."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Schedule:
    """The run's schedule after the linear scaling rule for the actual batch size."""

    lr: float
    max_iter: int
    steps: list[int]
    warmup_iters: int


def describe_scaling(cfg, schedule: Schedule) -> str | None:
    """One line saying what the linear scaling rule changed, or None when nothing."""
    if cfg.batch_size == cfg.reference_batch_size:
        return None
    return (f"linear scaling rule: batch {cfg.batch_size} vs the config's reference batch "
            f"{cfg.reference_batch_size}: lr {cfg.base_lr:g} -> {schedule.lr:g}, max_iter {cfg.max_iter} -> "
            f"{schedule.max_iter}, steps {cfg.steps} -> {schedule.steps}, warmup_iters {cfg.warmup_iters} -> "
            f"{schedule.warmup_iters} (set train.reference_batch_size={cfg.batch_size} to keep them)")


def scaled_schedule(cfg) -> Schedule:
    """Scale lr by `batch / reference_batch` and iteration counts by the inverse
    (Goyal et al. 2017), so that a config written for batch 16 runs on any batch."""
    factor = cfg.batch_size / cfg.reference_batch_size
    return Schedule(
        lr=cfg.base_lr * factor,
        max_iter=max(1, round(cfg.max_iter / factor)),
        steps=[round(s / factor) for s in cfg.steps],
        warmup_iters=round(cfg.warmup_iters / factor),
    )


def lr_factor(iteration: int, schedule: Schedule, kind: str, gamma: float, warmup_factor: float) -> float:
    """Multiplier of the base lr at `iteration`: linear warmup, then step decay or cosine.

    A pure function of the iteration rather than a `torch.optim.lr_scheduler` object: a
    resumed run, and a time budget that shortens `max_iter`, get the right rate with no
    scheduler state to save or replay."""
    if kind == "step":
        factor = gamma ** sum(iteration >= s for s in schedule.steps)
    elif kind == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, schedule.max_iter) / schedule.max_iter))
    else:
        raise ValueError(f"unknown schedule {kind!r} (step or cosine)")
    if iteration < schedule.warmup_iters:
        alpha = iteration / schedule.warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW; normalisation parameters get `weight_decay_norm`."""
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (no_decay if isinstance(module, norm_types) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": cfg.weight_decay_norm}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        # one fused kernel per step instead of a dozen foreach passes over the parameters, which
        # weigh on a CPU step of a small model such as the demo's
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in decay + no_decay)
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (sgd or adamw)")


class ModelEMA:
    """Exponential moving average of the weights; `decay` ramps up over the first updates
    (`(1 + n) / (10 + n)`), so early averages are not dominated by the random start.

    Not `torch.optim.swa_utils.AveragedModel`: that one averages with a fixed decay and adds an
    `n_averaged` buffer, so its state dict is not the model's; ours is, and a checkpoint's
    weights are the averaged model as it is."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current = [], []
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:
                averaged.append(ema_v)
                current.append(v)
            else:
                ema_v.copy_(v)  # BatchNorm's batch counters
        torch._foreach_lerp_(averaged, current, 1 - d)  # one kernel per dtype and device, not one per tensor
