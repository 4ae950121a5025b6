"""Any COCO detection dataset a user brings: annotations JSON + image folder -> a kdcli dataset dir.

Categories are renumbered 1..K in their given order (names kept); crowd boxes are dropped and counted; a val
split is carved from train when no val JSON is given (by group with `--group`, and `--folds`/`--fold-by` write
folds: see `kdcli.data.groups`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.groups import OPTIONS as SPLIT_OPTIONS
from kdcli.data.groups import SplitRule, carve
from kdcli.data.images import place
from kdcli.data.sources import FORCE, LINK, SEED, SKIP_BAD, Option, Source, calling, register
from kdcli.data.sources.common import finite_box, fitted_box, probed_size, refuse_file
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise KdcliError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KdcliError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KdcliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict):
        raise KdcliError(f"{path}: not COCO detection JSON (the top level is a {type(data).__name__}, not an "
                         "object with images, annotations and categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise KdcliError(f"{path}: not COCO detection JSON (no '{key}' list)")
    for key in ("images", "annotations", "categories"):
        for n, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise KdcliError(f"{path}: {key}[{n}]: expected an object, got {json.dumps(entry)[:40]}")
    return data


def _id(value: Any, where: str) -> Any:
    """An image or category id: an integer or a string (JSON numbers like 1.0 are not ids)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise KdcliError(f"{where}: expected an integer or string id, got {json.dumps(value)[:40]}")
    return value


def _bbox(value: Any, where: str) -> tuple[float, float, float, float]:
    """[x, y, w, h] as 4 numbers (NaN and infinity included: the caller drops and counts those)."""
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise KdcliError(f"{where}: expected [x, y, width, height] as 4 numbers, got {json.dumps(value)[:60]}")
    x, y, w, h = (float(v) for v in value)
    return x, y, w, h


def categories(data: dict[str, Any], path: Path) -> tuple[list[str], dict[Any, int]]:
    """(class names in the given order, category id -> 0-based label); duplicate ids or names are errors."""
    names, index = [], {}
    for n, c in enumerate(data["categories"]):
        where = f"{path}: categories[{n}]"
        name = c.get("name")
        if "id" not in c or isinstance(name, bool) or not isinstance(name, (str, int)) or name == "":
            raise KdcliError(f"{where}: needs an id and a non-empty name")
        cid, name = _id(c["id"], f"{where}.id"), str(name)
        if cid in index:
            raise KdcliError(f"{where}: category id {json.dumps(cid)} is declared twice (first as "
                             f"'{names[index[cid]]}', again as '{name}')")
        if name in names:
            raise KdcliError(f"{where}: category name '{name}' is declared twice")
        index[cid] = len(names)
        names.append(name)
    return names, index


def _convert(data: dict[str, Any], path: Path, images_dir: Path, tmp: Path, classes: list[str],
             cat_index: dict[int, int], b: coco.CocoBuilder, tally: Tally, mode: str, skip_bad: bool,
             next_id: int) -> int:
    by_image: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
    for n, a in enumerate(data["annotations"]):
        if "image_id" not in a or "bbox" not in a or "category_id" not in a:
            raise KdcliError(f"{path}: annotations[{n}]: needs image_id, category_id and bbox")
        _id(a["image_id"], f"{path}: annotations[{n}].image_id")
        by_image.setdefault(a["image_id"], []).append((n, a))
    seen: set[Any] = set()
    for n, im in enumerate(data["images"]):
        if "id" not in im or "file_name" not in im:
            raise KdcliError(f"{path}: images[{n}]: needs id and file_name")
        _id(im["id"], f"{path}: images[{n}].id")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise KdcliError(f"{path}: images[{n}].file_name: expected a file name, got "
                             f"{json.dumps(im['file_name'])[:40]}")
        if im["id"] in seen:
            raise KdcliError(f"{path}: images[{n}]: duplicate image id {im['id']}")
        seen.add(im["id"])
    for image_id, anns in by_image.items():
        if image_id not in seen:
            other = str(image_id) if isinstance(image_id, int) else (int(image_id) if image_id.isdigit() else None)
            note = " (an id of another type matches: ids must have the same JSON type)" if other in seen else ""
            tally.add(f"annotation of an image id not in images (dropped){note}",
                      f"annotations[{anns[0][0]}].image_id {json.dumps(image_id)}", len(anns))
    for im in console.track(data["images"], f"{path.name}"):
        src_img = images_dir / im["file_name"]
        size = probed_size(src_img, tally, skip_bad, boxes=len(by_image.get(im["id"], [])))
        if size is None:
            continue
        width, height = size
        if (im.get("width"), im.get("height")) not in ((width, height), (None, None)):
            tally.add("declared image size differs from the file (file wins)", im["file_name"])
        dst = f"{coco.IMAGES}/{im['file_name']}"
        place(src_img, tmp / dst, mode)
        b.add_image(next_id, dst, width, height, source_id=im["id"], source_file=str(src_img))
        for n, a in by_image.get(im["id"], []):
            bbox = _bbox(a["bbox"], f"{path}: annotations[{n}].bbox")
            if not finite_box(bbox, tally, f"{path.name}: annotations[{n}]"):
                continue
            if a["category_id"] not in cat_index:
                tally.add(f"unknown category id {a['category_id']} (dropped)", im["file_name"])
                continue
            if a.get("iscrowd", 0):
                tally.add("crowd box (dropped)", im["file_name"])
                continue
            x, y, w, h = bbox
            box = fitted_box(x, y, x + w, y + h, width, height, tally, im["file_name"], "zero-area box (dropped)")
            if box is None:
                continue
            b.add_box(next_id, cat_index[a["category_id"]], box)
        next_id += 1
    return next_id


