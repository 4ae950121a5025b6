"""Ultralytics YOLO datasets, the layout most aerial vehicle datasets are shared in today (Roboflow exports, VEDAI,
DOTA and xView conversions).

Two layouts:
- a dataset folder with `data.yaml` (`path`, `train`, `val`, `test`: each a folder of images, a .txt list of
  images or a list of either, resolved as Ultralytics does; `names` a list or an {id: name} mapping, `nc` if
  given their number). The label of `.../images/.../a.jpg` is `.../labels/.../a.txt`, as Ultralytics finds it.
  A val or test split sharing images with train is refused: its numbers would not be held-out ones.
- a plain folder of images with a sibling `.txt` label each, and `--names` (a file with one class name per line).
Folders are searched through symbolic links. Class names must be distinct (kdcli keeps classes apart by name).

Label lines: `class cx cy w h` normalised to [0, 1]; `class x1 y1 ... xn yn` (oriented boxes: 4 points, or
segmentation polygons) become their enclosing box. Bad lines (wrong field count, non-numbers, NaN or inf, values
outside [0, 1], unknown class) are dropped and counted with file:line, an image without a label file is an image
without objects, and a label file without an image is counted (an image list among the labels apart). A val split
is carved from train when there is none; `--group`/`--group-file` carve it by group, `--folds`/`--fold-by` pool
every split and write folds (see `kdcli.data.groups`: no group straddles splits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.groups import OPTIONS as SPLIT_OPTIONS
from kdcli.data.groups import SplitRule, carve
from kdcli.data.images import place
from kdcli.data.sources import FORCE, LINK, SEED, SKIP_BAD, Option, Source, Synthetic, calling, register
from kdcli.data.sources.common import (IMAGE_SUFFIXES, SYNTHETIC_MARKER, finite_box, fitted_box, probed_size,
                                       refuse_file, say_left_out, walk_images)
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError

SPLITS = ("train", "val", "test")


def read_names(value: Any, where: str) -> list[str]:
    """`names` as a list, or a mapping {0: a, 1: b} with ids 0..K-1; a name given twice is an error (classes are
    kept apart by name, so two ids would silently become one class)."""
    if isinstance(value, list) and value and all(isinstance(n, (str, int)) for n in value):
        return _distinct([str(n) for n in value], where, [f"id {i}" for i in range(len(value))])
    if isinstance(value, dict) and value:
        try:
            ids = sorted(int(k) for k in value)
        except (TypeError, ValueError):
            raise KdcliError(f"{where}: 'names' keys must be class ids 0..K-1") from None
        if ids != list(range(len(ids))):
            raise KdcliError(f"{where}: 'names' ids must be 0..{len(ids) - 1}, found {ids[:10]}")
        names = [str(value[k] if k in value else value[str(k)]) for k in ids]
        return _distinct(names, where, [f"id {i}" for i in ids])
    raise KdcliError(f"{where}: 'names' must be a non-empty list or an {{id: name}} mapping")


def names_file(path: Path) -> list[str]:
    if not path.is_file():
        raise KdcliError(f"{path}: names file not found", hint="one class name per line, in class-id order")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
             if line.strip()]
    if not lines:
        raise KdcliError(f"{path}: no class names")
    return _distinct([name for _, name in lines], str(path), [f"line {n}" for n, _ in lines])


def _distinct(names: list[str], where: str, places: list[str]) -> list[str]:
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise KdcliError(f"{where}: class name '{name}' is given twice ({places[first[name]]} and {places[i]})",
                             hint="give each class id its own name: kdcli keeps classes apart by name")
        first[name] = i
    return names


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def is_image_list(path: Path) -> bool:
    """Whether a .txt holds image paths (an Ultralytics image list such as `train.txt`) rather than label lines."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                return Path(line.strip()).suffix.lower() in IMAGE_SUFFIXES
    return False


