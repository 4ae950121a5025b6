"""`kdcli benchmark`: training-step cost of detector recipes, with torchvision's RetinaNet as reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kdcli import atomic
from kdcli.config import load
from kdcli.config.schema import Recipe
from kdcli.console import err, out


def benchmark(
    models: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model or train recipe (repeatable) "
                                                                           "[default: the paper's teacher and "
                                                                           "student].")] = None,
    imgsz: Annotated[int, typer.Option("--imgsz", help="Square input size.")] = 512,
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = 4,
    device: Annotated[str, typer.Option("--device", help="cpu or a GPU index.")] = "cpu",
    amp: Annotated[str, typer.Option("--amp", help="off, bf16 or fp16 (CUDA only).")] = "off",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed steps (after 2 warm-up steps).")] = 5,
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="Also time torchvision's "
                                                                               "retinanet_resnet50_fpn.")] = True,
    distill: Annotated[bool, typer.Option("--distill", help="Also time the nine distillation rows against the "
                                                           "hard student (first --model = teacher, second = "
                                                           "student).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    save: Annotated[Path | None, typer.Option("--save", help="Write the results JSON here.")] = None,
) -> None:
    """Time a training step (per image) for the teacher and the student, the share spent in anchor assignment
    and losses, peak GPU memory, and torchvision's RetinaNet on the same batch.

    Example: [bold]kdcli benchmark --imgsz 512 --batch 8 --device 0 --amp bf16 --json[/]
    """
    import torch

    from kdcli.deploy import benchmark as bench
    from kdcli.engine.distributed import resolve_device

    dev = resolve_device(device)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp not in ("off", "bf16", "fp16"):
        raise typer.BadParameter("--amp must be off, bf16 or fp16")
    if dev.type != "cuda":
        dtype = None
    specs = models or ["models/teacher_r50_pafpn", "models/student_r18_fpn"]
    rows = []
    for spec in specs:
        r = load.load(Recipe, spec, defaults={"data": {"path": "-"}})
        cfg = r.model.model_copy(update={"pretrained": False})
        err.print(f"timing {spec} ...")
        rows.append({"recipe": spec, **bench.train_step(cfg, imgsz, batch, dev, dtype, repeats=repeats)})
    if reference:
        err.print("timing torchvision retinanet_resnet50_fpn ...")
        rows.append({"recipe": "-", **bench.torchvision_reference(imgsz, batch, dev, dtype, repeats=repeats)})
    result = {"machine": bench.machine(), "device": str(dev), "rows": rows}
    if distill:
        if len(specs) != 2:
            raise typer.BadParameter("--distill needs two models: teacher then student")
        cfgs = [load.load(Recipe, s, defaults={"data": {"path": "-"}}).model.model_copy(update={"pretrained": False})
                for s in specs]
        err.print("timing the nine distillation rows ...")
        result["distill"] = bench.distill_steps(cfgs[0], cfgs[1], imgsz, batch, dev, dtype, repeats=repeats)
    if save:
        atomic.write_json(save, result, indent=2)
    if as_json:
        typer.echo(json.dumps(result))
        return
    t = Table(title=f"training step, {imgsz} px, batch {batch}, {dev} ({result['machine'].get('gpu', 'cpu')}, "
                    f"torch {result['machine']['torch']})", title_justify="left")
    for col in ("model", "ms/image", "images/s", "step s (min-max)", "assign+loss share", "peak GiB", "amp"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        share = "-" if r["assign_loss_share"] is None else f"{r['assign_loss_share']:.0%}"
        t.add_row(r["model"], f"{r['ms_per_image']:.1f}", f"{r['images_per_s']:.1f}",
                  f"{r['step_s']:.3f} ({r['step_min_s']:.3f}-{r['step_max_s']:.3f})", share,
                  "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}", r["amp"])
    out.print(t)
    if distill:
        d = result["distill"]
        t = Table(title=f"distillation step vs hard student (same batch); teacher fwd {d['teacher_fwd_gflops']} "
                        f"GFLOPs, backbone+neck only {d['teacher_backbone_neck_gflops']} "
                        f"(saves {d['truncation_saving']:.0%})", title_justify="left")
        for col in ("row", "teacher runs", "step s", "time ratio", "FLOP ratio"):
            t.add_column(col, justify="left" if col in ("row", "teacher runs") else "right")
        for r in d["rows"]:
            t.add_row(r["row"], r["teacher"], f"{r['step_s']:.3f}", f"{r['time_ratio']:.2f}", f"{r['flop_ratio']:.2f}")
        out.print(t)
