"""Metrics: VOC-style AP by hand, and COCO-style AP equal to pycocotools on the same detections."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from kdcli.engine.metrics import Detections, coco_per_class, ground_truth, voc_ap, voc_per_class
from kdcli.engine.validator import compute_metrics


def _gt(boxes_by_image: dict[int, list[tuple]], difficult: set[int] = frozenset()) -> dict:
    images, anns = [], []
    for im, boxes in boxes_by_image.items():
        images.append({"id": im, "file_name": f"{im}.png", "width": 100, "height": 100})
        for c, x0, y0, x1, y1 in boxes:
            a = {"id": len(anns) + 1, "image_id": im, "category_id": c + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                 "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            if len(anns) + 1 in difficult:
                a["difficult"] = 1
            anns.append(a)
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _dets(rows: list[tuple]) -> Detections:
    return Detections(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]),
                      np.array([r[3:] for r in rows], dtype=np.float64).reshape(-1, 4))


def test_voc_ap_by_hand():
    gt = _gt({1: [(0, 0, 0, 10, 10)], 2: [(0, 0, 0, 10, 10)]})
    dets = _dets([(1, 0, 0.9, 0, 0, 10, 10), (1, 0, 0.8, 50, 50, 60, 60), (2, 0, 0.7, 1, 1, 10, 10)])
    # ranks: TP, FP, TP -> recall .5 .5 1, precision 1 .5 .667 -> AP = .5 * 1 + .5 * 2/3
    ap = voc_per_class(dets, ground_truth(gt), 2, 0.5)
    assert ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert np.isnan(ap[1])  # no ground truth of class b
    assert voc_ap(np.array([1.0]), np.array([1.0])) == 1.0


def test_voc_duplicate_is_false_positive_and_difficult_ignored():
    gt = _gt({1: [(0, 0, 0, 10, 10), (0, 40, 40, 60, 60)]}, difficult={2})
    dets = _dets([(1, 0, 0.9, 0, 0, 10, 10), (1, 0, 0.8, 0, 0, 10, 10), (1, 0, 0.7, 40, 40, 60, 60)])
    ap = voc_per_class(dets, ground_truth(gt), 2, 0.5)
    # one countable GT: TP at rank 1 (precision 1 at recall 1), the duplicate is FP, the difficult match ignored
    assert ap[0] == pytest.approx(1.0)
    assert compute_metrics(dets, gt, ["a", "b"], 100, [0.5])["objects"] == 1


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    images, anns, rows = [], [], []
    for i in range(1, 31):
        images.append({"id": i, "file_name": f"{i}.png", "width": 300, "height": 300})
        for _ in range(rng.integers(0, 7)):
            x, y = rng.uniform(0, 250, 2)
            w, h = rng.uniform(4, 50, 2)
            c = int(rng.integers(0, 3))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if rng.random() < 0.8:
                j = np.clip(rng.normal(0, 3, 4), -1.5, 1.5)  # jittered but valid boxes, as a detector gives
                cc = c if rng.random() < 0.85 else int(rng.integers(0, 3))
                rows.append((i, cc, float(rng.random()), x + j[0], y + j[1], x + w + j[2], y + h + j[3]))
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 250, 2)
            w, h = rng.uniform(4, 50, 2)
            rows.append((i, int(rng.integers(0, 3)), float(rng.random()), x, y, x + w, y + h))
    gt = {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": str(k)} for k in range(3)]}
    return gt, _dets(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_style_ap_equals_pycocotools(seed: int):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = _random_case(seed)
    res = [{"image_id": int(i), "category_id": int(c) + 1, "score": float(s),
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
           for i, c, s, b in zip(dets.image_ids, dets.labels, dets.scores, dets.boxes.tolist())]
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO()
        cg.dataset = gt
        cg.createIndex()
        ev = COCOeval(cg, cg.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = coco_per_class(dets, ground_truth(gt), 3, [im["id"] for im in gt["images"]], max_det=100)
    assert np.nanmean(ours) == pytest.approx(ev.stats[0], abs=1e-4)
    assert np.nanmean(ours[0]) == pytest.approx(ev.stats[1], abs=1e-4)
    assert np.nanmean(ours[5]) == pytest.approx(ev.stats[2], abs=1e-4)
    a = compute_metrics(dets, gt, ["0", "1", "2"], 100, [0.5], backend="kdcli")
    b = compute_metrics(dets, gt, ["0", "1", "2"], 100, [0.5], backend="pycocotools")
    assert a["mAP50-95"] == pytest.approx(b["mAP50-95"], abs=1e-4) and a["coco_AP50"] == pytest.approx(b["coco_AP50"],
                                                                                                         abs=1e-4)
    assert a["mAP50"] == b["mAP50"]  # the VOC-style headline is ours in both


def test_empty_detections_do_not_crash_pycocotools():
    gt, _ = _random_case(0)
    m = compute_metrics(Detections.empty(), gt, ["0", "1", "2"], 100, [0.25, 0.5], backend="pycocotools")
    assert m["mAP50"] == 0.0 and m["mAP50-95"] == 0.0 and m["mAP0.25"] == 0.0 and m["detections"] == 0


def _random_split(seed: int, found: float = 0.8):
    """Ground truth of 12 images and detections of it: most found a little off, plus false positives."""
    rng, ids = np.random.default_rng(seed), range(1, 13)
    anns, dets = [], []
    for im in ids:
        for _ in range(rng.integers(0, 4)):
            x, y, c = *rng.uniform(0, 80, 2), int(rng.integers(0, 2))
            anns.append({"image_id": im, "category_id": c + 1, "bbox": [x, y, 20, 15]})
            if rng.random() < found:
                dets.append((im, c, rng.uniform(0.3, 1), [x + rng.normal(0, 3), y, x + 20, y + 15]))
        for _ in range(rng.integers(0, 3)):  # false positives
            x, y = rng.uniform(0, 80, 2)
            dets.append((im, int(rng.integers(0, 2)), rng.uniform(0, 0.8), [x, y, x + 10, y + 10]))
    return anns, dets


def _as_dets(rows: list) -> Detections:
    return Detections(np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
                      np.array([r[2] for r in rows]), np.array([r[3] for r in rows], float).reshape(-1, 4))


def _copy_resampled_maps(anns: list, dets: list, ids: list[int], draws: np.ndarray,
                         iou_ts: tuple[float, ...] = (0.5,)) -> list[float]:
    """The plain bootstrap: each resample built by copying the drawn images (new ids), scored by voc_per_class
    (averaged over `iou_ts`)."""
    maps = []
    for counts in draws:
        copies = [(im, k) for im, n in zip(ids, counts) for k in range(n)]
        new_id = {c: i for i, c in enumerate(copies)}
        a2 = [{**a, "image_id": new_id[(a["image_id"], k)]}
              for a in anns for k in range(counts[ids.index(a["image_id"])])]
        rows = [(new_id[(x[0], k)], *x[1:]) for x in dets for k in range(counts[ids.index(x[0])])]
        per_t = [voc_per_class(_as_dets(rows), ground_truth({"annotations": a2}), 2, t) for t in iou_ts]
        maps.append(np.mean([np.nanmean(aps) if np.isfinite(aps).any() else 0.0 for aps in per_t]))
    return maps


def test_bootstrap_interval_equals_resampling_by_copying_images():
    """The weighted bootstrap against the plain one (images copied)."""
    from kdcli.engine.metrics import bootstrap_map

    ids = list(range(1, 13))
    anns, dets = _random_split(0)
    gt, d = ground_truth({"annotations": anns}), _as_dets(dets)
    lo, hi = bootstrap_map(d, gt, ids, 2, resamples=200, seed=3)
    draws = np.random.default_rng(3).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=200)
    maps = _copy_resampled_maps(anns, dets, ids, draws)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(maps, [2.5, 97.5])), abs=1e-9)
    full = np.nanmean(voc_per_class(d, gt, 2))
    assert lo < full < hi


def test_paired_interval_equals_copying_images_for_both_models():
    """Two models on the same resamples: the interval of their difference against the plain bootstrap of each
    (images copied), the gain against voc_per_class, and a model against itself gives exactly zero."""
    from kdcli.engine.metrics import paired_bootstrap_map

    ids = list(range(1, 13))
    anns, good = _random_split(5, found=0.9)
    rng = np.random.default_rng(9)
    weak = [(im, c, s * rng.uniform(0.2, 1), box) for im, c, s, box in good if rng.random() < 0.7]  # misses, shuffled
    gt = ground_truth({"annotations": anns})
    gain, lo, hi = paired_bootstrap_map(_as_dets(good), _as_dets(weak), gt, ids, 2, resamples=150, seed=4)
    assert gain == pytest.approx(np.nanmean(voc_per_class(_as_dets(good), gt, 2))
                                 - np.nanmean(voc_per_class(_as_dets(weak), gt, 2)), abs=1e-12)
    draws = np.random.default_rng(4).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=150)
    diff = np.subtract(_copy_resampled_maps(anns, good, ids, draws), _copy_resampled_maps(anns, weak, ids, draws))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(diff, [2.5, 97.5])), abs=1e-9)
    assert gain > 0 and lo <= gain <= hi
    assert paired_bootstrap_map(_as_dets(good), _as_dets(good), gt, ids, 2, resamples=50) == (0.0, 0.0, 0.0)

    # over several IoU thresholds (mAP50-95's way): the mean of the per-threshold mAPs, on the same resamples
    ts = (0.5, 0.7, 0.9)
    gain, lo, hi = paired_bootstrap_map(_as_dets(good), _as_dets(weak), gt, ids, 2, ts, resamples=150, seed=4)
    assert gain == pytest.approx(np.mean([np.nanmean(voc_per_class(_as_dets(good), gt, 2, t))
                                          - np.nanmean(voc_per_class(_as_dets(weak), gt, 2, t)) for t in ts]),
                                 abs=1e-12)
    diff = np.subtract(_copy_resampled_maps(anns, good, ids, draws, ts), _copy_resampled_maps(anns, weak, ids,
                                                                                              draws, ts))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(diff, [2.5, 97.5])), abs=1e-9)


def test_detections_file_round_trip_and_damage(tmp_path: Path):
    from kdcli.engine import detfile
    from kdcli.errors import KdcliError

    anns, dets = _random_split(1)
    gt_json = {"images": [{"id": i} for i in range(1, 13)], "annotations": anns}
    path = tmp_path / "dets_test.npz"
    detfile.save(path, _as_dets(dets), gt_json, 2)
    d, gt, ids, k = detfile.load(path)
    assert ids == list(range(1, 13)) and k == 2 and len(d.scores) == len(dets)
    np.testing.assert_array_equal(d.boxes, _as_dets(dets).boxes)
    np.testing.assert_array_equal(gt.labels, ground_truth(gt_json).labels)
    assert detfile.same_split((d, gt, ids, k), detfile.load(path))
    assert not detfile.same_split((d, gt, ids, k), (d, gt, ids[:-1], k))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(KdcliError, match="unreadable detections file"):
        detfile.load(path)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(KdcliError, match="not a kdcli detections file"):
        detfile.load(tmp_path / "other.npz")