def _entry_path(entry: str, root: Path) -> Path:
    """A data.yaml split entry as Ultralytics' `check_det_dataset` resolves it: relative to the dataset root, and
    a `../x` missing there is tried as `x` (Roboflow exports write `train: ../train/images` in a data.yaml that
    sits beside `train/`)."""
    p = Path(entry)
    if p.is_absolute():
        return p
    if not (root / p).exists() and entry.startswith("../"):
        return root / entry[3:]
    return root / p


def _images_of(entry: Any, root: Path, where: str, lists: set[Path], out: Path | None = None,
               left_out: list[Path] | None = None) -> list[Path]:
    """The images of one split entry; the .txt image lists it names are added to `lists`, the command's output
    `out` met in its folders is left out (`walk_images`) and added to `left_out`."""
    entries = entry if isinstance(entry, list) else [entry]
    found: list[Path] = []
    for e in entries:
        if not isinstance(e, str):
            raise KdcliError(f"{where}: expected a folder, a .txt list or a list of them, found {e!r}")
        p = _entry_path(e, root)
        if p.is_dir():
            found += walk_images(p, leave_out=out, left_out=left_out)
        elif p.is_file() and p.suffix.lower() == ".txt":
            lists.add(p.resolve())
            for line in p.read_text(encoding="utf-8-sig", errors="replace").splitlines():
                line = line.strip()
                if line:
                    q = Path(line)
                    found.append(q if q.is_absolute() else (p.parent / q if line.startswith(".") else root / q))
        else:
            raise KdcliError(f"{where}: {p} not found")
    return found


@dataclass
class Layout:
    """What a YOLO dataset declares: class names, images per split, the file that declared them (data.yaml or
    the names file) and the image-list files data.yaml names (not label files, though they may sit among them)."""

    classes: list[str]
    splits: dict[str, list[Path]]
    declared_by: Path
    lists: set[Path] = field(default_factory=set)
    left_out: list[Path] = field(default_factory=list)  # the command's own output, met inside the image folders


def read_layout(src: Path, names: Path | None, out: Path | None = None) -> Layout:
    """The layout of a data.yaml or a plain folder; `out` (the command's output) is never read as input."""
    left_out: list[Path] = []
    if src.is_file() and src.suffix in (".yaml", ".yml"):
        yaml_path = src
    elif (src / "data.yaml").is_file():
        yaml_path = src / "data.yaml"
    elif src.is_dir():
        if names is None:
            raise KdcliError(f"{src}: no data.yaml", hint="give --names FILE (one class name per line) for a plain "
                                                         "folder of images with .txt labels")
        return Layout(names_file(names), {"train": walk_images(src, leave_out=out, left_out=left_out)}, names,
                      left_out=left_out)
    else:
        refuse_file(src, "--src", hint=f"give --src the folder that holds the data (e.g. {src.parent}: with data.yaml, "
                                       "or images + .txt labels and --names) or its data.yaml file")
        raise KdcliError(f"YOLO dataset not found at {src}",
                         hint="give --src DIR (with data.yaml, or images + .txt labels and --names) or the "
                              "data.yaml file; for offline data run `kdcli prepare synthetic --kind yolo`")
    data = _read_yaml(yaml_path)
    classes = names_file(names) if names is not None else read_names(data.get("names"), str(yaml_path))
    nc = data.get("nc")
    if nc is not None and nc != len(classes):
        raise KdcliError(f"{yaml_path}: 'nc: {nc}' disagrees with the {len(classes)} class names in "
                         f"{names or repr('names')}", hint="nc must be the number of names; fix one of them")
    root = Path(str(data.get("path") or "."))
    root = root if root.is_absolute() else (yaml_path.parent / root)
    if "train" not in data:
        raise KdcliError(f"{yaml_path}: no 'train' entry")
    lists: set[Path] = set()
    splits = {s: _images_of(data[s], root, f"{yaml_path}: {s}", lists, out, left_out) for s in SPLITS if data.get(s)}
    train = {p.resolve() for p in splits["train"]}
    for s in ("val", "test"):
        shared = [p for p in splits.get(s, []) if p.resolve() in train]
        if shared:
            carve = ", or remove 'val' to carve one from train (--val-fraction)" if s == "val" else ""
            raise KdcliError(f"{yaml_path}: {s}: {len(shared)} of its {len(splits[s])} images are also in train "
                             f"(first: {shared[0]})",
                             hint=f"a held-out split must not share images with train: point it at other images{carve}")
    return Layout(classes, splits, yaml_path, lists, sorted(set(left_out)))


