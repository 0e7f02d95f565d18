"""Library chatter the user can do nothing about (bitsandbytes' kernel messages, its CPU warnings): kept out of the
terminal, held until the run's folder exists, then written to its run.log (merge: merge.log)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

# Loggers whose messages the user can do nothing about, e.g. bitsandbytes' "Failed to load CPU gemm_4bit_forward
# from kernels-community" (bitsandbytes/backends/cpu/ops.py, logger.warning at import, shown by logging's
# last-resort handler on stderr). They go to the run's log file instead of the terminal.
QUIET_LOGGERS = ("bitsandbytes",)


class _LibraryLog(logging.Handler):
    """Holds records until a log file is attached (the messages come at import, before the folder exists)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.pending: list[logging.LogRecord] = []
        self.file: Optional[logging.Handler] = None
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        else:
            self.pending = (self.pending + [record])[-200:]


_LIBRARY_LOG: Optional[_LibraryLog] = None


def quiet_library_logs() -> None:
    """Route QUIET_LOGGERS away from the terminal; call before the libraries are imported. Idempotent."""
    global _LIBRARY_LOG
    if _LIBRARY_LOG is None:
        _LIBRARY_LOG = _LibraryLog()
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if _LIBRARY_LOG not in logger.handlers:
            logger.addHandler(_LIBRARY_LOG)
        logger.propagate = False
    import warnings

    if not getattr(warnings.showwarning, "_loraplan", False):  # e.g. "Paged optimizers are not supported on CPU"
        shown = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            package = next((n for n in QUIET_LOGGERS if f"{os.sep}{n}{os.sep}" in str(filename)), None)
            if package is None:
                return shown(message, category, filename, lineno, file, line)
            logging.getLogger(package).warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)

        showwarning._loraplan = True  # type: ignore[attr-defined]
        warnings.showwarning = showwarning


@contextlib.contextmanager
def library_log_file(path: str) -> Iterator[None]:
    """While inside, the routed messages (and those held since start) are appended to PATH. A file that cannot be
    written only loses these messages."""
    quiet_library_logs()
    log = _LIBRARY_LOG
    if log is None or log.file is not None:
        yield
        return
    handler = None
    if log.pending:
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError:
            handler = None
    else:
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file unless something is said
    if handler is not None:
        handler.setFormatter(log.formatter)
        for record in log.pending:
            with contextlib.suppress(Exception):
                handler.emit(record)
        log.pending = []
        log.file = handler
    try:
        yield
    finally:
        log.file = None
        if handler is not None:
            handler.close()
