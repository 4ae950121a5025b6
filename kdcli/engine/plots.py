"""PNG pictures of a run: loss and metric curves from results.csv, and predictions drawn beside ground truth."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def colour(label: int) -> tuple[int, int, int]:
    return PALETTE[int(label) % len(PALETTE)]


def plot_results(csv_path: Path, out_path: Path) -> None:
    """One panel per loss term, plus mAP50 and mAP50-95, against epochs."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k.startswith("loss_") or k in ("mAP50", "mAP50-95")]
    n = len(keys)
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3 * ((n + cols - 1) // cols)),
                             squeeze=False)
    epochs = [int(r["epoch"]) for r in rows]
    for ax, k in zip(axes.flat, keys):
        ys = [float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]
        ax.plot(epochs, ys, marker="o", ms=3)
        ax.set_title(k)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def draw(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, classes: list[str],
         scores: np.ndarray | None = None, gt: np.ndarray | None = None) -> Image.Image:
    """Ground truth in white (thin), predictions in class colours with class name and score."""
    im = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))
    d = ImageDraw.Draw(im)
    for b in (gt if gt is not None else []):
        d.rectangle([float(v) for v in b], outline=(255, 255, 255), width=1)
    for i, (b, c) in enumerate(zip(boxes, labels)):
        d.rectangle([float(v) for v in b], outline=colour(c), width=2)
        text = classes[int(c)] + (f" {scores[i]:.2f}" if scores is not None else "")
        d.text((float(b[0]) + 1, max(0.0, float(b[1]) - 10)), text, fill=colour(c))
    return im


def prediction_grid(samples: list[dict[str, Any]], classes: list[str], out_path: Path, conf: float = 0.3) -> None:
    """Up to 8 images: predictions above `conf` (colour) over ground truth (white), saved to `out_path`."""
    grid = prediction_image(samples, classes, conf)
    if grid is not None:
        grid.save(out_path)


def prediction_image(samples: list[dict[str, Any]], classes: list[str], conf: float = 0.3) -> Image.Image | None:
    if not samples:
        return None
    tiles = []
    for s in samples[:8]:
        keep = s["scores"] >= conf
        tiles.append(draw(s["image"], s["pred"][keep], s["pred_labels"][keep], classes, s["scores"][keep], s["gt"]))
    w, h = tiles[0].size
    cols = min(4, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * w, (i // cols) * h))
    return grid
