"""Aerial scene rendering shared by the synthetic generators.

Ground is smooth noise in earth tones with fields, roads, buildings and trees; vehicles are oriented rectangles
whose size, colour and markings differ by class (a dark windshield at the front, a pickup's open bed, a
truck's cab, a tractor's wheels, a boat's pointed hull, a plane's wings) and cast a shadow. Sizes are given in
metres, so one scene description renders at any ground resolution. Trees drawn after the vehicles occlude some.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class VehicleKind:
    name: str
    length: float  # metres
    width: float
    colours: tuple[tuple[int, int, int], ...]
    style: str  # car | pickup | van | truck | camper | tractor | boat | bus | moto | other | plane
    weight: float  # relative frequency


KINDS = (
    VehicleKind("car", 4.5, 1.9, ((190, 30, 30), (30, 60, 170), (35, 35, 40)), "car", 40),
    VehicleKind("pickup", 5.4, 2.0, ((225, 220, 205), (200, 170, 120)), "pickup", 14),
    VehicleKind("truck", 10.0, 2.5, ((40, 110, 60), (30, 90, 150)), "truck", 8),
    VehicleKind("van", 5.6, 2.2, ((240, 240, 240), (175, 180, 185)), "van", 8),
    VehicleKind("camping car", 7.0, 2.4, ((250, 250, 245),), "camper", 6),
    VehicleKind("tractor", 4.2, 2.4, ((230, 120, 20), (40, 140, 40)), "tractor", 5),
    VehicleKind("boat", 6.5, 2.3, ((245, 245, 250), (150, 20, 20)), "boat", 5),
    VehicleKind("other", 5.0, 2.6, ((110, 60, 140), (120, 80, 40)), "other", 4),
    VehicleKind("bus", 12.0, 2.6, ((240, 200, 20), (200, 40, 40)), "bus", 3),
    VehicleKind("motorcycle", 2.2, 0.9, ((20, 20, 20), (160, 20, 20)), "moto", 3),
    VehicleKind("plane", 14.0, 14.0, ((200, 205, 210),), "plane", 3),
)
KIND_BY_NAME = {k.name: k for k in KINDS}


@dataclass
class Placed:
    """A vehicle in scene coordinates (pixels at the render resolution)."""

    kind: VehicleKind
    xc: float
    yc: float
    angle: float  # radians, direction of the vehicle's length axis
    length: float  # pixels
    width: float
    colour: tuple[int, int, int]
    occluded: bool = False

    def corners(self) -> np.ndarray:
        """4x2 corners of the oriented rectangle: front-left, front-right, back-right, back-left."""
        return oriented_rect(self.xc, self.yc, self.length, self.width, self.angle)

    def inside(self, w: int, h: int) -> bool:
        c = self.corners()
        return bool((c[:, 0] >= 0).all() and (c[:, 0] < w).all() and (c[:, 1] >= 0).all() and (c[:, 1] < h).all())


def oriented_rect(xc: float, yc: float, length: float, width: float, angle: float) -> np.ndarray:
    ca, sa = math.cos(angle), math.sin(angle)
    u = np.array([ca, sa]) * length / 2  # along the length
    v = np.array([-sa, ca]) * width / 2  # across
    c = np.array([xc, yc])
    return np.stack([c + u - v, c + u + v, c - u + v, c - u - v])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    im = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def ground(rng: np.random.Generator, w: int, h: int, mpp: float) -> tuple[Image.Image, list[tuple]]:
    """Textured ground with fields, roads and buildings. Returns the image and the roads as (x0, y0, x1, y1, width)
    so that vehicles can park along them."""
    base = np.array(rng.choice([(120, 110, 80), (105, 120, 75), (140, 125, 95), (95, 100, 70)]), np.float32)
    low = _smooth_noise(rng, h, w, max(2, int(w * mpp / 60)))
    fine = rng.normal(0, 6, (h, w, 1)).astype(np.float32)
    arr = base[None, None, :] * (0.75 + 0.5 * low[..., None]) + fine
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    scale = 1.0 / mpp  # pixels per metre
    for _ in range(rng.integers(1, 4)):  # fields
        x0, y0 = rng.uniform(-0.2, 0.9) * w, rng.uniform(-0.2, 0.9) * h
        fw, fh = rng.uniform(0.2, 0.6) * w, rng.uniform(0.2, 0.6) * h
        tint = tuple(int(v) for v in rng.choice([(90, 130, 60), (170, 150, 90), (130, 100, 70)]))
        draw.rectangle([x0, y0, x0 + fw, y0 + fh], fill=tint)
        step = max(2, int(3 * scale))
        for yy in range(int(y0), int(y0 + fh), step):
            draw.line([x0, yy, x0 + fw, yy], fill=tuple(max(0, c - 15) for c in tint), width=1)
    roads = []
    for _ in range(rng.integers(1, 3)):
        width = rng.uniform(6, 10) * scale
        if rng.random() < 0.5:
            y = rng.uniform(0.15, 0.85) * h
            seg = (-10.0, y, w + 10.0, y + rng.uniform(-0.2, 0.2) * h)
        else:
            x = rng.uniform(0.15, 0.85) * w
            seg = (x, -10.0, x + rng.uniform(-0.2, 0.2) * w, h + 10.0)
        draw.line(seg, fill=(95, 95, 100), width=max(1, int(width)))
        draw.line(seg, fill=(200, 200, 190), width=max(1, int(0.15 * scale)))
        roads.append((*seg, width))
    for _ in range(rng.integers(0, 4)):  # buildings: distractors with hard edges, never labelled
        bw, bh = rng.uniform(8, 25) * scale, rng.uniform(8, 25) * scale
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        roof = tuple(int(v) for v in rng.choice([(150, 70, 55), (170, 170, 165), (90, 90, 95)]))
        draw.rectangle([x0 + 0.15 * bw, y0 + 0.15 * bh, x0 + 1.15 * bw, y0 + 1.15 * bh], fill=(45, 45, 40))
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=roof)
    return img, roads


def _poly(draw: ImageDraw.ImageDraw, pts: np.ndarray, fill: tuple) -> None:
    draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)


def _part(v: Placed, front: float, back: float, across: float = 1.0) -> np.ndarray:
    """The sub-rectangle of a vehicle between fractions `back`..`front` of its length (0 = back, 1 = front)."""
    ca, sa = math.cos(v.angle), math.sin(v.angle)
    mid = (front + back) / 2 - 0.5
    return oriented_rect(v.xc + ca * mid * v.length, v.yc + sa * mid * v.length,
                         (front - back) * v.length, v.width * across, v.angle)


def draw_vehicle(draw: ImageDraw.ImageDraw, v: Placed, mpp: float) -> None:
    dark = tuple(int(c * 0.35) for c in v.colour)
    shadow_off = 0.6 / mpp
    shadow = _part(v, 1, 0) + np.array([shadow_off, shadow_off])
    style = v.kind.style
    if style == "plane":
        wing = oriented_rect(v.xc, v.yc, v.length * 0.18, v.width, v.angle)
        body = oriented_rect(v.xc, v.yc, v.length, v.width * 0.14, v.angle)
        tail = _part(v, 0.1, 0.0, 0.4)
        for pts in (wing, body, tail):
            _poly(draw, pts + np.array([shadow_off * 2, shadow_off * 2]), (50, 50, 45))
        for pts in (wing, body, tail):
            _poly(draw, pts, v.colour)
        return
    _poly(draw, shadow, (45, 45, 40))
    if style == "tractor":
        for f, b in ((0.95, 0.7), (0.35, 0.0)):
            _poly(draw, _part(v, f, b, 1.0), (20, 20, 20))
        _poly(draw, _part(v, 0.9, 0.1, 0.7), v.colour)
        _poly(draw, _part(v, 0.45, 0.2, 0.6), dark)
        return
    if style == "boat":
        pts = _part(v, 0.8, 0, 1.0)
        tip = np.array([v.xc + math.cos(v.angle) * v.length / 2, v.yc + math.sin(v.angle) * v.length / 2])
        _poly(draw, np.vstack([pts[3], pts[2], pts[1], tip, pts[0]]), v.colour)
        _poly(draw, _part(v, 0.6, 0.3, 0.5), (60, 90, 150))
        return
    _poly(draw, _part(v, 1, 0), v.colour)
    if style == "car":
        _poly(draw, _part(v, 0.78, 0.62, 0.85), (25, 30, 40))
        _poly(draw, _part(v, 0.22, 0.12, 0.85), (25, 30, 40))
    elif style == "pickup":
        _poly(draw, _part(v, 0.8, 0.65, 0.85), (25, 30, 40))
        _poly(draw, _part(v, 0.45, 0.05, 0.8), (60, 55, 50))
    elif style == "van":
        _poly(draw, _part(v, 0.95, 0.85, 0.85), (25, 30, 40))
        for f in (0.6, 0.35):
            _poly(draw, _part(v, f, f - 0.04, 0.9), (150, 150, 150))
    elif style in ("truck", "bus"):
        cab = _part(v, 1.0, 0.8)
        _poly(draw, cab, v.colour if style == "bus" else (220, 220, 220))
        _poly(draw, _part(v, 0.78, 0.0, 1.0), (200, 200, 195) if style == "truck" else v.colour)
        if style == "bus":
            for f in (0.7, 0.45, 0.2):
                _poly(draw, _part(v, f, f - 0.06, 0.5), (120, 120, 120))
    elif style == "camper":
        _poly(draw, _part(v, 0.95, 0.05, 0.25), (60, 90, 160))
        _poly(draw, _part(v, 0.98, 0.88, 0.85), (25, 30, 40))
    elif style == "moto":
        _poly(draw, _part(v, 0.7, 0.3, 1.3), (90, 90, 90))
    elif style == "other":
        _poly(draw, _part(v, 0.7, 0.3, 0.7), (230, 230, 90))


def tree(draw: ImageDraw.ImageDraw, x: float, y: float, r: float) -> None:
    draw.ellipse([x - r + r * 0.3, y - r + r * 0.3, x + r + r * 0.3, y + r + r * 0.3], fill=(30, 40, 25))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(45, 85, 40))
    draw.ellipse([x - r * 0.5, y - r * 0.6, x + r * 0.3, y + r * 0.1], fill=(60, 105, 50))


def pick_kind(rng: np.random.Generator, kinds: tuple[VehicleKind, ...] = KINDS) -> VehicleKind:
    w = np.array([k.weight for k in kinds], np.float64)
    return kinds[int(rng.choice(len(kinds), p=w / w.sum()))]


def place_vehicles(rng: np.random.Generator, w: int, h: int, mpp: float, n: int, roads: list[tuple],
                   kinds: tuple[VehicleKind, ...] = KINDS, border_share: float = 0.06) -> list[Placed]:
    """Up to `n` non-overlapping vehicles; some along roads, a share cut by the image border."""
    placed: list[Placed] = []
    for _ in range(n * 20):
        if len(placed) >= n:
            break
        kind = pick_kind(rng, kinds)
        length = kind.length / mpp * rng.uniform(0.9, 1.1)
        width = kind.width / mpp * rng.uniform(0.9, 1.1)
        if roads and rng.random() < 0.5 and kind.style != "plane":
            x0, y0, x1, y1, rw = roads[int(rng.integers(len(roads)))]
            t = rng.uniform(0, 1)
            angle = math.atan2(y1 - y0, x1 - x0) + (math.pi if rng.random() < 0.5 else 0)
            side = rng.choice([-1, 1]) * rw * 0.25
            xc = x0 + t * (x1 - x0) - math.sin(angle) * side
            yc = y0 + t * (y1 - y0) + math.cos(angle) * side
        else:
            angle = rng.uniform(-math.pi, math.pi)
            xc, yc = rng.uniform(0, w), rng.uniform(0, h)
        v = Placed(kind, xc, yc, angle, length, width, tuple(int(c) for c in kind.colours[
            int(rng.integers(len(kind.colours)))]))
        if not v.inside(w, h) and rng.random() > border_share:
            continue
        c = v.corners()
        if c[:, 0].max() < 2 or c[:, 1].max() < 2 or c[:, 0].min() > w - 2 or c[:, 1].min() > h - 2:
            continue
        r = max(length, width) / 2
        if any(math.hypot(p.xc - xc, p.yc - yc) < r + max(p.length, p.width) / 2 + 1 for p in placed):
            continue
        placed.append(v)
    return placed


def render(rng: np.random.Generator, w: int, h: int, mpp: float, n_objects: int,
           kinds: tuple[VehicleKind, ...] = KINDS, occlude_share: float = 0.1) -> tuple[Image.Image, list[Placed]]:
    """A whole scene: ground, vehicles, then trees (some over vehicles, which become occluded)."""
    img, roads = ground(rng, w, h, mpp)
    vehicles = place_vehicles(rng, w, h, mpp, n_objects, roads, kinds)
    draw = ImageDraw.Draw(img)
    for v in vehicles:
        draw_vehicle(draw, v, mpp)
    for v in vehicles:
        if rng.random() < occlude_share:
            tree(draw, v.xc + v.length * 0.35 * math.cos(v.angle), v.yc + v.length * 0.35 * math.sin(v.angle),
                 max(v.width, 2.5 / mpp) * 0.6)
            v.occluded = True
    for _ in range(rng.integers(2, 8)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 4) / mpp
        if all(math.hypot(v.xc - x, v.yc - y) > r + max(v.length, v.width) for v in vehicles):
            tree(draw, x, y, r)
    return img, vehicles
