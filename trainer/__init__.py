"""Pure PyTorch side of runyard: data, augmentation, models, losses, training, inference.

What it trains is a contracts.spec.ExperimentSpec. Importing this package is cheap; modules that
need torch import it themselves.
"""
