"""Reading scenes window by window, so memory stays bounded whatever the scene's size, with their georeferencing.

Three readers, chosen by what the file and the installation allow:
- rasterio (GDAL), the `kdcli[geo]` extra, for TIFF/GeoTIFF. Chosen because one well-kept package (wheels bundle
  GDAL and PROJ) reads every layout and codec (stripped, tiled, deflate/LZW/JPEG/ZSTD, COGs and their overviews),
  any CRS as WKT, nodata and mask bands, and maps it to WGS84. GDAL decodes only the blocks a window touches;
  its block cache is set inside each read (`GDAL_CACHEMAX`, unless the user set it): for a stripped file one row
  of windows' strips, so a strip is decoded once and not once per window of its row (at most CACHE_MAX), else
  CACHE_MIN; a decimated read goes in bands of rows with their blocks cached (GDAL downsamples band by band).
- tifffile (always installed) when rasterio is not: it decodes only the strips/tiles of page 0 that a window
  touches (`TiffPage.decode` on the segments' bytes; its zarr store would need zarr) with the same byte-bounded
  cache. No memmap for uncompressed files: mapped pages count as resident, and a whole pass over a mapped file
  grows RSS to its size (measured: 0.21 GB after windows over a 0.19 GB file). The CRS is read only as an EPSG
  code from the GeoKeys (a user-defined or WKT-only CRS needs rasterio); JPEG-compressed TIFFs need rasterio.
- Pillow for PNG/JPEG/BMP: these formats cannot be read by window (PNG rows are one deflate stream, a baseline
  JPEG one entropy-coded stream; JPEG `draft` only decodes at 1/2..1/8 scale), so the image is decoded whole,
  once per use, with a warning above BIG_DECODE pixels: convert such scenes to a tiled GeoTIFF.

Measured on this 2-core CPU (`/usr/bin/time -v kdcli predict best.pt scene.tif --slice 1024 --batch 16`, a tiny
model, 3-band 8-bit deflate GeoTIFFs, drawing included), peak RSS before -> after (rasterio): 1024 px scene 0.95
-> 0.98 GB; 24 000 x 12 000 tiled 2.64 -> 1.02 GB, stripped 2.65 -> 1.05 GB; 48 000 x 12 000 tiled 4.66 GB before.

Bands are chosen 1-based as in GDAL (`--bands 4,3,2`); one band is repeated to three. Non-8-bit data is scaled
per band between low and high percentiles of a decimated read (at most SAMPLE_PIXELS pixels, from an overview
when the file has one); nodata pixels (NaN, infinite, the declared nodata value, a mask band) are left out of
the statistics and read as black. `open_raster` leaves nothing open: reads open the file on demand, `close()`
releases it.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcli.console import err
from kdcli.data.images import pil_image
from kdcli.errors import KdcliError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SAMPLE_PIXELS = 1_000_000  # pixels sampled for the percentile statistics
BIG_DECODE = 50_000_000  # PNG/JPEG pixels beyond which the whole-image decode is worth a warning
CACHE_MIN, CACHE_MAX = 32 << 20, 512 << 20  # block cache bounds, bytes
GEO_HINT = "pip install 'kdcli[geo]'"

_warned: set[str] = set()


def warn_once(key: str, text: str) -> None:
    if key not in _warned:
        _warned.add(key)
        err.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)


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


def require_band_choice(path: Path, count: int, bands: list[int] | None, option: str = "--bands") -> None:
    """Refuse a 2-band image read without a band choice: the default (the first three bands, or the one band)
    would quietly use band 1 alone and drop band 2."""
    if bands is None and count == 2:
        raise KdcliError(f"{path}: has 2 bands; without {option} only band 1 would be used",
                         hint=f"choose with {option}: one band repeated to three ({option} 1 or {option} 2) or "
                              f"three (e.g. {option} 1,2,2)")


def optional_rasterio() -> Any:
    try:
        import rasterio
    except ImportError:
        return None
    return rasterio


def _cache_bytes(row_bytes: int, rows: int) -> int:
    """A block cache holding `rows` full-width rows of every band, within CACHE_MIN..CACHE_MAX."""
    return int(min(CACHE_MAX, max(CACHE_MIN, row_bytes * rows * 1.1)))


def _with_mask(data: np.ndarray, invalid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    return data, (invalid if invalid is not None and invalid.any() else None)


class _Gdal:
    """rasterio (GDAL)."""

    def __init__(self, rio: Any, path: Path):
        self.rio = rio
        with rio.Env(), warnings.catch_warnings():
            warnings.simplefilter("ignore", rio.errors.NotGeoreferencedWarning)
            self.ds = ds = rio.open(path)
        self.width, self.height, self.count = ds.width, ds.height, ds.count
        self.dtype = np.dtype(ds.dtypes[0])
        self.transform = None if ds.transform.is_identity and ds.crs is None else tuple(ds.transform)[:6]
        self.crs = ds.crs.to_wkt() if ds.crs else None
        self.epsg = ds.crs.to_epsg() if ds.crs else None
        self.block_rows, block_cols = ds.block_shapes[0]
        self.stripped = block_cols >= ds.width
        self.errors = (rio.errors.RasterioError, OSError)

    def _env(self, rows: int) -> Any:
        if "GDAL_CACHEMAX" in os.environ:  # the user's choice
            return self.rio.Env()
        return self.rio.Env(GDAL_CACHEMAX=_cache_bytes(self.ds.width * self.ds.count * self.dtype.itemsize, rows))

    def _read(self, bands: list[int], rows: int, **kw: Any) -> tuple[np.ndarray, np.ndarray | None]:
        with self._env(rows):
            a = self.ds.read([b + 1 for b in bands], masked=True, **kw)
        invalid = None if a.mask is np.ma.nomask else np.moveaxis(np.ma.getmaskarray(a), 0, -1)
        return _with_mask(np.moveaxis(a.data, 0, -1), invalid)

    def read(self, bands: list[int], x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
        from rasterio.windows import Window

        # a stripped file: every window of a row of windows reads the same full-width strips, cached once
        rows = y1 - y0 + self.block_rows if self.stripped else 0
        return self._read(bands, rows, window=Window(x0, y0, x1 - x0, y1 - y0))

    def decimated(self, bands: list[int], step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Every step-th pixel each way (nearest; from an overview when the file has one), read in bands of rows
        a multiple of `step` high with their blocks cached: GDAL downsamples band by band, and each block is then
        decoded once for all bands."""
        from rasterio.windows import Window

        rows = step * -(-self.block_rows // step)
        data, masks = [], []
        for y in range(0, self.height, rows):
            h = min(rows, self.height - y)
            d, m = self._read(bands, rows + self.block_rows, window=Window(0, y, self.width, h),
                              out_shape=(len(bands), -(-h // step), -(-self.width // step)))
            data.append(d)
            masks.append(np.zeros(d.shape, bool) if m is None else m)
        return _with_mask(np.concatenate(data), np.concatenate(masks))

    def close(self) -> None:
        self.ds.close()


class _Tiff:
    """tifffile: the strips/tiles of page 0 that a window touches, decoded through a byte-bounded LRU cache."""

    def __init__(self, path: Path):
        import tifffile

        self.tif = tifffile.TiffFile(path)
        self.page = page = self.tif.pages[0]
        seps, depth, self.height, self.width, self.samples = page.shaped
        if depth != 1:
            self.tif.close()
            raise KdcliError(f"{path}: a 3-D TIFF ({depth} slices), not a scene")
        if page.compression != 1 and page.compression not in tifffile.TIFF.DECOMPRESSORS:
            self.tif.close()
            raise KdcliError(f"{path}: {page.compression.name} compression needs GDAL (or imagecodecs) to decode",
                             hint=GEO_HINT)
        self.count, self.dtype = seps * self.samples, np.dtype(page.dtype)
        self.seg_h, self.seg_w = (page.tilelength, page.tilewidth) if page.is_tiled else \
            (min(page.rowsperstrip or self.height, self.height), self.width)
        self.across, self.down = -(-self.width // self.seg_w), -(-self.height // self.seg_h)
        self.transform, self.epsg = _geo(page.tags)
        self.crs = f"EPSG:{self.epsg}" if self.epsg else None
        nodata = page.tags.get(42113)  # GDAL_NODATA, as text
        try:
            self.nodata = float(nodata.value) if nodata is not None else None
        except ValueError:
            self.nodata = None
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cached = 0
        self.errors = (tifffile.TiffFileError, ValueError, NotImplementedError, OSError, zlib.error)

    def _segment(self, index: int, budget: int) -> np.ndarray:
        seg = self.cache.pop(index, None)
        if seg is None:
            page = self.page
            data = None
            if page.databytecounts[index]:
                self.tif.filehandle.seek(page.dataoffsets[index])
                data = self.tif.filehandle.read(page.databytecounts[index])
            arr, (_, _, sy, sx, _), shape = page.decode(data, index, jpegtables=page.jpegtables)
            seg = np.zeros(shape[1:], self.dtype) if arr is None else arr[0]  # empty segment: zeros
            seg = seg[:self.height - sy, :self.width - sx]  # edge tiles are padded
            self.cached += seg.nbytes
        self.cache[index] = seg
        while self.cached > budget and len(self.cache) > 1:
            self.cached -= self.cache.popitem(last=False)[1].nbytes
        return seg

    def read(self, bands: list[int], x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray | None]:
        stripped = self.seg_w >= self.width  # then every window of a row of windows decodes the same strips
        budget = _cache_bytes(self.width * self.count * self.dtype.itemsize, y1 - y0 + self.seg_h if stripped else 0)
        out = np.zeros((y1 - y0, x1 - x0, len(bands)), self.dtype)
        planes: dict[int, list[tuple[int, int]]] = {}  # plane -> (output channel, sample in the segment)
        for j, b in enumerate(bands):
            planes.setdefault(b // self.samples, []).append((j, b % self.samples))
        for plane, pairs in planes.items():
            channels, samples = [j for j, _ in pairs], [s for _, s in pairs]
            for r in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
                for c in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                    seg = self._segment((plane * self.down + r) * self.across + c, budget)
                    sy, sx = r * self.seg_h, c * self.seg_w
                    ya, yb = max(y0, sy), min(y1, sy + seg.shape[0])
                    xa, xb = max(x0, sx), min(x1, sx + seg.shape[1])
                    out[ya - y0:yb - y0, xa - x0:xb - x0, channels] = \
                        seg[ya - sy:yb - sy, xa - sx:xb - sx][..., samples]
        invalid = None
        if self.nodata is not None:
            invalid = np.isnan(out) if np.isnan(self.nodata) else out == self.nodata
        return _with_mask(out, invalid)

    def decimated(self, bands: list[int], step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Every step-th pixel each way: the strips/tiles of each row of segments that holds a sampled row, one
        row of segments at a time (a stripped file's other strips are not decoded)."""
        data, masks = [], []
        for y0 in range(0, self.height, self.seg_h):
            y1 = min(self.height, y0 + self.seg_h)
            first = -(-y0 // step) * step  # the first sampled row at or below y0
            if first >= y1:
                continue
            d, m = self.read(bands, 0, y0, self.width, y1)
            data.append(d[first - y0::step, ::step].copy())  # a view would keep the whole band alive
            masks.append(np.zeros(data[-1].shape, bool) if m is None else m[first - y0::step, ::step].copy())
        return _with_mask(np.concatenate(data), np.concatenate(masks))

    def close(self) -> None:
        self.tif.close()
        self.cache.clear()


class _Decoded:
    """Pillow: the whole image, decoded at open."""

    def __init__(self, path: Path):
        with pil_image().open(path) as im:
            self.pixels = np.asarray(im.convert("RGB") if im.mode not in ("L", "I;16", "I") else im)
        if self.pixels.ndim == 2:
            self.pixels = self.pixels[..., None]
        self.height, self.width, self.count = self.pixels.shape
        self.dtype = self.pixels.dtype
        self.transform = self.crs = self.epsg = None
        self.errors = ()
        if self.width * self.height > BIG_DECODE:
            warn_once("big-decode", f"{path}: {path.suffix[1:].upper()} cannot be read by window: the "
                                    f"{self.width} x {self.height} image is decoded whole "
                                    f"({self.pixels.nbytes / 2**30:.1f} GiB); a tiled GeoTIFF keeps memory bounded")

    def read(self, bands: list[int], x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, None]:
        return self.pixels[y0:y1, x0:x1][..., bands], None

    def decimated(self, bands: list[int], step: int) -> tuple[np.ndarray, None]:
        return self.pixels[::step, ::step][..., bands], None

    def close(self) -> None:
        self.pixels = None


def _open_source(path: Path) -> Any:
    if path.suffix.lower() not in (".tif", ".tiff"):
        try:
            return _Decoded(path)
        except (OSError, ValueError) as e:
            raise KdcliError(f"{path}: cannot decode image ({e})") from None
    rio = optional_rasterio()
    if rio is not None:
        try:
            return _Gdal(rio, path)
        except rio.errors.RasterioIOError as e:
            raise KdcliError(f"{path}: cannot read TIFF ({e})") from None
    import tifffile

    try:
        return _Tiff(path)
    except (tifffile.TiffFileError, OSError, ValueError) as e:
        raise KdcliError(f"{path}: cannot read TIFF ({e})") from None


@dataclass
class Raster:
    """A scene's size, bands and georeferencing; pixels read by window on demand (see the module docstring)."""

    path: Path
    width: int
    height: int
    bands: int
    dtype: np.dtype
    transform: tuple[float, ...] | None = None  # (a, b, c, d, e, f): X = a*col + b*row + c, Y = d*col + e*row + f
    crs: str | None = None  # WKT (rasterio), or EPSG:<code> (tifffile)
    epsg: int | None = None
    scale: list[tuple[float, float]] = field(default_factory=list)  # per chosen band: (low, high)
    chosen: list[int] = field(default_factory=list)  # 0-based band indices
    _source: Any = field(default=None, repr=False)

    def _call(self, what: str, fn: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if self._source is None:
            self._source = _open_source(self.path)
        try:
            return fn(self._source)
        except KdcliError:
            raise
        except self._source.errors as e:
            raise KdcliError(f"{self.path}: cannot read {what} ({str(e)[:200]})") from None

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The window as H x W x 3 uint8, ready for the model."""
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise KdcliError(f"{self.path}: window x {x0}..{x1}, y {y0}..{y1} is not inside the {self.width} x "
                             f"{self.height} scene")
        return self._to_uint8(*self._call(f"window x {x0}..{x1}, y {y0}..{y1}",
                                          lambda s: s.read(self.chosen, x0, y0, x1, y1)))

    def read_decimated(self, step: int) -> np.ndarray:
        """Every step-th pixel each way as H x W x 3 uint8 (a drawing's background)."""
        return self._to_uint8(*self._call("a decimated copy", lambda s: s.decimated(self.chosen, step)))

    def _to_uint8(self, win: np.ndarray, invalid: np.ndarray | None) -> np.ndarray:
        if self.scale:
            lo = np.array([s[0] for s in self.scale], np.float32)
            hi = np.array([s[1] for s in self.scale], np.float32)
            scaled = (win.astype(np.float32) - lo) / np.maximum(hi - lo, 1e-6) * 255
            if invalid is not None:
                scaled[invalid] = 0
            win = np.clip(np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0), 0, 255).astype(np.uint8)
        elif win.dtype != np.uint8:  # --normalize none: values taken as 0-255
            win = np.clip(np.nan_to_num(win.astype(np.float32)), 0, 255).astype(np.uint8)
        if invalid is not None:
            win = np.where(invalid, 0, win).astype(np.uint8)
        if win.shape[-1] == 1:
            win = np.repeat(win, 3, axis=-1)
        return np.ascontiguousarray(win)

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def to_map(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d, e, f = self.transform  # type: ignore[misc]
        return a * x + b * y + c, d * x + e * y + f

    def to_wgs84(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates -> longitude, latitude (WGS84, RFC 7946 order) through the scene's CRS: rasterio,
        else pyproj; a KdcliError says why not."""
        if self.transform is None or self.crs is None:
            raise KdcliError(f"{self.path}: no CRS, so no WGS84 coordinates")
        mx, my = self.to_map(np.asarray(x, np.float64), np.asarray(y, np.float64))
        rio = optional_rasterio()
        try:
            if rio is not None:
                from rasterio.warp import transform

                lon, lat = transform(rio.crs.CRS.from_user_input(self.crs), "EPSG:4326", mx.ravel(), my.ravel())
            else:
                try:
                    import pyproj
                except ImportError:
                    raise KdcliError(f"{self.path}: WGS84 coordinates need rasterio or pyproj",
                                     hint=GEO_HINT) from None
                lon, lat = pyproj.Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True).transform(
                    mx.ravel(), my.ravel())
        except KdcliError:
            raise
        except Exception as e:  # noqa: BLE001 - GDAL/PROJ raise their own exception types
            raise KdcliError(f"{self.path}: its CRS has no transformation to WGS84 ({str(e)[:200]})") from None
        lon, lat = np.asarray(lon, np.float64).reshape(mx.shape), np.asarray(lat, np.float64).reshape(my.shape)
        if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
            raise KdcliError(f"{self.path}: some boxes fall outside the area where its CRS maps to WGS84")
        return lon, lat


def _geo(tags: Any) -> tuple[tuple[float, ...] | None, int | None]:
    """The pixel -> map transform and EPSG code from GeoTIFF tags (tifffile reader)."""
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
            if keys[k] in (3072, 2048) and keys[k + 1] == 0 and keys[k + 3] != 32767:  # EPSG code inline
                epsg = int(keys[k + 3])
    return transform, epsg


def open_raster(path: str | Path, bands: list[int] | None = None, percentiles: tuple[float, float] = (2, 98),
                normalize: str = "auto") -> Raster:
    """`normalize`: auto (percentile scaling unless 8-bit), percentile, or none (values taken as 0-255)."""
    path = Path(path)
    if not path.is_file():
        raise KdcliError(f"{path}: file not found")
    src = _open_source(path)
    n = src.count
    chosen = [b - 1 for b in bands] if bands else (list(range(3)) if n >= 3 else [0])
    r = Raster(path, src.width, src.height, n, src.dtype, src.transform, src.crs, src.epsg, chosen=chosen,
               _source=src)
    try:
        if any(not 0 <= b < n for b in chosen):
            raise KdcliError(f"{path}: has {n} band(s), --bands asks for {','.join(str(b + 1) for b in chosen)}")
        if normalize == "percentile" or (normalize == "auto" and src.dtype != np.uint8):
            r.scale = _percentiles(r, percentiles)
    finally:
        r.close()
    return r


def _percentiles(r: Raster, percentiles: tuple[float, float]) -> list[tuple[float, float]]:
    step = max(1, int(np.sqrt(r.width * r.height / SAMPLE_PIXELS)))
    data, invalid = r._call("its statistics", lambda s: s.decimated(r.chosen, step))
    sample = data.astype(np.float32).reshape(-1, len(r.chosen))
    if invalid is not None:
        sample[invalid.reshape(sample.shape)] = np.nan
    finite = np.isfinite(sample)
    if not finite.all():  # nodata: left out of the statistics, read as black
        empty = [r.chosen[i] + 1 for i in range(len(r.chosen)) if not finite[:, i].any()]
        if empty:
            raise KdcliError(f"{r.path}: band(s) {','.join(map(str, empty))} hold no valid value (all nodata, NaN "
                             "or infinite)", hint="choose other bands with --bands")
        share = 100 * (1 - finite.mean())
        err.print(f"[yellow]warning:[/] {r.path}: {share:.1f} % of the sampled pixels are nodata (NaN, infinite or "
                  "masked): left out of the scaling and read as black", highlight=False, soft_wrap=True)
        sample = np.where(finite, sample, np.nan)
    lo, hi = np.nanpercentile(sample, percentiles, axis=0)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]
