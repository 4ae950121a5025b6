"""Reading scenes for prediction: PNG/JPEG through Pillow, TIFF/GeoTIFF (8/16-bit, float, any number of bands)
through tifffile, read window by window so a 10 000 x 10 000 scene is never converted whole.

Bands are chosen 1-based as in GDAL (`--bands 4,3,2`); one band is repeated to three. Non-8-bit data is scaled
per band between low and high percentiles measured on a strided sample of the scene. A north-up GeoTIFF's pixel
-> map transform (ModelPixelScale + ModelTiepoint, or ModelTransformation) and EPSG code are read from its tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdcli.console import err
from kdcli.data.images import pil_image
from kdcli.errors import KdcliError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SAMPLE_PIXELS = 1_000_000  # pixels sampled for the percentile statistics


def parse_bands(text: str | None, option: str = "--bands") -> list[int] | None:
    """A band choice as typed (`4,3,2`, 1-based as in GDAL, order kept): 3 bands, or 1 repeated to 3."""
    if not text:
        return None
    try:
        chosen = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KdcliError(f"{option} {text}: not a comma-separated list of band numbers") from None
    if min(chosen, default=1) < 1:
        raise KdcliError(f"{option} {text}: bands are numbered from 1 (as in GDAL), e.g. {option} 1,2,3")
    if len(chosen) not in (1, 3):
        raise KdcliError(f"{option} {text}: the model takes 3 bands, or 1 repeated to 3; {len(chosen)} given",
                         hint=f"choose three, e.g. {option} 4,3,2, or one, e.g. {option} 1")
    return chosen


@dataclass
class Raster:
    path: Path
    width: int
    height: int
    bands: int
    dtype: np.dtype
    pixels: np.ndarray  # H x W x bands (a memmap when the TIFF allows it)
    transform: tuple[float, ...] | None = None  # (a, b, c, d, e, f): X = a*col + b*row + c, Y = d*col + e*row + f
    epsg: int | None = None
    scale: list[tuple[float, float]] = field(default_factory=list)  # per chosen band: (low, high)
    chosen: list[int] = field(default_factory=list)  # 0-based band indices

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The window as H x W x 3 uint8, ready for the model."""
        win = np.asarray(self.pixels[y0:y1, x0:x1][..., self.chosen])
        if self.dtype != np.uint8 or self.scale:
            lo = np.array([s[0] for s in self.scale], np.float32)
            hi = np.array([s[1] for s in self.scale], np.float32)
            scaled = (win.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-6) * 255
            win = np.clip(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0), 0, 255).astype(np.uint8)
        if win.shape[-1] == 1:
            win = np.repeat(win, 3, axis=-1)
        return np.ascontiguousarray(win)

    def to_map(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d, e, f = self.transform  # type: ignore[misc]
        return a * x + b * y + c, d * x + e * y + f


def _geo(tif) -> tuple[tuple[float, ...] | None, int | None]:
    tags = tif.pages[0].tags
    transform = None
    if "ModelTransformationTag" in tags:
        m = tags["ModelTransformationTag"].value
        transform = (m[0], m[1], m[3], m[4], m[5], m[7])
    elif "ModelPixelScaleTag" in tags and "ModelTiepointTag" in tags:
        sx, sy = tags["ModelPixelScaleTag"].value[:2]
        i, j, _, x, y, _ = tags["ModelTiepointTag"].value[:6]
        transform = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
    epsg = None
    if "GeoKeyDirectoryTag" in tags:
        keys = tags["GeoKeyDirectoryTag"].value
        for k in range(4, len(keys) - 3, 4):
            if keys[k] in (3072, 2048) and keys[k + 1] == 0:  # Projected / Geographic CRS type, value inline
                epsg = int(keys[k + 3])
    return transform, epsg


def _tiff(path: Path) -> tuple[np.ndarray, tuple | None, int | None]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            transform, epsg = _geo(tif)
            axes = page.axes
            try:
                arr = tif.asarray(out="memmap") if page.is_contiguous else page.asarray()
            except (ValueError, TypeError):
                arr = page.asarray()
    except (tifffile.TiffFileError, OSError) as e:
        raise KdcliError(f"{path}: cannot read TIFF ({e})") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    elif axes.startswith("S") or (arr.ndim == 3 and arr.shape[0] < min(arr.shape[1:]) and arr.shape[0] <= 16):
        arr = np.moveaxis(arr, 0, -1)  # planar (bands first) -> H x W x bands
    return arr, transform, epsg


def open_raster(path: str | Path, bands: list[int] | None = None, percentiles: tuple[float, float] = (2, 98),
                normalize: str = "auto") -> Raster:
    """`normalize`: auto (percentile scaling unless 8-bit), percentile, or none (values taken as 0-255)."""
    path = Path(path)
    if not path.is_file():
        raise KdcliError(f"{path}: file not found")
    if path.suffix.lower() in (".tif", ".tiff"):
        arr, transform, epsg = _tiff(path)
    else:
        try:
            with pil_image().open(path) as im:
                arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "I;16", "I") else im)
        except (OSError, ValueError) as e:
            raise KdcliError(f"{path}: cannot decode image ({e})") from None
        arr = arr[..., None] if arr.ndim == 2 else arr
        transform, epsg = None, None
    n = arr.shape[-1]
    chosen = [b - 1 for b in bands] if bands else (list(range(3)) if n >= 3 else [0])
    if any(not 0 <= b < n for b in chosen):
        raise KdcliError(f"{path}: has {n} band(s), --bands asks for {','.join(str(b + 1) for b in chosen)}")
    r = Raster(path, arr.shape[1], arr.shape[0], n, arr.dtype, arr, transform, epsg, chosen=chosen)
    if normalize == "percentile" or (normalize == "auto" and arr.dtype != np.uint8):
        step = max(1, int(np.sqrt(r.width * r.height / SAMPLE_PIXELS)))
        sample = np.asarray(arr[::step, ::step][..., chosen], dtype=np.float32).reshape(-1, len(chosen))
        finite = np.isfinite(sample)
        if not finite.all():  # nodata as NaN/inf: left out of the statistics, read as black
            empty = [chosen[i] + 1 for i in range(len(chosen)) if not finite[:, i].any()]
            if empty:
                raise KdcliError(f"{path}: band(s) {','.join(map(str, empty))} hold no finite value (all NaN or "
                                 "infinite)", hint="choose other bands with --bands")
            share = 100 * (1 - finite.mean())
            err.print(f"[yellow]warning:[/] {path}: {share:.1f} % of the sampled pixels are NaN or infinite "
                      "(nodata): left out of the scaling and read as black", highlight=False, soft_wrap=True)
            sample = np.where(finite, sample, np.nan)
        lo, hi = np.nanpercentile(sample, percentiles, axis=0)
        r.scale = [(float(a), float(b)) for a, b in zip(lo, hi)]
    return r
