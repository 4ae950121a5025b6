"""Training-step benchmarks: time per image for a detector recipe (forward, assignment + losses, backward,
optimizer step), the share spent in assignment + losses, peak GPU memory, and torchvision's
`retinanet_resnet50_fpn` on the same batch as a reference row. Warm-up steps first, then the median and spread
of timed steps.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch

from kdcli.config.schema import ModelConfig
from kdcli.engine.acceleration import compile_forward
from kdcli.models.detector import build_detector
from kdcli.models.losses import DetectionLoss


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": str(torch.__version__), "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch: int, imgsz: int, num_classes: int, device: torch.device, seed: int = 0):
    """A batch of random images with 10 boxes each (vehicle-sized), identical for every model measured."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 255, (batch, 3, imgsz, imgsz), generator=g, dtype=torch.uint8).to(device)
    boxes, labels = [], []
    for _ in range(batch):
        xy = torch.rand(10, 2, generator=g) * (imgsz - 40)
        wh = 8 + torch.rand(10, 2, generator=g) * 30
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        labels.append(torch.randint(0, num_classes, (10,), generator=g).to(device))
    return images, boxes, labels


def _time(step: Callable[[], dict[str, float]], device: torch.device, warmup: int, repeats: int
          ) -> tuple[list[float], dict[str, float]]:
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, parts = [], {}
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        p = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        for k, v in p.items():
            parts.setdefault(k, []).append(v)
    return times, {k: statistics.median(v) for k, v in parts.items()}


