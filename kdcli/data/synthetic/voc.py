"""Synthetic data in Pascal VOC's raw format (the output folder plays `VOCdevkit`):
`VOC2007|VOC2012/{Annotations,ImageSets/Main,JPEGImages}` with the quirks real files have: a float coordinate,
an object without `<difficult>`, difficult objects, and a person with `<part>` boxes that must not be read as
objects.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from kdcli import console
from kdcli.data.sources.common import SYNTHETIC_MARKER
from kdcli.data.synthetic.scenes import KIND_BY_NAME, render

MPP = 0.15
# rendered kind -> VOC class
VOC_OF = {"car": "car", "bus": "bus", "boat": "boat", "plane": "aeroplane", "motorcycle": "motorbike",
          "truck": "train"}
KINDS = tuple(KIND_BY_NAME[k] for k in VOC_OF)


def _object_xml(name: str, box: tuple, difficult: int | None, parts: list[tuple] = ()) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    part_xml = "".join(f"<part><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                       f"<ymax>{b[3]}</ymax></bndbox></part>" for n, b in parts)
    return (f"<object><name>{escape(name)}</name><pose>Unspecified</pose><truncated>0</truncated>{diff}"
            f"<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
            f"</bndbox>{part_xml}</object>")


def generate(out: Path, images: int = 60, size: int = 320, seed: int = 0) -> dict[str, int]:
    """`images` split between VOC2007 (trainval + test) and VOC2012 (trainval)."""
    root = out  # the folder plays VOCdevkit
    plan = {"VOC2007": {"trainval": [], "test": []}, "VOC2012": {"trainval": []}}
    slots = [("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "trainval")]
    n_objects = 0
    for i in console.track(range(images), "synthetic VOC images"):
        year, image_set = slots[i % 3]
        vid = f"{2007 if year == 'VOC2007' else 2012}_{i:06d}"
        ydir = root / year
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (ydir / sub).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, i])
        w, h = size, int(size * rng.uniform(0.7, 1.0))
        img, vehicles = render(rng, w, h, MPP, max(1, int(rng.poisson(3))), KINDS, occlude_share=0.0)
        img.save(ydir / "JPEGImages" / f"{vid}.jpg", quality=92)
        objs = []
        for k, v in enumerate(vehicles):
            c = v.corners()
            x0, y0 = max(1, int(c[:, 0].min()) + 1), max(1, int(c[:, 1].min()) + 1)
            x1, y1 = min(w, int(c[:, 0].max()) + 1), min(h, int(c[:, 1].max()) + 1)
            if x1 <= x0 or y1 <= y0:
                continue
            box: tuple = (x0, y0, x1, y1)
            difficult: int | None = int(not v.inside(w, h))
            if k == 0 and i % 5 == 0:
                box = (f"{x0}.0", y0, f"{x1}.5", y1)  # float coordinates, as some VOC2012 files have
            if k == 1:
                difficult = None  # <difficult> missing: read as 0
            objs.append(_object_xml(VOC_OF[v.kind.name], box, difficult))
            n_objects += 1
        if i % 4 == 0:  # a person whose <part> boxes are not objects
            objs.append(_object_xml("person", (2, 2, 12, 30), 0, [("head", (4, 2, 9, 7)), ("hand", (2, 15, 4, 18))]))
            n_objects += 1
        xml = (f"<annotation><folder>{year}</folder><filename>{vid}.jpg</filename><size><width>{w}</width>"
               f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{''.join(objs)}</annotation>")
        (ydir / "Annotations" / f"{vid}.xml").write_text(xml, encoding="utf-8")
        plan[year][image_set].append(vid)
    for year, sets in plan.items():
        for image_set, ids in sets.items():
            (root / year / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(i + "\n" for i in ids))
    (root / SYNTHETIC_MARKER).write_text(f"kdcli synthetic voc: images={images} size={size} seed={seed}\n")
    return {"images": images, "objects": n_objects}
