"""A machine other than 0 waits for machine 0 in words and for a bounded time.

torch's static rendezvous (what accelerate's launcher uses across nodes) has machine 0's launcher host a TCPStore
at --main-process-ip:--main-process-port; the other machines connect to it, silently retrying for the store's
timeout (600 s by default). Here the `loraplan run` of machine K first says "waiting for machine 0 at HOST:PORT",
then tries that address itself until it answers or `--rendezvous-timeout` seconds pass; on time out it exits with
one line and leaves nothing behind (no launcher was started; its log file, and the output folder when this wait
made it, are removed). The same timeout goes to the launcher (`--rdzv_conf timeout=N`: the TCPStore's timeout), so
the rendezvous after the first answer is bounded by it too.
"""

from __future__ import annotations

import os
import socket
import time

from .errors import TrainingFailed

DEFAULT_TIMEOUT_S = 600  # torch's static rendezvous default (static_tcp_rendezvous._default_timeout_seconds)


def launcher_args(timeout_s: int) -> list[str]:
    return ["--rdzv_conf", f"timeout={int(timeout_s)}"]


def answers(host: str, port: int, within_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=within_s):
            return True
    except OSError:
        return False


def wait_for_machine_0(host: str, port: int, timeout_s: float, out: str, log_path: str, console=None) -> None:
    """Wait until machine 0's rendezvous port answers. The shared output folder and this machine's log are made
    first (machine 0 takes them for the run's own files); on time out both are removed again when this made them."""
    made_out = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    made_log = not os.path.exists(log_path)
    line = f"waiting for machine 0 at {host}:{port} (up to {timeout_s:g} s; --rendezvous-timeout sets it)"
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(line + "\n")
    if console is not None:
        console.print(line, soft_wrap=True)
    deadline = time.monotonic() + timeout_s
    while not answers(host, port, within_s=min(1.0, max(deadline - time.monotonic(), 0.05))):
        if time.monotonic() >= deadline:
            if made_log:
                _remove(log_path)
            if made_out:
                try:
                    os.rmdir(out)
                except OSError:
                    pass
            raise TrainingFailed(f"machine 0 did not answer at {host}:{port} within {timeout_s:g} s: start `loraplan "
                                 f"run` there too (or check --main-process-ip, --main-process-port and the firewall); "
                                 f"--rendezvous-timeout waits longer")
        time.sleep(0.2)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
