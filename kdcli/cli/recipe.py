"""`kdcli recipe show|keys`: validate a recipe with overrides and print the fully resolved result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from kdcli import atomic
from kdcli.config import load
from kdcli.config import schema
from kdcli.console import out

app = typer.Typer(help="Validate recipes and list their keys.", no_args_is_help=True, rich_markup_mode="rich")


@app.command("show")
def show(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or a name under recipes/ (e.g. data/vedai25).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. fold=2 data.imgsz=640.")]
    = None,
    save: Annotated[Path | None, typer.Option("--save", help="Also write the resolved recipe to this file.")] = None,
) -> None:
    """Validate a recipe (unknown keys and wrong types are errors) and print it fully resolved.

    Example: [bold]kdcli recipe show data/vedai25 fold=3 data.imgsz=640[/]
    """
    resolved = load.dump(load.load(schema.Recipe, recipe, overrides or []))
    text = yaml.safe_dump(resolved, sort_keys=False)
    typer.echo(text, nl=False)
    if save is not None:
        atomic.write_text(save, text)
        out.print(f"[green]written:[/] {save}", highlight=False)


@app.command("keys")
def keys() -> None:
    """List every recipe key with its default and meaning.

    Example: [bold]kdcli recipe keys | grep augment[/]
    """
    for key in load.leaf_keys(schema.Recipe):
        model: type = schema.Recipe
        *parents, leaf = key.split(".")
        for p in parents:
            model = load.submodel(model.model_fields[p].annotation)
        field = model.model_fields[leaf]
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        typer.echo(f"{key:32s} {default:14s} {field.description or ''}")
