"""Overlapping windows over large images, shared by the tiled sources (xView, DOTA) at preparation and by sliced
prediction: window origins, boxes clipped to a window with a minimum visible share, slivers dropped, a seeded
share of empty tiles kept, tiles written as PNG with their origin in the scene.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.data import coco
from kdcli.data.images import pil_image, place, read_rgb
from kdcli.data.sources.common import is_sliver

MIN_TILE = 32  # pixels: the smallest tile (prepare --tile) or window (predict --slice), one rule for both


def tile_origins(size: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis: a fixed stride, the last tile shifted back to end at the border."""
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def windows(width: int, height: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) windows covering the image row by row; edge windows end at the border, and an image
    smaller than `tile` is one window of its own size."""
    return [(x0, y0, min(x0 + tile, width), min(y0 + tile, height))
            for y0 in tile_origins(height, tile, overlap) for x0 in tile_origins(width, tile, overlap)]


def tile_boxes(boxes: np.ndarray, x0: int, y0: int, tw: int, th: int, min_visible: float) -> list[tuple[int, tuple]]:
    """Boxes of one tile: (index into `boxes`, box in tile coordinates) for boxes clipped to the tile that keep
    at least `min_visible` of their area and are not slivers."""
    if len(boxes) == 0:
        return []
    cx0 = np.clip(boxes[:, 0] - x0, 0, tw)
    cy0 = np.clip(boxes[:, 1] - y0, 0, th)
    cx1 = np.clip(boxes[:, 2] - x0, 0, tw)
    cy1 = np.clip(boxes[:, 3] - y0, 0, th)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    visible = (cx1 - cx0) * (cy1 - cy0)
    keep = (visible >= min_visible * area) & (visible > 0)
    out = []
    for i in np.flatnonzero(keep):
        box = (float(cx0[i]), float(cy0[i]), float(cx1[i]), float(cy1[i]))
        if not is_sliver(box):
            out.append((int(i), box))
    return out


@dataclass
class SceneJob:
    """One scene to cut: its boxes (scene pixels, clipped to it) with per-box values carried into the records
    (`labels`, `raw`: class label and raw class; `extra`: any per-box dict, e.g. DOTA's difficult flag)."""

    scene: str
    path: Path
    boxes: np.ndarray  # [N, 4]
    labels: list[int]
    raw: list[Any]
    tile: int
    overlap: float
    min_visible: float
    keep_empty: float
    seed: int
    out_dir: Path
    extra: list[dict[str, Any]] | None = None


def tile_scene(job: SceneJob) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Cut one scene into tiles written as PNG; returns one record per kept tile, and the scene's stretch to 8 bit
    (`kdcli.data.images.read_rgb`; None for an 8-bit scene). An empty tile is kept with probability `keep_empty`,
    seeded by scene so that reruns and worker counts give the same dataset."""
    pixels, stretch = read_rgb(job.path)
    h, w = pixels.shape[:2]
    rng = random.Random(f"{job.seed}:{job.scene}")
    stem = Path(job.scene).stem
    image = pil_image()
    records = []
    for x0, y0, x1, y1 in windows(w, h, job.tile, job.overlap):
        tw, th = x1 - x0, y1 - y0
        kept = tile_boxes(job.boxes, x0, y0, tw, th, job.min_visible)
        if not kept and rng.random() >= job.keep_empty:
            continue
        name = f"{stem}_{x0}_{y0}.png"
        image.fromarray(pixels[y0:y1, x0:x1]).save(job.out_dir / name, compress_level=1)
        records.append({"file": name, "width": tw, "height": th, "x0": x0, "y0": y0, "scene": job.scene,
                        "boxes": [(job.labels[i], job.raw[i], b, job.extra[i] if job.extra else {})
                                  for i, b in kept]})
    return records, stretch


def run_jobs(fn: Callable[[SceneJob], Any], jobs: Iterable[SceneJob], workers: int) -> Iterator[Any]:
    """Results of `fn` over `jobs` in order: in this process, or in `workers` processes."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, jobs)


def add_tiles(builders: dict[str, coco.CocoBuilder], split_of: dict[str, str],
              results: Iterable[tuple[list[dict[str, Any]], dict[str, Any] | None]]) -> dict[str, int]:
    """Tile records (`tile_scene`'s) into the builder of their scene's split, each tile with its origin in the
    scene (and its scene's stretch, if any); then each split ordered by file name (worker counts do not change the
    dataset). Returns the scenes stretched to 8 bit per dtype (see `kdcli.data.images.stretch_provenance`)."""
    stretched: dict[str, int] = {}
    for records, stretch in results:
        if stretch:
            stretched[stretch["dtype"]] = stretched.get(stretch["dtype"], 0) + 1
        for r in records:
            b = builders[split_of[r["scene"]]]
            image_id = len(b.images) + 1
            b.add_image(image_id, f"{coco.IMAGES}/{r['file']}", r["width"], r["height"],
                        origin={"scene": r["scene"], "x0": r["x0"], "y0": r["y0"]},
                        **({"stretch": stretch} if stretch else {}))
            for label, raw, box, extra in r["boxes"]:
                b.add_box(image_id, label, box, raw_class=raw, **extra)
    for b in builders.values():
        b.images.sort(key=lambda im: im["file_name"])
    return stretched


def untiled_scenes(jobs: list[SceneJob], sizes: dict[str, tuple[int, int]], dataset_dir: Path, images: str,
                   classes: list[str], description: str,
                   image_extra: dict[str, dict[str, Any]] | None = None) -> coco.CocoBuilder:
    """The `val_scenes` split: whole scenes placed under images/scenes/ with all their boxes, for whole-image
    evaluation (`kdcli predict --split val_scenes`)."""
    scenes = coco.CocoBuilder(classes, description)
    for job in jobs:
        image_id = len(scenes.images) + 1
        place(job.path, dataset_dir / coco.IMAGES / "scenes" / job.scene, images)
        scenes.add_image(image_id, f"{coco.IMAGES}/scenes/{job.scene}", *sizes[job.scene], scene=job.scene,
                         **(image_extra or {}).get(job.scene, {}))
        extras = job.extra or [{}] * len(job.labels)
        for box, label, raw, extra in zip(job.boxes.tolist(), job.labels, job.raw, extras):
            scenes.add_box(image_id, label, tuple(box), raw_class=raw, **extra)
    return scenes
