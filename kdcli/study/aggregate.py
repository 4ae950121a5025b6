"""From study dirs to numbers: each study's finished cells as {config: {(fold, seed): metric}}, the paper's
cells (median over seeds of the mean over folds) and the paired gains over a baseline configuration.

Several dirs of one study (e.g. the ledgers of scheduler jobs copied back from other machines) are merged; a
cell recorded twice keeps its latest record. A finished cell whose metric is not a finite number (NaN, inf, null:
a run that diverged) is no measurement: it is left out of every statistic and listed with its study.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from kdcli.config import load
from kdcli.config.schema import StudyConfig
from kdcli.errors import KdcliError
from kdcli.study import image_pairs, stats
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


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number, else None."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _finished(study: dict[str, Any], metric: str) -> list[tuple[tuple[str, int, int], float | None]]:
    """((config, fold, seed), finite value or None) of the finished cells, in key order."""
    out = []
    for (config, fold, seed), r in sorted(study["records"].items()):
        if r.get("status") != "ok":
            continue
        if metric not in r["metrics"]:
            raise KdcliError(f"ledger record {config}/f{fold}/s{seed} has no metric '{metric}'",
                             hint=f"choose one of {', '.join(METRICS)}")
        out.append(((config, fold, seed), finite(r["metrics"][metric])))
    return out


def values_by_config(study: dict[str, Any], metric: str) -> dict[str, dict[tuple[int, int], float]]:
    """{config: {(fold, seed): value}} of the finished cells with a finite value, configs in the study's order."""
    out: dict[str, dict[tuple[int, int], float]] = {c: {} for c in study["cfg"].configs}
    for (config, fold, seed), v in _finished(study, metric):
        if v is not None:
            out.setdefault(config, {})[(fold, seed)] = v
    return {c: v for c, v in out.items() if v}


def not_finite(study: dict[str, Any], metric: str) -> dict[str, list[str]]:
    """{config: ["f1/s0", ...]}: the finished cells whose metric is NaN, infinite or null, configs in the study's
    order."""
    out: dict[str, list[str]] = {c: [] for c in study["cfg"].configs}
    for (config, fold, seed), v in _finished(study, metric):
        if v is None:
            out.setdefault(config, []).append(f"f{fold}/s{seed}")
    return {c: v for c, v in out.items() if v}


def image_intervals(study: dict[str, Any], metric: str) -> dict[str, list[float]]:
    """{config: [low, high]}: the 95 % bootstrap interval over test images that a cell recorded for `metric`,
    for the configurations with a single finished cell (one fold, one seed), where it is the only error bar."""
    out: dict[str, list[float]] = {}
    for (config, _, _), r in study["records"].items():
        ci = r.get("metrics", {}).get(f"{metric}_ci95") if r.get("status") == "ok" else None
        bounds = [finite(x) for x in ci or []]
        if len(bounds) == 2 and None not in bounds:
            out[config] = bounds  # type: ignore[assignment]
    return out


def data_used(study: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{config: {"labels": "25 %", "pool": "rest (324 images)" or "none"}}: what the rows' finished cells trained
    on (values that differ between cells are listed together)."""
    seen: dict[str, dict[str, set[str]]] = {}
    for (config, _, _), r in study["records"].items():
        d = r.get("data") if r.get("status") == "ok" else None
        if not d:
            continue
        entry = seen.setdefault(config, {"labels": set(), "pool": set()})
        used = config == "teacher" or "hard" in StudyConfig.labels_method(config.partition("@")[0])[0].split("+")
        entry["labels"].add(f"{100 * d['label_fraction']:g} % ({d['labeled_images']} images)" if used else
                            "none (soft targets only)")
        entry["pool"].add(f"{d['unlabeled']} ({d['unlabeled_images']} images)" if d.get("unlabeled") else "none")
    return {c: {k: " / ".join(sorted(v)) for k, v in e.items()} for c, e in seen.items()}


def terms_used(study: dict[str, Any]) -> dict[str, list[str]]:
    """{config: its loss terms} from the finished cells' records (`losses`: one key per term, `pdf`, `mse`,
    `crosskd_cls`, ...; older records have none): a combination lists every method's terms."""
    seen: dict[str, list[str]] = {}
    for (config, _, _), r in study["records"].items():
        if r.get("status") == "ok" and isinstance(r.get("losses"), dict):
            names = seen.setdefault(config, [])
            names += [k for k in r["losses"] if k != "total" and k not in names]
    return seen


