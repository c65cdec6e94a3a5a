"""`dlkeeper serve` as a real child process on a loopback-only library, and a raw JSON-lines
client for its socket, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actors.layout import Layout
from supervisor.config import PathFlags, load_config
from tests.swarm import LOOPBACK_SETTINGS

DEADLINE = 30.0
# CONTRACT.md section 2's error codes, spelled out here and not taken from actors.errors: the
# tests hold the daemon to the contract, not to itself.
CONTRACT_ERROR_CODES = frozenset(
    {
        "bad_request",
        "unknown_op",
        "not_found",
        "invalid_torrent",
        "invalid_magnet",
        "path_not_allowed",
        "duplicate",
        "too_large",
        "not_ready",
        "no_space",
        "internal",
    }
)


def _toml(value: str | int | bool | float) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_config(
    directory: Path,
    library: Path,
    *,
    socket_path: Path | None = None,
    libtorrent: dict[str, str | int | bool] | None = None,
    make_folders: bool = True,
    **keys: str | int | bool | float,
) -> Path:
    """A config file for a daemon that only ever touches 127.0.0.1.

    The socket goes in a short temporary folder unless given: a Unix socket path is limited
    to 107 bytes, and pytest's folders are long. The library and download folders are made, as
    an operator would (the daemon never makes them), unless `make_folders=False`;
    `min_free_bytes` is 0 unless given, so that no test depends on the machine's free space.
    """
    socket_path = socket_path or Path(tempfile.mkdtemp(prefix="dk")) / "api.sock"
    keys = {"min_free_bytes": 0, **keys}
    if make_folders:
        library.mkdir(parents=True, exist_ok=True)
        download_path = keys.get("download_path")
        Path(str(download_path) if download_path else library / "downloads").mkdir(
            parents=True, exist_ok=True
        )
    settings = {**LOOPBACK_SETTINGS, **(libtorrent or {})}
    lines = [f"library_path = {_toml(str(library))}", f"socket = {_toml(str(socket_path))}"]
    lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
    lines += ["", "[libtorrent]"] + [f"{key} = {_toml(v)}" for key, v in settings.items()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dlkeeper.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def layout_of(config: Path) -> Layout:
    """Where a daemon started with `config` keeps its state and its .torrent copies."""
    return load_config(PathFlags(config=config), environ={}).layout


def socket_of(config: Path) -> Path:
    for line in config.read_text().splitlines():
        if line.startswith("socket = "):
            return Path(json.loads(line.removeprefix("socket = ")))
    raise AssertionError(f"{config} names no socket")


class Daemon:
    """A running `dlkeeper serve --config CONFIG`; always killed and reaped by `close()`.

    Readiness is READY=1 on a NOTIFY_SOCKET the test binds, as systemd would.
    """

    def __init__(
        self,
        config: Path,
        env: dict[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> None:
        """`command_prefix` runs the daemon through another program (a sandbox, say)."""
        self.config = config
        self.socket = socket_of(config)
        self._notify_dir = Path(tempfile.mkdtemp(prefix="dkn"))
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self._notify_dir / "notify"))
        self.notify.settimeout(DEADLINE)
        self.log = config.parent / "daemon.log"
        self._log_file = self.log.open("ab")
        self.process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "supervisor", "serve", "--config", str(config)],
            stderr=self._log_file,
            env={**os.environ, "NOTIFY_SOCKET": str(self._notify_dir / "notify"), **(env or {})},
        )
        self.notices: list[str] = []

    def wait_for_notice(self, notice: str, timeout: float = DEADLINE) -> None:
        """Waits until the daemon sends `notice` (e.g. READY=1) to its NOTIFY_SOCKET."""
        deadline = time.monotonic() + timeout
        while notice not in self.notices:
            remaining = deadline - time.monotonic()
            if self.process.poll() is not None:
                self._drain_notices()  # it may have said so just before it exited
                if notice in self.notices:
                    return
            if remaining <= 0 or self.process.poll() is not None:
                raise AssertionError(
                    f"no {notice} from the daemon (exit {self.process.poll()}); "
                    f"log:\n{self.log.read_text()[-3000:]}"
                )
            self.notify.settimeout(min(remaining, 0.5))
            try:
                self.notices.append(self.notify.recv(4096).decode())
            except TimeoutError:
                continue

    def _drain_notices(self) -> None:
        self.notify.setblocking(False)
        try:
            while True:
                self.notices.append(self.notify.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.notify.setblocking(True)

    def wait_ready(self) -> Daemon:
        self.wait_for_notice("READY=1")
        return self

    def stop(self, timeout: float = DEADLINE) -> int:
        """SIGTERM and wait: the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (its worker sees its stdin close and exits on its own)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(DEADLINE)

    def close(self) -> None:
        self.kill()
        self.notify.close()
        self._log_file.close()

    def client(self) -> RawClient:
        return RawClient(self.socket)


@contextmanager
def running_daemon(config: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    daemon = Daemon(config, env)
    try:
        yield daemon.wait_ready()
    finally:
        daemon.close()


class RawClient:
    """JSON lines over the socket, with no help from supervisor.client: for raw-bytes tests."""

    def __init__(self, path: Path, timeout: float = DEADLINE) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    def read_reply(self) -> dict[str, Any]:
        """The next reply; events read meanwhile are kept in `events`."""
        while True:
            message = self.read_message()
            if "event" in message:
                self.events.append(message)
            else:
                return message

    def request(self, op: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        self.send_raw(json.dumps({"id": self._next_id, "op": op, **params}).encode() + b"\n")
        reply = self.read_reply()
        assert reply["id"] == self._next_id, reply
        return reply

    def call(self, op: str, **params: Any) -> Any:
        """The result of an op that must succeed."""
        reply = self.request(op, **params)
        assert reply["ok"], reply
        return reply["result"]

    def next_event(self, name: str | None = None, timeout: float = DEADLINE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self.events):
                if name is None or event["event"] == name:
                    return self.events.pop(index)
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            message = self.read_message()
            if "event" in message:
                self.events.append(message)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
