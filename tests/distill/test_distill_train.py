"""Distillation end to end: the nine student rows from the CLI, a frozen teacher, checkpoints, checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.config.schema import Recipe
from kdcli.engine import checkpoint
from kdcli.engine.distill_trainer import DistillTrainer

runner = CliRunner()
ROWS = [("hard", "none"), ("hard+soft", "none"), ("hard", "mse"), ("hard", "pdf"), ("hard", "defeat"),
        ("soft", "none"), ("soft", "mse"), ("soft", "pdf"), ("soft", "defeat")]


def run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


@pytest.mark.parametrize("labels,method", ROWS, ids=[f"{a}+{b}" for a, b in ROWS])
def test_nine_rows_from_the_cli(labels: str, method: str, tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = run("distill", "--teacher", str(tiny_checkpoint), "--method", method, "--labels", labels,
            "train.epochs=1", "train.max_batches=2", "distill.teacher_min_map=0", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    header = (run_dir / "results.csv").read_text().splitlines()[0].split(",")
    expected = ({"loss_cls", "loss_box"} if "hard" in labels else set()) | (
        {"loss_soft_cls", "loss_soft_box"} if "soft" in labels else set()) | {
        "none": set(), "mse": {"loss_mse"}, "pdf": {"loss_pdf"}, "defeat": {"loss_defeat_fg", "loss_defeat_bg"}}[method]
    assert {h for h in header if h.startswith("loss_") and h != "loss_total"} == expected
    best = checkpoint.load(run_dir / "weights" / "best.pt")
    assert best.distill["labels"] == labels and best.distill["method"] == method
    assert best.distill["teacher_sha256"] and best.data.fold == 1
    assert not any(k.startswith("adapters") for k in best.weights) and best.train_state is None
    assert best.model.config["backbone"] == "resnet18" and best.model.config["neck"] == "fpn"
    last = checkpoint.load(run_dir / "weights" / "last.pt")
    state = last.train_state.extra("distiller")
    assert any(k.startswith("adapters.") for k in state) == (method != "none")
    model = checkpoint.model_from_checkpoint(best)  # a plain detector checkpoint
    assert model.num_classes == 8


NEWER = [("hard", "cwd", {"loss_cwd"}), ("soft", "pkd", {"loss_pkd"}),
         ("hard", "fgd", {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_attention", "loss_fgd_global"})]


@pytest.mark.parametrize("labels,method,columns", NEWER, ids=[f"{a}+{b}" for a, b, _ in NEWER])
def test_newer_methods_from_the_cli(labels: str, method: str, columns: set[str], tiny_checkpoint: Path,
                                    tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = run("distill", "--teacher", str(tiny_checkpoint), "--method", method, "--labels", labels,
            "train.epochs=1", "train.max_batches=2", "distill.teacher_min_map=0", "--json")
    assert r.exit_code == 0, r.output
    run_dir = Path(json.loads(r.output.strip().splitlines()[-1])["run_dir"])
    header = (run_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert columns <= set(header)
    state = checkpoint.load(run_dir / "weights" / "last.pt").train_state.extra("distiller")
    best = checkpoint.load(run_dir / "weights" / "best.pt")
    assert best.distill["method"] == method and not any("context" in k for k in best.weights)
    assert any("student_context" in k for k in state) == (method == "fgd")
    assert not any(k.startswith(("adapters.", "align.")) for k in state)  # same widths: no adapter (references)


def test_teacher_frozen_student_and_adapters_trained(tiny_checkpoint: Path, tmp_path: Path):
    teacher_ckpt = checkpoint.load(tiny_checkpoint)
    from kdcli.engine.distill_trainer import student_defaults

    recipe = Recipe.model_validate({**student_defaults(teacher_ckpt), "distill": {
        "teacher": str(tiny_checkpoint), "labels": "hard+soft", "method": "pdf", "teacher_min_map": 0}})
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"epochs": 1, "max_batches": 2,
                                                                                 "device": "cpu"})})
    t = DistillTrainer(recipe, run_dir=tmp_path / "d")
    t.setup()
    before_t = {k: v.clone() for k, v in t.teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in t.bare_model.state_dict().items()}
    before_a = {k: v.clone() for k, v in t.distiller.state_dict().items()}
    t.train_one_epoch(0)
    assert not t.teacher.training and all(not m.training for m in t.teacher.modules())
    assert all(not p.requires_grad and p.grad is None for p in t.teacher.parameters())
    teacher_params = {id(p) for p in t.teacher.parameters()}
    assert not any(id(p) in teacher_params for g in t.optimizer.param_groups for p in g["params"])
    for k, v in t.teacher.state_dict().items():
        assert torch.equal(v, before_t[k]), k  # bit for bit, BatchNorm buffers included
    assert any(not torch.equal(v, before_s[k]) for k, v in t.bare_model.state_dict().items())
    assert any(not torch.equal(v, before_a[k]) for k, v in t.distiller.state_dict().items())


def test_feature_only_method_runs_truncated_teacher(tiny_checkpoint: Path, tmp_path: Path):
    from kdcli.engine.distill_trainer import student_defaults

    recipe = Recipe.model_validate({**student_defaults(checkpoint.load(tiny_checkpoint)), "distill": {
        "teacher": str(tiny_checkpoint), "method": "defeat", "teacher_min_map": 0}})
    t = DistillTrainer(recipe.model_copy(update={"train": recipe.train.model_copy(update={"device": "cpu"})}),
                       run_dir=tmp_path / "d")
    t.setup()
    assert t.distiller.teacher_head is False
    calls = []
    t.teacher.head.register_forward_hook(lambda *a: calls.append(1))
    batch = t.preprocess(next(iter(t.train_loader(0))), 0)
    terms = t.compute_loss(batch)
    assert calls == [] and {"cls", "box", "defeat_fg", "defeat_bg", "total"} == set(terms)


def test_untrained_teacher_refused_and_mismatches(tiny_checkpoint: Path, tmp_path: Path, monkeypatch, vedai_raw):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = run("distill", "--teacher", str(tiny_checkpoint), "--method", "mse", "train.epochs=1",
            "distill.teacher_min_map=0.99")
    assert r.exit_code == 1 and "the teacher looks untrained" in r.output
    assert not (tmp_path / "runs" / "distill").exists()  # no half-made run dir
    r = run("distill", "--teacher", str(tiny_checkpoint), "fold=2", "distill.teacher_min_map=0")
    assert r.exit_code == 2 and "a student distils on its teacher's dataset and fold" in r.output
    r = run("distill", "--teacher", str(tiny_checkpoint), "data.imgsz=128", "distill.teacher_min_map=0")
    assert r.exit_code == 2 and "image size differs" in r.output
    r = run("distill", "--teacher", str(tiny_checkpoint), "--method", "kd")
    assert r.exit_code == 2 and "unknown distillation method 'kd'" in r.output
    r = run("distill", "--method", "pdf")
    assert r.exit_code == 2 and "no teacher given" in r.output


def test_distill_resume_restores_adapters(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = run("distill", "--teacher", str(tiny_checkpoint), "--method", "mse", "train.epochs=1",
            "train.max_batches=1", "distill.teacher_min_map=0", "--json")
    assert r.exit_code == 0, r.output
    last = Path(json.loads(r.output.strip().splitlines()[-1])["run_dir"]) / "weights" / "last.pt"
    adapters = checkpoint.load(last).train_state.extra("distiller")
    r = run("distill", "--resume", str(last), "train.epochs=2")
    assert r.exit_code == 0, r.output
    state = checkpoint.load(last).train_state
    assert state.epoch == 2 and set(state.extra("distiller")) == set(adapters)
    assert any(not torch.equal(v, adapters[k]) for k, v in state.extra("distiller").items())  # trained on after resume


def test_method_names_checked_when_the_recipe_loads(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = run("distill", "--teacher", str(tiny_checkpoint), "--method", "pfd")
    assert r.exit_code == 2 and "unknown distillation method 'pfd'" in r.output and "did you mean 'pdf'" in r.output
    assert not (tmp_path / "runs").exists()


PLUGIN = """
import torch
from pydantic import Field
from kdcli.config.base import Strict
from kdcli.distill.base import DistillMethod, register