def prepare(src: Path, images_dir: Path, out: Path, val: Path | None = None, val_fraction: float = 0.1,
            seed: int = 0, images: str = "link", force: bool = False, skip_bad_images: bool = False,
            group: str | None = None, group_file: Path | None = None, folds: int = 0,
            fold_by: str | None = None) -> dict[str, Any]:
    train_data = _load(src)
    refuse_file(images_dir, "--images")
    if not images_dir.is_dir():
        raise KdcliError(f"{images_dir}: image folder not found", hint="give --images DIR")
    classes, cat_index = categories(train_data, src)
    tally = Tally()
    with atomic_dir(out, force) as tmp:
        full = coco.CocoBuilder(classes, f"{src.name}")
        next_id = _convert(train_data, src, images_dir, tmp, classes, cat_index, full, tally, images,
                           skip_bad_images, 1)
        declared = {"train": [im["id"] for im in full.images]}
        if val is not None:
            val_data = _load(val)
            if categories(val_data, val) != (classes, cat_index):
                raise KdcliError(f"{val}: categories differ from {src}")
            given = coco.CocoBuilder(classes, val.name)
            _convert(val_data, val, images_dir, tmp, classes, cat_index, given, tally, images, skip_bad_images,
                     next_id)
            declared["val"] = [im["id"] for im in given.images]
            full.images += given.images
            full.annotations += given.annotations
        carved = carve({im["id"]: im["source_file"] for im in full.images},
                       SplitRule(val_fraction, seed, group, group_file, folds, fold_by), declared)
        names = {} if carved.folds else {"train": src.name, "val": val.name} if val is not None else {}
        parts = {name: coco.subset(full, set(ids), names.get(name, name)) for name, ids in carved.parts.items()}
        splits, counts = coco.write_splits(tmp, parts)
        carved.annotate(splits)
        meta = {"name": out.name, "source": "coco", "src": str(src.resolve()), "classes": classes,
                "val_fraction": 0 if val and not carved.folds else val_fraction, "seed": seed,
                **({"folds": carved.folds} if carved.folds else {}), "split_rule": carved.provenance,
                "images": sum(s["images"] for s in splits.values()), "splits": splits, "class_counts": counts,
                "dropped": tally.as_dict()}
        coco.write_dataset_yaml(tmp, meta)
    return meta


register(Source(
    name="coco",
    title="Bring any COCO detection dataset: validated, categories renumbered 1..K, a val split carved if needed.",
    example="kdcli prepare coco --src ann/train.json --images imgs/ --out datasets/mydata",
    src_help="COCO detection JSON of the training images", out_help="<json name>",
    options=(
        Option("images_dir", Path, None, "Folder the JSON's file_name entries are relative to.", ("--images",),
               required=True),
        Option("val", Path | None, None, "COCO JSON of validation images (else carved from train)."),
        Option("val_fraction", float, 0.1, "Share of images for val when no --val (with --fold-by: share of the "
                                           "held-out unit)."), *SPLIT_OPTIONS, SEED, LINK, FORCE, SKIP_BAD),
    run=calling(prepare),
    out_name=lambda src, o: src.stem,
))
