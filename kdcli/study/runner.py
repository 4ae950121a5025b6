"""Running a study: one cell in this process (`kdcli study DIR --cell ID`), or the whole grid as a pool of such
processes (`--jobs N` on CPU, `--devices 0,1` one per GPU), or a plan of those commands for a scheduler.

Each cell is a separate process writing its own log, so a crash, an out-of-memory kill or a bad configuration
fails that cell only. A cell appends one ledger record when it finishes (status ok with its metrics, or failed
with its error); a cell killed before that leaves its `last.pt`, and the next run resumes it from there.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdcli import __version__
from kdcli.console import err
from kdcli.errors import FAILED, KdcliError
from kdcli.study.grid import Cell, Study
from kdcli.study.ledger import Ledger, study_records

INTERRUPTED = 130  # exit code of a cell stopped by SIGINT/SIGTERM (resumable, not a failure)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import torch

    return {"kdcli": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


# ---- one cell ------------------------------------------------------------------------------------------------
def _teacher_weights(study: Study, cell: Cell) -> Path:
    rec = study_records(study.dir).get(cell.teacher().key)
    if rec is None or rec.get("status") != "ok":
        state = "failed" if rec else "not finished"
        raise KdcliError(f"{cell.id}: its teacher {cell.teacher().id} has {state}",
                         hint="run the teachers first (`kdcli study` orders them; with --plan, phase 1)")
    return Path(rec["weights"])


def _trainer(study: Study, cell: Cell, device: str | None, workers: int | None = None):
    """The trainer of a cell: resumed from its last.pt when a previous attempt left one, else fresh (an earlier
    run dir without last.pt is moved aside, never deleted)."""
    from kdcli.engine import checkpoint
    from kdcli.engine.distill_trainer import DistillTrainer, student_defaults
    from kdcli.engine.trainer import Trainer

    run_dir = study.run_dir(cell)
    cls = Trainer if cell.is_teacher else DistillTrainer
    extra = ([f"train.device={device}"] if device else []) + ([f"data.workers={workers}"] if workers else [])
    last = run_dir / "weights" / "last.pt"
    if last.is_file() and checkpoint.load(last).train_state is not None:
        err.print(f"{cell.id}: resuming from {last}", highlight=False)
        return cls.resume(last, extra)
    if run_dir.exists():
        n = 1
        while run_dir.with_name(f"{run_dir.name}.old{n}").exists():
            n += 1
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.old{n}"))
    if cell.is_teacher:
        recipe = study.teacher_recipe(cell)
    else:
        weights = _teacher_weights(study, cell)
        recipe = study.student_recipe(cell, weights, student_defaults(checkpoint.load(weights)))
    if device:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"device": device})})
    if workers:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"workers": workers})})
    return cls(recipe, run_dir=run_dir)


def run_cell(study: Study, cell: Cell, ledger: Ledger, device: str | None = None, workers: int | None = None) -> int:
    """Train or distil one cell, evaluate its best.pt on the study's split, append the record. Returns the exit
    code: 0 ok, 1 failed (recorded), 130 interrupted (not recorded: the next run resumes it)."""
    import torch

    from kdcli.engine import detfile
    from kdcli.engine.validator import evaluate_checkpoint

    started, t0 = _now(), time.time()
    base = {"config": cell.config, "fold": cell.fold, "seed": cell.seed, "run_dir": str(study.run_dir(cell)),
            "log": str(study.log_path(cell)), "started": started, "host": platform.node(), "versions": _versions(),
            "threads": torch.get_num_threads()}
    try:
        trainer = _trainer(study, cell, device, workers)
        summary = trainer.fit()
        fit_end = time.time()
        if summary["interrupted"]:
            err.print(f"{cell.id}: interrupted; the next run resumes it from last.pt", highlight=False)
            return INTERRUPTED
        weights = trainer.weights_dir / "best.pt"
        dets = detfile.path_for(study.run_dir(cell), study.cfg.split)  # for `kdcli report`'s paired intervals
        result, _ = evaluate_checkpoint(weights, study.cfg.split, device=device or trainer.recipe.train.device,
                                        workers=trainer.recipe.data.workers, iou_thresholds=[], dets_out=dets)
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as e:  # noqa: BLE001 - any failure of a cell is recorded and the grid goes on
        msg = e.message if isinstance(e, KdcliError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, KdcliError):
            traceback.print_exc()
        ledger.append({**base, "status": "failed", "error": msg[:500], "finished": _now(),
                       "time_s": round(time.time() - t0, 1)})
        err.print(f"[red]{cell.id} failed:[/] {msg}", highlight=False)
        return FAILED
    metrics = {k: result[k] for k in ("mAP50", "mAP50-95", "coco_AP50", "mAP50_ci95")}
    metrics["val_mAP50"] = summary["best_fitness"]
    metrics["per_class_AP50"] = {r["class"]: r["AP50"] for r in result["per_class"]}
    record = {**base, "status": "ok", "split": study.cfg.split, "metrics": metrics, "weights": str(weights),
              "dets": str(dets),
              "epochs": summary["epochs"], "best_epoch": summary["best_epoch"], "finished": _now(),
              "train_s": summary["train_seconds"], "attempt_s": round(time.time() - t0, 1),
              "time_s": round(summary["train_seconds"] + time.time() - fit_end, 1)}
    # the last epoch's mean of each loss term, one key per term (`pdf`, `mse`, `crosskd_cls`, ...): what trained
    record["losses"] = {k[5:]: v for k, v in (trainer.history[-1] if trainer.history else {}).items()
                        if k.startswith("loss_")}
    record["data"] = {"label_fraction": trainer.recipe.data.label_fraction, "labeled_images": len(trainer.train_set),
                      "unlabeled": None, "unlabeled_images": 0}
    if not cell.is_teacher:
        record["teacher"] = str(trainer.recipe.distill.teacher)
        if trainer.pool is not None:
            record["data"].update(unlabeled=trainer.recipe.distill.unlabeled, unlabeled_images=len(trainer.pool))
    ledger.append(record)
    err.print(f"[green]{cell.id} done:[/] {study.cfg.split} {study.cfg.metric} {metrics.get(study.cfg.metric, 0):.4f}",
              highlight=False)
    return 0


# ---- the grid ----------------------------------------------------------------------------------------------------
def cell_command(study: Study, cell: Cell, ledger: Path | None = None, device: str | None = None,
                 workers: int | None = None) -> list[str]:
    cmd = ["kdcli", "study", str(study.dir.resolve()), "--cell", cell.id]
    cmd += ["--ledger", str(ledger)] if ledger else []
    return cmd + (["--device", device] if device else []) + (["--workers", str(workers)] if workers else [])


@dataclass
class Status:
    """Where each cell of the grid stands before a run."""

    done: list[Cell] = field(default_factory=list)
    failed: list[Cell] = field(default_factory=list)
    todo: list[Cell] = field(default_factory=list)
    records: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)


def status(study: Study, skip_failed: bool = False) -> Status:
    st = Status(records=study_records(study.dir))
    for cell in study.cells():
        rec = st.records.get(cell.key)
        if rec and rec.get("status") == "ok":
            st.done.append(cell)
        elif rec and skip_failed:
            st.failed.append(cell)
        else:
            st.todo.append(cell)
    return st


def write_plan(study: Study) -> dict[str, Path]:
    """One command per cell in two phases (teachers, then students), each writing a ledger of its own under
    `ledgers/`, plus a SLURM script with job arrays, the students' array starting once every teacher has ended
    (afterany: a student whose teacher failed stops at once with that error). Finished cells are left out."""
    st = status(study)
    plan = study.dir / "plan"
    plan.mkdir(parents=True, exist_ok=True)
    (study.dir / "logs").mkdir(exist_ok=True)
    files = {}
    for phase, cells in (("teachers", [c for c in st.todo if c.is_teacher]),
                         ("students", [c for c in st.todo if not c.is_teacher])):
        lines = [shlex.join(cell_command(study, c, study.dir.resolve() / "ledgers" / f"{c.slug}.jsonl"))
                 for c in cells]
        files[phase] = plan / f"{phase}.txt"
        files[phase].write_text("".join(x + "\n" for x in lines))
    n_t = len(files["teachers"].read_text().splitlines())
    n_s = len(files["students"].read_text().splitlines())
    run_line = 'eval "$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$1")"'
    script = ["#!/bin/bash", f"# {study.cfg.name}: {n_t} teacher cells, then {n_s} student cells once the "
              "teachers have finished.", "# Submit with: bash slurm.sh   (edit the #SBATCH lines to your cluster)",
              "set -euo pipefail", 'cd "$(dirname "$0")"',
              "cat > cell.sbatch <<'EOF'", "#!/bin/bash", "#SBATCH --gres=gpu:1", "#SBATCH --cpus-per-task=8",
              f"#SBATCH --output={study.dir.resolve()}/logs/slurm-%A_%a.log", run_line, "EOF"]
    if n_t:
        script.append(f"T=$(sbatch --parsable --array=1-{n_t} cell.sbatch teachers.txt)")
    if n_s:
        dep = " --dependency=afterany:$T" if n_t else ""
        script.append(f"sbatch{dep} --array=1-{n_s} cell.sbatch students.txt")
    script.append(f"echo \"when all have finished: kdcli report {study.dir.resolve()}\"")
    files["slurm"] = plan / "slurm.sh"
    files["slurm"].write_text("\n".join(script) + "\n")
    return files


class _Pool:
    """Child processes of the grid, one per slot (a GPU index, or a CPU job)."""

    def __init__(self, study: Study, slots: list[str | None], workers: int | None = None):
        self.study = study
        self.free = list(slots)
        self.workers = workers
        self.running: dict[Cell, tuple[subprocess.Popen, str | None, float, Any]] = {}

    def launch(self, cell: Cell, threads: int | None) -> None:
        slot = self.free.pop(0)
        env = dict(os.environ)
        device = None
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
            device = "0"
        if threads:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        log_path = self.study.log_path(cell)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the child is reaped
        command = cell_command(self.study, cell, device=device, workers=self.workers if slot is not None else None)
        log.write(f"==== {_now()} {shlex.join(command)}\n")
        log.flush()
        cmd = [sys.executable, "-m", "kdcli", *command[1:]]
        # a session of its own: a terminal's Ctrl-C reaches the study only, which passes it on exactly once
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env | {"COLUMNS": "120"},
                                start_new_session=True)
        self.running[cell] = (proc, slot, time.time(), log)

    def reap(self) -> list[tuple[Cell, int, float]]:
        finished = []
        for cell, (proc, slot, t0, log) in list(self.running.items()):
            rc = proc.poll()
            if rc is not None:
                log.close()
                self.free.append(slot)
                del self.running[cell]
                finished.append((cell, rc, t0))
        return finished

    def signal_all(self, signum: int) -> None:
        for proc, *_ in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signum)


def _images_per_s(run_dir: Path) -> float:
    """A running cell's training speed over its last epoch (progress.json, written by the trainer)."""
    try:
        return float(json.loads((run_dir / "progress.json").read_text()).get("images_per_s", 0.0))
    except (OSError, ValueError, AttributeError):
        return 0.0