class CosineConfig(Strict):
    weight: float = Field(2.0, ge=0, description="weight")


@register
class Cosine(DistillMethod):
    name, config, adapter = "cosine", CosineConfig, "paper"

    def __init__(self, cfg, channels=256, levels=1, **kwargs):
        super().__init__(cfg, channels, levels, **kwargs)
        self.scale = torch.nn.Parameter(torch.ones(levels))  # a parameter of the method itself

    def loss(self, student, teacher, batch):
        sims = [torch.nn.functional.cosine_similarity(s, t, dim=1).mean()
                for s, t in zip(student.features, teacher.features)]
        return {"cosine": self.cfg.weight * sum(k * (1 - x) for k, x in zip(self.scale, sims))}
"""


def test_a_new_method_is_one_file(tiny_checkpoint: Path, tmp_path: Path):
    """A module dropped into the distill package (here: a folder added to its path) is a method: recipe section,
    CLI name, study configuration, loss column, its own parameter trained and kept out of best.pt."""
    import subprocess
    import sys

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "cosine.py").write_text(PLUGIN)
    script = f"""
import json, sys, kdcli.distill
kdcli.distill.__path__.append({str(plugins)!r})
from typer.testing import CliRunner
from kdcli.cli.app import app
from kdcli.config.schema import DistillConfig, StudyConfig
from kdcli.engine import checkpoint
assert DistillConfig().cosine.weight == 2.0
StudyConfig(teacher="t", student="s", configs=["teacher", "hard+cosine", "soft+cosine"])
r = CliRunner().invoke(app, ["distill", "--teacher", {str(tiny_checkpoint)!r}, "--method", "cosine", "cosine.weight=3",
                             "train.epochs=1", "train.max_batches=2", "distill.teacher_min_map=0", "--json"])
