"""`kdcli export`: a checkpoint as ONNX or TorchScript for deployment, with a parity check against PyTorch.

The exported graph takes images [B, 3, S, S] as 0-255 values (uint8 or float, letterboxed top-left as kdcli
does) and normalises them itself. NMS outside the graph: outputs `boxes` [B, A, 4] (xyxy input pixels) and
`scores` [B, A, K] (sigmoid), for the runtime's own NMS. NMS inside (ONNX): `detections` [N, 7] rows of
(image index, x0, y0, x1, y1, score, class) after score threshold and class-agnostic or per-class NMS.
Class names, input size, normalisation, the postprocess settings and the dataset (dir, fold, splits, letterbox,
channels: what `kdcli val model.onnx` evaluates on) are stored as metadata.

INT8 (`int8=True`, ONNX only): ONNX Runtime's static quantization of the float graph in QDQ form (what ONNX Runtime
fuses into integer kernels; the form other runtimes read too): int8 weights, one scale per output channel by
default (depthwise convolutions need it most), and uint8 activations (U8S8: ONNX Runtime's fast
path on x86; S8S8 measured 2.6x slower on a VNNI CPU, slower than float for a MobileNet), their ranges calibrated
(min-max) on images letterboxed as the model sees them: a folder of images of the model's band count, or a split of
the checkpoint's dataset (default: its train split, at most `CALIB_IMAGES`, evenly spaced). Only the detector's
own nodes are quantized: the box decoding, sigmoid and NMS stay float, so boxes keep sub-pixel precision. Its
parity check compares detections rather than raw scores (`int8_parity`). Measured on this CPU study's 12 trained
students (R18, MobileNetV3-Large/Small; hard+pdf and hard+crosskd+pdf, folds 1-2): test mAP50 within -1.14..+0.89
points of the float model, 95th percentile of the score difference 0.008-0.108, its maximum 0.04-0.46 (one
detection near the threshold may move that much without changing the mAP, hence the percentile as the gate).
Percentile and entropy calibration did no better on mAP (MobileNetV3-Large: 69.4 and 69.1 against 69.1 min-max).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

from kdcli import atomic
from kdcli.engine import checkpoint
from kdcli.errors import FAILED, KdcliError
from kdcli.models.anchors import decode
from kdcli.models.detector import Detector


class Raw(nn.Module):
    """Decoded boxes and sigmoid scores for every anchor (anchors baked in for the export size)."""

    def __init__(self, model: Detector, imgsz: int):
        super().__init__()
        self.model = model
        self.register_buffer("anchor_boxes", model.anchors(imgsz, imgsz, torch.device("cpu")).clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return decode(out.box_deltas.float(), self.anchor_boxes), torch.sigmoid(out.cls_logits.float())


class WithNMS(nn.Module):
    """Raw outputs, then threshold + NMS over the whole batch: rows (image, x0, y0, x1, y1, score, class)."""

    def __init__(self, raw: Raw, conf: float, iou: float, class_agnostic: bool, max_det: int):
        super().__init__()
        self.raw, self.conf, self.iou, self.agnostic, self.max_det = raw, conf, iou, class_agnostic, max_det

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        boxes, scores = self.raw(images)
        return detections(boxes, scores, self.conf, self.iou, self.agnostic, tuple(images.shape[-2:]))


CALIB_IMAGES = 200  # calibration images at most: min-max ranges settle within a few hundred (ONNX Runtime's guide)
INT8_MIN_SCORE = 0.1  # int8 parity compares detections scoring at least this in PyTorch (or in the int8 model)
INT8_TOLERANCE = 0.15  # default 95th percentile of |score difference| over int8 detections (measured 0.008-0.108)


def default_tolerance(half: bool = False, int8: bool = False) -> float:
    return INT8_TOLERANCE if int8 else 2e-2 if half else 1e-3


def metadata(ckpt: checkpoint.Checkpoint, nms: bool, precision: str) -> dict[str, str]:
    m = ckpt.model
    cfg = m.config
    return {"kdcli_classes": json.dumps(m.classes), "kdcli_imgsz": str(m.imgsz),
            "kdcli_input": "RGB, 0-255, letterboxed top-left (pad 114), normalised inside the graph",
            "kdcli_outputs": "detections [N, 7]: image, x0, y0, x1, y1, score, class" if nms else
            "boxes [B, A, 4] xyxy input pixels; scores [B, A, K] sigmoid",
            "kdcli_postprocess": json.dumps({k: cfg.get(k) for k in ("conf", "nms_iou", "class_agnostic_nms",
                                                                     "max_det")}),
            "kdcli_precision": precision, "kdcli_backbone": str(cfg.get("backbone", "resnet18")),
            "kdcli_data": ckpt.data.model_dump_json()}


def parity_inputs(ckpt: checkpoint.Checkpoint, n: int = 2, dataset: Path | None = None) -> tuple[torch.Tensor, str]:
    """A few images of the checkpoint's own dataset (its val, test or train split), letterboxed, and where they
    came from; random pixels, said so, when no split of the dataset dir can be read on this machine (they check
    the graph, not the scores a real image gets)."""
    from kdcli.data.coco import split_name
    from kdcli.data.dataset import collate

    d, imgsz = ckpt.data, ckpt.model.imgsz
    where = Path(dataset or d.path)
    for split in (d.val_split, d.test_split, d.train_split):
        ds = _split(ckpt, split, where)
        if ds is not None and len(ds):
            return collate([ds[i] for i in range(min(n, len(ds)))])["images"], f"{where}, {split_name(split, d.fold)}"
    pixels = torch.randint(0, 256, (n, 3, imgsz, imgsz), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return pixels, f"random pixels: the dataset {where} is not readable here"


def _split(ckpt: checkpoint.Checkpoint, split: str, where: Path):
    """The split of the dataset dir `where` as the model sees it, or None when it cannot be read here."""
    from kdcli.data.dataset import DetectionDataset

    d = ckpt.data
    try:
        return DetectionDataset(where, split, d.fold, ckpt.model.imgsz, d.letterbox, channels=d.channels)
    except KdcliError:
        return None


def calibration_images(ckpt: checkpoint.Checkpoint, calib: str | None, limit: int = CALIB_IMAGES,
                       dataset: Path | None = None) -> tuple[np.ndarray, str]:
    """Up to `limit` images [N, 3, S, S] float32 (0-255, letterboxed as the model's input), evenly spaced over a
    folder of images or a split of the checkpoint's dataset (default: its train split, else val), and where they
    came from. Every image of a folder must have the model's band count (3 for an RGB model; 1, or 3, for an IR
    one): calibrating on other bands would fit the int8 ranges to pixels the model never sees."""
    from kdcli.data.coco import split_name

    d = ckpt.data
    where = Path(dataset or d.path)
    if calib is not None and Path(calib).is_dir():
        return _folder_images(ckpt, Path(calib), limit)
    splits = [calib] if calib is not None else [d.train_split, d.val_split]
    for split in splits:
        ds = _split(ckpt, split, where)
        if ds is not None and len(ds):
            pick = np.unique(np.linspace(0, len(ds) - 1, min(limit, len(ds))).round().astype(int))
            images = np.stack([ds[int(i)]["image"].numpy() for i in pick]).astype(np.float32)
            return images, f"{len(pick)} images of {where}, {split_name(split, d.fold)}"
    if calib is not None:
        raise KdcliError(f"--calib {calib}: neither a folder nor a readable split of the checkpoint's dataset {where}",
                         hint="give a folder of images like the model's input, or a split name such as train or val")
    raise KdcliError(f"no calibration images: the checkpoint's dataset {where} is not readable here",
                     hint="give --calib FOLDER (images like the model's input)")


def _folder_images(ckpt: checkpoint.Checkpoint, folder: Path, limit: int) -> tuple[np.ndarray, str]:
    from kdcli.data.rasters import IMAGE_SUFFIXES, open_raster
    from kdcli.data.transforms import eval_transform

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise KdcliError(f"--calib {folder}: no image in the folder",
                         hint=f"give a folder of {', '.join(IMAGE_SUFFIXES)} files like the model's input")
    bands = (1, 3) if ckpt.data.channels == "ir" else (3,)
    picked = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, min(limit, len(files))).round().astype(int))]
    transform = eval_transform(ckpt.model.imgsz, ckpt.data.letterbox)
    images = []
    for path in picked:
        r = open_raster(path)
        try:
            if r.bands not in bands:
                raise KdcliError(f"--calib {folder}: {path.name} has {r.bands} band(s); the model takes "
                                 f"{' or '.join(map(str, bands))} ({ckpt.data.channels})",
                                 hint="calibrate on images with the model's bands, or give a dataset split (e.g. "
                                      "--calib train)")
            images.append(transform(image=r.read(0, 0, r.width, r.height), bboxes=np.zeros((0, 4)),
                                    labels=[])["image"])
        finally:
            r.close()
    images = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)
    return images, f"{len(images)} images of {folder}"


def export(weights: str | Path, fmt: str, out: Path, nms: bool = False, half: bool = False,
           tolerance: float | None = None, int8: bool = False, calib: str | None = None,
           calib_images: int = CALIB_IMAGES, per_channel: bool = True, dataset: Path | None = None) -> dict[str, Any]:
    """Write the model, run it on images of its dataset next to PyTorch and fail beyond `tolerance`: max |difference|
    of the scores (default 1e-3 in fp32, 2e-2 in fp16); in int8, of matched detections' scores (`int8_parity`).
    `dataset` replaces the checkpoint's dataset dir for the parity and calibration images."""
    if fmt not in ("onnx", "torchscript"):
        raise KdcliError(f"unknown format '{fmt}'", hint="use onnx or torchscript")
    if nms and fmt == "torchscript":
        raise KdcliError("--nms inside the graph is for ONNX; TorchScript users call torchvision's nms",
                         hint="drop --nms, or use --format onnx")
    if int8 and fmt != "onnx":
        raise KdcliError(f"--int8 is ONNX Runtime's static quantization: not available for {fmt}",
                         hint="use --format onnx --int8")
    if int8 and half:
        raise KdcliError("--int8 and --half: choose one precision")
    ckpt = checkpoint.load(weights)
    calibration = calibration_images(ckpt, calib, calib_images, dataset) if int8 else None  # before any file
    model = checkpoint.model_from_checkpoint(ckpt, str(weights)).eval()
    imgsz = ckpt.model.imgsz
    raw = Raw(model, imgsz).eval()
    cfg = model.cfg
    net: nn.Module = WithNMS(raw, cfg.conf, cfg.nms_iou, cfg.class_agnostic_nms, cfg.max_det) if nms else raw
    images, source = parity_inputs(ckpt, 8 if int8 else 2, dataset)
    x = images.float()
    with torch.no_grad():
        reference = net(x)
    precision = "int8" if int8 else "fp16" if half else "fp32"
    tolerance = tolerance if tolerance is not None else default_tolerance(half, int8)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(ckpt, nms, precision)
    result: dict[str, Any] = {}
    if int8:
        settings = {"format": "QDQ", "weights": "int8 per channel" if per_channel else "int8 per tensor",
                    "activations": "uint8 per tensor", "calibration": "min-max", "calibrated_on": calibration[1]}
        meta["kdcli_quantization"] = json.dumps(settings)
        got = _onnx(net, x, out, nms, False, meta, (calibration[0], per_channel))
        # GroupNorm cannot be folded into the convolution before it (BatchNorm can): each stays a float island
        # between int8 layers, which costs the speed INT8 is for (docs/results.md: Measured on this CPU)
        groupnorms = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
        result = {"quantization": settings, "float_groupnorms": groupnorms,
                  **int8_parity(reference, got, nms, cfg, (imgsz, imgsz))}
        # the gate: the 95th percentile over detections (one detection near the threshold may move more without
        # changing the mAP); no detection scored min_score (an untrained model): every anchor's scores, as in float
        diff = result["p95_score_diff"] if result["detections_compared"] else result["max_anchor_score_diff"] or 0.0
    elif fmt == "onnx":
        diff = _parity(reference, _onnx(net, x, out, nms, half, meta), nms)
    else:
        diff = _parity(reference, _torchscript(net, x, out, half, meta), nms)
    result = {"file": str(out), "format": fmt, "nms": nms, "precision": precision, "inputs": int(x.shape[0]),
              "inputs_from": source, "checked_diff": diff,
              "max_abs_diff": result["max_score_diff"] if result.get("detections_compared") else diff,
              "tolerance": tolerance, **result, **meta}
    if diff > tolerance:
        what = (f" (95th percentile over detections scoring >= {INT8_MIN_SCORE:g})"
                if int8 and result["detections_compared"] else " max")
        raise KdcliError(f"{out}: parity check failed: |difference|{what} {diff:.3g} > {tolerance:.3g} on "
                         f"{x.shape[0]} images ({source})", hint="the exported file is kept for inspection",
                         exit_code=FAILED)
    return result


