"""DOTA v1.0 / v1.5 / v2.0 (Xia et al.; Ding et al.): large aerial images with oriented boxes, tiled like xView.

Raw layout: `images/*.png` and `labelTxt/*.txt` (or `train/` and `val/` folders each holding both, the official
split). A label file may start with `imagesource:...` and `gsd:...` lines, then one object per line:
`x1 y1 x2 y2 x3 y3 x4 y4 class difficult`. Objects become the horizontal box enclosing their polygon, clipped to
the image; `difficult` is kept in the annotations and ignored by evaluation, as VOC's. Images are split into
train/val *before* tiling (`--val-fraction`, by group with `--group`, unless the official split folders exist),
then cut into 1024 px windows overlapping by 200 px (the DOTA devkit's defaults); a box cut by a window edge is
kept when at least `--min-visible` (0.7: the devkit's threshold) of it is inside. The devkit keeps every empty
window; here a seeded share of empty training windows (`--keep-empty`) is kept, as for xView, and every val window.
`val_scenes` holds the untiled val images for whole-image evaluation (`kdcli predict --split val_scenes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.groups import GROUP, GROUP_FILE, SplitRule, carve
from kdcli.data.images import say_stretch, stretch_provenance
from kdcli.data.sources import FORCE, LINK, SEED, SKIP_BAD, Option, Source, Synthetic, calling, register
from kdcli.data.sources.common import SYNTHETIC_MARKER, finite_box, fitted_box, probed_size, refuse_file
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError

CLASSES = ["plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
           "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter", "roundabout",
           "soccer-ball-field", "swimming-pool", "container-crane", "airport", "helipad"]  # v1.0: first 15
PRESETS = {"vehicles": ["small-vehicle", "large-vehicle"]}  # the paper's setting
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def parse_labels(path: Path, tally: Tally) -> tuple[list[tuple[str, list[float], int]], float | None]:
    """([(class, polygon [8], difficult)], gsd) of one label file; bad lines counted with file:line."""
    objects, gsd = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("imagesource:"):
            continue
        if text.startswith("gsd:"):
            try:
                gsd = float(text[4:])
            except ValueError:
                gsd = None  # "gsd:null" appears in the real files
            continue
        fields = text.split()
        where = f"{path}:{n}"
        if len(fields) not in (9, 10):
            tally.add(f"label line with {len(fields)} fields (want 8 coordinates, class, difficult) (dropped)", where)
            continue
        try:
            poly = [float(v) for v in fields[:8]]
        except ValueError:
            tally.add("label line without 8 coordinates before its class (dropped)", where)
            continue
        if not finite_box(poly, tally, where):
            continue
        try:
            difficult = int(fields[9]) if len(fields) == 10 else 0
        except ValueError:
            tally.add("label line whose difficult flag is not 0 or 1 (dropped)", where)
            continue
        if fields[8] not in CLASSES:
            tally.add(f"unknown class '{fields[8]}' (dropped)", where)
            continue
        objects.append((fields[8], poly, difficult))
    return objects, gsd


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    if not (folder / "images").is_dir():
        raise KdcliError(f"{folder / 'images'}: missing", hint="a DOTA folder holds images/ and labelTxt/")
    if not (folder / "labelTxt").is_dir():
        raise KdcliError(f"{folder / 'labelTxt'}: missing", hint="a DOTA folder holds images/ and labelTxt/")
    images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, folder / "labelTxt" / f"{p.stem}.txt") for p in images]


def check_source(src: Path) -> dict[str, Path]:
    """The folders to read: {"all": src} or the official {"train": ..., "val": ...}."""
    refuse_file(src, "--src")
    if not src.is_dir():
        raise KdcliError(f"DOTA not found at {src}",
                         hint="extract the DOTA images and labelTxt archives so that images/ and labelTxt/ (or "
                              "train/ and val/ each holding both) are in it, or give --src; for offline data run "
                              "`kdcli prepare synthetic --kind dota`")
    if (src / "train" / "images").is_dir() and (src / "val" / "images").is_dir():
        return {"train": src / "train", "val": src / "val"}
    return {"all": src}


def prepare(src: Path, out: Path, tile: int = 1024, overlap: float = 200 / 1024, min_visible: float = 0.7,
            classes: str = "vehicles", val_fraction: float = 0.1, seed: int = 0, keep_empty: float = 0.1,
            workers: int = 0, images: str = "link", force: bool = False, skip_bad_images: bool = False,
            group: str | None = None, group_file: Path | None = None) -> dict[str, Any]:
    """Convert raw DOTA into a tiled dataset dir at `out`; returns the dataset.yaml content. Images (before
    tiling) are split by `kdcli.data.groups.carve`: by group with `group`/`group_file`."""
    import numpy as np

    from kdcli.data.tiling import MIN_TILE, SceneJob, add_tiles, run_jobs, tile_scene, untiled_scenes

    folders = check_source(src)
    if not 0 <= overlap < 1 or not 0 < min_visible <= 1 or not 0 <= keep_empty <= 1 or tile < MIN_TILE:
        raise KdcliError("need 0 <= --overlap < 1, 0 < --min-visible <= 1, 0 <= --keep-empty <= 1, "
                         f"--tile >= {MIN_TILE}")
    if classes not in (*PRESETS, "all"):
        raise KdcliError(f"--classes {classes}: unknown DOTA preset", hint=f"use {', '.join(PRESETS)} or all")
    tally = Tally()
    read: dict[str, tuple[str, Path, list, tuple[int, int], float | None]] = {}
    for part, folder in folders.items():
        pairs = _pairs(folder)
        used = set()
        for img, lab in console.track(pairs, f"reading DOTA {part}"):
            if not lab.is_file():
                tally.add("image without a label file (no objects)", str(img))
                objects, gsd = [], None
            else:
                used.add(lab.name)
                objects, gsd = parse_labels(lab, tally)
            size = probed_size(img, tally, skip_bad_images, decode=False, boxes=len(objects))
            if size is None:
                continue
            read[img.name] = (part, img, objects, size, gsd)
        orphans = sorted(p.name for p in (folder / "labelTxt").glob("*.txt") if p.name not in used)
        if orphans:
            tally.add("label file without an image (not used)", str(folder / "labelTxt" / orphans[0]), n=len(orphans))
    if not read:
        raise KdcliError(f"{src}: no DOTA image found")
    found = {name for _, _, objs, _, _ in read.values() for name, _, _ in objs}
    keep = PRESETS.get(classes) or [c for c in CLASSES if c in found]
    declared = ({"train": sorted(read)} if "all" in folders else
                {p: sorted(s for s, r in read.items() if r[0] == p) for p in ("train", "val")})
    carved = carve({s: str(r[1]) for s, r in read.items()}, SplitRule(val_fraction, seed, group, group_file),
                   declared)
    train_scenes, val_scenes = sorted(carved.parts["train"]), sorted(carved.parts["val"])
    split_of = {**dict.fromkeys(train_scenes, "train"), **dict.fromkeys(val_scenes, "val")}

    with atomic_dir(out, force) as tmp:
        (tmp / coco.IMAGES).mkdir(parents=True)
        jobs = []
        for scene in sorted(read):
            _, path, objects, (w, h), _ = read[scene]
            boxes, labels, raw, extra = [], [], [], []
            for name, poly, difficult in objects:
                if name not in keep:
                    tally.add("object of a class outside the preset (dropped)")
                    continue
                box = fitted_box(min(poly[0::2]), min(poly[1::2]), max(poly[0::2]), max(poly[1::2]), w, h, tally,
                                 f"{scene}: {poly}", "object with no area inside the image (dropped)")
                if box is None:
                    continue
                boxes.append(box)
                labels.append(keep.index(name))
                raw.append(name)
                extra.append({"difficult": 1} if difficult else {})
            jobs.append(SceneJob(scene, path, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels, raw, tile,
                                 overlap, min_visible, 1.0 if split_of[scene] == "val" else keep_empty, seed,
                                 tmp / coco.IMAGES, extra))
        builders = {s: coco.CocoBuilder(keep, f"DOTA tiles {s}") for s in ("train", "val")}
        stretched = add_tiles(builders, split_of, console.track(run_jobs(tile_scene, jobs, workers),
                                                                "tiling DOTA images", total=len(jobs)))
        scenes = untiled_scenes([j for j in jobs if split_of[j.scene] == "val"], {s: r[3] for s, r in read.items()},
                                tmp, images, keep, "DOTA val images (untiled)",
                                {s: {"gsd": r[4]} for s, r in read.items() if r[4]})
        splits, counts = coco.write_splits(tmp, {**builders, "val_scenes": scenes}, difficult=True)
        carved.annotate(splits)
        meta = {
            "name": out.name, "source": "dota", "src": str(src.resolve()),
            "synthetic": (src / SYNTHETIC_MARKER).is_file(), "classes": keep, "preset": classes,
            "tile": tile, "overlap": overlap, "min_visible": min_visible, "keep_empty": keep_empty,
            "val_fraction": val_fraction if "all" in folders else None, "seed": seed,
            "split_rule": carved.provenance,
            "scenes": {"train": train_scenes, "val": val_scenes},
            "images": sum(len(b.images) for b in builders.values()), "splits": splits, "class_counts": counts,
            "dropped": tally.as_dict(),
            "notes": "difficult objects are kept for training and ignored by the VOC-style evaluator",
        }
        if stretched:
            meta["stretch"] = stretch_provenance(stretched, f"{coco.ANNOTATIONS}/train.json and val.json")
        coco.write_dataset_yaml(tmp, meta)
    if stretched:
        say_stretch(meta["stretch"], len(jobs))
    return meta


register(Source(
    name="dota", raw_dir="DOTA",
    title="Prepare DOTA v1.0/v1.5/v2.0: oriented boxes to horizontal ones, images split into train/val, then "
          "tiled as the DOTA devkit does (1024 px, 200 px overlap).",
    example="kdcli prepare dota --src ~/data/DOTA --classes vehicles --workers 8",
    src_help="Raw DOTA folder with images/ and labelTxt/ (or train/ and val/ holding both)", out_help="dota",
    options=(
        Option("tile", int, 1024, "Tile side in pixels."),
        Option("overlap", float, 200 / 1024, "Overlap between neighbouring tiles (fraction; 0.195 = the devkit's "
                                             "200 px of 1024)."),
        Option("min_visible", float, 0.7, "Keep a box cut by a tile edge when at least this share of it is inside."),
        Option("classes", str, "vehicles", "Preset: vehicles (small-vehicle, large-vehicle) or all."),
        Option("val_fraction", float, 0.1, "Share of images (not tiles) for val, when there is no val/ folder."),
        GROUP, GROUP_FILE,
        SEED, Option("keep_empty", float, 0.1, "Share of empty training tiles kept."),
        Option("workers", int, 0, "Processes tiling images in parallel."), LINK, FORCE, SKIP_BAD),
    run=calling(prepare),
    out_name=lambda src, o: "dota",
    synthetic=Synthetic("kdcli.data.synthetic.dota", images=6, size=1400),
))
