"""xView: huge GeoTIFF scenes + one GeoJSON of boxes, cut into overlapping tiles (SAHI style).

The GeoJSON is streamed once (ijson) into a compact per-scene box list. Scenes are split into train/val
*before* tiling so that overlapping tiles never leak across splits. Workers tile one scene each, so memory
holds a few scenes' pixels at a time.
"""

from __future__ import annotations

import random
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ijson
import numpy as np
from PIL import Image

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.images import ImageDecodeError, place, probe
from kdcli.data.sources.common import SYNTHETIC_MARKER, Preset, clip_box, is_sliver, val_split
from kdcli.data.tally import Tally
from kdcli.data.tiling import tile_origins
from kdcli.errors import KdcliError

GEOJSON = "xView_train.geojson"
LABELS = "xview_class_labels.txt"
IMAGES_DIR = "train_images"
NOT_CLASSES = (75, 82)
VEHICLE_IDS = (17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28, 29, 32)
VEHICLE_NAMES = {17: "Passenger Vehicle", 18: "Small Car", 19: "Bus", 20: "Pickup Truck", 21: "Utility Truck",
                 23: "Truck", 24: "Cargo Truck", 25: "Truck w/Box", 26: "Truck Tractor", 27: "Trailer",
                 28: "Truck w/Flatbed", 29: "Truck w/Liquid", 32: "Crane Truck"}


def read_labels(path: Path) -> dict[int, str]:
    """`xview_class_labels.txt`: lines `<type_id>:<name>`."""
    names = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        tid, sep, name = line.partition(":")
        if not sep or not tid.strip().isdigit():
            raise KdcliError(f"{path}:{n}: expected '<type_id>:<name>', found '{line[:60]}'")
        names[int(tid)] = name.strip()
    return names


def preset(name: str, labels: dict[int, str]) -> Preset:
    """`vehicle` (one class, the paper's set), `vehicles` (each vehicle type its own class), `all`."""
    raw = {**VEHICLE_NAMES, **labels}
    if name == "vehicle":
        return Preset(name, ["vehicle"], dict.fromkeys(VEHICLE_IDS, "vehicle"), raw)
    if name == "vehicles":
        return Preset(name, [raw[i] for i in VEHICLE_IDS], {i: raw[i] for i in VEHICLE_IDS}, raw)
    if name == "all":
        if not labels:
            raise KdcliError(f"--classes all needs {LABELS} in the source folder")
        return Preset(name, [labels[i] for i in sorted(labels)], dict(labels), raw)
    raise KdcliError(f"unknown xView class preset '{name}'", hint="use vehicle, vehicles or all")


def read_geojson(path: Path, tally: Tally) -> dict[str, list[tuple[int, float, float, float, float]]]:
    """Stream the FeatureCollection once: scene file name -> [(type_id, x0, y0, x1, y1), ...]."""
    boxes: dict[str, list[tuple[int, float, float, float, float]]] = defaultdict(list)
    with open(path, "rb") as f:
        try:
            for i, feat in enumerate(ijson.items(f, "features.item", use_float=True)):
                props = feat.get("properties") or {}
                where = f"{path}: feature {i}"
                try:
                    scene = str(props["image_id"])
                    type_id = int(props["type_id"])
                    x0, y0, x1, y1 = (float(v) for v in str(props["bounds_imcoords"]).split(","))
                except (KeyError, ValueError, TypeError):
                    tally.add("feature without image_id/type_id/bounds_imcoords (skipped)", where)
                    continue
                if type_id in NOT_CLASSES:
                    tally.add(f"type_id {type_id} is not a class (dropped)", where)
                    continue
                boxes[scene].append((type_id, x0, y0, x1, y1))
        except ijson.JSONError as e:
            raise KdcliError(f"{path}: invalid GeoJSON ({e})") from None
    return boxes


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
    scene: str
    path: Path
    boxes: np.ndarray  # [N, 4] scene pixels, already clipped to the scene
    labels: list[int]
    raw: list[int]
    tile: int
    overlap: float
    min_visible: float
    keep_empty: float
    seed: int
    out_dir: Path


