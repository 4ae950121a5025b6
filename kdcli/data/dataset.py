"""The torch Dataset over a dataset dir split (or fold), and the collate for variable box counts.

Samples are uint8 CHW tensors (the model normalises on its device, so loaders move 4x fewer bytes) with boxes
in network-input pixels, x0, y0, x1, y1. `scale` maps them back to the original image. A dataset built with
`labeled=False` is a pool of unlabelled images: no boxes, `labeled` False in the batch.

`label_split` keeps a seeded fraction of a split's images labelled (the semi-supervised protocol: 1, 5, 10, 25 %);
the rest can serve as the unlabelled pool.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from kdcli.console import err
from kdcli.data import coco
from kdcli.data.images import load_rgb
from kdcli.data.transforms import eval_transform, input_scale
from kdcli.errors import KdcliError

RAM_SHARE = 0.6  # use at most this share of free memory for the image cache


@dataclass
class Record:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] float32 x0 y0 x1 y1, original pixels
    labels: np.ndarray  # [N] int64, 0-based


def read_records(dataset_dir: Path, split: str, fold: int | None, channels: str = "rgb"
                 ) -> tuple[list[Record], list[str], dict[str, Any]]:
    """The split's images with their boxes, the class names, and the split's COCO JSON (the evaluation's
    ground truth, so nothing reads the file twice)."""
    data = coco.read_split(dataset_dir, split, fold)
    classes = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    key = "file_name" if channels == "rgb" else "ir_file"
    records = []
    for im in data["images"]:
        if key not in im:
            raise KdcliError(f"{coco.split_path(dataset_dir, split, fold)}: image {im['id']} has no '{key}'",
                             hint="infrared input needs a dataset prepared from VEDAI with its _ir images")
        anns = by_image.get(im["id"], [])
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.array([a["category_id"] - 1 for a in anns], dtype=np.int64)
        records.append(Record(im["id"], Path(dataset_dir) / im[key], im["width"], im["height"], boxes, labels))
    return records, classes, data


_capped: set[tuple[int, int]] = set()


def loader_workers(requested: int) -> int:
    """Data loader worker processes: `requested`, at most the CPU cores this process may run on (more would only
    compete for them, and torch warns about it on every loader); a lowered count is said once per process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if requested <= cores:
        return requested
    if (requested, cores) not in _capped:
        _capped.add((requested, cores))
        err.print(f"note: {requested} data loader workers asked for, {cores} CPU core(s) available to this process: "
                  f"using {cores}", highlight=False, soft_wrap=True)
    return cores


def label_split(records: list[Record], fraction: float, seed: int, fold: int | None
                ) -> tuple[list[Record], list[Record]]:
    """(labelled, rest): round(fraction x N) images (at least one) drawn with a generator seeded by (seed, fold),
    so the teacher and the students of one study cell see the same labelled images; both keep the split's order."""
    if fraction >= 1:
        return list(records), []
    n = max(1, round(fraction * len(records)))
    chosen = set(random.Random(f"label-fraction/{seed}/{fold}").sample(range(len(records)), n))
    return ([r for i, r in enumerate(records) if i in chosen],
            [replace(r, boxes=r.boxes[:0], labels=r.labels[:0]) for i, r in enumerate(records) if i not in chosen])


def _free_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


class DetectionDataset(Dataset):
    """One split of a dataset dir. `transform` is an albumentations Compose (default: the eval letterbox)."""

    def __init__(self, dataset_dir: str | Path, split: str, fold: int | None = None, imgsz: int = 512,
                 letterbox: bool = True, transform: Callable[..., dict[str, Any]] | None = None,
                 channels: str = "rgb", cache: str = "none", records: list[Record] | None = None,
                 labeled: bool = True):
        """`records`: use these images instead of the split's (a label fraction's share, a pool); `labeled`
        False: the images' boxes are never returned (a pool of unlabelled images)."""
        self.dataset_dir = Path(dataset_dir)
        self.records, self.classes, self.coco = read_records(self.dataset_dir, split, fold, channels)
        if records is not None:
            self.records = records
        self.labeled = labeled
        self.imgsz = imgsz
        self.letterbox = letterbox
        self.transform = transform or eval_transform(imgsz, letterbox)
        self.cache: list[np.ndarray] | None = None
        self.seed: int | None = None  # set for training: each sample's augmentation drawn from (seed, epoch, index)
        self.epoch = 0
        if cache == "ram":
            self.cache_in_ram()

    def cache_in_ram(self) -> None:
        """Decode every image once and keep it (when it fits in RAM_SHARE of the free memory)."""
        need = sum(r.width * r.height * 3 for r in self.records)
        free = _free_memory()
        if free and need > RAM_SHARE * free:
            err.print(f"[yellow]warning:[/] image cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free: "
                      "not caching")
            return
        self.cache = [load_rgb(r.path) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        image = self.cache[index] if self.cache is not None else load_rgb(r.path)
        if self.seed is not None:
            self.transform.set_random_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**32)
        boxes, labels = (r.boxes, r.labels) if self.labeled else (r.boxes[:0], r.labels[:0])
        out = self.transform(image=image, bboxes=boxes, labels=labels)
        boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.as_tensor(np.asarray(out["labels"], dtype=np.int64)),
            "image_id": r.image_id,
            "orig_size": (r.height, r.width),
            "scale": input_scale(r.width, r.height, self.imgsz, self.letterbox),
            "labeled": self.labeled,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images ([B, 3, S, S] uint8); keep per-image boxes and labels as lists."""
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "boxes": [s["boxes"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "orig_sizes": [s["orig_size"] for s in samples],
        "scales": [s["scale"] for s in samples],
        "labeled": [s["labeled"] for s in samples],
    }
