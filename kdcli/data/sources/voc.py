"""Pascal VOC: `VOCdevkit/VOC2007|VOC2012/{Annotations,ImageSets/Main,JPEGImages}`.

Protocol 07+12 by default: VOC2007 trainval + VOC2012 trainval -> train (a seeded val share carved out), VOC2007
test -> test. Boxes are 1-based inclusive pixels: [xmin, xmax] becomes x0 = xmin - 1, x1 = xmax. `difficult`
objects are kept and marked `"difficult": 1` so evaluation can ignore them.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.images import place
from kdcli.data.sources import FORCE, LINK, SEED, SKIP_BAD, Option, Source, Synthetic, calling, register
from kdcli.data.sources.common import SYNTHETIC_MARKER, fitted_box, probed_size, refuse_file, val_split
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def parse_xml(path: Path) -> tuple[int, int, list[dict[str, Any]]]:
    """(width, height, objects) of one VOC annotation; only each object's own `bndbox` is read."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise KdcliError(f"{path}:{e.position[0]}: invalid XML ({e})") from None

    def number(node: ET.Element | None, tag: str, where: str) -> float:
        text = node.findtext(tag) if node is not None else None
        if text is None:
            raise KdcliError(f"{path}: {where}: missing <{tag}>")
        try:
            return float(text)
        except ValueError:
            raise KdcliError(f"{path}: {where}: <{tag}> is not a number: '{text.strip()}'") from None

    size = root.find("size")
    width, height = number(size, "width", "size"), number(size, "height", "size")
    if not (math.isfinite(width) and math.isfinite(height)):
        raise KdcliError(f"{path}: size: <width> and <height> must be finite numbers, got {width} x {height}")
    width, height = int(width), int(height)
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"object {i + 1} ({name or 'no name'})"
        box = obj.find("bndbox")
        if box is None:
            raise KdcliError(f"{path}: {where}: missing <bndbox>")
        coords = [number(box, t, where) for t in ("xmin", "ymin", "xmax", "ymax")]
        difficult = int(float(obj.findtext("difficult") or 0))
        objects.append({"name": name, "box": coords, "difficult": difficult,
                        "truncated": int(float(obj.findtext("truncated") or 0))})
    return width, height, objects


