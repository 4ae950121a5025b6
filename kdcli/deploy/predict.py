"""`kdcli predict`: a checkpoint on images, folders, globs or whole scenes, optionally sliced into overlapping
windows run in batches; detections mapped back to scene pixels and merged across seams.

Memory stays bounded on a scene of any size: windows are read from disk one batch at a time (`Raster.read`:
GDAL, or tifffile's per-strip/tile decode; PNG/JPEG are decoded whole), each window keeps at most `max_det`
detections, and the drawing is a decimated read. A georeferenced scene's boxes are written in its own CRS
(`<stem>.map.geojson`, as before) and in WGS84 longitude/latitude as RFC 7946 asks (`<stem>.wgs84.geojson`).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms

from kdcli import atomic
from kdcli.config.schema import ModelConfig
from kdcli.data.rasters import IMAGE_SUFFIXES, Raster, warn_once
from kdcli.data.tiling import MIN_TILE, windows
from kdcli.data.transforms import eval_transform, input_scale
from kdcli.deploy.slicing import drop_cut_boxes, merge, to_scene
from kdcli.engine import checkpoint
from kdcli.engine.plots import draw
from kdcli.errors import KdcliError
from kdcli.models.postprocess import postprocess

DRAW_MAX_SIDE = 4096


def _onnx_session(path: str | Path, device: torch.device):
    try:
        import onnxruntime as ort
    except ImportError:
        raise KdcliError(f"{path}: running an ONNX model needs onnxruntime",
                         hint='pip install "kdcli[export]"') from None
    providers = (["CUDAExecutionProvider"] if device.type == "cuda" else []) + ["CPUExecutionProvider"]
    try:
        sess = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise KdcliError(f"{path}: cannot load the ONNX model ({str(e)[:200]})") from None
    meta = sess.get_modelmeta().custom_metadata_map
    if "kdcli_classes" not in meta:
        raise KdcliError(f"{path}: not exported by kdcli (no class names in its metadata)",
                         hint="export it with `kdcli export CKPT --format onnx`")
    return sess, meta


def with_overrides(cfg: ModelConfig, over: dict[str, Any]) -> ModelConfig:
    """`cfg` with the postprocess settings given on the command line, checked (a score threshold of 5 keeps
    nothing, silently)."""
    from pydantic import ValidationError

    if not over:
        return cfg
    try:
        return ModelConfig.model_validate({**cfg.model_dump(), **over})
    except ValidationError as e:
        first = e.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "postprocess"
        option = {"conf": "--conf", "nms_iou": "--iou", "max_det": "--max-det"}.get(key, key)
        raise KdcliError(f"{option} {over.get(key)}: {first['msg']}") from None


REEXPORT = "export the checkpoint again: kdcli export CKPT --format onnx"


def bad_metadata(path: str | Path, key: str, value: str | None, what: str) -> KdcliError:
    if value is None:
        return KdcliError(f"{path}: its kdcli metadata lacks {key} ({what})", hint=REEXPORT)
    shown = value if len(value) <= 60 else value[:57] + "..."
    return KdcliError(f"{path}: metadata {key} = {shown!r} is not {what}", hint=REEXPORT)


def onnx_metadata(path: str | Path, sess: Any, meta: dict[str, str], over: dict[str, Any]
                  ) -> tuple[ModelConfig, list[str], int, bool]:
    """(postprocess settings with `over` applied, class names, input size, fp16 input) from an exported model's
    metadata, each key checked against the graph: a missing or garbled key is one error naming the file and the
    key, not a crash on the first image."""
    from pydantic import ValidationError

    def parsed(key: str, what: str) -> Any:
        try:
            return json.loads(meta[key])
        except KeyError:
            raise bad_metadata(path, key, None, what) from None
        except ValueError:
            raise bad_metadata(path, key, meta[key], what) from None

    classes = parsed("kdcli_classes", "a JSON list of class names")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad_metadata(path, "kdcli_classes", meta["kdcli_classes"], "a JSON list of class names")
    raw = meta.get("kdcli_imgsz")
    try:
        imgsz = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise bad_metadata(path, "kdcli_imgsz", raw, "an image size (a positive integer)") from None
    graph = sess.get_inputs()[0]
    sides = [d for d in graph.shape[2:] if isinstance(d, int)]
    if imgsz <= 0 or any(d != imgsz for d in sides):
        raise bad_metadata(path, "kdcli_imgsz", raw, "an image size (a positive integer)" if imgsz <= 0 else
                        f"the size of the graph's input ({'x'.join(map(str, graph.shape[2:]))})")
    post = parsed("kdcli_postprocess", "a JSON object of postprocess settings")
    try:
        cfg = ModelConfig.model_validate(post)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(map(str, first["loc"])) or "settings"
        raise bad_metadata(path, "kdcli_postprocess", meta["kdcli_postprocess"],
                        f"valid postprocess settings ({field}: {first['msg']})") from None
    outputs = sess.get_outputs()
    width = outputs[1].shape[-1] if len(outputs) == 2 and outputs[1].shape else None
    if isinstance(width, int) and width != len(classes):
        raise bad_metadata(path, "kdcli_classes", meta["kdcli_classes"],
                        f"the graph's {width} classes ({len(classes)} names)")
    return with_overrides(cfg, over), classes, imgsz, graph.type == "tensor(float16)"


def expand_sources(sources: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, each once."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(x) for x in glob.glob(s, recursive=True) if Path(x).suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise KdcliError(f"{s}: no image found",
                             hint=f"give files, folders or globs of {', '.join(IMAGE_SUFFIXES)}")
        out += [f for f in found if f not in out]
    return out


@dataclass
class Detections:
    boxes: np.ndarray  # [N, 4] x0, y0, x1, y1 scene pixels
    scores: np.ndarray
    labels: np.ndarray


def check_slice(slice_size: int | None) -> None:
    """A window (--slice) is at least MIN_TILE pixels a side, as a tile of `kdcli prepare` is."""
    if slice_size is not None and slice_size < MIN_TILE:
        raise KdcliError(f"--slice {slice_size}: a window is at least {MIN_TILE} pixels a side (as a tile of "
                         "`kdcli prepare`)")


class Predictor:
    """A kdcli checkpoint (.pt) or an exported ONNX model (.onnx, run with onnxruntime)."""

    def __init__(self, weights: str | Path, device: torch.device, conf: float | None = None,
                 iou: float | None = None, max_det: int | None = None, slice_size: int | None = None,
                 overlap: float = 0.2, merge_method: str = "nms", batch: int = 8, keep_cut: bool = False):
        check_slice(slice_size)  # before the model loads
        over = {k: v for k, v in (("conf", conf), ("nms_iou", iou), ("max_det", max_det)) if v is not None}
        if str(weights).endswith(".onnx"):
            self.session, meta = _onnx_session(weights, device)
            self.cfg, self.classes, self.imgsz, self.half = onnx_metadata(weights, self.session, meta, over)
            self.letterbox = True
        else:
            ckpt = checkpoint.load(weights)
            self.session = None
            self.model = checkpoint.model_from_checkpoint(ckpt, str(weights)).to(device).eval()
            self.cfg = with_overrides(self.model.cfg, over)
            self.classes = ckpt.model.classes
            self.imgsz = ckpt.model.imgsz
            self.letterbox = ckpt.data.letterbox
        self.device, self.weights = device, weights
        self.slice, self.overlap, self.merge_method, self.batch = slice_size, overlap, merge_method, batch
        self.keep_cut = keep_cut
        self.transform = eval_transform(self.imgsz, self.letterbox)
        if not 0 <= overlap < 1:
            raise KdcliError(f"--overlap must be in [0, 1), got {overlap}")

    def detect(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image: boxes (model-input pixels), scores, labels."""
        if self.session is None:
            return postprocess(self.model(images.to(self.device)), self.cfg, tuple(images.shape[-2:]))
        feed = images.numpy().astype(np.float16 if self.half else np.float32)
        outs = self.session.run(None, {"images": feed})
        classes = outs[1].shape[-1] if len(outs) == 2 else int(outs[0][:, 6].max()) + 1 if len(outs[0]) else 0
        if classes > len(self.classes) or (len(outs) == 2 and classes != len(self.classes)):
            raise bad_metadata(self.weights, "kdcli_classes", json.dumps(self.classes),
                            f"the graph's classes ({len(self.classes)} given, the graph scores "
                            f"{'at least ' if len(outs) == 1 else ''}{classes})")
        if len(outs) == 1:  # NMS inside the graph: rows (image, x0, y0, x1, y1, score, class)
            rows = torch.from_numpy(np.asarray(outs[0], np.float32))
            return [{"boxes": r[:, 1:5], "scores": r[:, 5], "labels": r[:, 6].long()}
                    for r in (rows[rows[:, 0] == i] for i in range(len(images)))]
        boxes, scores = (torch.from_numpy(np.asarray(o, np.float32)) for o in outs)
        h, w = images.shape[-2:]
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w)  # as postprocess does, before NMS
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h)
        results = []
        for b, sc in zip(boxes, scores):
            best, label = sc.max(-1)
            idx = (best > self.cfg.conf).nonzero().squeeze(1)
            if len(idx) > self.cfg.pre_nms:
                idx = idx[best[idx].topk(self.cfg.pre_nms).indices]
            groups = torch.zeros_like(label[idx]) if self.cfg.class_agnostic_nms else label[idx]
            kept = batched_nms(b[idx], best[idx], groups, self.cfg.nms_iou)[: self.cfg.max_det]
            results.append({"boxes": b[idx][kept], "scores": best[idx][kept], "labels": label[idx][kept]})
        return results

    def windows(self, raster: Raster) -> list[tuple[int, int, int, int]]:
        if self.slice is None:
            return [(0, 0, raster.width, raster.height)]
        return windows(raster.width, raster.height, self.slice, self.overlap)

    def _batches(self, raster: Raster, wins: list) -> Iterator[tuple[list, torch.Tensor, list[float]]]:
        for k in range(0, len(wins), self.batch):
            chunk = wins[k:k + self.batch]
            images, scales = [], []
            for x0, y0, x1, y1 in chunk:
                win = raster.read(x0, y0, x1, y1)
                images.append(torch.from_numpy(self.transform(image=win, bboxes=np.zeros((0, 4)), labels=[])["image"]))
                scales.append(input_scale(x1 - x0, y1 - y0, self.imgsz, self.letterbox))
            yield chunk, torch.stack(images).permute(0, 3, 1, 2).contiguous(), scales

    @torch.no_grad()
    def predict(self, raster: Raster, progress: Any = None) -> Detections:
        wins = self.windows(raster)
        boxes, scores, labels = [], [], []
        for chunk, images, scales in self._batches(raster, wins):
            for (x0, y0, x1, y1), (sx, sy), d in zip(chunk, scales, self.detect(images)):
                b = d["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
                b = to_scene(b, x0, y0, 1.0)
                b[:, 0::2] = b[:, 0::2].clamp(x0, x1)
                b[:, 1::2] = b[:, 1::2].clamp(y0, y1)
                if self.keep_cut or len(wins) == 1 or not self.overlap:
                    keep = torch.ones(len(b), dtype=torch.bool)
                else:
                    keep = drop_cut_boxes(b, (x0, y0, x1, y1), (raster.width, raster.height))
                boxes.append(b[keep])
                scores.append(d["scores"].float().cpu()[keep])
                labels.append(d["labels"].cpu()[keep])
            if progress is not None:
                progress(len(chunk))
        if not boxes:
            return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
        b, s, lab = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        if len(wins) > 1:
            b, s, lab = merge(b, s, lab, self.cfg.nms_iou, self.merge_method, self.cfg.class_agnostic_nms)
        return Detections(b.numpy(), s.numpy(), lab.numpy())


# ---- outputs -------------------------------------------------------------------------------------------------------
def coco_results(image_id: int, det: Detections) -> list[dict[str, Any]]:
    return [{"image_id": image_id, "category_id": int(c) + 1, "score": round(float(s), 5),
             "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(float(b[2] - b[0]), 2),
                      round(float(b[3] - b[1]), 2)]}
            for b, s, c in zip(det.boxes, det.scores, det.labels)]


