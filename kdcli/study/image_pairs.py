"""Per-pair comparisons over test images: for each fold and seed, a row's mAP50 (or mAP50-95) gain over the
baseline (and a variant row's gain over its twin, and a label-scarce row's over the baseline on the same labelled share:
`hard+pdf@scarce` over `hard@scarce`, the student with the same labels and no teacher) on the same test images,
with the paired bootstrap interval over those images, from the detections each cell saved (`dets_<split>.npz`).
A study with few folds and seeds cannot give a fold-and-seed interval worth reading; this one says, pair by pair,
whether a gain is larger than what another draw of test images could move it, and how much of the teacher's lead
over the baseline it closes. mAP50-95 is scored here VOC-style (all-point AP at each IoU 0.50:0.05:0.95, then the
mean), so its gains can differ by a few tenths from the COCO-style (101-point) mAP50-95 of the tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.engine import detfile
from kdcli.engine.metrics import PAIRED_THRESHOLDS as THRESHOLDS
from kdcli.engine.metrics import paired_interval, resampled_scores
from kdcli.errors import KdcliError

Key = tuple[str, int, int]


def gains(study: dict[str, Any], baseline: str, metric: str, twins: dict[str, str],
          share_baselines: dict[str, str] | None = None, resamples: int = 1000) -> dict[str, Any]:
    """{"rows": [{config, over, fold, seed, gain, ci95, gap_closed}], "missing": [cell ids without detections]}:
    each row over the baseline, a variant row over its twin (aggregate.twins) and over the baseline row on its
    labelled share (aggregate.share_baselines). Only
    for mAP50 and mAP50-95 (THRESHOLDS), which the saved detections score; `gap_closed` = gain / (teacher -
    reference) on the pair, both scored alike, for a row that learns from the teacher, over its own reference
    (the baseline on its labelled share, else the baseline), where the teacher leads."""
    if metric not in THRESHOLDS:
        return {"rows": [], "missing": [], "metric": metric}
    iou_ts = THRESHOLDS[metric]
    records = {k: r for k, r in study["records"].items() if r.get("status") == "ok"}
    cache: dict[Key, Any] = {}
    missing: list[str] = []

    def loaded(key: Key) -> Any:
        if key not in cache:
            r = records[key]  # older records name no file: the run dir's default place
            path = Path(r.get("dets") or detfile.path_for(Path(r.get("run_dir", ".")), r.get("split", "test")))
            cell = f"{key[0]}/f{key[1]}/s{key[2]}"
            try:
                cache[key] = detfile.load(path) if path.is_file() else None
            except KdcliError as e:  # a damaged file costs its pairs, not the report
                cache[key] = None
                cell += f" ({e.message})"
            if cache[key] is None:
                missing.append(cell)
        return cache[key]

    scores: dict[Key, tuple[float, Any]] = {}

    def scored(key: Key) -> tuple[float, Any]:  # each cell scored once, on the resamples every cell shares
        if key not in scores:
            dets, gt, ids, k = loaded(key)
            scores[key] = resampled_scores(dets, gt, ids, k, iou_ts, resamples)
        return scores[key]

    rows = []
    configs = list(dict.fromkeys(c for c, _, _ in sorted(records)))
    for config in configs:
        own = (share_baselines or {}).get(config)
        learns = config != "teacher" and config.split("@")[0] != baseline.split("@")[0]  # from the teacher
        over = list(dict.fromkeys([baseline, *([t] if (t := twins.get(config)) else []), *([own] if own else [])]))
        for ref in over:
            if ref == config:
                continue
            for (c, fold, seed) in sorted(k for k in records if k[0] == config):
                if (ref, fold, seed) not in records:
                    continue
                a, b = loaded((c, fold, seed)), loaded((ref, fold, seed))
                if a is None or b is None or not detfile.same_split(a, b):
                    continue
                gain, lo, hi = paired_interval(scored((c, fold, seed)), scored((ref, fold, seed)))
                teacher = ("teacher", fold, seed)
                t = loaded(teacher) if learns and ref == (own or baseline) and teacher in records else None
                lead = scored(teacher)[0] - scored((ref, fold, seed))[0] \
                    if t is not None and detfile.same_split(t, b) else 0  # the teacher scored only where needed
                rows.append({"config": config, "over": ref, "fold": fold, "seed": seed, "gain": gain,
                             "ci95": [lo, hi], "gap_closed": gain / lead if lead > 0 else None})
    return {"rows": rows, "missing": sorted(set(missing)), "metric": metric}

