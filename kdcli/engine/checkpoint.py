"""Self-contained checkpoints: model recipe, class names, image size, dataset dir/fold/split, weights, metrics,
training recipe and versions, in plain tensors and dicts so `torch.load(weights_only=True)` reads them.

`best.pt` holds the deployable model alone; `last.pt` adds `train_state` (raw weights, optimizer, scaler,
RNG states, epoch, history) for exact resume. Files are written atomically (temp file + rename). Every reader goes
through `load`, which returns a typed `Checkpoint` and names the field when a file lacks one.
"""

from __future__ import annotations

import datetime as _dt
import pickle
import platform
import threading
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from kdcli import __version__
from kdcli.atomic import atomic_path
from kdcli.config.schema import ModelConfig
from kdcli.errors import KdcliError

FORMAT_VERSION = 1


def save(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format_version": FORMAT_VERSION, "kdcli_version": __version__, "torch_version": str(torch.__version__),
               "python_version": platform.python_version(),
               "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def snapshot(obj: Any) -> Any:
    """A copy of nested dicts/lists of tensors with every tensor copied to the CPU: what training changes next
    cannot reach it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints in a thread so that the next epoch does not wait for the disk. `submit` snapshots the
    payloads first (a memory copy, a fraction of the write), waits for the previous write, then starts; `wait`
    joins and re-raises a failed write. Files are written in the order given, each atomically."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, items: list[tuple[Path, dict[str, Any]]]) -> None:
        copies = [(path, snapshot(payload)) for path, payload in items]
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(copies,), name="kdcli-checkpoint")
        self._thread.start()

    def _write(self, items: list[tuple[Path, dict[str, Any]]]) -> None:
        try:
            for path, payload in items:
                save(path, payload)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise KdcliError(f"could not write a checkpoint: {type(e).__name__}: {e}") from e


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ModelInfo(_Section):
    """What rebuilds the detector: its recipe section, class names, input size and anchor size."""
    config: dict[str, Any]
    classes: list[str]
    imgsz: int
    anchor_size: float


class DataInfo(_Section):
    """Where the model was trained: the dataset dir (as it was then), fold, splits and input conventions."""
    path: str
    fold: int | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    letterbox: bool = True
    channels: str = "rgb"
    source: str | None = None


class TrainState(_Section):
    """last.pt only: everything an exact resume restores. A trainer subclass's extras (distillation: the
    distiller's state, the teacher's mAP) are extra fields, read with `extra`."""
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    ema_updates: int = 0
    step: int
    epoch: int
    epoch_complete: bool = True
    partial_epoch: dict[str, Any] | None = None  # interrupted mid-epoch: batches done, their loss sums and count
    best_fitness: float
    best_epoch: int
    history: list[dict[str, Any]]
    rng: dict[str, Any]
    reloads: int = 0
    train_seconds: float | None = None

    def extra(self, key: str, default: Any = None) -> Any:
        return (self.model_extra or {}).get(key, default)


class Checkpoint(_Section):
    """A checkpoint as read by `load`: typed sections; `weights` is the deployable (EMA) model's state_dict."""
    path: Path
    format_version: int
    kdcli_version: str | None = None
    task: str = "train"
    model: ModelInfo
    data: DataInfo
    recipe: dict[str, Any]
    weights: dict[str, Any]
    epoch: int = 0
    metrics: dict[str, Any] = {}
    per_class: list[Any] = []
    distill: dict[str, Any] | None = None
    train_state: TrainState | None = None


def _problem(e: ValidationError) -> str:
    """The first thing pydantic found wrong, as `field 'a.b' missing` or `field 'a.b' invalid (why)`."""
    first = e.errors()[0]
    field = ".".join(str(x) for x in first["loc"])
    return f"field '{field}' " + ("missing" if first["type"] == "missing" else f"invalid ({first['msg']})")


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        raise KdcliError(f"{path}: a folder, not a checkpoint file",
                         hint=f"give a file such as {path / 'weights' / 'best.pt'}")
    if not path.is_file():
        raise KdcliError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():  # garbage, not a refused Python object
            raise KdcliError(f"{path}: not a readable kdcli checkpoint (not a torch file, or a damaged one)") from None
        # torch's message advises weights_only=False, which would run code from the file: never pass that on
        raise KdcliError(f"{path}: holds Python objects beyond tensors and plain data, which kdcli's safe "
                         "(weights-only) reader refuses to load",
                         hint="a kdcli checkpoint never needs them; if this file is yours, re-save its "
                              "state_dict") from None
    except Exception:  # noqa: BLE001 - torch.load raises many types for a bad file (EOFError, RuntimeError, ...)
        # torch's own text (a miniz error, advice about corrupt files) is long and cut mid-sentence: say it plainly
        with open(path, "rb") as f:
            head = f.read(4)
        if head and not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor its legacy pickle
            raise KdcliError(f"{path}: not a readable kdcli checkpoint (not a torch file)") from None
        raise KdcliError(f"{path} is truncated or damaged (could not be read as a torch checkpoint; "
                         f"{path.stat().st_size} bytes)",
                         hint="a copy or download cut short, or a disk that filled up: use another copy, the run's "
                              "other checkpoint (best.pt / last.pt), or train again") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "model" not in ckpt:
        raise KdcliError(f"{path}: not a kdcli checkpoint (no format_version/model)")
    if isinstance(ckpt["format_version"], int) and ckpt["format_version"] > FORMAT_VERSION:
        raise KdcliError(f"{path}: checkpoint format {ckpt['format_version']} is newer than this kdcli understands "
                         f"({FORMAT_VERSION})", hint=f"it was written by kdcli {ckpt.get('kdcli_version')}; upgrade "
                                                     "kdcli")
    try:
        return Checkpoint.model_validate({**ckpt, "path": path})
    except ValidationError as e:
        raise KdcliError(f"{path}: not a valid kdcli checkpoint: {_problem(e)}",
                         hint="written by another tool, or damaged; retrain or use another file") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load weights exactly; a mismatch is an error listing what is missing and unexpected."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])}...)")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}...)")
        if shape:
            parts.append(f"shape mismatch {len(shape)} ({', '.join(shape[:3])}...)")
        raise KdcliError(f"{where}: weights do not fit the model: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def model_from_checkpoint(ckpt: Checkpoint, where: str | None = None) -> torch.nn.Module:
    """Rebuild the detector from a checkpoint alone (no ImageNet weights needed) and load its weights."""
    from kdcli.models.detector import build_detector

    m = ckpt.model
    try:
        cfg = ModelConfig(**{**m.config, "pretrained": False, "freeze_bn": None, "frozen_stages": None})
    except ValidationError as e:
        raise KdcliError(f"{where or ckpt.path}: model config {_problem(e)}") from None
    model = build_detector(cfg, len(m.classes), m.imgsz, m.anchor_size)
    load_state_strict(model, ckpt.weights, where or str(ckpt.path))
    return model
