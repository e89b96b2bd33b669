"""One writer per run: an advisory lock on ``<run>/.lock`` (``fcntl.flock``) that names its holder.

The lock file holds the holder's pid, host, start time, what it runs and a random token. The kernel lock itself is
released by the operating system when the holder's process ends, however it ends; the holder text is cleared only
on a clean release, so text left behind by a process that is gone marks a killed or crashed writer, which the next
writer reports and takes over from.

Children of a holder: ``python -m rlhf_lib.pipeline`` holds the lock and runs each stage notebook in a kernel, a
child process, whose :func:`rlhf_lib.core.runs.start_stage` must not refuse its own parent. The holder exports its token
in ``RLHF_LAB_RUN_LOCK``; a process that finds the lock taken by a live holder whose token equals that variable
works under that holder. A token (rather than a parent-pid check) survives any launcher between the two processes
(jupyter's kernel manager, a nanny, ``accelerate launch``) and cannot be matched by an unrelated process, which does
not inherit the variable; a token left in the environment after its holder ended matches nothing, since the lock
is then free and is taken normally.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

LOCK_ENV = "RLHF_LAB_RUN_LOCK"  # token of the lock holder whose children may write its run
LOCK_NAME = ".lock"


class RunBusyError(RuntimeError):
    """Another live process is writing this run."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe_holder(info: dict[str, Any]) -> str:
    """'pid 123 on host h (started T, running data)' from a holder record."""
    what = f", running {info['what']}" if info.get("what") else ""
    return f"pid {info.get('pid')} on host {info.get('host')} (started {info.get('started')}{what})"


def holder_alive(info: dict[str, Any]) -> bool | None:
    """True / False when the holder's process is / is not alive; None when it runs on another host (unknown)."""
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {"unreadable": text[:80]}
    return info if isinstance(info, dict) else {}


@dataclass
class RunLock:
    """The lock of one run folder held by this process; ``holds`` counts who inside the process needs it."""

    root: Path
    fd: int | None
    info: dict[str, Any]
    holds: set[str] = field(default_factory=set)
    delegated: bool = False  # works under a parent holder's lock (nothing to release)

    def release(self, hold: str) -> None:
        """Drop one hold; the last one clears the holder text and unlocks."""
        self.holds.discard(hold)
        if self.holds:
            return
        _HELD.pop(self.root, None)
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean release leaves no holder behind
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


_HELD: dict[Path, RunLock] = {}


def held(root: Path) -> RunLock | None:
    """This process's lock of the run folder ``root``, if it holds one."""
    return _HELD.get(Path(root))


def acquire(root: Path, hold: str, what: str = "") -> RunLock:
    """Take (or join) the lock of run folder ``root`` for ``hold``; raises RunBusyError naming a live holder.

    Re-entrant within a process (each ``hold`` is released separately) and for children of the holder (see the
    module docstring). A holder text left by a process that is gone is reported on stderr and taken over.
    """
    root = Path(root)
    mine = _HELD.get(root)
    if mine is not None:
        mine.holds.add(hold)
        return mine
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)  # mode under the umask, like any file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _read_holder(fd)
        os.close(fd)
        token = os.environ.get(LOCK_ENV)
        if token and info.get("token") == token:
            lock = RunLock(root, None, info, {hold}, delegated=True)
            _HELD[root] = lock
            return lock
        who = describe_holder(info) if info.get("pid") else "another process (it has not written its details yet)"
        raise RunBusyError(
            f"run {root.name!r} ({root}) is being written by {who}; wait for it to finish, stop it, or choose "
            f"another run name"
        ) from None
    previous = _read_holder(fd)
    if previous:
        print(
            f"warning: run {root.name!r}: previous writer {describe_holder(previous)} is gone without releasing "
            f"the run; taking over",
            file=sys.stderr,
            flush=True,
        )
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _now(),
        "what": what,
        "command": " ".join(sys.argv)[:300],
        "token": uuid.uuid4().hex,
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
    os.fsync(fd)
    lock = RunLock(root, fd, info, {hold})
    _HELD[root] = lock
    return lock


@contextlib.contextmanager
def environ(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for a block (e.g. LOCK_ENV for the kernels a holder starts), then restore it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
