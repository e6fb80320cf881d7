"""Pictures of a run: confusion matrix, per-class F1 bars and a grid of validation predictions.

PNG files under <run dir>/pictures/, drawn on matplotlib Figures with the Agg canvas: no display,
and no pyplot global state shared between runs. The trainer also logs them to W&B as images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from trainer.data import Sample
from trainer.metrics import per_class_f1

GRID_IMAGES = 16
CELL_SIZE = (240, 300)  # width, height of one photo's cell in the prediction grid, in pixels


def save_confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str], path: Path) -> Path:
    """Rows are true classes, columns predictions; cells show counts, colour the row's share."""
    counts = matrix.to(torch.float64)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.45 * len(class_names) + 2)
    figure = Figure(figsize=(size + 1, size))
    axes = figure.subplots()
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=90, fontsize=7)
    axes.set_yticks(ticks, class_names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in ticks:
        for column in ticks:
            value = int(matrix[row, column])
            if value:
                colour = "white" if shares[row, column] > 0.5 else "black"
                axes.text(column, row, str(value), ha="center", va="center", fontsize=6, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    axes.set_title("validation confusion matrix")
    return _save(figure, path)


def save_per_class_f1(matrix: torch.Tensor, class_names: Sequence[str], path: Path) -> Path:
    """One bar per class: its F1 on the validation split, with the macro F1 as a line."""
    scores = per_class_f1(matrix).numpy()
    present = (matrix.sum(dim=0) + matrix.sum(dim=1)) > 0
    figure = Figure(figsize=(max(6.0, 0.4 * len(class_names) + 2), 4))
    axes = figure.subplots()
    axes.bar(range(len(class_names)), scores, color=["tab:blue" if p else "lightgray" for p in present.tolist()])
    macro = float(scores[present.numpy()].mean()) if bool(present.any()) else 0.0
    axes.axhline(macro, color="tab:red", linestyle="--", label=f"macro F1 {macro:.3f}")
    axes.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("F1")
    axes.legend(loc="lower right")
    axes.set_title("validation F1 per class")
    return _save(figure, path)


def save_prediction_grid(
    samples: Sequence[Sample],
    predictions: Sequence[int],
    class_names: Sequence[str],
    path: Path,
    count: int = GRID_IMAGES,
) -> Path:
    """Up to `count` validation photos spread over the split, titled true / predicted (red when wrong).

    The photos are pasted into one mosaic shown on a single axes: one axes per photo would
    cost matplotlib several times longer.
    """
    picks = _spread(len(samples), count)
    columns = min(4, max(1, len(picks)))
    rows = max(1, -(-len(picks) // columns))
    cell_w, cell_h, title_h = CELL_SIZE[0], CELL_SIZE[1], 40
    mosaic = Image.new("RGB", (columns * cell_w, rows * (cell_h + title_h)), "white")
    titles = []
    for slot, index in enumerate(picks):
        sample, predicted = samples[index], int(predictions[index])
        left, top = (slot % columns) * cell_w, (slot // columns) * (cell_h + title_h)
        with Image.open(sample.path) as photo:
            tile = ImageOps.contain(photo.convert("RGB"), (cell_w - 8, cell_h - 4))
        mosaic.paste(tile, (left + (cell_w - tile.width) // 2, top + title_h))
        colour = "tab:green" if predicted == sample.label else "tab:red"
        titles.append(
            (left + cell_w / 2, top + 4, f"true {class_names[sample.label]}\npred {class_names[predicted]}", colour)
        )
    figure = Figure(figsize=(mosaic.width / 100, mosaic.height / 100 + 0.4))
    axes = figure.add_axes((0, 0, 1, mosaic.height / (mosaic.height + 40)))
    axes.imshow(mosaic)
    axes.axis("off")
    for x, y, text, colour in titles:
        axes.text(x, y, text, ha="center", va="top", fontsize=8, color=colour)
    figure.suptitle("validation images: true / predicted")
    return _save(figure, path, tight=False)


def save_run_pictures(
    run_dir: Path,
    matrix: torch.Tensor,
    samples: Sequence[Sample],
    predictions: Sequence[int],
    class_names: Sequence[str],
) -> dict[str, Path]:
    """Write the three pictures of a run's best epoch; returns {name: png path}."""
    folder = Path(run_dir) / "pictures"
    return {
        "confusion_matrix": save_confusion_matrix(matrix, class_names, folder / "confusion_matrix.png"),
        "per_class_f1": save_per_class_f1(matrix, class_names, folder / "per_class_f1.png"),
        "val_predictions": save_prediction_grid(samples, predictions, class_names, folder / "val_predictions.png"),
    }


def _spread(total: int, count: int) -> list[int]:
    """`count` indexes evenly spread over range(total): different people, not one person's photos."""
    if total <= count or count < 2:
        return list(range(min(total, count)))
    return [round(step * (total - 1) / (count - 1)) for step in range(count)]


def _save(figure: Figure, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    if tight:
        figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