def _parity(reference: Any, got: list[np.ndarray], nms: bool) -> float:
    """Max |difference| of the scores (without NMS: of every anchor's class scores; with NMS: of the kept
    detections' scores, sorted, plus 1 per detection one side has and the other has not)."""
    if not nms:
        return float(np.abs(reference[1].numpy() - got[1]).max())
    ref, new = np.sort(reference.numpy()[:, 5]), np.sort(got[0][:, 5])
    n = min(len(ref), len(new))
    return float(np.abs(ref[len(ref) - n:] - new[len(new) - n:]).max(initial=0.0) + abs(len(ref) - len(new)))


def detections(boxes: torch.Tensor, scores: torch.Tensor, conf: float, iou: float, class_agnostic: bool,
               size: tuple[int, int]) -> torch.Tensor:
    """Rows (image, x0, y0, x1, y1, score, class) of decoded boxes [B, A, 4] and scores [B, A, K]: each anchor's
    best class above `conf`, boxes clamped to the input of `size` (h, w), then NMS; one NMS over the batch
    (offsetting boxes by image, and by class unless `class_agnostic`, keeps groups apart)."""
    h, w = size
    # clamped before NMS, as kdcli's own postprocess does (IoUs, hence suppression, depend on it)
    boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w),
                         boxes[..., 3].clamp(0, h)], -1)
    b, a, _ = scores.shape
    best, label = scores.max(-1)
    image = torch.arange(b, device=scores.device)[:, None].expand(b, a)
    keep = best > conf
    boxes, best, label, image = boxes[keep], best[keep], label[keep], image[keep]
    group = image * (1 if class_agnostic else scores.shape[-1] + 1) + (0 if class_agnostic else label)
    kept = batched_nms(boxes, best, group, iou)
    return torch.cat([image[kept, None].float(), boxes[kept], best[kept, None], label[kept, None].float()], 1)


