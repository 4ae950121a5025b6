"""Offline data in each raw format: realistic layouts, learnable objects, deterministic. A source offers a
generator through its registry entry (`Source.synthetic`), and `kdcli prepare synthetic --kind <source>` runs it.

`generate` writes into a temporary folder and renames it, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kdcli.atomic import atomic_dir
from kdcli.errors import KdcliError


def kinds() -> dict[str, Any]:
    """Source name -> its `Synthetic` entry, for the sources that have a generator."""
    from kdcli.data.sources import discover

    return {name: s.synthetic for name, s in sorted(discover().items()) if s.synthetic is not None}


def generate(kind: str, out: Path, seed: int = 0, images: int | None = None, size: int | None = None,
             force: bool = False, **extra: Any) -> dict[str, Any]:
    """Write a synthetic raw dataset of `kind` at `out`. `images` and `size` mean what the kind's generator says
    (xView: scenes and mean scene side); `extra` options (e.g. VEDAI's `test_images`) go to the kinds that take
    them, and a non-default value given to another kind is an error."""
    known = kinds()
    if kind not in known:
        raise KdcliError(f"unknown synthetic kind '{kind}'", hint=f"use one of {', '.join(known)}")
    spec = known[kind]
    for name, value in extra.items():
        if value and name not in spec.extra:
            users = [k for k, s in known.items() if name in s.extra]
            raise KdcliError(f"--{name.replace('_', '-')} is for --kind {' or '.join(users)}")
    images = spec.images if images is None else images
    size = spec.size if size is None else size
    if images < 1 or size < 32:
        raise KdcliError("--images must be >= 1 and --size >= 32")
    with atomic_dir(out, force) as tmp:
        info = importlib.import_module(spec.module).generate(
            tmp, images=images, size=size, seed=seed, **{k: v for k, v in extra.items() if k in spec.extra})
    return {"kind": kind, "out": str(out), "seed": seed, "size": size, **info}