def _time_round_robin(steps: list[Callable[[], dict[str, float]]], device: torch.device, warmup: int, repeats: int
                      ) -> tuple[list[list[float]], list[int]]:
    """(seconds of each step's `repeats` timed runs, peak GPU bytes of each): every step warmed up first, then
    `repeats` rounds that time each step once, so that two rows' ratio is taken between steps moments apart (a load
    that comes and goes on the machine moves both, not one row's whole series)."""
    for step in steps:
        for _ in range(warmup):
            step()
    _sync(device)
    times: list[list[float]] = [[] for _ in steps]
    peaks = [0] * len(steps)
    for _ in range(repeats):
        for i, step in enumerate(steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[i] = max(peaks[i], torch.cuda.max_memory_allocated(device))
    return times, peaks


def spread(values: list[float]) -> dict[str, float]:
    """min, quartiles and max of repeated measurements (`n` of them): how far one figure can be trusted."""
    q1, q3 = (float(x) for x in np.percentile(values, [25, 75]))
    return {"min": round(min(values), 3), "q1": round(q1, 3), "q3": round(q3, 3), "max": round(max(values), 3),
            "n": len(values)}


def train_step(cfg: ModelConfig, imgsz: int, batch: int, device: torch.device, amp: torch.dtype | None,
               num_classes: int = 8, anchor_size: float = 16.0, warmup: int = 2, repeats: int = 5,
               channels_last: bool = False, compile: bool = False) -> dict[str, Any]:
    """One training step of `cfg`; `channels_last` / `compile` as the recipe options of the same names (a
    compiled model gets 2 more warm-up steps, its compilation is left out of the timing)."""
    model = build_detector(cfg, num_classes, imgsz, anchor_size).to(device).train()
    loss_fn = DetectionLoss(cfg, num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images, boxes, labels = synthetic_batch(batch, imgsz, num_classes, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if compile:
        compile_forward(model, device)
        warmup += 2

    def step() -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(images)
        _sync(device)
        t0 = time.perf_counter()
        terms = loss_fn(out, boxes, labels)
        _sync(device)
        t_loss = time.perf_counter() - t0
        terms["total"].backward()
        opt.step()
        return {"loss_s": t_loss}

    times, parts = _time(step, device, warmup, repeats)
    med = statistics.median(times)
    return {"model": f"{cfg.backbone}+{cfg.neck}", "imgsz": imgsz, "batch": batch,
            "step_s": round(med, 4), "step_min_s": round(min(times), 4), "step_max_s": round(max(times), 4),
            "ms_per_image": round(1000 * med / batch, 2), "images_per_s": round(batch / med, 2),
            "assign_loss_share": round(parts["loss_s"] / med, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
            else None, "amp": str(amp).split(".")[-1] if amp else "off",
            "options": "+".join(n for n, on in (("channels_last", channels_last), ("compile", compile)) if on)
            or "-"}


def torchvision_reference(imgsz: int, batch: int, device: torch.device, amp: torch.dtype | None,
                          num_classes: int = 8, warmup: int = 2, repeats: int = 5) -> dict[str, Any]:
    """torchvision's RetinaNet (ResNet50-FPN, 4 head convs, focal loss) on the same batch, random init."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                   min_size=imgsz, max_size=imgsz).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images, boxes, labels = synthetic_batch(batch, imgsz, num_classes, device)
    imgs = [im.float() / 255 for im in images]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]

    def step() -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            losses = model(imgs, targets)
        sum(losses.values()).backward()
        opt.step()
        return {}

    times, _ = _time(step, device, warmup, repeats)
    med = statistics.median(times)
    return {"model": "torchvision retinanet_resnet50_fpn", "imgsz": imgsz, "batch": batch, "step_s": round(med, 4),
            "step_min_s": round(min(times), 4), "step_max_s": round(max(times), 4),
            "ms_per_image": round(1000 * med / batch, 2), "images_per_s": round(batch / med, 2),
            "assign_loss_share": None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
            else None, "amp": str(amp).split(".")[-1] if amp else "off"}


def distill_rows() -> list[tuple[str, str, bool]]:
    """(labels, method, pooled): hard, hard+soft, hard+METHOD for every registered feature method, soft, soft+METHOD,
    then hard+soft and hard+pdf with an unlabelled pool (as many pool images as labelled ones per step)."""
    from kdcli.config.schema import method_names

    methods = method_names()
    return ([("hard", "none", False), ("hard+soft", "none", False)] + [("hard", m, False) for m in methods]
            + [("soft", "none", False)] + [("soft", m, False) for m in methods]
            + [("hard+soft", "none", True), ("hard", "pdf", True)])


def _flops(fn: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def distill_steps(teacher_cfg: ModelConfig, student_cfg: ModelConfig, imgsz: int, batch: int,
                  device: torch.device, amp: torch.dtype | None, num_classes: int = 8, anchor_size: float = 16.0,
                  warmup: int = 2, repeats: int = 5, rows: list[tuple[str, str, bool]] | None = None
                  ) -> dict[str, Any]:
    """Step time of each student row (`rows`, default `distill_rows()`, the first being the hard student's)
    relative to the first on the same batch (rows timed in turn, round after round: the median of each round's
    ratio to the hard step, and the spread of those ratios), the peak GPU memory of each, and the FLOP ratio
    (student fwd+bwd + teacher fwd) / (student fwd+bwd), for the full and the truncated teacher. Each row runs
    through the same `Distiller.student_loss` as `kdcli distill`; a pooled row's step also takes `batch` pool
    images (no boxes), so its ratio is the cost of distilling on unlabelled images at ratio 1."""
    from kdcli.config.schema import DistillConfig
    from kdcli.distill.distiller import Distiller

    teacher = build_detector(teacher_cfg, num_classes, imgsz, anchor_size).to(device).eval()
    student = build_detector(student_cfg, num_classes, imgsz, anchor_size).to(device).train()
    loss_fn = DetectionLoss(student_cfg, num_classes)
    student_opt = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)  # one for every row: one momentum
    images, boxes, labels = synthetic_batch(batch, imgsz, num_classes, device)
    pool_images, _, _ = synthetic_batch(batch, imgsz, num_classes, device, seed=1)
    plain = {"images": images, "boxes": boxes, "labels": labels, "labeled": [True] * batch}
    empty = [torch.zeros(0, 4, device=device)] * batch
    pooled = {"images": torch.cat([images, pool_images]), "boxes": boxes + empty,
              "labels": labels + [torch.zeros(0, dtype=torch.long, device=device)] * batch,
              "labeled": [True] * batch + [False] * batch}

    def make_step(labels_mode: str, method: str, pool: bool
                  ) -> tuple[Callable[[], dict[str, float]], bool, list[str]]:
        cfg = DistillConfig(labels=labels_mode, method=method, unlabeled="rest" if pool else None)
        distiller = Distiller(cfg, teacher, student_cfg.channels)
        distiller.to(device).train()
        params = [p for m in distiller.trainable() for p in m.parameters()]
        opts = [student_opt] + ([torch.optim.SGD(params, lr=1e-4, momentum=0.9)] if params else [])
        data = pooled if pool else plain
        names: list[str] = []  # the step's terms (each method's own), filled by the first step

        def step() -> dict[str, float]:
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                terms = distiller.student_loss(student, loss_fn, data)
            terms["total"].backward()
            for opt in opts:
                opt.step()
            names[:] = [k for k in terms if k != "total"]
            return {}

        return step, distiller.teacher_head, names

    student_flops = _flops(lambda: loss_fn(student(images), boxes, labels)["total"].backward())
    teacher_full = _flops(lambda: teacher(images))
    teacher_trunc = _flops(lambda: teacher(images, head=False))
    specs = list(rows or distill_rows())
    steps = [make_step(*spec) for spec in specs]
    timed, peaks = _time_round_robin([st for st, _, _ in steps], device, warmup, repeats)
    measured = []
    for (labels_mode, method, pool), (_, head, names), times, peak in zip(specs, steps, timed, peaks):
        med = statistics.median(times)
        ratios = [t / b for t, b in zip(times, timed[0])]  # each against the hard step of the same round
        uses_teacher = labels_mode != "hard" or method != "none"
        t_flops = (teacher_full if head else teacher_trunc) if uses_teacher else 0.0
        scale = 2 if pool else 1  # a pooled step runs student and teacher on twice the images
        measured.append({"row": (labels_mode if method == "none" else f"{labels_mode}+{method}") + ("@pool" if pool
                                                                                                else ""),
                     "teacher": "-" if not uses_teacher else ("full" if head else "backbone+neck"),
                     "terms": list(names),
                     "images": batch * scale, "step_s": round(med, 4),
                     "time_ratio": round(statistics.median(ratios), 3), "time_ratio_spread": spread(ratios),
                     "flop_ratio": round(scale * (student_flops + t_flops) / student_flops, 3),
                     "peak_mem_gib": round(peak / 2**30, 2) if device.type == "cuda" else None})
    return {"imgsz": imgsz, "batch": batch, "amp": str(amp).split(".")[-1] if amp else "off",
            "student_fwd_bwd_gflops": round(student_flops / 1e9, 2),
            "teacher_fwd_gflops": round(teacher_full / 1e9, 2),
            "teacher_backbone_neck_gflops": round(teacher_trunc / 1e9, 2),
            "truncation_saving": round(1 - teacher_trunc / teacher_full, 3), "rows": measured}


def _stats(times: list[float]) -> dict[str, float]:
    q10, q90 = (float(x) for x in np.percentile(times, [10, 90]))
    return {"median_ms": round(1000 * statistics.median(times), 2), "p10_ms": round(1000 * q10, 2),
            "p90_ms": round(1000 * q90, 2)}


@torch.no_grad()
def inference(model: torch.nn.Module, imgsz: int, batch: int, device: torch.device, amp: torch.dtype | None,
              warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    """Forward + postprocess latency at batch 1, and throughput at `batch` (images per second)."""
    from kdcli.models.postprocess import postprocess

    model = model.to(device).eval()
    out: dict[str, Any] = {"imgsz": imgsz}
    for n, key in ((1, "latency_b1"), (batch, f"batch_{batch}")):
        images, _, _ = synthetic_batch(n, imgsz, 1, device)

        def step(images: torch.Tensor = images) -> dict[str, float]:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                postprocess(model(images), model.cfg, (imgsz, imgsz))
            return {}

        times, _ = _time(step, device, warmup, repeats)
        out[key] = _stats(times)
        if n == batch:
            out["throughput_img_s"] = round(batch / statistics.median(times), 2)
    return out


def evaluation(images: int = 500, objects: int = 20, detections: int = 100, classes: int = 8, repeats: int = 3,
               seed: int = 0) -> dict[str, Any]:
    """Seconds to score the same detections with kdcli's metrics (VOC-style + COCO-style) and with
    pycocotools' COCOeval, on a synthetic split of vehicle-sized boxes."""
    from kdcli.engine import metrics as M
    from kdcli.engine.validator import pycoco_per_class

    rng = np.random.default_rng(seed)
    anns, ids, labels, scores, boxes = [], [], [], [], []
    for i in range(1, images + 1):
        xy = rng.uniform(0, 480, (objects, 2))
        wh = rng.uniform(8, 40, (objects, 2))
        cls = rng.integers(0, classes, objects)
        for (x, y), (w, h), c in zip(xy, wh, cls):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1, "bbox": [x, y, w, h],
                         "area": float(w * h), "iscrowd": 0})
        pick = rng.integers(0, objects, detections)
        jitter = rng.normal(0, 3, (detections, 4))
        b = np.concatenate([xy[pick], xy[pick] + wh[pick]], 1) + jitter
        ids.append(np.full(detections, i))
        labels.append(np.where(rng.random(detections) < 0.8, cls[pick], rng.integers(0, classes, detections)))
        scores.append(rng.random(detections))
        boxes.append(b)
    gt_json = {"images": [{"id": i, "width": 512, "height": 512, "file_name": f"{i}.png"}
                          for i in range(1, images + 1)],
               "annotations": anns, "categories": [{"id": k + 1, "name": str(k)} for k in range(classes)]}
    dets = M.Detections(np.concatenate(ids), np.concatenate(labels), np.concatenate(scores), np.concatenate(boxes))
    gt = M.ground_truth(gt_json)
    image_ids = [im["id"] for im in gt_json["images"]]

    def ours() -> dict[str, float]:
        M.voc_per_class(dets, gt, classes, 0.5)
        M.coco_per_class(dets, gt, classes, image_ids, max_det=detections)
        return {}

    def theirs() -> dict[str, float]:
        pycoco_per_class(dets, gt_json, detections, "pycocotools")
        return {}

    cpu = torch.device("cpu")
    t_ours, _ = _time(ours, cpu, 1, repeats)
    t_theirs, _ = _time(theirs, cpu, 1, repeats)
    result = {"images": images, "objects": images * objects, "detections": images * detections,
              "kdcli_s": round(statistics.median(t_ours), 3), "pycocotools_s": round(statistics.median(t_theirs), 3),
              "speedup": round(statistics.median(t_theirs) / statistics.median(t_ours), 2)}
    from kdcli.engine.validator import coco_backend

    if coco_backend() == "faster-coco-eval":  # installed (`kdcli[fast-eval]`): the validator's choice, timed too
        def fast() -> dict[str, float]:
            pycoco_per_class(dets, gt_json, detections, "faster-coco-eval")
            return {}

        t_fast, _ = _time(fast, cpu, 1, repeats)
        result["faster_coco_eval_s"] = round(statistics.median(t_fast), 3)
        result["speedup_faster_coco_eval"] = round(statistics.median(t_fast) / statistics.median(t_ours), 2)
    return result


def train_epoch(cfg: ModelConfig, dataset: str, fold: int | None, imgsz: int, batch: int, device: str, amp: str,
                workers: int, max_batches: int | None = None, channels_last: bool = False, compile: bool = False
                ) -> dict[str, Any]:
    """One real training epoch of `cfg` through kdcli's Trainer and loader on a dataset dir (validation, plots
    and EMA off, checkpoints to a temporary folder): images/s end to end; then `kdcli train` of one step in a
    fresh process, for the seconds from the command to the end of its first step (imports, dataset reading, model
    build, loader start). Next to the step figure it shows what the loader, the loop and the start cost."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from kdcli import atomic
    from kdcli.config import schema
    from kdcli.config.load import dump
    from kdcli.engine.trainer import Trainer
    from kdcli.errors import FAILED, KdcliError

    recipe = schema.Recipe.model_validate({
        "data": {"path": dataset, "fold": fold, "imgsz": imgsz, "val_split": "", "workers": workers},
        "model": cfg.model_dump(), "train": {"epochs": 1, "batch": batch, "device": device, "amp": amp,
                                             "plots": False, "ema": False, "max_batches": max_batches,
                                             "channels_last": channels_last, "compile": compile}})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, run_dir=Path(tmp) / "run")
        trainer.fit()
        atomic.write_yaml(Path(tmp) / "recipe.yaml", dump(recipe))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kdcli", "train", str(Path(tmp) / "recipe.yaml"),
                               "train.max_batches=1", "--json"], capture_output=True, text=True,
                              env={**os.environ, "KDCLI_RUNS": str(Path(tmp) / "runs")})
        if proc.returncode != 0:
            raise KdcliError(f"kdcli train for the start-up timing failed: {proc.stderr.strip().splitlines()[-1:]}",
                             exit_code=FAILED)
        started = json.loads(proc.stdout.strip().splitlines()[-1])
        command_s = time.perf_counter() - t0
    seconds = trainer.history[-1]["train_s"]
    images = trainer.images_per_epoch()
    return {"dataset": dataset, "images": images, "epoch_s": round(seconds, 2),
            "images_per_s": round(images / seconds, 1), "first_step_s": started["first_step_s"],
            "command_s": round(command_s, 2)}
