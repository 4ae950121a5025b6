"""`kdcli report`: the paper's table (rows = configurations, columns = studies; each cell the median over seeds
of the mean over folds, min-max over seeds beside it) as Markdown, CSV and LaTeX; the gains over the baseline
(paired by fold and seed) as Markdown and CSV; one box plot per study (PNG + SVG); everything as report.json.
Cells whose metric is NaN are left out of the numbers and named in the notes; a configuration with nothing else
reads "n/a" (a configuration a study did not run reads "-").
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from kdcli import atomic
from kdcli.console import out
from kdcli.study.plots import boxplot


MISSING_DETS = ("cells finished before kdcli saved them; `kdcli val RUN/weights/best.pt split=SPLIT` writes "
                "dets_SPLIT.npz into its val run dir: copy it into RUN/")


def _rows(rep: dict[str, Any]) -> list[str]:
    """Every configuration of any study with a finished cell (its numbers, or only NaN), in first-seen order."""
    rows: list[str] = []
    for s in rep["studies"]:
        rows += [c for c in s["rows"] if c not in rows]
    return rows


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _cell_text(c: dict[str, Any]) -> str:
    spread = f" ({_pct(c['min'])}–{_pct(c['max'])})" if c["seeds"] > 1 else ""
    ci = f" [{_pct(c['ci95'][0])}–{_pct(c['ci95'][1])}]" if "ci95" in c else ""
    return _pct(c["median"]) + spread + ci


def _text(s: dict[str, Any], config: str) -> str:
    if config in s["table"]:
        return _cell_text(s["table"][config])
    return "n/a" if config in s["not_finite"] else "-"


def _nan_note(s: dict[str, Any], metric: str) -> str:
    cells = [f"{c}/{x}" for c, xs in s["not_finite"].items() for x in xs]
    return f"{metric} not a finite number in {len(cells)} cell(s), left out: {', '.join(cells)}" if cells else ""


def _ids(cells: list[str], most: int = 6) -> str:
    return ", ".join(cells[:most]) + (f" and {len(cells) - most} more" if len(cells) > most else "")


FLAT = 1.0  # points: a row whose best val metric rose less over its last quarter of epochs has flattened


def flatness(rep: dict[str, Any]) -> list[str]:
    """One line per study: each row's largest rise of the best val mAP50 over a cell's last quarter of epochs, and
    which rows were still rising (>= FLAT points) when they stopped."""
    lines = []
    for s in rep["studies"]:
        lq = s.get("last_quarter", {})
        if not lq:
            continue
        parts = [f"{c} {max(v.values()):+.1f} ({len(v)} cells)" for c, v in lq.items()]
        rising = [f"{c}/{k}" for c, v in lq.items() for k, x in v.items() if x >= FLAT]
        lines.append(f"{s['name']}: best val mAP50 gained over each cell's last quarter of epochs, largest per row: "
                     + ", ".join(parts) + (f"; still rising (>= {FLAT:g} point): {_ids(rising)}" if rising else
                                           f"; every cell flat (< {FLAT:g} point)"))
    return lines


def gaps(rep: dict[str, Any]) -> list[str]:
    """One line per gap of a half-finished study, said wherever the numbers are shown: failed cells, cells not
    finished (rows then stand on fewer folds or seeds than the grid), a baseline without a finished cell (no gains
    at all), rows without a single pair with the baseline (no gain for them)."""
    lines, base = [], rep["baseline"]
    for s in rep["studies"]:
        name, failed, missing = s["name"], s["failed"], s.get("not_finished", [])
        if failed:
            lines.append(f"{name}: {len(failed)} cell(s) failed, left out of every number: {_ids(failed)} (errors in "
                         "its ledger.jsonl; rerunning `kdcli study` retries them)")
        if missing:
            lines.append(f"{name}: {len(missing)} of {s['cells_expected']} cells not finished: {_ids(missing)} "
                         "(rows with fewer cells than the grid stand on fewer folds or seeds)")
        students = [c for c in s.get("grid_configs", s["rows"]) if c not in ("teacher", base)]
        if base not in s["values"] and students:
            why = "has no finished cell" if base in s.get("grid_configs", []) else "is not a row of the study"
            lines.append(f"{name}: no gains: the baseline {base} {why}")
        else:
            none = [c for c, g in s["gains"].items() if not g.get("pairs")]
            if none:
                lines.append(f"{name}: no gain for {', '.join(none)}: no fold and seed where both it and {base} "
                             "finished")
    return lines


def _p(w: dict[str, Any]) -> str:
    return f"{w['p']:.3g}"


def _ci(g: dict[str, Any]) -> str:
    """A gain's interval in points, or why there is none."""
    return f"[{100 * g['ci95'][0]:+.2f}, {100 * g['ci95'][1]:+.2f}]" if g["ci95"] else "- (1 pair)"


