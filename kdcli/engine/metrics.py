"""Detection metrics on (image, class, score, box) detections against COCO-JSON ground truth.

Two protocols, each documented where reported:
- VOC-style (the headline `mAP50`): all-point interpolated AP (area under the monotone PR curve). Detections of
  a class are ranked over the whole split; each takes the GT with the highest IoU in its image; IoU > t and
  that GT unmatched -> TP, else FP; `difficult` GTs are ignored (neither TP nor FP). Boxes are continuous
  pixels, so IoU has no +1.
- COCO-style: pycocotools' protocol re-implemented (per image and class, the top `max_det` detections;
  greedy match to the best unmatched GT with IoU >= t; 101-point interpolated precision; crowd/difficult GTs
  ignored), equal to pycocotools within 1e-4 on the same detections (a test).
Classes without ground truth are left out of means.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COCO_THRESHOLDS = np.linspace(0.5, 0.95, 10)
REC_THRESHOLDS = np.linspace(0.0, 1.0, 101)
# the metrics a paired comparison over images scores from saved detections: VOC-style AP at these IoUs, averaged
PAIRED_THRESHOLDS = {"mAP50": (0.5,), "mAP50-95": tuple(round(0.5 + 0.05 * i, 2) for i in range(10))}


@dataclass
class Detections:
    """Flat arrays over a split: image ids, 0-based labels, scores, boxes [N, 4] xyxy original pixels."""

    image_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros((0, 4)))


@dataclass
class GroundTruth:
    image_ids: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray  # [M, 4] xyxy
    ignore: np.ndarray  # [M] bool: difficult (VOC) or crowd


def ground_truth(coco_json: dict) -> GroundTruth:
    anns = coco_json["annotations"]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns], np.float64).reshape(-1, 4)
    return GroundTruth(np.array([a["image_id"] for a in anns], np.int64),
                       np.array([a["category_id"] - 1 for a in anns], np.int64), boxes,
                       np.array([bool(a.get("difficult", 0) or a.get("iscrowd", 0)) for a in anns], bool))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _group(ids: np.ndarray, labels: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (im, c) in enumerate(zip(ids.tolist(), labels.tolist())):
        groups[(im, c)].append(i)
    return {k: np.asarray(v) for k, v in groups.items()}


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP: area under the precision envelope."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(((mrec[i + 1] - mrec[i]) * mpre[i + 1]).sum())


def voc_matches(dets: Detections, gt: GroundTruth, c: int, iou_t: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The detections of class c ranked by score (indices into `dets`), and their TP and FP flags (an ignored
    match is neither). A detection's flag depends only on higher-scoring detections of its own image, so the
    flags stay valid when images are resampled (the bootstrap below)."""
    gt_groups = _group(gt.image_ids, gt.labels)
    idx = np.flatnonzero(dets.labels == c)
    idx = idx[np.argsort(-dets.scores[idx], kind="stable")]
    used: dict[int, np.ndarray] = {}
    tp = np.zeros(len(idx))
    fp = np.zeros(len(idx))
    for r, d in enumerate(idx):
        key = (int(dets.image_ids[d]), c)
        g = gt_groups.get(key)
        if g is None:
            fp[r] = 1
            continue
        ious = iou_matrix(dets.boxes[d:d + 1], gt.boxes[g])[0]
        j = int(ious.argmax())
        if ious[j] > iou_t:
            if gt.ignore[g[j]]:
                continue
            seen = used.setdefault(key[0], np.zeros(len(g), bool))
            if not seen[j]:
                seen[j] = True
                tp[r] = 1
            else:
                fp[r] = 1
        else:
            fp[r] = 1
    return idx, tp, fp


def voc_per_class(dets: Detections, gt: GroundTruth, num_classes: int, iou_t: float = 0.5) -> np.ndarray:
    """VOC-style AP per class at IoU > iou_t; NaN for classes without (non-ignored) ground truth."""
    aps = np.full(num_classes, np.nan)
    for c in range(num_classes):
        n_pos = int(((gt.labels == c) & ~gt.ignore).sum())
        if n_pos == 0:
            continue
        _, tp, fp = voc_matches(dets, gt, c, iou_t)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / n_pos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[c] = voc_ap(recall, precision)
    return aps


