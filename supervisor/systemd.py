"""systemd's notify protocol: READY=1, WATCHDOG=1 and STOPPING=1 over a datagram socket.

A few lines instead of a library: the message goes to the Unix datagram socket named by
`$NOTIFY_SOCKET` (a leading `@` means Linux's abstract namespace). Without the variable,
nothing is sent: dlkeeper was not started by systemd with `Type=notify`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Sends `message` (e.g. "READY=1") to systemd; False when there is no one to tell."""
    environ = os.environ if environ is None else environ
    target = environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", target, exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None when systemd
    watches no watchdog for this process."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (one we were forked from)
    return int(usec) / 1_000_000 / 2