def geojson(det: Detections, classes: list[str], raster: Raster | None = None, frame: str = "pixel") -> dict[str, Any]:
    """Boxes as polygons in pixel coordinates (y down), or through `raster` in its map coordinates (`map`, with
    its CRS named) or in WGS84 longitude/latitude (`wgs84`, RFC 7946: no CRS member, rings counter-clockwise)."""
    b = det.boxes.astype(np.float64).reshape(-1, 4)
    xs, ys = b[:, [0, 2, 2, 0, 0]], b[:, [1, 1, 3, 3, 1]]
    if raster is not None and frame != "pixel":
        xs, ys = raster.to_map(xs, ys) if frame == "map" else raster.to_wgs84(xs, ys)
        a, bb, _, d, e, _ = raster.transform  # type: ignore[misc]
        if a * e - bb * d < 0:  # a north-up image (y down) turns the pixel ring clockwise on the map
            xs, ys = xs[:, ::-1], ys[:, ::-1]
    feats = [{"type": "Feature", "properties": {"class": classes[int(c)], "score": round(float(s), 5)},
              "geometry": {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in zip(rx, ry)]]}}
             for rx, ry, s, c in zip(xs, ys, det.scores, det.labels)]
    out: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if raster is not None and frame == "map" and raster.epsg:
        out["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{raster.epsg}"}}
    elif raster is not None and frame == "map" and raster.crs:
        out["crs_wkt"] = raster.crs  # no EPSG code: the WKT, as a foreign member
    return out


