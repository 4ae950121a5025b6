"""Unlabelled imagery: a folder of images or whole scenes -> a dataset dir with an `unlabeled` split (COCO images,
no annotations), the pool a student distils on beside its labelled images (`distill.unlabeled=DIR`).

Every file `kdcli predict` reads is taken (PNG, JPEG, TIFF/GeoTIFF, 8/16-bit, float, any band count: `--bands`
chooses, one band is repeated to three, non-8-bit data is scaled between percentiles). With `--tile`, images
larger than a tile are cut into overlapping tiles as xView scenes are (the last tile of a row or column shifted
back to the border), written as PNG with their origin in the scene; without it, 8-bit RGB PNG/JPEG files are
linked or copied as they are and everything else is converted to PNG.

Nothing changes silently: images that are not 8-bit are stretched to 8 bit per image and band (the rule, the
count and each image's low/high values are recorded: `stretch` in dataset.yaml and in the split's image entries,
and printed); a 2-band image needs `--bands` (the default would use band 1 alone); an `--out` inside `--src` is
left out of the inputs (a rerun with `--force` would otherwise read the previous output back as new images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli import console
from kdcli.atomic import atomic_dir
from kdcli.data import coco
from kdcli.data.images import STRETCH_PERCENTILES, pil_image, place, say_stretch, stretch_entry, stretch_provenance
from kdcli.data.sources import FORCE, LINK, SKIP_BAD, Option, Source, calling, register
from kdcli.data.sources.common import require_folder, say_left_out, walk_images
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError

SPLIT = "unlabeled"


def _keep_as_is(path: Path) -> bool:
    """An 8-bit RGB PNG/JPEG needs no conversion."""
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        return False
    with pil_image().open(path) as im:
        return im.mode == "RGB"


def prepare(src: Path, out: Path, tile: int = 0, overlap: float = 0.2, bands: str | None = None,
            images: str = "link", force: bool = False, skip_bad_images: bool = False) -> dict[str, Any]:
    from kdcli.data.rasters import open_raster, parse_bands, require_band_choice
    from kdcli.data.tiling import MIN_TILE, windows

    require_folder(src, "--src", hint="give --src a folder of images or scenes")
    if tile < 0 or 0 < tile < MIN_TILE or not 0 <= overlap < 1:
        raise KdcliError(f"--tile {tile} --overlap {overlap}: the tile must be 0 (whole images) or at least "
                         f"{MIN_TILE} pixels, and the overlap in [0, 1)")
    chosen = parse_bands(bands)
    left_out: list[Path] = []
    files = walk_images(src, leave_out=out, left_out=left_out)
    left_out_record = say_left_out(left_out)
    if not files:
        raise KdcliError(f"{src}: no images (looked for PNG, JPEG, TIFF, BMP, links followed)")
    tally = Tally()
    stretched: dict[str, int] = {}  # dtype -> images stretched to 8 bit
    band_count: tuple[int, Path] | None = None
    with atomic_dir(out, force) as tmp:
        b = coco.CocoBuilder([], f"unlabelled images from {src.name}")
        (tmp / coco.IMAGES).mkdir(parents=True, exist_ok=True)
        for path in console.track(files, "images"):
            rel = path.relative_to(src)
            try:
                raster = open_raster(path, chosen, STRETCH_PERCENTILES)
            except KdcliError as e:
                if not skip_bad_images:
                    raise KdcliError(e.message, hint="leave such files out with --skip-bad-images") from None
                tally.add("image that cannot be read (skipped)", str(rel))
                continue
            require_band_choice(path, raster.bands, chosen)
            n = len(raster.chosen)
            if band_count is None:
                band_count = (n, rel)
            elif n != band_count[0]:
                raise KdcliError(f"{path}: {n} band(s) used, {band_count[1]} {band_count[0]}: one pool holds one "
                                 "kind of image", hint="choose the same bands for all with --bands")
            stem = "_".join(rel.with_suffix("").parts)
            stretch = {}
            if raster.scale:  # not 8-bit: stretched per band between percentiles, recorded with every image
                stretched[str(raster.dtype)] = stretched.get(str(raster.dtype), 0) + 1
                stretch = {"stretch": stretch_entry(raster)}
            if (not tile or max(raster.width, raster.height) <= tile) and not chosen and _keep_as_is(path):
                dst = f"{coco.IMAGES}/{stem}{path.suffix.lower()}"
                place(path, tmp / dst, images)
                b.add_image(len(b.images) + 1, dst, raster.width, raster.height, source=str(rel))
                continue
            for x0, y0, x1, y1 in windows(raster.width, raster.height, tile or max(raster.width, raster.height),
                                          overlap):
                dst = f"{coco.IMAGES}/{stem}_{x0}_{y0}.png"
                pil_image().fromarray(raster.read(x0, y0, x1, y1)).save(tmp / dst, compress_level=1)
                b.add_image(len(b.images) + 1, dst, x1 - x0, y1 - y0,
                            origin={"scene": str(rel), "x0": x0, "y0": y0}, **stretch)
            raster.close()  # tiles read window by window (GDAL or tifffile); the file let go here
        if not b.images:
            raise KdcliError(f"{src}: none of the {len(files)} images could be read", hint="see --skip-bad-images")
        splits, _ = coco.write_splits(tmp, {SPLIT: b})
        meta = {"name": out.name, "source": "images", "src": str(src.resolve()), "classes": [],
                "bands": band_count[0] if band_count else 3, "band_selection": chosen, "tile": tile,
                "overlap": overlap, "source_images": len(files), "images": len(b.images), "splits": splits,
                "dropped": tally.as_dict()}
        if stretched:
            meta["stretch"] = stretch_provenance(stretched, f"{coco.ANNOTATIONS}/{SPLIT}.json")
        if left_out:
            meta["left_out"] = left_out_record
        coco.write_dataset_yaml(tmp, meta)
    if stretched:
        say_stretch(meta["stretch"], len(files))
    return meta


register(Source(
    name="images",
    title="Unlabelled images or whole scenes (PNG, JPEG, GeoTIFF, any bands) -> an `unlabeled` split for "
          "distillation on unlabelled imagery, scenes tiled like xView.",
    example="kdcli prepare images --src flights/ --tile 512 --overlap 0.2 --out datasets/pool",
    src_help="Folder of images or scenes (searched recursively, links followed)", out_help="<src folder name>",
    options=(
        Option("tile", int, 0, "Cut images larger than this into tiles of this side (0: keep whole images)."),
        Option("overlap", float, 0.2, "Tile overlap, as a share of the tile."),
        Option("bands", str | None, None, "Bands to use, 1-based, 1 or 3 of them (e.g. 4,3,2); default: the first "
                                          "three (or the one band)."),
        LINK, FORCE, SKIP_BAD),
    run=calling(prepare),
    out_name=lambda src, o: src.name,
))
