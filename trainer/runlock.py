"""Is a run training right now? A fact, not a guess: the trainer holds an OS file lock on RUN_DIR/.trainer.lock
for as long as it lives, and the kernel drops it the moment the process dies (kill -9 included).

A recorded PID was the old answer, and a wrong one: a dead run whose PID the OS gave to another process looked
alive forever, and blocked every new training (issue 15). Where the OS has no flock (Windows), the PID check stays
as the fallback. Stdlib only.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".trainer.lock"


class RunLockedError(RuntimeError):
    """Another process trains this run."""


@contextmanager
def holding(run_dir: str | Path, wait: float = 5.0):
    """Hold the run's lock for the body; yields the open lock file (None without flock), which a child process
    may inherit to hold the lock as long as it lives. A reader may hold it for a moment (is_held), so a busy
    lock is retried for `wait` seconds before RunLockedError."""
    if fcntl is None:
        yield None
        return
    f = open(Path(run_dir) / LOCK_FILE, "a+b")
    try:
        deadline = time.monotonic() + wait
        while not _try_lock(f, fcntl.LOCK_EX):
            if time.monotonic() > deadline:
                raise RunLockedError(f"run {Path(run_dir).name} is already training in another process")
            time.sleep(0.05)
        yield f
    finally:
        f.close()  # closing drops the lock


def hold_when_free(run_dir: str | Path):
    """Block until the run's lock is free, then hold it: the open file that holds it until closed (or this
    process ends); None where the OS has no flock. Meant for a thread: flock releases the GIL while it waits."""
    if fcntl is None:
        return None
    f = open(Path(run_dir) / LOCK_FILE, "a+b")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def is_held(run_dir: str | Path) -> bool | None:
    """True while a trainer holds the run's lock, False when none does, None where the OS cannot tell."""
    if fcntl is None:
        return None
    path = Path(run_dir) / LOCK_FILE
    try:
        f = open(path, "rb")
    except OSError:
        return False  # never locked (a run of an older loradesk, or one that never started)
    with f:
        if _try_lock(f, fcntl.LOCK_SH):
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
        return True


def _try_lock(f, kind: int) -> bool:
    try:
        fcntl.flock(f, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def pid_alive(pid: int) -> bool:
    """The fallback where flock is missing: a process with this PID exists and is not a zombie."""
    if pid <= 0:
        return False
    if os.name == "nt":  # there os.kill(pid, 0) is not a probe: it sends the process a Ctrl+C
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes
    kernel32 = ctypes.windll.kernel32
    kernel32.OpenProcess.restype = ctypes.c_void_p  # a HANDLE: pointer-sized, not the default 32-bit int
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists (another user's), as on POSIX
    handle = ctypes.c_void_p(handle)
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)
