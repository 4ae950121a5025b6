"""`kdcli prepare ...`: raw downloads (or synthetic data) -> dataset dirs."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.markup import escape
from rich.table import Table

from kdcli import paths
from kdcli.console import err, out
from kdcli.data.sources import FORCE, SEED, Source, discover
from kdcli.data.sources.common import SYNTHETIC_MARKER

app = typer.Typer(help=f"Convert raw datasets ({', '.join(discover())}) into kdcli dataset dirs, or write "
                       "synthetic raw data.", no_args_is_help=True, rich_markup_mode="rich")
GENERATORS = [name for name, source in discover().items() if source.synthetic]  # `prepare synthetic --kind`

Force = Annotated[bool, typer.Option("--force", help=FORCE.help)]
Seed = Annotated[int, typer.Option("--seed", help=SEED.help)]


def _default_out(src: Path, name: str) -> Path:
    """`<datasets>/<name>`, or `<datasets>/synthetic-<name>` when `src` was written by `prepare synthetic`."""
    synthetic = (src / SYNTHETIC_MARKER).is_file() and not name.startswith("synthetic-")
    return paths.datasets_root() / (f"synthetic-{name}" if synthetic else name)


def _summary(meta: dict[str, Any], out_dir: Path) -> None:
    """Print what was kept, merged and dropped, and the splits, then where the dataset is."""
    if meta.get("class_mapping"):
        t = Table(title=f"classes ({meta.get('preset')})", title_justify="left")
        for col in ("raw id", "raw class", "became", "objects"):
            t.add_column(col, justify="right" if col in ("raw id", "objects") else "left")
        for r in meta["class_mapping"]:
            style = "red" if r["fate"] == "dropped" else ("yellow" if r["fate"].startswith("merged") else "")
            t.add_row(str(r["raw_id"]), r["raw_name"], f"[{style}]{r['fate']}[/]" if style else r["fate"],
                      str(r["objects"]))
        err.print(t)
    splits = meta.get("splits", {})
    if splits:
        t = Table(title="splits", title_justify="left")
        t.add_column("split")
        grouped = any("groups" in s for s in splits.values())
        for col in ("images", "objects", *(("groups",) if grouped else ())):
            t.add_column(col, justify="right")
        for name, s in splits.items():
            t.add_row(name, str(s["images"]), str(s["objects"]), *((str(s.get("groups", "")),) if grouped else ()))
        err.print(t)
    if meta.get("split_rule", {}).get("rule"):
        err.print(f"split rule: {escape(meta['split_rule']['rule'])}", highlight=False, soft_wrap=True)
    if meta.get("dropped"):
        t = Table(title="dropped / clipped / skipped", title_justify="left")
        t.add_column("what")
        t.add_column("count", justify="right")
        t.add_column("first example", overflow="fold")
        for reason, d in meta["dropped"].items():
            t.add_row(reason, str(d["count"]), d.get("example", ""))
        err.print(t)
    what = (f"{len(meta['classes'])} classes: {', '.join(meta['classes'])}" if meta["classes"] else
            f"unlabelled, for distill.unlabeled={out_dir}")
    out.print(f"[green]dataset written:[/] {out_dir}  ({meta.get('images', 0)} images, {what})", highlight=False,
              soft_wrap=True)


def _parameter(name: str, kind: Any, default: Any, flags: tuple[str, ...], help: str, required: bool = False,
               show_default: bool | str = True) -> inspect.Parameter:
    """A Typer option from a registry entry; its help is plain text (a source writes "[default: ...]" for a
    None default, which rich would take for markup)."""
    option = typer.Option(*(flags or (f"--{name.replace('_', '-')}",)), help=escape(help), show_default=show_default)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option],
                             default=inspect.Parameter.empty if required else default)


def source_command(source: Source) -> Callable[..., None]:
    """`kdcli prepare <source>`: --src and --out, then the source's own options, from its registry entry."""

    def command(**options: Any) -> None:
        src = options.pop("src") or source.raw_path()
        out_dir = options.pop("out_dir") or _default_out(src, source.out_name(src, options))
        _summary(source.run(src, out_dir, options), out_dir)

    src_default = f"$KDCLI_DATASETS/raw/{source.raw_dir}" if source.raw_dir else False
    params = [_parameter("src", Path | None if source.raw_dir else Path, None, ("--src",), f"{source.src_help}.",
                         required=not source.raw_dir, show_default=src_default),
              _parameter("out_dir", Path | None, None, ("--out",), "Dataset dir to write.",
                         show_default=f"$KDCLI_DATASETS/{source.out_help}"),
              *(_parameter(o.name, o.type, o.default, o.flags, o.help, o.required) for o in source.options)]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = f"{source.title}\n\nExample: [bold]{source.example}[/]"
    command.__name__ = source.name
    return command


for _source in discover().values():
    app.command(_source.name)(source_command(_source))


@app.command("synthetic")
def synthetic(
    kind: Annotated[str, typer.Option("--kind", help="Raw format to write: "
                                                     f"{', '.join(GENERATORS)}.")] = "vedai",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder to write.",
                                                     show_default="$KDCLI_DATASETS/raw/synthetic-<kind>")] = None,
    seed: Seed = 0,
    images: Annotated[int | None, typer.Option("--images", help="Number of images (xView: scenes).",
                                                   show_default="the kind's, e.g. vedai 200")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Image side: VEDAI 25 cm side (12.5 cm is twice), "
                                                            "xView mean scene side, VOC width.",
                                                 show_default="the kind's, e.g. vedai 512")] = None,
    test_images: Annotated[int, typer.Option("--test-images", min=0, help="VEDAI: extra scenes listed in the test "
                                                                         "set of every fold (more evaluation "
                                                                         "images, same training set).")] = 0,
    force: Force = False,
) -> None:
    """Write a synthetic dataset in a raw format, for trying kdcli without downloads (and for tests).

    Example: [bold]kdcli prepare synthetic --kind vedai && kdcli prepare vedai --src
    datasets/raw/synthetic-vedai --res 25[/]
    """
    from kdcli.data import synthetic as gen

    out_dir = out_dir or paths.datasets_root() / "raw" / f"synthetic-{kind}"
    info = gen.generate(kind, out_dir, seed=seed, images=images, size=size, force=force, test_images=test_images)
    follow = f"kdcli prepare {kind} --src {out_dir}"
    out.print(f"[green]synthetic {kind} written:[/] {out_dir}  "
              f"({', '.join(f'{k} {v}' for k, v in info.items() if k not in ('kind', 'out'))})", highlight=False,
              soft_wrap=True)
    out.print(f"next: {follow}", highlight=False, soft_wrap=True)
