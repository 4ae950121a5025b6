"""`kdcli predict` and `kdcli export`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kdcli import paths
from kdcli.atomic import atomic_dir, ensure_dir_possible
from kdcli.console import err, out, progress
from kdcli.errors import KdcliError

MAX_WINDOWS = 10_000  # beyond this many windows predict asks for --yes: a mistyped --overlap 0.99 is a long night


def _ints(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KdcliError(f"{what}: '{text}' is not a comma-separated list of integers") from None


def predict(
    weights: Annotated[Path, typer.Argument(help="Checkpoint (best.pt), or an ONNX model from `kdcli export` "
                                                 "(needs onnxruntime).")],
    sources: Annotated[list[str] | None, typer.Argument(help="Images, folders or globs (PNG, JPEG, TIFF/GeoTIFF).")]
    = None,
    split: Annotated[str | None, typer.Option("--split", help="Predict a split of the checkpoint's dataset instead "
                                                              "(e.g. val_scenes: whole xView scenes) and evaluate it."
                                              )] = None,
    data: Annotated[Path | None, typer.Option("--data", help="With --split: score that split of this dataset dir "
                                                             "instead (another site, sensor or season), e.g. "
                                                             "--split test or --split fold01_test. Its class names "
                                                             "must be the checkpoint's.",
                                              show_default="the checkpoint's dataset")] = None,
    slice_size: Annotated[int | None, typer.Option("--slice", help="Cut each image into windows of this "
                                                                           "side (pixels).",
                                                show_default="whole image")]
    = None,
    overlap: Annotated[float, typer.Option("--overlap", help="Overlap between windows (fraction).")] = 0.2,
    merge: Annotated[str, typer.Option("--merge", help="Duplicates across windows: nms or fusion (weighted box "
                                                       "fusion).")] = "nms",
    keep_cut: Annotated[bool, typer.Option("--keep-cut", help="Keep boxes touching an inner window edge (by "
                                                              "default dropped when windows overlap: a neighbour "
                                                              "sees them whole).")]
    = False,
    conf: Annotated[float | None, typer.Option("--conf", help="Score threshold.",
                                                show_default="the checkpoint's")]
    = None,
    iou: Annotated[float | None, typer.Option("--iou", help="NMS / merge IoU.", show_default="the checkpoint's")]
    = None,
    max_det: Annotated[int | None, typer.Option("--max-det", help="Detections per window.",
                                                  show_default="the checkpoint's")] = None,
    bands: Annotated[str | None, typer.Option("--bands", help="Bands of a multi-band raster, numbered from 1 as in "
                                                              "GDAL: three (e.g. 4,3,2), or one, repeated to three.",
                                              show_default="the first three; a 1- or 2-band image's first, "
                                                           "repeated")] = None,
    normalize: Annotated[str, typer.Option("--normalize", help="auto (percentile scaling unless 8-bit), percentile "
                                                               "or none.")] = "auto",
    percentiles: Annotated[str, typer.Option("--percentiles", help="Low,high percentiles of the scaling.")] = "2,98",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Windows per forward pass.")] = 8,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or a GPU index.")] = "auto",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder.",
                                                     show_default="a new $KDCLI_RUNS/predict/<name>")]
    = None,
    draw_images: Annotated[bool, typer.Option("--draw/--no-draw", help="Write drawn PNGs.")] = True,
    maps: Annotated[bool, typer.Option("--map/--no-map", help="For a georeferenced scene, also GeoJSON in its CRS "
                                                             "and in WGS84 (--no-map: pixel coordinates only).")]
    = True,
    draw_conf: Annotated[float, typer.Option("--draw-conf", help="Draw boxes scoring at least this.")] = 0.25,
    yes: Annotated[bool, typer.Option("--yes", "-y", help=f"Run even past {MAX_WINDOWS} windows.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier predict's --out (the new outputs are "
                                                        "written aside and swapped in at the end).")] = False,
) -> None:
    """Detect objects in images or whole scenes. Writes predictions.json (COCO results), images.json, a
    GeoJSON per image (pixel coordinates; for a georeferenced TIFF also <stem>.map.geojson in its CRS and
    <stem>.wgs84.geojson in WGS84 lon/lat) and drawn PNGs. Scenes are read window by window (bounded memory;
    PNG/JPEG are decoded whole): install kdcli[geo] (rasterio) for any GeoTIFF and CRS.

    Example: [bold]kdcli predict best.pt scene.tif --slice 512 --overlap 0.2 --bands 3,2,1[/]
    """
    import torch

    from kdcli.data.rasters import GEO_HINT, open_raster, optional_rasterio, parse_bands, require_band_choice
    from kdcli.deploy.predict import Predictor, check_slice, expand_sources, write_outputs
    from kdcli.engine import distributed
    from kdcli.engine.trainer import unique_run_dir

    if merge not in ("nms", "fusion"):
        raise KdcliError(f"--merge {merge}: use nms or fusion")
    if normalize not in ("auto", "percentile", "none"):
        raise KdcliError(f"--normalize {normalize}: use auto, percentile or none")
    pct = _ints(percentiles, "--percentiles")
    if pct is None or len(pct) != 2 or not 0 <= pct[0] < pct[1] <= 100:
        raise KdcliError(f"--percentiles {percentiles}: give low,high with 0 <= low < high <= 100")
    if bool(sources) == bool(split):
        raise KdcliError("give images to predict or --split, not both" if sources else "give images to predict",
                         hint="e.g. kdcli predict best.pt scene.tif --slice 512, or --split val_scenes")
    if data is not None and not split:
        raise KdcliError(f"--data {data}: give the split of it to score with --split", hint="e.g. --split test")
    if split and str(weights).endswith(".onnx"):
        raise KdcliError("--split reads the dataset from a kdcli checkpoint: give the .pt", hint="or list the images")
    if not 0 <= overlap < 1:
        raise KdcliError(f"--overlap {overlap}: give a fraction in [0, 1)")
    check_slice(slice_size)
    band_list = parse_bands(bands)  # checked before the model loads
    if out_dir is not None:
        _check_out(out_dir, force)
    dev = distributed.resolve_device(device)
    predictor = Predictor(weights, dev, conf, iou, max_det, slice_size, overlap, merge, batch, keep_cut)
    gt = None
    if split:
        root, gt = _split_to_score(weights, split, data, predictor.classes)
        items = [(im["id"], root / im["file_name"]) for im in gt["images"]]
    else:
        items = [(i, p) for i, p in enumerate(expand_sources(sources or []), start=1)]
    rasters = [(i, p, open_raster(p, band_list, (pct[0], pct[1]), normalize)) for i, p in items]
    for _, p, r in rasters:
        require_band_choice(p, r.bands, band_list)
    unknown = [p for _, p, r in rasters if r.transform is not None and r.crs is None] if maps else []
    if unknown:  # before any window runs: map and WGS84 coordinates need the CRS
        more = f" (and {len(unknown) - 1} more scene(s))" if len(unknown) > 1 else ""
        raise KdcliError(f"{unknown[0]}: georeferenced (a pixel -> map transform) but its CRS is unknown to kdcli, "
                         f"so no map or WGS84 coordinates{more}",
                         hint="give the file its CRS (gdal_edit.py -a_srs EPSG:CODE FILE)"
                              + ("" if optional_rasterio() else f", {GEO_HINT} (reads a CRS given as WKT)")
                              + ", or pass --no-map for pixel coordinates only")
    total = sum(len(predictor.windows(r)) for _, _, r in rasters)
    if total > MAX_WINDOWS and not yes:
        stride = max(1, round((slice_size or 0) * (1 - overlap)))
        step = f" (--slice {slice_size} --overlap {overlap}: a window every {stride} px)" if slice_size else ""
        raise KdcliError(f"{total} windows to predict in {len(rasters)} image(s){step}",
                         hint="lower --overlap or raise --slice; pass --yes to run them all")
    if total > len(rasters):
        err.print(f"{total} windows of {slice_size} px in {len(rasters)} image(s)", highlight=False)
    results = []
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task("predict", total=total)
        for _, path, raster in rasters:
            det = predictor.predict(raster, lambda n: bar.advance(task, n))
            raster.close()
            results.append((path, raster, det))
    secs = time.perf_counter() - t0
    n = sum(len(det.scores) for _, _, det in results)
    timing = {"seconds": round(secs, 3), "images_per_s": round(len(results) / secs, 3),
              "windows_per_s": round(total / secs, 3), "detections_per_s": round(n / secs, 3),
              "device": str(dev), "threads": torch.get_num_threads(), "batch": batch}
    target = out_dir or unique_run_dir(paths.runs_root() / "predict", Path(weights).parent.parent.name or "predict")
    ids = [i for i, _, _ in rasters]
    with atomic_dir(target.resolve(), force=target.exists()) as tmp:  # an existing target passed _check_out
        files = [target / f.relative_to(tmp) for f in
                 write_outputs(tmp, results, predictor.classes, draw_conf if draw_images else None, maps, timing, ids)]
        scores = _evaluate(gt, ids, results, predictor, tmp, split or "") if gt is not None else None
    out.print(f"[green]{n} detections[/] in {len(results)} image(s), {total} window(s) -> {target}", highlight=False)
    out.print(f"speed: {secs:.1f} s reading and detecting, {timing['images_per_s']:.2f} images/s, "
              f"{timing['windows_per_s']:.2f} windows/s, {timing['detections_per_s']:.1f} detections/s on {dev} "
              f"({timing['threads']} threads; images.json: timing)", highlight=False)
    if scores is not None:
        out.print(f"scenes: {scores} -> {target / 'metrics.json'}", highlight=False, soft_wrap=True)
    out.print("written: " + ", ".join(str(f) for f in files[:6]) + (" ..." if len(files) > 6 else ""),
              highlight=False, soft_wrap=True)


def _split_to_score(weights: Path, split: str, data: Path | None, classes: list[str]) -> tuple[Path, dict]:
    """(dataset root, COCO split) for --split: the checkpoint's own (its fold where the dataset has folds), or
    --data's, whose folds the checkpoint knows nothing of (name the fold in the split) and whose class names
    must be the checkpoint's, in its order: the model's class k is scored against the split's class k."""
    from kdcli.data import coco
    from kdcli.engine import checkpoint

    if data is None:
        d = checkpoint.load(weights).data
        fold = d.fold if coco.split_path(d.path, split, d.fold).is_file() else None
        return Path(d.path), coco.read_split(d.path, split, fold)
    path = coco.split_path(data, split)
    if not path.is_file():
        have = sorted(p.stem for p in (data / coco.ANNOTATIONS).glob("*.json"))
        raise KdcliError(f"--data {data}: no split '{split}'" + ("" if have else " (not a prepared dataset dir)"),
                         hint=f"available: {', '.join(have)}" if have else "run `kdcli prepare` on it first")
    gt = coco.read_split(data, split)
    names = [c["name"] for c in sorted(gt.get("categories", []), key=lambda c: c["id"])]
    if names != list(classes):
        raise KdcliError(f"{path}: classes {', '.join(names) or '(none)'} are not the checkpoint's "
                         f"({', '.join(classes)})",
                         hint=f"prepare it with the checkpoint's classes, e.g. --classes {','.join(classes)}")
    return Path(data), gt


