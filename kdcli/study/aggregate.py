"""From study dirs to numbers: each study's finished cells as {config: {(fold, seed): metric}}, the paper's
cells (median over seeds of the mean over folds) and the paired gains over a baseline configuration.

Several dirs of one study (e.g. the ledgers of scheduler jobs copied back from other machines) are merged; a
cell recorded twice keeps its latest record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.config import load
from kdcli.config.schema import StudyConfig
from kdcli.errors import KdcliError
from kdcli.study import stats
from kdcli.study.grid import STUDY_FILE
from kdcli.study.ledger import study_records

METRICS = ("mAP50", "mAP50-95", "coco_AP50", "val_mAP50")


def load_studies(dirs: list[Path]) -> list[dict[str, Any]]:
    """[{name, dirs, cfg, records}] in the order first seen, dirs of the same study name merged."""
    studies: dict[str, dict[str, Any]] = {}
    for d in dirs:
        if not (Path(d) / STUDY_FILE).is_file():
            raise KdcliError(f"{d}: not a study directory (no {STUDY_FILE})", hint="give the dir `kdcli study` wrote")
        cfg = load.load(StudyConfig, Path(d) / STUDY_FILE)
        s = studies.setdefault(cfg.name or Path(d).name, {"name": cfg.name or Path(d).name, "dirs": [], "cfg": cfg,
                                                          "records": {}})
        s["dirs"].append(str(d))
        for k, r in study_records(Path(d)).items():
            old = s["records"].get(k)
            if old is None or str(r.get("finished", "")) >= str(old.get("finished", "")):
                s["records"][k] = r
    return list(studies.values())


def values_by_config(study: dict[str, Any], metric: str) -> dict[str, dict[tuple[int, int], float]]:
    """{config: {(fold, seed): value}} of the finished cells, configs in the study's order."""
    order = list(study["cfg"].configs)
    out: dict[str, dict[tuple[int, int], float]] = {c: {} for c in order}
    for (config, fold, seed), r in sorted(study["records"].items()):
        if r.get("status") != "ok":
            continue
        if metric not in r["metrics"]:
            raise KdcliError(f"ledger record {config}/f{fold}/s{seed} has no metric '{metric}'",
                             hint=f"choose one of {', '.join(METRICS)}")
        out.setdefault(config, {})[(fold, seed)] = float(r["metrics"][metric])
    return {c: v for c, v in out.items() if v}


def image_intervals(study: dict[str, Any], metric: str) -> dict[str, list[float]]:
    """{config: [low, high]}: the 95 % bootstrap interval over test images that a cell recorded for `metric`,
    for the configurations with a single finished cell (one fold, one seed), where it is the only error bar."""
    out: dict[str, list[float]] = {}
    for (config, _, _), r in study["records"].items():
        if r.get("status") == "ok" and f"{metric}_ci95" in r.get("metrics", {}):
            out[config] = [float(x) for x in r["metrics"][f"{metric}_ci95"]]
    return out


def summarize(dirs: list[Path], metric: str | None = None, baseline: str = "hard") -> dict[str, Any]:
    """Everything a report shows, as plain data (also the --json output)."""
    studies = load_studies(dirs)
    metric = metric or studies[0]["cfg"].metric
    if metric not in METRICS:
        raise KdcliError(f"unknown metric '{metric}'", hint=f"choose one of {', '.join(METRICS)}")
    rows = []
    for s in studies:
        values = values_by_config(s, metric)
        failed = sorted(f"{c}/f{f}/s{sd}" for (c, f, sd), r in s["records"].items() if r.get("status") != "ok")
        expected = len(s["cfg"].configs) * len(s["cfg"].folds) * len(s["cfg"].seeds)
        rows.append({
            "name": s["name"], "dirs": s["dirs"], "dataset": s["cfg"].dataset, "split": s["cfg"].split,
            "folds": sorted({f for v in values.values() for f, _ in v}),
            "seeds": sorted({sd for v in values.values() for _, sd in v}),
            "cells_done": sum(len(v) for v in values.values()), "cells_expected": expected, "failed": failed,
            "configs": list(values),
            "table": {c: {**stats.cell(v), "cells": len(v),
                          **({"ci95": cis[c]} if len(v) == 1 and c in cis else {})}
                      for c, v in values.items() for cis in [image_intervals(s, metric)]},
            "gains": {c: stats.compare(v, values[baseline]) for c, v in values.items()
                      if c != baseline and baseline in values},
            "values": {c: [[f, sd, x] for (f, sd), x in sorted(v.items())] for c, v in values.items()},
        })
    if not any(r["values"] for r in rows):
        raise KdcliError("no finished cells in " + ", ".join(map(str, dirs)),
                         hint="run `kdcli study` first (or check its ledger.jsonl)")
    return {"metric": metric, "baseline": baseline, "studies": rows}