def resample_weights(n_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[R, I]: how often each of I images was drawn in each of R resamples with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=resamples).astype(np.float64)


def resampled_map(dets: Detections, gt: GroundTruth, ids: np.ndarray, w: np.ndarray, num_classes: int,
                  iou_t: float = 0.5, chunk: int = 250) -> np.ndarray:
    """[R]: the VOC-style mAP of each resample, every image weighed by how often it was drawn (`w`, over the
    sorted image ids `ids`); a class without ground truth in a resample is left out of its mean. Resamples are
    taken `chunk` at a time to bound the memory of the [R, detections] arrays."""
    aps = np.full((len(w), num_classes), np.nan)
    for c in range(num_classes):
        pos = (gt.labels == c) & ~gt.ignore
        n_pos_img = np.bincount(np.searchsorted(ids, gt.image_ids[pos]), minlength=len(ids))[:len(ids)]
        n_pos_all = w @ n_pos_img  # [R]
        if not (n_pos_all > 0).any():
            continue
        idx, tp, fp = voc_matches(dets, gt, c, iou_t)
        at = np.searchsorted(ids, dets.image_ids[idx])
        for r0 in range(0, len(w), chunk):
            dw, n_pos = w[r0:r0 + chunk][:, at], n_pos_all[r0:r0 + chunk]
            ctp, cfp = np.cumsum(dw * tp, 1), np.cumsum(dw * fp, 1)
            precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
            envelope = np.maximum.accumulate(precision[:, ::-1], 1)[:, ::-1]
            with np.errstate(invalid="ignore", divide="ignore"):
                ap = (dw * tp * envelope).sum(1) / n_pos  # sum of recall steps x the precision envelope there
            aps[r0:r0 + chunk, c] = np.where(n_pos > 0, ap, np.nan)
    with np.errstate(all="ignore"):
        return np.array([np.nanmean(r) if np.isfinite(r).any() else 0.0 for r in aps])


