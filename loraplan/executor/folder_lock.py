"""The output folder held by one process: created with a one-line error, then locked (flock) while a command
writes there."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator, Optional

from loraplan.planner.errors import first_line

from .errors import RunError
from .lifetime import workers_hold
from .run_files import LOCK_FILE


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def make_output_dir(path: str, what: str = "output dir") -> None:
    """Create PATH (and its parents), or fail with one line naming it and why (a file in the way, a read-only
    or virtual file system, no permission). Nothing else is touched."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RunError(f"{what} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        return
    except OSError as exc:
        cause = exc.strerror or first_line(exc)
        anc = _nearest_existing(os.path.dirname(os.path.abspath(path)))
        if os.path.lexists(anc) and not os.path.isdir(anc):
            cause = f"{anc} is a file, not a folder"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            cause = f"{anc} is not writable ({exc.strerror})"
        else:
            cause = f"{cause} (creating it under {anc})"
        raise RunError(f"cannot create {what} {path}: {cause}") from None


def _read_holder(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8") as f:
            h = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h.get("pid"):
        return "another loraplan process"
    return f"`{h.get('command', 'loraplan')}` (pid {h['pid']} on {h.get('host', '?')}, since {h.get('started', '?')})"


class _Held:
    def __init__(self, fd: Optional[int], path: str):
        self.fd, self.path, self.depth = fd, path, 1


_HELD: dict[str, _Held] = {}


@contextlib.contextmanager
def lock_output_dir(path: str, command: str, what: str = "output dir", flag: str = "--output-dir") -> Iterator[None]:
    """Hold PATH for one process: create the folder, then take an OS lock (flock) on PATH/.loraplan.lock, whose
    text names the holder. A second process is refused with one line naming the holder; a lock file left by a
    killed process does not block (the kernel released its lock). Re-entrant within one process (the demo takes
    it before building its model, `execute` again). The workers of a ddp or fsdp run hold a shared POSIX lock on
    the same file while they live (executor/lifetime.py), so the folder stays refused until the last of them is
    gone, even when the run process was killed before them."""
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key].depth += 1
        try:
            yield
        finally:
            _HELD[key].depth -= 1
        return
    make_output_dir(path, what)
    lock_path = os.path.join(path, LOCK_FILE)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"cannot write to {what} {path}: {exc.strerror or first_line(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{what} {path} is in use by {_read_holder(lock_path)}; wait for it to finish or "
                           f"choose another {flag}") from None
        except OSError:  # a file system without locks (rare): run unguarded rather than not at all
            os.close(fd)
            fd = None
            break
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same and workers_hold(fd):  # the workers of a run that was killed, still alive (executor/lifetime.py)
            os.close(fd)
            raise RunError(f"{what} {path} is in use by the processes of an earlier run, still writing there "
                           f"(its `loraplan run` ended before them); wait for them to finish") from None
        if same:
            break
        os.close(fd)
    if fd is not None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[key] = held = _Held(fd, lock_path)
    try:
        yield
    finally:
        del _HELD[key]
        if held.fd is not None:
            with contextlib.suppress(OSError):
                if os.stat(held.path).st_ino == os.fstat(held.fd).st_ino:
                    os.unlink(held.path)  # while still locked: whoever opened it before sees it is gone
            os.close(held.fd)