def _read_yaml(path: Path) -> dict[str, Any]:
    """data.yaml as a mapping; a syntax error is one line naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise KdcliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise KdcliError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise KdcliError(f"{path}: expected a mapping with train/val/names")
    return data


def parse_label(line: str, where: str, n_classes: int, tally: Tally) -> tuple[int, tuple[float, ...]] | None:
    """(class, normalised x0 y0 x1 y1) of one label line, or None (counted) for a bad one."""
    fields = line.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        tally.add(f"label line with {len(fields)} fields (want 5, or a class and 3+ points) (dropped)", where)
        return None
    try:
        cls_f = float(fields[0])
        values = [float(v) for v in fields[1:]]
    except ValueError:
        tally.add("label line with a non-number (dropped)", where)
        return None
    if not finite_box(values, tally, where):
        return None
    if not (cls_f.is_integer() and 0 <= cls_f < n_classes):
        tally.add(f"label of an unknown class (not 0..{n_classes - 1}) (dropped)", where)
        return None
    if any(not 0 <= v <= 1 for v in values):
        tally.add("label value outside [0, 1] (dropped)", where)
        return None
    if len(values) == 4:
        cx, cy, w, h = values
        return int(cls_f), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    xs, ys = values[0::2], values[1::2]
    return int(cls_f), (min(xs), min(ys), max(xs), max(ys))


def prepare(src: Path, out: Path, names: Path | None = None, classes: str = "all", val_fraction: float = 0.1,
            seed: int = 0, images: str = "link", force: bool = False, skip_bad_images: bool = False,
            group: str | None = None, group_file: Path | None = None, folds: int = 0,
            fold_by: str | None = None) -> dict[str, Any]:
    """Convert a YOLO dataset into a dataset dir; returns the dataset.yaml content. Val (or folds) are carved by
    `kdcli.data.groups.carve`: by group with `group`/`group_file`, so that no group straddles splits."""
    layout = read_layout(src, names, out)
    left_out = say_left_out(layout.left_out)
    names, split_images = layout.classes, layout.splits
    keep = list(names) if classes == "all" else [c.strip() for c in classes.split(",") if c.strip()]
    unknown = [c for c in keep if c not in names]
    if unknown:
        raise KdcliError(f"--classes: {unknown} not among the dataset's names {names}")
    tally = Tally()
    used_labels: set[Path] = set()
    with atomic_dir(out, force) as tmp:
        builders = {s: coco.CocoBuilder(keep, f"YOLO {s}") for s in split_images}
        next_id = 1
        for split, paths_ in split_images.items():
            for img in console.track(paths_, f"YOLO {split}"):
                if not img.is_file():
                    tally.add("image listed but not found (skipped)", str(img))
                    continue
                lab = label_path(img)
                lines = None
                if lab.is_file():
                    used_labels.add(lab.resolve())
                    lines = [(n, line) for n, line in enumerate(
                        lab.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1) if line.strip()]
                size = probed_size(img, tally, skip_bad_images, boxes=len(lines or ()))
                if size is None:
                    continue
                width, height = size
                dst = f"{coco.IMAGES}/{split}/{next_id:07d}_{img.name}"
                place(img, tmp / dst, images)
                image_id = next_id
                next_id += 1
                builders[split].add_image(image_id, dst, width, height, yolo_file=str(img))
                if lines is None:
                    tally.add("image without a label file (no objects)", str(img))
                    continue
                for n, line in lines:
                    parsed = parse_label(line, f"{lab}:{n}", len(names), tally)
                    if parsed is None:
                        continue
                    label, (x0, y0, x1, y1) = parsed
                    if names[label] not in keep:
                        tally.add("box of a class outside --classes (dropped)")
                        continue
                    box = fitted_box(x0 * width, y0 * height, x1 * width, y1 * height, width, height, tally,
                                     f"{lab}:{n}", "box thinner than a pixel (dropped)")
                    if box is None:
                        continue
                    builders[split].add_box(image_id, keep.index(names[label]), box, raw_class=label)
        label_dirs = {label_path(p).parent for ps in split_images.values() for p in ps}
        accounted = used_labels | layout.lists
        lists, orphans = [], []
        for p in sorted(p for d in label_dirs if d.is_dir() for p in d.glob("*.txt")
                        if p.resolve() not in accounted and p.name != "classes.txt"):
            (lists if is_image_list(p) else orphans).append(p)
        if lists:
            tally.add("image list among the label files (a .txt of image paths, not labels; not used)",
                      str(lists[0]), n=len(lists))
        if orphans:
            tally.add("label file without an image (not used)", str(orphans[0]), n=len(orphans))
        if not any(b.images for b in builders.values()):
            raise KdcliError(f"{src}: no usable image")
        full = coco.CocoBuilder(keep, "YOLO")
        for b in builders.values():
            full.images += b.images
            full.annotations += b.annotations
        rule = SplitRule(val_fraction, seed, group, group_file, folds, fold_by)
        carved = carve({im["id"]: im["yolo_file"] for im in full.images}, rule,
                       {s: [im["id"] for im in b.images] for s, b in builders.items()})
        carved_val = "val" not in builders and not carved.folds
        note = {"val": " (carved from train)"} if carved_val else {}
        parts = {name: coco.subset(full, set(ids), f"YOLO {name}{note.get(name, '')}")
                 for name, ids in carved.parts.items()}
        splits, counts = coco.write_splits(tmp, parts)
        carved.annotate(splits)
        meta = {"name": out.name, "source": "yolo", "src": str(src.resolve()), "declared_by": str(layout.declared_by),
                "synthetic": (src / SYNTHETIC_MARKER).is_file(), "classes": keep, "preset": classes,
                "val_fraction": val_fraction if carved_val or carved.folds else 0, "seed": seed,
                **({"folds": carved.folds} if carved.folds else {}), "split_rule": carved.provenance,
                "images": next_id - 1, "splits": splits, "class_counts": counts, "dropped": tally.as_dict(),
                **({"left_out": left_out} if left_out else {})}
        coco.write_dataset_yaml(tmp, meta)
    return meta


register(Source(
    name="yolo", raw_dir="yolo",
    title="Prepare an Ultralytics YOLO dataset (data.yaml, or images with .txt labels and --names); oriented "
          "boxes and polygons become their enclosing boxes.",
    example="kdcli prepare yolo --src ~/data/vehicles-yolo  (the folder holding data.yaml)",
    src_help="YOLO dataset folder (with data.yaml) or the data.yaml file", out_help="<folder name>",
    options=(
        Option("names", Path | None, None, "Class names, one per line (a plain folder of images + labels)."),
        Option("classes", str, "all", "Classes to keep: all, or names separated by commas."),
        Option("val_fraction", float, 0.1, "Share of train images for val when the dataset has no val split "
                                           "(with --fold-by: share of the held-out unit)."),
        *SPLIT_OPTIONS, SEED, LINK, FORCE, SKIP_BAD),
    run=calling(prepare),
    out_name=lambda src, o: (src.parent if src.suffix in (".yaml", ".yml") else src).name or "yolo",
    synthetic=Synthetic("kdcli.data.synthetic.yolo", images=60, size=256),
))