def int8_parity(reference: Any, got: list[np.ndarray], nms: bool, cfg: Any, size: tuple[int, int],
                min_score: float = INT8_MIN_SCORE) -> dict[str, Any]:
    """Detections of PyTorch and of the int8 model (the checkpoint's conf and NMS) compared object by object:
    every detection scoring at least `min_score` in either model is matched to the other model's detection of
    the same class and image with the highest IoU (at least 0.5); its |score difference| is taken against that
    detection, or against `conf` when the other model has none (it scored below the threshold there).
    `max_score_diff` is the largest of these, `p95_score_diff` their 95th percentile (the export's gate),
    `agreement` the share matched. The detections are what a user
    sees; raw per-anchor scores (`max_anchor_score_diff`, the float exports' gate) also count anchors no one keeps,
    and NMS may keep a neighbouring anchor of the same object in int8, which a per-anchor comparison would count
    as a miss."""
    from torchvision.ops import box_iou

    if nms:
        ref, new = reference, torch.from_numpy(got[0])
    else:
        args = (cfg.conf, cfg.nms_iou, cfg.class_agnostic_nms, size)
        ref = detections(reference[0], reference[1], *args)
        new = detections(torch.from_numpy(got[0]), torch.from_numpy(got[1]), *args)
    diffs, matched = [], 0
    for a, b in ((ref, new), (new, ref)):
        for i in a[:, 0].unique():
            mine, theirs = a[(a[:, 0] == i) & (a[:, 5] >= min_score)], b[b[:, 0] == i]
            other = torch.full((len(mine),), float(cfg.conf))
            if len(mine) and len(theirs):
                iou = box_iou(mine[:, 1:5], theirs[:, 1:5]) * (mine[:, None, 6] == theirs[None, :, 6])
                best, j = iou.max(1)
                hit = best >= 0.5
                other = torch.where(hit, theirs[j, 5], other)
                matched += int(hit.sum())
            diffs.append((mine[:, 5] - other).abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    return {"max_score_diff": round(float(d.max()) if len(d) else 0.0, 4),
            "p95_score_diff": round(float(torch.quantile(d, 0.95)) if len(d) else 0.0, 4),
            "mean_score_diff": round(float(d.mean()) if len(d) else 0.0, 4),
            "detections_compared": int(len(d)), "agreement": round(matched / len(d), 4) if len(d) else 1.0,
            "min_score": min_score, "max_anchor_score_diff": None if nms else
            round(float(np.abs(reference[1].numpy() - got[1]).max()), 4)}


def _onnx(net: nn.Module, x: torch.Tensor, out: Path, nms: bool, half: bool, meta: dict[str, str],
          int8: tuple[np.ndarray, bool] | None = None) -> list[np.ndarray]:
    """Export (and with `int8` = (calibration images, per channel), quantize) to `out`, written whole or not at
    all; the outputs of the written file on `x`."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise KdcliError("ONNX export needs the onnx and onnxruntime packages",
                         hint='pip install "kdcli[export]"') from None
    names = ["detections"] if nms else ["boxes", "scores"]
    axes = {"images": {0: "batch"}, **({} if nms else {"boxes": {0: "batch"}, "scores": {0: "batch"}})}
    net_x = copy.deepcopy(net).half() if half else net
    example = x.half() if half else x
    with atomic.atomic_path(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about constants: the anchors are fixed for the input size
            torch.onnx.export(net_x, (example,), str(tmp), input_names=["images"], output_names=names,
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        if int8 is not None:
            _quantize(tmp, *int8)
        m = onnx.load(str(tmp))
        del m.metadata_props[:]
        for k, v in meta.items():
            entry = m.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(m, str(tmp))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = x.numpy().astype(np.float16 if half else np.float32)
    return [np.asarray(o, dtype=np.float32) for o in sess.run(None, {"images": feed})]


def _shape_arithmetic(graph: Any) -> set[str]:
    """Names of the nodes that compute on tensor shapes only: a `Shape` and every node all of whose inputs come
    from such nodes or constants (the graph's nodes are in topological order)."""
    constant = {i.name for i in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    shaped: set[str] = set()
    names: set[str] = set()
    for n in graph.node:
        inputs = [i for i in n.input if i and i not in constant]
        if n.op_type == "Shape" or (inputs and all(i in shaped for i in inputs)):
            shaped.update(n.output)
            names.add(n.name)
    return names


def _quantize(path: Path, images: np.ndarray, per_channel: bool) -> None:
    """`path` (a float ONNX graph) replaced by its QDQ int8 form, calibrated on `images` one at a time."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    ort.set_default_logger_severity(3)  # its C++ graph clean-up warns once per unused constant (timm's ReLU6 bounds)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i:i + 1] for i in range(len(images)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(({"images": b} for b in self.batches), None)

    # the detector's nodes (exported under its module name, `model`); the decoding, sigmoid and NMS stay float, and
    # so does shape arithmetic (TF SAME padding computed from the input's size: quantized, it pads wrongly)
    graph = onnx.load(str(path)).graph
    shape_nodes = _shape_arithmetic(graph)
    body = [n.name for n in graph.node if "/model/" in n.name and n.name not in shape_nodes]
    if not body:  # an empty list would quantize every node, the decoding included
        raise KdcliError(f"{path}: no detector node found to quantize (a kdcli bug: please report it)",
                         exit_code=FAILED)
    float_graph = path.with_suffix(".fp32.tmp")  # a killed run's leftover is removed by the next (atomic_path)
    path.replace(float_graph)
    logging.disable(logging.WARNING)  # the quantizer's advice goes to the root logger, line by line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(float_graph), str(path), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=body)
    finally:
        logging.disable(logging.NOTSET)
        float_graph.unlink(missing_ok=True)


def _torchscript(net: nn.Module, x: torch.Tensor, out: Path, half: bool, meta: dict[str, str]) -> list[np.ndarray]:
    net_x = copy.deepcopy(net).half() if half else net
    example = x.half() if half else x
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net_x, (example,), check_trace=False)
        with atomic.atomic_path(out) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={k: v.encode() for k, v in meta.items()})
        got = torch.jit.load(str(out))(example)
    return [t.float().numpy() for t in got]