def not_finished(study: dict[str, Any]) -> list[str]:
    """The grid's cells without any record (not run yet, running, or interrupted), in grid order."""
    g = study["cfg"]
    return [f"{c}/f{f}/s{sd}" for c in g.configs for f in g.folds for sd in g.seeds
            if (c, f, sd) not in study["records"]]


def _pooled(record: dict[str, Any]) -> bool:
    return bool((record.get("data") or {}).get("unlabeled"))


def twins(study: dict[str, Any]) -> dict[str, str]:
    """{`X@variant`: the row it is measured against}: `X`; but a row trained with an unlabelled pool is measured
    against the row with the same labels and methods on the same labelled share without a pool (`hard+pdf@pool`
    -> `hard+pdf` when that trains on the same share, `hard+pdf@scarcepool` -> `hard+pdf@scarce`)."""
    ok: dict[str, list[dict[str, Any]]] = {}
    for (c, _, _), r in study["records"].items():
        if r.get("status") == "ok":
            ok.setdefault(c, []).append(r)
    order = list(dict.fromkeys([*study["cfg"].configs, *sorted(ok)]))
    out = {}
    for c in (x for x in order if "@" in x and x in ok):
        plain = c.partition("@")[0]
        if not all(_pooled(r) for r in ok[c]) or any("data" not in r for r in ok[c]):
            if plain in ok:
                out[c] = plain
            continue
        method = StudyConfig.labels_method(plain)
        share = {r["data"]["label_fraction"] for r in ok[c]}
        same = [x for x in order if x != c and x in ok and StudyConfig.labels_method(x.partition("@")[0]) == method
                and all("data" in r and not _pooled(r) for r in ok[x])
                and {r["data"]["label_fraction"] for r in ok[x]} == share]
        if same:
            out[c] = plain if plain in same else same[0]
    return out


def share_baselines(study: dict[str, Any], baseline: str) -> dict[str, str]:
    """{`X@variant`: the baseline row trained on the same labelled share without a pool} (`hard+pdf@scarce` and
    `hard+pdf@scarcepool` -> `hard@scarce`): the student that had the same labels and no teacher, against which a
    label-scarce row's distillation gain is measured. Rows on the baseline's own share are left out."""
    ok: dict[str, list[dict[str, Any]]] = {}
    for (c, _, _), r in study["records"].items():
        if r.get("status") == "ok":
            ok.setdefault(c, []).append(r)

    def share(c: str) -> set[float] | None:
        return {r["data"]["label_fraction"] for r in ok[c]} if all("data" in r for r in ok[c]) else None

    bases = [x for x in ok if x.partition("@")[0] == baseline and not any(_pooled(r) for r in ok[x])]
    out = {}
    for c in (x for x in ok if "@" in x and x.partition("@")[0] != baseline):
        same = [x for x in bases if share(x) is not None and share(x) == share(c)]
        if same and baseline not in same:
            out[c] = same[0]
    return out


