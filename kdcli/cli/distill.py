"""`kdcli distill`: train the student against a teacher checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdcli.cli.train import Overrides, report, split_recipe
from kdcli.config import load
from kdcli.config import schema
from kdcli.errors import KdcliError


def distill(
    recipe: Annotated[str | None, typer.Argument(help="Distill recipe (optional: defaults come from the "
                                                      "teacher's checkpoint).")] = None,
    overrides: Overrides = None,
    teacher: Annotated[Path | None, typer.Option("--teacher", "-t", help="Teacher checkpoint (best.pt).")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Terms beside the labels: none, or comma-separated "
                                                                "(e.g. crosskd,pkd) one or more of: {methods}.",
                                              show_default="the recipe's, else none")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help=f"Labels: {', '.join(schema.LABELS)}.",
                                              show_default="the recipe's, else hard")] = None,
    force: Annotated[bool, typer.Option("--force", help="Distil even from a teacher that looks untrained (a "
                                                        "--resume of the run keeps it).")] = False,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue exactly from a distill last.pt.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, 0 or 0,1 (same as train.device=).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Distil a teacher into a student. Without a recipe, the dataset dir, fold, classes and image size come
    from the teacher's checkpoint and the student is the paper's ResNet18 + FPN. Each loss term is its own
    column in the progress line and results.csv, named after its method (cls, box, soft_cls, pdf, mse, defeat_fg,
    ...: --method pdf,mse keeps both); adapters are reported at start.

    Example: [bold]kdcli distill --teacher t.pt --method defeat[/]
    """
    from kdcli.engine import checkpoint
    from kdcli.engine.distill_trainer import DistillTrainer, student_defaults

    recipe, extra = split_recipe(recipe, overrides)
    extra += [f"train.device={device}"] if device else []
    if resume is not None:
        if recipe is not None:
            raise KdcliError("give a recipe or --resume, not both")
        summary = DistillTrainer.resume(resume, extra, force=force).fit()
        report(summary, as_json)
        return
    for flag, value, hint in (("--method", method, "give none, or methods joined by commas (e.g. pdf or crosskd,pkd)"),
                              ("--labels", labels, f"give {', '.join(schema.LABELS)}")):
        if value is not None and not value.strip():  # an empty value must not quietly become the recipe's
            raise KdcliError(f"{flag} '{value}': empty", hint=hint)
    flags = [f"distill.{k}={v}" for k, v in (("teacher", teacher), ("method", method), ("labels", labels)) if v]
    teacher_path = teacher
    if teacher_path is None and recipe is not None:
        teacher_path = load.read_yaml(load.find_recipe(recipe)).get("distill", {}).get("teacher")
    if teacher_path is None:
        raise KdcliError("no teacher given", hint="pass --teacher runs/train/<name>/weights/best.pt")
    t_ckpt = checkpoint.load(teacher_path)
    defaults = student_defaults(t_ckpt)
    r = load.load(schema.Recipe, recipe, flags + extra, defaults=defaults)
    if r.name is None:
        name = r.distill.labels.replace("+", "_") + ("" if r.distill.method == "none" else
                                                     "_" + r.distill.method.replace(",", "_"))
        r = r.model_copy(update={"name": name})
    summary = DistillTrainer(r, recipe_path=recipe, force=force).fit()
    report(summary, as_json)
