"""Worker processes never outlive the `loraplan run` that started them, whatever ends it (kill -9 included).

Three means, each for a way a run can end:
- the launcher (accelerate's, in its own session) gets a parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`)
  set between fork and exec (`launcher_preexec`), so it is killed when the run process dies, however it dies;
- each worker (torch's elastic agent starts them in their own sessions, out of reach of the launcher's process
  group) sets its own parent-death signal on the launcher at start and checks that the chain
  run -> launcher -> worker is still whole (the launcher may have died before the signal was armed: `bind_worker`);
- on every exit path the run process itself takes (an exception, Ctrl-C, a normal end) the launcher's process
  group is killed and the workers it left are waited for (`end_group`).

The output folder's lock (executor/outputs.py lock_output_dir: an flock on .loraplan.lock held by the run process)
is extended to the workers: each worker of machine 0 holds a shared POSIX record lock (fcntl) on the same file for
as long as it lives (`hold_folder_lock`), and a run taking the folder also needs that file free of POSIX locks
(`workers_hold`), so a folder whose run was killed stays refused until its last worker is gone. On Linux flock and
POSIX locks do not conflict with each other (on NFS, where flock is emulated by POSIX locks, the worker's shared
lock cannot be had and the worker runs without it: the launcher's parent-death signal still stops it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from typing import Optional

PR_SET_PDEATHSIG = 1  # linux/prctl.h
RUN_PID_ENV = "LORAPLAN_RUN_PID"  # the `loraplan run` process's pid, for the workers' check of the chain
LOCK_ENV = "LORAPLAN_LOCK_FILE"  # machine 0's .loraplan.lock, which each worker holds a shared lock on

_held_lock_fd: Optional[int] = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (the thread that forked it) dies. Linux only;
    False where unavailable."""
    libc = _libc()
    if libc is None:
        return False
    return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def launcher_preexec(parent_pid: int):
    """A `preexec_fn` for the launcher's Popen: arm the parent-death signal, then, since the parent may have died
    between fork and prctl (the signal would never come), exit at once when it is no longer our parent."""

    libc = _libc()  # looked up before the fork: the child only calls prctl and getppid

    def preexec() -> None:
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def launcher_env(env: dict, lock_path: Optional[str]) -> dict:
    """The launcher's environment (passed on to the workers by torch's agent): who the run process is, and which
    lock file the workers hold."""
    env = dict(env)
    env[RUN_PID_ENV] = str(os.getpid())
    if lock_path:
        env[LOCK_ENV] = os.path.abspath(lock_path)
    else:
        env.pop(LOCK_ENV, None)
    return env


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces


def bind_worker() -> None:
    """In a worker: die with the launcher (SIGKILL when it dies), and exit now if the chain run -> launcher ->
    worker is already broken (the launcher died before the signal was armed: this worker was reparented). Only
    for workers a `loraplan run` started (RUN_PID_ENV set); a no-op elsewhere."""
    run_pid = os.environ.get(RUN_PID_ENV)
    if not run_pid or not set_parent_death_signal(signal.SIGKILL):
        return
    launcher = os.getppid()
    if _parent_of(launcher) != int(run_pid):
        os._exit(1)  # orphaned before it began: nobody waits for this process, and it must not train


def hold_folder_lock() -> None:
    """In a worker of machine 0: hold a shared POSIX lock on the run's lock file until this process ends (the
    kernel drops it then, whatever ends it). Best effort: a file system without POSIX locks runs without."""
    global _held_lock_fd
    path = os.environ.get(LOCK_ENV)
    if not path or _held_lock_fd is not None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _held_lock_fd = fd  # kept open for the process's life


def workers_hold(fd: int) -> bool:
    """Whether processes of an earlier run (its workers) still hold the lock file open with `fd` (opened for
    writing): try for an exclusive POSIX lock and release it at once."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return True
    except OSError:
        return False  # no POSIX locks here: nothing to tell
    fcntl.lockf(fd, fcntl.LOCK_UN)
    return False


def lock_holders(path: str) -> list[int]:
    """The pids /proc/locks names as holding POSIX locks on the file at `path` (Linux; [] elsewhere)."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()
        if "POSIX" in parts and len(parts) > 5 and parts[5] == want:
            pids.append(int(parts[4]))
    return pids


def end_group(proc, lock_path: Optional[str], grace_s: float = 10.0) -> None:
    """On every way out of the launcher's wait (its end, an exception, Ctrl-C): kill what is left of its process
    group, then the workers still holding the run's lock (torch starts them in sessions of their own, out of the
    group's reach), and wait until they are gone, so the folder's lock is given up only after them."""
    if proc.poll() is None:  # only while the launcher lives: once reaped, its pid (the group's id) may be reused
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    kill_workers(lock_path, grace_s)


def kill_workers(lock_path: Optional[str], grace_s: float = 10.0) -> list[int]:
    """Kill (SIGKILL) the processes still holding POSIX locks on the run's lock file (its workers) and wait until
    none is left; returns the pids that were found."""
    if not lock_path:
        return []
    found = [p for p in lock_holders(lock_path) if p != os.getpid()]
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p in found for p in lock_holders(lock_path)):
        time.sleep(0.05)
    return found
