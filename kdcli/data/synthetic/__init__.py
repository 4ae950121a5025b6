"""Offline data in each raw format (VEDAI, xView, VOC): realistic layouts, learnable objects, deterministic.

`generate` writes into a temporary folder and renames it, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.atomic import atomic_dir
from kdcli.errors import KdcliError

KINDS = ("vedai", "xview", "voc")
DEFAULTS = {"vedai": {"images": 200, "size": 512}, "xview": {"images": 5, "size": 2000},
            "voc": {"images": 60, "size": 320}}


def generate(kind: str, out: Path, seed: int = 0, images: int | None = None, size: int | None = None,
             force: bool = False, test_images: int = 0) -> dict[str, Any]:
    """Write a synthetic raw dataset of `kind` at `out`. `images` counts scenes for xView; `size` is the
    25 cm image side for VEDAI (the 12.5 cm set is twice as large), the mean scene side for xView.
    `test_images` (VEDAI): extra scenes in every fold's test list only."""
    if kind not in KINDS:
        raise KdcliError(f"unknown synthetic kind '{kind}'", hint=f"use one of {', '.join(KINDS)}")
    if test_images and kind != "vedai":
        raise KdcliError("--test-images is for --kind vedai (xView and VOC splits come from their own files)")
    images = DEFAULTS[kind]["images"] if images is None else images
    size = DEFAULTS[kind]["size"] if size is None else size
    if images < 1 or size < 32:
        raise KdcliError("--images must be >= 1 and --size >= 32")
    with atomic_dir(out, force) as tmp:
        if kind == "vedai":
            from kdcli.data.synthetic import vedai
            info = vedai.generate(tmp, n_images=images, size=size, seed=seed, test_images=test_images)
        elif kind == "xview":
            from kdcli.data.synthetic import xview
            info = xview.generate(tmp, n_scenes=images, size=size, seed=seed)
        else:
            from kdcli.data.synthetic import voc
            info = voc.generate(tmp, n_images=images, size=size, seed=seed)
    return {"kind": kind, "out": str(out), "seed": seed, "size": size, **info}
