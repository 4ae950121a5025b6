"""The trainer: overfitting, exact resume, checkpoints, NaN guard, DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdcli.engine import checkpoint
from kdcli.engine.trainer import Trainer
from kdcli.errors import KdcliError
from tests.conftest import tiny_recipe



@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images(overfit_run: tuple[Path, dict]):
    _, summary = overfit_run
    assert summary["metrics"]["mAP50"] > 0.9, summary["metrics"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.load(path)
    return {**{f"ema.{k}": v for k, v in ckpt.weights.items()},
            **{f"raw.{k}": v for k, v in ckpt.train_state.model.items()}}


def test_resume_is_exact(tmp_path: Path, vedai25: Path):
    recipe = tiny_recipe(vedai25, train={"deterministic": True, "epochs": 2, "max_batches": 2})
    Trainer(recipe, run_dir=tmp_path / "straight").fit()

    class StopAfterFirst(Trainer):
        def train_one_epoch(self, epoch):
            result = super().train_one_epoch(epoch)
            if epoch == 0:
                self.stop_requested = True  # as SIGTERM at the end of epoch 1 would
            return result

    s = StopAfterFirst(recipe, run_dir=tmp_path / "split").fit()
    assert s["epochs"] == 1 and s["interrupted"]
    last = tmp_path / "split" / "weights" / "last.pt"
    Trainer(recipe, run_dir=tmp_path / "split", resume=last).fit()
    a, b = _weights(tmp_path / "straight" / "weights" / "last.pt"), _weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = list(csv.DictReader((tmp_path / "split" / "results.csv").read_text().splitlines()))
    straight = list(csv.DictReader((tmp_path / "straight" / "results.csv").read_text().splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows == straight or all(rows[i]["loss_total"] == r["loss_total"] for i, r in enumerate(straight))


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_resume_after_a_mid_epoch_signal_is_exact(tmp_path: Path, vedai25: Path, signum: str):
    """A signal inside epoch 2 (after its second batch): last.pt holds the batches done; the resumed run goes on
    with the third batch of the same order and ends bit-identical to a straight run, losses included."""
    import signal

    recipe = tiny_recipe(vedai25, train={"deterministic": True, "epochs": 2, "max_batches": 4, "batch": 2})
    Trainer(recipe, run_dir=tmp_path / "straight").fit()

    class SignalInEpoch2(Trainer):
        def train_one_epoch(self, epoch):
            seen = []
            if epoch == 1:
                def kill(trainer):
                    seen.append(1)
                    if len(seen) == 2:
                        os.kill(os.getpid(), getattr(signal, signum))
                self.callbacks.add("on_batch_end", kill)
            return super().train_one_epoch(epoch)

    s = SignalInEpoch2(recipe, run_dir=tmp_path / "split").fit()
    last = tmp_path / "split" / "weights" / "last.pt"
    state = checkpoint.load(last).train_state
    assert s["interrupted"] and state.epoch == 1 and not state.epoch_complete
    assert state.partial_epoch["batch"] == 2 and state.partial_epoch["count"] == 2 and state.step == 6
    Trainer(recipe, run_dir=tmp_path / "split", resume=last).fit()
    a, b = _weights(tmp_path / "straight" / "weights" / "last.pt"), _weights(last)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert checkpoint.load(last).train_state.step == 8
    rows = list(csv.DictReader((tmp_path / "split" / "results.csv").read_text().splitlines()))
    straight = list(csv.DictReader((tmp_path / "straight" / "results.csv").read_text().splitlines()))
    assert [r["loss_total"] for r in rows] == [r["loss_total"] for r in straight]


def test_an_interrupt_waits_for_the_accumulated_step(tmp_path: Path, vedai25: Path):
    """With gradients accumulated over 2 batches, a stop asked after the first batch of a pair takes effect after
    the pair's optimizer step, so no half-accumulated gradient is lost."""
    recipe = tiny_recipe(vedai25, train={"epochs": 1, "max_batches": 4, "batch": 2, "nominal_batch": 4})

    class StopAfterFirstBatch(Trainer):
        def train_one_epoch(self, epoch):
            self.callbacks.add("on_batch_end", lambda t: setattr(t, "stop_requested", True))
            return super().train_one_epoch(epoch)

    StopAfterFirstBatch(recipe, run_dir=tmp_path / "r").fit()
    state = checkpoint.load(tmp_path / "r" / "weights" / "last.pt").train_state
    assert state.partial_epoch["batch"] == 2 and state.step == 1


