"""Optimizers and learning-rate schedules by the name a spec gives them, registered the timm way.

`create_optimizer(spec, model)` and `create_scheduler(spec, optimizer)` are the only way in; a
factory registers itself under its name with `@register_optimizer` / `@register_scheduler`. The
names a spec accepts are contracts.plugins.OPTIMIZERS / SCHEDULERS, which tests/test_plugins.py
checks against these registries. An unknown name is refused with the choices, never replaced by
a default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from contracts.spec import ExperimentSpec

OptimizerFactory = Callable[[ExperimentSpec, list[torch.nn.Parameter]], torch.optim.Optimizer]
# (spec, optimizer, epochs after warmup) -> the per-epoch schedule
SchedulerFactory = Callable[[ExperimentSpec, torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]

OPTIMIZERS: dict[str, OptimizerFactory] = {}
SCHEDULERS: dict[str, SchedulerFactory] = {}


class UnknownName(ValueError):
    """A spec names an optimizer or schedule no factory is registered for."""


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Register an optimizer factory under `name` (the spec's `optimizer`)."""

    def add(factory: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = factory
        return factory

    return add


def register_scheduler(name: str) -> Callable[[SchedulerFactory], SchedulerFactory]:
    """Register a schedule factory under `name` (the spec's `scheduler`)."""

    def add(factory: SchedulerFactory) -> SchedulerFactory:
        SCHEDULERS[name] = factory
        return factory

    return add


@register_optimizer("sgd")
def sgd(spec: ExperimentSpec, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)


@register_optimizer("adam")
def adam(spec: ExperimentSpec, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


@register_optimizer("adamw")
def adamw(spec: ExperimentSpec, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=spec.lr, weight_decay=spec.weight_decay)


@register_scheduler("step")
def step(spec: ExperimentSpec, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.lr_decay_step, gamma=spec.lr_gamma)


@register_scheduler("cosine")
def cosine(spec: ExperimentSpec, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def _factory(kind: str, name: str, registry: dict[str, Callable]) -> Callable:
    try:
        return registry[name]
    except KeyError:
        raise UnknownName(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(registry))}") from None


def create_optimizer(spec: ExperimentSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer over the model's trainable parameters."""
    parameters: Iterable[torch.nn.Parameter] = model.parameters()
    return _factory("optimizer", spec.optimizer, OPTIMIZERS)(spec, [p for p in parameters if p.requires_grad])


def create_scheduler(spec: ExperimentSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The spec's per-epoch schedule, after `warmup_epochs` of linear warmup when asked for."""
    main = _factory("scheduler", spec.scheduler, SCHEDULERS)(spec, optimizer, spec.epochs - spec.warmup_epochs)
    if spec.warmup_epochs == 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1 / (spec.warmup_epochs + 1), total_iters=spec.warmup_epochs
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[spec.warmup_epochs])
