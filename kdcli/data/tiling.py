"""Overlapping square windows over a large image (xView tiles at preparation, sliced inference at prediction)."""

from __future__ import annotations


def tile_origins(size: int, tile: int, overlap: float) -> list[int]:
    """Tile starts along one axis: a fixed stride, the last tile shifted back to end at the border."""
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def windows(width: int, height: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) windows covering the image row by row; edge windows end at the border, and an image
    smaller than `tile` is one window of its own size."""
    return [(x0, y0, min(x0 + tile, width), min(y0 + tile, height))
            for y0 in tile_origins(height, tile, overlap) for x0 in tile_origins(width, tile, overlap)]
