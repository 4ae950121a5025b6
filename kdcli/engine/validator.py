"""Evaluate a detector on a dataset split: inference, boxes mapped back to original pixels, metrics.

Headline `mAP50` = VOC-style all-point AP at IoU 0.5 (see `metrics`). COCO AP50 and AP50:95 come from
pycocotools (faster-coco-eval when installed; or kdcli's own implementation of the same protocol with
`coco_backend="kdcli"`), with the detection cap raised to `max_det` per image; the backend is named in the
output. VOC `difficult` objects are passed to the COCO evaluators as crowd regions, their only ignore
mechanism (an approximation on VOC). The model is a torch module or any `Detect` function (an exported file run by
its runtime: `kdcli.deploy.formats`), scored by the same code.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdcli.config.schema import ModelConfig
from kdcli.engine import detfile
from kdcli.engine import metrics as M
from kdcli.errors import KdcliError
from kdcli.models.postprocess import postprocess

Detect = Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]  # uint8 images -> per image boxes, scores, labels


def coco_backend(preferred: str = "auto") -> str:
    if preferred in ("kdcli", "pycocotools"):
        return preferred
    try:
        import faster_coco_eval  # noqa: F401

        return "faster-coco-eval"
    except ImportError:
        return "pycocotools"


def torch_detect(model: torch.nn.Module, cfg: ModelConfig, device: torch.device,
                 amp_dtype: torch.dtype | None = None) -> Detect:
    """`model` on `device` (under autocast with `amp_dtype`), postprocessed with `cfg`."""
    model.eval()

    def detect(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(images)
        return postprocess(out, cfg, tuple(images.shape[-2:]))

    return detect


@torch.no_grad()
def predict_loader(model: torch.nn.Module | Detect, loader: DataLoader, cfg: ModelConfig, device: torch.device,
                   amp_dtype: torch.dtype | None = None, max_images: int | None = None
                   ) -> tuple[M.Detections, list[dict[str, Any]]]:
    """Detections over a loader in original-image pixels, and the first few raw samples for drawing. A torch
    `model` runs through `torch_detect`; a `Detect` function postprocesses itself."""
    detect = torch_detect(model, cfg, device, amp_dtype) if isinstance(model, torch.nn.Module) else model
    ids, labels, scores, boxes = [], [], [], []
    samples: list[dict[str, Any]] = []
    seen = 0
    for batch in loader:
        dets = detect(batch["images"])
        for i, d in enumerate(dets):
            sx, sy = batch["scales"][i]
            b = d["boxes"].float().cpu().numpy() / np.array([sx, sy, sx, sy])
            h, w = batch["orig_sizes"][i]
            b[:, 0::2] = b[:, 0::2].clip(0, w)
            b[:, 1::2] = b[:, 1::2].clip(0, h)
            ids.append(np.full(len(b), batch["image_ids"][i], np.int64))
            labels.append(d["labels"].cpu().numpy())
            scores.append(d["scores"].float().cpu().numpy())
            boxes.append(b)
            if len(samples) < 8:
                samples.append({"image": batch["images"][i].permute(1, 2, 0).numpy(), "pred": d["boxes"].cpu().numpy(),
                                "pred_labels": d["labels"].cpu().numpy(), "scores": d["scores"].float().cpu().numpy(),
                                "gt": batch["boxes"][i].numpy(), "gt_labels": batch["labels"][i].numpy()})
        seen += len(dets)
        if max_images is not None and seen >= max_images:
            break
    if not ids:
        return M.Detections.empty(), samples
    return M.Detections(np.concatenate(ids), np.concatenate(labels), np.concatenate(scores),
                        np.concatenate(boxes).reshape(-1, 4)), samples


def pycoco_per_class(dets: M.Detections, gt_json: dict[str, Any], max_det: int, backend: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(AP50 per class, AP50:95 per class) from pycocotools or faster-coco-eval; NaN where a class has no GT."""
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    k = len(gt_json["categories"])
    gt = {**gt_json, "annotations": [{**a, "iscrowd": int(bool(a.get("iscrowd", 0) or a.get("difficult", 0)))}
                                     for a in gt_json["annotations"]]}
    if len(dets.scores) == 0 or not gt["annotations"]:
        has_gt = np.zeros(k, bool)
        for a in gt["annotations"]:
            has_gt[a["category_id"] - 1] |= not a["iscrowd"]
        zero = np.where(has_gt, 0.0, np.nan)
        return zero, zero
    res = [{"image_id": int(i), "category_id": int(c) + 1, "score": float(s),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
           for i, c, s, b in zip(dets.image_ids, dets.labels, dets.scores, dets.boxes)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(res)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.maxDets = [1, 10, max_det]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    per = np.full((prec.shape[0], k), np.nan)
    for c in range(k):
        p = prec[:, :, c]
        for t in range(p.shape[0]):
            valid = p[t] > -1
            if valid.any():
                per[t, c] = p[t][valid].mean()
    return per[0], _column_means(per)


def _column_means(a: np.ndarray) -> np.ndarray:
    """Mean over thresholds per class, NaN where a class has no value (no ground truth)."""
    return np.array([a[:, c][np.isfinite(a[:, c])].mean() if np.isfinite(a[:, c]).any() else np.nan
                     for c in range(a.shape[1])])


def compute_metrics(dets: M.Detections, gt_json: dict[str, Any], classes: list[str], max_det: int,
                    iou_thresholds: list[float], backend: str = "auto", ci_resamples: int = 0) -> dict[str, Any]:
    """Every metric of a split; with `ci_resamples`, also `mAP50_ci95`: the 95 % bootstrap interval of mAP50
    over the split's images."""
    gt = M.ground_truth(gt_json)
    k = len(classes)
    backend = coco_backend(backend)
    voc50 = M.voc_per_class(dets, gt, k, 0.5)
    extra = {t: M.voc_per_class(dets, gt, k, t) for t in iou_thresholds if abs(t - 0.5) > 1e-9}
    if backend == "kdcli":
        coco = M.coco_per_class(dets, gt, k, [im["id"] for im in gt_json["images"]], max_det=max_det)
        coco50, coco5095 = coco[0], _column_means(coco)
    else:
        coco50, coco5095 = pycoco_per_class(dets, gt_json, max_det, backend)

    def mean(a: np.ndarray) -> float:
        return float(np.nanmean(a)) if np.isfinite(a).any() else 0.0

    n_gt = np.bincount(gt.labels[~gt.ignore], minlength=k)
    per_class = []
    for c, name in enumerate(classes):
        row = {"class": name, "n_gt": int(n_gt[c]), "n_det": int((dets.labels == c).sum()),
               "AP50": _num(voc50[c]), "coco_AP50": _num(coco50[c]), "AP50-95": _num(coco5095[c])}
        row.update({f"AP{t:g}": _num(a[c]) for t, a in extra.items()})
        per_class.append(row)
    out = {"mAP50": mean(voc50), "mAP50-95": mean(coco5095), "coco_AP50": mean(coco50)}
    out.update({f"mAP{t:g}": mean(a) for t, a in extra.items()})
    if ci_resamples:
        lo, hi = M.bootstrap_map(dets, gt, [im["id"] for im in gt_json["images"]], k, 0.5, ci_resamples)
        out["mAP50_ci95"] = [round(lo, 6), round(hi, 6)]
    out.update({"images": len(gt_json["images"]), "objects": int(n_gt.sum()), "detections": int(len(dets.scores)),
                "coco_backend": backend, "max_det": max_det, "per_class": per_class})
    return out


def _num(v: float) -> float | None:
    return None if np.isnan(v) else round(float(v), 6)


def evaluate(model: torch.nn.Module | Detect, loader: DataLoader, gt_json: dict[str, Any], classes: list[str],
             cfg: ModelConfig, device: torch.device, iou_thresholds: list[float], backend: str = "auto",
             amp_dtype: torch.dtype | None = None, ci_resamples: int = 0, dets_out: Path | None = None
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Predict a split and score it; with `dets_out`, also save its detections and ground truth there."""
    t0 = time.perf_counter()
    dets, samples = predict_loader(model, loader, cfg, device, amp_dtype)
    t1 = time.perf_counter()
    if dets_out is not None:
        detfile.save(dets_out, dets, gt_json, len(classes))
    result = compute_metrics(dets, gt_json, classes, cfg.max_det, iou_thresholds, backend, ci_resamples)
    result["time_inference_s"] = round(t1 - t0, 3)
    result["time_metrics_s"] = round(time.perf_counter() - t1, 3)
    return result, samples


def evaluate_checkpoint(weights: str | Path, split: str = "test", dataset: str | Path | None = None,
                        fold: int | None = None, batch: int = 16, workers: int = 2, device: str = "auto",
                        overrides: dict[str, Any] | None = None, iou_thresholds: list[float] | None = None,
                        backend: str = "auto", ci_resamples: int = 1000, dets_out: Path | None = None
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate a checkpoint on a split of its own dataset and fold (or of `dataset`/`fold`): `kdcli val` and the
    cells of a study, with the bootstrap interval of mAP50 over images. `overrides` may change the postprocess
    keys conf, nms_iou, max_det."""
    from kdcli.engine import checkpoint, distributed

    ckpt = checkpoint.load(weights)
    model = checkpoint.model_from_checkpoint(ckpt, str(weights))
    model_cfg = model.cfg.model_copy(update={k: v for k, v in (overrides or {}).items() if v is not None})
    dev = distributed.resolve_device(device)
    model.to(dev)
    return evaluate_split(model, model_cfg, ckpt.model.classes, ckpt.model.imgsz, ckpt.data, weights, split, dataset,
                          fold, batch, workers, dev, iou_thresholds, backend, ci_resamples, dets_out)


def evaluate_split(model: torch.nn.Module | Detect, cfg: ModelConfig, classes: list[str], imgsz: int, data: Any,
                   weights: str | Path, split: str = "test", dataset: str | Path | None = None,
                   fold: int | None = None, batch: int = 16, workers: int = 2, device: torch.device | None = None,
                   iou_thresholds: list[float] | None = None, backend: str = "auto", ci_resamples: int = 1000,
                   dets_out: Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate `model` (trained on `data`: a checkpoint's DataInfo, whose dir, fold, letterbox and channels it
    was trained with) on `split` of that dataset dir and fold, or of `dataset`/`fold`."""
    from kdcli.data import coco
    from kdcli.data.dataset import DetectionDataset, collate, loader_workers

    dataset_dir = Path(dataset) if dataset is not None else Path(data.path)
    if dataset is None and not dataset_dir.is_dir():
        raise KdcliError(f"{weights}: its dataset dir {dataset_dir} no longer exists",
                         hint="if it moved, pass the new place: kdcli val ... data=NEWDIR")
    fold = fold if fold is not None else data.fold
    if coco.read_dataset_yaml(dataset_dir)["classes"] != classes:
        raise KdcliError(f"{dataset_dir}: classes differ from the model's {classes}")
    dev = device or torch.device("cpu")
    ds = DetectionDataset(dataset_dir, split, fold, imgsz, data.letterbox, channels=data.channels)
    loader = DataLoader(ds, batch_size=batch, num_workers=loader_workers(workers), collate_fn=collate)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    result, samples = evaluate(model, loader, ds.coco, classes, cfg, dev,
                               [0.1, 0.25, 0.5, 0.75] if iou_thresholds is None else iou_thresholds, backend, amp,
                               ci_resamples, dets_out)
    result.update({"weights": str(weights), "dataset": str(dataset_dir), "fold": fold, "split": split})
    return result, samples
