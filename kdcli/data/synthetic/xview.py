"""Synthetic data in xView's raw format: `train_images/<n>.tif` scenes, `xView_train.geojson` and
`xview_class_labels.txt`, with the known dirt planted: type ids 75 and 82, a referenced scene that is absent
(`1395.tif`), boxes running off the image and a box with no area.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdcli import console
from kdcli.data.sources.common import SYNTHETIC_MARKER
from kdcli.data.synthetic.scenes import KIND_BY_NAME, render

MPP = 0.3
LABELS = {11: "Fixed-wing Aircraft", 12: "Small Aircraft", 13: "Cargo Plane", 15: "Helicopter",
          17: "Passenger Vehicle", 18: "Small Car", 19: "Bus", 20: "Pickup Truck", 21: "Utility Truck", 23: "Truck",
          24: "Cargo Truck", 25: "Truck w/Box", 26: "Truck Tractor", 27: "Trailer", 28: "Truck w/Flatbed",
          29: "Truck w/Liquid", 32: "Crane Truck", 33: "Railway Vehicle", 34: "Passenger Car", 35: "Cargo Car",
          36: "Flat Car", 37: "Tank car", 38: "Locomotive", 40: "Maritime Vessel", 41: "Motorboat", 42: "Sailboat",
          44: "Tugboat", 45: "Barge", 47: "Fishing Vessel", 49: "Ferry", 50: "Yacht", 51: "Container Ship",
          52: "Oil Tanker", 53: "Engineering Vehicle", 54: "Tower crane", 55: "Container Crane",
          56: "Reach Stacker", 57: "Straddle Carrier", 59: "Mobile Crane", 60: "Dump Truck", 61: "Haul Truck",
          62: "Scraper/Tractor", 63: "Front loader/Bulldozer", 64: "Excavator", 65: "Cement Mixer",
          66: "Ground Grader", 71: "Hut/Tent", 72: "Shed", 73: "Building", 74: "Aircraft Hangar",
          76: "Damaged Building", 77: "Facility", 79: "Construction Site", 83: "Vehicle Lot", 84: "Helipad",
          86: "Storage Tank", 89: "Shipping container lot", 91: "Shipping Container", 93: "Pylon", 94: "Tower"}
# rendered kind -> xView type id
TYPE_OF = {"car": 18, "pickup": 20, "van": 17, "truck": 23, "bus": 19, "camping car": 25, "tractor": 62,
           "boat": 41, "plane": 12, "other": 21, "motorcycle": 17}
KINDS = tuple(KIND_BY_NAME[k] for k in TYPE_OF)


def _feature(scene: str, type_id: int, box: tuple[float, ...], fid: int) -> dict:
    x0, y0, x1, y1 = box
    lon, lat = 39.0 + x0 * 1e-6, -6.0 - y0 * 1e-6
    return {"type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[lon, lat], [lon + 1e-5, lat], [lon + 1e-5, lat - 1e-5],
                                                             [lon, lat - 1e-5], [lon, lat]]]},
            "properties": {"bounds_imcoords": f"{int(x0)},{int(y0)},{int(x1)},{int(y1)}", "type_id": type_id,
                           "image_id": scene, "cat_id": fid % 7, "feature_id": fid, "edited_by": "synthetic"}}


def generate(out: Path, images: int = 5, size: int = 2000, seed: int = 0) -> dict[str, int]:
    """Write `images` square scenes of about `size` px (sizes vary +-25 %) and their GeoJSON."""
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    features = []
    n_objects = 0
    for i in console.track(range(images), "synthetic xView scenes"):
        rng = np.random.default_rng([seed, i])
        w, h = (int(size * rng.uniform(0.75, 1.25)) for _ in range(2))
        scene = f"{100 + i * 7}.tif"
        n = int(w * h * MPP * MPP / 900)  # about one vehicle per 30 m x 30 m
        img, vehicles = render(rng, w, h, MPP, n, KINDS)
        img.save(out / "train_images" / scene, format="TIFF", compression="tiff_deflate")
        for v in vehicles:
            c = v.corners()
            box = (float(np.floor(c[:, 0].min())), float(np.floor(c[:, 1].min())),
                   float(np.ceil(c[:, 0].max())), float(np.ceil(c[:, 1].max())))
            features.append(_feature(scene, TYPE_OF[v.kind.name], box, len(features) + 1))
            n_objects += 1
        # dirt: a type id that is no class, a box with no area, a box running far off the image
        features.append(_feature(scene, 75 if i % 2 == 0 else 82, (10, 10, 30, 30), len(features) + 1))
        features.append(_feature(scene, 18, (50, 60, 50, 80), len(features) + 1))
        features.append(_feature(scene, 18, (w - 12, h - 40, w + 60, h - 28), len(features) + 1))  # runs off
    features.append(_feature("1395.tif", 18, (5, 5, 20, 20), len(features) + 1))  # absent scene
    with open(out / "xView_train.geojson", "w", encoding="utf-8") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f)
    (out / "xview_class_labels.txt").write_text("".join(f"{k}:{v}\n" for k, v in LABELS.items()))
    (out / SYNTHETIC_MARKER).write_text(f"kdcli synthetic xview: scenes={images} size={size} seed={seed}\n")
    return {"scenes": images, "objects": n_objects, "features": len(features)}
