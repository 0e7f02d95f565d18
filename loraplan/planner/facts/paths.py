"""Facts about a path the user named that the standard library answers without opening it."""

from __future__ import annotations

import errno
import os


def symlink_loop(path: str) -> bool:
    """Whether `path` (or a link on the way to it) is a symbolic link that leads back to itself (ELOOP)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False
