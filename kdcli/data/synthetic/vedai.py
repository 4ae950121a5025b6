"""Synthetic data in VEDAI's raw format: `Vehicules512/1024`, `Annotations512/1024` (per-image 14-field files,
the combined 15-field file, 10 fold files). Scenes are rendered at 12.5 cm and shrunk by 2 for 25 cm, exactly
as the real 512 set is derived from the 1024 one; coordinates are halved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdcli import console
from kdcli.data.sources.common import SYNTHETIC_MARKER
from kdcli.data.sources.vedai import RAW_NAMES
from kdcli.data.synthetic.scenes import Placed, render

RAW_IDS = {name: i for i, name in RAW_NAMES.items()}
MPP_HI = 0.125  # metres per pixel of the 1024 set


def _line14(v: Placed, f: float, image_size: int) -> str:
    """The per-image annotation line of a vehicle, its render coordinates scaled by `f`."""
    c = v.corners() * f
    xs, ys = [int(round(x)) for x in c[:, 0]], [int(round(y)) for y in c[:, 1]]
    contained = int(all(0 <= x < image_size for x in xs + ys))
    return (f"{v.xc * f:.6f} {v.yc * f:.6f} {v.angle:.6f} {RAW_IDS[v.kind.name]} {contained} {int(v.occluded)} "
            + " ".join(map(str, xs + ys)))


def generate(out: Path, images: int = 200, size: int = 512, seed: int = 0, empty_share: float = 0.1,
             missing_ids: int = 1, test_images: int = 0) -> dict[str, int]:
    """Write `images` scenes at `size` px (25 cm) and 2*`size` px (12.5 cm). The fold test sets partition the
    ids; `missing_ids` ids are listed in fold files without an image (a case the real data has).
    `test_images` more scenes (ids after those) join the test list of every fold: a larger evaluation set at no
    training cost, still in VEDAI's raw format."""
    hi = 2 * size
    dirs = {k: out / k for k in ("Vehicules512", "Vehicules1024", "Annotations512", "Annotations1024")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    combined: dict[str, list[str]] = {"512": [], "1024": []}
    ids = [f"{i:08d}" for i in range(images)]
    extra = [f"{images + missing_ids + j:08d}" for j in range(test_images)]
    mean_objects = 2 + 6 * (size / 512) ** 2
    n_objects = 0
    for vid in console.track(ids + extra, "synthetic VEDAI scenes"):
        i = int(vid)
        rng = np.random.default_rng([seed, i])
        empty = rng.random() < empty_share
        n = 0 if empty else max(1, int(rng.poisson(mean_objects)))
        img, vehicles = render(rng, hi, hi, MPP_HI, n)
        small = img.resize((size, size), Image.LANCZOS)
        img.save(dirs["Vehicules1024"] / f"{vid}_co.png", compress_level=1)
        small.save(dirs["Vehicules512"] / f"{vid}_co.png", compress_level=1)
        for im, d in ((img, "Vehicules1024"), (small, "Vehicules512")):
            ir = np.asarray(im, np.float32) @ np.array([0.15, 0.65, 0.2], np.float32)
            Image.fromarray(np.clip(ir, 0, 255).astype(np.uint8), "L").save(dirs[d] / f"{vid}_ir.png",
                                                                             compress_level=1)
        n_objects += len(vehicles)
        if empty and i % 2 == 0:
            continue  # an empty scene without annotation file; odd ones get an empty file
        for res, f, px in (("1024", 1.0, hi), ("512", 0.5, size)):
            lines = [_line14(v, f, px) for v in vehicles]
            (dirs[f"Annotations{res}"] / f"{vid}.txt").write_text("".join(x + "\n" for x in lines))
            combined[res] += [_to_combined(vid, line) for line in lines]
    for res in ("512", "1024"):
        (dirs[f"Annotations{res}"] / f"annotation{res}.txt").write_text("".join(x + "\n" for x in combined[res]))
    order = list(ids)
    np.random.default_rng(seed).shuffle(order)
    listed = order + [f"{images + k:08d}" for k in range(missing_ids)]  # ids without any file
    groups = [sorted(listed[k::10]) for k in range(10)]
    for k in range(10):
        test = sorted(groups[k] + extra)
        train = sorted(i for j, g in enumerate(groups) if j != k for i in g)
        for res in ("512", "1024"):
            (dirs[f"Annotations{res}"] / f"fold{k + 1:02d}.txt").write_text("".join(i + "\n" for i in train))
            (dirs[f"Annotations{res}"] / f"fold{k + 1:02d}test.txt").write_text("".join(i + "\n" for i in test))
    (out / SYNTHETIC_MARKER).write_text(f"kdcli synthetic vedai: images={images} test_images={test_images} "
                                        f"size={size} seed={seed}\n")
    return {"images": images + test_images, "objects": n_objects, "folds": 10}


def _to_combined(vid: str, line14: str) -> str:
    f = line14.split()
    return " ".join([vid, f[0], f[1], f[2], *f[6:14], f[3], f[4], f[5]])
