"""What every command-line entry point shares: interrupts as an exception, exit statuses, one ``error:`` line.

A command wraps its work in :func:`interrupts_raise`, so SIGTERM unwinds the stack like Ctrl-C does (``finally``
blocks release the run lock, a stage is recorded as interrupted), and turns whatever stops it into one line on
stderr and an exit status:

    0 done · 1 a stage (or a sweep point) failed · 2 bad input or an unusable outputs folder · 130 SIGINT · 143 SIGTERM

``python -m rlhf_lib.pipeline``, ``python -m rlhf_lib.sweeps`` and ``python -m rlhf_lib.compare`` use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

EXIT_FAILED, EXIT_ERROR = 1, 2


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a KeyboardInterrupt, so code that stops cleanly on Ctrl-C stops on SIGTERM too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class OutputsError(OSError):
    """The outputs folder cannot be written (a file in its place, read-only, no permission, a full disk)."""


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread only); old handlers restored."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def interrupt_status(err: BaseException) -> int:
    """The shell's exit status for death by the signal: 128 + signal number (130 Ctrl-C / SIGINT, 143 SIGTERM)."""
    return 128 + getattr(err, "signum", signal.SIGINT)


def error(message: str) -> int:
    """Print ``error: <message>`` (its first line) on stderr; returns the bad-input exit status."""
    lines = str(message).strip().splitlines() or [""]
    print(f"error: {lines[0]}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def free_space(folder: str | Path) -> str:
    """'1.2 GB free' on the file system of ``folder`` (or of its nearest existing parent); '' when unknown."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f"{free / 1e9:.1f} GB free" if free >= 1e8 else f"{free / 1e6:.0f} MB free"


def os_error_line(err: OSError, folder: str | Path | None = None) -> str:
    """One line for a failed write: the path, what is wrong and the fix (a full disk says how much is free)."""
    where = err.filename or folder or "?"
    if err.errno == errno.ENOSPC:
        space = free_space(folder or where)
        return f"no space left on the device holding {where} ({space}); free some space and re-run"
    return (
        f"cannot write {where}: {err.strerror or err}; choose a writable common.outputs_dir (-p common.outputs_dir=DIR)"
    )


def check_writable(folder: str | Path, what: str = "common.outputs_dir") -> Path:
    """Create ``folder`` if needed and write a probe file in it; OutputsError (one line, with the fix) otherwise.

    Run before any stage starts, so a file in the folder's place, a read-only mount or a missing permission is
    refused before anything is computed (root passes permission checks, so the probe really writes).
    """
    folder = Path(folder)
    fix = f"set {what} to a writable folder (-p common.outputs_dir=DIR)"
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputsError(f"{what} {folder}: {parent} is a file, not a folder; {fix}")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OutputsError(os_error_line(err, folder)) from err
        raise OutputsError(f"{what} {folder} is not writable ({err.strerror or err}); {fix}") from err
    return folder


# -- notebooks run by papermill: interrupts reach the kernel ------------------------------------------------------


class _Kernels:
    """The stage kernel's pid and the signal that asked this process to stop, for :func:`_forward_interrupts`."""

    pid: int | None = None
    signum: int | None = None


def _kernel_manager_class():
    """nbclient's kernel manager, remembering the kernel's pid (it runs in its own session: Ctrl-C misses it)."""
    from jupyter_client.manager import AsyncKernelManager

    class StageKernelManager(AsyncKernelManager):
        async def _async_post_start_kernel(self, **kw: Any) -> None:
            await super()._async_post_start_kernel(**kw)
            _Kernels.pid = getattr(self.provisioner, "pid", None)

    return StageKernelManager


@contextlib.contextmanager
def forward_interrupts() -> Iterator[None]:
    """SIGINT / SIGTERM while a stage notebook runs interrupt its kernel, as Jupyter's interrupt button does.

    The running cell then raises KeyboardInterrupt, the kernel records the stage as interrupted and papermill
    returns normally, so the kernel's sockets are closed in order (killing the client mid-call is what prints
    ZMQ tracebacks). The interrupt is re-sent until the notebook returns (a kernel between cells ignores it); a
    second signal stops at once.
    """
    stop = threading.Event()

    def handler(signum: int, frame) -> None:
        if _Kernels.signum is not None or _Kernels.pid is None:
            raise Interrupted(signum)
        _Kernels.signum = signum
        threading.Thread(target=resend, daemon=True).start()

    def resend() -> None:
        while not stop.is_set() and _Kernels.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(_Kernels.pid, signal.SIGINT)
            stop.wait(2.0)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _Kernels.pid = _Kernels.signum = None
    for s in old:
        signal.signal(s, handler)
    try:
        yield
    except Exception as err:  # the cell raised KeyboardInterrupt (papermill reports it as a failed cell)
        if _Kernels.signum is not None:
            raise Interrupted(_Kernels.signum) from err
        raise
    finally:
        stop.set()
        for s, h in old.items():
            signal.signal(s, h)
    if _Kernels.signum is not None:  # the notebook returned (or failed on the interrupt): stop as asked
        raise Interrupted(_Kernels.signum)


def kernel_options() -> dict[str, Any]:
    """``papermill.execute_notebook`` options for :func:`forward_interrupts`: the kernel manager that keeps the
    kernel's pid, and the kernel's own log kept to critical messages (not its transport notices)."""
    return {"kernel_manager_class": _kernel_manager_class(), "extra_arguments": ["--IPKernelApp.log_level=CRITICAL"]}