def read_set(root: Path, year: str, image_set: str) -> tuple[Path, list[str]]:
    year_dir = root / f"VOC{year}"
    ids_file = year_dir / "ImageSets" / "Main" / f"{image_set}.txt"
    if not ids_file.is_file():
        raise KdcliError(f"{ids_file}: missing", hint=f"extract the VOC{year} {image_set} archive into {root}")
    ids = [line.split()[0] for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return year_dir, ids


def prepare(src: Path, out: Path, train_sets: list[str] = ("2007/trainval", "2012/trainval"),
            test_sets: list[str] = ("2007/test",), val_fraction: float = 0.1, seed: int = 0,
            images: str = "link", force: bool = False, skip_bad_images: bool = False,
            verify_images: bool = True) -> dict[str, Any]:
    """Convert a VOCdevkit folder into a dataset dir with train/val/test; returns the dataset.yaml content."""
    refuse_file(src, "--src")
    if not src.is_dir():
        raise KdcliError(f"Pascal VOC not found at {src}",
                         hint=f"extract VOCtrainval_06-Nov-2007, VOCtest_06-Nov-2007 and VOCtrainval_11-May-2012 "
                              f"so that {src}/VOC2007 and {src}/VOC2012 exist, or give --src / set KDCLI_DATASETS; "
                              f"for offline data run `kdcli prepare synthetic --kind voc`")
    tally = Tally()
    entries: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    for split, sets in (("train", train_sets), ("test", test_sets)):
        for spec in sets:
            year, sep, image_set = spec.partition("/")
            if not sep:
                raise KdcliError(f"bad image set '{spec}'", hint="write YEAR/SET, e.g. 2007/trainval")
            year_dir, ids = read_set(src, year, image_set)
            entries[split] += [(year_dir, i) for i in ids]

    with atomic_dir(out, force) as tmp:
        builders = {s: coco.CocoBuilder(CLASSES, f"Pascal VOC {s}") for s in entries}
        image_ids: dict[str, list[int]] = {s: [] for s in entries}
        next_id = 1
        for split, items in entries.items():
            for year_dir, vid in console.track(items, f"VOC {split}"):
                xml_path = year_dir / "Annotations" / f"{vid}.xml"
                img_path = year_dir / "JPEGImages" / f"{vid}.jpg"
                if not xml_path.is_file():
                    raise KdcliError(f"{xml_path}: missing (listed in {year_dir.name} ImageSets)")
                width, height, objects = parse_xml(xml_path)
                if verify_images:
                    size = probed_size(img_path, tally, skip_bad_images, boxes=len(objects))
                    if size is None:
                        continue
                    width, height = size
                elif not img_path.is_file():
                    raise KdcliError(f"{img_path}: image not found")
                dst = f"{coco.IMAGES}/{year_dir.name}_{vid}.jpg"
                place(img_path, tmp / dst, images)
                image_id = next_id
                next_id += 1
                builders[split].add_image(image_id, dst, width, height, voc_id=f"{year_dir.name}/{vid}")
                image_ids[split].append(image_id)
                for obj in objects:
                    if obj["name"] not in CLASSES:
                        tally.add(f"unknown class '{obj['name']}' (dropped)", str(xml_path))
                        continue
                    xmin, ymin, xmax, ymax = obj["box"]
                    box = fitted_box(xmin - 1, ymin - 1, xmax, ymax, width, height, tally, str(xml_path),
                                     "zero-area box (dropped)")
                    if box is None:
                        continue
                    extra = {"difficult": 1} if obj["difficult"] else {}
                    builders[split].add_box(image_id, CLASSES.index(obj["name"]), box,
                                            truncated=obj["truncated"], **extra)
        train_ids, val_ids = val_split(image_ids["train"], val_fraction, seed)
        parts = {"train": coco.subset(builders["train"], set(train_ids), "Pascal VOC train"),
                 "val": coco.subset(builders["train"], set(val_ids), "Pascal VOC val"),
                 "test": builders["test"]}
        splits, counts = coco.write_splits(tmp, parts, difficult=True)
        meta = {"name": out.name, "source": "voc", "src": str(src.resolve()),
                "synthetic": (src / SYNTHETIC_MARKER).is_file(), "classes": CLASSES,
                "train_sets": list(train_sets), "test_sets": list(test_sets), "val_fraction": val_fraction,
                "seed": seed, "images": next_id - 1, "splits": splits, "class_counts": counts,
                "dropped": tally.as_dict(),
                "notes": "difficult objects are kept for training and ignored by the VOC-style evaluator"}
        coco.write_dataset_yaml(tmp, meta)
    return meta


def _sets(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


register(Source(
    name="voc", raw_dir="VOCdevkit",
    title="Prepare Pascal VOC (07+12 trainval -> train/val, 07 test -> test); difficult objects are marked.",
    example="kdcli prepare voc --src ~/data/VOCdevkit", src_help="VOCdevkit folder", out_help="voc",
    options=(
        Option("train_sets", str, "2007/trainval,2012/trainval", "Image sets for training, YEAR/SET, "
                                                                 "comma-separated.", ("--train",)),
        Option("test_sets", str, "2007/test", "Image sets for testing.", ("--test",)),
        Option("val_fraction", float, 0.1, "Share of training images for val."), SEED, LINK, FORCE, SKIP_BAD),
    run=calling(prepare, train_sets=_sets, test_sets=_sets),
    out_name=lambda src, o: "voc",
    synthetic=Synthetic("kdcli.data.synthetic.voc", images=60, size=320),
))