assert r.exit_code == 0, r.output
run = json.loads(r.output.strip().splitlines()[-1])["run_dir"]
print(open(run + "/results.csv").read().splitlines()[0])
last = checkpoint.load(run + "/weights/last.pt").train_state.extra("distiller")
best = checkpoint.load(run + "/weights/best.pt")
print(sorted(k for k in last if not k.startswith("adapters")), best.distill["config"]["cosine"]["weight"],
      any("scale" in k for k in best.weights))
"""
    env = {**__import__("os").environ, "KDCLI_RUNS": str(tmp_path / "runs")}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    header, params = res.stdout.strip().splitlines()[-2:]
    assert "loss_cosine" in header.split(",")
    assert params == "['methods.0.scale'] 3.0 False"


def test_teacher_check_is_cached_per_teacher_and_split(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    import shutil

    teacher = tmp_path / "t" / "best.pt"
    teacher.parent.mkdir()
    shutil.copy(tiny_checkpoint, teacher)
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    args = ("distill", "--teacher", str(teacher), "train.epochs=1", "train.max_batches=1", "distill.teacher_min_map=0")
    r = run(*args)
    assert r.exit_code == 0, r.output
    cache = teacher.parent / "best.checks.json"
    entries = json.loads(cache.read_text())
    assert len(entries) == 1 and "checked before" not in r.output
    r = run(*args)
    assert r.exit_code == 0 and "checked before: best.checks.json" in r.output
    key = next(iter(entries))
    cache.write_text(json.dumps({key: 0.0}))  # the cached result is what decides
    r = run("distill", "--teacher", str(teacher), "train.epochs=1", "distill.teacher_min_map=0.5")
    assert r.exit_code == 1 and "the teacher looks untrained: mAP50 0.0000" in r.output


@pytest.fixture(scope="module")
def teacher_at_2x(tmp_path_factory: pytest.TempPathFactory, vedai25: Path) -> Path:
    """A tiny teacher trained at 192 px with strides 16-128 and anchor 32: twice a 96-px student's (8-64, 16)."""
    from kdcli.engine.trainer import Trainer
    from tests.conftest import tiny_recipe

    run = tmp_path_factory.mktemp("runs") / "teacher192"
    Trainer(tiny_recipe(vedai25, data={"imgsz": 192, "anchor_size": 32}, model={"maxpool": True}), run_dir=run).fit()
    return run / "weights" / "best.pt"


