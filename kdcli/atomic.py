"""Atomic writes: a file (or a whole directory) appears complete or not at all.

Checkpoints, ledgers and dataset JSON go through here so that a crash or Ctrl-C never leaves a half-written
file where a finished one is expected. Files and folders get the permissions the user's umask gives (temporary
files start private), so a shared cluster's other users can read what kdcli writes when the umask allows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

_UMASK = os.umask(0)  # read once, at import, in the main thread: os.umask cannot be read without setting it
os.umask(_UMASK)


def ensure_dir_possible(path: str | Path, what: str = "output") -> None:
    """Fail early, naming the culprit, when `path` (a folder to create or fill) cannot be: a part of it is a file,
    or the nearest existing folder above it is not writable."""
    from kdcli.errors import KdcliError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KdcliError(f"{path}: the {what} exists as a file, not a folder")
    p = path
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise KdcliError(f"{path}: cannot create the {what}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise KdcliError(f"{path}: cannot create the {what}: {p} is not writable")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`. Temporary files
    left by a killed (kill -9) earlier writer of the same `path` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(path, ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def write_yaml(path: str | Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it onto `out` only when the block succeeds.

    An existing `out` is replaced only with `force`, and only after the new one is complete. One run builds a
    given `out` at a time: a second one is refused at its start (even with `force`), and `out` is checked again
    at the swap, so a run never silently replaces an `out` that appeared while it worked. SIGTERM (a cluster's
    preemption) is turned into an interrupt while the block runs, so the temporary folder is removed as after
    Ctrl-C; folders left by a killed (kill -9) earlier run for the same `out` are removed first.
    """
    out = Path(out)
    _refuse_existing(out, force)
    ensure_dir_possible(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(out):
        _refuse_existing(out, force)  # the run that held the lock may have finished it since the check above
        _remove_dead_leftovers(out, ".partial")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
        try:
            with _sigterm_as_interrupt():
                yield tmp
                _swap(tmp, out, force)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _refuse_existing(out: Path, force: bool, appeared: bool = False) -> None:
    from kdcli.errors import KdcliError

    if out.exists() and not force:
        what = "appeared while this run was writing it (left as it is)" if appeared else "already exists"
        raise KdcliError(f"{out} {what}", hint="pass --force to replace it, or choose another --out")


def _swap(tmp: Path, out: Path, force: bool) -> None:
    """Put the finished `tmp` at `out`. Without `force` an `out` that exists now (made by something else than a
    kdcli run, which the lock keeps out), even an empty folder that a rename would silently replace, is refused."""
    if force and out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    _refuse_existing(out, force, appeared=True)
    try:
        os.rename(tmp, out)  # fails if a non-empty folder or a file took the place since the check above
    except OSError:
        _refuse_existing(out, force=False, appeared=True)
        raise


@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out` while it is built, so that a second run writing the same `out` fails at
    once, naming the first, instead of both "succeeding" with the later one's result. The kernel releases the
    lock when its process dies (even by kill -9), so a stale lock file never blocks the next run."""
    path = out.with_name(f".{out.name}.lock")
    fd = _lock(path, out)
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)


def _lock(path: Path, out: Path) -> int | None:
    """A descriptor holding an exclusive lock on `path`, with our pid written in it; None where there are no locks
    (Windows, a file system mounted without them): the check at the swap remains."""
    from kdcli.errors import KdcliError

    try:
        import fcntl
    except ImportError:
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 20).decode(errors="replace").strip()
            os.close(fd)
            raise KdcliError(f"{out}: another kdcli run{f' (pid {holder})' if holder.isdigit() else ''} is "
                             "writing it", hint="wait for it to finish, or choose another --out") from None
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            return None
        try:  # the previous holder removes the file on release: lock the file that is at `path` now
            locked = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _remove_dead_leftovers(out: Path, suffix: str) -> None:
    """Remove `.<name>.<pid>.*<suffix>` siblings (temporary files or folders) whose process is gone; a live one
    belongs to another writer."""
    for p in out.parent.glob(f".{out.name}.*{suffix}"):
        pid = p.name[len(out.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_path's mkstemp names


def remove_stale_temps(folder: str | Path) -> tuple[int, int]:
    """Remove the temporary files `atomic_path` left in `folder` when its writer was killed mid-write (kill -9,
    the OOM killer, a node lost): only kdcli's own names (`.<name>.<pid>.<8 random chars>.tmp`), and only where
    that process is gone or is this one (called before this process writes there, a temp file with its own pid
    is a reused pid's: containers restart with the same pids). Returns (files, bytes) removed."""
    files = size = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    for p in folder.iterdir():
        m = _TEMP_FILE.match(p.name)
        if m is None or not p.is_file() or p.is_symlink():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            n = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            continue
        files, size = files + 1, size + n
    return files, size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
