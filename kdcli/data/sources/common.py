"""Helpers every source shares: class presets, box clipping, seeded val splits, id lists."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.data.images import ImageDecodeError, probe
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError

SLIVER = 1.0  # pixels: a clipped box thinner than this is dropped as a sliver
NON_FINITE = "box with non-finite coordinates (NaN or inf) (dropped)"


@dataclass
class Preset:
    """Maps raw class ids to kept class names; a raw id absent from `mapping` is dropped."""

    name: str
    classes: list[str]
    mapping: dict[int, str]
    raw_names: dict[int, str]
    seen: Counter[int] = field(default_factory=Counter)

    def label(self, raw_id: int) -> int | None:
        """0-based label of a raw class id, or None when the preset drops it."""
        self.seen[raw_id] += 1
        name = self.mapping.get(raw_id)
        return None if name is None else self.classes.index(name)

    def describe(self) -> list[dict[str, Any]]:
        """One row per raw class seen or known: raw id, raw name, what became of it, object count."""
        rows = []
        for raw_id in sorted(set(self.raw_names) | set(self.seen)):
            raw = self.raw_names.get(raw_id, f"unknown id {raw_id}")
            target = self.mapping.get(raw_id)
            if target is None:
                fate = "dropped"
            elif target == raw:
                fate = "kept"
            else:
                fate = f"merged into {target}"
            rows.append({"raw_id": raw_id, "raw_name": raw, "fate": fate, "objects": self.seen[raw_id]})
        return rows


def clip_box(x0: float, y0: float, x1: float, y1: float, w: float, h: float) -> tuple[tuple[float, ...], bool]:
    """The box clipped to [0, w] x [0, h], and whether clipping changed it."""
    c = (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))
    return c, c != (x0, y0, x1, y1)


def is_sliver(box: tuple[float, ...]) -> bool:
    return box[2] - box[0] < SLIVER or box[3] - box[1] < SLIVER


def finite_box(values: Iterable[float], tally: Tally, where: str) -> bool:
    """Whether every raw number of a box is finite; a box with a NaN or an inf is counted (one reason for every
    source) and must be dropped. NaN passes every comparison unnoticed (it is neither clipped nor a sliver, and
    `min` of a polygon may or may not return it) and inf is clipped to the border, so a source checks its raw
    numbers here before anything else (a class table, the corners' min/max) sees them."""
    if all(math.isfinite(v) for v in values):
        return True
    tally.add(NON_FINITE, where)
    return False


def fitted_box(x0: float, y0: float, x1: float, y1: float, w: float, h: float, tally: Tally, where: str,
               dropped: str, clipped: str = "box clipped to the image") -> tuple[float, ...] | None:
    """A raw box clipped to the image; None when nothing of it is left or a number is not finite. Every outcome
    is counted in `tally` (clipping and slivers under the source's own wording), so nothing is dropped or
    changed silently."""
    if not finite_box((x0, y0, x1, y1), tally, where):
        return None
    box, was_clipped = clip_box(x0, y0, x1, y1, w, h)
    if is_sliver(box):
        tally.add(dropped, where)
        return None
    if was_clipped:
        tally.add(clipped, where)
    return box


def probed_size(path: Path, tally: Tally, skip_bad: bool, decode: bool = True, what: str = "image",
                boxes: int = 0) -> tuple[int, int] | None:
    """(width, height) of an image; None when it cannot be read and `skip_bad` allows skipping it, counted with
    the `boxes` its annotations held (lost with it), else the one-line decode error propagates."""
    try:
        return probe(path, decode=decode)
    except ImageDecodeError as e:
        if not skip_bad:
            raise
        tally.add(f"{what} failed to {'decode' if decode else 'open'} (skipped)", e.message)
        if boxes:
            tally.add(f"boxes of skipped {what}s (dropped)", f"{path}: {boxes}", n=boxes)
        return None


def val_split(ids: list[Any], fraction: float, seed: int, salt: int = 0,
              groups: dict[Any, str] | None = None) -> tuple[list[Any], list[Any]]:
    """(train, val): a seeded share `fraction` of `ids` goes to val (at least one when fraction > 0).

    With `groups` (id -> group, see `kdcli.data.groups`) whole groups move: the groups are shuffled and taken
    in turn while each brings val's image count closer to `fraction` of the images, so no group straddles the
    two parts (at least one group goes to val when fraction > 0, at least one stays)."""
    if not 0 <= fraction < 1:
        raise KdcliError(f"--val-fraction must be in [0, 1), got {fraction}")
    rng = random.Random(seed * 1_000_003 + salt)
    if groups is None:
        n_val = 0 if fraction == 0 or len(ids) < 2 else max(1, round(fraction * len(ids)))
        order = sorted(ids)
        rng.shuffle(order)
        val = set(order[:n_val])
        return [i for i in ids if i not in val], [i for i in ids if i in val]
    size = Counter(groups[i] for i in ids)
    keys = sorted(size)
    rng.shuffle(keys)
    target, taken, chosen = fraction * len(ids), 0, set()
    if fraction > 0 and len(keys) > 1:
        for key in keys:
            if abs(taken + size[key] - target) < abs(taken - target) and len(chosen) < len(keys) - 1:
                chosen.add(key)
                taken += size[key]
        if not chosen:  # every group is more than twice the target: the smallest one
            chosen.add(min(keys, key=lambda k: (size[k], k)))
    return [i for i in ids if groups[i] not in chosen], [i for i in ids if groups[i] in chosen]


def parse_int_list(text: str, what: str) -> list[int]:
    """'1-5,7' -> [1, 2, 3, 4, 5, 7]."""
    values: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-")
            values += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise KdcliError(f"{what}: cannot read '{text}' as numbers", hint="write e.g. 1-5 or 1,3,5") from None
    return sorted(set(values))


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def walk_images(folder: Path, leave_out: Path | None = None, left_out: list[Path] | None = None) -> list[Path]:
    """Image files under `folder`, sorted. Links to folders are followed (`Path.rglob` skips them, losing a
    linked folder of images without a word), each real folder visited once so that a link loop ends.

    `leave_out` is the command's own output (its dataset dir): when it lies inside `folder` it is not walked,
    nor are its temporary and replaced siblings (`.<name>.*`, see `kdcli.atomic`), so a rerun with `--force`
    never reads the previous output back as new input; the folders left out are appended to `left_out`."""
    found, seen = [], set()
    out = leave_out.resolve() if leave_out is not None else None
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        if out is not None:
            own = [d for d in dirnames if is_own_output(Path(dirpath) / d, out)]
            dirnames[:] = [d for d in dirnames if d not in own]
            if left_out is not None:
                left_out += [Path(dirpath) / d for d in own]
        found += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def is_own_output(path: Path, out: Path) -> bool:
    """Whether `path` is the (resolved) output dir `out`, or one of the temporary or replaced folders
    `kdcli.atomic.atomic_dir` keeps beside it while building it."""
    p = path.resolve()
    return p == out or (p.parent == out.parent and p.name.startswith(f".{out.name}."))


def say_left_out(left_out: list[Path]) -> list[str]:
    """A note for each folder `walk_images` left out as the command's own output; returns their dataset.yaml record
    (`left_out`)."""
    from kdcli import console

    for folder in left_out:
        console.err.print(f"note: {folder} left out of the inputs: it is this command's output (--out)",
                          highlight=False, soft_wrap=True)
    return [f"{f} (this command's output)" for f in map(str, left_out)]


def refuse_file(path: Path, option: str, hint: str | None = None) -> None:
    """A source folder given as `option` (e.g. --src) that names a file: say so, rather than "not found"."""
    if path.exists() and not path.is_dir():
        raise KdcliError(f"{option} {path}: a file, not a folder",
                         hint=hint or f"give {option} the folder that holds the data (e.g. {path.parent})")


def require_folder(path: Path, option: str, hint: str | None = None) -> None:
    """A source folder given as `option`: a file is named as a file (`refuse_file`), a missing one as missing."""
    refuse_file(path, option)
    if not path.is_dir():
        raise KdcliError(f"{path}: folder not found", hint=hint)


SYNTHETIC_MARKER = "KDCLI_SYNTHETIC"  # file `kdcli prepare synthetic` leaves in a raw folder it wrote
