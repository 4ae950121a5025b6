"""`kdcli benchmark`: what a teacher and a student cost — size, FLOPs, inference latency and throughput, training
step (and each distillation method's overhead), metric time — with torchvision's RetinaNet as reference; with
--formats, a trained model's deployment formats side by side (size, mAP50, latency at batch 1 on this CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kdcli import atomic
from kdcli.config import load
from kdcli.config import schema
from kdcli.console import err, out


def benchmark(
    ctx: typer.Context,  # which options were given: checked against --suite
    models: Annotated[list[str] | None, typer.Option("--model", "--models", "-m",
                                                     help="Checkpoints (.pt) or model/train recipes, teacher first "
                                                          "(repeatable or comma-separated).",
                                                     show_default="the paper's teacher and student")] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=32, help="Square input size.",
                                              show_default="the checkpoint's, else 512")] = None,
    batch: Annotated[int, typer.Option("--batch", min=2, help="Images per step.")] = 4,
    device: Annotated[str, typer.Option("--device", help="cpu or a GPU index.")] = "cpu",
    amp: Annotated[str, typer.Option("--amp", help="off, bf16 or fp16 (CUDA only).")] = "off",
    repeats: Annotated[int | None, typer.Option("--repeats", min=1, help="Timed steps (after 2 warm-up steps; "
                                                                         "with --formats, timed forward passes after "
                                                                         "5).", show_default="5; --formats 50")]
    = None,
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="Also time torchvision's "
                                                                               "retinanet_resnet50_fpn.")] = True,
    distill: Annotated[bool, typer.Option("--distill", help="Also time the distillation rows against the hard "
                                                           "student (hard+soft, soft, hard+ or soft+ each of "
                                                           "{methods}, and hard+soft and hard+pdf with as many "
                                                           "unlabelled pool images; first --model = teacher, second "
                                                           "= student).")]
    = False,
    inference: Annotated[bool, typer.Option("--inference/--no-inference", help="Time forward + postprocess: "
                                                                               "latency at batch 1, throughput at "
                                                                               "--batch.")] = True,
    evaluation: Annotated[bool, typer.Option("--eval/--no-eval", help="Time kdcli's metrics against pycocotools on "
                                                                      "the same detections.")] = True,
    eval_images: Annotated[int, typer.Option("--eval-images", min=1, help="Images in the metric timing.")] = 500,
    data: Annotated[str | None, typer.Option("--data", help="A dataset dir: also run one real training epoch of "
                                                           "each model through the loader (images/s end to end, "
                                                           "next to the step figure); with --formats, the dataset "
                                                           "to score on.",
                                             show_default="none; with --formats, the checkpoint's")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="With --data: loader workers.")] = 4,
    epoch_batches: Annotated[int | None, typer.Option("--epoch-batches", min=1, help="With --data: stop the epoch "
                                                                                      "after this many batches.")]
    = None,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Time kdcli's models in NHWC layout "
                                                                         "(recipe: train.channels_last).")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="Time kdcli's models compiled with torch.compile "
                                                             "(recipe: train.compile; compilation not timed).")]
    = False,
    formats: Annotated[str | None, typer.Option("--formats", help="Instead: each --model checkpoint in these "
                                                                 "deployment formats ({formats}), one table per "
                                                                 "model: file size, mAP50 on --split, latency at "
                                                                 "batch 1 on this CPU (ONNX Runtime; PyTorch for "
                                                                 "torch).")] = None,
    split: Annotated[str, typer.Option("--split", help="With --formats: the split to score.")] = "test",
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for PyTorch and ONNX Runtime "
                                                                         "(an edge device's core count).",
                                                show_default="PyTorch's: every core of this machine")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    save: Annotated[Path | None, typer.Option("--save", help="Write the results JSON here.")] = None,
    suite: Annotated[str | None, typer.Option("--suite", help="Run a prepared suite instead: gpu (every GPU target "
                                                             "in one call of at most 9 minutes on one H200: steps, "
                                                             "a real epoch, first step, a cut study; see "
                                                             "docs/performance.md).")]
    = None,
    suite_out: Annotated[Path | None, typer.Option("--out", help="With --suite: folder for its results "
                                                                 "(summary.json first).")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="With --suite: the smallest sizes (a check on a CPU).")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="With --suite: empty an earlier suite's --out and start "
                                                        "afresh (a suite measures only what it runs).")] = False,
) -> None:
    """Parameters, FLOPs, inference latency (batch 1) and throughput, training-step time per image (share in
    assignment + losses, peak GPU memory), the distillation rows' overhead (--distill), and metric time against
    pycocotools; torchvision's RetinaNet as a reference row. Warm-up, then the median and spread of repeats.
    With --formats: a trained model exported to each format, one row each (size, mAP50, latency at batch 1 on this
    CPU); a format that fails is a row with its error.

    Example: [bold]kdcli benchmark --models teacher.pt,student.pt --device 0 --amp bf16 --distill --json[/]

    Example: [bold]kdcli benchmark --formats torch,onnx,onnx-int8 --model best.pt --data DIR --json[/]
    """
    _check_suite_options(ctx, suite is not None)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if suite is not None:
        _suite(suite, suite_out, device, amp, tiny, as_json, force)
        return
    if formats is not None:
        _formats(formats, models, data, split, batch, workers, repeats or 50, as_json, save)
        return
    repeats = repeats or 5
    import torch

    from kdcli import paths
    from kdcli.data import coco
    from kdcli.deploy import benchmark as bench
    from kdcli.engine.distributed import resolve_device
    from kdcli.engine.info import describe

    dev = resolve_device(device)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp not in ("off", "bf16", "fp16"):
        raise typer.BadParameter("--amp must be off, bf16 or fp16")
    if dev.type != "cuda":
        dtype = None
    specs = [x for m in (models or ["models/teacher_r50_pafpn", "models/student_r18_fpn"]) for x in m.split(",") if x]
    loaded = [_model(spec, imgsz) for spec in specs]
    dataset = str(paths.resolve_dataset(data)) if data else None
    folds = (coco.read_dataset_yaml(Path(dataset)).get("folds") or [None]) if dataset else None
    size = imgsz or next((s for _, _, s, _ in loaded if s), 512)
    rows = []
    for spec, (model, cfg, _, classes) in zip(specs, loaded):
        err.print(f"timing {spec} ...")
        row = {"recipe": spec, **bench.train_step(cfg, size, batch, dev, dtype, num_classes=classes, repeats=repeats,
                                                              channels_last=channels_last, compile=compile_)}
        if dataset:
            row["epoch"] = bench.train_epoch(cfg, dataset, folds[0], size, batch, device, amp, workers, epoch_batches,
                                           channels_last, compile_)
            row["epoch"]["step_ratio"] = round(row["images_per_s"] / row["epoch"]["images_per_s"], 2)
        if inference:
            row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            row["gflops"] = describe(model, size)["gflops"]
            row["inference"] = bench.inference(model, size, batch, dev, dtype, repeats=max(repeats, 3))
        rows.append(row)
    if reference:
        err.print("timing torchvision retinanet_resnet50_fpn ...")
        rows.append({"recipe": "-", **bench.torchvision_reference(size, batch, dev, dtype, repeats=repeats)})
    result = {"machine": bench.machine(), "device": str(dev), "imgsz": size, "rows": rows}
    if evaluation:
        err.print("timing the metrics ...")
        result["evaluation"] = bench.evaluation(images=eval_images, repeats=max(1, min(repeats, 3)))
    if distill:
        if len(specs) != 2:
            raise typer.BadParameter("--distill needs two models: teacher then student")
        cfgs = [cfg for _, cfg, _, _ in loaded]
        err.print(f"timing the {len(bench.distill_rows())} distillation rows ...")
        result["distill"] = bench.distill_steps(cfgs[0], cfgs[1], size, batch, dev, dtype, repeats=repeats)
    if save:
        atomic.write_json(save, result, indent=2)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print(result, batch, dev, distill)


SUITE_ONLY = ("suite_out", "tiny", "force")  # options of --suite alone
SUITE_USES = ("suite", *SUITE_ONLY, "device", "amp", "threads", "as_json")  # every other option: not with --suite


def _check_suite_options(ctx: typer.Context, suite: bool) -> None:
    """Nothing given is dropped silently: --out/--tiny/--force without --suite (the full default benchmark would
    run instead), and options the suite's fixed stages do not read, with it."""
    from kdcli.errors import KdcliError

    given = [p for p in ctx.command.params if p.name and getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT")
             in ("COMMANDLINE", "ENVIRONMENT")]
    flag = lambda p: "/".join([max(p.opts, key=len), *p.secondary_opts])  # noqa: E731 - as --help shows it
    if not suite:
        stray = [flag(p) for p in given if p.name in SUITE_ONLY]
        if stray:
            one = len(stray) == 1
            raise KdcliError(f"{', '.join(stray)} only go{'es' if one else ''} with --suite (without it the full "
                             f"default benchmark would run and ignore {'it' if one else 'them'})",
                             hint="kdcli benchmark --suite gpu --out DIR --tiny")
        return
    unused = [flag(p) for p in given if p.name not in SUITE_USES]
    if unused:
        raise KdcliError(f"--suite runs its own fixed stages: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'}"
                         " not used by it", hint="drop them, or run the benchmark without --suite")


