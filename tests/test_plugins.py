"""Each plug-in name table in contracts.plugins is exactly the set of names its factory builds."""

from __future__ import annotations

import pytest
import torch

from contracts import plugins, spec
from contracts.spec import ExperimentSpec
from trainer import augment, losses, optim


def test_loss_names_are_the_loss_factories():
    assert set(plugins.LOSSES) == set(losses.LOSS_FACTORIES)


def test_augmentation_names_are_the_augmentation_factories():
    assert set(plugins.AUGMENTATIONS) == set(augment.AUGMENTATIONS)


def test_the_spec_validates_against_the_same_tables():
    assert (spec.LOSSES, spec.AUGMENTATIONS, spec.OPTIMIZERS, spec.SCHEDULERS) == (
        plugins.LOSSES,
        plugins.AUGMENTATIONS,
        plugins.OPTIMIZERS,
        plugins.SCHEDULERS,
    )


def test_optimizer_and_scheduler_names_are_their_registries():
    assert set(plugins.OPTIMIZERS) == set(optim.OPTIMIZERS)
    assert set(plugins.SCHEDULERS) == set(optim.SCHEDULERS)


@pytest.mark.parametrize(
    ("field", "create", "message"),
    [
        (
            "optimizer",
            lambda s, m: optim.create_optimizer(s, m),
            "unknown optimizer 'lion': choose one of adam, adamw, sgd",
        ),
        (
            "scheduler",
            lambda s, m: optim.create_scheduler(s, torch.optim.SGD(m.parameters(), lr=0.1)),
            "unknown scheduler 'lion': choose one of cosine, step",
        ),
    ],
)
def test_an_unknown_optimizer_or_schedule_is_refused_with_the_choices_not_replaced(field, create, message):
    # The spec refuses the name first; a spec built around its validation must not train with Adam/StepLR.
    unchecked = ExperimentSpec.model_construct(**(ExperimentSpec(pretrained=False).model_dump() | {field: "lion"}))
    with pytest.raises(optim.UnknownName, match=message):
        create(unchecked, torch.nn.Linear(2, 2))


def test_each_registered_optimizer_and_schedule_builds():
    model = torch.nn.Linear(2, 2)
    for name in plugins.OPTIMIZERS:
        optimizer = optim.create_optimizer(ExperimentSpec(optimizer=name), model)
        for schedule in plugins.SCHEDULERS:
            scheduler = optim.create_scheduler(ExperimentSpec(scheduler=schedule, epochs=3, warmup_epochs=1), optimizer)
            assert isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR)


def test_search_method_and_pruner_names_are_their_registries():
    from schedule_search.methods import METHODS
    from worker.search_trial import PRUNER_FACTORIES

    assert set(plugins.SEARCH_METHODS) == set(METHODS)
    assert all(METHODS[name].name == name for name in METHODS)
    assert set(plugins.PRUNERS) == set(PRUNER_FACTORIES)


def test_promoter_names_are_their_registries_on_both_sides():
    from schedule_search.methods.asha import PROMOTERS as SEARCH_SIDE
    from worker.asha import PROMOTERS as WORKER_SIDE

    assert set(plugins.PROMOTERS) == set(SEARCH_SIDE) == set(WORKER_SIDE)
    assert set(plugins.EARLY_TERMINATE_TYPES) == set(plugins.PRUNERS) | set(plugins.PROMOTERS)
