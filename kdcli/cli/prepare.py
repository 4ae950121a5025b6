"""`kdcli prepare ...`: raw downloads (or synthetic data) -> dataset dirs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kdcli import paths
from kdcli.console import err, out
from kdcli.data.sources.common import SYNTHETIC_MARKER, parse_int_list

app = typer.Typer(help="Convert raw datasets (VEDAI, xView, VOC, COCO JSON) into kdcli dataset dirs, or write "
                       "synthetic raw data.", no_args_is_help=True, rich_markup_mode="rich")

Force = Annotated[bool, typer.Option("--force", help="Replace an existing --out (built aside, swapped at the end).")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the val split (and of synthetic data).")]
Link = Annotated[bool, typer.Option("--link/--copy", help="Symlink images into the dataset dir, or copy them.")]
SkipBad = Annotated[bool, typer.Option("--skip-bad-images", help="Leave out images that fail to decode "
                                                                  "(counted) instead of stopping.")]


def _default_out(src: Path, name: str) -> Path:
    """`<datasets>/<name>`, or `<datasets>/synthetic-<name>` when `src` was written by `prepare synthetic`."""
    synthetic = (src / SYNTHETIC_MARKER).is_file()
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
        for col in ("images", "objects"):
            t.add_column(col, justify="right")
        for name, s in splits.items():
            t.add_row(name, str(s["images"]), str(s["objects"]))
        err.print(t)
    if meta.get("dropped"):
        t = Table(title="dropped / clipped / skipped", title_justify="left")
        t.add_column("what")
        t.add_column("count", justify="right")
        t.add_column("first example", overflow="fold")
        for reason, d in meta["dropped"].items():
            t.add_row(reason, str(d["count"]), d.get("example", ""))
        err.print(t)
    out.print(f"[green]dataset written:[/] {out_dir}  ({meta.get('images', 0)} images, {len(meta['classes'])} "
              f"classes: {', '.join(meta['classes'])})", highlight=False, soft_wrap=True)


@app.command("vedai")
def vedai(
    res: Annotated[int, typer.Option("--res", help="Ground resolution in cm: 25 (512 px) or 12 (12.5 cm, 1024 px).")]
    = 25,
    src: Annotated[Path | None, typer.Option("--src", help="Raw VEDAI folder [default: $KDCLI_DATASETS/raw/VEDAI].")]
    = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Dataset dir to write [default: "
                                                              "$KDCLI_DATASETS/vedai25 or vedai12].")] = None,
    classes: Annotated[str, typer.Option("--classes", help="Class preset: vedai8, vedai9, vehicle or all.")]
    = "vedai8",
    folds: Annotated[str | None, typer.Option("--folds", help="Folds to write, e.g. 1-5 [default: all 10].")] = None,
    link: Link = True,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of each fold's official training ids "
                                                                      "held out for validation (0: none, as the "
                                                                      "paper).")] = 0.1,
    seed: Seed = 0,
    force: Force = False,
    skip_bad_images: SkipBad = False,
) -> None:
    """Prepare VEDAI (25 cm or 12.5 cm) with its 10 official cross-validation folds.

    Example: [bold]kdcli prepare vedai --res 25[/]  (reads $KDCLI_DATASETS/raw/VEDAI, writes
    $KDCLI_DATASETS/vedai25)
    """
    from kdcli.data.sources import vedai as source

    src = src or paths.raw_dir("vedai")
    out_dir = out_dir or _default_out(src, f"vedai{res}")
    fold_list = parse_int_list(folds, "--folds") if folds else None
    meta = source.prepare(src, out_dir, res=res, classes=classes, folds=fold_list, images="link" if link else "copy",
                          val_fraction=val_fraction, seed=seed, force=force, skip_bad_images=skip_bad_images)
    _summary(meta, out_dir)


@app.command("xview")
def xview(
    src: Annotated[Path | None, typer.Option("--src", help="Raw xView folder with train_images/ and "
                                                           "xView_train.geojson [default: $KDCLI_DATASETS/raw/xView]."
                                             )] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Dataset dir [default: $KDCLI_DATASETS/xview].")]
    = None,
    tile: Annotated[int, typer.Option("--tile", help="Tile side in pixels.")] = 512,
    overlap: Annotated[float, typer.Option("--overlap", help="Overlap between neighbouring tiles (fraction).")] = 0.2,
    min_visible: Annotated[float, typer.Option("--min-visible", help="Keep a box cut by a tile edge when at least "
                                                                     "this share of it is inside.")] = 0.5,
    classes: Annotated[str, typer.Option("--classes", help="Preset: vehicle (one class), vehicles (per type), "
                                                           "all.")] = "vehicle",
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of scenes (not tiles) for val.")] = 0.2,
    seed: Seed = 0,
    keep_empty: Annotated[float, typer.Option("--keep-empty", help="Share of empty training tiles kept.")] = 0.1,
    workers: Annotated[int, typer.Option("--workers", help="Processes tiling scenes in parallel.")] = 0,
    link: Link = True,
    force: Force = False,
    skip_bad_images: SkipBad = False,
) -> None:
    """Prepare xView: split scenes into train/val, tile them, keep the chosen vehicle classes.

    Example: [bold]kdcli prepare xview --tile 512 --overlap 0.2 --workers 8[/]
    """
    from kdcli.data.sources import xview as source

    src = src or paths.raw_dir("xview")
    out_dir = out_dir or _default_out(src, "xview")
    meta = source.prepare(src, out_dir, tile=tile, overlap=overlap, min_visible=min_visible, classes=classes,
                          val_fraction=val_fraction, seed=seed, keep_empty=keep_empty, workers=workers,
                          images="link" if link else "copy", force=force, skip_bad_images=skip_bad_images)
    _summary(meta, out_dir)


@app.command("voc")
def voc(
    src: Annotated[Path | None, typer.Option("--src", help="VOCdevkit folder [default: "
                                                           "$KDCLI_DATASETS/raw/VOCdevkit].")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Dataset dir [default: $KDCLI_DATASETS/voc].")]
    = None,
    train: Annotated[str, typer.Option("--train", help="Image sets for training, YEAR/SET, comma-separated.")]
    = "2007/trainval,2012/trainval",
    test: Annotated[str, typer.Option("--test", help="Image sets for testing.")] = "2007/test",
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of training images for val.")] = 0.1,
    seed: Seed = 0,
    link: Link = True,
    force: Force = False,
    skip_bad_images: SkipBad = False,
) -> None:
    """Prepare Pascal VOC (07+12 trainval -> train/val, 07 test -> test); difficult objects are marked.

    Example: [bold]kdcli prepare voc --src ~/data/VOCdevkit[/]
    """
    from kdcli.data.sources import voc as source

    src = src or paths.raw_dir("voc")
    out_dir = out_dir or _default_out(src, "voc")
    meta = source.prepare(src, out_dir, train_sets=[s.strip() for s in train.split(",") if s.strip()],
                          test_sets=[s.strip() for s in test.split(",") if s.strip()], val_fraction=val_fraction,
                          seed=seed, images="link" if link else "copy", force=force, skip_bad_images=skip_bad_images)
    _summary(meta, out_dir)


@app.command("coco")
def coco_json(
    src: Annotated[Path, typer.Option("--src", help="COCO detection JSON of the training images.")],
    images: Annotated[Path, typer.Option("--images", help="Folder the JSON's file_name entries are relative to.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Dataset dir [default: $KDCLI_DATASETS/<json name>]."
                                                 )] = None,
    val: Annotated[Path | None, typer.Option("--val", help="COCO JSON of validation images (else carved from "
                                                           "train).")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of images for val when no --val.")]
    = 0.1,
    seed: Seed = 0,
    link: Link = True,
    force: Force = False,
    skip_bad_images: SkipBad = False,
) -> None:
    """Bring any COCO detection dataset: validated, categories renumbered 1..K, a val split carved if needed.

    Example: [bold]kdcli prepare coco --src ann/train.json --images imgs/ --out datasets/mydata[/]
    """
    from kdcli.data.sources import coco_json as source

    out_dir = out_dir or paths.datasets_root() / src.stem
    meta = source.prepare(src, images, out_dir, val=val, val_fraction=val_fraction, seed=seed,
                          images="link" if link else "copy", force=force, skip_bad_images=skip_bad_images)
    _summary(meta, out_dir)


@app.command("synthetic")
def synthetic(
    kind: Annotated[str, typer.Option("--kind", help="Raw format to write: vedai, xview or voc.")] = "vedai",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder to write [default: "
                                                              "$KDCLI_DATASETS/raw/synthetic-<kind>].")] = None,
    seed: Seed = 0,
    images: Annotated[int | None, typer.Option("--images", help="Number of images (xView: scenes) "
                                                                "[default: vedai 200, xview 5, voc 60].")] = None,
    size: Annotated[int | None, typer.Option("--size", help="Image side: VEDAI 25 cm side (12.5 cm is twice), "
                                                            "xView mean scene side, VOC width "
                                                            "[default: 512, 2000, 320].")] = None,
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
    follow = {"vedai": f"kdcli prepare vedai --src {out_dir} --res 25",
              "xview": f"kdcli prepare xview --src {out_dir}",
              "voc": f"kdcli prepare voc --src {out_dir}"}.get(kind, "")
    out.print(f"[green]synthetic {kind} written:[/] {out_dir}  "
              f"({', '.join(f'{k} {v}' for k, v in info.items() if k not in ('kind', 'out'))})", highlight=False,
              soft_wrap=True)
    out.print(f"next: {follow}", highlight=False, soft_wrap=True)
