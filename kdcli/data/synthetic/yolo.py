"""Synthetic data in Ultralytics' YOLO layout: `data.yaml` (names as an {id: name} mapping), `images/{train,val}`
and `labels/{train,val}` with normalised `class cx cy w h` lines, and the dirt real exports carry: oriented
boxes written as 4 points, a `classes.txt` in a label folder, an image without a label file (no objects), a label
file without its image, a line with a wrong field count, a value outside [0, 1] and an unknown class id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcli import console
from kdcli.data.sources.common import SYNTHETIC_MARKER
from kdcli.data.synthetic.scenes import KIND_BY_NAME, render

MPP = 0.15
NAMES = ["car", "truck", "bus"]
KINDS = tuple(KIND_BY_NAME[k] for k in NAMES)


def generate(out: Path, images: int = 60, size: int = 256, seed: int = 0) -> dict[str, int]:
    """`images` scenes of `size` px, one in five in val; the dirt listed above, once each."""
    n_objects = 0
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in console.track(range(images), "synthetic YOLO images"):
        split = "val" if i % 5 == 4 else "train"
        rng = np.random.default_rng([seed, i])
        img, vehicles = render(rng, size, size, MPP, max(1, int(rng.poisson(4))), KINDS, occlude_share=0.0)
        name = f"scene_{i:05d}"
        img.save(out / "images" / split / f"{name}.jpg", quality=92)
        if i == 1:
            continue  # an image without a label file: an image without objects
        lines = []
        for k, v in enumerate(vehicles):
            c = np.clip(v.corners(), 0, size) / size
            cls = NAMES.index(v.kind.name)
            if k == 0 and i % 3 == 0:  # oriented box as 4 points (DOTA/OBB exports)
                lines.append(f"{cls} " + " ".join(f"{x:.6f} {y:.6f}" for x, y in c))
            else:
                x0, y0, x1, y1 = c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()
                lines.append(f"{cls} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}")
            n_objects += 1
        if i == 2:
            lines += ["0 0.5 0.5 0.1", "1 0.5 0.5 1.2 0.1", "7 0.5 0.5 0.1 0.1"]  # field count, range, class
        (out / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    (out / "labels" / "train" / "classes.txt").write_text("".join(n + "\n" for n in NAMES))
    (out / "labels" / "train" / "deleted_image.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # its image is gone
    (out / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n"
                                   + "".join(f"  {k}: {n}\n" for k, n in enumerate(NAMES)))
    (out / SYNTHETIC_MARKER).write_text(f"kdcli synthetic yolo: images={images} size={size} seed={seed}\n")
    return {"images": images, "objects": n_objects}