def tile_scene(job: SceneJob) -> list[dict[str, Any]]:
    """Cut one scene into tiles written as PNG; returns one record per kept tile."""
    with Image.open(job.path) as im:
        pixels = np.asarray(im.convert("RGB"))
    h, w = pixels.shape[:2]
    rng = random.Random(f"{job.seed}:{job.scene}")
    stem = Path(job.scene).stem
    records = []
    for y0 in tile_origins(h, job.tile, job.overlap):
        for x0 in tile_origins(w, job.tile, job.overlap):
            tw, th = min(job.tile, w - x0), min(job.tile, h - y0)
            kept = tile_boxes(job.boxes, x0, y0, tw, th, job.min_visible)
            if not kept and rng.random() >= job.keep_empty:
                continue
            name = f"{stem}_{x0}_{y0}.png"
            Image.fromarray(pixels[y0:y0 + th, x0:x0 + tw]).save(job.out_dir / name, compress_level=1)
            records.append({"file": name, "width": tw, "height": th, "x0": x0, "y0": y0, "scene": job.scene,
                            "boxes": [(job.labels[i], job.raw[i], b) for i, b in kept]})
    return records


def check_source(src: Path) -> None:
    if not src.is_dir():
        raise KdcliError(
            f"xView not found at {src}",
            hint=f"download the xView training images and labels (xview.org), put train_images/ and {GEOJSON} "
                 f"in {src}, or give --src / set KDCLI_DATASETS; for offline data run "
                 f"`kdcli prepare synthetic --kind xview`")
    for need in (src / IMAGES_DIR, src / GEOJSON):
        if not need.exists():
            raise KdcliError(f"{need}: missing", hint=f"an xView folder holds {IMAGES_DIR}/ and {GEOJSON}")