def _data(rep: dict[str, Any], config: str, key: str) -> str:
    """What a row trained on (`labels` or `pool`) over the studies; "-" where no record says."""
    seen = list(dict.fromkeys(s.get("data", {}).get(config, {}).get(key) for s in rep["studies"]))
    return " / ".join(x for x in seen if x) or "-"


def _data_columns(rep: dict[str, Any]) -> bool:
    """Show the labels / pool columns when some row used a label fraction or an unlabelled pool."""
    return any(not d["labels"].startswith("100 %") or d["pool"] != "none"
               for s in rep["studies"] for d in s.get("data", {}).values())


def table_markdown(rep: dict[str, Any]) -> str:
    studies = rep["studies"]
    extra = ["labels", "unlabelled pool"] if _data_columns(rep) else []
    head = [f"{rep['metric']} (%)", *extra] + [s["name"] for s in studies]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (1 + len(extra)) + ["---:"] * len(studies))
             + "|"]
    for c in _rows(rep):
        best = [bool(s["table"]) and max(s["table"].values(), key=lambda x: x["median"]) is s["table"].get(c)
                for s in studies]
        cells = [(f"**{_text(s, c)}**" if b else _text(s, c)) for s, b in zip(studies, best)]
        data = [_data(rep, c, "labels"), _data(rep, c, "pool")] if extra else []
        lines.append("| " + " | ".join([c, *data, *cells]) + " |")
    notes = [f"Each cell: median over seeds of the mean over folds of {rep['metric']} on the "
             f"{'/'.join(sorted({s['split'] for s in studies}))} split, in %; (min–max over seeds). Bold: best "
             "of the column."]
    if extra:
        notes.append("labels: the share of the training images whose labels the row used (data.label_fraction); "
                     "unlabelled pool: the images distillation also saw without labels (distill.unlabeled); "
                     "`teacher` and `hard` rows never see a pool.")
    if any("ci95" in t for s in studies for t in s["table"].values()):
        notes.append("[low–high]: 95 % bootstrap interval over the split's images (1000 resamples), shown for a "
                     "configuration with a single cell (one fold, one seed), where seeds give no spread.")
    for s in studies:
        notes.append(f"{s['name']}: folds {','.join(map(str, s['folds']))}, seeds {','.join(map(str, s['seeds']))}"
                     f", {s['cells_done']}/{s['cells_expected']} cells of the grid" +
                     (f" (and {s['cells_other']} of an earlier grid)" if s.get("cells_other") else "") +
                     (f", failed: {', '.join(s['failed'])}" if s["failed"] else "") +
                     (f"; {_nan_note(s, rep['metric'])}" if s["not_finite"] else ""))
    notes += gaps(rep) + flatness(rep)
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def gains_markdown(rep: dict[str, Any]) -> str:
    out_lines = []
    for s in rep["studies"]:
        out_lines += [f"### {s['name']}: gain over `{rep['baseline']}` ({rep['metric']}, points)", "",
                      "| configuration | pairs | mean gain | 95 % CI (paired bootstrap) | Wilcoxon p | test | "
                      "wins |", "|---|---:|---:|---|---:|---|---:|"]
        for c, g in s["gains"].items():
            if not g.get("pairs"):
                out_lines.append(f"| {c} | 0 | - | - | - | - | - |")
                continue
            w = g["wilcoxon"]
            out_lines.append(f"| {c} | {g['pairs']} | {100 * g['mean_gain']:+.2f} | "
                             f"{_ci(g)} | {_p(w)} | {w['method']} | "
                             f"{100 * g['win_rate']:.0f} % |")
        out_lines.append("")
        if s.get("twin_gains"):
            out_lines += [f"### {s['name']}: what each variant adds to its twin row ({rep['metric']}, points)", "",
                          "| configuration | over | pairs | mean gain | 95 % CI (paired bootstrap) | Wilcoxon p | "
                          "wins |", "|---|---|---:|---:|---|---:|---:|"]
            for c, g in s["twin_gains"].items():
                if g.get("pairs"):
                    out_lines.append(f"| {c} | {g['twin']} | {g['pairs']} | {100 * g['mean_gain']:+.2f} | "
                                     f"{_ci(g)} | "
                                     f"{_p(g['wilcoxon'])} | {100 * g['win_rate']:.0f} % |")
            out_lines.append("")
    out_lines += [f"- {x}" for x in gaps(rep)] + ([""] if gaps(rep) else [])
    out_lines.append("Pairs: cells of the same fold and seed (a student and the hard student share their teacher). "
                     "Wilcoxon signed-rank, two-sided, zero differences dropped: exact without ties for up to 25 "
                     "pairs, else the normal approximation with tie correction. Wins: share of pairs where the "
                     "configuration beats the baseline.")
    return "\n".join(out_lines) + "\n"


