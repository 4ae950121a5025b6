"""Any COCO detection dataset a user brings: annotations JSON + image folder -> a kdcli dataset dir.

Categories are renumbered 1..K in their given order (names kept); crowd boxes are dropped and counted; a val
split is carved from train when no val JSON is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.images import ImageDecodeError, place, probe
from kdcli.data.sources.common import clip_box, is_sliver, val_split
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KdcliError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KdcliError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise KdcliError(f"{path}: not COCO detection JSON (no '{key}' list)")
    return data


def _convert(data: dict[str, Any], path: Path, images_dir: Path, tmp: Path, classes: list[str],
             cat_index: dict[int, int], b: coco.CocoBuilder, tally: Tally, mode: str, skip_bad: bool,
             next_id: int) -> int:
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for n, a in enumerate(data["annotations"]):
        if "image_id" not in a or "bbox" not in a or "category_id" not in a:
            raise KdcliError(f"{path}: annotations[{n}]: needs image_id, category_id and bbox")
        by_image.setdefault(a["image_id"], []).append(a)
    seen: set[Any] = set()
    for n, im in enumerate(console.track(data["images"], f"{path.name}")):
        if "id" not in im or "file_name" not in im:
            raise KdcliError(f"{path}: images[{n}]: needs id and file_name")
        if im["id"] in seen:
            raise KdcliError(f"{path}: images[{n}]: duplicate image id {im['id']}")
        seen.add(im["id"])
        src_img = images_dir / im["file_name"]
        try:
            width, height = probe(src_img)
        except ImageDecodeError as e:
            if not skip_bad:
                raise
            tally.add("image failed to decode (skipped)", e.message)
            continue
        if (im.get("width"), im.get("height")) not in ((width, height), (None, None)):
            tally.add("declared image size differs from the file (file wins)", im["file_name"])
        dst = f"{coco.IMAGES}/{im['file_name']}"
        place(src_img, tmp / dst, mode)
        b.add_image(next_id, dst, width, height, source_id=im["id"])
        for a in by_image.get(im["id"], []):
            if a["category_id"] not in cat_index:
                tally.add(f"unknown category id {a['category_id']} (dropped)", im["file_name"])
                continue
            if a.get("iscrowd", 0):
                tally.add("crowd box (dropped)", im["file_name"])
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            box, clipped = clip_box(x, y, x + w, y + h, width, height)
            if is_sliver(box):
                tally.add("zero-area box (dropped)", im["file_name"])
                continue
            if clipped:
                tally.add("box clipped to the image", im["file_name"])
            b.add_box(next_id, cat_index[a["category_id"]], box)
        next_id += 1
    return next_id


def prepare(src: Path, images_dir: Path, out: Path, val: Path | None = None, val_fraction: float = 0.1,
            seed: int = 0, images: str = "link", force: bool = False,
            skip_bad_images: bool = False) -> dict[str, Any]:
    train_data = _load(src)
    if not images_dir.is_dir():
        raise KdcliError(f"{images_dir}: image folder not found", hint="give --images DIR")
    cats = train_data["categories"]
    classes = [str(c["name"]) for c in cats]
    if len(set(classes)) != len(classes):
        raise KdcliError(f"{src}: duplicate category names")
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    tally = Tally()
    with atomic_dir(out, force) as tmp:
        full = coco.CocoBuilder(classes, f"{src.name}")
        next_id = _convert(train_data, src, images_dir, tmp, classes, cat_index, full, tally, images,
                           skip_bad_images, 1)
        if val is not None:
            val_data = _load(val)
            if [c["name"] for c in val_data["categories"]] != classes:
                raise KdcliError(f"{val}: categories differ from {src}")
            parts = {"train": full, "val": coco.CocoBuilder(classes, val.name)}
            _convert(val_data, val, images_dir, tmp, classes, cat_index, parts["val"], tally, images,
                     skip_bad_images, next_id)
        else:
            train_ids, val_ids = val_split([im["id"] for im in full.images], val_fraction, seed)
            parts = {"train": coco.subset(full, set(train_ids), "train"),
                     "val": coco.subset(full, set(val_ids), "val")}
        splits, counts = {}, {}
        for name, b in parts.items():
            b.write(tmp, name)
            splits[name] = {"images": len(b.images), "objects": len(b.annotations)}
            counts[name] = b.class_counts()
        meta = {"name": out.name, "source": "coco", "src": str(src.resolve()), "classes": classes,
                "val_fraction": 0 if val else val_fraction, "seed": seed,
                "images": sum(s["images"] for s in splits.values()), "splits": splits, "class_counts": counts,
                "dropped": tally.as_dict()}
        coco.write_dataset_yaml(tmp, meta)
    return meta
