"""`kdcli export`: a checkpoint as ONNX or TorchScript for deployment, with a parity check against PyTorch.

The exported graph takes images [B, 3, S, S] as 0-255 values (uint8 or float, letterboxed top-left as kdcli
does) and normalises them itself. NMS outside the graph: outputs `boxes` [B, A, 4] (xyxy input pixels) and
`scores` [B, A, K] (sigmoid), for the runtime's own NMS. NMS inside (ONNX): `detections` [N, 7] rows of
(image index, x0, y0, x1, y1, score, class) after score threshold and class-agnostic or per-class NMS.
Class names, input size, normalisation and the postprocess settings are stored as metadata.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import batched_nms

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
        h, w = images.shape[-2:]
        # clamped to the input before NMS, as kdcli's own postprocess does (IoUs, hence suppression, depend on it)
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w),
                             boxes[..., 3].clamp(0, h)], -1)
        b, a, _ = scores.shape
        best, label = scores.max(-1)
        image = torch.arange(b, device=images.device)[:, None].expand(b, a)
        keep = best > self.conf
        boxes, best, label, image = boxes[keep], best[keep], label[keep], image[keep]
        # one NMS over the batch: offsetting boxes by image (and class) keeps groups apart
        group = image * (1 if self.agnostic else scores.shape[-1] + 1) + (0 if self.agnostic else label)
        kept = batched_nms(boxes, best, group, self.iou)
        return torch.cat([image[kept, None].float(), boxes[kept], best[kept, None], label[kept, None].float()], 1)


def metadata(ckpt: checkpoint.Checkpoint, nms: bool, half: bool) -> dict[str, str]:
    m = ckpt.model
    cfg = m.config
    return {"kdcli_classes": json.dumps(m.classes), "kdcli_imgsz": str(m.imgsz),
            "kdcli_input": "RGB, 0-255, letterboxed top-left (pad 114), normalised inside the graph",
            "kdcli_outputs": "detections [N, 7]: image, x0, y0, x1, y1, score, class" if nms else
            "boxes [B, A, 4] xyxy input pixels; scores [B, A, K] sigmoid",
            "kdcli_postprocess": json.dumps({k: cfg.get(k) for k in ("conf", "nms_iou", "class_agnostic_nms",
                                                                     "max_det")}),
            "kdcli_precision": "fp16" if half else "fp32"}


def parity_inputs(ckpt: checkpoint.Checkpoint, n: int = 2) -> tuple[torch.Tensor, str]:
    """A few images of the checkpoint's own dataset (its val, test or train split), letterboxed, and where they
    came from; random pixels, said so, when no split of the dataset dir can be read on this machine (they check
    the graph, not the scores a real image gets)."""
    from kdcli.data.coco import split_name
    from kdcli.data.dataset import DetectionDataset, collate

    d, imgsz = ckpt.data, ckpt.model.imgsz
    for split in (d.val_split, d.test_split, d.train_split):
        try:
            ds = DetectionDataset(Path(d.path), split, d.fold, imgsz, d.letterbox)
        except KdcliError:
            continue
        if len(ds):
            return collate([ds[i] for i in range(min(n, len(ds)))])["images"], f"{d.path}, {split_name(split, d.fold)}"
    pixels = torch.randint(0, 256, (n, 3, imgsz, imgsz), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return pixels, f"random pixels: the dataset {d.path} is not readable here"


def export(weights: str | Path, fmt: str, out: Path, nms: bool = False, half: bool = False,
           tolerance: float | None = None) -> dict[str, Any]:
    """Write the model, run it on images of its dataset next to PyTorch and fail beyond `tolerance` (max abs difference
    of the scores; default 1e-3 in fp32, 2e-2 in fp16)."""
    ckpt = checkpoint.load(weights)
    model = checkpoint.model_from_checkpoint(ckpt, str(weights)).eval()
    imgsz = ckpt.model.imgsz
    raw = Raw(model, imgsz).eval()
    cfg = model.cfg
    net: nn.Module = WithNMS(raw, cfg.conf, cfg.nms_iou, cfg.class_agnostic_nms, cfg.max_det) if nms else raw
    images, source = parity_inputs(ckpt)
    x = images.float()
    with torch.no_grad():
        reference = net(x)
    tolerance = tolerance if tolerance is not None else (2e-2 if half else 1e-3)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(ckpt, nms, half)
    if fmt == "onnx":
        got = _onnx(net, x, out, nms, half, meta)
    elif fmt == "torchscript":
        if nms:
            raise KdcliError("--nms inside the graph is for ONNX; TorchScript users call torchvision's nms",
                             hint="drop --nms, or use --format onnx")
        got = _torchscript(net, x, out, half, meta)
    else:
        raise KdcliError(f"unknown format '{fmt}'", hint="use onnx or torchscript")
    diff = _parity(reference, got, nms)
    result = {"file": str(out), "format": fmt, "nms": nms, "precision": "fp16" if half else "fp32",
              "inputs": int(x.shape[0]), "inputs_from": source, "max_abs_diff": diff, "tolerance": tolerance, **meta}
    if diff > tolerance:
        raise KdcliError(f"{out}: parity check failed: max |difference| {diff:.3g} > {tolerance:.3g} on "
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


def _onnx(net: nn.Module, x: torch.Tensor, out: Path, nms: bool, half: bool, meta: dict[str, str]
          ) -> list[np.ndarray]:
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about constants: the anchors are fixed for the input size
        torch.onnx.export(net_x, (example,), str(out), input_names=["images"], output_names=names,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    m = onnx.load(str(out))
    for k, v in meta.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(m, str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = x.numpy().astype(np.float16 if half else np.float32)
    return [np.asarray(o, dtype=np.float32) for o in sess.run(None, {"images": feed})]


def _torchscript(net: nn.Module, x: torch.Tensor, out: Path, half: bool, meta: dict[str, str]) -> list[np.ndarray]:
    net_x = copy.deepcopy(net).half() if half else net
    example = x.half() if half else x
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net_x, (example,), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={k: v.encode() for k, v in meta.items()})
        got = torch.jit.load(str(out))(example)
    return [t.float().numpy() for t in got]
