"""What every check section is handed, and the small spec they train."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PARTIAL_FILE = "partial.json"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Context:
    """Where the data and a section's scratch space are, the device, and whether to go small."""

    device: str  # "cuda" or "cpu"
    quick: bool
    data_dir: Path
    work: Path

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def save_partial(self, figures: dict[str, Any]) -> None:
        """Figures so far, read by the parent if the section runs out of time."""
        (self.work / PARTIAL_FILE).write_text(json.dumps(figures, default=str))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tiny_spec(ctx: Context, run_name: str, **overrides: Any) -> dict[str, Any]:
    """A quick spec on the check's demo data: timm's smallest test model at 64x48."""
    return {
        "model": "test_efficientnet",
        "pretrained": False,
        "data_dir": str(ctx.data_dir / "train"),
        "resize": (64, 48),
        "epochs": 1,
        "batch_size": 32,
        "valid_batch_size": 128,
        "lr": 3e-3,
        "augmentation": "imgaug",
        "pictures": False,
        "device": ctx.device,
        "output_dir": str(ctx.work / "runs"),
        "run_name": run_name,
    } | overrides
