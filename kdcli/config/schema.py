"""The recipe schema: one validated object per run. Every default here is documented where it is declared.

Unknown keys are rejected (`extra="forbid"`); the loader turns pydantic's errors into one line that names the
file, line and field and suggests the closest valid key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Strict):
    """Training-time augmentation (albumentations). Probabilities are per image; 0 turns a step off."""

    hsv: float = Field(0.5, ge=0, le=1, description="probability of hue/saturation/value jitter")
    brightness_contrast: float = Field(0.5, ge=0, le=1, description="probability of brightness/contrast jitter")
    fliplr: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    flipud: float = Field(0.5, ge=0, le=1, description="probability of a vertical flip (aerial images have no 'up')")
    rot90: float = Field(0.5, ge=0, le=1, description="probability of a random 90-degree rotation")
    zoom: float = Field(0.5, ge=0, le=1, description="probability of a zoom in (crop) or out (expand)")
    zoom_range: tuple[float, float] = Field((0.5, 1.5), description="scale range for zoom: <1 expands, >1 crops")
    min_visibility: float = Field(0.3, ge=0, le=1, description="drop a box when less of it survives a crop")

    @model_validator(mode="after")
    def _check_zoom(self) -> AugmentConfig:
        lo, hi = self.zoom_range
        if not 0 < lo <= hi:
            raise ValueError(f"zoom_range must satisfy 0 < low <= high, got {list(self.zoom_range)}")
        return self


class DataConfig(Strict):
    """A prepared dataset dir and how to read it."""

    path: str = Field(description="dataset dir (absolute, relative to the working dir, or under KDCLI_DATASETS)")
    fold: int | None = Field(None, ge=1, description="cross-validation fold for folded datasets (VEDAI: 1-10)")
    train_split: str = Field("train", description="split used for training")
    val_split: str = Field("val", description="split used for model selection (may be empty)")
    test_split: str = Field("test", description="split used for reported numbers")
    imgsz: int = Field(512, ge=32, description="square network input size in pixels")
    letterbox: bool = Field(True, description="keep aspect ratio and pad (True) or stretch (False) to imgsz")
    anchor_size: float = Field(16.0, gt=0, description="base anchor size in input pixels at the first level")
    channels: Literal["rgb", "ir"] = Field("rgb", description="input image: colour or infrared (VEDAI)")
    cache: Literal["none", "ram"] = Field("none", description="keep decoded images in memory")
    workers: int = Field(2, ge=0, description="dataloader worker processes")


class Recipe(Strict):
    """A full recipe. Sections may be given inline or as a path to another YAML file."""

    name: str | None = Field(None, description="run name (default: from the recipe file name)")
    seed: int = Field(0, description="random seed for data order, augmentation and initialisation")
    data: DataConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
