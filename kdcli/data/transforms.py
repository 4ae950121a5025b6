"""Albumentations pipelines built from the recipe: photometric jitter, flips, 90-degree rotations, zoom in/out,
and a final letterbox (keep aspect, pad bottom/right) or stretch to the square network size. Boxes are
`pascal_voc` (x0, y0, x1, y1 pixels) throughout; boxes mostly cut away by a zoom are dropped.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # never phone home at import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from kdcli.config.schema import AugmentConfig  # noqa: E402

PAD_VALUE = 114  # grey padding, as letterboxing detectors use


def _resize(imgsz: int, letterbox: bool) -> list[A.BasicTransform]:
    if letterbox:
        return [A.LongestMaxSize(max_size=imgsz, interpolation=cv2.INTER_LINEAR),
                A.PadIfNeeded(min_height=imgsz, min_width=imgsz, position="top_left",
                              border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE)]
    return [A.Resize(imgsz, imgsz, interpolation=cv2.INTER_LINEAR)]


def _bbox_params(min_visibility: float) -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, clip=True,
                        filter_invalid_bboxes=True)


def train_transform(aug: AugmentConfig, imgsz: int, letterbox: bool = True) -> A.Compose:
    steps: list[A.BasicTransform] = []
    if aug.hsv > 0:
        steps.append(A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=30, val_shift_limit=20, p=aug.hsv))
    if aug.brightness_contrast > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=aug.brightness_contrast))
    if aug.fliplr > 0:
        steps.append(A.HorizontalFlip(p=aug.fliplr))
    if aug.flipud > 0:
        steps.append(A.VerticalFlip(p=aug.flipud))
    if aug.rot90 > 0:
        steps.append(A.RandomRotate90(p=aug.rot90))
    steps += _resize(imgsz, letterbox)
    if aug.zoom > 0:
        steps.append(A.Affine(scale=tuple(aug.zoom_range), translate_percent=(-0.1, 0.1), keep_ratio=True,
                              border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE, p=aug.zoom))
    return A.Compose(steps, bbox_params=_bbox_params(aug.min_visibility))


def eval_transform(imgsz: int, letterbox: bool = True) -> A.Compose:
    return A.Compose(_resize(imgsz, letterbox), bbox_params=_bbox_params(0.0))


def input_scale(width: int, height: int, imgsz: int, letterbox: bool) -> tuple[float, float]:
    """(sx, sy) such that network-input pixels = original pixels * scale (the eval transform's geometry)."""
    if letterbox:
        s = imgsz / max(width, height)
        return s, s
    return imgsz / width, imgsz / height
