"""What the message API tests (tests/test_api_*.py) share: a real `dlkeeper serve` process on a
library of its own, its real Unix socket, raw JSON lines, real .torrent files and a real loopback
seeder (CONTRACT section 2).

Most tests share one daemon per module (`shared`) and keep apart by task_id and by torrent; a
test that needs to know the whole state (every completion, the exact bytes of downloads.json) or
that stops the daemon gets its own (`fresh`). Every wait has a deadline. The fixtures are named
`fixture_*` so that a test module imports them without its parameters shadowing the import.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import shutil
import socket
import struct
import tempfile
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import libtorrent as lt
import pytest

from actors.layout import Layout
from tests.daemons import Daemon, RawClient, running_daemon, write_config
from tests.swarm import Seeder, seeding
from tests.torrents import Payload, make_payload

T = TypeVar("T")

DEADLINE = 20.0  # bounds every wait; nothing waited for takes more than a second or two
MiB = 1024 * 1024
MAX_LINE = 8 * MiB
# libtorrent's queue would hold back a download with peers behind the many peerless ones that
# the shared daemon collects; no limits, so that every download starts when it is added.
NO_QUEUE: dict[str, str | int | bool] = {
    "active_downloads": -1,
    "active_seeds": -1,
    "active_limit": -1,
}
DOWNLOAD_INFO_KEYS = {
    "task_id",
    "name",
    "info_hash",
    "status",
    "progress",
    "total_bytes",
    "downloaded_bytes",
    "download_rate",
    "upload_rate",
    "num_peers",
    "save_path",
    "created_at",
    "completed_at",
    "error",
    "files",
}
COMPLETED_EVENT_KEYS = {
    "event",
    "seq",
    "task_id",
    "name",
    "info_hash",
    "save_path",
    "files",
    "torrent_metadata",
    "validation_metadata",
    "completed_at",
}

# --- a library, a daemon on it, and what a test needs to talk to it ---------------------------


@dataclass(frozen=True)
class Library:
    """A daemon's folders and config: library_path, and download_path inside it."""

    root: Path
    config: Path

    @property
    def layout(self) -> Layout:
        return Layout(library_path=self.root, download_path=self.root / "downloads")

    @property
    def downloads(self) -> Path:
        return self.layout.download_path

    @property
    def torrents(self) -> Path:
        return self.layout.torrents_dir

    @property
    def state_file(self) -> Path:
        return self.layout.state_file

    def state(self) -> dict[str, Any]:
        """The persisted downloads by task_id, as the file holds them now."""
        if not self.state_file.exists():
            return {}
        downloads = json.loads(self.state_file.read_bytes())["downloads"]
        assert isinstance(downloads, dict)
        return downloads


def make_library(directory: Path, socket_path: Path | None = None) -> Library:
    root = directory / "library"
    config = write_config(directory, root, socket_path=socket_path, libtorrent=NO_QUEUE)
    return Library(root, config)


@dataclass(frozen=True)
class Served:
    """A running daemon and its library; `started` is just before its process was spawned."""

    daemon: Daemon
    library: Library
    started: float

    def client(self) -> RawClient:
        return RawClient(self.daemon.socket, timeout=DEADLINE)


@pytest.fixture(scope="module", name="shared")
def fixture_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon for the tests that keep apart by task_id and torrent."""
    library = make_library(tmp_path_factory.mktemp("shared"))
    started = time.monotonic()
    with running_daemon(library.config) as daemon:
        yield Served(daemon, library, started)


@pytest.fixture(name="fresh")
def fixture_fresh(tmp_path: Path) -> Iterator[Served]:
    """A daemon of this test's own, on an empty library."""
    library = make_library(tmp_path)
    started = time.monotonic()
    with running_daemon(library.config) as daemon:
        yield Served(daemon, library, started)


@pytest.fixture(name="api")
def fixture_api(shared: Served) -> Iterator[RawClient]:
    """A connection to the shared daemon."""
    with shared.client() as client:
        yield client


