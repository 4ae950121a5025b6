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


def load_rgb(path: str | Path) -> np.ndarray:
    """An HxWx3 uint8 array; 1-channel (IR) images are repeated to 3 channels."""
    import numpy as np

    try:
        with pil_image().open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise KdcliError(f"{path}: image not found") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ImageDecodeError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def place(src: Path, dst: Path, mode: str) -> None:
    """Put `src` at `dst` as an absolute symlink (`link`) or a copy (`copy`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(src.resolve(), dst)
    elif mode == "copy":
        shutil.copy2(src, dst)
    else:
        raise ValueError(f"unknown image mode {mode!r}")
