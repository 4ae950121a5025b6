"""The append-only ledger of a study: one JSON line per finished (or failed) cell, fsynced.

A study killed mid-write may leave a cut last line: it is ignored when reading and cut away before the next
append, so the ledger stays valid. A line anywhere else that is not JSON, or JSON of the wrong shape (no cell
name, fold or seed; a status other than ok/failed; ok without numeric metrics), is reported once with its
file and line and skipped: one bad line must not block a whole study (the cell it named is not finished).
Appends hold an
exclusive lock, so the cells of a pool can share one ledger; cells run by a scheduler (`kdcli study --plan`)
write a ledger each under `ledgers/`, and `study_records` merges them all.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any



_REPORTED: set[tuple[Path, int]] = set()  # lines already warned about in this process


def _numeric(x: Any) -> bool:
    """A number (or null, as NaN is written), or a list / mapping of them (per-class values, intervals)."""
    if isinstance(x, (list, tuple)):
        return all(_numeric(v) for v in x)
    if isinstance(x, dict):
        return all(_numeric(v) for v in x.values())
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def shape_problem(record: Any) -> str | None:
    """Why a parsed ledger line cannot be a cell record, or None."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a record"
    if not isinstance(record.get("config"), str):
        return "'config' is not a configuration name"
    for key in ("fold", "seed"):
        if isinstance(record.get(key), bool) or not isinstance(record.get(key), int):
            return f"'{key}' is not an integer"
    status = record.get("status")
    if status not in ("ok", "failed"):
        return f"'status' is {json.dumps(status)}, not \"ok\" or \"failed\""
    if status == "ok":
        metrics = record.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            return "status ok without metrics"
        for k, v in metrics.items():
            if not _numeric(v):
                return f"metric '{k}' is not a number"
    return None


def cell_key(record: dict[str, Any]) -> tuple[str, int, int]:
    return (str(record["config"]), int(record["fold"]), int(record["seed"]))


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        complete, tail = lines[:-1], lines[-1]  # text after the last newline is a cut write
        records = []
        for n, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                self._skip(n, f"not JSON ({e.msg})")
                continue
            problem = shape_problem(record)
            if problem:
                self._skip(n, problem)
            else:
                records.append(record)
        if tail.strip():
            try:  # a last line written whole but without its newline still counts
                record = json.loads(tail)
            except json.JSONDecodeError:
                record = None
            if record is not None and not shape_problem(record):
                records.append(record)
        return records

    def _skip(self, line: int, why: str) -> None:
        if (self.path, line) not in _REPORTED:
            _REPORTED.add((self.path, line))
            from kdcli.console import err

            err.print(f"[yellow]warning:[/] {self.path}:{line}: ledger line skipped: {why}", highlight=False,
                      soft_wrap=True)

    def _repair(self) -> None:
        """Cut a partial last line so that the next append starts on a line of its own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            tail = data[data.rfind(b"\n") + 1:]
            try:
                json.loads(tail)
                keep = data + b"\n"  # whole record, missing only its newline
            except json.JSONDecodeError:
                keep = data[: data.rfind(b"\n") + 1]
            with open(self.path, "wb") as f:
                f.write(keep)
                f.flush()
                os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # O_APPEND: each write lands at the current end
            with contextlib.suppress(ImportError):
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
            self._repair()
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def latest(self) -> dict[tuple[str, int, int], dict[str, Any]]:
        """The last record of each cell (a retried cell's success replaces its failure)."""
        out: dict[tuple[str, int, int], dict[str, Any]] = {}
        for r in self.read():
            out[cell_key(r)] = r
        return out

    def done(self) -> set[tuple[str, int, int]]:
        return {k for k, r in self.latest().items() if r.get("status") == "ok"}

    def failed(self) -> set[tuple[str, int, int]]:
        return {k for k, r in self.latest().items() if r.get("status") == "failed"}


def study_ledgers(study_dir: Path) -> list[Ledger]:
    """The study's own ledger and those of cells run by a scheduler."""
    return [Ledger(study_dir / "ledger.jsonl"), *(Ledger(p) for p in sorted((study_dir / "ledgers").glob("*.jsonl")))]


def study_records(study_dir: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The latest record of each cell over all of a study's ledgers (by finish time, then ledger order)."""
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for led in study_ledgers(study_dir):
        for r in led.read():
            k = cell_key(r)
            if k not in out or str(r.get("finished", "")) >= str(out[k].get("finished", "")):
                out[k] = r
    return out
