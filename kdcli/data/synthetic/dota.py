"""Synthetic data in DOTA's raw format: `images/P<n>.png` scenes and `labelTxt/P<n>.txt` with the `imagesource:`
and `gsd:` header lines and one `x1 y1 ... x4 y4 class difficult` line per object (oriented polygons), and the
dirt real files carry: a file without the header lines, `gsd:null`, difficult objects, a polygon running off the
image, a line with a missing field, an unknown class, an image without a label file and a label without an image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcli import console
from kdcli.data.sources.common import SYNTHETIC_MARKER
from kdcli.data.synthetic.scenes import KIND_BY_NAME, render

MPP = 0.25
# rendered kind -> DOTA class
CLASS_OF = {"car": "small-vehicle", "pickup": "small-vehicle", "van": "small-vehicle", "truck": "large-vehicle",
            "bus": "large-vehicle", "camping car": "large-vehicle", "boat": "ship", "plane": "plane"}
KINDS = tuple(KIND_BY_NAME[k] for k in CLASS_OF)


def generate(out: Path, images: int = 6, size: int = 1400, seed: int = 0) -> dict[str, int]:
    """`images` scenes of about `size` px (sides vary +-25 %), about one vehicle per 20 m x 20 m."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labelTxt").mkdir(parents=True, exist_ok=True)
    n_objects = 0
    for i in console.track(range(images), "synthetic DOTA images"):
        rng = np.random.default_rng([seed, i])
        w, h = (int(size * rng.uniform(0.75, 1.25)) for _ in range(2))
        img, vehicles = render(rng, w, h, MPP, int(w * h * MPP * MPP / 400), KINDS)
        name = f"P{i:04d}"
        img.save(out / "images" / f"{name}.png", compress_level=1)
        if i == 1:
            continue  # an image without a label file
        lines = [] if i == 2 else ["imagesource:GoogleEarth", "gsd:null" if i == 3 else f"gsd:{MPP}"]
        for v in vehicles:
            poly = " ".join(f"{x:.1f} {y:.1f}" for x, y in v.corners())
            lines.append(f"{poly} {CLASS_OF[v.kind.name]} {int(v.occluded or not v.inside(w, h))}")
            n_objects += 1
        off = f"{w - 10} {h - 30} {w + 20} {h - 30} {w + 20} {h - 20} {w - 10} {h - 20}"  # runs off the image
        lines += [f"{off} large-vehicle 0",
                  "10 10 30 10 30 30 10 30 small-vehicle",  # no difficult field: read as 0
                  "10 10 30 10 30 30 10 small-vehicle 0",  # a coordinate missing
                  "40 40 60 40 60 60 40 60 tank 0"]  # not a DOTA class
        n_objects += 2
        (out / "labelTxt" / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    (out / "labelTxt" / "P9999.txt").write_text("imagesource:GoogleEarth\ngsd:0.2\n1 1 9 1 9 9 1 9 plane 0\n")
    (out / SYNTHETIC_MARKER).write_text(f"kdcli synthetic dota: images={images} size={size} seed={seed}\n")
    return {"images": images, "objects": n_objects}
