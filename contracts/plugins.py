"""The names of the plug-ins a spec or a search file may ask for, readable without torch or optuna.

Publishing validates a name against these tables; the worker builds the plug-in from the factory
registered under it. Each table is checked against its factory by tests/test_plugins.py, so a
name cannot be added on one side only.
"""

from __future__ import annotations

from typing import Literal, get_args

LOSSES = ("cross_entropy", "focal", "label_smoothing", "f1")  # trainer.losses.LOSS_FACTORIES
OPTIMIZERS = ("sgd", "adam", "adamw")  # trainer.optim.OPTIMIZERS
SCHEDULERS = ("step", "cosine")  # trainer.optim.SCHEDULERS
AUGMENTATIONS = ("base", "custom", "imgaug")  # trainer.augment.AUGMENTATIONS
DATASETS = ("mask", "image_folder")  # trainer.loaders
SearchMethodName = Literal["grid", "random", "bayes"]
SEARCH_METHODS: tuple[str, ...] = get_args(SearchMethodName)  # schedule_search.methods.METHODS
# `hyperband` is what a W&B sweep file means by it: one set of bands at min_iter * eta**k where a
# run below the top 1/eta stops (asynchronous successive halving). `hyperband_brackets` is Optuna's
# bracketed Hyperband. The worker's factories: worker.search_trial.PRUNER_FACTORIES.
PrunerName = Literal["hyperband", "successive_halving", "hyperband_brackets"]
PRUNERS: tuple[str, ...] = get_args(PrunerName)
# Early termination that pauses a run at each rung (its checkpoint kept) and promotes the best
# 1/eta of a rung to resume, instead of stopping runs through a pruner. The worker's table:
# worker.asha.PROMOTERS; the search side: schedule_search.methods.asha.
PromoterName = Literal["asha"]
PROMOTERS: tuple[str, ...] = get_args(PromoterName)
EARLY_TERMINATE_TYPES: tuple[str, ...] = PRUNERS + PROMOTERS
