"""What one epoch of training reports: the trainer hands it to its callback, the metrics CSV and W&B.

The worker writes it into the job's meta (`progress`) and a search's pruner reads its metric, so
it is a contract between the trainer and everything above it: plain data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EpochReport:
    """What one epoch did; sent to `on_epoch`, the metrics CSV and W&B."""

    epoch: int  # 1-based
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_f1: float
    lr: float
    seconds: float
    best_val_f1: float
    best_epoch: int
    eta_seconds: float
    train_seconds: float = 0.0  # the training pass alone
    data_seconds: float = 0.0  # of which the loop waited for batches (and prepared them on the device)
    store_pending: int = 0  # uploads to the run store not yet durable when the epoch ended