def _suite(name: str, out_dir: Path | None, device: str, amp: str, tiny: bool, as_json: bool, force: bool) -> None:
    from kdcli.errors import KdcliError
    from kdcli.study.suite import FULL, TINY, Suite, claim_out

    if name != "gpu":
        raise KdcliError(f"--suite {name}: the one suite is gpu")
    if out_dir is None:
        raise KdcliError("--suite needs --out DIR (its results are written there stage by stage)")
    claim_out(out_dir, force)  # before any stage: refused, nothing measured
    result = Suite(out_dir, device, amp if amp != "off" or device == "cpu" else "bf16", TINY if tiny else FULL,
                   force=False).run()  # the folder is claimed (and emptied) already
    if as_json:
        typer.echo(json.dumps(result))
        return
    t = Table(title=f"suite gpu on {result['device']} ({result['elapsed_s']} s): {result['passed']} of "
                    f"{result['measured']} targets met", title_justify="left")
    for col in ("target", "value", "spread (min-max, n)", "goal", "met"):
        t.add_column(col, justify="left" if col == "target" else "right")
    for x in result["targets"]:
        met = "-" if x["pass"] is None else ("[green]yes[/]" if x["pass"] else "[red]no[/]")
        sp = x.get("spread")
        t.add_row(x["target"], "-" if x["value"] is None else str(x["value"]),
                  f"{sp['min']}-{sp['max']}, {sp['n']}" if sp else "-", x["goal"], met)
    out.print(t)
    for x in result["targets"]:
        if x.get("note"):
            out.print(f"{x['target']}: {x['note']}", highlight=False, soft_wrap=True)
    out.print(f"written: {out_dir}/summary.json, suite.json, study_table.md, study_gains.md", highlight=False)