def twin_gains(values: dict[str, dict[tuple[int, int], float]], twin: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{`X@variant`: paired gain over its twin row}: what a variant (an unlabelled pool, ...) adds."""
    return {c: {"twin": t, **stats.compare(values[c], values[t])} for c, t in twin.items()
            if c in values and t in values}


def last_quarter_gain(run_dir: Path) -> float | None:
    """How much the best val mAP50 rose over the last quarter of the validated epochs (points of %); None without
    a val curve. Small (under 1 point for a study row): the schedule ran until the curve flattened, the row was not
    stopped while still learning."""
    path = run_dir / "results.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        vals = [float(r["mAP50"]) for r in csv.DictReader(f) if r.get("mAP50")]
    if len(vals) < 4:
        return None
    cut = len(vals) - len(vals) // 4
    return 100 * (max(vals) - max(vals[:cut]))


def last_quarters(study: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{config: {"f1/s0": points}}: how much each finished cell's best val mAP50 rose over its last quarter of
    epochs, from its results.csv (cells whose run dir is not here are left out)."""
    out: dict[str, dict[str, float]] = {}
    for (config, fold, seed), r in sorted(study["records"].items()):
        gain = last_quarter_gain(Path(r["run_dir"])) if r.get("status") == "ok" and r.get("run_dir") else None
        if gain is not None:
            out.setdefault(config, {})[f"f{fold}/s{seed}"] = round(gain, 3)
    return out


def summarize(dirs: list[Path], metric: str | None = None, baseline: str | None = None) -> dict[str, Any]:
    """Everything a report shows, as plain data (also the --json output). Metric and baseline default to the
    first study's."""
    studies = load_studies(dirs)
    metric = metric or studies[0]["cfg"].metric
    asked, baseline = baseline, baseline or studies[0]["cfg"].baseline
    if metric not in METRICS:
        raise KdcliError(f"unknown metric '{metric}'", hint=f"choose one of {', '.join(METRICS)}")
    rows = []
    for s in studies:
        values = values_by_config(s, metric)
        failed = sorted(f"{c}/f{f}/s{sd}" for (c, f, sd), r in s["records"].items() if r.get("status") != "ok")
        grid = s["cfg"]
        expected = len(grid.configs) * len(grid.folds) * len(grid.seeds)
        in_grid = sum(1 for k, v in values.items() if k in grid.configs
                      for f, sd in v if f in grid.folds and sd in grid.seeds)
        nan = not_finite(s, metric)
        twin = twins(s)
        rows.append({
            "name": s["name"], "dirs": s["dirs"], "dataset": s["cfg"].dataset, "split": s["cfg"].split,
            "folds": sorted({f for v in values.values() for f, _ in v}),
            "seeds": sorted({sd for v in values.values() for _, sd in v}),
            "cells_done": in_grid, "cells_expected": expected, "failed": failed,
            "not_finished": not_finished(s), "grid_configs": list(grid.configs),
            "cells_other": sum(len(v) for v in values.values()) - in_grid,  # of an earlier, other grid
            "not_finite": nan,
            "rows": [c for c in dict.fromkeys([*s["cfg"].configs, *values, *nan]) if c in values or c in nan],
            "configs": list(values),
            "table": {c: {**stats.cell(v), "cells": len(v),
                          **({"ci95": cis[c]} if len(v) == 1 and c in cis else {})}
                      for c, v in values.items() for cis in [image_intervals(s, metric)]},
            "gains": {c: stats.compare(v, values[baseline]) for c, v in values.items()
                      if c != baseline and baseline in values},
            "twin_gains": twin_gains(values, twin),
            "last_quarter": last_quarters(s),
            "image_pairs": image_pairs.gains(s, baseline, metric, twin, share_baselines(s, baseline)),
            "data": data_used(s),
            "terms": terms_used(s),
            "values": {c: [[f, sd, x] for (f, sd), x in sorted(v.items())] for c, v in values.items()},
        })
    if asked and any(r["values"] for r in rows) and not any(asked in r["values"] for r in rows):
        raise KdcliError(f"--baseline {asked}: no finished cell of that configuration in "
                         + ", ".join(r["name"] for r in rows),
                         hint="rows with finished cells: "
                         + ", ".join(dict.fromkeys(c for r in rows for c in r["values"])))
    if not any(r["values"] for r in rows):
        nan = sum(len(v) for r in rows for v in r["not_finite"].values())
        if nan:
            raise KdcliError(f"{metric} is not a finite number (NaN) in every finished cell ({nan}) of "
                             + ", ".join(map(str, dirs)), hint="the runs diverged: see their results.csv")
        raise KdcliError("no finished cells in " + ", ".join(map(str, dirs)),
                         hint="run `kdcli study` first (or check its ledger.jsonl)")
    return {"metric": metric, "baseline": baseline, "studies": rows}
