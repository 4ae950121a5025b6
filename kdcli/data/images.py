"""Image files: decode checks, and placing raw images into a dataset dir (symlink or copy).

numpy and PIL are imported on first use: the data sources import this module, and `kdcli` discovers every source
when it starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdcliError

if TYPE_CHECKING:
    import numpy as np


def pil_image() -> Any:
    """PIL's Image module, with the decompression-bomb limit off: whole satellite scenes are legitimately huge."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return Image


class ImageDecodeError(KdcliError):
    """An image that exists but cannot be decoded."""


def probe(path: str | Path, decode: bool = True) -> tuple[int, int]:
    """(width, height) of an image; with `decode` the pixels are decoded too, so a corrupt file fails here."""
    try:
        with pil_image().open(path) as im:
            size = im.size
            if decode:
                im.load()
        return size
    except FileNotFoundError:
        raise KdcliError(f"{path}: image not found") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ImageDecodeError(f"{path}: cannot decode image ({type(e).__name__}: {e})",
                               hint="pass --skip-bad-images to leave such images out") from None


STRETCH_PERCENTILES = (2, 98)  # non-8-bit images to 8 bit, per image and band (prepare images, xView/DOTA tiles)
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # Pillow modes of more than 8 bits a sample


def load_rgb(path: str | Path) -> np.ndarray:
    """An HxWx3 uint8 array; 1-channel (IR) images are repeated to 3 channels (see `read_rgb`)."""
    return read_rgb(path)[0]


def read_rgb(path: str | Path) -> tuple[np.ndarray, dict[str, Any] | None]:
    """An HxWx3 uint8 array, and the stretch (`stretch_entry`) of an image of more than 8 bits a sample, else None.

    8-bit images are decoded by Pillow as they are (1 channel repeated to 3). Pillow would convert wider ones
    without a word (16-bit grey clipped at 255, 16-bit RGB cut to its high byte): they are stretched to 8 bit per
    band between percentiles as `kdcli prepare images` does (`kdcli.data.rasters.open_raster`)."""
    import numpy as np

    try:
        with pil_image().open(path) as im:
            bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample: one value, or one per sample
            if im.mode not in _WIDE_MODES and max(bits if isinstance(bits, tuple) else [bits or 8]) <= 8:
                return np.asarray(im.convert("RGB")), None
    except FileNotFoundError:
        raise KdcliError(f"{path}: image not found") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ImageDecodeError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    from kdcli.data.rasters import open_raster

    raster = open_raster(path, None, STRETCH_PERCENTILES)
    try:
        pixels = raster.read(0, 0, raster.width, raster.height)
    finally:
        raster.close()
    return pixels, (stretch_entry(raster) if raster.scale else None)


def stretch_entry(raster: Any) -> dict[str, Any]:
    """How one image (a `kdcli.data.rasters.Raster`) was stretched, as recorded with it: dtype, each band's low/high."""
    return {"dtype": str(raster.dtype), "bands": [[float(f"{lo:.6g}"), float(f"{hi:.6g}")] for lo, hi in raster.scale]}


def stretch_provenance(stretched: dict[str, int], where: str) -> dict[str, Any]:
    """dataset.yaml's `stretch`: images stretched per dtype, the rule, and `where` each image's values are."""
    lo, hi = STRETCH_PERCENTILES
    return {"images": sum(stretched.values()), "dtypes": stretched,
            "rule": f"per image and band, linear from percentile {lo} to percentile {hi} of its values (a sample, "
                    "nodata left out) to 0-255, clipped",
            "values": f"each image's low/high per band: `stretch` in {where}"}


def say_stretch(stretch: dict[str, Any], total: int) -> None:
    """The note that `stretch` (`stretch_provenance`) of `total` source images were stretched."""
    from kdcli import console

    console.err.print(f"note: {stretch['images']} of {total} source images are not 8-bit "
                      f"({', '.join(f'{k}: {v}' for k, v in stretch['dtypes'].items())}): stretched to 8 bit "
                      f"{stretch['rule']} (recorded in dataset.yaml `stretch`)", highlight=False, soft_wrap=True)


def place(src: Path, dst: Path, mode: str) -> None:
    """Put `src` at `dst` as an absolute symlink (`link`) or a copy (`copy`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(src.resolve(), dst)
    elif mode == "copy":
        shutil.copy2(src, dst)
    else:
        raise ValueError(f"unknown image mode {mode!r}")
