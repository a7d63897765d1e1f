"""An exclusive lock on a training workdir: ``<workdir>/.lock``, held by process 0 of a job.

Two jobs writing one workdir destroy each other's checkpoints and interleave ``metrics.jsonl``, so
``WorkdirLock(workdir)`` (a context manager) creates the lock file with ``O_CREAT | O_EXCL`` and
writes the holder into it as JSON: ``{"host", "pid", "pid_start", "started"}`` (``pid_start``: the
process's start time in clock ticks from ``/proc/<pid>/stat``, which tells a live holder from a new
process that reuses its PID; ``started``: UTC, ISO 8601). A second job is refused with
``WorkdirLockedError`` naming the holder's host, PID and start time.

A lock whose holder is gone (same host, the PID not running or running a process with another start
time, or an unreadable lock file) is taken over with a warning. A holder on another host cannot be
checked from here: it is refused, and the message says to remove the lock file if that job is gone.
On exit the lock file is removed (only if it is still this process's), and a workdir the lock
created is removed again when it is still empty, so a refused or failed start leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from absl import logging

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live job holds the workdir's lock."""


def _pid_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process ``pid``, or None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces


def _alive(holder: dict) -> bool:
    """Whether the lock ``holder`` (same host) is still running."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    start = _pid_start(pid)
    return start is None or holder.get("pid_start") in (None, start)


def describe(holder: dict) -> str:
    """``host H, PID P, started T`` of a lock file's contents."""
    return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class WorkdirLock:
    """Holds ``<workdir>/.lock`` while open (see the module docstring); a no-op when ``enabled`` is
    False (processes other than 0). Raises ``WorkdirLockedError`` on entry when a live job holds it."""

    def __init__(self, workdir: os.PathLike | str, *, enabled: bool = True):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.enabled = enabled
        self.holder = dict(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                           started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self._created_workdir = False
        self._held = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.holder, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None  # half-written by a process that died while creating it
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> None:
        if not self.enabled:
            return
        if not self.workdir.exists():
            self.workdir.mkdir(parents=True)
            self._created_workdir = True
        for _ in range(3):
            if self._try_create():
                self._held = True
                return
            holder = self._read()
            if holder == {}:  # released between the two calls: try again
                continue
            if holder is not None and holder.get("host") != self.holder["host"]:
                self._give_up_workdir()
                raise WorkdirLockedError(
                    f"--workdir {os.fspath(self.workdir)!r} is locked by another training job ({describe(holder)}; "
                    f"lock file {os.fspath(self.path)}); expected a workdir no other job uses. That host cannot "
                    f"be checked from here: if that job is gone, remove the lock file")
            if holder is not None and _alive(holder):
                self._give_up_workdir()
                raise WorkdirLockedError(
                    f"--workdir {os.fspath(self.workdir)!r} is in use by another training job ({describe(holder)}; "
                    f"lock file {os.fspath(self.path)}); expected a workdir no other job uses")
            logging.warning("taking over the lock of %s: its holder (%s) is no longer running",
                            os.fspath(self.workdir), describe(holder) if holder else "unreadable lock file")
            self.path.unlink(missing_ok=True)
        self._give_up_workdir()
        raise WorkdirLockedError(f"--workdir {os.fspath(self.workdir)!r}: could not take the lock "
                                 f"{os.fspath(self.path)} (other jobs keep taking it)")

    def _give_up_workdir(self) -> None:
        if self._created_workdir:
            try:
                self.workdir.rmdir()  # only when still empty
            except OSError:
                pass
            self._created_workdir = False

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._read() == self.holder:
            self.path.unlink(missing_ok=True)
        self._give_up_workdir()

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
