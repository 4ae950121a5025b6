"""`kdcli train`, `kdcli val` and `kdcli info model`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import Field
from rich.markup import escape
from rich.table import Table

from kdcli import atomic, paths
from kdcli.atomic import ensure_dir_possible
from kdcli.config import load
from kdcli.config import schema
from kdcli.config.base import Device, Strict
from kdcli.console import out
from kdcli.errors import KdcliError

Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. fold=2 train.epochs=3.")]

def split_recipe(recipe: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """The optional RECIPE argument swallows the first `key=value` when no recipe is given: give it back."""
    extra = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *extra]
    return recipe, extra


def train(
    recipe: Annotated[str | None, typer.Argument(help="Train recipe (file or name under recipes/).")] = None,
    overrides: Overrides = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue exactly from a last.pt.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, 0 or 0,1 (same as train.device=).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Train a detector (the teacher, or a student on hard labels). Writes runs/train/<name>/ with args.yaml,
    results.csv, weights/{last,best}.pt and PNG curves.

    Example: [bold]kdcli train recipes/train/vedai25_teacher.yaml fold=1 seed=0[/]
    """
    from kdcli.engine.trainer import Trainer

    recipe, extra = split_recipe(recipe, overrides)
    extra += [f"train.device={device}"] if device else []
    if resume is not None and recipe is not None:
        raise KdcliError("give a recipe or --resume, not both", hint="the recipe of a resumed run is in last.pt")
    if resume is not None:
        trainer = Trainer.resume(resume, extra)
    else:
        if recipe is None:
            raise KdcliError("give a train recipe (e.g. recipes/train/synthetic_student.yaml) or --resume last.pt")
        r = load.load(schema.Recipe, recipe, extra)
        trainer = Trainer(r, recipe_path=recipe)
    summary = trainer.fit()
    report(summary, as_json)


def report(summary: dict, as_json: bool) -> None:
    """Print the run's summary; an interrupted run (SIGTERM, Ctrl-C: last.pt saved) exits 130, so that
    `kdcli train ... && kdcli val ...` stops there."""
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "metrics"} |
                              {"metrics": {k: v for k, v in summary["metrics"].items() if k != "per_class"}}))
    else:
        _print_summary(summary)
    if summary["interrupted"]:
        raise typer.Exit(130)


def _print_summary(summary: dict) -> None:
    m = summary["metrics"]
    tail = f"  mAP50 {m['mAP50']:.4f}  mAP50-95 {m['mAP50-95']:.4f}" if m else ""
    state = "interrupted (resume with --resume .../weights/last.pt)" if summary["interrupted"] else "done"
    out.print(f"[green]{state}:[/] {summary['run_dir']}  epochs {summary['epochs']}, best epoch "
              f"{summary['best_epoch']}{tail}", highlight=False, soft_wrap=True)


class ValConfig(Strict):
    """What `kdcli val` may change; everything else comes from the checkpoint."""

    data: str | None = Field(None, description="dataset dir (default: the checkpoint's)")
    fold: int | None = Field(None, description="fold (default: the checkpoint's)")
    split: str = Field("test", description="split to evaluate: test, val, train, val_scenes, ...")
    batch: int = Field(16, ge=1, description="images per batch")
    workers: int = Field(2, ge=0, description="dataloader workers")
    device: Device = Field("auto", description="auto, cpu or a GPU index")
    conf: float | None = Field(None, ge=0, le=1, description="score threshold (default: the checkpoint's)")
    nms_iou: float | None = Field(None, gt=0, le=1, description="NMS IoU (default: the checkpoint's)")
    max_det: int | None = Field(None, ge=1, description="detections per image (default: the checkpoint's)")
    iou_thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75],
                                        description="IoU thresholds of extra VOC-style AP columns")
    coco_backend: Literal["auto", "pycocotools", "kdcli"] = Field("auto", description="COCO-style evaluator")
    name: str | None = Field(None, description="run name under runs/val")


