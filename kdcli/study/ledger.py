"""The append-only ledger of a study: one JSON line per finished (or failed) cell, fsynced.

A study killed mid-write may leave a cut last line: it is ignored when reading and cut away before the next
append, so the ledger stays valid. A malformed line anywhere else is an error naming its line. Appends hold an
exclusive lock, so the cells of a pool can share one ledger; cells run by a scheduler (`kdcli study --plan`)
write a ledger each under `ledgers/`, and `study_records` merges them all.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from kdcli.errors import KdcliError


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
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise KdcliError(f"{self.path}:{n}: malformed ledger line ({e.msg})",
                                 hint="remove or fix that line; finished cells on other lines are kept") from None
        if tail.strip():
            try:  # a last line written whole but without its newline still counts
                records.append(json.loads(tail))
            except json.JSONDecodeError:
                pass
        return records

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
