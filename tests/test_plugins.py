"""Each plug-in name table in contracts.plugins is exactly the set of names its factory builds."""

from __future__ import annotations

from contracts import plugins
from trainer import augment, losses, spec


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