def _check_out(out_dir: Path, force: bool) -> None:
    """An explicit --out must be new or empty: an earlier run's files beside this one's would pass for its own
    (writing to a fresh numbered folder instead would hide where the outputs went). --force replaces it whole,
    but only an earlier predict's folder: `--out . --force` must not delete the working folder."""
    ensure_dir_possible(out_dir, "--out folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise KdcliError(f"--out {out_dir}: the folder is not empty (an earlier run's outputs would mix with "
                         "this one's)", hint="choose a new folder, or pass --force to replace it")
    if not (out_dir / "images.json").is_file():
        raise KdcliError(f"--out {out_dir}: not the folder of an earlier `kdcli predict` (no images.json): "
                         "--force replaces only those", hint="choose a new or empty folder")


def _evaluate(gt: dict, ids: list[int], results: list, predictor, target: Path, split: str) -> str:
    """Score whole-scene predictions against the split's boxes (the same metrics as `kdcli val`), write
    metrics.json and the detections with their boxes (dets_<split>.npz, for `kdcli compare`) into `target`;
    returns the headline figures."""
    import numpy as np

    from kdcli import atomic
    from kdcli.engine import detfile
    from kdcli.engine import metrics as M
    from kdcli.engine.validator import compute_metrics

    dets = M.Detections(np.concatenate([np.full(len(d.scores), i, np.int64) for i, (_, _, d) in zip(ids, results)]),
                        np.concatenate([d.labels for _, _, d in results]).astype(np.int64),
                        np.concatenate([d.scores for _, _, d in results]).astype(np.float64),
                        np.concatenate([d.boxes for _, _, d in results]).reshape(-1, 4).astype(np.float64))
    max_det = max(1, max((len(d.scores) for _, _, d in results), default=1))
    m = compute_metrics(dets, gt, predictor.classes, max_det, [0.1, 0.25])
    atomic.write_json(target / "metrics.json", m, indent=2)
    detfile.save(detfile.path_for(target, split), dets, gt, len(predictor.classes))
    return (f"mAP50 {m['mAP50']:.4f}  COCO AP50 {m['coco_AP50']:.4f}  mAP50-95 {m['mAP50-95']:.4f}  "
            f"AP@0.25 {m['mAP0.25']:.4f}  ({m['objects']} objects, {m['detections']} detections)")


def export(
    weights: Annotated[Path, typer.Argument(help="Checkpoint (best.pt).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx or torchscript.")] = "onnx",
    out_file: Annotated[Path | None, typer.Option("--out", help="Output file.",
                                                     show_default="beside the checkpoint: best.onnx, "
                                                                  "best.int8.onnx, best.torchscript")] = None,
    nms: Annotated[bool, typer.Option("--nms/--no-nms", help="NMS inside the graph (ONNX): detections [N, 7] "
                                                             "instead of boxes + scores per anchor.")] = False,
    half: Annotated[bool, typer.Option("--half", help="FP16 weights and inputs.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="INT8 (ONNX): ONNX Runtime static quantization, QDQ, "
                                                      "calibrated on --calib.")] = False,
    calib: Annotated[str | None, typer.Option("--calib", help="With --int8: a folder of images like the model's "
                                                              "input, or a split of the checkpoint's dataset.",
                                              show_default="the checkpoint's train split")] = None,
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, help="With --int8: calibration images at "
                                                                             "most (evenly spaced).")] = 200,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="With --int8: one weight scale "
                                                                                 "per output channel, or per "
                                                                                 "tensor.")] = True,
    tolerance: Annotated[float | None, typer.Option("--tolerance", help="Largest accepted |score difference| "
                                                                        "against PyTorch (INT8: its 95th percentile "
                                                                        "over detections).",
                                                        show_default="1e-3, FP16 2e-2, INT8 0.15")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Export a checkpoint for deployment (dynamic batch), with class names, input size, normalisation and its
    dataset as metadata, then run the file on images of its dataset next to PyTorch (random pixels, said so, when
    the dataset is not on this machine) and fail beyond a tolerance. `kdcli val model.onnx` evaluates the file.

    Example: [bold]kdcli export runs/distill/hard_pdf/weights/best.pt --format onnx --int8 --calib train[/]
    """
    import json

    from kdcli.deploy.export import export as run_export

    suffix = {"onnx": ".int8.onnx" if int8 else ".onnx", "torchscript": ".torchscript"}.get(fmt)
    if suffix is None:
        raise KdcliError(f"--format {fmt}: use onnx or torchscript")
    if calib is not None and not int8:
        raise KdcliError("--calib calibrates an INT8 export", hint="add --int8")
    target = out_file or Path(weights).with_suffix(suffix)
    if target.is_dir():
        raise KdcliError(f"--out {target}: a folder; give the output file's name")
    ensure_dir_possible(target.parent, "output folder")
    res = run_export(weights, fmt, target, nms, half, tolerance, int8, calib, calib_images, per_channel)
    if res.get("float_groupnorms"):
        err.print(f"[yellow]note[/]: {res['float_groupnorms']} GroupNorm layers (model.norm / model.backbone_norm = "
                  "gn) cannot be folded into their convolutions: they run in float between the int8 layers, so INT8 "
                  "gains little speed; a model trained with BatchNorm (the default, bn) folds it away",
                  highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(res))
        return
    if int8:
        check = (f"{res['detections_compared']} detections scoring >= {res['min_score']:g}, {res['agreement']:.0%} "
                 f"found by both, |score difference| {res['checked_diff']:.3f} at the 95th percentile (tolerance "
                 f"{res['tolerance']:g}), {res['max_abs_diff']:.3f} at most; calibrated on "
                 f"{escape(res['quantization']['calibrated_on'])}")
    else:
        check = f"max |score difference| {res['max_abs_diff']:.2e} (tolerance {res['tolerance']:.0e})"
    out.print(f"[green]exported[/] {escape(res['file'])} ({fmt}, {res['precision']}, NMS "
              f"{'inside' if nms else 'outside'} the graph); parity on {res['inputs']} images "
              f"({escape(res['inputs_from'])}): {check}", highlight=False, soft_wrap=True)