def drawing(raster: Raster, det: Detections, classes: list[str], min_score: float = 0.0) -> Image.Image:
    """The scene (a decimated read, at most about DRAW_MAX_SIDE a side) with the boxes scoring at least
    `min_score`, in class colours with their scores."""
    step = max(1, int(round(max(raster.width, raster.height) / DRAW_MAX_SIDE)))
    image = raster.read_decimated(step)
    scale = image.shape[1] / raster.width
    keep = det.scores >= min_score
    return draw(image, det.boxes[keep] * scale, det.labels[keep], classes, det.scores[keep])


def _map_outputs(out_dir: Path, stem: str, raster: Raster, det: Detections, classes: list[str]) -> list[Path]:
    """<stem>.map.geojson (the scene's CRS: known, the caller checked) and <stem>.wgs84.geojson; a warning line
    says when the WGS84 conversion could not be made."""
    if raster.transform is None:
        return []
    atomic.write_text(out_dir / f"{stem}.map.geojson", json.dumps(geojson(det, classes, raster, "map")))
    try:
        wgs84 = geojson(det, classes, raster, "wgs84")
    except KdcliError as e:
        warn_once(f"wgs84:{e.message.split(': ', 1)[-1]}", f"{e}: no WGS84 GeoJSON, only {stem}.map.geojson")
        return [out_dir / f"{stem}.map.geojson"]
    atomic.write_text(out_dir / f"{stem}.wgs84.geojson", json.dumps(wgs84))
    return [out_dir / f"{stem}.map.geojson", out_dir / f"{stem}.wgs84.geojson"]


