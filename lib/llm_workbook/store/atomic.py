"""Writing files so that a reader sees the old version or the new one, never half of either.

Every writer puts its output under a temporary name beside the target, ``.<name>.<pid>.tmp``, and
renames it into place at the end; a failure or a stop signal removes it. A temporary left by a process
that no longer exists (SIGKILL, power loss) is removed by the next write to the same target: the pid in
its name says whether its writer is still alive.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

# SIGINT too: a process started in the background of a non-interactive shell inherits SIGINT ignored, and
# Python then never raises KeyboardInterrupt, so Ctrl-C from a job controller would kill nothing cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) turned into the exception Ctrl-C raises, so every cleanup path runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def handle_stop_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (a KeyboardInterrupt) in the main thread."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_interrupted)


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal number, the shell's convention for a process stopped by a signal."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` whose writer process is gone; returns what was removed."""
    target = Path(target)
    removed = []
    for entry in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid_text = entry.name[len(target.name) + 2 : -len(".tmp")]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or pid_alive(int(pid_text)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temp_path(target: Path) -> Path:
    """This process's temporary name for ``target``, after removing dead processes' leftovers."""
    target = Path(target)
    remove_stale(target)
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextmanager
def replacing(target: Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path; when the block succeeds it replaces ``target``, when it fails it is removed."""
    target = Path(target)
    tmp = temp_path(target)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: Path, text: str) -> Path:
    with replacing(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: Path, data: bytes) -> Path:
    with replacing(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


@contextmanager
def file_lock(path: Path, on_busy: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing): one process builds or writes at a time.

    The holder's pid is written in the file, so a process that finds it held can say for whom:
    ``on_busy(holder)`` is called before waiting (it may raise instead).
    """
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            if on_busy is not None:
                on_busy(handle.read().strip() or "another process")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
