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


def test_a_second_writer_of_the_same_out_is_refused_even_with_force(tmp_path: Path):
    out = tmp_path / "data"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("first")
        for force in (False, True):
            with pytest.raises(KdcliError, match=rf"data: another kdcli run \(pid {os.getpid()}\) is writing it"), \
                    atomic.atomic_dir(out, force=force):
                pass
    assert (out / "f.txt").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_killed_writers_lock_does_not_block_the_next_run(tmp_path: Path):
    code = ("import sys, time\nfrom kdcli import atomic\nwith atomic.atomic_dir(sys.argv[1]):\n"
            "    print('writing', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        with pytest.raises(KdcliError, match=rf"another kdcli run \(pid {proc.pid}\)"), \
                atomic.atomic_dir(tmp_path / "data"):
            pass
    finally:
        proc.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        proc.wait()
    assert (tmp_path / ".data.lock").exists()
    with atomic.atomic_dir(tmp_path / "data") as tmp:
        (tmp / "f.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize("theirs", [{}, {"x.txt": "theirs"}], ids=["empty", "filled"])
def test_an_out_that_appears_during_the_build_is_left_alone(tmp_path: Path, theirs: dict[str, str]):
    out = tmp_path / "data"
    with pytest.raises(KdcliError, match="data appeared while this run was writing it"), \
            atomic.atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("ours")
        out.mkdir()  # an empty folder too: a plain rename would replace it silently
        for name, text in theirs.items():
            (out / name).write_text(text)
    assert {p.name: p.read_text() for p in out.iterdir()} == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_an_out_made_between_the_last_check_and_the_rename_is_not_replaced(tmp_path: Path, monkeypatch):
    out, check = tmp_path / "data", atomic._refuse_existing

    def racing(o: Path, force: bool, appeared: bool = False) -> None:
        check(o, force, appeared)
        if appeared and not o.exists():  # another program fills `out` just after the swap's check
            o.mkdir()
            (o / "x.txt").write_text("theirs")

    monkeypatch.setattr(atomic, "_refuse_existing", racing)
    with pytest.raises(KdcliError, match="data appeared while"), atomic.atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("ours")
    assert [p.name for p in out.iterdir()] == ["x.txt"] and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_a_file_system_without_locks_still_builds_and_leaves_no_lock_file(tmp_path: Path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")  # NFS mounted with nolock

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with atomic.atomic_dir(tmp_path / "data") as tmp:
        (tmp / "f.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["data"] and (tmp_path / "data" / "f.txt").read_text() == "ok"


def test_stale_temp_files_of_killed_writes_are_removed_and_counted(tmp_path: Path):
    """What `atomic_path` leaves when its writer is killed mid-write: removed when that process is gone or is this
    one (a reused pid); a live writer's file and every name that is not kdcli's own are kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".last.pt.{dead}.a1b2_c3d.tmp").write_bytes(b"x" * 1000)
    (tmp_path / f".best.pt.{os.getpid()}.zzzzzzzz.tmp").write_bytes(b"x" * 24)
    keep = [f".last.pt.{os.getppid()}.q1w2e3r4.tmp",  # a live writer
            ".notes.tmp", f".last.pt.{dead}.tmp", "last.pt", f"last.pt.{dead}.a1b2c3d4.tmp"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    assert atomic.remove_stale_temps(tmp_path) == (2, 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert atomic.remove_stale_temps(tmp_path / "absent") == (0, 0)