def write_outputs(out_dir: Path, results: list[tuple[Path, Raster, Detections]], classes: list[str],
                  draw_conf: float | None = 0.25, maps: bool = True, timing: dict | None = None,
                  image_ids: list[int] | None = None) -> list[Path]:
    """predictions.json (COCO results), images.json (ids, file names, sizes, and the `timing` of the prediction
    when given), one GeoJSON per image in pixels
    (and with `maps`, for a georeferenced scene, in its CRS and in WGS84), one drawn PNG per image (boxes scoring
    >= draw_conf; None: no PNG). `image_ids`: a scored split's own ids, so that predictions.json joins with its
    COCO file (pycocotools' loadRes); else 1, 2, ..."""
    out_dir.mkdir(parents=True, exist_ok=True)
    coco, images, files = [], [], []
    stems: dict[str, int] = {}
    for image_id, (path, raster, det) in zip(image_ids or range(1, len(results) + 1), results, strict=True):
        coco += coco_results(image_id, det)
        images.append({"id": image_id, "file_name": str(path), "width": raster.width, "height": raster.height})
        n = stems.get(path.stem, 0)
        stems[path.stem] = n + 1
        stem = path.stem if n == 0 else f"{path.stem}_{n}"
        atomic.write_text(out_dir / f"{stem}.geojson", json.dumps(geojson(det, classes)))
        files.append(out_dir / f"{stem}.geojson")
        files += _map_outputs(out_dir, stem, raster, det, classes) if maps else []
        if draw_conf is not None:
            drawing(raster, det, classes, draw_conf).save(out_dir / f"{stem}.png")
            raster.close()
            files.append(out_dir / f"{stem}.png")
    atomic.write_json(out_dir / "predictions.json", coco)
    atomic.write_json(out_dir / "images.json", {"images": images,
                                                "categories": [{"id": i + 1, "name": c}
                                                               for i, c in enumerate(classes)],
                                                **({"timing": timing} if timing else {})})
    return [out_dir / "predictions.json", out_dir / "images.json", *files]