def share_out(jobs: int, devices: list[str] | None, per_device: int, cpus: int
              ) -> tuple[list[str | None], int | None, int | None]:
    """(slots, CPU threads per cell, loader workers per cell). A slot is a GPU index (listed `per_device` times)
    or None for a CPU job; with several cells at once each gets an equal share of the CPU threads, and a GPU cell
    the rest of its share as loader workers (a CPU cell keeps its recipe's)."""
    slots: list[str | None] = [d for d in devices for _ in range(per_device)] if devices else [None] * jobs
    threads = max(1, cpus // len(slots)) if len(slots) > 1 else None
    workers = max(1, cpus // len(slots) - 1) if devices else None
    return slots, threads, workers


def cpu_threads(cpus: int, busy: int) -> int:
    """Threads of a CPU cell started with `busy` cells running (itself included): a lone cell, such as the one
    teacher of a one-fold study whose students wait for it, gets every core rather than its share of --jobs (a cell
    that becomes ready while it runs then shares the cores with it until it ends)."""
    return max(1, cpus // max(1, busy))


def run_grid(study: Study, jobs: int = 1, devices: list[str] | None = None, skip_failed: bool = False,
             per_device: int = 1) -> int:
    """Run every unfinished cell; returns the number of cells that failed (or could not run) in this run.
    `devices` with `per_device` N: N cells share each GPU at a time. CPU threads (and, on GPUs, loader workers)
    are shared out between the cells running at once."""
    st = status(study, skip_failed)
    ledger = Ledger(study.dir / "ledger.jsonl")
    cpus = os.cpu_count() or 1
    slots, threads, workers = share_out(jobs, devices, per_device, cpus)
    pool = _Pool(study, slots, workers)
    pending = list(st.todo)
    records = dict(st.records)
    failed_now: list[Cell] = []
    blocked: list[Cell] = []
    interrupted: list[Cell] = []  # stopped by a signal: no record, the next run resumes them from last.pt
    stopping = {"flag": False}

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping["flag"]:
            err.print(f"[yellow]{signal.Signals(signum).name}: stopping the running cells (they save last.pt); "
                      "rerun the same command to continue[/]")
        stopping["flag"] = True
        pool.signal_all(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    err.print(f"study {study.cfg.name}: {len(st.done)} cells done, {len(st.failed)} failed (skipped), "
              f"{len(pending)} to run, {len(slots)} at a time -> {study.dir}", highlight=False)
    try:
        with Progress(TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[now]}"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task("study", total=len(pending), now="")
            while (pending or pool.running) and not (stopping["flag"] and not pool.running):
                for cell, rc, t0 in pool.reap():
                    records = study_records(study.dir)
                    rec = records.get(cell.key)
                    fresh = rec is not None and str(rec.get("started", "")) >= datetime.fromtimestamp(
                        t0, timezone.utc).isoformat(timespec="seconds")
                    if rc == INTERRUPTED or (stopping["flag"] and not fresh):
                        interrupted.append(cell)
                        continue
                    if not fresh:
                        rec = {"config": cell.config, "fold": cell.fold, "seed": cell.seed, "status": "failed",
                               "error": f"the cell's process exited with code {rc} without a record "
                                        f"(killed? out of memory?); see its log", "log": str(study.log_path(cell)),
                               "run_dir": str(study.run_dir(cell)), "finished": _now()}
                        ledger.append(rec)
                        records[cell.key] = rec
                    bar.advance(task)
                    if rec.get("status") == "ok":
                        m = rec["metrics"].get(study.cfg.metric)
                        bar.console.print(f"[green]done[/] {cell.id}  {study.cfg.metric} {m:.4f}  "
                                          f"({rec.get('time_s', 0):.0f} s)", highlight=False)
                    else:
                        failed_now.append(cell)
                        bar.console.print(f"[red]failed[/] {cell.id}: {rec.get('error')}  (log: "
                                          f"{study.log_path(cell)})", highlight=False, soft_wrap=True)
                ready = []
                for cell in list(pending):
                    if stopping["flag"] or len(ready) == len(pool.free):
                        break
                    if not cell.is_teacher:
                        t = records.get(cell.teacher().key)
                        if t is None or t.get("status") != "ok":
                            teacher_pending = cell.teacher() in pending or cell.teacher() in pool.running
                            if not teacher_pending:
                                pending.remove(cell)
                                blocked.append(cell)
                                bar.advance(task)
                            continue
                    ready.append(cell)
                busy = len(pool.running) + len(ready)
                for cell in ready:
                    pending.remove(cell)
                    pool.launch(cell, cpu_threads(cpus, busy) if devices is None and len(slots) > 1
                                else threads)
                rate = sum(_images_per_s(study.run_dir(c)) for c in pool.running)
                bar.update(task, now=", ".join(c.id for c in pool.running) + (f"  {rate:.0f} img/s" if rate else ""))
                time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stopping["flag"]:
        raise KdcliError(stopped_message(interrupted, pending), hint="rerun the same command to continue",
                         exit_code=INTERRUPTED)
    if interrupted:  # a cell's process was stopped by a signal of its own, not the study's
        err.print(f"[yellow]{', '.join(c.id for c in interrupted)} interrupted (not by this study): rerun to resume "
                  "from last.pt[/]", highlight=False)
    if blocked:
        err.print(f"[yellow]{len(blocked)} student cells not run: their teacher failed[/] "
                  f"({', '.join(sorted({c.teacher().id for c in blocked}))})", highlight=False)
    return len(failed_now) + len(blocked) + len(interrupted)


def stopped_message(interrupted: list[Cell], pending: list[Cell]) -> str:
    """What a stopped study left: the cells it interrupted (resumed from their last.pt by a rerun) and the number
    not started; no count of nothing."""
    parts = []
    if interrupted:
        ids = ", ".join(c.id for c in interrupted)
        parts.append(f"{ids} interrupted (rerunning resumes {'it' if len(interrupted) == 1 else 'them'} from "
                     "last.pt)")
    if pending:
        parts.append(f"{len(pending)} cell{'s' if len(pending) > 1 else ''} not started")
    return "study stopped: " + ("; ".join(parts) if parts else "no cell was running or waiting")