def prepare(src: Path, out: Path, tile: int = 512, overlap: float = 0.2, min_visible: float = 0.5,
            classes: str = "vehicle", val_fraction: float = 0.2, seed: int = 0, keep_empty: float = 0.1,
            workers: int = 0, images: str = "link", force: bool = False,
            skip_bad_images: bool = False) -> dict[str, Any]:
    """Convert raw xView into a tiled dataset dir at `out`; returns the dataset.yaml content."""
    check_source(src)
    if not 0 <= overlap < 1 or not 0 < min_visible <= 1 or not 0 <= keep_empty <= 1 or tile < 32:
        raise KdcliError("need 0 <= --overlap < 1, 0 < --min-visible <= 1, 0 <= --keep-empty <= 1, --tile >= 32")
    tally = Tally()
    labels = read_labels(src / LABELS) if (src / LABELS).is_file() else {}
    pre = preset(classes, labels)
    with console.err.status(f"reading {src / GEOJSON}"):
        raw_boxes = read_geojson(src / GEOJSON, tally)

    jobs: dict[str, SceneJob] = {}
    scene_sizes: dict[str, tuple[int, int]] = {}
    with atomic_dir(out, force) as tmp:
        (tmp / coco.IMAGES).mkdir(parents=True)
        for scene in console.track(sorted(raw_boxes), "checking scenes"):
            path = src / IMAGES_DIR / scene
            if not path.is_file():
                tally.add("scene referenced in the GeoJSON but absent (skipped)", scene)
                tally.add("boxes of absent scenes (skipped)", scene, n=len(raw_boxes[scene]))
                continue
            try:
                w, h = probe(path, decode=False)
            except ImageDecodeError as e:
                if not skip_bad_images:
                    raise
                tally.add("scene failed to open (skipped)", e.message)
                continue
            scene_sizes[scene] = (w, h)
            boxes, labs, raws = [], [], []
            for type_id, *xyxy in raw_boxes[scene]:
                label = pre.label(type_id)
                if label is None:
                    tally.add("box of a class outside the preset (dropped)")
                    continue
                box, clipped = clip_box(*xyxy, w, h)
                if is_sliver(box):
                    tally.add("box with no area inside the scene (dropped)", f"{scene}: {xyxy}")
                    continue
                if clipped:
                    tally.add("box clipped to the scene", f"{scene}: {xyxy}")
                boxes.append(box)
                labs.append(label)
                raws.append(type_id)
            jobs[scene] = SceneJob(scene, path, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labs, raws,
                                   tile, overlap, min_visible, keep_empty, seed, tmp / coco.IMAGES)
        unreferenced = {p.name for p in (src / IMAGES_DIR).glob("*.tif")} - set(raw_boxes)
        if unreferenced:
            tally.add("scene without any box in the GeoJSON (not used)", sorted(unreferenced)[0], n=len(unreferenced))
        if not jobs:
            raise KdcliError(f"{src}: no usable scene (none of the GeoJSON's images is in {IMAGES_DIR}/)")
        del raw_boxes

        train_scenes, val_scenes = val_split(sorted(jobs), val_fraction, seed)
        split_of = {**dict.fromkeys(train_scenes, "train"), **dict.fromkeys(val_scenes, "val")}
        for s in val_scenes:  # evaluation keeps every tile, empty or not
            jobs[s].keep_empty = 1.0
        builders = {s: coco.CocoBuilder(pre.classes, f"xView tiles {s}") for s in ("train", "val")}
        ordered = sorted(jobs.values(), key=lambda j: j.scene)
        results = _run(tile_scene, ordered, workers)
        for records in console.track(results, "tiling scenes", total=len(ordered)):
            for r in records:
                b = builders[split_of[r["scene"]]]
                image_id = len(b.images) + 1
                b.add_image(image_id, f"{coco.IMAGES}/{r['file']}", r["width"], r["height"],
                            origin={"scene": r["scene"], "x0": r["x0"], "y0": r["y0"]})
                for label, raw, box in r["boxes"]:
                    b.add_box(image_id, label, box, raw_class=raw)
        for b in builders.values():
            b.images.sort(key=lambda im: im["file_name"])
        scenes = coco.CocoBuilder(pre.classes, "xView val scenes (untiled)")
        for s in val_scenes:
            job = jobs[s]
            image_id = len(scenes.images) + 1
            place(job.path, tmp / coco.IMAGES / "scenes" / s, images)
            scenes.add_image(image_id, f"{coco.IMAGES}/scenes/{s}", *scene_sizes[s], scene=s)
            for box, label, raw in zip(job.boxes.tolist(), job.labels, job.raw):
                scenes.add_box(image_id, label, tuple(box), raw_class=raw)
        splits, counts = {}, {}
        for name, b in (*builders.items(), ("val_scenes", scenes)):
            b.write(tmp, name)
            splits[name] = {"images": len(b.images), "objects": len(b.annotations)}
            counts[name] = b.class_counts()
        meta = {
            "name": out.name, "source": "xview", "src": str(src.resolve()),
            "synthetic": (src / SYNTHETIC_MARKER).is_file(),
            "classes": pre.classes, "preset": classes, "class_mapping": [r for r in pre.describe() if r["objects"]],
            "tile": tile, "overlap": overlap, "min_visible": min_visible, "keep_empty": keep_empty,
            "val_fraction": val_fraction, "seed": seed, "scenes": {"train": train_scenes, "val": val_scenes},
            "images": sum(len(b.images) for b in builders.values()), "splits": splits, "class_counts": counts,
            "dropped": tally.as_dict(),
        }
        coco.write_dataset_yaml(tmp, meta)
    return meta


def _run(fn, jobs: list[SceneJob], workers: int):
    """Results of `fn` over `jobs` in order: in this process, or in `workers` processes."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(fn, jobs)