def _pair_summary(rows: list[dict[str, Any]]) -> str:
    above = sum(1 for r in rows if r["ci95"][0] > 0)
    return f"{above} of {len(rows)} pairs above zero"


def _pair_groups(s: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in s.get("image_pairs", {}).get("rows", []):
        groups.setdefault((r["config"], r["over"]), []).append(r)
    return groups


def _gap(r: dict[str, Any]) -> str:
    return f"{100 * r['gap_closed']:.0f} %" if r.get("gap_closed") is not None else "-"


def pairs_markdown(rep: dict[str, Any]) -> str:
    """Per fold and seed: each row's gain (mAP50 or mAP50-95) with its paired interval over test images
    (image_pairs.py)."""
    lines = []
    for s in rep["studies"]:
        pairs = s.get("image_pairs", {})
        if not pairs.get("rows") and not pairs.get("missing"):
            continue
        lines += [f"### {s['name']}: gain per fold and seed over the same {s['split']} images "
                  f"({pairs.get('metric', 'mAP50')}, points)", "",
                  "| configuration | over | fold | seed | gain | 95 % interval over images | gap closed |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for (c, over), rows in _pair_groups(s).items():
            for r in rows:
                lines.append(f"| {c} | {over} | {r['fold']} | {r['seed']} | {100 * r['gain']:+.2f} | "
                             f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}] | {_gap(r)} |")
        lines.append("")
        lines += [f"- {c} over {over}: {_pair_summary(rows)}" for (c, over), rows in _pair_groups(s).items()]
        if pairs.get("missing"):
            lines.append(f"- cells without saved detections, left out: {_ids(pairs['missing'])} ({MISSING_DETS})")
        lines.append("")
    if lines:
        lines.append("Both models of a pair are scored on each of 1000 resamples (with replacement) of the same "
                     "test images; the interval is the 2.5-97.5 percentile of the difference. Gap closed: the gain "
                     "over the baseline (or over the baseline on the row's labelled share, e.g. hard@scarce) as a "
                     "share of the teacher's lead over it on that pair.")
    return "\n".join(lines) + "\n" if lines else ""


def pairs_csv(rep: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["study", "config", "over", "fold", "seed", "gain", "ci_low", "ci_high", "gap_closed"])
    for s in rep["studies"]:
        for r in s.get("image_pairs", {}).get("rows", []):
            w.writerow([s["name"], r["config"], r["over"], r["fold"], r["seed"], round(r["gain"], 6),
                        *_bounds(r["ci95"]), "" if r["gap_closed"] is None else round(r["gap_closed"], 6)])
    return buf.getvalue()


def table_latex(rep: dict[str, Any]) -> str:
    studies = rep["studies"]
    lines = [r"\begin{tabular}{l" + "r" * len(studies) + "}", r"\toprule",
             " & ".join([f"{rep['metric']} (\\%)"] + [s["name"].replace("_", r"\_") for s in studies]) + r" \\",
             r"\midrule"]
    for c in _rows(rep):
        cells = []
        for s in studies:
            x = s["table"].get(c)
            text = _text(s, c).replace("–", "--")
            best = x is not None and x is max(s["table"].values(), key=lambda y: y["median"])
            cells.append(rf"\textbf{{{text}}}" if best else text)
        lines.append(" & ".join([c.replace("_", r"\_"), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {x}" for x in gaps(rep)]  # what the table lacks, beside it
    return "\n".join(lines) + "\n"


def _bounds(ci: list[float] | None) -> list[Any]:
    """An interval for the CSV: two numbers, or two empty fields where there is none."""
    return [round(x, 6) for x in ci] if ci else ["", ""]


def table_csv(rep: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["study", "config", "metric", "median", "min", "max", "q1", "q3", "seeds", "cells", "images_ci_low",
                "images_ci_high", "gain_mean", "gain_ci_low", "gain_ci_high", "wilcoxon_p", "wilcoxon_method",
                "win_rate", "cells_not_finite", "labels", "unlabeled_pool", "twin", "twin_gain_mean",
                "twin_gain_ci_low", "twin_gain_ci_high"])
    for s in rep["studies"]:
        for c in s["rows"]:
            nan = len(s["not_finite"].get(c, []))
            data = s.get("data", {}).get(c, {})
            tw = s.get("twin_gains", {}).get(c, {})
            twin = [tw["twin"], round(tw["mean_gain"], 6), *_bounds(tw["ci95"])] if tw.get("pairs") else [""] * 4
            tail = [nan, data.get("labels", ""), data.get("pool", ""), *twin]
            if c not in s["table"]:  # only NaN cells: no numbers
                w.writerow([s["name"], c, rep["metric"], *[""] * 6, 0, *[""] * 8, *tail])
                continue
            t, g = s["table"][c], s["gains"].get(c, {})
            gain = [round(g["mean_gain"], 6), *_bounds(g["ci95"]), round(g["wilcoxon"]["p"], 6),
                    g["wilcoxon"]["method"], round(g["win_rate"], 6)] if g.get("pairs") else [""] * 6
            w.writerow([s["name"], c, rep["metric"], *(round(t[k], 6) for k in ("median", "min", "max", "q1", "q3")),
                        t["seeds"], t["cells"], *_bounds(t.get("ci95")),
                        *gain, *tail])
    return buf.getvalue()


def write_report(rep: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"table.md": table_markdown(rep), "table.csv": table_csv(rep), "table.tex": table_latex(rep),
             "gains.md": gains_markdown(rep)}
    if any(x.get("image_pairs", {}).get("rows") for x in rep["studies"]):
        files.update({"pairs.md": pairs_markdown(rep), "pairs.csv": pairs_csv(rep)})
    written = []
    for name, text in files.items():
        atomic.write_text(out_dir / name, text)
        written.append(out_dir / name)
    atomic.write_json(out_dir / "report.json", rep, indent=2)
    written.append(out_dir / "report.json")
    for s in rep["studies"]:
        if s["values"]:
            base = "boxplot" if len(rep["studies"]) == 1 else f"boxplot_{s['name']}"
            written += boxplot(s, rep["metric"], out_dir / base)
    return written


def print_report(rep: dict[str, Any]) -> None:
    studies = rep["studies"]
    ci = any("ci95" in x for s in studies for x in s["table"].values())
    t = Table(title=f"{rep['metric']} (%): median over seeds of the mean over folds (min–max over seeds)"
                    + (" [95 % interval over test images]" if ci else ""), title_justify="left")
    t.add_column("configuration")
    extra = _data_columns(rep)
    if extra:
        t.add_column("labels")
        t.add_column("unlabelled pool")
    for s in studies:
        t.add_column(s["name"], justify="right")
    for c in _rows(rep):
        data = [_data(rep, c, "labels"), _data(rep, c, "pool")] if extra else []
        t.add_row(c, *data, *(_text(s, c) for s in studies))
    out.print(t)
    for s in studies:
        if s["not_finite"]:
            out.print(f"[yellow]{s['name']}:[/] {_nan_note(s, rep['metric'])}", highlight=False, soft_wrap=True)
    for line in gaps(rep):
        name, _, rest = line.partition(": ")
        out.print(f"[yellow]{escape(name)}:[/] {escape(rest)}", highlight=False, soft_wrap=True)
    for line in flatness(rep):
        out.print(escape(line), highlight=False, soft_wrap=True)
    for s in studies:
        if not s["gains"]:
            continue
        g = Table(title=f"{s['name']}: gain over {rep['baseline']} (points), paired by fold and seed",
                  title_justify="left")
        for col in ("configuration", "pairs", "mean gain", "95 % CI", "Wilcoxon p", "wins"):
            g.add_column(col, justify="left" if col == "configuration" else "right")
        for c, x in s["gains"].items():
            if x.get("pairs"):
                g.add_row(c, str(x["pairs"]), f"{100 * x['mean_gain']:+.2f}",
                          _ci(x), _p(x["wilcoxon"]),
                          f"{100 * x['win_rate']:.0f} %")
        out.print(g)
        twins = {c: x for c, x in s.get("twin_gains", {}).items() if x.get("pairs")}
        if twins:
            g = Table(title=f"{s['name']}: what each variant adds to its twin row (points), paired by fold and seed",
                      title_justify="left")
            for col in ("configuration", "over", "pairs", "mean gain", "95 % CI", "Wilcoxon p", "wins"):
                g.add_column(col, justify="left" if col in ("configuration", "over") else "right")
            for c, x in twins.items():
                g.add_row(c, x["twin"], str(x["pairs"]), f"{100 * x['mean_gain']:+.2f}",
                          _ci(x), _p(x["wilcoxon"]),
                          f"{100 * x['win_rate']:.0f} %")
            out.print(g)
        groups = _pair_groups(s)
        if groups:
            g = Table(title=f"{s['name']}: gain per fold and seed over the same {s['split']} images (points; "
                            "paired 95 % interval over images)", title_justify="left")
            for col in ("configuration", "over", "fold/seed", "gain", "95 % interval", "gap closed"):
                g.add_column(col, justify="left" if col in ("configuration", "over") else "right")
            for (c, over), rows in groups.items():
                for r in rows:
                    g.add_row(c, over, f"f{r['fold']}/s{r['seed']}", f"{100 * r['gain']:+.2f}",
                              f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]", _gap(r))
            out.print(g)
            for (c, over), rows in groups.items():
                out.print(f"{c} over {over}: {_pair_summary(rows)}", highlight=False)
        if s.get("image_pairs", {}).get("missing"):
            out.print(f"[yellow]{s['name']}:[/] no saved detections in {_ids(s['image_pairs']['missing'])}: left "
                      f"out of the per-pair intervals ({MISSING_DETS})", highlight=False, soft_wrap=True)
