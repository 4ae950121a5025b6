"""A trained model in its deployment formats side by side: the checkpoint, its ONNX export and its INT8 ONNX
export, each scored on a dataset split by the same code as `kdcli val` and timed at batch 1 on this CPU (PyTorch
for the checkpoint, ONNX Runtime for the files), one row per format; a format that fails is a row with its error
(Ultralytics' benchmark mode). A new format is one entry of `FORMATS`.

An exported file carries its dataset (dir, fold, splits, letterbox, channels) in its metadata, so that
`kdcli val model.onnx split=test` evaluates it as it evaluates the checkpoint.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcli.errors import KdcliError


@dataclass(frozen=True)
class Format:
    suffix: str
    export: dict[str, Any] | None = field(default=None)  # kdcli.deploy.export.export options; None: the checkpoint


FORMATS = {
    "torch": Format(".pt"),
    "onnx": Format(".onnx", {"fmt": "onnx"}),
    "onnx-fp16": Format(".onnx", {"fmt": "onnx", "half": True}),
    "onnx-int8": Format(".int8.onnx", {"fmt": "onnx", "int8": True}),
    "onnx-int8-per-tensor": Format(".int8pt.onnx", {"fmt": "onnx", "int8": True, "per_channel": False}),
}


def parse_formats(text: str) -> list[str]:
    """The formats of `--formats a,b`, each once."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in FORMATS]
    if unknown or not names:
        raise KdcliError(f"--formats {text}: unknown format {unknown[0] if unknown else '(none given)'}",
                         hint=f"choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))  # each once, in the order first given


def evaluate_onnx(path: str | Path, split: str = "test", dataset: str | Path | None = None, fold: int | None = None,
                  batch: int = 16, workers: int = 2, device: str = "auto", overrides: dict[str, Any] | None = None,
                  iou_thresholds: list[float] | None = None, backend: str = "auto", ci_resamples: int = 1000,
                  dets_out: Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`kdcli val` of an ONNX model from `kdcli export`: its dataset, classes, input size and postprocess from its
    metadata (`dataset`/`fold` replace the dataset's), run by ONNX Runtime through kdcli predict's runner."""
    from kdcli.deploy.predict import Predictor
    from kdcli.engine import distributed
    from kdcli.engine.checkpoint import DataInfo
    from kdcli.engine.validator import evaluate_split

    over = overrides or {}
    dev = distributed.resolve_device(device)
    runner = Predictor(path, dev, over.get("conf"), over.get("nms_iou"), over.get("max_det"))
    meta = runner.session.get_modelmeta().custom_metadata_map
    if "kdcli_data" in meta:
        from pydantic import ValidationError

        from kdcli.deploy.predict import bad_metadata

        try:
            data = DataInfo.model_validate_json(meta["kdcli_data"])
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise bad_metadata(path, "kdcli_data", meta["kdcli_data"], "its dataset (dir, fold, splits) as JSON"
                            + (f" ({where}: {first['msg']})" if where else f" ({first['msg']})")) from None
    elif dataset is not None:
        data = DataInfo(path=str(dataset), fold=fold)
    else:
        raise KdcliError(f"{path}: its metadata names no dataset (exported by an older kdcli)",
                         hint="pass it: kdcli val MODEL.onnx data=DIR fold=N, or export the checkpoint again")
    return evaluate_split(runner.detect, runner.cfg, runner.classes, runner.imgsz, data, path, split, dataset, fold,
                          batch, workers, dev, iou_thresholds, backend, ci_resamples, dets_out)


def evaluate_model(path: str | Path, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`kdcli val` of a checkpoint (.pt) or an exported ONNX model (.onnx)."""
    from kdcli.engine.validator import evaluate_checkpoint

    return (evaluate_onnx if str(path).endswith(".onnx") else evaluate_checkpoint)(path, *args, **kwargs)


def latency(path: Path, image: np.ndarray, repeats: int = 50, warmup: int = 5,
            model: torch.nn.Module | None = None) -> dict[str, float]:
    """Median and 90th percentile of one forward pass at batch 1 (no pre- or postprocessing), PyTorch for a
    checkpoint (`model`, when the caller has it built), ONNX Runtime (CPU, as many threads as PyTorch) for an ONNX
    file."""
    if str(path).endswith(".onnx"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        fp16 = sess.get_inputs()[0].type == "tensor(float16)"
        feed = {"images": image[None].astype(np.float16 if fp16 else np.float32)}

        def step() -> None:
            sess.run(None, feed)
    else:
        from kdcli.engine import checkpoint

        net = (model or checkpoint.model_from_checkpoint(checkpoint.load(path), str(path))).eval()
        x = torch.from_numpy(image[None].astype(np.float32))

        def step() -> None:
            with torch.no_grad():
                net(x)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_ms": round(1000 * statistics.median(times), 2),
            "p90_ms": round(1000 * float(np.percentile(times, 90)), 2)}


def benchmark(weights: str | Path, formats: list[str], split: str = "test", dataset: str | Path | None = None,
              batch: int = 8, workers: int = 0, repeats: int = 50) -> dict[str, Any]:
    """One row per format of the checkpoint `weights`: file size, mAP50 / mAP50-95 on `split` (of the checkpoint's
    dataset, or of `dataset`), latency at batch 1 on this CPU, the export's parity figures; a format that fails is
    a row with its error. Exports are written to a temporary folder and removed."""
    from kdcli.data.dataset import DetectionDataset
    from kdcli.deploy.export import default_tolerance, export, parity_inputs
    from kdcli.engine import checkpoint

    ckpt = checkpoint.load(weights)
    d = ckpt.data
    DetectionDataset(dataset or d.path, split, d.fold, ckpt.model.imgsz, d.letterbox, channels=d.channels)  # readable
    image = parity_inputs(ckpt, 1, Path(dataset) if dataset else None)[0][0].numpy()
    model = checkpoint.model_from_checkpoint(ckpt, str(weights))  # built once: parameters and torch latency
    params = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdcli-formats-") as tmp:
        for name in formats:
            spec = FORMATS[name]
            row: dict[str, Any] = {"format": name}
            try:
                if spec.export is None:
                    path = Path(weights)
                else:
                    path = Path(tmp) / f"{Path(weights).stem}{spec.suffix}"
                    # parity is reported, not enforced: the row's mAP says what a difference costs
                    res = export(weights, out=path, dataset=Path(dataset) if dataset else None,
                                 tolerance=math.inf, **spec.export)
                    tol = default_tolerance(**{k: v for k, v in spec.export.items() if k in ("half", "int8")})
                    row["parity"] = {**{k: res[k] for k in ("max_abs_diff", "checked_diff", "agreement") if k in res},
                                     "tolerance": tol, "passed": res["checked_diff"] <= tol}
                metrics, _ = evaluate_model(path, split, dataset, None, batch, workers, "cpu", None, [], "auto", 0)
                row.update({"size_mb": round(path.stat().st_size / 2**20, 2), "mAP50": round(metrics["mAP50"], 4),
                            "mAP50-95": round(metrics["mAP50-95"], 4), "images": metrics["images"],
                            "latency_b1": latency(path, image, repeats,
                                                  model=model if spec.export is None else None)})
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a failing format is a row with its error, as in Ultralytics
                text = e.message if isinstance(e, KdcliError) else f"{type(e).__name__}: {e}"
                row["error"] = text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__
            rows.append(row)
    base = next((r for r in rows if r["format"] == "torch" and "latency_b1" in r), None)
    for r in rows:
        if base is not None and "latency_b1" in r:
            r["speedup_vs_torch"] = round(base["latency_b1"]["median_ms"] / r["latency_b1"]["median_ms"], 2)
    return {"model": str(weights), "backbone": ckpt.model.config.get("backbone", "resnet18"),
            "params_m": round(params / 1e6, 2), "imgsz": ckpt.model.imgsz, "split": split,
            "dataset": str(dataset or ckpt.data.path), "rows": rows,
            "load_average": [round(x, 2) for x in os.getloadavg()]}  # other work on the CPU skews latencies
