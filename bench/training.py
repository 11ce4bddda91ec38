"""A plain optimisation loop shared by teacher training and the gradient-based methods.

One loop, configured by a typed :class:`TrainConfig`: optimiser by name, a step-decay schedule
given in *epochs* (as papers give it) and converted to iterations, and a step function that returns
a dict of named losses (mdistiller-style) whose ``"loss"`` entry is back-propagated. Logging syncs
with the device only every ``log_every`` iterations. Given a method's context, the loop runs through
``ctx.steps`` (caps, anytime curve, checkpoints; the optimiser and scheduler are tracked) and
:func:`fit_schedule` fits the schedule to the cell's compute caps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import torch

from bench.config import ConfigError
from bench.method import MethodConfig


@dataclass
class TrainConfig(MethodConfig):
    """Optimiser and schedule. ``epochs`` and ``milestones`` are the paper's; the grid's budget scales both."""

    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 10
    iters_per_epoch: int = 0  # 0: one pass over the dataset's training split at batch_size
    milestones: list[int] = field(default_factory=list)  # epochs at which lr *= lr_decay
    lr_decay: float = 0.1

    def validate(self) -> None:
        super().validate()
        for name in ("lr", "batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.iters_per_epoch < 0:
            raise ConfigError(f"iters_per_epoch must be >= 0, got {self.iters_per_epoch}")
        if any(m <= 0 or m >= self.epochs for m in self.milestones):
            raise ConfigError(f"milestones {self.milestones} must lie strictly between 0 and epochs={self.epochs}")


_OPTIMIZERS: dict[str, Callable[[Iterable, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
}


def make_optimizer(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    return _OPTIMIZERS[cfg.optimizer](params, cfg)


@dataclass(frozen=True)
class Schedule:
    """Iteration counts after the budget: ``total`` iterations, lr decays at ``milestones``."""

    total: int
    iters_per_epoch: int
    milestones: tuple[int, ...]

    @property
    def epochs(self) -> int:
        return max(1, math.ceil(self.total / self.iters_per_epoch))

    def capped(self, total: int) -> "Schedule":
        """The same schedule squeezed into ``total`` iterations (milestones scaled with it)."""
        if total >= self.total:
            return self
        scale = total / self.total
        return Schedule(total=total, iters_per_epoch=self.iters_per_epoch,
                        milestones=tuple(max(1, round(m * scale)) for m in self.milestones))


def schedule(cfg: TrainConfig, budget: float, dataset_size: int) -> Schedule:
    """The paper's epochs x iterations-per-epoch, scaled by ``budget`` (milestones with them)."""
    per_epoch = cfg.iters_per_epoch or max(1, math.ceil(dataset_size / cfg.batch_size))
    total = max(1, round(cfg.epochs * per_epoch * budget))
    milestones = tuple(max(1, round(m * per_epoch * budget)) for m in cfg.milestones)
    return Schedule(total=total, iters_per_epoch=per_epoch, milestones=milestones)


def fit_schedule(ctx, cfg: TrainConfig, dataset_size: int, queries_per_step: float | None = None) -> Schedule:
    """A method's schedule: the paper's, scaled by the cell's budget fraction, then cut to its caps."""
    nominal = schedule(cfg, ctx.budget, dataset_size)
    return nominal.capped(ctx.plan_steps(nominal.total, queries_per_step))


def train(
    params: Iterable[torch.nn.Parameter],
    step: Callable[[int], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    plan: Schedule,
    *,
    log: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    log_every: int = 50,
    on_epoch_end: Callable[[int], None] | None = None,
    ctx=None,
    name: str = "train",
) -> None:
    """Run ``plan.total`` optimisation steps of ``step(iteration)``; ``log`` every ``log_every``.

    With ``ctx`` (a method's context) the steps come from ``ctx.steps(plan.total, name)``, the optimiser
    and scheduler are tracked for checkpoints, and ``log`` defaults to ``ctx.log``."""
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(plan.milestones), gamma=cfg.lr_decay)
    if ctx is not None:
        ctx.track(**{f"{name}_optimizer": optimizer, f"{name}_scheduler": scheduler})
        steps = ctx.steps(plan.total, name, log_every=log_every)
        log = log or ctx.log
    else:
        steps = range(1, plan.total + 1)
    if log is None:
        raise ValueError("train() needs log= or ctx=")
    for it in steps:
        losses = step(it)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        scheduler.step()
        if it % log_every == 0 or it == plan.total:
            log(it, {**losses, "lr": torch.tensor(scheduler.get_last_lr()[0])})
        if on_epoch_end is not None and (it % plan.iters_per_epoch == 0 or it == plan.total):
            on_epoch_end(it)