def bootstrap_map(dets: Detections, gt: GroundTruth, image_ids: list[int], num_classes: int, iou_t: float = 0.5,
                  resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the VOC-style mAP over images resampled with replacement (the split's own
    variability: how much a number could move on another draw of test images of the same kind)."""
    ids = np.asarray(sorted(image_ids))
    if len(ids) == 0:
        return 0.0, 0.0
    means = resampled_map(dets, gt, ids, resample_weights(len(ids), resamples, seed), num_classes, iou_t)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def mean_resampled_map(dets: Detections, gt: GroundTruth, ids: np.ndarray, w: np.ndarray, num_classes: int,
                       iou_ts: Sequence[float] = (0.5,)) -> np.ndarray:
    """[R]: `resampled_map` averaged over IoU thresholds (0.50:0.05:0.95 gives a VOC-style mAP50-95)."""
    return np.mean([resampled_map(dets, gt, ids, w, num_classes, t) for t in iou_ts], axis=0)


def resampled_scores(dets: Detections, gt: GroundTruth, image_ids: list[int], num_classes: int,
                     iou_ts: Sequence[float] = (0.5,), resamples: int = 1000, seed: int = 0
                     ) -> tuple[float, np.ndarray]:
    """(the mAP on all the images, [R] the mAP of each resample): what pairing needs of one model. Models scored
    on the same image ids with the same resamples and seed share their resamples, so any two can be paired
    (`paired_interval`) without scoring either again."""
    ids = np.asarray(sorted(image_ids))
    if len(ids) == 0:
        return 0.0, np.zeros(resamples)
    w = np.vstack([np.ones((1, len(ids))), resample_weights(len(ids), resamples, seed)])
    maps = mean_resampled_map(dets, gt, ids, w, num_classes, iou_ts)
    return float(maps[0]), maps[1:]


def paired_interval(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], level: float = 0.95
                    ) -> tuple[float, float, float]:
    """(gain, low, high) of two models' `resampled_scores`: a minus b, and the percentile interval of that
    difference over their shared resamples."""
    lo, hi = np.percentile(a[1] - b[1], [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return a[0] - b[0], float(lo), float(hi)


def paired_bootstrap_map(a: Detections, b: Detections, gt: GroundTruth, image_ids: list[int], num_classes: int,
                         iou_ts: Sequence[float] = (0.5,), resamples: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """(gain, low, high): the mAP of `a` minus that of `b` on the same images (averaged over `iou_ts`), and the
    percentile interval of that difference over images resampled with replacement, both models scored on each
    same resample. Pairing removes the variability the two share (easy and hard images), so the interval is
    narrower than either model's own."""
    if not image_ids:
        return 0.0, 0.0, 0.0
    return paired_interval(resampled_scores(a, gt, image_ids, num_classes, iou_ts, resamples, seed),
                           resampled_scores(b, gt, image_ids, num_classes, iou_ts, resamples, seed), level)


def coco_per_class(dets: Detections, gt: GroundTruth, num_classes: int, image_ids: list[int],
                   thresholds: np.ndarray = COCO_THRESHOLDS, max_det: int = 100) -> np.ndarray:
    """[T, K] COCO-style AP (area 'all'); NaN for classes without non-ignored ground truth."""
    gt_groups = _group(gt.image_ids, gt.labels)
    dt_groups = _group(dets.image_ids, dets.labels)
    n_t = len(thresholds)
    out = np.full((n_t, num_classes), np.nan)
    for c in range(num_classes):
        scores, matched, ignored = [], [], []
        n_pos = 0
        for im in sorted(image_ids):
            g = gt_groups.get((im, c), np.zeros(0, np.int64))
            d = dt_groups.get((im, c), np.zeros(0, np.int64))
            g_ign = gt.ignore[g]
            order_g = np.argsort(g_ign, kind="stable")  # non-ignored GTs first
            g, g_ign = g[order_g], g_ign[order_g]
            n_pos += int((~g_ign).sum())
            d = d[np.argsort(-dets.scores[d], kind="stable")][:max_det]
            if len(d) == 0:
                continue
            ious = iou_matrix(dets.boxes[d], gt.boxes[g])
            if g_ign.any():  # ignored GTs are crowd regions: IoU = intersection over the detection's area
                ious[:, g_ign] = _iof(dets.boxes[d], gt.boxes[g][g_ign])
            dm = np.zeros((n_t, len(d)), bool)
            di = np.zeros((n_t, len(d)), bool)
            for ti, t in enumerate(thresholds):
                gm = np.zeros(len(g), bool)
                for k in range(len(d)):
                    best, m = min(t, 1 - 1e-10), -1
                    for j in range(len(g)):
                        if gm[j] and not g_ign[j]:  # a crowd region may absorb several detections
                            continue
                        if m > -1 and not g_ign[m] and g_ign[j]:
                            break
                        if ious[k, j] < best:
                            continue
                        best, m = ious[k, j], j
                    if m == -1:
                        continue
                    di[ti, k] = g_ign[m]
                    dm[ti, k] = True
                    gm[m] = True
            scores.append(dets.scores[d])
            matched.append(dm)
            ignored.append(di)
        if n_pos == 0:
            continue
        if not scores:
            out[:, c] = 0.0
            continue
        s = np.concatenate(scores)
        order = np.argsort(-s, kind="mergesort")
        dm, di = np.concatenate(matched, 1)[:, order], np.concatenate(ignored, 1)[:, order]
        tps = np.cumsum(dm & ~di, 1).astype(np.float64)
        fps = np.cumsum(~dm & ~di, 1).astype(np.float64)
        for ti in range(n_t):
            tp, fp = tps[ti], fps[ti]
            rc = tp / n_pos
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
            q = np.zeros(len(REC_THRESHOLDS))
            inds = np.searchsorted(rc, REC_THRESHOLDS, side="left")
            valid = inds < len(pr)
            q[valid] = pr[inds[valid]]
            out[ti, c] = q.mean()
    return out


def _iof(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    lt = np.maximum(d[:, None, :2], g[None, :, :2])
    rb = np.minimum(d[:, None, 2:], g[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_d = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1])
    return inter / np.maximum(area_d[:, None], 1e-12)
