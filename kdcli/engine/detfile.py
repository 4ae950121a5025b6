"""A split's detections saved with its ground truth (`dets_<split>.npz` in a study cell's run dir), so that two
models can be compared image by image later (the paired bootstrap of `kdcli report`) without running either
again or reading the dataset."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from kdcli import atomic
from kdcli.engine import metrics as M
from kdcli.errors import KdcliError

KEYS = ("image_ids", "det_image_ids", "det_labels", "det_scores", "det_boxes", "gt_image_ids", "gt_labels",
        "gt_boxes", "gt_ignore", "num_classes")


def path_for(run_dir: Path, split: str) -> Path:
    return run_dir / f"dets_{split}.npz"


def save(path: Path, dets: M.Detections, gt_json: dict, num_classes: int) -> None:
    gt = M.ground_truth(gt_json)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, image_ids=np.array(sorted(im["id"] for im in gt_json["images"]), np.int64),
                            det_image_ids=dets.image_ids, det_labels=dets.labels, det_scores=dets.scores,
                            det_boxes=dets.boxes, gt_image_ids=gt.image_ids, gt_labels=gt.labels,
                            gt_boxes=gt.boxes, gt_ignore=gt.ignore, num_classes=np.array(num_classes))


def load(path: Path) -> tuple[M.Detections, M.GroundTruth, list[int], int]:
    """(detections, ground truth, image ids, number of classes); a damaged file is one clear error."""
    try:
        with np.load(path) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise KdcliError(f"{path}: not a kdcli detections file (missing {', '.join(missing)})")
            dets = M.Detections(z["det_image_ids"], z["det_labels"], z["det_scores"], z["det_boxes"])
            gt = M.GroundTruth(z["gt_image_ids"], z["gt_labels"], z["gt_boxes"], z["gt_ignore"])
            return dets, gt, [int(i) for i in z["image_ids"]], int(z["num_classes"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise KdcliError(f"{path}: unreadable detections file ({e})",
                         hint="write it again: kdcli val WEIGHTS split=SPLIT (into its val run dir)") from None


def find(path: Path) -> Path:
    """The detections file a path names: the file itself, or the one `dets_*.npz` in a run dir (`kdcli val`'s,
    `kdcli predict --split`'s, a study cell's)."""
    if path.is_file():
        return path
    found = sorted(path.glob("dets_*.npz")) if path.is_dir() else []
    if len(found) != 1:
        names = f": {', '.join(f.name for f in found)}" if found else ""
        what = f"{len(found)} detections files (dets_*.npz) in it{names}" if path.exists() else "no such file or folder"
        raise KdcliError(f"{path}: {what}", hint="give a dets_<split>.npz, or the run dir of `kdcli val`, of "
                                                  "`kdcli predict --split` or of a study cell")
    return found[0]


def paired_gains(paths: list[Path], metric: str, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """[{file, score, gain, ci95}]: each file's mAP (`metric`: mAP50 or mAP50-95, VOC-style) on its split, and from
    the second on its gain over the first with the paired percentile interval over images resampled with
    replacement (each model scored once on the shared resamples). Every file must score the same images against
    the same boxes: pairing another split would compare the images, not the models."""
    iou_ts = M.PAIRED_THRESHOLDS[metric]
    loaded = [load(p) for p in paths]
    for p, other in zip(paths[1:], loaded[1:]):
        if not same_split(loaded[0], other):
            raise KdcliError(f"{p}: scores other images or boxes than {paths[0]}",
                             hint="compare models scored on the same split of the same dataset")
    scores = [M.resampled_scores(d, g, ids, k, iou_ts, resamples, seed) for d, g, ids, k in loaded]
    rows = []
    for i, (p, sc) in enumerate(zip(paths, scores)):
        gain, lo, hi = M.paired_interval(sc, scores[0]) if i else (None, None, None)
        rows.append({"file": str(p), "score": sc[0], "gain": gain, "ci95": None if lo is None else [lo, hi]})
    return rows


def same_split(a: tuple, b: tuple) -> bool:
    """Whether two loaded files score the same images against the same ground truth (pairing needs both)."""
    (_, ga, ia, ka), (_, gb, ib, kb) = a, b
    return (ia == ib and ka == kb and np.array_equal(ga.image_ids, gb.image_ids)
            and np.array_equal(ga.labels, gb.labels) and np.allclose(ga.boxes, gb.boxes))
