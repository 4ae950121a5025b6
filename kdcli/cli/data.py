"""`kdcli data check|stats DIR`: validate and describe a dataset dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from kdcli import paths
from kdcli.console import err, out
from kdcli.data.sources import discover
from kdcli.errors import FAILED, KdcliError

app = typer.Typer(help="Validate and describe dataset dirs.", no_args_is_help=True, rich_markup_mode="rich")

DatasetArg = Annotated[Path, typer.Argument(help="Dataset dir (a path, or a name under $KDCLI_DATASETS).")]


def _dataset(path: Path) -> Path:
    resolved = paths.resolve_dataset(path)
    if not resolved.is_dir():
        raise KdcliError(f"{path}: dataset dir not found",
                         hint=f"prepare one with `kdcli prepare {'|'.join(discover())}`")
    return resolved


@app.command("check")
def check_cmd(
    dataset: DatasetArg,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="Decode every image (slower, "
                                                                     "catches corrupt files).")] = True,
    max_problems: Annotated[int, typer.Option("--max-problems", help="Problems to print.")] = 50,
) -> None:
    """Validate a dataset dir: images open with their declared size, boxes inside, ids unique and >= 1,
    categories consistent with dataset.yaml. Exit code 1 when anything is wrong.

    Example: [bold]kdcli data check datasets/vedai25[/]
    """
    from kdcli.data.check import check

    problems = check(_dataset(dataset), decode=decode)
    for p in problems[:max_problems]:
        err.print(f"[red]x[/] {escape(p)}", highlight=False, soft_wrap=True)
    if problems:
        more = f" (first {max_problems} shown)" if len(problems) > max_problems else ""
        raise KdcliError(f"{dataset}: {len(problems)} problem(s) found{more}", exit_code=FAILED)
    out.print(f"[green]ok:[/] {dataset} is a valid dataset dir", highlight=False)


@app.command("stats")
def stats_cmd(
    dataset: DatasetArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Objects per class and split/fold, objects per image, box sizes and the share of small objects.

    Example: [bold]kdcli data stats datasets/vedai25 --json > stats.json[/]
    """
    from kdcli.data.check import stats

    s = stats(_dataset(dataset))
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    splits = s["splits"]
    if not s["classes"]:  # an unlabelled pool: images only
        t = Table(title=f"unlabelled images - {dataset}", title_justify="left")
        for col in ("split", "images", "image side p5", "p50", "p95"):
            t.add_column(col, justify="left" if col == "split" else "right")
        for name, v in splits.items():
            side = v["image_side_px"]
            t.add_row(name, str(v["images"]), *(str(side.get(k, "-")) for k in ("p5", "p50", "p95")))
        out.print(t)
        return
    t = Table(title=f"objects per class - {dataset}", title_justify="left")
    t.add_column("class")
    for name in splits:
        t.add_column(name, justify="right")
    for c in s["classes"]:
        t.add_row(c, *(str(v["objects_per_class"][c]) for v in splits.values()))
    t.add_row("[bold]images[/]", *(str(v["images"]) for v in splits.values()))
    t.add_row("[bold]objects[/]", *(str(v["objects"]) for v in splits.values()))
    out.print(t)
    t = Table(title="box sizes (px) and object density", title_justify="left")
    for col in ("split", "side p5", "side p50", "side p95", "small <32²", "medium", "large", "obj/img", "empty"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for name, v in splits.items():
        side = v["box_side_px"]
        t.add_row(name, str(side.get("p5", "-")), str(side.get("p50", "-")), str(side.get("p95", "-")),
                  f"{v['share_small']:.1%}", f"{v['share_medium']:.1%}", f"{v['share_large']:.1%}",
                  f"{v['objects_per_image']['mean']:.2f}", str(v["empty_images"]))
    out.print(t)
