"""Pure PyTorch side of runyard: spec, data, augmentation, models, losses, training, inference.

Importing this package is cheap; modules that need torch import it themselves, so the publisher
can use `trainer.spec` on a box without torch.
"""
