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


def same_split(a: tuple, b: tuple) -> bool:
    """Whether two loaded files score the same images against the same ground truth (pairing needs both)."""
    (_, ga, ia, ka), (_, gb, ib, kb) = a, b
    return (ia == ib and ka == kb and np.array_equal(ga.image_ids, gb.image_ids)
            and np.array_equal(ga.labels, gb.labels) and np.allclose(ga.boxes, gb.boxes))