def val(
    weights: Annotated[Path, typer.Argument(help="Checkpoint (.pt), or ONNX model from `kdcli export` (.onnx, run "
                                                 "by ONNX Runtime), to evaluate.")],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON on stdout.")] = False,
) -> None:
    """Evaluate a checkpoint or an exported ONNX model (FP32, FP16 or INT8): mAP50 (VOC-style all-point AP at IoU
    0.5, the headline), COCO AP50 and AP50:95, AP at extra IoU thresholds, per class. Dataset, fold and classes come
    from the checkpoint (from an ONNX model's metadata).

    Example: [bold]kdcli val runs/train/teacher/weights/best.pt split=test[/]
    """
    from kdcli.data import coco
    from kdcli.deploy.formats import evaluate_model
    from kdcli.engine.plots import prediction_grid
    from kdcli.engine import detfile
    from kdcli.engine.trainer import unique_run_dir

    cfg = load.load(ValConfig, None, list(overrides or []))
    dataset = paths.resolve_dataset(cfg.data) if cfg.data else None
    run_dir = unique_run_dir(paths.runs_root() / "val", cfg.name or Path(weights).parent.parent.name or "val")
    run_dir.mkdir(parents=True)
    dets = detfile.path_for(run_dir, cfg.split)
    try:
        result, samples = evaluate_model(weights, cfg.split, dataset, cfg.fold, cfg.batch, cfg.workers, cfg.device,
                                         {"conf": cfg.conf, "nms_iou": cfg.nms_iou, "max_det": cfg.max_det},
                                         cfg.iou_thresholds, cfg.coco_backend, dets_out=dets)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # nothing measured: no empty run dir left behind
        raise
    dataset_dir, fold, classes = Path(result["dataset"]), result["fold"], [r["class"] for r in result["per_class"]]
    atomic.write_json(run_dir / "metrics.json", result, indent=2)
    prediction_grid(samples, classes, run_dir / "predictions.png")
    if as_json:
        typer.echo(json.dumps(result))
        return
    split_label = coco.split_name(cfg.split, fold)
    t = Table(title=f"{weights} on {dataset_dir.name}/{split_label}  (mAP50 = VOC-style all-point AP @ IoU 0.5; "
                    f"COCO columns: {result['coco_backend']}, max {result['max_det']} det/img)", title_justify="left")
    extra = [k for k in result["per_class"][0] if k.startswith("AP") and k not in ("AP50", "AP50-95")] if \
        result["per_class"] else []
    for col in ("class", "GT", "det", "mAP50 (VOC)", "COCO AP50", "AP50-95", *extra):
        t.add_column(col, justify="left" if col == "class" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for row in result["per_class"]:
        t.add_row(row["class"], str(row["n_gt"]), str(row["n_det"]), fmt(row["AP50"]), fmt(row["coco_AP50"]),
                  fmt(row["AP50-95"]), *(fmt(row[k]) for k in extra))
    t.add_row("[bold]all[/]", str(result["objects"]), str(result["detections"]), f"[bold]{result['mAP50']:.4f}[/]",
              f"{result['coco_AP50']:.4f}", f"{result['mAP50-95']:.4f}",
              *(f"{result['m' + k]:.4f}" for k in extra))
    out.print(t)
    if "mAP50_ci95" in result:
        lo, hi = result["mAP50_ci95"]
        out.print(f"mAP50 95 % interval over the {result['images']} images (bootstrap, 1000 resamples): "
                  f"[{lo:.4f}, {hi:.4f}]", highlight=False)
    out.print(f"written: {run_dir}/metrics.json, predictions.png, {dets.name} (its detections, for paired "
              "comparisons: docs/studies.md)", highlight=False)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more detections files (dets_<split>.npz) or run dirs "
                                                    "holding one (`kdcli val`, `kdcli predict --split`, a study "
                                                    "cell), the reference first.")],
    metric: Annotated[str, typer.Option("--metric", help="mAP50 or mAP50-95 (VOC-style at IoU 0.50:0.05:0.95, "
                                                         "averaged).")] = "mAP50",
    resamples: Annotated[int, typer.Option("--resamples", min=100, help="Bootstrap resamples of the images.")]
    = 1000,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write the table as CSV here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Paired gains over the same images: each run's mAP on its split, and its gain over the first run with a
    95 % interval over images resampled with replacement, both models scored on each resample. For models
    scored outside a study (another site with `kdcli predict --split --data`, a `kdcli val` of an INT8 export);
    `kdcli report` gives the same for a study's cells.

    Example: [bold]kdcli compare runs/predict/hard runs/predict/hard_pdf runs/predict/teacher --metric mAP50-95[/]
    """
    import csv
    import io

    from kdcli.engine import detfile
    from kdcli.engine.metrics import PAIRED_THRESHOLDS

    if metric not in PAIRED_THRESHOLDS:
        raise KdcliError(f"--metric {metric}: use {' or '.join(PAIRED_THRESHOLDS)}")
    if len(runs) < 2:
        raise KdcliError("give two or more runs to compare, the reference first")
    if csv_out is not None:
        ensure_dir_possible(csv_out.parent, "--csv folder")
    rows = detfile.paired_gains([detfile.find(r) for r in runs], metric, resamples)
    if csv_out is not None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", metric, f"gain over {rows[0]['file']}", "ci95_low", "ci95_high"])
        fmt = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731 - the reference row has no gain
        for r in rows:
            w.writerow([r["file"], fmt(r["score"]), fmt(r["gain"]), *map(fmt, r["ci95"] or [None, None])])
        atomic.write_text(csv_out, buf.getvalue())
    if as_json:
        typer.echo(json.dumps({"metric": metric, "resamples": resamples, "rows": rows}))
        return
    t = Table(title=f"{metric} (points) on the same images, gains over {rows[0]['file']} with 95 % intervals over "
                    f"{resamples} resamples of them", title_justify="left")
    for col in ("run", metric, "gain", "95 % interval"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        gain = "" if r["gain"] is None else f"{100 * r['gain']:+.2f}"
        ci = "" if r["ci95"] is None else f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]"
        t.add_row(escape(r["file"]), f"{100 * r['score']:.2f}", gain, ci)
    out.print(t)
    if csv_out is not None:
        out.print(f"written: {csv_out}", highlight=False)


def info_model(
    models: Annotated[list[str], typer.Argument(help="One or two recipes or checkpoints (teacher first), then "
                                                     "key=value overrides for the recipes (e.g. "
                                                     "model.backbone=mobilenet_v3_large).")],
    imgsz: Annotated[int | None, typer.Option("--imgsz", help="Input size for FLOPs.",
                                              show_default="the recipe's")]
    = None,
    classes: Annotated[int, typer.Option("--classes", help="Classes for a recipe without a dataset.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Parameters (backbone/neck/head), FLOPs, output shapes per level; with two models, the parameter ratio
    (the paper states 1.6 teacher/student).

    A recipe names its trunk with model.backbone: {backbones}.

    Example: [bold]kdcli info model recipes/models/teacher_r50_pafpn.yaml recipes/models/student_r18_fpn.yaml[/]

    Example: [bold]kdcli info model models/student_r18_fpn model.backbone=mobilenet_v3_large --imgsz 128[/]
    """
    from kdcli.engine.info import describe

    specs, overrides = split_overrides(models)
    if not 1 <= len(specs) <= 2:
        raise KdcliError("give one or two models")
    if overrides and any(s.endswith(".pt") for s in specs):
        raise KdcliError(f"{overrides[0]}: overrides change a recipe, not a trained checkpoint",
                         hint="give a model or train recipe")
    rows = []
    for spec in specs:
        model, size = _model_for_info(spec, classes, overrides)
        rows.append({"model": Path(spec).stem, **describe(model, imgsz or size)})
    result: dict = {"models": rows}
    if len(rows) == 2:
        result["param_ratio"] = round(rows[0]["params"]["total"] / rows[1]["params"]["total"], 3)
        result["flop_ratio"] = round(rows[0]["gflops"] / rows[1]["gflops"], 3)
    if as_json:
        typer.echo(json.dumps(result))
        return
    t = Table(title="models", title_justify="left")
    for col in ("model", "backbone+neck", "input", "params backbone", "neck", "head", "total", "GFLOPs", "levels"):
        t.add_column(col, justify="left" if col in ("model", "backbone+neck", "levels") else "right")
    for r in rows:
        p = r["params"]
        lv = " ".join(f"s{x['stride']}:{x['shape'][1]}x{x['shape'][2]}" for x in r["levels"])
        t.add_row(r["model"], f"{r['backbone']}+{r['neck']}", str(r["imgsz"]), f"{p['backbone'] / 1e6:.2f}M",
                  f"{p['neck'] / 1e6:.2f}M", f"{p['head'] / 1e6:.2f}M", f"{p['total'] / 1e6:.2f}M",
                  f"{r['gflops']:.1f}", lv)
    out.print(t)
    if len(rows) == 2:
        out.print(f"parameter ratio {result['param_ratio']:.2f} (paper: 1.6), FLOP ratio {result['flop_ratio']:.2f}",
                  highlight=False)


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(models, key=value overrides) of a command line that lists both."""
    over = [x for x in items if "=" in x and not Path(x).exists()]
    return [x for x in items if x not in over], over


def _model_for_info(spec: str, classes: int, overrides: list[str]):
    from kdcli.engine import checkpoint
    from kdcli.models.detector import build_detector

    if spec.endswith(".pt"):
        ckpt = checkpoint.load(spec)
        return checkpoint.model_from_checkpoint(ckpt, spec), ckpt.model.imgsz
    path = load.find_recipe(spec)
    raw = load.read_yaml(path)
    if "data" not in raw:  # a model recipe alone: no dataset needed to count parameters
        r = load.load(schema.Recipe, path, overrides, defaults={"data": {"path": "-"}})
    else:
        r = load.load(schema.Recipe, path, overrides)
    model_cfg = r.model.model_copy(update={"pretrained": False})
    return build_detector(model_cfg, classes, r.data.imgsz, r.data.anchor_size), r.data.imgsz
