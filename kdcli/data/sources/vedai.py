"""VEDAI (Razakarivony & Jurie): 25 cm (512 px) or 12.5 cm (1024 px) scenes with 10 official folds.

Raw layout and line formats: shared/formats.md. Boxes are the min/max of the four oriented corners, clipped to
the image. Each fold gets `foldNN_train` (official training ids minus a seeded val share), `foldNN_val` and
`foldNN_test` (the official test ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.images import place
from kdcli.data.sources import FORCE, LINK, SEED, SKIP_BAD, Option, Source, Synthetic, calling, register
from kdcli.data.sources.common import (SYNTHETIC_MARKER, Preset, finite_box, fitted_box, parse_int_list, probed_size,
                                      refuse_file, val_split)
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError

RAW_NAMES = {1: "car", 2: "truck", 4: "tractor", 5: "camping car", 7: "motorcycle", 8: "bus", 9: "van",
             10: "other", 11: "pickup", 23: "boat", 31: "plane"}
VEDAI8 = ["car", "pickup", "camping car", "truck", "other", "tractor", "boat", "van"]
RESOLUTIONS = {25: "512", 12: "1024"}



def preset(name: str) -> Preset:
    """The named class presets of formats.md: vedai8, vedai9, vehicle, all."""
    base8 = {i: n for i, n in RAW_NAMES.items() if n in VEDAI8}
    base8.update({7: "other", 8: "other"})  # motorcycle and bus merged into other
    if name == "vedai8":
        return Preset(name, VEDAI8, base8, RAW_NAMES)
    if name == "vedai9":
        return Preset(name, [*VEDAI8, "plane"], {**base8, 31: "plane"}, RAW_NAMES)
    if name == "vehicle":
        return Preset(name, ["vehicle"], {i: "vehicle" for i in RAW_NAMES if i != 31}, RAW_NAMES)
    if name == "all":
        return Preset(name, list(RAW_NAMES.values()), dict(RAW_NAMES), RAW_NAMES)
    raise KdcliError(f"--classes {name}: unknown VEDAI class preset", hint="use vedai8, vedai9, vehicle or all")


@dataclass
class VedaiObject:
    xc: float
    yc: float
    orientation: float
    cls: int
    contained: int
    occluded: int
    xs: tuple[float, ...]
    ys: tuple[float, ...]


class ShortLine(Exception):
    """The 5-field form `xc yc class contained occluded` seen in a few 1024 files: no corners, no box."""


def parse_line(line: str, where: str) -> VedaiObject:
    """One annotation line: 14 fields (per-image file) or 15 (combined file, id first). Numbers are read as
    written (a NaN too: `read_objects` drops and counts such a line); corners are rounded when a box is made.

    Raises ShortLine for the known 5-field form and KdcliError (naming `where` and the field count) otherwise.
    """
    f = line.split()
    try:
        if len(f) == 14:
            xc, yc, ori = map(float, f[0:3])
            cls, contained, occluded = map(int, f[3:6])
            corners = [float(v) for v in f[6:14]]
        elif len(f) == 15:
            xc, yc, ori = map(float, f[1:4])
            corners = [float(v) for v in f[4:12]]
            cls, contained, occluded = map(int, f[12:15])
        elif len(f) == 5:
            raise ShortLine(where)
        else:
            raise KdcliError(f"{where}: expected 14 fields (or 15 in the combined file), found {len(f)}")
    except ValueError as e:
        raise KdcliError(f"{where}: malformed number in annotation line ({e})") from None
    return VedaiObject(xc, yc, ori, cls, contained, occluded, tuple(corners[:4]), tuple(corners[4:]))


def read_objects(path: Path, tally: Tally) -> list[tuple[str, VedaiObject]]:
    """(`file:line`, object) for every object line of a per-image annotation file; a 5-field line or one with
    a NaN or infinite number is left out, counted."""
    objects = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = parse_line(line, f"{path}:{n}")
        except ShortLine:
            tally.add("5-field line without corners (skipped)", f"{path}:{n}")
            continue
        if finite_box((obj.xc, obj.yc, obj.orientation, *obj.xs, *obj.ys), tally, f"{path}:{n}"):
            objects.append((f"{path}:{n}", obj))
    return objects


def read_ids(path: Path) -> list[str]:
    """An official fold file: one 8-digit id per line."""
    ids = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        token = line.strip()
        if not token:
            continue
        if not token.isdigit():
            raise KdcliError(f"{path}:{n}: expected an image id (digits), found '{token[:40]}'")
        ids.append(token.zfill(8))
    return ids


OFFICIAL_FOLDS = 10


def fold_files(ann_dir: Path, folds: list[int] | None) -> dict[int, tuple[Path, Path]]:
    found = {}
    for k in range(1, 100):
        train, test = ann_dir / f"fold{k:02d}.txt", ann_dir / f"fold{k:02d}test.txt"
        if train.is_file() and test.is_file():
            found[k] = (train, test)
    if not found:
        raise KdcliError(f"{ann_dir}: no fold files (fold01.txt + fold01test.txt ...)",
                         hint="extract the official VEDAI annotation archive there")
    if folds is None:
        return found
    missing = [k for k in folds if k not in found]
    if missing:
        raise KdcliError(f"{ann_dir}: fold(s) {missing} not found", hint=f"available: {sorted(found)}")
    return {k: found[k] for k in folds}


def check_source(src: Path, res: int) -> tuple[Path, Path]:
    if res not in RESOLUTIONS:
        raise KdcliError(f"--res must be 25 or 12 (cm per pixel), got {res}")
    px = RESOLUTIONS[res]
    img_dir, ann_dir = src / f"Vehicules{px}", src / f"Annotations{px}"
    refuse_file(src, "--src")
    if not src.is_dir():
        raise KdcliError(
            f"VEDAI not found at {src}",
            hint=f"download VEDAI (Vehicules{px}.tar.* and Annotations{px}.tar) from the official site, extract "
                 f"both into {src}, or give --src / set KDCLI_DATASETS; for offline data run "
                 f"`kdcli prepare synthetic --kind vedai` then `kdcli prepare vedai --src "
                 f"<datasets>/raw/synthetic-vedai`")
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise KdcliError(f"{d}: folder missing", hint=f"extract the VEDAI {px} archives into {src}")
    return img_dir, ann_dir


def prepare(src: Path, out: Path, res: int = 25, classes: str = "vedai8", folds: list[int] | None = None,
            images: str = "link", val_fraction: float = 0.1, seed: int = 0, force: bool = False,
            skip_bad_images: bool = False) -> dict[str, Any]:
    """Convert a raw VEDAI folder into a dataset dir at `out`; returns the dataset.yaml content."""
    pre = preset(classes)  # the options first: a typo is named before the (maybe long) search for the data
    bad = [k for k in folds or [] if not 1 <= k <= OFFICIAL_FOLDS]
    if bad:
        raise KdcliError(f"--folds: VEDAI has folds 1-{OFFICIAL_FOLDS}, got {bad}")
    img_dir, ann_dir = check_source(src, res)
    folds_found = fold_files(ann_dir, folds)
    tally = Tally()
    fold_ids = {k: (read_ids(tr), read_ids(te)) for k, (tr, te) in folds_found.items()}
    all_ids = sorted({i for tr, te in fold_ids.values() for i in tr + te})

    with atomic_dir(out, force) as tmp:
        full = coco.CocoBuilder(pre.classes, f"VEDAI {res} cm ({classes})")
        present: dict[str, int] = {}
        for vid in console.track(all_ids, f"VEDAI {res} cm images"):
            image_path, ann_path = img_dir / f"{vid}_co.png", ann_dir / f"{vid}.txt"
            objects = read_objects(ann_path, tally) if ann_path.is_file() else None
            if not image_path.is_file():
                tally.add("image listed in a fold file but missing (skipped)", str(image_path))
                if objects:  # its annotated objects are lost with it: count them, not just the image
                    tally.add("objects of a missing image (dropped)", f"{vid}: {len(objects)} objects", len(objects))
                continue
            size = probed_size(image_path, tally, skip_bad_images, boxes=len(objects or ()))
            if size is None:
                continue
            width, height = size
            image_id = len(present) + 1
            present[vid] = image_id
            extra: dict[str, Any] = {"vedai_id": vid}
            place(image_path, tmp / coco.IMAGES / image_path.name, images)
            ir_path = img_dir / f"{vid}_ir.png"
            if ir_path.is_file():
                place(ir_path, tmp / coco.IMAGES / ir_path.name, images)
                extra["ir_file"] = f"{coco.IMAGES}/{ir_path.name}"
            full.add_image(image_id, f"{coco.IMAGES}/{image_path.name}", width, height, **extra)
            if objects is None:
                tally.add("image without annotation file (no objects)", vid)
                continue
            for where, obj in objects:
                _add_object(full, image_id, obj, width, height, pre, tally, where)

        parts = {}
        for k, (train_ids, test_ids) in fold_ids.items():
            train_ok = [present[i] for i in train_ids if i in present]
            test_ok = {present[i] for i in test_ids if i in present}
            train, val = val_split(train_ok, val_fraction, seed, salt=k)
            for split, ids in (("train", set(train)), ("val", set(val)), ("test", test_ok)):
                name = coco.split_name(split, k)
                parts[name] = coco.subset(full, ids, f"VEDAI {res} cm {name}")
        splits, counts = coco.write_splits(tmp, parts)
        meta = {
            "name": out.name, "source": "vedai", "resolution_cm": 12.5 if res == 12 else 25,
            "image_size": max((max(im["width"], im["height"]) for im in full.images), default=0),
            "src": str(src.resolve()),
            "synthetic": (src / SYNTHETIC_MARKER).is_file(),
            "classes": pre.classes, "preset": classes,
            "class_mapping": pre.describe(), "folds": sorted(fold_ids), "val_fraction": val_fraction, "seed": seed,
            "images": len(present), "objects": len(full.annotations), "splits": splits, "class_counts": counts,
            "dropped": tally.as_dict(), "channels": {"rgb": "file_name", "ir": "ir_file"},
        }
        coco.write_dataset_yaml(tmp, meta)
    return meta


def _add_object(full: coco.CocoBuilder, image_id: int, obj: VedaiObject, w: int, h: int, pre: Preset,
                tally: Tally, where: str) -> None:
    if obj.cls not in pre.raw_names:
        tally.add(f"unknown class id {obj.cls}", where)
    label = pre.label(obj.cls)
    if label is None:
        if obj.cls in pre.raw_names:
            tally.add(f"class '{pre.raw_names[obj.cls]}' not in preset {pre.name}")
        return
    xs, ys = [int(round(v)) for v in obj.xs], [int(round(v)) for v in obj.ys]
    box = fitted_box(min(xs), min(ys), max(xs), max(ys), w, h, tally, where, "zero-area box after clipping (dropped)")
    if box is None:
        return
    full.add_box(image_id, label, box, raw_class=obj.cls, orientation=round(obj.orientation, 6),
                 occluded=obj.occluded, contained=obj.contained, corners=[xs, ys])


register(Source(
    name="vedai", raw_dir="VEDAI",
    title="Prepare VEDAI (25 cm or 12.5 cm) with its 10 official cross-validation folds.",
    example="kdcli prepare vedai --res 25  (reads $KDCLI_DATASETS/raw/VEDAI, writes $KDCLI_DATASETS/vedai25)",
    src_help="Raw VEDAI folder", out_help="vedai25 or vedai12",
    options=(
        Option("res", int, 25, "Ground resolution in cm: 25 (512 px) or 12 (12.5 cm, 1024 px)."),
        Option("classes", str, "vedai8", "Class preset: vedai8, vedai9, vehicle or all."),
        Option("folds", str | None, None, "Folds to write, e.g. 1-5 [default: all 10]."), LINK,
        Option("val_fraction", float, 0.1, "Share of each fold's official training ids held out for validation "
                                           "(0: none, as the paper)."), SEED, FORCE, SKIP_BAD),
    run=calling(prepare, folds=lambda text: parse_int_list(text, "--folds") or None),
    out_name=lambda src, o: f"vedai{o['res']}",
    synthetic=Synthetic("kdcli.data.synthetic.vedai", images=200, size=512, extra=("test_images",)),
))