@pytest.fixture(name="short_dir")
def fixture_short_dir() -> Iterator[Path]:
    """A folder with a short path, for a socket of the test's choosing (107 bytes at most)."""
    directory = Path(tempfile.mkdtemp(prefix="dk"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_payload(directory: Path, files: dict[str, int] | None = None) -> Payload:
    """Files of fresh random bytes, so a torrent of its own (no test's hash is another's)."""
    name = new_id("payload")
    return make_payload(directory / "seed", name, files or {"a.bin": 96_000, "sub/b.bin": 40_000})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def line(message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


def error_of(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["ok"] is False, reply
    assert set(reply) == {"id", "ok", "error"}, reply
    error = reply["error"]
    assert isinstance(error, dict)
    assert isinstance(error["message"], str), reply
    assert error["message"], reply
    return error


def code_of(reply: dict[str, Any]) -> str:
    code = error_of(reply)["code"]
    assert isinstance(code, str)
    return code


def wait_until(check: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Polls `check` until it returns something true; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)  # polling a condition, under a deadline


def wait_status(client: RawClient, task_id: str, status: str) -> dict[str, Any]:
    """The DownloadInfo of `task_id`, once it has `status`."""

    def info_if_there() -> dict[str, Any] | None:
        info: dict[str, Any] = client.call("get", task_id=task_id)
        return info if info["status"] == status else None

    return wait_until(info_if_there, f"{task_id} to be {status}")


def subscribe(served: Served, **params: Any) -> RawClient:
    """A new connection subscribed to events; its `ok` has been read."""
    client = served.client()
    client.send_raw(line({"id": "subscribe", "op": "subscribe", **params}))
    assert client.read_message() == {"id": "subscribe", "ok": True, "result": {}}
    return client


def wait_event(
    client: RawClient, name: str, task_id: str, timeout: float = DEADLINE
) -> dict[str, Any]:
    """The next event `name` for `task_id` on a subscribed connection; others are kept."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            for index, event in enumerate(client.events):
                if event["event"] == name and event.get("task_id") == task_id:
                    return client.events.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {name} for {task_id} within {timeout:g} s")
            client.sock.settimeout(remaining)
            try:
                message = client.read_message()
            except TimeoutError:
                continue
            assert "event" in message, f"a reply on a connection only used for events: {message}"
            client.events.append(message)
    finally:
        client.sock.settimeout(DEADLINE)


def add_torrent(client: RawClient, payload: Payload, **params: Any) -> dict[str, Any]:
    """Adds `payload` by torrent_b64; the add's result."""
    result: dict[str, Any] = client.call("add", torrent_b64=b64(payload.torrent), **params)
    return result


@contextlib.contextmanager
def seeding_now(*payloads: Payload, upload_rate_limit: int = 0) -> Iterator[Seeder]:
    """`seeding()`, with its torrents started: left to libtorrent's queue they stay paused until
    its first tick, refuse a peer, and that peer then waits long before it tries again."""
    with seeding(*payloads, upload_rate_limit=upload_rate_limit) as seeder:
        for handle in seeder.handles.values():
            handle.unset_flags(lt.torrent_flags.auto_managed)
            handle.resume()
        wait_until(
            lambda: not any(handle.status().paused for handle in seeder.handles.values()),
            "the seeder to start seeding",
        )
        yield seeder


def add_started(client: RawClient, library: Library, payload: Payload, task_id: str) -> None:
    """Adds `payload` and waits until libtorrent has started it and the daemon saved so."""
    add_torrent(client, payload, task_id=task_id)
    wait_until(lambda: library.state()[task_id]["status"] == "downloading", f"{task_id} to start")


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes written to `sock` that the daemon has not read yet."""
    packed = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    unsent: int = struct.unpack("i", packed)[0]
    return unsent


def wait_read_by_daemon(client: RawClient) -> None:
    wait_until(lambda: unsent_bytes(client.sock) == 0, "the daemon to read what was sent")


def assert_closed(client: RawClient) -> None:
    """The daemon hung up: end of stream (or a reset, for a line it did not read to its end)."""
    with contextlib.suppress(ConnectionResetError):
        assert client.sock.recv(1) == b""


def assert_serving(served: Served) -> None:
    assert served.daemon.process.poll() is None, "the daemon exited"
    with served.client() as client:
        assert client.call("ping")["ready"] is True


def padded_ping(length: int) -> bytes:
    """A request line of exactly `length` bytes (newline not counted): a ping with a `pad`."""
    head, tail = b'{"id":1,"op":"ping","pad":"', b'"}'
    return head + b"a" * (length - len(head) - len(tail)) + tail


def slow_torrent(files: int = 200_000) -> bytes:
    """A bencoded .torrent of very many files and no pieces: a second or more to decode, then
    invalid_torrent."""
    entries = b"".join(b"d6:lengthi1e4:pathl7:f%06dee" % index for index in range(files))
    return b"d4:infod5:filesl" + entries + b"e4:name4:slow12:piece lengthi16384eee"


def files_under(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file()
    }


def has_files(directory: Path) -> bool:
    try:
        return any(path.is_file() for path in directory.rglob("*"))
    except FileNotFoundError:  # being deleted as we look
        return True


def payload_files(payload: Payload) -> dict[str, bytes]:
    return files_under(payload.root / payload.name)


def is_utc_timestamp(value: object) -> bool:
    if not isinstance(value, str):
        return False
    return datetime.fromisoformat(value).utcoffset() == timedelta(0)


def send_until_hung_up(client: RawClient, data: bytes) -> None:
    """Sends `data`, or as much of it as the daemon reads before it hangs up."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        client.send_raw(data)


def hang_up_and_wait(client: RawClient) -> bytes:
    """Closes our side and returns what the daemon sends before it closes its own: by then it
    has read everything and finished every request it was going to carry out."""
    client.sock.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := client.sock.recv(65536):
        received += chunk
    return received