def test_training_time_adds_up_over_resumed_attempts(tmp_path: Path, vedai25: Path):
    recipe = tiny_recipe(vedai25, train={"epochs": 2, "max_batches": 1})

    class SlowFirstAttempt(Trainer):
        def train_one_epoch(self, epoch):
            time.sleep(1.0)  # the first attempt's epoch takes a second longer than any later work
            self.stop_requested = True
            return super().train_one_epoch(epoch)

    first = SlowFirstAttempt(recipe, run_dir=tmp_path / "r").fit()
    last = tmp_path / "r" / "weights" / "last.pt"
    saved = checkpoint.load(last).train_state.train_seconds
    assert first["interrupted"] and saved >= 1.0
    t0 = time.perf_counter()
    second = Trainer(recipe, run_dir=tmp_path / "r", resume=last).fit()
    own = time.perf_counter() - t0
    assert second["epochs"] == 2 and saved + own + 0.1 >= second["train_seconds"] >= saved + 0.5 * own - 0.1
    assert checkpoint.load(last).train_state.train_seconds >= saved


def test_checkpoint_is_self_contained(tiny_checkpoint: Path, tmp_path: Path):
    run = tiny_checkpoint.parent.parent
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION and "train_state" not in ckpt
    assert ckpt["model"]["classes"][0] == "car" and ckpt["model"]["imgsz"] == 96
    assert ckpt["data"]["fold"] == 1 and Path(ckpt["data"]["path"]).is_dir()
    assert {"kdcli_version", "torch_version", "recipe", "metrics"} <= set(ckpt)
    model = checkpoint.model_from_checkpoint(checkpoint.Checkpoint.model_validate({**ckpt, "path": "t.pt"})).eval()
    x = torch.randint(0, 255, (1, 3, 96, 96), dtype=torch.uint8)
    ref = checkpoint.model_from_checkpoint(checkpoint.load(tiny_checkpoint)).eval()
    assert torch.equal(model(x).cls_logits, ref(x).cls_logits)
    assert (run / "results.csv").is_file() and (run / "args.yaml").is_file() and (run / "results.png").is_file()
    assert yaml.safe_load((run / "args.yaml").read_text())["model"]["channels"] == 16
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss_cls", "loss_box", "loss_total", "lr", "mAP50", "mAP50-95", "time_s"} <= set(header)
    newer = dict(ckpt, format_version=checkpoint.FORMAT_VERSION + 1)
    torch.save(newer, tmp_path / "new.pt")
    with pytest.raises(KdcliError, match="newer than this kdcli understands"):
        checkpoint.load(tmp_path / "new.pt")
    broken = dict(ckpt, weights={k: v for k, v in ckpt["weights"].items() if "head" not in k})
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(KdcliError, match=r"broken.pt: weights do not fit the model: missing \d+"):
        checkpoint.model_from_checkpoint(checkpoint.load(tmp_path / "broken.pt"))
    torch.save(dict(ckpt, model={k: v for k, v in ckpt["model"].items() if k != "imgsz"}), tmp_path / "noimgsz.pt")
    with pytest.raises(KdcliError, match=r"noimgsz.pt: not a valid kdcli checkpoint: field 'model.imgsz' missing"):
        checkpoint.load(tmp_path / "noimgsz.pt")
    torch.save(dict(ckpt, data=dict(ckpt["data"], fold="one")), tmp_path / "badfold.pt")
    with pytest.raises(KdcliError, match=r"field 'data.fold' invalid"):
        checkpoint.load(tmp_path / "badfold.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(KdcliError, match="not a readable kdcli checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")


def test_nan_guard_skips_then_reloads_then_gives_up(tmp_path: Path, vedai25: Path, capsys):
    class Poisoned(Trainer):
        calls = 0

        def compute_loss(self, batch):
            terms = super().compute_loss(batch)
            Poisoned.calls += 1
            if Poisoned.calls in (2, 3):
                terms = {**terms, "total": terms["total"] * float("nan")}
            return terms

    recipe = tiny_recipe(vedai25, train={"epochs": 2, "max_batches": 3, "nan_skip_limit": 2})
    t = Poisoned(recipe, run_dir=tmp_path / "nan")
    t.fit()
    assert t.reloads == 1
    err = capsys.readouterr().err
    assert "non-finite total" in err and "reloading the last good state" in err
    assert all(torch.isfinite(v).all() for v in t.bare_model.state_dict().values() if v.is_floating_point())

    class AlwaysNan(Trainer):
        def compute_loss(self, batch):
            terms = super().compute_loss(batch)
            return {**terms, "total": terms["total"] * float("nan")}

    with pytest.raises(KdcliError, match="training diverged"):
        AlwaysNan(tiny_recipe(vedai25, train={"epochs": 3, "max_batches": 3, "nan_skip_limit": 1}),
                  run_dir=tmp_path / "nan2").fit()


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, vedai25: Path):
    recipe = tmp_path / "r.yaml"
    r = tiny_recipe(vedai25, train={"epochs": 1, "max_batches": 2})
    recipe.write_text(yaml.safe_dump(r.model_dump(mode="json")))
    env = {**os.environ, "KDCLI_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "kdcli", "train", str(recipe), "name=ddp"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "train" / "ddp"
    assert (run / "weights" / "best.pt").is_file() and not (tmp_path / "runs" / "train" / "ddp2").exists()
    assert len((run / "results.csv").read_text().splitlines()) == 2


def test_multiscale_and_accumulation(tmp_path: Path, vedai25: Path):
    seen = []

    class Watch(Trainer):
        def compute_loss(self, batch):
            seen.append(batch["images"].shape[-1])
            return super().compute_loss(batch)

    recipe = tiny_recipe(vedai25, train={"epochs": 2, "max_batches": 4, "nominal_batch": 8, "multiscale": [64, 128],
                                         "multiscale_until": 0.5})
    t = Watch(recipe, run_dir=tmp_path / "ms")
    t.fit()
    assert t.accumulate == 2 and t.step == 4  # 8 batches of 4 images, one optimizer step per 8 images
    assert set(seen[:4]) <= {64, 128} and len(set(seen[:4])) == 2  # epoch 1: drawn sizes
    assert set(seen[4:]) == {96}  # after multiscale_until: the recipe size


def test_early_stopping(tmp_path: Path, vedai25: Path):
    class Flat(Trainer):
        def validate(self):
            return {"mAP50": 0.5, "mAP50-95": 0.1}

    t = Flat(tiny_recipe(vedai25, train={"epochs": 10, "max_batches": 1, "patience": 2}), run_dir=tmp_path / "es")
    summary = t.fit()
    assert summary["epochs"] == 3 and summary["best_epoch"] == 1


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_last_and_resumes(tmp_path: Path, vedai25: Path):
    import signal
    import time

    recipe = tmp_path / "r.yaml"
    r = tiny_recipe(vedai25, train={"epochs": 3, "max_batches": 40, "batch": 2})
    recipe.write_text(yaml.safe_dump(r.model_dump(mode="json")))
    env = {**os.environ, "KDCLI_RUNS": str(tmp_path / "runs")}
    proc = subprocess.Popen([sys.executable, "-m", "kdcli", "train", str(recipe), "name=term"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs" / "train" / "term" / "weights" / "last.pt"
    seen = []
    for line in proc.stderr:  # the epoch-1 line is printed once last.pt is saved, just before epoch 2 starts
        seen.append(line)
        if line.startswith("epoch 1/3"):
            break
    time.sleep(1.5)  # inside epoch 2 (40 batches of several seconds; validation and the save come first)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=240)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err[-2000:]  # interrupted: `kdcli train ... && kdcli val ...` stops here
    assert "SIGTERM: stopping after this batch" in err
    state = checkpoint.load(last).train_state
    assert state.epoch == 1 and state.epoch_complete is False
    done = subprocess.run([sys.executable, "-m", "kdcli", "train", "--resume", str(last)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpoint.load(last).train_state.epoch == 3


def test_ema_window_and_lag_warning(tmp_path: Path, vedai25: Path, capsys):
    from kdcli.engine.ema import ModelEMA

    ema = ModelEMA(torch.nn.Linear(2, 2), decay=0.99, tau=100)
    assert ema.window(10_000) == pytest.approx(100, rel=1e-3)
    assert ema.window(100) == pytest.approx(1 / (1 - 0.99 * (1 - np.exp(-1))), rel=1e-6)
    lagging = tiny_recipe(vedai25, train={"epochs": 1, "max_batches": 8, "ema_decay": 0.9998, "ema_tau": 1})
    Trainer(lagging, run_dir=tmp_path / "a").fit()
    assert "the saved model would lag behind training" in capsys.readouterr().err
    Trainer(tiny_recipe(vedai25, train={"epochs": 1, "max_batches": 1, "ema_tau": 2000}), run_dir=tmp_path / "b").fit()
    assert "lag behind" not in capsys.readouterr().err


def test_a_restarted_run_removes_what_a_killed_checkpoint_write_left(tmp_path: Path, capsys):
    """kill -9 during last.pt's write leaves `.last.pt.<pid>.<random>.tmp` (as large as a checkpoint); the run's
    next start or resume removes it and says how many bytes, even when it then fails."""
    weights = tmp_path / "run" / "weights"
    weights.mkdir(parents=True)
    (weights / ".last.pt.4194305.k7m2p9q1.tmp").write_bytes(b"\0" * 23_000)  # above any pid_max: a dead writer
    (weights / "last.pt").write_bytes(b"kept")
    with pytest.raises(KdcliError):
        Trainer(tiny_recipe(tmp_path / "no-dataset"), run_dir=tmp_path / "run").fit()
    assert sorted(p.name for p in weights.iterdir()) == ["last.pt"]
    flat = " ".join(capsys.readouterr().err.split())
    assert f"removed 1 temporary file(s) of 23,000 bytes (0.0 MiB) from {weights}" in flat
