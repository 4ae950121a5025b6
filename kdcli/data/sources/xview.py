"""xView: huge GeoTIFF scenes + one GeoJSON of boxes, cut into overlapping tiles (SAHI style).

The GeoJSON is streamed once (ijson) into a compact per-scene box list. Scenes are split into train/val
*before* tiling so that overlapping tiles never leak across splits. Workers tile one scene each, so memory
holds a few scenes' pixels at a time.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.images import say_stretch, stretch_provenance
from kdcli.data.sources import FORCE, LINK, SEED, SKIP_BAD, Option, Source, Synthetic, calling, register
from kdcli.data.sources.common import (SYNTHETIC_MARKER, Preset, finite_box, fitted_box, probed_size, refuse_file,
                                      val_split)
from kdcli.data.tally import Tally
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
    import ijson

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
                if not finite_box((x0, y0, x1, y1), tally, where):
                    continue
                if type_id in NOT_CLASSES:
                    tally.add(f"type_id {type_id} is not a class (dropped)", where)
                    continue
                boxes[scene].append((type_id, x0, y0, x1, y1))
        except ijson.JSONError as e:
            raise KdcliError(f"{path}: invalid GeoJSON ({e})") from None
    return boxes


def check_source(src: Path) -> None:
    refuse_file(src, "--src")
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
    import numpy as np

    from kdcli.data.tiling import MIN_TILE, SceneJob, add_tiles, run_jobs, tile_scene, untiled_scenes

    check_source(src)
    if not 0 <= overlap < 1 or not 0 < min_visible <= 1 or not 0 <= keep_empty <= 1 or tile < MIN_TILE:
        raise KdcliError("need 0 <= --overlap < 1, 0 < --min-visible <= 1, 0 <= --keep-empty <= 1, "
                         f"--tile >= {MIN_TILE}")
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
            size = probed_size(path, tally, skip_bad_images, decode=False, what="scene", boxes=len(raw_boxes[scene]))
            if size is None:
                continue
            w, h = size
            scene_sizes[scene] = (w, h)
            boxes, labs, raws = [], [], []
            for type_id, *xyxy in raw_boxes[scene]:
                label = pre.label(type_id)
                if label is None:
                    tally.add("box of a class outside the preset (dropped)")
                    continue
                box = fitted_box(*xyxy, w, h, tally, f"{scene}: {xyxy}", "box with no area inside the scene (dropped)",
                                 "box clipped to the scene")
                if box is None:
                    continue
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
        results = run_jobs(tile_scene, ordered, workers)
        stretched = add_tiles(builders, split_of, console.track(results, "tiling scenes", total=len(ordered)))
        scenes = untiled_scenes([jobs[s] for s in val_scenes], scene_sizes, tmp, images, pre.classes,
                                "xView val scenes (untiled)")
        splits, counts = coco.write_splits(tmp, {**builders, "val_scenes": scenes})
        meta = {
            "name": out.name, "source": "xview", "src": str(src.resolve()),
            "synthetic": (src / SYNTHETIC_MARKER).is_file(),
            "classes": pre.classes, "preset": classes, "class_mapping": [r for r in pre.describe() if r["objects"]],
            "tile": tile, "overlap": overlap, "min_visible": min_visible, "keep_empty": keep_empty,
            "val_fraction": val_fraction, "seed": seed, "scenes": {"train": train_scenes, "val": val_scenes},
            "images": sum(len(b.images) for b in builders.values()), "splits": splits, "class_counts": counts,
            "dropped": tally.as_dict(),
        }
        if stretched:
            meta["stretch"] = stretch_provenance(stretched, f"{coco.ANNOTATIONS}/train.json and val.json")
        coco.write_dataset_yaml(tmp, meta)
    if stretched:
        say_stretch(meta["stretch"], len(jobs))
    return meta


register(Source(
    name="xview", raw_dir="xView",
    title="Prepare xView: split scenes into train/val, tile them, keep the chosen vehicle classes.",
    example="kdcli prepare xview --tile 512 --overlap 0.2 --workers 8",
    src_help="Raw xView folder with train_images/ and xView_train.geojson", out_help="xview",
    options=(
        Option("tile", int, 512, "Tile side in pixels."),
        Option("overlap", float, 0.2, "Overlap between neighbouring tiles (fraction)."),
        Option("min_visible", float, 0.5, "Keep a box cut by a tile edge when at least this share of it is inside."),
        Option("classes", str, "vehicle", "Preset: vehicle (one class), vehicles (per type), all."),
        Option("val_fraction", float, 0.2, "Share of scenes (not tiles) for val."), SEED,
        Option("keep_empty", float, 0.1, "Share of empty training tiles kept."),
        Option("workers", int, 0, "Processes tiling scenes in parallel."), LINK, FORCE, SKIP_BAD),
    run=calling(prepare),
    out_name=lambda src, o: "xview",
    synthetic=Synthetic("kdcli.data.synthetic.xview", images=5, size=2000),
))
