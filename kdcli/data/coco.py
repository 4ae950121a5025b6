"""The dataset dir, kdcli's one internal format: `images/`, `annotations/<split>.json` (COCO detection JSON,
bbox = x, y, w, h in pixels, ids from 1) and `dataset.yaml` (classes, provenance, counts, drops).

Folded datasets name their splits `foldNN_<split>`; others use `<split>` alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any

import yaml

from kdcli import __version__, atomic
from kdcli.errors import KdcliError

ANNOTATIONS = "annotations"
IMAGES = "images"
DATASET_YAML = "dataset.yaml"


def split_name(split: str, fold: int | None = None) -> str:
    return f"fold{fold:02d}_{split}" if fold is not None else split


def split_path(dataset_dir: str | Path, split: str, fold: int | None = None) -> Path:
    return Path(dataset_dir) / ANNOTATIONS / f"{split_name(split, fold)}.json"


class CocoBuilder:
    """Accumulates one split's images and boxes; `to_dict()` gives COCO detection JSON."""

    def __init__(self, classes: list[str], description: str):
        self.classes = list(classes)
        self.description = description
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add_image(self, image_id: int, file_name: str, width: int, height: int, **extra: Any) -> None:
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height, **extra})

    def add_box(self, image_id: int, label: int, box: tuple[float, float, float, float], **extra: Any) -> None:
        """`label` is 0-based into `classes`; `box` is x0, y0, x1, y1 in pixels."""
        x0, y0, x1, y1 = (round(float(v), 2) for v in box)
        w, h = round(x1 - x0, 2), round(y1 - y0, 2)
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                 "bbox": [x0, y0, w, h], "area": round(w * h, 2), "iscrowd": 0, **extra})

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": {"description": self.description, "version": __version__,
                     "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(self.classes)],
        }

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for a in self.annotations:
            counts[self.classes[a["category_id"] - 1]] += 1
        return counts

    def write(self, dataset_dir: Path, name: str) -> None:
        atomic.write_json(dataset_dir / ANNOTATIONS / f"{name}.json", self.to_dict())


def write_splits(dataset_dir: Path, parts: dict[str, CocoBuilder], difficult: bool = False
                 ) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Write every split's JSON; returns dataset.yaml's `splits` (images, objects, and with `difficult` the
    difficult objects) and `class_counts`."""
    splits, counts = {}, {}
    for name, b in parts.items():
        b.write(dataset_dir, name)
        splits[name] = {"images": len(b.images), "objects": len(b.annotations)}
        if difficult:
            splits[name]["difficult"] = sum(1 for a in b.annotations if a.get("difficult"))
        counts[name] = b.class_counts()
    return splits, counts


def subset(full: CocoBuilder, image_ids: set[int], description: str) -> CocoBuilder:
    """The images `image_ids` of `full` with their boxes (annotation ids renumbered from 1)."""
    part = CocoBuilder(full.classes, description)
    part.images = [im for im in full.images if im["id"] in image_ids]
    part.annotations = [{**a, "id": i + 1}
                        for i, a in enumerate(a for a in full.annotations if a["image_id"] in image_ids)]
    return part


def read_split(dataset_dir: str | Path, split: str, fold: int | None = None) -> dict[str, Any]:
    path = split_path(dataset_dir, split, fold)
    if not path.is_file():
        raise KdcliError(f"{path}: split '{split_name(split, fold)}' not found",
                         hint=_missing_split_hint(Path(dataset_dir), split, fold))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise KdcliError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KdcliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def _missing_split_hint(dataset_dir: Path, split: str, fold: int | None) -> str:
    """What to change when a split is not there: most often the fold setting does not fit the dataset."""
    available = sorted(p.stem for p in (dataset_dir / ANNOTATIONS).glob("*.json"))
    if not available:
        return "run `kdcli prepare` first"
    if fold is not None and split in available:
        return "this dataset has no folds: set data.fold=null"
    folds = sorted(int(m[1]) for a in available if (m := re.fullmatch(rf"fold(\d+)_{re.escape(split)}", a)))
    if folds:
        return f"this dataset has folds {', '.join(map(str, folds))}: set data.fold to one of them"
    return f"available splits: {', '.join(available)}"


def read_dataset_yaml(dataset_dir: str | Path) -> dict[str, Any]:
    path = Path(dataset_dir) / DATASET_YAML
    if not path.is_file():
        from kdcli.data.sources import discover  # the source modules import this module

        raise KdcliError(f"{path}: not a kdcli dataset dir (no {DATASET_YAML})",
                         hint=f"prepare one with `kdcli prepare {'|'.join(sorted(discover()))}`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise KdcliError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: "
                         f"{getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KdcliError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict) or "classes" not in data:
        raise KdcliError(f"{path}: malformed dataset.yaml (no 'classes')")
    return data


def write_dataset_yaml(dataset_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"kdcli_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    atomic.write_yaml(dataset_dir / DATASET_YAML, meta)
