"""Atomic folders: SIGTERM and kill -9 leave nothing behind for long, permissions follow the umask, impossible
output places are named before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcli import atomic
from kdcli.errors import KdcliError


def test_sigterm_during_prepare_removes_the_partial_folder_and_exits_130(tmp_path: Path):
    out = tmp_path / "raw"
    proc = subprocess.Popen([sys.executable, "-m", "kdcli", "prepare", "synthetic", "--kind", "vedai", "--images",
                             "3000", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".raw.*.partial")) and time.time() < deadline:  # wait until it is writing
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither the partial folder nor the output


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".data.{dead.stdout.strip()}.abc123.partial"
    (stale / "images").mkdir(parents=True)
    (stale / "images" / "x.png").write_bytes(b"x" * 1000)
    live = tmp_path / f".data.{os.getpid()}.def456.partial"  # a live process's (ours): left alone
    live.mkdir()
    with atomic.atomic_dir(tmp_path / "data") as tmp:
        (tmp / "f.txt").write_text("ok")
    assert not stale.exists() and live.exists() and (tmp_path / "data" / "f.txt").read_text() == "ok"


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.pt.{dead.stdout.strip()}.x1y2.tmp"  # what kill -9 during a save leaves
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".last.pt.{os.getpid()}.z3.tmp"
    live.write_bytes(b"y")
    other = tmp_path / f".best.pt.{dead.stdout.strip()}.q.tmp"  # another file's: its own next write removes it
    other.write_bytes(b"z")
    atomic.write_text(tmp_path / "last.pt", "new")
    assert not stale.exists() and live.exists() and other.exists() and (tmp_path / "last.pt").read_text() == "new"


@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                     (0o002, 0o775, 0o664)])
def test_permissions_follow_the_umask(tmp_path: Path, monkeypatch, mask: int, dir_mode: int, file_mode: int):
    monkeypatch.setattr(atomic, "_UMASK", mask)
    with atomic.atomic_dir(tmp_path / "data") as tmp:
        atomic.write_yaml(tmp / "dataset.yaml", {"a": 1})
    assert (tmp_path / "data").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "data" / "dataset.yaml").stat().st_mode & 0o777 == file_mode


def test_impossible_output_places_are_named(tmp_path: Path):
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(KdcliError, match=r"afile is a file, not a folder"):
        atomic.ensure_dir_possible(tmp_path / "afile" / "sub")
    with pytest.raises(KdcliError, match=r"exists as a file"):
        atomic.ensure_dir_possible(tmp_path / "afile")
    with pytest.raises(KdcliError, match=r"afile is a file"), atomic.atomic_dir(tmp_path / "afile" / "sub"):
        pass
    assert (tmp_path / "afile").read_text() == "keep me"
