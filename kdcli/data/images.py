"""Image files: decode checks, and placing raw images into a dataset dir (symlink or copy)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from kdcli.errors import KdcliError

Image.MAX_IMAGE_PIXELS = None  # whole satellite scenes are legitimately huge


class ImageDecodeError(KdcliError):
    """An image that exists but cannot be decoded."""


def probe(path: str | Path, decode: bool = True) -> tuple[int, int]:
    """(width, height) of an image; with `decode` the pixels are decoded too, so a corrupt file fails here."""
    try:
        with Image.open(path) as im:
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
    try:
        with Image.open(path) as im:
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