def test_teacher_at_twice_the_students_resolution(teacher_at_2x: Path, tmp_path: Path):
    """The teacher reads the images as loaded, the student a half-size copy with halved boxes; their maps and
    anchors coincide on the ground, so head and feature terms compare like with like."""
    from kdcli.engine.distill_trainer import student_defaults

    defaults = student_defaults(checkpoint.load(teacher_at_2x))
    recipe = Recipe.model_validate({**defaults, "data": {**defaults["data"], "imgsz": 96, "anchor_size": 16},
                                    "model": {**defaults["model"], "maxpool": False},
                                    "train": {**defaults["train"], "device": "cpu"},
                                    "distill": {"teacher": str(teacher_at_2x), "labels": "hard+soft",
                                                "method": "pdf,defeat", "teacher_min_map": 0}})
    t = DistillTrainer(recipe, run_dir=tmp_path / "d")
    t.setup()
    assert t.teacher_scale == 2 and t.train_set.imgsz == 192 and t.val_set.imgsz == 96
    raw = next(iter(t.train_loader(0)))
    batch = t.preprocess(raw, 0)
    assert batch["teacher_images"].shape[-2:] == (192, 192) and batch["images"].shape[-2:] == (96, 96)
    for before, after in zip(raw["boxes"], batch["boxes"]):
        assert torch.allclose(after, before.float() / 2)
    # each pixel of the student's copy is the mean of the 2 x 2 teacher pixels it covers
    t_img = batch["teacher_images"]
    means = (t_img[..., 0::2, 0::2] + t_img[..., 1::2, 0::2] + t_img[..., 0::2, 1::2] + t_img[..., 1::2, 1::2]) / 4
    assert torch.allclose(batch["images"], means, atol=1e-4)
    with torch.no_grad():
        s_out, t_out = t.model(batch["images"]), t.teacher(batch["teacher_images"], head=True)
    assert [f.shape[-2:] for f in s_out.features] == [f.shape[-2:] for f in t_out.features]
    assert torch.allclose(t_out.anchors, 2 * s_out.anchors)  # the same anchors on the ground
    terms = t.compute_loss(batch)
    assert {"cls", "box", "soft_cls", "pdf", "defeat_fg", "defeat_bg", "total"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())


def test_teacher_at_twice_the_resolution_from_the_cli(teacher_at_2x: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    base = ["distill", "--teacher", str(teacher_at_2x), "--labels", "hard+soft", "--method", "crosskd",
            "train.epochs=1", "train.max_batches=2", "distill.teacher_min_map=0", "data.imgsz=96"]
    r = run(*base, "data.anchor_size=16", "model.maxpool=false", "name=s96")
    assert r.exit_code == 0, r.output
    assert "teacher at 2x the student's resolution: it reads 192 px, the student a 96-px copy" in " ".join(
        r.output.split())
    ck = checkpoint.load(tmp_path / "runs" / "distill" / "s96" / "weights" / "best.pt")
    assert ck.model.imgsz == 96 and ck.distill["teacher_imgsz"] == 192
    r = run(*base, "data.anchor_size=16")  # the student keeps the teacher's max-pool: strides 16-128, not 8-64
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "needs 2x its strides" in out and "model.maxpool=false" in out
    r = run(*base, "data.anchor_size=8", "model.maxpool=false")
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "needs 2x its anchor size: teacher 32, student 8" in out
    assert "data.anchor_size=16" in out
    r = run(*base, "data.anchor_size=16", "model.maxpool=false", "train.multiscale=[64,96]")
    assert r.exit_code == 2 and "train.multiscale" in r.output