def _formats(names: str, models: list[str] | None, data: str | None, split: str, batch: int, workers: int,
             repeats: int, as_json: bool, save: Path | None) -> None:
    from kdcli import paths
    from kdcli.deploy import formats as F
    from kdcli.deploy.benchmark import machine
    from kdcli.errors import KdcliError

    chosen = F.parse_formats(names)
    given = [x.strip() for x in names.split(",") if x.strip()]
    if len(given) > len(chosen):  # each format measured once: a second torch row would time the same thing again
        twice = list(dict.fromkeys(x for i, x in enumerate(given) if x in given[:i]))
        err.print(f"--formats {names}: {', '.join(twice)} given more than once, measured once", highlight=False)
    specs = [x for m in (models or []) for x in m.split(",") if x]
    if not specs or any(not s.endswith(".pt") for s in specs):
        raise KdcliError("--formats measures trained models: give their checkpoints", hint="--model best.pt")
    dataset = str(paths.resolve_dataset(data)) if data else None
    result: dict = {"machine": machine(), "formats": chosen, "models": []}
    for spec in specs:
        err.print(f"{spec}: {', '.join(chosen)} ...")
        result["models"].append(F.benchmark(spec, chosen, split, dataset, batch, workers, repeats))
        if save:  # written as each model is measured: a long study keeps what it has
            atomic.write_json(save, result, indent=2)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for m in result["models"]:
        out.print(f"[bold]{escape(m['model'])}[/] ({m['backbone']}, {m['params_m']:.2f} M parameters, {m['imgsz']} px) "
                  f"on {escape(Path(m['dataset']).name)}/{m['split']}; latency: one forward pass at batch 1, "
                  f"{result['machine']['threads']} threads, load average {m['load_average'][0]:.1f}",
                  highlight=False, soft_wrap=True)
        t = Table()
        for col in ("format", "MB", "mAP50", "mAP50-95", "ms", "p90 ms", "speedup", "parity"):
            t.add_column(col, justify="left" if col in ("format", "parity") else "right", no_wrap=col == "format")
        for r in m["rows"]:
            lat = r.get("latency_b1", {})
            p = r.get("parity", {})
            parity = "error" if "error" in r else "-" if not p else \
                (f"{p['agreement']:.0%}, " if "agreement" in p else "") + f"{p['checked_diff']:.2g}" + \
                ("" if p["passed"] else " [red](over)[/]")
            t.add_row(r["format"], *(f"{r[k]:.2f}" if k in r else "-" for k in ("size_mb",)),
                      *(f"{r[k]:.4f}" if k in r else "-" for k in ("mAP50", "mAP50-95")),
                      *(f"{lat[k]:.1f}" if k in lat else "-" for k in ("median_ms", "p90_ms")),
                      f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-", parity)
        out.print(t)
        for r in m["rows"]:
            if "error" in r:
                out.print(f"[red]{r['format']}[/]: {escape(r['error'])}", highlight=False, soft_wrap=True)
        out.print("parity: share of detections found by both, and |score difference| against PyTorch (max; INT8: "
                  "95th percentile over detections), (over) when beyond the export's tolerance; speedup: latency "
                  "of torch / latency of the format", highlight=False, soft_wrap=True)
    if save:
        out.print(f"written: {save}", highlight=False)


def _model(spec: str, imgsz: int | None):
    """(model, model config, image size or None, classes) of a checkpoint or a recipe (random weights)."""
    from kdcli.engine import checkpoint
    from kdcli.models.detector import build_detector

    if spec.endswith(".pt"):
        ckpt = checkpoint.load(spec)
        model = checkpoint.model_from_checkpoint(ckpt, spec)
        return model, model.cfg, ckpt.model.imgsz, len(ckpt.model.classes)
    r = load.load(schema.Recipe, spec, defaults={"data": {"path": "-"}})
    cfg = r.model.model_copy(update={"pretrained": False})
    return build_detector(cfg, 8, imgsz or 512, r.data.anchor_size), cfg, None, 8


def _print(result: dict, batch: int, dev, distill: bool) -> None:
    imgsz = result["imgsz"]
    rows = result["rows"]
    t = Table(title=f"training step, {imgsz} px, batch {batch}, {dev} ({result['machine'].get('gpu', 'cpu')}, "
                    f"torch {result['machine']['torch']})", title_justify="left")
    for col in ("model", "ms/image", "images/s", "step s (min-max)", "assign+loss share", "peak GiB", "amp",
                "options"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        share = "-" if r["assign_loss_share"] is None else f"{r['assign_loss_share']:.0%}"
        t.add_row(r["model"], f"{r['ms_per_image']:.1f}", f"{r['images_per_s']:.1f}",
                  f"{r['step_s']:.3f} ({r['step_min_s']:.3f}-{r['step_max_s']:.3f})", share,
                  "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}", r["amp"], r.get("options", "-"))
    out.print(t)
    epochs = [r for r in rows if "epoch" in r]
    if epochs:
        t = Table(title="one real epoch through the loader and trainer (no validation, plots or EMA)",
                  title_justify="left")
        for col in ("model", "images", "epoch s", "images/s", "step images/s", "step / epoch",
                    "command to first step s"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for r in epochs:
            e = r["epoch"]
            t.add_row(r["model"], str(e["images"]), f"{e['epoch_s']:.1f}", f"{e['images_per_s']:.1f}",
                      f"{r['images_per_s']:.1f}", f"{e['step_ratio']:.2f}x", f"{e['first_step_s']:.1f}")
        out.print(t)
    inf = [r for r in rows if "inference" in r]
    if inf:
        t = Table(title=f"inference (forward + postprocess), {imgsz} px: latency at batch 1 (median, p10-p90), "
                        f"throughput at batch {batch}", title_justify="left")
        for col in ("model", "params M", "GFLOPs", "latency ms", "p10-p90 ms", "images/s"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for r in inf:
            i = r["inference"]
            t.add_row(r["model"], f"{r['params_m']:.2f}", f"{r['gflops']:.1f}", f"{i['latency_b1']['median_ms']:.1f}",
                      f"{i['latency_b1']['p10_ms']:.1f}-{i['latency_b1']['p90_ms']:.1f}",
                      f"{i['throughput_img_s']:.1f}")
        out.print(t)
    if "evaluation" in result:
        e = result["evaluation"]
        out.print(f"metrics on {e['images']} images, {e['objects']} boxes, {e['detections']} detections: kdcli "
                  f"(VOC-style + COCO-style) {e['kdcli_s']:.2f} s, pycocotools COCOeval {e['pycocotools_s']:.2f} s "
                  f"({e['speedup']:.1f}x)" + (f", faster-coco-eval {e['faster_coco_eval_s']:.2f} s "
                                             f"({e['speedup_faster_coco_eval']:.1f}x)" if "faster_coco_eval_s" in e
                                             else " (faster-coco-eval not installed)"), highlight=False)
    m = result["machine"]
    out.print(f"machine: {m.get('gpu') or m['cpu']}, {m['threads']} threads, torch {m['torch']}, python "
              f"{m['python']}", highlight=False)
    if distill:
        d = result["distill"]
        t = Table(title=f"distillation step vs hard student (same batch); teacher fwd {d['teacher_fwd_gflops']} "
                        f"GFLOPs, backbone+neck only {d['teacher_backbone_neck_gflops']} "
                        f"(saves {d['truncation_saving']:.0%})", title_justify="left")
        for col in ("row", "teacher runs", "images", "step s", "time ratio", "FLOP ratio", "terms"):
            t.add_column(col, justify="left" if col in ("row", "teacher runs", "terms") else "right")
        for r in d["rows"]:
            t.add_row(r["row"], r["teacher"], str(r["images"]), f"{r['step_s']:.3f}", f"{r['time_ratio']:.2f}",
                      f"{r['flop_ratio']:.2f}", " ".join(r.get("terms", [])))
        out.print(t)
