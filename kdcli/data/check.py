"""`kdcli data check` and `kdcli data stats`: validate a dataset dir and describe what is in it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kdcli import console
from kdcli.data import coco
from kdcli.data.images import probe
from kdcli.errors import KdcliError

SMALL = 32 * 32  # COCO's small-object area, pixels
MEDIUM = 96 * 96


def split_files(dataset_dir: Path) -> list[Path]:
    files = sorted((dataset_dir / coco.ANNOTATIONS).glob("*.json"))
    if not files:
        raise KdcliError(f"{dataset_dir / coco.ANNOTATIONS}: no split files (*.json)")
    return files


def _load(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        problems.append(f"{path}:{e.lineno}: invalid JSON: {e.msg}")
        return None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            problems.append(f"{path}: missing '{key}' list")
            return None
    return data


def check(dataset_dir: Path, decode: bool = True) -> list[str]:
    """Every problem found, each naming its file and entry; an empty list means the dataset dir is sound."""
    meta = coco.read_dataset_yaml(dataset_dir)
    classes = list(meta["classes"])
    problems: list[str] = []
    sizes: dict[str, tuple[int, int, str]] = {}  # file_name -> declared (w, h) and where it was declared
    for path in split_files(dataset_dir):
        data = _load(path, problems)
        if data is None:
            continue
        if not classes and data["annotations"]:
            problems.append(f"{path}: {len(data['annotations'])} annotations in a dataset without classes (an "
                            "unlabelled pool holds images only)")
            continue
        cats = [(c.get("id"), c.get("name")) for c in data["categories"]]
        if cats != [(i + 1, n) for i, n in enumerate(classes)]:
            problems.append(f"{path}: categories {cats} differ from dataset.yaml classes {classes} (ids from 1)")
        image_ids: dict[Any, dict[str, Any]] = {}
        for n, im in enumerate(data["images"]):
            where = f"{path}: images[{n}]"
            iid = im.get("id")
            if not isinstance(iid, int) or iid < 1:
                problems.append(f"{where}: id must be an integer >= 1, got {iid!r}")
            elif iid in image_ids:
                problems.append(f"{where}: duplicate image id {iid}")
            image_ids[iid] = im
            fn, w, h = im.get("file_name"), im.get("width"), im.get("height")
            if not isinstance(fn, str) or not isinstance(w, int) or not isinstance(h, int) or w < 1 or h < 1:
                problems.append(f"{where}: needs file_name and positive integer width/height")
                continue
            prev = sizes.setdefault(fn, (w, h, where))
            if prev[:2] != (w, h):
                problems.append(f"{where}: {fn} declared {w}x{h} here but {prev[0]}x{prev[1]} at {prev[2]}")
        ann_ids: set[Any] = set()
        for n, a in enumerate(data["annotations"]):
            where = f"{path}: annotations[{n}]"
            aid = a.get("id")
            if not isinstance(aid, int) or aid < 1:
                problems.append(f"{where}: id must be an integer >= 1, got {aid!r}")
            elif aid in ann_ids:
                problems.append(f"{where}: duplicate annotation id {aid}")
            ann_ids.add(aid)
            if a.get("category_id") not in range(1, len(classes) + 1):
                problems.append(f"{where}: category_id {a.get('category_id')!r} is not in 1..{len(classes)}")
            im = image_ids.get(a.get("image_id"))
            if im is None:
                problems.append(f"{where}: image_id {a.get('image_id')!r} has no image entry")
                continue
            box = a.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                                    for v in box)):
                problems.append(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
                continue
            x, y, w, h = box
            if w <= 0 or h <= 0:
                problems.append(f"{where}: bbox {box} has no area")
            elif x < -0.5 or y < -0.5 or x + w > im["width"] + 0.5 or y + h > im["height"] + 0.5:
                problems.append(f"{where}: bbox {box} lies outside its {im['width']}x{im['height']} image")
    for fn, (w, h, where) in console.track(sorted(sizes.items()), "checking images"):
        try:
            actual = probe(dataset_dir / fn, decode=decode)
        except KdcliError as e:
            problems.append(f"{where}: {e.message}")
            continue
        if actual != (w, h):
            problems.append(f"{where}: {fn} is {actual[0]}x{actual[1]} but declared {w}x{h}")
    return problems


def stats(dataset_dir: Path) -> dict[str, Any]:
    """Per split: images, objects per class, objects per image, box sizes (percentiles), small-object share."""
    meta = coco.read_dataset_yaml(dataset_dir)
    classes = list(meta["classes"])
    result: dict[str, Any] = {"dataset": str(dataset_dir), "classes": classes, "splits": {}}
    for path in split_files(dataset_dir):
        problems: list[str] = []
        data = _load(path, problems)
        if data is None:
            raise KdcliError(problems[0])
        per_class = dict.fromkeys(classes, 0)
        per_image: dict[Any, int] = {im["id"]: 0 for im in data["images"]}
        sides = []
        for a in data["annotations"]:
            per_class[classes[a["category_id"] - 1]] += 1
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
            sides.append((a["bbox"][2], a["bbox"][3]))
        wh = np.asarray(sides, dtype=np.float64).reshape(-1, 2)
        area = wh[:, 0] * wh[:, 1]
        counts = np.asarray(list(per_image.values()) or [0])
        pct = (5, 25, 50, 75, 95)
        image_sides = [max(im["width"], im["height"]) for im in data["images"]]
        result["splits"][path.stem] = {
            "images": len(data["images"]),
            "unlabeled": not classes,  # a pool made by `kdcli prepare images`: images, no annotations
            "image_side_px": {f"p{p}": int(np.percentile(image_sides, p)) for p in (5, 50, 95)} if image_sides
            else {},
            "empty_images": int((counts == 0).sum()) if data["images"] else 0,
            "objects": len(data["annotations"]),
            "objects_per_class": per_class,
            "objects_per_image": {"mean": round(float(counts.mean()), 3), "max": int(counts.max())},
            "box_side_px": {f"p{p}": round(float(np.percentile(np.sqrt(area), p)), 2) for p in pct} if len(area)
            else {},
            "box_width_px": {f"p{p}": round(float(np.percentile(wh[:, 0], p)), 2) for p in pct} if len(area) else {},
            "box_height_px": {f"p{p}": round(float(np.percentile(wh[:, 1], p)), 2) for p in pct} if len(area) else {},
            "share_small": round(float((area < SMALL).mean()), 4) if len(area) else 0.0,
            "share_medium": round(float(((area >= SMALL) & (area < MEDIUM)).mean()), 4) if len(area) else 0.0,
            "share_large": round(float((area >= MEDIUM).mean()), 4) if len(area) else 0.0,
        }
    return result
