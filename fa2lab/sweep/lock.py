"""One runner per point: a lock file in the point's folder holding the pids of its owners.

`points/<id>/.lock` lists the runner's pid and, while a child process runs the point, the child's
(one `pid start-time` per line). A point is claimed when no pid listed there is alive, and is
held under an exclusive `flock` for as long as its runner runs it, so two runners that find the
same stale lock cannot both take it over: the kernel gives the flock to one of them, and releases
it by itself when its holder dies, however it dies. The pids say who holds a point (for people,
and for the child that outlives a killed runner by a moment); the start time tells a live owner
from an unrelated process that reused a dead owner's pid.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: the pid check alone (without the flock's guard on a stale take-over)
    fcntl = None

LOCK_NAME = ".lock"
_current = threading.local()  # the lock of the point this thread runs (execute_in_subprocess adds its child)


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (Linux); [] where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), '' where unknown."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def pid_alive(pid: int, start: str = "") -> bool:
    """Whether process `pid` exists and (with `start`) is the one that started then."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):  # dead, waiting to be reaped
        return False
    now = fields[19] if len(fields) > 19 else ""
    return not (start and now and now != start)


def owners(path) -> list[tuple[int, str]]:
    """(pid, start time) of every owner listed in a lock file; [] for a missing or empty one."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit():
            out.append((int(parts[0]), parts[1] if len(parts) > 1 else ""))
    return out


class PointBusy(RuntimeError):
    """Another live process runs this point; the message names it."""


class PointLock:
    """Claim `folder`/.lock for this process, or raise PointBusy. Use as a context manager: the
    lock is released (emptied and unlocked) on exit."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "PointLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise PointBusy(f"{self.path.parent.name} is being run by pid(s) "
                                    f"{[p for p, _ in owners(self.path)] or '?'} (lock {self.path})") from None
            alive = [p for p, start in owners(self.path) if p != os.getpid() and pid_alive(p, start)]
            if alive:  # e.g. the child of a runner that was killed, still shutting down
                raise PointBusy(f"{self.path.parent.name} is being run by live pid(s) {alive} (lock {self.path}); "
                                f"wait for them to end, or delete the lock if they are not fa2lab sweep")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {_start_time(os.getpid())}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _current.lock = self
        return self

    def add(self, pid: int) -> None:
        """List a child process that runs the point for this owner."""
        if self.fd is not None:
            os.lseek(self.fd, 0, os.SEEK_END)
            os.write(self.fd, f"{pid} {_start_time(pid)}\n".encode())

    def __exit__(self, *exc) -> None:
        _current.lock = None
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # free: no owner listed
            finally:
                os.close(self.fd)  # releases the flock
                self.fd = None


def note_child(pid: int) -> None:
    """Called by the executor that starts a child process for the current thread's point."""
    lock = getattr(_current, "lock", None)
    if lock is not None:
        lock.add(pid)
